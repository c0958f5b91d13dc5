"""VXI-11 broadcast discovery: one portmapper GETPORT for the VXI-11 core program, sent over UDP to the
broadcast address of each configured interface; every instrument answers from its own address.

`ScanRound` is the sans-IO part — the request bytes and the judgement of each reply datagram (wrong xid,
truncated, malformed, denied, "not registered": ignored with a log line; trailing padding is tolerated,
as some LAN/GPIB gateways pad their replies). `BroadcastScanner` owns one UDP socket per interface and
leaves the waiting to its caller (`sockets` for select, `read`, then `end_round`), so a service loop can
do other work during the reply window; `scan(window_s)` is the blocking one-shot form.
"""

from __future__ import annotations

import random
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from visabus.sdk.resources import Protocol, Resource
from visabus.workers.protocols import portmapper
from visabus.workers.protocols.errors import RemoteProtocolError

from .interfaces import Interface

log = structlog.get_logger(__name__)

VXI11_CORE_PROG = 0x0607AF
VXI11_CORE_VERS = 1
_MAX_DATAGRAM = 65535


def scan_resource(address: str, core_port: int, pmap_port: int = portmapper.PMAP_PORT) -> str:
    """The resource a reply names: `TCPIP0::ip::inst0::INSTR` behind the standard portmapper port; off it,
    the core port itself (`TCPIP0::ip,port::inst0::INSTR`), since a client would look on port 111."""
    port = None if pmap_port == portmapper.PMAP_PORT else core_port
    return Resource(Protocol.VXI11, address, 0, "inst0", port).canonical


@dataclass(frozen=True)
class ScanHit:
    address: str
    core_port: int
    resource: str


class ScanRound:
    """One GETPORT broadcast and the replies to it. Sans-IO."""

    def __init__(self, xid: int, pmap_port: int = portmapper.PMAP_PORT) -> None:
        self.xid = xid & 0xFFFFFFFF
        self.pmap_port = pmap_port
        self.hits: dict[str, ScanHit] = {}

    def request(self) -> bytes:
        return portmapper.encode_getport_call(self.xid, VXI11_CORE_PROG, VXI11_CORE_VERS, portmapper.IPPROTO_TCP)

    def feed(self, data: bytes, source: tuple[str, int]) -> ScanHit | None:
        """Judge one reply datagram; a hit if it is a well-formed answer to this round with a port."""
        address = str(source[0])
        try:
            xid, port = portmapper.decode_getport_reply(data)
        except RemoteProtocolError as exc:
            log.info("discovery.vxi11_bad_reply", source=address, size=len(data), error=str(exc))
            return None
        if xid != self.xid:
            log.info("discovery.vxi11_wrong_xid", source=address, xid=xid, expected=self.xid)
            return None
        if port == 0:
            log.debug("discovery.vxi11_not_registered", source=address)
            return None
        if len(data) != portmapper.GETPORT_REPLY_SIZE:
            log.debug("discovery.vxi11_padded_reply", source=address, size=len(data))
        hit = ScanHit(address, port, scan_resource(address, port, self.pmap_port))
        self.hits.setdefault(address, hit)
        return hit


class BroadcastScanner:
    """Sends each round's GETPORT to every configured interface's broadcast address (and, on loopback,
    to the address itself) at `pmap_port`; collects replies until the caller ends the round."""

    def __init__(self, interfaces: Sequence[Interface], pmap_port: int = portmapper.PMAP_PORT) -> None:
        if not 0 < pmap_port < 65536:
            raise ValueError(f"portmapper port {pmap_port!r} is not a UDP port (1-65535)")
        self.interfaces = list(interfaces)
        self.pmap_port = pmap_port
        self._sockets: list[tuple[socket.socket, Interface]] = []
        self._round: ScanRound | None = None

    def open(self) -> None:
        for iface in self.interfaces:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                sock.bind((iface.address, 0))
            except OSError:
                sock.close()
                self.close()
                raise
            self._sockets.append((sock, iface))

    def close(self) -> None:
        for sock, _ in self._sockets:
            sock.close()
        self._sockets = []

    @property
    def sockets(self) -> list[socket.socket]:
        return [sock for sock, _ in self._sockets]

    def begin_round(self) -> None:
        self._round = ScanRound(random.getrandbits(32), self.pmap_port)
        request = self._round.request()
        for sock, iface in self._sockets:
            for target in iface.scan_targets:
                try:
                    sock.sendto(request, (target, self.pmap_port))
                except OSError as exc:  # interface down or unroutable: this round hears nothing there
                    log.debug("discovery.vxi11_send_failed", interface=iface.name, target=target, error=str(exc))

    def read(self, sock: socket.socket) -> list[ScanHit]:
        """Drain one readable socket; returns the addresses that answered this round for the first time."""
        new: list[ScanHit] = []
        while True:
            try:
                data, source = sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return new
            except OSError as exc:  # e.g. ICMP port unreachable reported on the socket
                log.debug("discovery.vxi11_recv_failed", error=str(exc))
                return new
            if self._round is None:
                log.debug("discovery.vxi11_reply_outside_round", source=source[0])
                continue
            known = len(self._round.hits)
            hit = self._round.feed(data, source)
            if hit is not None and len(self._round.hits) > known:
                new.append(hit)

    def end_round(self) -> list[ScanHit]:
        finished, self._round = self._round, None
        if finished is None:
            return []
        return sorted(finished.hits.values(), key=lambda h: socket.inet_aton(h.address))

    def scan(self, window_s: float) -> list[ScanHit]:
        """One blocking round: send, collect replies for `window_s`, return the hits."""
        self.begin_round()
        deadline = time.monotonic() + window_s
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select(self.sockets, [], [], left)
            for sock in readable:
                self.read(sock)
        return self.end_round()


def core_port_lookup(timeout_s: float = 0.5) -> Callable[[str, int], int | None]:
    """A (host, portmapper port) → VXI-11 core port function for mDNS `_vxi-11._tcp` records that name a
    portmapper off port 111; None when it does not answer or has no core program registered."""

    def lookup(host: str, pmap_port: int) -> int | None:
        try:
            port = portmapper.getport(
                host, VXI11_CORE_PROG, VXI11_CORE_VERS, portmapper.IPPROTO_TCP,
                port=pmap_port, transport="udp", timeout=timeout_s,
            )
        except (OSError, RemoteProtocolError) as exc:
            log.info("discovery.vxi11_getport_failed", host=host, port=pmap_port, error=str(exc))
            return None
        return port or None

    return lookup

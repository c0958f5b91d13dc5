"""mDNS liveness probes: is a known service still answering?

zeroconf keeps a service until its record expires (PTR records live 75 minutes), so an instrument that
loses power or its cable, and so sends no goodbye, would stay "present" that long. `MdnsProber` asks
each known service for its SRV record with a one-shot ("legacy unicast") query: sent to 224.0.0.251:5353
from an ephemeral port on each configured interface, answered by unicast straight to that port
(RFC 6762 §6.7). Such answers are not subject to the one-per-second multicast rate limit and never land
on another process's shared port 5353, so one probe per round gets one answer per live service.

The caller owns the rhythm: `send(names)` once a round, `read(sock)` whenever a socket is readable (it
returns the service names that answered).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable, Sequence

import structlog
from zeroconf import DNSIncoming, DNSOutgoing, DNSQuestion

log = structlog.get_logger(__name__)

MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353
_TYPE_TXT = 16
_TYPE_SRV = 33
_CLASS_IN = 1
_FLAGS_QUERY = 0x0000
_MAX_DATAGRAM = 9000


class MdnsProber:
    """One UDP socket per interface address, bound to an ephemeral port, multicasting on that interface."""

    def __init__(self, addresses: Sequence[str], *, group: str = MDNS_GROUP, port: int = MDNS_PORT) -> None:
        self.addresses = list(addresses)
        self._destination = (group, port)
        self._sockets: list[socket.socket] = []
        self._query_id = 0

    def open(self) -> None:
        for address in self.addresses:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind((address, 0))
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)  # responders on this host
            except OSError:
                sock.close()
                self.close()
                raise
            self._sockets.append(sock)

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._sockets)

    def send(self, names: Iterable[str]) -> None:
        """Ask every interface for the SRV record of each named service instance."""
        names = sorted(set(names))
        if not names:
            return
        self._query_id = random.randint(1, 0xFFFF)
        out = DNSOutgoing(_FLAGS_QUERY, multicast=False, id_=self._query_id)
        for name in names:
            out.add_question(DNSQuestion(name, _TYPE_SRV, _CLASS_IN))
        for packet in out.packets():
            for sock in self._sockets:
                try:
                    sock.sendto(packet, self._destination)
                except OSError as exc:  # interface went down: the round simply hears nothing
                    log.debug("discovery.mdns_probe_send_failed", address=sock.getsockname()[0], error=str(exc))

    def read(self, sock: socket.socket) -> set[str]:
        """Drain one readable socket; returns the (lower-case) service names that answered."""
        heard: set[str] = set()
        while True:
            try:
                data, source = sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return heard
            except OSError as exc:
                log.debug("discovery.mdns_probe_recv_failed", error=str(exc))
                return heard
            heard |= answered_names(data, source)


def answered_names(data: bytes, source: tuple[str, int] | None = None) -> set[str]:
    """Service names with a live SRV or TXT record in an mDNS response; empty for anything else."""
    message = DNSIncoming(data, source)
    if not message.valid or not message.is_response():
        log.debug("discovery.mdns_probe_ignored", source=source, size=len(data))
        return set()
    return {r.name.lower() for r in message.answers() if r.type in (_TYPE_SRV, _TYPE_TXT) and r.ttl > 0}

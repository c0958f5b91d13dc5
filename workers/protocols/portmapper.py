"""Portmapper v2 (RFC 1833 / RFC 1057 appendix A): codec, blocking client, TCP+UDP server.

Codec (sans-IO): `encode_getport_call` / `decode_getport_reply` (as sent over UDP, no record
mark), SET / UNSET / DUMP calls and replies, and `PortmapRegistry.handle(record)` which turns one
call message into one reply message — the whole server logic without sockets.

Client: `getport(host, prog, vers, prot, port=111, transport="tcp"|"udp", timeout=...)`. Socket
problems surface as `OSError` (ConnectionRefusedError, TimeoutError, ...); a malformed or refused
reply as `RemoteProtocolError`. Port 0 in the answer means "not registered".

Server: `PortmapperServer(host, port=0)` answers NULL, SET, UNSET, GETPORT and DUMP on TCP and
UDP (the UDP socket takes the TCP port number when it is free). SET and UNSET are accepted from
loopback peers only, as rpcbind does.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Self

import structlog

from . import rpc
from .errors import RemoteProtocolError

log = structlog.get_logger(__name__)

PMAP_PROG = 100000
PMAP_VERS = 2
PMAP_PORT = 111
IPPROTO_TCP = 6
IPPROTO_UDP = 17

PROC_NULL = 0
PROC_SET = 1
PROC_UNSET = 2
PROC_GETPORT = 3
PROC_DUMP = 4
PROC_CALLIT = 5

GETPORT_REPLY_SIZE = 28
MAX_DUMP_ENTRIES = 4096  # a DUMP reply longer than this is hostile, not a real portmapper
MAX_UDP_DATAGRAM = 65535

_xids = itertools.count(random.randrange(1, 1 << 30))


@dataclass(frozen=True)
class Mapping:
    prog: int
    vers: int
    prot: int
    port: int

    def pack(self, packer: rpc.XdrPacker) -> None:
        packer.pack_uint(self.prog, "mapping.prog")
        packer.pack_uint(self.vers, "mapping.vers")
        packer.pack_uint(self.prot, "mapping.prot")
        packer.pack_uint(self.port, "mapping.port")

    @classmethod
    def unpack(cls, unpacker: rpc.XdrUnpacker) -> Mapping:
        return cls(
            unpacker.unpack_uint("mapping.prog"),
            unpacker.unpack_uint("mapping.vers"),
            unpacker.unpack_uint("mapping.prot"),
            unpacker.unpack_uint("mapping.port"),
        )


def _mapping_call(xid: int, proc: int, mapping: Mapping) -> bytes:
    packer = rpc.XdrPacker()
    mapping.pack(packer)
    return rpc.encode_call(xid, PMAP_PROG, PMAP_VERS, proc, packer.get_buffer())


# ------------------------------------------------------------------------------------ client codec
def encode_getport_call(xid: int, prog: int, vers: int, prot: int) -> bytes:
    """A GETPORT call message (56 bytes, no record mark — as sent over UDP)."""
    return _mapping_call(xid, PROC_GETPORT, Mapping(prog, vers, prot, 0))


def encode_set_call(xid: int, mapping: Mapping) -> bytes:
    return _mapping_call(xid, PROC_SET, mapping)


def encode_unset_call(xid: int, mapping: Mapping) -> bytes:
    return _mapping_call(xid, PROC_UNSET, mapping)


def encode_dump_call(xid: int) -> bytes:
    return rpc.encode_call(xid, PMAP_PROG, PMAP_VERS, PROC_DUMP)


def encode_null_call(xid: int) -> bytes:
    return rpc.encode_call(xid, PMAP_PROG, PMAP_VERS, PROC_NULL)


def _results(data: bytes) -> tuple[int, rpc.XdrUnpacker]:
    reply = rpc.decode_reply(data)
    if not reply.ok:
        raise rpc.RpcCallFailed(reply)
    return reply.xid, rpc.XdrUnpacker(reply.results)


def decode_getport_reply(data: bytes) -> tuple[int, int]:
    """(xid, port) from a GETPORT reply (port 0 = not registered); RemoteProtocolError if malformed.

    Trailing padding after the port is tolerated; a port above 65535 is not.
    """
    xid, unpacker = _results(data)
    port = unpacker.unpack_uint("GETPORT port")
    if port > 0xFFFF:
        raise RemoteProtocolError(f"portmapper GETPORT reply xid {xid}: port {port} is not a TCP/UDP port")
    unpacker.done(allow_trailing=True)
    return xid, port


def decode_bool_reply(data: bytes) -> tuple[int, bool]:
    """(xid, result) from a SET or UNSET reply."""
    xid, unpacker = _results(data)
    return xid, unpacker.unpack_bool("SET/UNSET result")


def decode_dump_reply(data: bytes) -> tuple[int, list[Mapping]]:
    """(xid, mappings) from a DUMP reply: a list of entries, each preceded by TRUE, ended by FALSE."""
    xid, unpacker = _results(data)
    mappings: list[Mapping] = []
    while unpacker.unpack_bool("DUMP list marker"):
        if len(mappings) >= MAX_DUMP_ENTRIES:
            raise RemoteProtocolError(f"portmapper DUMP reply xid {xid}: more than {MAX_DUMP_ENTRIES} entries")
        mappings.append(Mapping.unpack(unpacker))
    unpacker.done(allow_trailing=True)
    return xid, mappings


# ------------------------------------------------------------------------------------ server codec
class PortmapRegistry:
    """The portmapper's table and its call handling, without sockets (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._table: dict[tuple[int, int, int], int] = {}

    def register(self, prog: int, vers: int, prot: int, port: int) -> bool:
        with self._lock:
            if (prog, vers, prot) in self._table:
                return False
            self._table[(prog, vers, prot)] = port
            return True

    def unregister(self, prog: int, vers: int) -> bool:
        with self._lock:
            keys = [k for k in self._table if k[:2] == (prog, vers)]
            for key in keys:
                del self._table[key]
            return bool(keys)

    def lookup(self, prog: int, vers: int, prot: int) -> int:
        with self._lock:
            return self._table.get((prog, vers, prot), 0)

    def mappings(self) -> list[Mapping]:
        with self._lock:
            return [Mapping(p, v, t, port) for (p, v, t), port in sorted(self._table.items())]

    def handle(self, record: bytes, *, trusted: bool = True) -> bytes | None:
        """Reply to one call message; None when the message is not a call worth answering.

        `trusted` is False for peers that may not change the table (SET/UNSET then answer FALSE).
        """
        try:
            call = rpc.decode_call(record)
        except rpc.RpcVersionError as exc:
            return rpc.encode_denied_reply(exc.xid, rpc.RejectStat.RPC_MISMATCH, mismatch=(2, 2))
        except RemoteProtocolError as exc:
            log.debug("portmapper.bad_call", error=str(exc))
            return None
        if call.prog != PMAP_PROG:
            return rpc.encode_reply(call.xid, accept_stat=rpc.AcceptStat.PROG_UNAVAIL)
        if call.vers != PMAP_VERS:
            return rpc.encode_reply(call.xid, accept_stat=rpc.AcceptStat.PROG_MISMATCH, mismatch=(2, 2))
        if call.proc not in (PROC_NULL, PROC_SET, PROC_UNSET, PROC_GETPORT, PROC_DUMP):
            return rpc.encode_reply(call.xid, accept_stat=rpc.AcceptStat.PROC_UNAVAIL)
        packer = rpc.XdrPacker()
        try:
            args = call.unpacker()
            mapping = Mapping.unpack(args) if call.proc in (PROC_SET, PROC_UNSET, PROC_GETPORT) else None
            args.done(what="portmapper arguments")
        except RemoteProtocolError:
            return rpc.encode_reply(call.xid, accept_stat=rpc.AcceptStat.GARBAGE_ARGS)
        if call.proc == PROC_GETPORT and mapping is not None:
            packer.pack_uint(self.lookup(mapping.prog, mapping.vers, mapping.prot))
        elif call.proc == PROC_SET and mapping is not None:
            packer.pack_bool(trusted and self.register(mapping.prog, mapping.vers, mapping.prot, mapping.port))
        elif call.proc == PROC_UNSET and mapping is not None:
            packer.pack_bool(trusted and self.unregister(mapping.prog, mapping.vers))
        elif call.proc == PROC_DUMP:
            for entry in self.mappings():
                packer.pack_bool(True)
                entry.pack(packer)
            packer.pack_bool(False)
        return rpc.encode_reply(call.xid, packer.get_buffer())


# ------------------------------------------------------------------------------------------ client
def _call_tcp(host: str, port: int, message: bytes, xid: int, timeout: float | None, lenient: bool) -> bytes:
    """Send one call over TCP and return the matching reply record.

    `lenient`: accept a complete GETPORT reply that lacks the last-fragment bit (Anritsu MS9740).
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(rpc.frame_record(message))
        reader = rpc.RecordReader(max_record_size=1 << 20)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError(f"portmapper {host}:{port} closed the connection before replying")
            for record in reader.feed(chunk):
                if rpc.peek_message(record)[0] == xid:
                    return record
            partial = reader.partial()
            if lenient and len(partial) == GETPORT_REPLY_SIZE and rpc.peek_message(partial)[0] == xid:
                return partial


def _call_udp(host: str, port: int, message: bytes, xid: int, timeout: float | None) -> bytes:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.send(message)
        while True:
            datagram = sock.recv(MAX_UDP_DATAGRAM)
            try:
                if rpc.peek_message(datagram)[0] == xid:
                    return datagram
            except RemoteProtocolError:
                continue  # not ours / garbage: keep waiting for the real reply


def _call(host: str, port: int, message: bytes, xid: int, transport: str, timeout: float | None,
          lenient: bool = False) -> bytes:
    if transport == "tcp":
        return _call_tcp(host, port, message, xid, timeout, lenient)
    if transport == "udp":
        return _call_udp(host, port, message, xid, timeout)
    raise ValueError(f"transport must be 'tcp' or 'udp', not {transport!r}")


def getport(host: str, prog: int, vers: int, prot: int, *, port: int = PMAP_PORT, transport: str = "tcp",
            timeout: float | None = 2.0) -> int:
    """Ask the portmapper at host:port where (prog, vers, prot) listens; 0 = not registered."""
    xid = next(_xids) & 0xFFFFFFFF
    record = _call(host, port, encode_getport_call(xid, prog, vers, prot), xid, transport, timeout, lenient=True)
    return decode_getport_reply(record)[1]


def dump(host: str, *, port: int = PMAP_PORT, transport: str = "tcp", timeout: float | None = 2.0) -> list[Mapping]:
    xid = next(_xids) & 0xFFFFFFFF
    return decode_dump_reply(_call(host, port, encode_dump_call(xid), xid, transport, timeout))[1]


def set_mapping(host: str, mapping: Mapping, *, port: int = PMAP_PORT, transport: str = "tcp",
                timeout: float | None = 2.0) -> bool:
    xid = next(_xids) & 0xFFFFFFFF
    return decode_bool_reply(_call(host, port, encode_set_call(xid, mapping), xid, transport, timeout))[1]


def unset_mapping(host: str, mapping: Mapping, *, port: int = PMAP_PORT, transport: str = "tcp",
                  timeout: float | None = 2.0) -> bool:
    xid = next(_xids) & 0xFFFFFFFF
    return decode_bool_reply(_call(host, port, encode_unset_call(xid, mapping), xid, transport, timeout))[1]


# ------------------------------------------------------------------------------------------ server
def _is_loopback(peer: Any) -> bool:
    try:
        return ipaddress.ip_address(str(peer[0]).split("%")[0]).is_loopback
    except (ValueError, IndexError, TypeError):
        return False


class PortmapperServer:
    """A portmapper on TCP and UDP (same port number when possible). `port=0` picks a free port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.registry = PortmapRegistry()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._tcp = socket.socket(family, socket.SOCK_STREAM)
        self._udp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._tcp.bind((host, port))
            try:
                self._udp.bind((host, self._tcp.getsockname()[1]))
            except OSError:
                if port:  # a fixed port (111) must be had on both transports
                    raise
                self._udp.bind((host, 0))  # ephemeral: the numbers may differ
        except OSError:
            self._tcp.close()
            self._udp.close()
            raise
        self.tcp_port: int = self._tcp.getsockname()[1]
        self.udp_port: int = self._udp.getsockname()[1]
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.tcp_port

    def register(self, prog: int, vers: int, prot: int, port: int) -> bool:
        return self.registry.register(prog, vers, prot, port)

    def unregister(self, prog: int, vers: int) -> bool:
        return self.registry.unregister(prog, vers)

    def start(self) -> PortmapperServer:
        self._tcp.listen(16)
        for target, name in ((self._serve_tcp, "pmap-tcp"), (self._serve_udp, "pmap-udp")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("portmapper.listening", host=self.host, tcp_port=self.tcp_port, udp_port=self.udp_port)
        return self

    def stop(self) -> None:
        self._stopping.set()
        for sock in (self._tcp, self._udp):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        with self._conn_lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in self._threads:
            thread.join(timeout=2.0)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve_udp(self) -> None:
        while not self._stopping.is_set():
            try:
                datagram, peer = self._udp.recvfrom(MAX_UDP_DATAGRAM)
            except OSError:
                return
            reply = self.registry.handle(datagram, trusted=_is_loopback(peer))
            if reply is not None:
                try:
                    self._udp.sendto(reply, peer)
                except OSError as exc:
                    log.debug("portmapper.udp_send_failed", peer=str(peer), error=str(exc))

    def _serve_tcp(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._tcp.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve_connection, args=(conn, peer), daemon=True)
            thread.start()

    def _serve_connection(self, conn: socket.socket, peer: Any) -> None:
        with self._conn_lock:
            self._connections.add(conn)
        reader = rpc.RecordReader(max_record_size=64 * 1024)
        trusted = _is_loopback(peer)
        try:
            for record in _records(conn, reader):
                reply = self.registry.handle(record, trusted=trusted)
                if reply is not None:
                    conn.sendall(rpc.frame_record(reply))
        except (OSError, RemoteProtocolError) as exc:
            log.debug("portmapper.connection_closed", peer=str(peer), error=str(exc))
        finally:
            with self._conn_lock:
                self._connections.discard(conn)
            conn.close()


def _records(conn: socket.socket, reader: rpc.RecordReader) -> Iterator[bytes]:
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return
        yield from reader.feed(chunk)

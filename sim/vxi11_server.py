"""Simulated VXI-11.3 instrument: portmapper, core channel, abort channel and interrupt channel.

    server = Vxi11Server(Instrument(), "127.0.0.1", 0).start()
    server.resource          # TCPIP::127.0.0.1,<core port>::inst0::INSTR (no portmapper needed)
    server.portmapper_port   # its own portmapper (TCP and UDP), ephemeral unless asked for 111
    server.core_port, server.abort_port

Core channel: many links at once (several per connection, several connections), each with its
own `ScpiSession`; RPCs of one connection run in order. Locks are instrument-wide and follow the
VXI-11 rules (waitlock, lock_timeout, error 11 / 12, released by destroy_link or connection loss).
device_read honours requestSize, termChar and END, and io_timeout (error 15). The abort channel's
device_abort makes the link's in-progress call (a blocked read, a lock wait) return error 23, after
the abort itself was answered. create_intr_chan connects back to the controller; a service request
of the SCPI engine then becomes a one-way device_intr_srq call carrying the link's handle.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import select
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Self

import structlog

from visabus.workers.protocols import rpc, vxi11
from visabus.workers.protocols.errors import RemoteProtocolError
from visabus.workers.protocols.portmapper import IPPROTO_TCP, PortmapperServer
from visabus.workers.protocols.vxi11 import ErrorCode as E
from visabus.workers.protocols.vxi11 import OpFlag, Proc, ReadReason

from .scpi import STB_RQS, Instrument, ScpiSession
from .server import InstrumentServer

log = structlog.get_logger(__name__)

MAX_LINKS = 64
MAX_MESSAGE = 256 << 20  # bytes buffered without END before the link gives up (parameter error)
ABORT_POLL = 0.05  # s: how often a blocked read looks at its abort flag
SEND_GATHER_LIMIT = 64 * 1024  # smaller replies are joined into one send (one TCP segment)
INTR_CONNECT_TIMEOUT = 2.0

Handler = Callable[[Any], vxi11._Struct]


def send_record(sock: socket.socket, parts: list[rpc.Buffer]) -> None:
    """Record-mark and send one RPC message; big payloads go out without being copied."""
    framed = rpc.frame_parts(parts)
    if sum(len(p) for p in framed) <= SEND_GATHER_LIMIT:
        sock.sendall(b"".join(framed))
    else:
        for part in framed:
            sock.sendall(part)


def serve_rpc(sock: socket.socket, prog: int, handlers: dict[Proc, Handler], max_record: int,
              after: Callable[[Proc, Any], None] | None = None) -> None:
    """Answer the calls arriving on `sock` for program `prog` until the peer closes; `after(proc, params)`
    runs once a handler's reply has been sent."""
    reader = rpc.RecordReader(max_record)
    while chunk := sock.recv(256 * 1024):
        for record in reader.feed(chunk):
            reply, handled = _answer(record, prog, handlers)
            send_record(sock, reply)
            if handled is not None and after is not None:
                after(*handled)


def _answer(record: bytes, prog: int, handlers: dict[Proc, Handler]) -> tuple[list[rpc.Buffer], tuple[Proc, Any] | None]:
    """The reply to one call message, and (procedure, arguments) when a handler ran."""
    try:
        call = rpc.decode_call(record)
    except rpc.RpcVersionError as exc:
        return [rpc.encode_denied_reply(exc.xid, rpc.RejectStat.RPC_MISMATCH)], None
    proc = vxi11.procedure(call.prog, call.proc)
    if call.prog != prog:
        return rpc.encode_reply_parts(call.xid, accept_stat=rpc.AcceptStat.PROG_UNAVAIL), None
    if call.vers != 1:
        return rpc.encode_reply_parts(call.xid, accept_stat=rpc.AcceptStat.PROG_MISMATCH, mismatch=(1, 1)), None
    if proc is None or proc not in handlers:
        return rpc.encode_reply_parts(call.xid, accept_stat=rpc.AcceptStat.PROC_UNAVAIL), None
    try:
        params = vxi11.decode_params(call)
    except RemoteProtocolError as exc:
        log.debug("vxi11.garbage_args", proc=proc.name, error=str(exc))
        return rpc.encode_reply_parts(call.xid, accept_stat=rpc.AcceptStat.GARBAGE_ARGS), None
    return rpc.encode_reply_parts(call.xid, handlers[proc](params).encode_parts()), (proc, params)


class DeviceLock:
    """The instrument-wide VXI-11 lock: owned by one link at a time (VXI-11 §B.4.2, §B.6.15-17)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.owner: int | None = None

    def _wait_free(self, lid: int, flags: int, lock_timeout_ms: int, abort: threading.Event | None) -> int:
        if self.owner is None or self.owner == lid:
            return E.NO_ERROR
        if not flags & OpFlag.WAITLOCK or lock_timeout_ms == 0:
            return E.DEVICE_LOCKED_BY_ANOTHER_LINK
        deadline = time.monotonic() + lock_timeout_ms / 1000.0
        while self.owner not in (None, lid):
            if abort is not None and abort.is_set():
                return E.ABORT
            left = deadline - time.monotonic()
            if left <= 0:
                return E.DEVICE_LOCKED_BY_ANOTHER_LINK
            self._cond.wait(left)
        return E.NO_ERROR

    def check(self, lid: int, flags: int, lock_timeout_ms: int, abort: threading.Event | None) -> int:
        """0 if `lid` may use the device now (waiting per waitlock), else 11 or 23."""
        with self._cond:
            return self._wait_free(lid, flags, lock_timeout_ms, abort)

    def acquire(self, lid: int, flags: int, lock_timeout_ms: int, abort: threading.Event | None) -> int:
        with self._cond:
            if self.owner == lid:
                return E.DEVICE_LOCKED_BY_ANOTHER_LINK  # locks do not nest (RULE B.6.72)
            error = self._wait_free(lid, flags, lock_timeout_ms, abort)
            if error == E.NO_ERROR:
                self.owner = lid
            return error

    def release(self, lid: int) -> int:
        with self._cond:
            if self.owner != lid:
                return E.NO_LOCK_HELD_BY_THIS_LINK
            self.owner = None
            self._cond.notify_all()
            return E.NO_ERROR

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class _Link:
    def __init__(self, lid: int, connection: _CoreConnection, instrument: Instrument) -> None:
        self.lid = lid
        self.connection = connection
        self.session = ScpiSession(instrument, on_srq=self._on_srq)
        self.srq_enabled = False
        self.handle = b""
        self.inbuf = bytearray()
        self.response: bytes | None = None  # the response being read, from `pos` on
        self.pos = 0
        self.abort = threading.Event()
        self.busy = False
        self.remote = False

    def _on_srq(self, stb: int) -> None:
        if self.srq_enabled:
            self.connection.send_srq(self.handle)


class _InterruptChannel:
    """The RPC client the instrument uses to call device_intr_srq on the controller (one-way)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._xids = itertools.count(1)

    def send_srq(self, handle: bytes) -> None:
        with self._lock:
            parts = vxi11.encode_call_parts(next(self._xids), Proc.DEVICE_INTR_SRQ, vxi11.DeviceSrqParms(handle))
            send_record(self._sock, parts)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


class _CoreConnection:
    """One core-channel TCP connection: its links, its interrupt channel, its RPC handlers."""

    def __init__(self, server: Vxi11Server, sock: socket.socket, peer: Any) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.links: dict[int, _Link] = {}
        self.intr: _InterruptChannel | None = None
        self.handlers: dict[Proc, Handler] = {
            Proc.CREATE_LINK: self.create_link, Proc.DEVICE_WRITE: self.device_write,
            Proc.DEVICE_READ: self.device_read, Proc.DEVICE_READSTB: self.device_readstb,
            Proc.DEVICE_TRIGGER: self.device_trigger, Proc.DEVICE_CLEAR: self.device_clear,
            Proc.DEVICE_REMOTE: self.device_remote, Proc.DEVICE_LOCAL: self.device_local,
            Proc.DEVICE_LOCK: self.device_lock, Proc.DEVICE_UNLOCK: self.device_unlock,
            Proc.DEVICE_ENABLE_SRQ: self.device_enable_srq, Proc.DEVICE_DOCMD: self.device_docmd,
            Proc.DESTROY_LINK: self.destroy_link, Proc.CREATE_INTR_CHAN: self.create_intr_chan,
            Proc.DESTROY_INTR_CHAN: self.destroy_intr_chan,
        }

    def run(self) -> None:
        try:
            serve_rpc(self.sock, vxi11.DEVICE_CORE_PROG, self.handlers, self.server.max_recv_size + 4096)
        except RemoteProtocolError as exc:
            log.info("vxi11.core_protocol_error", peer=str(self.peer), error=str(exc))
        finally:
            self.close()

    def close(self) -> None:
        """Connection gone: release everything every link held (RULE B.4.5, B.6.77)."""
        for link in list(self.links.values()):
            self._destroy(link)
        if self.intr is not None:
            self.intr.close()
            self.intr = None

    def send_srq(self, handle: bytes) -> None:
        intr = self.intr
        if intr is None:
            return
        try:
            intr.send_srq(handle)
        except OSError as exc:
            log.info("vxi11.intr_send_failed", peer=str(self.peer), error=str(exc))

    # ------------------------------------------------------------------------------ helpers
    @contextmanager
    def _active(self, link: _Link) -> Iterator[threading.Event]:
        """Mark `link` busy for the duration of an abortable call; yields its abort flag."""
        link.abort.clear()
        link.busy = True
        try:
            yield link.abort
        finally:
            link.busy = False

    def _destroy(self, link: _Link) -> None:
        self.server.device_lock.release(link.lid)
        link.srq_enabled = False
        link.session.close()
        self.links.pop(link.lid, None)
        self.server.forget_link(link.lid)

    def _generic(self, p: vxi11.DeviceGenericParms, action: Callable[[_Link], None]) -> vxi11.DeviceError:
        link = self.links.get(p.lid)
        if link is None:
            return vxi11.DeviceError(E.INVALID_LINK_IDENTIFIER)
        with self._active(link) as abort:
            error = self.server.device_lock.check(p.lid, p.flags, p.lock_timeout, abort)
            if error == E.NO_ERROR:
                action(link)
        return vxi11.DeviceError(error)

    # ------------------------------------------------------------------------------ procedures
    def create_link(self, p: vxi11.CreateLinkParms) -> vxi11.CreateLinkResp:
        device = p.device.decode("latin-1").strip().lower()
        if not re.fullmatch(r"[a-z0-9_]+(?:\[[^\]]*\])?(?:,\d+){0,2}", device):
            return vxi11.CreateLinkResp(E.SYNTAX_ERROR, 0, 0, 0)
        if device != "inst0":
            return vxi11.CreateLinkResp(E.DEVICE_NOT_ACCESSIBLE, 0, 0, 0)
        lid = self.server.allocate_lid()
        if lid is None:
            return vxi11.CreateLinkResp(E.OUT_OF_RESOURCES, 0, 0, 0)
        if p.lock_device:
            error = self.server.device_lock.acquire(lid, OpFlag.WAITLOCK, p.lock_timeout, None)
            if error != E.NO_ERROR:
                self.server.forget_link(lid)
                return vxi11.CreateLinkResp(error, 0, 0, 0)
        link = _Link(lid, self, self.server.instrument)
        self.links[lid] = link
        self.server.register_link(link)
        log.debug("vxi11.link_created", lid=lid, peer=str(self.peer))
        return vxi11.CreateLinkResp(E.NO_ERROR, lid, self.server.abort_port, self.server.max_recv_size)

    def device_write(self, p: vxi11.DeviceWriteParms) -> vxi11.DeviceWriteResp:
        link = self.links.get(p.lid)
        if link is None:
            return vxi11.DeviceWriteResp(E.INVALID_LINK_IDENTIFIER, 0)
        if len(p.data) > self.server.max_recv_size or len(link.inbuf) + len(p.data) > MAX_MESSAGE:
            return vxi11.DeviceWriteResp(E.PARAMETER_ERROR, 0)
        with self._active(link) as abort:
            error = self.server.device_lock.check(p.lid, p.flags, p.lock_timeout, abort)
            if error != E.NO_ERROR:
                return vxi11.DeviceWriteResp(error, 0)
            link.inbuf += p.data
            # 488.2 program message terminators: END on the last byte, or a newline.
            if p.flags & OpFlag.END or link.inbuf.endswith(b"\n"):
                message = bytes(link.inbuf)
                link.inbuf.clear()
                link.session.write(message)
        return vxi11.DeviceWriteResp(E.NO_ERROR, len(p.data))

    def device_read(self, p: vxi11.DeviceReadParms) -> vxi11.DeviceReadResp:
        link = self.links.get(p.lid)
        if link is None:
            return vxi11.DeviceReadResp(E.INVALID_LINK_IDENTIFIER, 0, b"")
        with self._active(link) as abort:
            error = self.server.device_lock.check(p.lid, p.flags, p.lock_timeout, abort)
            if error != E.NO_ERROR:
                return vxi11.DeviceReadResp(error, 0, b"")
            if p.request_size == 0:
                return vxi11.DeviceReadResp(E.NO_ERROR, ReadReason.REQCNT, b"")
            if link.response is None:
                response = self._wait_response(link, p.io_timeout, abort)
                if isinstance(response, int):
                    return vxi11.DeviceReadResp(response, 0, b"")
                link.response, link.pos = response, 0
            return self._take(link, p)

    def _wait_response(self, link: _Link, io_timeout_ms: int, abort: threading.Event) -> bytes | int:
        """The next response message, or error 15 (io_timeout) / 23 (aborted, or the client left)."""
        infinite = io_timeout_ms == vxi11.INFINITE_TIMEOUT_MS
        deadline = time.monotonic() + io_timeout_ms / 1000.0
        while True:
            if abort.is_set() or self._peer_gone():
                return E.ABORT
            left = 1.0 if infinite else deadline - time.monotonic()
            response = link.session.wait_response(max(0.0, min(left, ABORT_POLL)))
            if response is not None:
                return response
            if not infinite and time.monotonic() >= deadline:
                return E.IO_TIMEOUT

    def _peer_gone(self) -> bool:
        """True once the client closed the connection (so a long read does not outlive it)."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            return bool(readable) and self.sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    @staticmethod
    def _take(link: _Link, p: vxi11.DeviceReadParms) -> vxi11.DeviceReadResp:
        response = link.response or b""
        start = link.pos
        end = min(len(response), start + p.request_size)
        reason = ReadReason(0)
        if p.flags & OpFlag.TERMCHRSET:
            found = response.find(bytes([p.term_char & 0xFF]), start, end)
            if found >= 0:
                end = found + 1
                reason |= ReadReason.CHR
        if end - start == p.request_size:
            reason |= ReadReason.REQCNT
        if end == len(response):
            reason |= ReadReason.END
            link.response = None
        else:
            link.pos = end
        return vxi11.DeviceReadResp(E.NO_ERROR, reason, memoryview(response)[start:end])

    def device_readstb(self, p: vxi11.DeviceGenericParms) -> vxi11.DeviceReadStbResp:
        stb: list[int] = [0]
        result = self._generic(p, lambda link: stb.__setitem__(0, link.session.serial_poll()))
        return vxi11.DeviceReadStbResp(result.error, stb[0])

    def device_trigger(self, p: vxi11.DeviceGenericParms) -> vxi11.DeviceError:
        return self._generic(p, lambda link: link.session.trigger())

    def device_clear(self, p: vxi11.DeviceGenericParms) -> vxi11.DeviceError:
        def clear(link: _Link) -> None:
            link.session.device_clear()
            link.inbuf.clear()
            link.response = None

        return self._generic(p, clear)

    def device_remote(self, p: vxi11.DeviceGenericParms) -> vxi11.DeviceError:
        return self._generic(p, lambda link: setattr(link, "remote", True))

    def device_local(self, p: vxi11.DeviceGenericParms) -> vxi11.DeviceError:
        return self._generic(p, lambda link: setattr(link, "remote", False))

    def device_lock(self, p: vxi11.DeviceLockParms) -> vxi11.DeviceError:
        link = self.links.get(p.lid)
        if link is None:
            return vxi11.DeviceError(E.INVALID_LINK_IDENTIFIER)
        with self._active(link) as abort:
            return vxi11.DeviceError(self.server.device_lock.acquire(p.lid, p.flags, p.lock_timeout, abort))

    def device_unlock(self, p: vxi11.DeviceLink) -> vxi11.DeviceError:
        if p.lid not in self.links:
            return vxi11.DeviceError(E.INVALID_LINK_IDENTIFIER)
        return vxi11.DeviceError(self.server.device_lock.release(p.lid))

    def device_enable_srq(self, p: vxi11.DeviceEnableSrqParms) -> vxi11.DeviceError:
        link = self.links.get(p.lid)
        if link is None:
            return vxi11.DeviceError(E.INVALID_LINK_IDENTIFIER)
        link.handle, link.srq_enabled = bytes(p.handle), p.enable
        if p.enable and link.session.status_byte() & STB_RQS:  # RQS already true: tell at once
            threading.Thread(target=self.send_srq, args=(link.handle,), daemon=True).start()
        return vxi11.DeviceError(E.NO_ERROR)

    def device_docmd(self, p: vxi11.DeviceDocmdParms) -> vxi11.DeviceDocmdResp:
        error = E.OPERATION_NOT_SUPPORTED if p.lid in self.links else E.INVALID_LINK_IDENTIFIER
        return vxi11.DeviceDocmdResp(error, b"")  # an instrument, not a VXI-11.2 gateway

    def destroy_link(self, p: vxi11.DeviceLink) -> vxi11.DeviceError:
        link = self.links.get(p.lid)
        if link is None:
            return vxi11.DeviceError(E.INVALID_LINK_IDENTIFIER)
        self._destroy(link)
        return vxi11.DeviceError(E.NO_ERROR)

    def create_intr_chan(self, p: vxi11.DeviceRemoteFunc) -> vxi11.DeviceError:
        if self.intr is not None:
            return vxi11.DeviceError(E.CHANNEL_ALREADY_ESTABLISHED)
        if (p.prog_num, p.prog_vers, p.prog_family) != (vxi11.DEVICE_INTR_PROG, 1, vxi11.DEVICE_TCP):
            return vxi11.DeviceError(E.OPERATION_NOT_SUPPORTED)
        # hostAddr is IPv4-only; on an IPv6 core connection (or hostAddr 0) use the peer's address.
        host = str(self.peer[0])
        if self.sock.family == socket.AF_INET and p.host_addr:
            host = str(ipaddress.IPv4Address(p.host_addr))
        try:
            sock = socket.create_connection((host, p.host_port), timeout=INTR_CONNECT_TIMEOUT)
        except OSError as exc:
            log.info("vxi11.intr_connect_failed", host=host, port=p.host_port, error=str(exc))
            return vxi11.DeviceError(E.CHANNEL_NOT_ESTABLISHED)
        sock.settimeout(INTR_CONNECT_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.intr = _InterruptChannel(sock)
        return vxi11.DeviceError(E.NO_ERROR)

    def destroy_intr_chan(self, p: vxi11.Void) -> vxi11.DeviceError:
        if self.intr is None:
            return vxi11.DeviceError(E.CHANNEL_NOT_ESTABLISHED)
        self.intr.close()
        self.intr = None
        return vxi11.DeviceError(E.NO_ERROR)


class _AbortHandler(socketserver.BaseRequestHandler):
    server: _AbortListener

    def handle(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        owner = self.server.owner
        try:
            serve_rpc(self.request, vxi11.DEVICE_ASYNC_PROG, {Proc.DEVICE_ABORT: owner.device_abort}, 4096,
                      after=lambda proc, params: owner.fire_abort(params.lid))
        except (OSError, RemoteProtocolError) as exc:
            log.debug("vxi11.abort_channel_closed", error=str(exc))


class _AbortListener(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], owner: Vxi11Server, family: int) -> None:
        self.address_family = family
        self.owner = owner
        super().__init__(address, _AbortHandler)


class Vxi11Server(InstrumentServer):
    protocol = "vxi11"

    def __init__(self, instrument: Instrument, host: str = "127.0.0.1", port: int = 0, *,
                 portmapper_port: int = 0, max_recv_size: int = 1 << 20) -> None:
        if not vxi11.MIN_MAX_RECV_SIZE <= max_recv_size <= 0x7FFF0000:
            raise ValueError(f"max_recv_size must be at least {vxi11.MIN_MAX_RECV_SIZE} (VXI-11 RULE B.6.3)")
        super().__init__(instrument, host, port)
        self.max_recv_size = max_recv_size
        self.device_lock = DeviceLock()
        self._links: dict[int, _Link | None] = {}
        self._links_lock = threading.Lock()
        self._lids = itertools.count(0)  # link id 0 is legal and must work
        self._connections: set[_CoreConnection] = set()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._abort = _AbortListener((host, 0), self, family)
        self.abort_port: int = self._abort.server_address[1]
        try:
            self._portmapper = PortmapperServer(host, portmapper_port)
        except OSError:  # e.g. port 111 without privileges, or rpcbind already there
            self._abort.server_close()
            self._server.server_close()
            raise
        self._portmapper.register(vxi11.DEVICE_CORE_PROG, vxi11.DEVICE_CORE_VERS, IPPROTO_TCP, self.port)
        self._abort_thread: threading.Thread | None = None

    @property
    def core_port(self) -> int:
        return self.port

    @property
    def portmapper_port(self) -> int:
        return self._portmapper.tcp_port

    @property
    def portmapper(self) -> PortmapperServer:
        return self._portmapper

    @property
    def resource(self) -> str:
        return f"TCPIP::{self.url_host},{self.port}::inst0::INSTR"

    def start(self) -> Self:
        self._portmapper.start()
        self._abort_thread = threading.Thread(target=self._abort.serve_forever, name="sim-vxi11-abort", daemon=True)
        self._abort_thread.start()
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        self._abort.shutdown()
        self._abort.server_close()
        self._portmapper.stop()
        for connection in list(self._connections):
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_connection(self, sock: socket.socket, peer: Any) -> None:
        connection = _CoreConnection(self, sock, peer)
        self._connections.add(connection)
        try:
            connection.run()
        finally:
            self._connections.discard(connection)

    # ------------------------------------------------------------------------ link registry
    def allocate_lid(self) -> int | None:
        with self._links_lock:
            if len(self._links) >= MAX_LINKS:
                return None
            lid = next(self._lids) & 0x7FFFFFFF
            self._links[lid] = None
            return lid

    def register_link(self, link: _Link) -> None:
        with self._links_lock:
            self._links[link.lid] = link

    def forget_link(self, lid: int) -> None:
        with self._links_lock:
            self._links.pop(lid, None)

    # ------------------------------------------------------------------------ abort channel
    def device_abort(self, p: vxi11.DeviceLink) -> vxi11.DeviceError:
        with self._links_lock:
            known = self._links.get(p.lid) is not None
        return vxi11.DeviceError(E.NO_ERROR if known else E.INVALID_LINK_IDENTIFIER)

    def fire_abort(self, lid: int) -> None:
        """After the abort reply went out: end the link's call in progress with error 23."""
        with self._links_lock:
            link = self._links.get(lid)
        if link is not None and link.busy:
            link.abort.set()
            self.device_lock.wake()

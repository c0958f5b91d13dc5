"""VXI-11 driver (`TCPIP::host[,port][::device]::INSTR`): one link on one core connection.

Connection: the portmapper at `attributes.extra["portmapper_port"]` (default 111) says where the
core program listens, unless the resource names the port (`host,port`). Then create_link, and a
second TCP connection to the abort channel (used by `abort()` and by `clear()` to unblock a read
that another thread is waiting in).

Data path: device_write chunks of maxRecvSize with END on the last one; device_read asks for as
much as the caller's buffer holds and receives the data straight into it (no intermediate copy
for bulk data: the reply header is parsed from a small read-ahead buffer, the rest of the record
goes to `recv_into(caller's buffer)`).

RPC timeouts: each call carries io_timeout; the socket waits 1 s longer (VXI-11 OBS B.4.6). A late
reply to a call we gave up on is skipped by its xid. A stream left out of step (timeout inside a
reply, malformed record) fails that call and makes the session unusable (ConnectionLost): reopen.

Service requests: `enable_srq(handler)` runs a small RPC server for the interrupt program on the
core connection's local address, asks the instrument to connect to it (create_intr_chan), and
enables SRQ on the link; each device_intr_srq is followed by a device_readstb and
`handler(stb)` on the interrupt thread.
"""

from __future__ import annotations

import ipaddress
import math
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

import structlog

from visabus.sdk.errors import (
    Aborted,
    ConnectionLost,
    IOFailure,
    NotSupported,
    ResourceNotFound,
    SessionNotLocked,
    VisaBusError,
    VisaTimeout,
)
from visabus.sdk.resources import Resource
from visabus.workers.protocols import portmapper, rpc, vxi11
from visabus.workers.protocols.errors import RemoteProtocolError
from visabus.workers.protocols.vxi11 import OpFlag, Proc, ReadReason

from .base import Session, SessionAttributes, SrqHandler

log = structlog.get_logger(__name__)

RPC_MARGIN = 1.0  # s the socket waits beyond the io/lock timeout sent in the call
CONTROL_TIMEOUT = 5.0  # s for calls without an I/O timeout of their own (create_link, abort, unlock...)
MAX_REQUEST = 1 << 30  # largest requestSize of one device_read
READ_AHEAD = 64 * 1024  # bytes buffered per recv; larger reads go straight into the caller's buffer
SEND_GATHER_LIMIT = 64 * 1024
MAX_CONTROL_REPLY = 1 << 20
_HEAD = rpc.REPLY_HEADER_SIZE + vxi11.READ_RESP_HEAD_SIZE


def _ms(timeout: float | None) -> int:
    if timeout is None:
        return vxi11.INFINITE_TIMEOUT_MS
    return min(max(0, math.ceil(timeout * 1000)), vxi11.INFINITE_TIMEOUT_MS - 1)


def _sock_timeout(timeout: float | None) -> float | None:
    return None if timeout is None else max(0.0, timeout) + RPC_MARGIN


class _Deadline:
    def __init__(self, timeout: float | None) -> None:
        self.end = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        return None if self.end is None else max(0.0, self.end - time.monotonic())


class _Channel:
    """An RPC client on one TCP connection: sends calls, reads record-marked replies, matches xids."""

    def __init__(self, sock: socket.socket, context: str) -> None:
        self.sock = sock
        self.context = context
        self.broken: str | None = None
        self._xid = random.randrange(1, 1 << 30)
        self._abandoned: set[int] = set()
        self._buf = bytearray(READ_AHEAD)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._frag_left = 0
        self._last = True
        self._record_size = 0
        self._max_record = MAX_CONTROL_REPLY
        self._consumed = 0  # stream bytes consumed: tells whether a timeout hit mid-reply
        self._sending = False

    def close(self) -> None:
        self.broken = self.broken or "closed"
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    # ----------------------------------------------------------------------------- stream
    def _some_into(self, dest: memoryview) -> int:
        """At least one and at most len(dest) stream bytes into dest."""
        if self._start == self._end:
            if len(dest) >= READ_AHEAD // 4:
                n = self.sock.recv_into(dest)
                if n == 0:
                    raise ConnectionResetError("the instrument closed the connection")
                self._consumed += n
                return n
            n = self.sock.recv_into(self._view)
            if n == 0:
                raise ConnectionResetError("the instrument closed the connection")
            self._start, self._end = 0, n
        n = min(self._end - self._start, len(dest))
        dest[:n] = self._view[self._start : self._start + n]
        self._start += n
        self._consumed += n
        return n

    def _next_fragment(self) -> None:
        mark = memoryview(bytearray(4))
        got = 0
        while got < 4:
            got += self._some_into(mark[got:])
        length, self._last = rpc.parse_record_mark(mark)
        self._record_size += length
        if self._record_size > self._max_record:
            raise RemoteProtocolError(f"reply record of {self._record_size}+ bytes exceeds {self._max_record}")
        self._frag_left = length

    def _begin_record(self) -> None:
        self._record_size = 0
        self._next_fragment()

    def _body_upto(self, dest: memoryview) -> int:
        """Up to len(dest) bytes of the current record (fewer only where the record ends)."""
        got = 0
        while got < len(dest):
            if self._frag_left == 0:
                if self._last:
                    break
                self._next_fragment()
                continue
            n = self._some_into(dest[got : got + min(self._frag_left, len(dest) - got)])
            self._frag_left -= n
            got += n
        return got

    def _body_into(self, dest: memoryview) -> None:
        if self._body_upto(dest) != len(dest):
            raise RemoteProtocolError(f"reply record ended {len(dest)} bytes short of its announced content")

    def _rest_of_record(self) -> bytes:
        """The unread remainder of the current record (padding included)."""
        rest = bytearray()
        while True:
            if self._frag_left:
                chunk = bytearray(self._frag_left)
                self._body_into(memoryview(chunk))
                rest += chunk
            elif self._last:
                return bytes(rest)
            else:
                self._next_fragment()

    # ------------------------------------------------------------------------------ calls
    def _send(self, proc: Proc, params: vxi11._Struct, timeout: float | None) -> int:
        if self.broken:
            raise ConnectionLost(f"{self.context}: connection unusable ({self.broken}); reopen the session")
        self._xid = (self._xid + 1) & 0xFFFFFFFF
        framed = rpc.frame_parts(vxi11.encode_call_parts(self._xid, proc, params))
        self.sock.settimeout(timeout)
        self._sending = True  # a timeout now leaves half a call on the wire
        if sum(len(p) for p in framed) <= SEND_GATHER_LIMIT:
            self.sock.sendall(b"".join(framed))
        else:
            for part in framed:
                self.sock.sendall(part)
        self._sending = False
        return self._xid

    def _stale(self, xid: int, expected: int) -> bool:
        """True for the late reply of a call we gave up on (skip it); anything else is an error."""
        if xid in self._abandoned:
            self._abandoned.discard(xid)
            return True
        raise RemoteProtocolError(f"reply xid {xid} does not match the call's xid {expected}")

    @contextmanager
    def _mapped_errors(self) -> Iterator[None]:
        """Socket and protocol failures of one call -> VisaBusError; a stream out of step is closed."""
        consumed = self._consumed
        try:
            yield
        except TimeoutError as exc:
            if self._sending or self._consumed != consumed:
                self.broken = "timed out in the middle of a message"
            else:
                self._abandoned.add(self._xid)  # its reply may still come: skip it then
            raise VisaTimeout(f"{self.context}: no reply from the instrument within the timeout") from exc
        except rpc.RpcCallFailed as exc:  # a well-formed refusal: the stream is still in step
            cls = NotSupported if exc.reply.accept_stat is rpc.AcceptStat.PROC_UNAVAIL else IOFailure
            raise cls(f"{self.context}: {exc}") from exc
        except RemoteProtocolError as exc:
            self.broken = str(exc)
            raise IOFailure(f"{self.context}: malformed reply from the instrument: {exc}") from exc
        except OSError as exc:
            self.broken = str(exc) or type(exc).__name__
            raise ConnectionLost(f"{self.context}: connection to the instrument lost ({self.broken})") from exc

    def call(self, proc: Proc, params: vxi11._Struct, timeout: float | None) -> vxi11._Struct:
        """One RPC; the decoded result structure. Raises VisaBusError subclasses only."""
        with self._mapped_errors():
            xid = self._send(proc, params, timeout)
            self._max_record = MAX_CONTROL_REPLY
            while True:
                self._begin_record()
                reply = rpc.decode_reply(self._rest_of_record())
                if reply.xid != xid and self._stale(reply.xid, xid):
                    continue
                return vxi11.decode_result(proc, reply)

    def call_read(self, params: vxi11.DeviceReadParms, dest: memoryview, timeout: float | None) -> tuple[int, int, int]:
        """device_read receiving the data straight into `dest`: (error, reason, bytes received)."""
        with self._mapped_errors():
            xid = self._send(Proc.DEVICE_READ, params, timeout)
            self._max_record = len(dest) + 4096
            head = memoryview(bytearray(_HEAD))
            while True:
                self._begin_record()
                n = self._body_upto(head)
                if n == _HEAD and rpc.is_plain_success_head(head[: rpc.REPLY_HEADER_SIZE]):
                    rxid, _ = rpc.peek_message(head)
                    if rxid != xid and self._stale(rxid, xid):
                        self._rest_of_record()
                        continue
                    error, reason, length = vxi11.decode_read_resp_head(head[rpc.REPLY_HEADER_SIZE :])
                    if length > len(dest):
                        raise RemoteProtocolError(f"device_read returned {length} bytes, {len(dest)} were asked for")
                    self._body_into(dest[:length])
                    self._rest_of_record()  # XDR padding, tolerated trailing bytes
                    return error, reason, length
                # Anything unusual (a refusal, a verifier with a body): decode the whole record.
                reply = rpc.decode_reply(bytes(head[:n]) + self._rest_of_record())
                if reply.xid != xid and self._stale(reply.xid, xid):
                    continue
                resp = vxi11.decode_result(Proc.DEVICE_READ, reply)
                if not isinstance(resp, vxi11.DeviceReadResp) or len(resp.data) > len(dest):
                    raise RemoteProtocolError("device_read reply does not fit the request")
                dest[: len(resp.data)] = resp.data
                return resp.error, resp.reason, len(resp.data)


class _InterruptServer:
    """The controller's RPC server for the interrupt program (device_intr_srq, one-way calls)."""

    def __init__(self, host: str, on_srq: Callable[[bytes], None]) -> None:
        self._on_srq = on_srq
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.bind((host, 0))
        self._listener.listen(2)
        self.port: int = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vxi11-intr", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        for sock in (self._listener, *self._conns):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            try:
                self._serve(conn)
            except (OSError, RemoteProtocolError) as exc:
                log.debug("vxi11.intr_channel_closed", error=str(exc))

    def _serve(self, conn: socket.socket) -> None:
        reader = vxi11.InterruptStreamReader()  # tolerates the DMM6500's lying record length
        while not self._stopping:
            chunk = conn.recv(4096)
            if not chunk:
                return
            for call in reader.feed(chunk):
                self._dispatch(call, conn)

    def _dispatch(self, call: rpc.Call, conn: socket.socket) -> None:
        if (call.prog, call.vers, call.proc) != (vxi11.DEVICE_INTR_PROG, 1, Proc.DEVICE_INTR_SRQ):
            conn.sendall(rpc.frame_record(rpc.encode_reply(call.xid, accept_stat=rpc.AcceptStat.PROC_UNAVAIL)))
            return
        try:
            params = vxi11.DeviceSrqParms.decode(call.args, allow_trailing=True)
        except RemoteProtocolError as exc:
            log.info("vxi11.intr_bad_call", error=str(exc))
            return
        self._on_srq(params.handle)  # one-way: no reply (NI-VISA sends none, instruments expect none)


class Vxi11Session(Session):
    """A VXI-11 link. See the module docstring; `base.Session` states the threading contract."""

    def __init__(self, resource: Resource, attributes: SessionAttributes | None = None) -> None:
        super().__init__(resource, attributes)
        self._core: _Channel | None = None
        self._abort: _Channel | None = None
        self._core_lock = threading.Lock()
        self._abort_lock = threading.Lock()
        self._lid = 0
        self._max_recv_size = vxi11.FALLBACK_MAX_RECV_SIZE
        self._lock_depth = 0
        self._intr: _InterruptServer | None = None
        self._handle = b""
        self._closing = False
        self._ctx = str(resource)
        self._interrupt_epoch = 0  # bumped by clear() and abort()
        self._op_epoch: int | None = None  # the epoch the worker's current operation began in

    # ------------------------------------------------------------------------- lifecycle
    def open(self, timeout: float | None) -> None:
        host, port = self.resource.host, self.resource.port
        try:
            if port is None:
                configured = self.attributes.extra.get("portmapper_port", portmapper.PMAP_PORT)
                pm_port = int(configured) if isinstance(configured, int | str) else portmapper.PMAP_PORT
                port = portmapper.getport(host, vxi11.DEVICE_CORE_PROG, vxi11.DEVICE_CORE_VERS,
                                          portmapper.IPPROTO_TCP, port=pm_port, timeout=timeout)
                if port == 0:
                    raise ResourceNotFound(f"{self._ctx}: the portmapper on {host}:{pm_port} knows no VXI-11 core "
                                           f"program; is this a VXI-11 instrument?")
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError as exc:
            raise VisaTimeout(f"{self._ctx}: no answer from {host} within {timeout} s") from exc
        except OSError as exc:
            raise ResourceNotFound(f"{self._ctx}: cannot reach the instrument at {host} ({exc}); "
                                   "check the address, the port and that it is powered on") from exc
        except RemoteProtocolError as exc:
            raise ResourceNotFound(f"{self._ctx}: the portmapper on {host} answered garbage ({exc})") from exc
        self._configure(sock)
        self._core = _Channel(sock, self._ctx)
        self._closing = False
        params = vxi11.CreateLinkParms(random.getrandbits(31), False, 0, self.resource.device.encode("ascii"))
        try:
            resp = cast(vxi11.CreateLinkResp, self._call(Proc.CREATE_LINK, params, timeout or CONTROL_TIMEOUT))
        except VisaBusError:
            self._core.close()
            self._core = None
            raise
        self._lid = resp.lid
        self._max_recv_size = resp.max_recv_size
        if self._max_recv_size < vxi11.MIN_MAX_RECV_SIZE:  # old Infiniium firmware says 0
            self._max_recv_size = vxi11.FALLBACK_MAX_RECV_SIZE
        self._abort = self._connect_abort(host, resp.abort_port, timeout)
        log.info("vxi11.link_created", resource=self._ctx, port=port, lid=self._lid,
                 max_recv_size=resp.max_recv_size, abort_port=resp.abort_port)

    def _connect_abort(self, host: str, port: int, timeout: float | None) -> _Channel | None:
        if not port:
            return None
        try:
            sock = socket.create_connection((host, port), timeout=timeout or CONTROL_TIMEOUT)
        except OSError as exc:
            log.warning("vxi11.no_abort_channel", resource=self._ctx, port=port, error=str(exc))
            return None
        self._configure(sock)
        return _Channel(sock, f"{self._ctx} (abort channel)")

    def _configure(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if self.attributes.nodelay else 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if self.attributes.keepalive else 0)

    def close(self) -> None:
        self._closing = True
        if self._intr is not None:
            self._intr.stop()
            self._intr = None
        locked = self._core_lock.acquire(timeout=CONTROL_TIMEOUT)  # clear() may be mid-call
        try:
            core, self._core = self._core, None
            if core is not None:
                if locked and not core.broken:
                    try:
                        core.call(Proc.DESTROY_LINK, vxi11.DeviceLink(self._lid), 2.0)
                    except VisaBusError as exc:
                        log.debug("vxi11.destroy_link_failed", resource=self._ctx, error=str(exc))
                core.close()
        finally:
            if locked:
                self._core_lock.release()
        if self._abort is not None:
            self._abort.close()
            self._abort = None
        self._lock_depth = 0
        self._op_epoch = None
        self.srq_handler = None

    def begin(self) -> None:
        """A worker operation starts: a clear() or abort() from now on ends it (its next call raises
        Aborted), also when it lands between the operation's write and its read."""
        self._op_epoch = self._interrupt_epoch

    def _check_interrupted(self) -> None:
        if self._op_epoch is not None and self._op_epoch != self._interrupt_epoch:
            raise Aborted(f"{self._ctx}: operation aborted by a device clear or abort")

    @property
    def connected(self) -> bool:
        return self._core is not None and not self._core.broken

    def _channel(self) -> _Channel:
        if self._core is None:
            raise ConnectionLost(f"{self._ctx}: the VXI-11 session is not open")
        return self._core

    # ------------------------------------------------------------------------- data path
    def write(self, data: bytes | memoryview, timeout: float | None) -> int:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        deadline = _Deadline(timeout)
        total = 0
        with self._core_lock:
            core = self._channel()
            while True:
                self._check_interrupted()
                chunk = view[total : total + self._max_recv_size]
                last = total + len(chunk) >= len(view)
                flags = OpFlag.END if last and self.attributes.send_end else 0
                left = deadline.left()
                params = vxi11.DeviceWriteParms(self._lid, _ms(left), 0, flags, chunk)
                resp = cast(vxi11.DeviceWriteResp, self._call(Proc.DEVICE_WRITE, params, left, channel=core))
                if resp.size > len(chunk) or (resp.size == 0 and chunk):
                    raise IOFailure(f"{self._ctx}: device_write accepted {resp.size} of {len(chunk)} bytes")
                total += resp.size
                if total >= len(view):
                    return total

    def read_into(self, buffer: memoryview, timeout: float | None, term_char: int | None) -> tuple[int, bool]:
        dest = buffer if buffer.format == "B" and buffer.ndim == 1 else buffer.cast("B")
        if not len(dest):
            return 0, False
        flags = OpFlag.TERMCHRSET if term_char is not None else 0
        deadline = _Deadline(timeout)
        received = 0
        with self._core_lock:
            core = self._channel()
            while received < len(dest):
                self._check_interrupted()
                size = min(len(dest) - received, MAX_REQUEST)
                left = deadline.left()
                params = vxi11.DeviceReadParms(self._lid, size, _ms(left), 0, flags, term_char or 0)
                error, reason, n = core.call_read(params, dest[received : received + size], _sock_timeout(left))
                received += n
                if error:
                    raise vxi11.vxi11_error(error, proc=Proc.DEVICE_READ, context=self._ctx)
                if reason & (ReadReason.END | ReadReason.CHR):
                    return received, True
        return received, False

    # ------------------------------------------------------------------------- control
    def _call(self, proc: Proc, params: vxi11._Struct, timeout: float | None, *, channel: _Channel | None = None,
              waitlock: bool = False, accept: tuple[int, ...] = (0,)) -> vxi11._Struct:
        """One call on the core (or given) channel; a VXI-11 error not in `accept` is raised."""
        resp = (channel or self._channel()).call(proc, params, _sock_timeout(timeout))
        error = getattr(resp, "error", 0)
        if error not in accept:
            raise vxi11.vxi11_error(error, proc=proc, waitlock=waitlock, context=self._ctx)
        return resp

    def _generic(self, proc: Proc) -> vxi11._Struct:
        """A Device_GenericParms call (readstb, trigger, clear, remote, local); caller holds the lock."""
        timeout = self.attributes.timeout
        return self._call(proc, vxi11.DeviceGenericParms(self._lid, 0, 0, _ms(timeout)), timeout)

    def _locked_generic(self, proc: Proc) -> vxi11._Struct:
        with self._core_lock:
            self._check_interrupted()
            return self._generic(proc)

    def read_stb(self) -> int:
        return cast(vxi11.DeviceReadStbResp, self._locked_generic(Proc.DEVICE_READSTB)).stb & 0xFF

    def trigger(self) -> None:
        self._locked_generic(Proc.DEVICE_TRIGGER)

    def remote(self) -> None:
        self._locked_generic(Proc.DEVICE_REMOTE)

    def local(self) -> None:
        self._locked_generic(Proc.DEVICE_LOCAL)

    def clear(self) -> None:
        """device_clear; if another thread is blocked in a call, abort that call first."""
        self._interrupt_epoch += 1
        if not self._core_lock.acquire(blocking=False):
            if self._abort is not None:
                try:
                    self.abort()
                except VisaBusError as exc:
                    log.warning("vxi11.abort_before_clear_failed", resource=self._ctx, error=str(exc))
            self._core_lock.acquire()
        try:
            self._generic(Proc.DEVICE_CLEAR)
        finally:
            self._core_lock.release()

    def abort(self) -> None:
        """device_abort on the abort channel: a blocked read/write then raises Aborted."""
        if self._abort is None:
            raise NotSupported(f"{self._ctx}: the instrument offers no VXI-11 abort channel")
        self._interrupt_epoch += 1
        with self._abort_lock:
            self._call(Proc.DEVICE_ABORT, vxi11.DeviceLink(self._lid), CONTROL_TIMEOUT, channel=self._abort)

    def lock(self, exclusive: bool, timeout: float | None) -> None:
        """Exclusive: device_lock (waitlock unless timeout is 0), nested locally. Shared locks have no
        VXI-11 form; like other VISA libraries we keep them local (no wire traffic)."""
        if not exclusive:
            return
        with self._core_lock:
            if self._lock_depth == 0:
                waitlock = timeout is None or timeout > 0
                params = vxi11.DeviceLockParms(self._lid, OpFlag.WAITLOCK if waitlock else 0, _ms(timeout))
                self._call(Proc.DEVICE_LOCK, params, timeout, waitlock=waitlock)
            self._lock_depth += 1

    def unlock(self) -> None:
        with self._core_lock:
            if self._lock_depth == 0:
                raise SessionNotLocked(f"{self._ctx}: this session holds no exclusive lock")
            self._lock_depth -= 1
            if self._lock_depth == 0:
                self._call(Proc.DEVICE_UNLOCK, vxi11.DeviceLink(self._lid), CONTROL_TIMEOUT)

    # ------------------------------------------------------------------------- service requests
    def enable_srq(self, handler: SrqHandler | None) -> None:
        with self._core_lock:
            if handler is None:
                self.srq_handler = None
                if self._intr is not None:
                    self._enable_call(False)
                    self._call(Proc.DESTROY_INTR_CHAN, vxi11.Void(), CONTROL_TIMEOUT, accept=(0, 6))
                    self._intr.stop()
                    self._intr = None
                return
            if self._intr is None:
                local = self._channel().sock.getsockname()[0]
                self._intr = _InterruptServer(local, self._on_intr_srq)
                addr = ipaddress.ip_address(local)
                host_addr = int(addr) if isinstance(addr, ipaddress.IPv4Address) else 0
                func = vxi11.DeviceRemoteFunc(host_addr, self._intr.port, vxi11.DEVICE_INTR_PROG, 1, vxi11.DEVICE_TCP)
                try:
                    self._call(Proc.CREATE_INTR_CHAN, func, CONTROL_TIMEOUT, accept=(0, 29))
                except VisaBusError:
                    self._intr.stop()
                    self._intr = None
                    raise
            self._handle = f"visabus:{self._lid}:{id(self) & 0xFFFFFF:x}".encode()[: vxi11.MAX_HANDLE]
            self.srq_handler = handler
            self._enable_call(True)

    def _enable_call(self, enable: bool) -> None:
        handle = self._handle or b"visabus"  # never empty: some instruments crash on it
        self._call(Proc.DEVICE_ENABLE_SRQ, vxi11.DeviceEnableSrqParms(self._lid, enable, handle), CONTROL_TIMEOUT)

    def _on_intr_srq(self, handle: bytes) -> None:
        """Interrupt thread: a device_intr_srq arrived. Read the status byte, then call the handler."""
        handler = self.srq_handler
        if handler is None or handle != self._handle:
            log.debug("vxi11.srq_ignored", resource=self._ctx, handle=handle)
            return
        while not self._core_lock.acquire(timeout=0.2):
            if self._closing:
                return
        try:
            stb = cast(vxi11.DeviceReadStbResp, self._generic(Proc.DEVICE_READSTB)).stb & 0xFF
        except VisaBusError as exc:
            log.warning("vxi11.srq_readstb_failed", resource=self._ctx, error=str(exc))
            return
        finally:
            self._core_lock.release()
        try:
            handler(stb)
        except Exception:  # a user callback must not kill the interrupt thread
            log.exception("vxi11.srq_handler_failed", resource=self._ctx)

    # ------------------------------------------------------------------------- attributes
    def set_attribute(self, name: str, value: object) -> None:
        super().set_attribute(name, value)
        if name in ("keepalive", "nodelay"):
            for channel in (self._core, self._abort):
                if channel is not None and not channel.broken:
                    self._configure(channel.sock)

"""HiSLIP driver: `HislipSession` speaks IVI-6.1 (protocol 1.0) to one instrument sub-address.

Two TCP connections to `resource.transport_port`: the synchronous channel (Data/DataEnd, Trigger, device
clear completion) is used only by the thread that holds `_sync_lock` — the worker's executor, or
`clear()` after it aborted that executor's blocked call. The asynchronous channel (hislip_async) is
read by one background thread that files responses by type for whoever waits on them, hands SRQs to a
dispatcher thread and reports AsyncInterrupted. The protocol
bookkeeping (MessageIDs, RMT-delivered, modes, clear and lock transactions) lives in the sans-IO
`HislipClient`; this module only moves bytes.

Bulk data: `read_into` receives each Data/DataEnd header (16 bytes) and then `recv_into`s the payload
straight into the caller's buffer; `write` sends header and payload views with `sendmsg`.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from visabus.sdk.errors import (
    ConnectionLost,
    InvalidParameter,
    ResourceBusy,
    ResourceLocked,
    ResourceNotFound,
    SessionNotLocked,
    VisaBusError,
    VisaTimeout,
)
from visabus.sdk.resources import Protocol, Resource
from visabus.workers.protocols import hislip as h
from visabus.workers.protocols.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from visabus.workers.protocols.hislip_client import HislipClient, Phase, ServerError, ServerFatalError

from .base import Session, SessionAttributes, SrqHandler
from .hislip_async import AsyncChannel
from .hislip_io import SyncSocket, configure, connect, deadline_after, recv_message_blocking, remaining

log = structlog.get_logger(__name__)

DEFAULT_SHARED_KEY = "visabus"
CLEAR_PATIENCE = 10.0  # seconds a device clear may take at least (IVI-6.1 suggests 40-120 s at most)
INFINITE_MS = 0xFFFFFFFF
_MT = h.MessageType


@dataclass
class _Inbound:
    """The server message whose payload is being read on the sync channel."""

    type: h.MessageType
    message_id: int
    remaining: int  # payload bytes still in the socket
    deliver: bool  # False: discard (stale MessageID, interrupted, dropped by a newer write)
    stash: bytearray = field(default_factory=bytearray)  # read past a termination character


class HislipSession(Session):
    """One HiSLIP session (sync + async channel) to `TCPIP::host::hislipN[,port]::INSTR`."""

    def __init__(self, resource: Resource, attributes: SessionAttributes | None = None) -> None:
        super().__init__(resource, attributes)
        if resource.protocol is not Protocol.HISLIP:
            raise InvalidParameter(f"{resource}: HislipSession needs a HiSLIP resource (…::hislipN::INSTR)")
        self.sub_address = resource.device or "hislip0"
        self.port = resource.transport_port or h.DEFAULT_PORT
        self._log = log.bind(resource=str(resource))
        self._proto = HislipClient(self.sub_address, max_message_size=self._wanted_max_size())
        self._sync: SyncSocket | None = None
        self._async: AsyncChannel | None = None
        self._state_lock = threading.RLock()  # guards _proto between executor, clear and async reader
        self._sync_lock = threading.Lock()
        self._clear_lock = threading.Lock()
        self._closing = False
        self._inbound: _Inbound | None = None
        self._header = bytearray(h.HEADER_SIZE)
        self._header_fill = 0
        self._owed = 0  # bytes of a partly sent sync message (aborted/timed-out write)
        self._held: dict[str, int] = {}  # "exclusive"/"shared" -> nesting count
        self._op_generation: int | None = None  # abort generation the current worker operation began in

    def _wanted_max_size(self) -> int:
        return max(int(self.attributes.max_message_kb) * 1024, h.MIN_MESSAGE_SIZE)

    # ------------------------------------------------------------------ lifecycle
    def open(self, timeout: float | None) -> None:
        if self._sync is not None or self._async is not None:
            self.close()  # reopening (after a loss): start from a clean slate
        self._inbound, self._header_fill, self._owed = None, 0, 0
        self._held.clear()  # locks die with the old session
        deadline = deadline_after(timeout)
        what = str(self.resource)
        proto = self._proto = HislipClient(self.sub_address, max_message_size=self._wanted_max_size(),
                                           request_overlap=self._requested_overlap())
        sync_sock = connect(self.resource.host, self.port, deadline, what)
        async_sock: socket.socket | None = None
        try:
            configure(sync_sock, self.attributes.nodelay, self.attributes.keepalive)
            sync_sock.sendall(proto.initialize().encode())
            reply = recv_message_blocking(sync_sock, deadline, h.CONTROL_PAYLOAD_LIMIT, what)
            try:
                proto.receive_initialize_response(reply)
            except ServerFatalError as exc:
                cls = ResourceBusy if exc.fatal_code == h.FatalErrorCode.MAX_CLIENTS_EXCEEDED else ResourceNotFound
                raise cls(f"{what}: {exc}") from None
            async_sock = connect(self.resource.host, self.port, deadline, what)
            configure(async_sock, True, self.attributes.keepalive)
            async_sock.sendall(proto.async_initialize().encode())
            proto.receive_async_initialize_response(
                recv_message_blocking(async_sock, deadline, h.CONTROL_PAYLOAD_LIMIT, what)
            )
            async_sock.sendall(proto.maximum_message_size().encode())
            proto.receive_maximum_message_size_response(
                recv_message_blocking(async_sock, deadline, h.CONTROL_PAYLOAD_LIMIT, what)
            )
        except (VisaBusError, ProtocolError, OSError) as exc:
            for sock in (sync_sock, async_sock):
                if sock is not None:
                    sock.close()
            if isinstance(exc, VisaBusError):
                raise
            raise ResourceNotFound(f"{what}: HiSLIP initialization failed: {exc}") from None
        self._sync = SyncSocket(sync_sock, what)
        self._op_generation = None
        self._closing = False
        self._async = AsyncChannel(async_sock, what, on_interrupted=self._on_async_interrupted,
                                   on_lost=self._lost, lost_reason=self._lost_reason)
        self._async.enable_srq(self.srq_handler)
        self._async.start()
        self._log.info(
            "hislip.opened", session_id=proto.session_id, overlapped=proto.overlapped,
            server_max=proto.server_max_message_size, server_vendor=proto.server_vendor,
        )

    def _requested_overlap(self) -> bool | None:
        value = self.attributes.extra.get("hislip_overlap")
        return None if value is None else bool(value)

    def close(self) -> None:
        self._closing = True
        sync, channel = self._sync, self._async
        if sync is not None:
            sync.mark_lost("session closed")
            try:
                sync.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if channel is not None:
            channel.close()
        if sync is not None:
            took = self._sync_lock.acquire(timeout=2.0)  # let an aborted executor call leave first
            try:
                sync.close()
            finally:
                if took:
                    self._sync_lock.release()
        self._sync = self._async = None

    def begin(self) -> None:
        """A worker operation starts: a clear or abort from now on ends all of its sync I/O with
        Aborted — also when it lands between the operation's write and its read."""
        sync = self._sync
        self._op_generation = sync.generation if sync is not None else None

    def _generation(self, sync: SyncSocket) -> int:
        generation = sync.generation if self._op_generation is None else self._op_generation
        sync.check(generation)
        return generation

    @property
    def connected(self) -> bool:
        return self._sync is not None and self._sync.lost is None and not self._closing

    @property
    def overlapped(self) -> bool:
        return self._proto.overlapped

    @property
    def server_max_message_size(self) -> int:
        return self._proto.server_max_message_size

    def _channel(self) -> SyncSocket:
        sync = self._sync
        if sync is None:
            raise ConnectionLost(f"{self.resource}: session is not open")
        if sync.lost is not None:
            raise ConnectionLost(f"{self.resource}: {sync.lost}")
        return sync

    def _acquire_sync(self, deadline: float | None) -> SyncSocket:
        wait = remaining(deadline)
        if not self._sync_lock.acquire(timeout=-1 if wait is None else wait):
            raise VisaTimeout(f"{self.resource}: the synchronous channel stayed busy (device clear in progress?)")
        try:
            sync = self._channel()
            if self._owed:
                self._log.warning("hislip.partial_write_cleared", owed=self._owed)
                self._clear_locked(sync)
            return sync
        except BaseException:
            self._sync_lock.release()
            raise

    # ------------------------------------------------------------------ sync channel: write
    def write(self, data: bytes | memoryview, timeout: float | None) -> int:
        deadline = deadline_after(timeout)
        sync = self._acquire_sync(deadline)
        try:
            generation = self._generation(sync)
            self._wait_may_send(sync, deadline, generation)
            with self._state_lock:
                if not self._proto.overlapped and self._inbound is not None:
                    self._inbound.deliver = False  # synchronized: a new message drops the old response
                    self._inbound.stash.clear()
                messages = self._proto.data_messages(data, end=self.attributes.send_end)
            for message in messages:
                self._send_sync(sync, message, deadline, generation)
            return memoryview(data).nbytes
        finally:
            self._sync_lock.release()

    def trigger(self) -> None:
        deadline = deadline_after(self.attributes.timeout)
        sync = self._acquire_sync(deadline)
        try:
            generation = self._generation(sync)
            self._wait_may_send(sync, deadline, generation)
            with self._state_lock:
                message = self._proto.trigger()
            self._send_sync(sync, message, deadline, generation)
        finally:
            self._sync_lock.release()

    def _send_sync(self, sync: SyncSocket, message: h.Message, deadline: float | None, generation: int) -> None:
        total = h.HEADER_SIZE + len(message.payload)
        done = 0

        def sent(n: int) -> None:  # only a message that has begun to leave is owed to the server
            nonlocal done
            done += n
            self._owed = total - done

        sync.send([memoryview(message.header()), memoryview(message.payload)], deadline, generation, sent)

    def _wait_may_send(self, sync: SyncSocket, deadline: float | None, generation: int) -> None:
        """After Interrupted, nothing may be sent until AsyncInterrupted arrives (IVI-6.1 §3.1.2)."""
        channel = self._async
        if channel is None or self._proto.may_send:
            return
        with channel.cond:
            while not self._proto.may_send:
                sync.check(generation)  # abort / clear / loss end the wait
                left = remaining(deadline)
                if left == 0:
                    raise VisaTimeout(f"{self.resource}: AsyncInterrupted never followed Interrupted")
                channel.cond.wait(left)

    # ------------------------------------------------------------------ sync channel: read
    def read_into(self, buffer: memoryview, timeout: float | None, term_char: int | None) -> tuple[int, bool]:
        deadline = deadline_after(timeout)
        view = buffer if buffer.format == "B" and buffer.ndim == 1 else buffer.cast("B")
        if len(view) == 0:
            raise InvalidParameter(f"{self.resource}: read_into needs a non-empty buffer")
        sync = self._acquire_sync(deadline)
        try:
            return self._read_locked(sync, view, deadline, term_char, self._generation(sync))
        except RemoteProtocolError as exc:
            raise self._protocol_failure(exc) from None
        finally:
            self._sync_lock.release()

    def _read_locked(
        self, sync: SyncSocket, view: memoryview, deadline: float | None, term_char: int | None, generation: int
    ) -> tuple[int, bool]:
        n = 0
        total = len(view)
        while True:
            cur = self._inbound
            if cur is None:
                cur = self._next_inbound(sync, deadline, generation)
                if cur is None:
                    continue
            if cur.stash or cur.remaining:
                if not cur.deliver:
                    self._discard_payload(sync, cur, deadline, generation)
                    continue
                space = view[n:]
                if cur.stash:
                    got = min(len(cur.stash), len(space))
                    space[:got] = cur.stash[:got]
                    del cur.stash[:got]
                else:
                    got = sync.recv_into(space[: cur.remaining], deadline, generation)
                    cur.remaining -= got
                if term_char is not None:
                    hit = view[n : n + got].tobytes().find(bytes((term_char,)))
                    if hit >= 0:
                        cur.stash[:0] = view[n + hit + 1 : n + got]
                        n += hit + 1
                        self._maybe_finish(cur)
                        return n, True
                n += got
            if self._maybe_finish(cur) and cur.type is _MT.DATA_END and cur.deliver:
                return n, True
            if n == total:
                return n, False

    def _maybe_finish(self, cur: _Inbound) -> bool:
        """Retire a fully consumed message; a delivered DataEnd completes a response (RMT)."""
        if cur.stash or cur.remaining:
            return False
        self._inbound = None
        if cur.type is _MT.DATA_END and cur.deliver:
            with self._state_lock:
                self._proto.response_delivered(cur.message_id)
        return True

    def _read_header(self, sync: SyncSocket, deadline: float | None, generation: int) -> h.Header:
        view = memoryview(self._header)
        while self._header_fill < h.HEADER_SIZE:  # kept across timeouts: the stream stays in step
            self._header_fill += sync.recv_into(view[self._header_fill :], deadline, generation)
        self._header_fill = 0
        limit = max(self._proto.max_message_size, h.CONTROL_PAYLOAD_LIMIT)
        return h.decode_header(self._header, limit)

    def _next_inbound(self, sync: SyncSocket, deadline: float | None, generation: int) -> _Inbound | None:
        """Read the next sync message header; data messages become `_inbound`, others are handled."""
        header = self._read_header(sync, deadline, generation)
        if header.type in (_MT.DATA, _MT.DATA_END):
            kind = _MT(header.type)
            with self._state_lock:
                deliver = self._proto.accept_data(kind, header.parameter)
            self._inbound = _Inbound(kind, header.parameter, header.length, deliver)
            return self._inbound
        if header.length > h.CONTROL_PAYLOAD_LIMIT:
            raise h.HislipFormatError(f"{header.length}-byte payload on a sync control message (type {header.type})")
        payload = bytearray(header.length)
        sync.recv_exact_into(memoryview(payload), deadline, generation)
        if not header.known:
            code = h.ErrorCode.UNRECOGNIZED_VENDOR_MESSAGE if header.type >= h.VENDOR_SPECIFIC_MIN \
                else h.ErrorCode.UNRECOGNIZED_MESSAGE_TYPE
            self._send_sync(sync, h.error(code, f"message type {header.type}"), deadline, generation)
            return None
        message = h.Message(_MT(header.type), header.control, header.parameter, bytes(payload))
        self._on_sync_control(message)
        return None

    def _on_sync_control(self, message: h.Message) -> None:
        kind = message.type
        if kind is _MT.INTERRUPTED:
            with self._state_lock:
                self._proto.receive_interrupted(message.message_id)
            self._log.info("hislip.interrupted", message_id=message.message_id)
        elif kind is _MT.FATAL_ERROR:
            raise ServerFatalError(message.control, message.text())
        elif kind is _MT.ERROR:
            raise ServerError(message.control, message.text())
        else:  # e.g. a late DeviceClearAcknowledge: nothing to do with it now
            self._log.debug("hislip.unexpected_sync_message", message=repr(message))

    def _discard_payload(self, sync: SyncSocket, cur: _Inbound, deadline: float | None, generation: int) -> None:
        cur.stash.clear()
        scratch = memoryview(bytearray(min(cur.remaining, 1 << 20)))
        while cur.remaining:
            cur.remaining -= sync.recv_into(scratch[: cur.remaining], deadline, generation)
        self._inbound = None

    def _protocol_failure(self, exc: RemoteProtocolError) -> VisaBusError:
        if isinstance(exc, ServerError):
            return VisaBusError(f"{self.resource}: {exc}", exc.code)
        reason = str(exc) if isinstance(exc, ServerFatalError) else f"HiSLIP protocol error: {exc}"
        if not isinstance(exc, ServerFatalError) and self._sync is not None:
            fatal_code = getattr(exc, "fatal_code", h.FatalErrorCode.UNIDENTIFIED)
            self._send_async_quietly(h.fatal_error(fatal_code, str(exc)))
        if self._sync is not None:
            self._sync.mark_lost(reason)
        return ConnectionLost(f"{self.resource}: {reason}")

    # ------------------------------------------------------------------ device clear / abort
    def abort(self) -> None:
        if self._sync is not None:
            self._sync.abort()
        if self._async is not None:
            self._async.wake()

    def clear(self) -> None:
        sync = self._channel()
        with self._clear_lock:
            self.abort()  # a read/write blocked on the executor thread raises Aborted and lets go
            patience = max(self.attributes.timeout or 0.0, CLEAR_PATIENCE)
            if not self._sync_lock.acquire(timeout=patience):
                raise VisaTimeout(f"{self.resource}: device clear could not take the synchronous channel")
            try:
                self._clear_locked(sync)
            finally:
                self._sync_lock.release()

    def _clear_locked(self, sync: SyncSocket) -> None:
        """IVI-6.1 §4.12 client side; the caller holds the sync channel."""
        deadline = deadline_after(max(self.attributes.timeout or 0.0, CLEAR_PATIENCE))
        generation = sync.generation
        try:
            with self._state_lock:
                request = self._proto.begin_clear()
            ack = self._channel_async().transaction(request, _MT.ASYNC_DEVICE_CLEAR_ACKNOWLEDGE, deadline)
            with self._state_lock:
                complete = self._proto.receive_async_device_clear_acknowledge(ack)
            if self._owed:  # finish the partly sent message: the server is discarding sync input now
                zeros = memoryview(bytes(self._owed))
                sync.send([zeros], deadline, generation, self._owed_progress)
            self._send_sync(sync, complete, deadline, generation)
            final = self._drain_until_clear_ack(sync, deadline, generation)
            with self._state_lock:
                self._proto.receive_device_clear_acknowledge(final)
        except (VisaTimeout, RemoteProtocolError) as exc:
            with self._state_lock:
                self._proto.abandon_clear()
            reason = f"device clear did not complete: {exc}"
            sync.mark_lost(reason)
            raise ConnectionLost(f"{self.resource}: {reason}") from None
        self._inbound = None
        self._log.info("hislip.cleared", overlapped=self._proto.overlapped)

    def _owed_progress(self, n: int) -> None:
        self._owed -= n

    def _drain_until_clear_ack(self, sync: SyncSocket, deadline: float | None, generation: int) -> h.Message:
        """Discard sync traffic (the rest of a response in flight included) until DeviceClearAcknowledge."""
        while True:
            cur = self._inbound
            if cur is not None:
                cur.deliver = False
                self._discard_payload(sync, cur, deadline, generation)
            header = self._read_header(sync, deadline, generation)
            if header.type in (_MT.DATA, _MT.DATA_END):
                self._inbound = _Inbound(_MT(header.type), header.parameter, header.length, False)
                continue
            if header.length > h.CONTROL_PAYLOAD_LIMIT:
                raise h.HislipFormatError(f"{header.length}-byte payload on sync message type {header.type}")
            payload = bytearray(header.length)
            sync.recv_exact_into(memoryview(payload), deadline, generation)
            if header.type == _MT.DEVICE_CLEAR_ACKNOWLEDGE:
                return h.Message(_MT.DEVICE_CLEAR_ACKNOWLEDGE, header.control, header.parameter)
            if header.type == _MT.FATAL_ERROR:
                raise ServerFatalError(header.control, bytes(payload).decode("ascii", "replace"))

    # ------------------------------------------------------------------ async channel
    def _channel_async(self) -> AsyncChannel:
        channel = self._async
        if channel is None:
            raise ConnectionLost(f"{self.resource}: session is not open")
        return channel

    def _send_async_quietly(self, message: h.Message) -> None:
        if self._async is not None:
            self._async.send_quietly(message)

    def _on_async_interrupted(self, message_id: int) -> None:
        with self._state_lock:
            self._proto.receive_async_interrupted(message_id)

    def _lost(self, reason: str) -> None:
        if self._closing:
            return
        self._log.warning("hislip.connection_lost", reason=reason)
        if self._sync is not None:
            self._sync.mark_lost(reason)

    def _lost_reason(self) -> str | None:
        sync = self._sync
        return "session closed" if sync is None else sync.lost

    def _async_call(self, request: h.Message, response: h.MessageType, timeout: float | None) -> h.Message:
        self._channel()
        try:
            return self._channel_async().transaction(request, response, deadline_after(timeout))
        except ServerError as exc:
            raise VisaBusError(f"{self.resource}: {exc}", exc.code) from None
        except RemoteProtocolError as exc:
            raise self._protocol_failure(exc) from None

    # ------------------------------------------------------------------ control operations
    def _request(self, build: Callable[[], h.Message]) -> h.Message:
        """Build an async request from the protocol state; misuse becomes a VISA error."""
        self._channel()
        with self._state_lock:
            try:
                return build()
            except LocalProtocolError as exc:
                if self._proto.phase is not Phase.READY:
                    raise ResourceBusy(f"{self.resource}: {exc} (device clear in progress?)") from None
                raise InvalidParameter(f"{self.resource}: {exc}") from None

    def read_stb(self) -> int:
        request = self._request(self._proto.status_query)
        reply = self._async_call(request, _MT.ASYNC_STATUS_RESPONSE, self.attributes.timeout)
        return HislipClient.receive_status_response(reply)

    def lock(self, exclusive: bool, timeout: float | None) -> None:
        key = "" if exclusive else str(self.attributes.extra.get("lock_key") or DEFAULT_SHARED_KEY)
        self._lock(key, timeout)

    def lock_shared(self, key: str, timeout: float | None) -> None:
        if not key:
            raise InvalidParameter(f"{self.resource}: a shared lock needs a non-empty key")
        self._lock(key, timeout)

    def _lock(self, key: str, timeout: float | None) -> None:
        kind = "shared" if key else "exclusive"
        if kind in self._held:  # VISA nests locks of a session; HiSLIP would call it redundant
            self._held[kind] += 1
            return
        timeout_ms = INFINITE_MS if timeout is None else min(int(timeout * 1000), INFINITE_MS - 1)
        request = self._request(lambda: self._proto.lock_request(timeout_ms, key))
        margin = self.attributes.timeout if self.attributes.timeout is not None else 2.0
        wait = None if timeout is None else timeout + margin
        result = HislipClient.receive_lock_response(self._async_call(request, _MT.ASYNC_LOCK_RESPONSE, wait))
        if result is h.LockResult.SUCCESS:
            self._held[kind] = 1
        elif result is h.LockResult.FAILURE:
            if timeout:
                raise VisaTimeout(f"{self.resource}: {kind} lock not granted within {timeout} s")
            raise ResourceLocked(f"{self.resource}: another session holds a lock on {self.sub_address}")
        else:
            raise ResourceLocked(f"{self.resource}: the server refused the {kind} lock request")

    def unlock(self) -> None:
        if not self._held:
            raise SessionNotLocked(f"{self.resource}: this session holds no lock")
        kind = "exclusive" if "exclusive" in self._held else "shared"
        if self._held[kind] > 1:
            self._held[kind] -= 1
            return
        request = self._request(self._proto.lock_release)
        result = HislipClient.receive_lock_response(
            self._async_call(request, _MT.ASYNC_LOCK_RESPONSE, self.attributes.timeout)
        )
        if result is h.LockResult.SUCCESS:
            self._held.pop("exclusive", None)
        elif result is h.LockResult.SUCCESS_SHARED:
            self._held.pop("shared", None)
        else:
            self._held.clear()
            raise SessionNotLocked(f"{self.resource}: the server says this session holds no lock")

    def lock_info(self) -> tuple[bool, int]:
        """(an exclusive lock is granted, number of sessions holding locks) — any session may ask."""
        reply = self._async_call(HislipClient.lock_info(), _MT.ASYNC_LOCK_INFO_RESPONSE, self.attributes.timeout)
        return HislipClient.receive_lock_info_response(reply)

    def remote_local(self, request: h.RemoteLocal | int) -> None:
        """AsyncRemoteLocalControl with a VISA viGpibControlREN mode (0-6)."""
        try:
            code = h.RemoteLocal(request)
        except ValueError:
            raise InvalidParameter(f"{self.resource}: remote/local request must be 0-6, got {request}") from None
        request = self._request(lambda: self._proto.remote_local(code))
        reply = self._async_call(request, _MT.ASYNC_REMOTE_LOCAL_RESPONSE, self.attributes.timeout)
        HislipClient.receive_remote_local_response(reply)

    def remote(self) -> None:
        self.remote_local(h.RemoteLocal.ENABLE_REMOTE_GO_TO_REMOTE)

    def local(self) -> None:
        self.remote_local(h.RemoteLocal.GO_TO_LOCAL)

    def enable_srq(self, handler: SrqHandler | None) -> None:
        self.srq_handler = handler
        if self._async is not None:
            self._async.enable_srq(handler)

    def set_attribute(self, name: str, value: object) -> None:
        super().set_attribute(name, value)
        sync, channel = self._sync, self._async
        if sync is None or channel is None:
            return
        if name in ("keepalive", "nodelay"):
            configure(sync.sock, self.attributes.nodelay, self.attributes.keepalive)
            configure(channel.sock, True, self.attributes.keepalive)
        elif name == "max_message_kb":
            request = self._request(lambda: self._proto.maximum_message_size(self._wanted_max_size()))
            reply = self._async_call(request, _MT.ASYNC_MAXIMUM_MESSAGE_SIZE_RESPONSE, self.attributes.timeout)
            self._proto.receive_maximum_message_size_response(reply)

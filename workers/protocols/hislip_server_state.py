"""HiSLIP server protocol state, without I/O (the simulator's `HislipServer` is its threaded driver).

`HislipServerCore` owns the sub-addresses (`HislipDevice`: locks, remote/local) and the sessions;
`ServerSession` digests the messages of one session's two channels and returns actions:

    Outgoing(session_id, channel, message)   send this (possibly to another session: lock grants)
    AwaitResponse(message_id, generation)    the device produced a response: fetch it from the engine,
                                             then send what `response_messages(ticket, data)` yields
    ScheduleLockExpiry(deadline)             call `HislipServerCore.expire_locks(now)` at `deadline`

The device behind a session is an `Engine` (the SCPI engine's `ScpiSession` fits). The bookkeeping
follows IVI-6.1: MessageIDs and RMT-delivered (§3), MAV for AsyncStatusQuery (§4.14), Interrupted in
synchronized mode, device clear (§4.12), locks (§4.5/4.6, see hislip_device), remote/local (§4.7).
Not thread-safe: the driver serialises every call with one lock.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import structlog

from . import hislip as h
from .hislip_device import HislipDevice, LockDecision, LockOutcome

log = structlog.get_logger(__name__)

MAX_PROGRAM_MESSAGE = 1 << 28  # a program message (Data... DataEnd) larger than this is refused
STB_MAV = 0x10


class Channel(enum.Enum):
    SYNC = "sync"
    ASYNC = "async"


@dataclass(frozen=True, slots=True)
class Outgoing:
    session_id: int
    channel: Channel
    message: h.Message


@dataclass(frozen=True, slots=True)
class AwaitResponse:
    message_id: int
    generation: int


@dataclass(frozen=True, slots=True)
class ScheduleLockExpiry:
    deadline: float


Action = Outgoing | AwaitResponse | ScheduleLockExpiry


class Engine(Protocol):
    """What a session needs from the simulated device (sim.scpi.ScpiSession provides it)."""

    def write(self, message: bytes) -> None: ...
    def trigger(self) -> None: ...
    def device_clear(self) -> None: ...
    def serial_poll(self) -> int: ...
    def has_output(self) -> bool: ...
    def close(self) -> None: ...


class SessionPhase(enum.Enum):
    AWAIT_ASYNC = "await-async"  # InitializeResponse sent, no async channel yet
    READY = "ready"
    CLEARING = "clearing"  # AsyncDeviceClear received: sync input dropped until DeviceClearComplete
    CLOSED = "closed"


class ServerSession:
    """Server-side state of one HiSLIP session."""

    def __init__(
        self,
        session_id: int,
        device: HislipDevice,
        engine: Engine,
        *,
        prefer_overlap: bool,
        max_message_size: int,
    ) -> None:
        self.session_id = session_id
        self.device = device
        self.engine = engine
        self.prefer_overlap = prefer_overlap
        self.overlapped = prefer_overlap
        self.max_message_size = max_message_size  # what we accept
        self.client_max_message_size = max_message_size  # what the client accepts, once announced
        self.phase = SessionPhase.AWAIT_ASYNC
        self.close_reason = ""
        self.generation = 0  # bumped by clear / interrupt / close: responses in flight stop
        self._input = bytearray()
        self._pending_release: int | None = None
        self._reset_message_state()

    def _reset_message_state(self) -> None:
        self.last_received_id = h.MESSAGE_ID_NONE_SENT
        self._rmt_expected = False
        self._mav = False  # synchronized: response sent, RMT-delivered not yet seen
        self._next_server_id = h.INITIAL_MESSAGE_ID  # overlapped: our own counter
        self._last_end_sent: int | None = None
        self._responding = False

    @property
    def closed(self) -> bool:
        return self.phase is SessionPhase.CLOSED

    def _out(self, channel: Channel, message: h.Message) -> Outgoing:
        return Outgoing(self.session_id, channel, message)

    def _fatal(self, channel: Channel, code: h.FatalErrorCode, text: str) -> list[Action]:
        self.close_reason = f"FatalError {int(code)}: {text}"
        actions: list[Action] = [self._out(channel, h.fatal_error(code, text))]
        actions.extend(self.close())
        return actions

    def may_access(self) -> bool:
        """May sync messages reach the device now (no other session holds a lock that excludes us)?"""
        return self.device.locks.may_access(self.session_id)

    def attach_async(self) -> None:
        self.phase = SessionPhase.READY

    # ------------------------------------------------------------------ synchronous channel
    def receive_sync(self, message: h.Message) -> list[Action]:
        kind = message.type
        if self.closed:
            return []
        if kind is h.MessageType.DEVICE_CLEAR_COMPLETE:
            return self._complete_clear(message)
        if kind is h.MessageType.FATAL_ERROR:
            self.close_reason = f"client sent FatalError {message.control}: {message.text()}"
            return list(self.close())
        if kind is h.MessageType.ERROR:
            log.info("hislip.client_error", session=self.session_id, code=message.control, text=message.text())
            return []
        if kind not in (h.MessageType.DATA, h.MessageType.DATA_END, h.MessageType.TRIGGER):
            text = f"{kind.name} is not valid on the synchronous channel"
            return [self._out(Channel.SYNC, h.error(h.ErrorCode.UNRECOGNIZED_MESSAGE_TYPE, text))]
        if self.phase is SessionPhase.AWAIT_ASYNC:
            return self._fatal(
                Channel.SYNC, h.FatalErrorCode.CHANNELS_NOT_ESTABLISHED,
                "data on the synchronous channel before AsyncInitialize",
            )
        if self.phase is SessionPhase.CLEARING:
            return []  # well-formed sync input is dropped until DeviceClearComplete
        self.device.remote_local.touch()
        self._receive_rmt(message.rmt_delivered)
        self.last_received_id = message.message_id
        if kind is h.MessageType.DATA:
            if len(self._input) + len(message.payload) > MAX_PROGRAM_MESSAGE:
                self._input.clear()
                text = f"program message longer than {MAX_PROGRAM_MESSAGE} bytes"
                return [self._out(Channel.SYNC, h.error(h.ErrorCode.MESSAGE_TOO_LARGE, text))]
            self._input += message.payload
            return self._run_deferred()
        if kind is h.MessageType.TRIGGER:
            self.engine.trigger()
            return self._run_deferred()
        self._input += message.payload
        program = bytes(self._input)
        self._input.clear()
        if self.engine.has_output():  # a response nobody waited for: the new message supersedes it
            self.engine.device_clear()
        self.engine.write(program)
        actions = self._run_deferred()
        if self.engine.has_output():
            actions.append(AwaitResponse(message.message_id, self.generation))
        return actions

    def _receive_rmt(self, rmt_delivered: bool) -> None:
        if rmt_delivered:
            self._mav = False
        if not self.overlapped and self._rmt_expected != rmt_delivered:
            # IVI-6.1 §3.1.1: an interrupted error, reported internally only.
            log.info("hislip.rmt_mismatch", session=self.session_id, rmt_expected=self._rmt_expected)
        self._rmt_expected = False

    def response_messages(self, ticket: AwaitResponse, data: h.Payload) -> Iterator[h.Message]:
        """Data/DataEnd messages carrying `data`, each within the client's maximum message size.

        Stops early if the session was cleared, interrupted or closed since `ticket` was issued
        (advance it under the driver's lock; a message already yielded should be sent in full).
        """
        view = memoryview(data)
        chunk = max(self.client_max_message_size - h.HEADER_SIZE, 1)
        offset = 0
        self._responding = True
        try:
            while ticket.generation == self.generation and self.phase is SessionPhase.READY:
                piece = view[offset : offset + chunk]
                offset += len(piece)
                last = offset >= len(view)
                if self.overlapped:
                    message_id = self._next_server_id
                    self._next_server_id = h.next_message_id(message_id)
                else:
                    message_id = ticket.message_id
                    self._mav = True
                if last:  # bookkeeping first: a status query may run before the driver resumes us
                    self._rmt_expected = not self.overlapped
                    self._last_end_sent = message_id
                    self._responding = False
                    yield h.data_end(message_id, piece)
                    return
                yield h.data(message_id, piece)
        finally:
            self._responding = False

    def interrupt(self, ticket: AwaitResponse, interrupting_id: int) -> list[Action]:
        """Synchronized mode: a response is ready but newer input is waiting — drop the response and
        tell the client on both channels (IVI-6.1 §3.1.1)."""
        if ticket.generation != self.generation or self.overlapped or self.phase is not SessionPhase.READY:
            return []
        self.generation += 1
        self.engine.device_clear()
        self._mav = False
        return [
            self._out(Channel.ASYNC, h.async_interrupted(interrupting_id)),
            self._out(Channel.SYNC, h.interrupted(interrupting_id)),
        ]

    def _complete_clear(self, message: h.Message) -> list[Action]:
        self.overlapped = message.overlapped  # both modes are supported: grant what was asked
        self._reset_message_state()
        self._input.clear()
        self.generation += 1
        if self.phase is not SessionPhase.AWAIT_ASYNC:
            self.phase = SessionPhase.READY
        return [self._out(Channel.SYNC, h.device_clear_acknowledge(self.overlapped))]

    # ------------------------------------------------------------------ asynchronous channel
    def receive_async(self, message: h.Message, now: float) -> list[Action]:
        kind = message.type
        if self.closed:
            return []
        handler = self._ASYNC_HANDLERS.get(kind)
        if handler is not None:
            return handler(self, message, now)
        if kind is h.MessageType.FATAL_ERROR:
            self.close_reason = f"client sent FatalError {message.control}: {message.text()}"
            return list(self.close())
        if kind is h.MessageType.ERROR:
            log.info("hislip.client_error", session=self.session_id, code=message.control, text=message.text())
            return []
        text = f"{kind.name} is not valid on the asynchronous channel"
        return [self._out(Channel.ASYNC, h.error(h.ErrorCode.UNRECOGNIZED_MESSAGE_TYPE, text))]

    def _on_max_size(self, message: h.Message, now: float) -> list[Action]:
        self.client_max_message_size = max(message.size_value(), h.MIN_MESSAGE_SIZE)
        return [self._out(Channel.ASYNC, h.async_maximum_message_size_response(self.max_message_size))]

    def _on_status_query(self, message: h.Message, now: float) -> list[Action]:
        self.device.remote_local.touch()
        quoted = message.message_id
        if message.rmt_delivered:  # the client consumed the last response: MAV clears first
            self._mav = False
            self._rmt_expected = False
        if self.overlapped:
            mav = self._responding or (self._last_end_sent is not None and quoted != self._last_end_sent)
        else:
            # A query that overtook a sync message (quoted id not yet received) reports MAV false.
            mav = self._mav and quoted == self.last_received_id
        status = self.engine.serial_poll() | (STB_MAV if mav else 0)
        return [self._out(Channel.ASYNC, h.async_status_response(status))]

    def _on_lock(self, message: h.Message, now: float) -> list[Action]:
        self.device.remote_local.touch()
        if message.control == 1:
            if self._pending_release is not None:
                text = "AsyncLock request while an unlock is still pending"
                return [self._out(Channel.ASYNC, h.error(h.ErrorCode.UNIDENTIFIED, text))]
            outcome = self.device.locks.request(self.session_id, message.text(), message.parameter / 1000.0, now)
            if outcome is LockOutcome.PENDING:
                return [ScheduleLockExpiry(now + message.parameter / 1000.0)]
            result = {
                LockOutcome.GRANTED: h.LockResult.SUCCESS,
                LockOutcome.FAILED: h.LockResult.FAILURE,
                LockOutcome.ERROR: h.LockResult.ERROR,
            }[outcome]
            return [self._out(Channel.ASYNC, h.async_lock_response(result))]
        if message.control == 0:
            if h.id_reached(self.last_received_id, message.message_id):
                return self._release(respond=True)
            self._pending_release = message.message_id  # wait until that sync message was processed
            return []
        text = f"AsyncLock control code {message.control}"
        return [self._out(Channel.ASYNC, h.error(h.ErrorCode.UNRECOGNIZED_CONTROL_CODE, text))]

    def _release(self, respond: bool) -> list[Action]:
        self._pending_release = None
        result, decisions = self.device.locks.release(self.session_id)
        actions: list[Action] = [self._out(Channel.ASYNC, h.async_lock_response(result))] if respond else []
        actions.extend(_decisions(decisions))
        return actions

    def _run_deferred(self) -> list[Action]:
        if self._pending_release is not None and h.id_reached(self.last_received_id, self._pending_release):
            return self._release(respond=True)
        return []

    def _on_lock_info(self, message: h.Message, now: float) -> list[Action]:
        exclusive, holders = self.device.locks.info()
        return [self._out(Channel.ASYNC, h.async_lock_info_response(exclusive, holders))]

    def _on_remote_local(self, message: h.Message, now: float) -> list[Action]:
        if not self.device.remote_local.apply(message.control):
            text = f"AsyncRemoteLocalControl request {message.control}"
            return [self._out(Channel.ASYNC, h.error(h.ErrorCode.UNRECOGNIZED_CONTROL_CODE, text))]
        return [self._out(Channel.ASYNC, h.async_remote_local_response())]

    def _on_device_clear(self, message: h.Message, now: float) -> list[Action]:
        """Finish pending async transactions at once, drop output and buffered input, acknowledge."""
        self.device.remote_local.touch()
        actions: list[Action] = list(_decisions(self.device.locks.cancel(self.session_id)))
        if self._pending_release is not None:
            actions.extend(self._release(respond=False))  # abandoned unlock: released unconfirmed
        self.generation += 1
        self.engine.device_clear()
        self._input.clear()
        self._mav = False
        self.phase = SessionPhase.CLEARING
        actions.append(self._out(Channel.ASYNC, h.async_device_clear_acknowledge(self.prefer_overlap)))
        return actions

    def _on_async_initialize(self, message: h.Message, now: float) -> list[Action]:
        return self._fatal(Channel.ASYNC, h.FatalErrorCode.INVALID_INITIALIZATION, "session already initialized")

    _ASYNC_HANDLERS: ClassVar[dict[h.MessageType, Callable[[ServerSession, h.Message, float], list[Action]]]] = {
        h.MessageType.ASYNC_MAXIMUM_MESSAGE_SIZE: _on_max_size,
        h.MessageType.ASYNC_STATUS_QUERY: _on_status_query,
        h.MessageType.ASYNC_LOCK: _on_lock,
        h.MessageType.ASYNC_LOCK_INFO: _on_lock_info,
        h.MessageType.ASYNC_REMOTE_LOCAL_CONTROL: _on_remote_local,
        h.MessageType.ASYNC_DEVICE_CLEAR: _on_device_clear,
        h.MessageType.ASYNC_INITIALIZE: _on_async_initialize,
    }

    # ------------------------------------------------------------------ events from the device / driver
    def service_request(self, status_byte: int) -> list[Action]:
        if self.phase in (SessionPhase.AWAIT_ASYNC, SessionPhase.CLOSED):
            return []
        return [self._out(Channel.ASYNC, h.async_service_request(status_byte))]

    def close(self) -> list[Action]:
        """The session ends (a channel closed, or FatalError): locks go, waiters elsewhere may be granted."""
        if self.closed:
            return []
        self.phase = SessionPhase.CLOSED
        self.generation += 1
        return list(_decisions(self.device.locks.drop(self.session_id)))


def _decisions(decisions: list[LockDecision]) -> Iterator[Outgoing]:
    for decision in decisions:
        yield Outgoing(decision.session_id, Channel.ASYNC, h.async_lock_response(decision.result))


EngineFactory = Callable[[str, int], Engine]  # (sub-address, session id) -> engine


class HislipServerCore:
    """All sessions and sub-addresses of one HiSLIP server."""

    def __init__(
        self,
        sub_addresses: Sequence[str],
        engine_factory: EngineFactory,
        *,
        prefer_overlap: bool = False,
        max_message_size: int = 1 << 20,
        max_sessions: int = 64,
        vendor: str = h.VENDOR_ID,
    ) -> None:
        if not sub_addresses:
            raise ValueError("a HiSLIP server needs at least one sub-address")
        self.devices = {name.lower(): HislipDevice(name.lower()) for name in sub_addresses}
        self.default_device = sub_addresses[0].lower()
        self.engine_factory = engine_factory
        self.prefer_overlap = prefer_overlap
        self.max_message_size = max(max_message_size, h.MIN_MESSAGE_SIZE)
        self.max_sessions = max_sessions
        self.vendor = vendor
        self.sessions: dict[int, ServerSession] = {}
        self._last_session_id = 0

    def _allocate_session_id(self) -> int:
        for _ in range(0x10000):
            self._last_session_id = self._last_session_id % 0xFFFF + 1
            if self._last_session_id not in self.sessions:
                return self._last_session_id
        raise RuntimeError("no free HiSLIP SessionID")  # unreachable while max_sessions < 65535

    def initialize(self, message: h.Message) -> tuple[ServerSession | None, h.Message]:
        """First message of a sync connection. Returns the new session (or None) and the reply."""
        bad = h.FatalErrorCode.INVALID_INITIALIZATION
        if message.type is not h.MessageType.INITIALIZE:
            return None, h.fatal_error(bad, f"expected Initialize, got {message.type.name}")
        if message.high16 >> 8 < 1:
            return None, h.fatal_error(bad, f"unsupported HiSLIP version 0x{message.high16:04X}")
        name = message.text().strip().lower() or self.default_device
        device = self.devices.get(name)
        if device is None:
            offered = ", ".join(sorted(self.devices))
            return None, h.fatal_error(bad, f"unknown sub-address {name!r}; this server offers {offered}")
        if len(self.sessions) >= self.max_sessions:
            return None, h.fatal_error(h.FatalErrorCode.MAX_CLIENTS_EXCEEDED, f"{self.max_sessions} sessions open")
        session_id = self._allocate_session_id()
        session = ServerSession(
            session_id, device, self.engine_factory(name, session_id),
            prefer_overlap=self.prefer_overlap, max_message_size=self.max_message_size,
        )
        self.sessions[session_id] = session
        version = min(message.high16, h.PROTOCOL_VERSION)
        return session, h.initialize_response(session_id, self.prefer_overlap, version)

    def async_initialize(self, message: h.Message) -> tuple[ServerSession | None, h.Message]:
        """First message of an async connection: attach it to the session named by its SessionID."""
        bad = h.FatalErrorCode.INVALID_INITIALIZATION
        if message.type is not h.MessageType.ASYNC_INITIALIZE:
            return None, h.fatal_error(bad, f"expected AsyncInitialize, got {message.type.name}")
        session = self.sessions.get(message.low16)
        if session is None or session.phase is not SessionPhase.AWAIT_ASYNC:
            return None, h.fatal_error(bad, f"no session waiting for an async channel with SessionID {message.low16}")
        session.attach_async()
        return session, h.async_initialize_response(self.vendor)

    def remove(self, session_id: int) -> list[Action]:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return []
        actions = session.close()
        session.engine.close()
        return actions

    def expire_locks(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for device in self.devices.values():
            actions.extend(_decisions(device.locks.expire(now)))
        return actions

    def next_lock_deadline(self) -> float | None:
        deadlines = [d for d in (dev.locks.next_deadline() for dev in self.devices.values()) if d is not None]
        return min(deadlines, default=None)

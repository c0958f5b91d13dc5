"""HiSLIP client protocol state, without I/O.

`HislipClient` builds every message a client sends and digests every message it receives, keeping the
bookkeeping IVI-6.1 puts on the client:

* the MessageID counter (0xFFFFFF00 after init and device clear, +2 per Data/DataEnd/Trigger), and the
  "last sent" id quoted by AsyncLock(release), AsyncRemoteLocalControl and, in synchronized mode,
  AsyncStatusQuery (0xFFFFFEFE before anything was sent);
* RMT-delivered: set once a complete response (one ending in DataEnd) was handed to the application,
  reported in the control code of the next Data/DataEnd/Trigger/AsyncStatusQuery, then cleared;
* which server Data/DataEnd to accept (synchronized: only the id of our newest message; overlapped:
  all), the MessageID of the newest response delivered (the overlapped AsyncStatusQuery parameter);
* Interrupted/AsyncInterrupted (drop responses; hold sends or discard data until both arrived);
* the device-clear and lock transactions, and the overlapped/synchronized mode negotiation.

The blocking driver (workers/sessions/hislip.py) moves the bytes; tests drive this class directly.
It is not thread-safe: callers serialise access.
"""

from __future__ import annotations

import enum

from . import hislip as h
from .errors import LocalProtocolError, RemoteProtocolError


class Phase(enum.Enum):
    NEW = "new"
    INITIALIZING = "initializing"  # Initialize sent on the sync channel
    ASYNC_INITIALIZING = "async-initializing"  # AsyncInitialize sent
    READY = "ready"
    CLEARING_ASYNC = "clearing-async"  # AsyncDeviceClear sent, awaiting AsyncDeviceClearAcknowledge
    CLEARING_SYNC = "clearing-sync"  # DeviceClearComplete sent, awaiting DeviceClearAcknowledge
    FAILED = "failed"


class ServerFatalError(RemoteProtocolError):
    """The server sent FatalError: the session is over. `code` and `text` are the server's."""

    def __init__(self, code: int, text: str) -> None:
        meaning = h.describe_fatal_error(code)
        super().__init__(f"server sent FatalError {code} ({meaning})" + (f": {text}" if text else ""))
        self.fatal_code = code
        self.text = text


class ServerError(RemoteProtocolError):
    """The server answered Error: it discarded our message. `status` is the matching VISA status."""

    def __init__(self, code: int, text: str) -> None:
        meaning = h.describe_error(code)
        super().__init__(
            f"server sent Error {code} ({meaning})" + (f": {text}" if text else ""),
            h.ERROR_STATUS.get(code, h.ERROR_STATUS[h.ErrorCode.UNIDENTIFIED]),
        )
        self.error_code = code
        self.text = text


def raise_for_error(message: h.Message) -> None:
    """Turn a FatalError/Error message into the matching exception; other messages pass."""
    if message.type is h.MessageType.FATAL_ERROR:
        raise ServerFatalError(message.control, message.text())
    if message.type is h.MessageType.ERROR:
        raise ServerError(message.control, message.text())


def _expect(message: h.Message, wanted: h.MessageType) -> None:
    raise_for_error(message)
    if message.type is not wanted:
        raise RemoteProtocolError(f"expected HiSLIP {wanted.name}, server sent {message.type.name}")


class HislipClient:
    """Client-side state of one HiSLIP session (both channels)."""

    def __init__(
        self,
        sub_address: str = "hislip0",
        *,
        max_message_size: int = 1 << 20,
        vendor: str = h.VENDOR_ID,
        request_overlap: bool | None = None,
    ) -> None:
        if max_message_size < h.MIN_MESSAGE_SIZE:
            raise LocalProtocolError(f"maximum message size must be at least {h.MIN_MESSAGE_SIZE} bytes")
        self.sub_address = sub_address
        self.vendor = vendor
        self.request_overlap = request_overlap  # None: take the server's preference at device clear
        self.phase = Phase.NEW
        self.session_id: int | None = None
        self.server_version = 0
        self.server_vendor = ""
        self.server_prefers_overlap = False
        self.overlapped = False
        self.max_message_size = max_message_size  # largest message we accept (announced to the server)
        self.server_max_message_size = 1 << 20  # until AsyncMaximumMessageSizeResponse says otherwise
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._next_id = h.INITIAL_MESSAGE_ID
        self._rmt_pending = False
        self._last_delivered_id = h.MESSAGE_ID_NONE_SENT
        # Interrupted / AsyncInterrupted arrive in pairs with the same MessageID, in either order.
        self._unpaired_sync: set[int] = set()  # Interrupted seen, AsyncInterrupted not yet: hold sends
        self._unpaired_async: set[int] = set()  # AsyncInterrupted seen, Interrupted not yet: discard data

    # ------------------------------------------------------------------ bookkeeping views
    @property
    def last_sent_id(self) -> int:
        """MessageID of the newest Data/DataEnd/Trigger sent (0xFFFFFEFE if none since init/clear)."""
        return (self._next_id - 2) % h.MESSAGE_ID_MODULUS

    @property
    def next_id(self) -> int:
        return self._next_id

    @property
    def rmt_pending(self) -> bool:
        return self._rmt_pending

    @property
    def last_delivered_id(self) -> int:
        return self._last_delivered_id

    @property
    def may_send(self) -> bool:
        """False while Interrupted arrived and its AsyncInterrupted twin has not (spec: send nothing)."""
        return not self._unpaired_sync

    @property
    def max_data_payload(self) -> int:
        """Largest Data/DataEnd payload the server accepts (its maximum counts the 16-byte header)."""
        return max(self.server_max_message_size - h.HEADER_SIZE, 1)

    def _take_rmt(self) -> bool:
        rmt, self._rmt_pending = self._rmt_pending, False
        return rmt

    def _take_id(self) -> int:
        message_id = self._next_id
        self._next_id = h.next_message_id(message_id)
        return message_id

    def _require(self, *phases: Phase) -> None:
        if self.phase not in phases:
            raise LocalProtocolError(
                f"HiSLIP session is {self.phase.value}; operation needs {'/'.join(p.value for p in phases)}"
            )

    # ------------------------------------------------------------------ initialization
    def initialize(self) -> h.Message:
        self._require(Phase.NEW)
        self.phase = Phase.INITIALIZING
        return h.initialize(self.sub_address, self.vendor)

    def receive_initialize_response(self, message: h.Message) -> None:
        self._require(Phase.INITIALIZING)
        try:
            _expect(message, h.MessageType.INITIALIZE_RESPONSE)
        except RemoteProtocolError:
            self.phase = Phase.FAILED
            raise
        self.server_version = message.high16
        self.session_id = message.low16
        self.server_prefers_overlap = message.overlapped
        self.overlapped = message.overlapped
        self.phase = Phase.ASYNC_INITIALIZING

    def async_initialize(self) -> h.Message:
        self._require(Phase.ASYNC_INITIALIZING)
        if self.session_id is None:
            raise LocalProtocolError("AsyncInitialize needs the SessionID from InitializeResponse")
        return h.async_initialize(self.session_id)

    def receive_async_initialize_response(self, message: h.Message) -> None:
        self._require(Phase.ASYNC_INITIALIZING)
        try:
            _expect(message, h.MessageType.ASYNC_INITIALIZE_RESPONSE)
        except RemoteProtocolError:
            self.phase = Phase.FAILED
            raise
        self.server_vendor = h.vendor_text(message.low16)
        self.phase = Phase.READY

    def maximum_message_size(self, size: int | None = None) -> h.Message:
        if size is not None:
            if size < h.MIN_MESSAGE_SIZE:
                raise LocalProtocolError(f"maximum message size must be at least {h.MIN_MESSAGE_SIZE} bytes")
            self.max_message_size = size
        return h.async_maximum_message_size(self.max_message_size)

    def receive_maximum_message_size_response(self, message: h.Message) -> int:
        _expect(message, h.MessageType.ASYNC_MAXIMUM_MESSAGE_SIZE_RESPONSE)
        self.server_max_message_size = max(message.size_value(), h.MIN_MESSAGE_SIZE)
        return self.server_max_message_size

    # ------------------------------------------------------------------ sending on the sync channel
    def data_messages(self, payload: h.Payload, end: bool = True) -> list[h.Message]:
        """Split one program message into Data messages (and a final DataEnd when `end`)."""
        self._require(Phase.READY)
        if not self.may_send:
            raise LocalProtocolError("waiting for AsyncInterrupted after Interrupted: nothing may be sent")
        view = memoryview(payload)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        chunk = self.max_data_payload
        messages: list[h.Message] = []
        offset = 0
        total = len(view)
        while True:
            piece = view[offset : offset + chunk]
            offset += len(piece)
            last = offset >= total
            build = h.data_end if (last and end) else h.data
            messages.append(build(self._take_id(), piece, self._take_rmt()))
            if last:
                return messages

    def trigger(self) -> h.Message:
        self._require(Phase.READY)
        if not self.may_send:
            raise LocalProtocolError("waiting for AsyncInterrupted after Interrupted: nothing may be sent")
        return h.trigger(self._take_id(), self._take_rmt())

    # ------------------------------------------------------------------ receiving on the sync channel
    def accept_data(self, message_type: h.MessageType, message_id: int) -> bool:
        """Should a server Data/DataEnd with this MessageID reach the application?"""
        if self.phase is not Phase.READY or self._unpaired_async:
            return False
        if self.overlapped:
            return True
        if message_type is h.MessageType.DATA and message_id == h.UNKNOWN_MESSAGE_ID:
            return True
        return message_id == self.last_sent_id

    def response_delivered(self, message_id: int) -> None:
        """A DataEnd payload was handed completely to the application."""
        self._rmt_pending = True
        self._last_delivered_id = message_id

    def receive_interrupted(self, message_id: int) -> None:
        """Interrupted (sync channel). Buffered responses must be dropped by the caller."""
        if message_id in self._unpaired_async:
            self._unpaired_async.discard(message_id)
        else:
            self._unpaired_sync.add(message_id)

    def receive_async_interrupted(self, message_id: int) -> None:
        """AsyncInterrupted (async channel). Buffered responses must be dropped by the caller."""
        if message_id in self._unpaired_sync:
            self._unpaired_sync.discard(message_id)
        else:
            self._unpaired_async.add(message_id)

    # ------------------------------------------------------------------ async transactions
    def status_query(self) -> h.Message:
        """AsyncStatusQuery: the quoted id is our newest sent message (synchronized) or the newest
        response delivered to the application (overlapped); RMT-delivered is reported once."""
        self._require(Phase.READY)
        quoted = self._last_delivered_id if self.overlapped else self.last_sent_id
        return h.async_status_query(quoted, self._take_rmt())

    @staticmethod
    def receive_status_response(message: h.Message) -> int:
        _expect(message, h.MessageType.ASYNC_STATUS_RESPONSE)
        return message.control

    def lock_request(self, timeout_ms: int, key: str = "") -> h.Message:
        self._require(Phase.READY)
        return h.async_lock_request(timeout_ms, key)

    def lock_release(self) -> h.Message:
        self._require(Phase.READY)
        return h.async_lock_release(self.last_sent_id)

    @staticmethod
    def receive_lock_response(message: h.Message) -> h.LockResult:
        _expect(message, h.MessageType.ASYNC_LOCK_RESPONSE)
        try:
            return h.LockResult(message.control)
        except ValueError:
            raise RemoteProtocolError(f"AsyncLockResponse with unknown result code {message.control}") from None

    @staticmethod
    def lock_info() -> h.Message:
        return h.async_lock_info()

    @staticmethod
    def receive_lock_info_response(message: h.Message) -> tuple[bool, int]:
        _expect(message, h.MessageType.ASYNC_LOCK_INFO_RESPONSE)
        return bool(message.control & 1), message.parameter

    def remote_local(self, request: h.RemoteLocal) -> h.Message:
        self._require(Phase.READY)
        return h.async_remote_local_control(request, self.last_sent_id)

    @staticmethod
    def receive_remote_local_response(message: h.Message) -> None:
        _expect(message, h.MessageType.ASYNC_REMOTE_LOCAL_RESPONSE)

    # ------------------------------------------------------------------ device clear
    def begin_clear(self) -> h.Message:
        """Step 1: AsyncDeviceClear. From now on sync Data/DataEnd are discarded."""
        self._require(Phase.READY, Phase.CLEARING_ASYNC, Phase.CLEARING_SYNC)
        self.phase = Phase.CLEARING_ASYNC
        return h.async_device_clear()

    def receive_async_device_clear_acknowledge(self, message: h.Message) -> h.Message:
        """Step 2: the server's preference arrived; answer DeviceClearComplete with our request."""
        self._require(Phase.CLEARING_ASYNC)
        _expect(message, h.MessageType.ASYNC_DEVICE_CLEAR_ACKNOWLEDGE)
        self.server_prefers_overlap = message.overlapped
        wanted = message.overlapped if self.request_overlap is None else self.request_overlap
        self.phase = Phase.CLEARING_SYNC
        return h.device_clear_complete(wanted)

    def receive_device_clear_acknowledge(self, message: h.Message) -> None:
        """Step 3: the final mode; counters restart."""
        self._require(Phase.CLEARING_SYNC)
        _expect(message, h.MessageType.DEVICE_CLEAR_ACKNOWLEDGE)
        self.overlapped = message.overlapped
        self._reset_counters()
        self.phase = Phase.READY

    def abandon_clear(self) -> None:
        """The clear could not complete (timeout): the session cannot be trusted any more."""
        self.phase = Phase.FAILED

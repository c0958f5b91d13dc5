"""HiSLIP (IVI-6.1, protocol version 1.0) message codec — sans-IO: bytes in, messages out.

Every HiSLIP message is a 16-byte header followed by a payload:

    offset 0  "HS"               prologue
    offset 2  message type       uint8   (MessageType; 128-255 are vendor specific)
    offset 3  control code       uint8
    offset 4  message parameter  uint32
    offset 8  payload length     uint64
    offset 16 payload

all big-endian. This module holds the constants, the error-code tables, `Message` (one frozen type
for every message, tagged by `MessageType`) with a constructor function per message, `decode_header`
and `HislipReader`, an incremental parser you feed bytes to.

Large Data/DataEnd payloads need not pass through `HislipReader`: a transport may read exactly
`HEADER_SIZE` bytes, call `decode_header` (which validates the prologue and bounds the length) and then
`recv_into` the payload straight into the caller's buffer. Message payloads may be memoryviews, so a
sender can emit `message.header()` and the payload view without joining them.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from visabus.sdk.errors import StatusCode

from .errors import LocalProtocolError, RemoteProtocolError

DEFAULT_PORT = 4880
PROLOGUE = b"HS"
HEADER = struct.Struct("!2sBBIQ")
HEADER_SIZE = HEADER.size  # 16
PROTOCOL_VERSION = 0x0100  # 1.0: major byte, minor byte
VENDOR_ID = "VB"  # visabus's two-character vendor id

INITIAL_MESSAGE_ID = 0xFFFFFF00  # client (and overlapped server) counter after init / device clear
MESSAGE_ID_NONE_SENT = 0xFFFFFEFE  # the "last sent" id before anything was sent
UNKNOWN_MESSAGE_ID = 0xFFFFFFFF  # server Data may carry this when it does not know the id
MESSAGE_ID_MODULUS = 1 << 32

MAX_SUB_ADDRESS = 256  # characters
MAX_TEXT = 256  # VISA bounds lock strings and error texts to 256 characters
MIN_MESSAGE_SIZE = HEADER_SIZE + MAX_TEXT  # every receiver must accept at least this (272)
CONTROL_PAYLOAD_LIMIT = 64 * 1024  # generous bound for payloads of non-data messages
VENDOR_SPECIFIC_MIN = 128


class MessageType(enum.IntEnum):
    INITIALIZE = 0
    INITIALIZE_RESPONSE = 1
    FATAL_ERROR = 2
    ERROR = 3
    ASYNC_LOCK = 4
    ASYNC_LOCK_RESPONSE = 5
    DATA = 6
    DATA_END = 7
    DEVICE_CLEAR_COMPLETE = 8
    DEVICE_CLEAR_ACKNOWLEDGE = 9
    ASYNC_REMOTE_LOCAL_CONTROL = 10
    ASYNC_REMOTE_LOCAL_RESPONSE = 11
    TRIGGER = 12
    INTERRUPTED = 13
    ASYNC_INTERRUPTED = 14
    ASYNC_MAXIMUM_MESSAGE_SIZE = 15
    ASYNC_MAXIMUM_MESSAGE_SIZE_RESPONSE = 16
    ASYNC_INITIALIZE = 17
    ASYNC_INITIALIZE_RESPONSE = 18
    ASYNC_DEVICE_CLEAR = 19
    ASYNC_SERVICE_REQUEST = 20
    ASYNC_STATUS_QUERY = 21
    ASYNC_STATUS_RESPONSE = 22
    ASYNC_DEVICE_CLEAR_ACKNOWLEDGE = 23
    ASYNC_LOCK_INFO = 24
    ASYNC_LOCK_INFO_RESPONSE = 25


class FatalErrorCode(enum.IntEnum):
    """Control code of FatalError; the sender closes both channels afterwards."""

    UNIDENTIFIED = 0
    POORLY_FORMED_HEADER = 1
    CHANNELS_NOT_ESTABLISHED = 2
    INVALID_INITIALIZATION = 3
    MAX_CLIENTS_EXCEEDED = 4
    SECURE_CONNECTION_FAILED = 5  # HiSLIP 2.0


class ErrorCode(enum.IntEnum):
    """Control code of Error; the receiver discarded the offending message and continues."""

    UNIDENTIFIED = 0
    UNRECOGNIZED_MESSAGE_TYPE = 1
    UNRECOGNIZED_CONTROL_CODE = 2
    UNRECOGNIZED_VENDOR_MESSAGE = 3
    MESSAGE_TOO_LARGE = 4
    AUTHENTICATION_FAILED = 5  # HiSLIP 2.0


FATAL_ERROR_MEANINGS: dict[int, str] = {
    FatalErrorCode.UNIDENTIFIED: "unidentified error",
    FatalErrorCode.POORLY_FORMED_HEADER: "poorly formed message header",
    FatalErrorCode.CHANNELS_NOT_ESTABLISHED: "attempt to use connection without both channels established",
    FatalErrorCode.INVALID_INITIALIZATION: "invalid initialization sequence",
    FatalErrorCode.MAX_CLIENTS_EXCEEDED: "server refused connection: maximum number of clients exceeded",
    FatalErrorCode.SECURE_CONNECTION_FAILED: "secure connection failed",
}

ERROR_MEANINGS: dict[int, str] = {
    ErrorCode.UNIDENTIFIED: "unidentified error",
    ErrorCode.UNRECOGNIZED_MESSAGE_TYPE: "unrecognized message type",
    ErrorCode.UNRECOGNIZED_CONTROL_CODE: "unrecognized control code",
    ErrorCode.UNRECOGNIZED_VENDOR_MESSAGE: "unrecognized vendor-defined message",
    ErrorCode.MESSAGE_TOO_LARGE: "message too large",
    ErrorCode.AUTHENTICATION_FAILED: "authentication failed",
}

# The VISA status a client reports when the server answers a request with Error(code).
ERROR_STATUS: dict[int, StatusCode] = {
    ErrorCode.UNIDENTIFIED: StatusCode.VI_ERROR_IO,
    ErrorCode.UNRECOGNIZED_MESSAGE_TYPE: StatusCode.VI_ERROR_NSUP_OPER,
    ErrorCode.UNRECOGNIZED_CONTROL_CODE: StatusCode.VI_ERROR_INV_PARAMETER,
    ErrorCode.UNRECOGNIZED_VENDOR_MESSAGE: StatusCode.VI_ERROR_NSUP_OPER,
    ErrorCode.MESSAGE_TOO_LARGE: StatusCode.VI_ERROR_IO,
    ErrorCode.AUTHENTICATION_FAILED: StatusCode.VI_ERROR_NPERMISSION,
}


def describe_fatal_error(code: int) -> str:
    if code in FATAL_ERROR_MEANINGS:
        return FATAL_ERROR_MEANINGS[code]
    return "device-defined fatal error" if code >= 128 else "reserved fatal error code"


def describe_error(code: int) -> str:
    if code in ERROR_MEANINGS:
        return ERROR_MEANINGS[code]
    return "device-defined error" if code >= 128 else "reserved error code"


class LockResult(enum.IntEnum):
    """Control code of AsyncLockResponse."""

    FAILURE = 0  # request: not granted within the timeout
    SUCCESS = 1  # request: granted; release: exclusive lock released
    SUCCESS_SHARED = 2  # release: shared lock released
    ERROR = 3  # redundant request, or nothing to release


class RemoteLocal(enum.IntEnum):
    """Control code of AsyncRemoteLocalControl (VISA viGpibControlREN modes)."""

    DISABLE_REMOTE = 0
    ENABLE_REMOTE = 1
    DISABLE_REMOTE_GO_TO_LOCAL = 2
    ENABLE_REMOTE_GO_TO_REMOTE = 3
    ENABLE_REMOTE_LOCK_OUT_LOCAL = 4
    ENABLE_REMOTE_GO_TO_REMOTE_LOCK_OUT_LOCAL = 5
    GO_TO_LOCAL = 6


# ------------------------------------------------------------------------------------------ errors
class HislipFormatError(RemoteProtocolError):
    """The byte stream cannot be trusted any more: answer FatalError(`fatal_code`) and close."""

    def __init__(self, message: str, fatal_code: FatalErrorCode = FatalErrorCode.POORLY_FORMED_HEADER) -> None:
        super().__init__(message)
        self.fatal_code = fatal_code


class PayloadTooLarge(HislipFormatError):
    """A header announced more payload than the receiver accepts (a lying length is never allocated)."""

    error_code = ErrorCode.MESSAGE_TOO_LARGE

    def __init__(self, message: str, header: Header) -> None:
        super().__init__(message, FatalErrorCode.POORLY_FORMED_HEADER)
        self.header = header


class UnrecognizedMessage(RemoteProtocolError):
    """A well-formed message of a type we do not know (reserved or vendor specific).

    Recoverable: its payload has been skipped; answer Error(`error_code`) on the same channel.
    """

    def __init__(self, message: str, header: Header) -> None:
        super().__init__(message, StatusCode.VI_ERROR_NSUP_OPER)
        self.header = header
        self.error_code = (
            ErrorCode.UNRECOGNIZED_VENDOR_MESSAGE if header.type >= VENDOR_SPECIFIC_MIN
            else ErrorCode.UNRECOGNIZED_MESSAGE_TYPE
        )


# ------------------------------------------------------------------------------------------ header
@dataclass(frozen=True, slots=True)
class Header:
    """A decoded header. `type` is the raw byte: it may be a type we do not know."""

    type: int
    control: int
    parameter: int
    length: int

    @property
    def known(self) -> bool:
        return self.type in _KNOWN_TYPES

    def message_type(self) -> MessageType:
        if self.type not in _KNOWN_TYPES:
            kind = "vendor-specific" if self.type >= VENDOR_SPECIFIC_MIN else "unknown"
            raise UnrecognizedMessage(f"{kind} HiSLIP message type {self.type}", self)
        return MessageType(self.type)


_KNOWN_TYPES = frozenset(int(t) for t in MessageType)


def encode_header(message_type: int, control: int, parameter: int, length: int) -> bytes:
    return HEADER.pack(PROLOGUE, message_type, control, parameter, length)


def decode_header(data: bytes | bytearray | memoryview, max_payload: int) -> Header:
    """Decode 16 header bytes. Raises HislipFormatError (bad prologue) or PayloadTooLarge."""
    if len(data) < HEADER_SIZE:
        raise LocalProtocolError(f"decode_header needs {HEADER_SIZE} bytes, got {len(data)}")
    prologue, mtype, control, parameter, length = HEADER.unpack_from(data)
    if prologue != PROLOGUE:
        raise HislipFormatError(f"bad HiSLIP prologue {bytes(prologue)!r} (expected b'HS'): stream out of sync")
    header = Header(mtype, control, parameter, length)
    if length > max_payload:
        raise PayloadTooLarge(
            f"HiSLIP message type {mtype} announces a {length}-byte payload; at most {max_payload} accepted",
            header,
        )
    return header


# ------------------------------------------------------------------------------------------ message
Payload = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Message:
    """One HiSLIP message. Build with the constructor functions below; read fields with the helpers."""

    type: MessageType
    control: int = 0
    parameter: int = 0
    payload: Payload = b""

    def __post_init__(self) -> None:
        if not 0 <= self.control <= 0xFF:
            raise LocalProtocolError(f"HiSLIP control code {self.control} does not fit in one byte")
        if not 0 <= self.parameter <= 0xFFFFFFFF:
            raise LocalProtocolError(f"HiSLIP message parameter {self.parameter} does not fit in 32 bits")

    def header(self) -> bytes:
        return encode_header(self.type, self.control, self.parameter, len(self.payload))

    def encode(self) -> bytes:
        """Header and payload as one bytes object (copies the payload: use header() + payload for bulk)."""
        return self.header() + bytes(self.payload)

    # --- field views ----------------------------------------------------------------------------
    @property
    def message_id(self) -> int:
        return self.parameter

    @property
    def rmt_delivered(self) -> bool:
        return bool(self.control & 1)

    @property
    def overlapped(self) -> bool:
        """Overlap bit of InitializeResponse, DeviceClearComplete/Acknowledge, AsyncDeviceClearAcknowledge."""
        return bool(self.control & 1)

    @property
    def high16(self) -> int:
        return self.parameter >> 16

    @property
    def low16(self) -> int:
        return self.parameter & 0xFFFF

    def text(self) -> str:
        return bytes(self.payload).decode("ascii", errors="replace")

    def size_value(self) -> int:
        """The 8-byte size carried by AsyncMaximumMessageSize[Response]."""
        if len(self.payload) != 8:
            raise RemoteProtocolError(f"{self.type.name} payload must be 8 bytes, got {len(self.payload)}")
        value: int = struct.unpack("!Q", self.payload)[0]
        return value

    def __repr__(self) -> str:
        shown = bytes(self.payload[:32])
        more = "…" if len(self.payload) > 32 else ""
        return (
            f"Message({self.type.name}, control={self.control}, parameter=0x{self.parameter:08X}, "
            f"payload={shown!r}{more} [{len(self.payload)}])"
        )


def _vendor_bits(vendor: str) -> int:
    raw = vendor.encode("ascii", errors="strict") if vendor.isascii() else b""
    if len(raw) != 2:
        raise LocalProtocolError(f"HiSLIP vendor id must be two ASCII characters, got {vendor!r}")
    return (raw[0] << 8) | raw[1]


def vendor_text(bits: int) -> str:
    return bytes([(bits >> 8) & 0xFF, bits & 0xFF]).decode("latin-1")


def _ascii(text: str, what: str, limit: int) -> bytes:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{what} {text!r} must be ASCII") from None
    if len(raw) > limit:
        raise LocalProtocolError(f"{what} is {len(raw)} characters; HiSLIP allows at most {limit}")
    return raw


def _check_id(message_id: int) -> int:
    if not 0 <= message_id < MESSAGE_ID_MODULUS:
        raise LocalProtocolError(f"MessageID {message_id} does not fit in 32 bits")
    return message_id


def next_message_id(message_id: int) -> int:
    return (message_id + 2) % MESSAGE_ID_MODULUS


def id_reached(last: int, target: int) -> bool:
    """True if `target` is `last` or older, in the wrapping MessageID sequence (serial-number arithmetic)."""
    return (last - target) % MESSAGE_ID_MODULUS < (1 << 31)


# --- constructors, one per message type (sender's view) ----------------------------------------------
def initialize(sub_address: str, vendor: str = VENDOR_ID, version: int = PROTOCOL_VERSION) -> Message:
    return Message(
        MessageType.INITIALIZE, 0, (version << 16) | _vendor_bits(vendor),
        _ascii(sub_address, "sub-address", MAX_SUB_ADDRESS),
    )


def initialize_response(session_id: int, overlapped: bool, version: int = PROTOCOL_VERSION) -> Message:
    if not 0 <= session_id <= 0xFFFF:
        raise LocalProtocolError(f"SessionID {session_id} does not fit in 16 bits")
    return Message(MessageType.INITIALIZE_RESPONSE, int(overlapped), (version << 16) | session_id)


def fatal_error(code: int, text: str = "") -> Message:
    return Message(MessageType.FATAL_ERROR, int(code), 0, text.encode("ascii", errors="replace")[:MAX_TEXT])


def error(code: int, text: str = "") -> Message:
    return Message(MessageType.ERROR, int(code), 0, text.encode("ascii", errors="replace")[:MAX_TEXT])


def async_lock_request(timeout_ms: int, key: str = "") -> Message:
    """Exclusive lock when `key` is empty, shared lock with that key otherwise."""
    return Message(MessageType.ASYNC_LOCK, 1, max(0, min(timeout_ms, 0xFFFFFFFF)), _ascii(key, "lock key", MAX_TEXT))


def async_lock_release(last_message_id: int) -> Message:
    return Message(MessageType.ASYNC_LOCK, 0, _check_id(last_message_id))


def async_lock_response(result: LockResult) -> Message:
    return Message(MessageType.ASYNC_LOCK_RESPONSE, int(result))


def data(message_id: int, payload: Payload, rmt_delivered: bool = False) -> Message:
    return Message(MessageType.DATA, int(rmt_delivered), _check_id(message_id), payload)


def data_end(message_id: int, payload: Payload, rmt_delivered: bool = False) -> Message:
    return Message(MessageType.DATA_END, int(rmt_delivered), _check_id(message_id), payload)


def device_clear_complete(overlapped: bool) -> Message:
    return Message(MessageType.DEVICE_CLEAR_COMPLETE, int(overlapped))


def device_clear_acknowledge(overlapped: bool) -> Message:
    return Message(MessageType.DEVICE_CLEAR_ACKNOWLEDGE, int(overlapped))


def async_remote_local_control(request: RemoteLocal, last_message_id: int) -> Message:
    return Message(MessageType.ASYNC_REMOTE_LOCAL_CONTROL, int(request), _check_id(last_message_id))


def async_remote_local_response() -> Message:
    return Message(MessageType.ASYNC_REMOTE_LOCAL_RESPONSE)


def trigger(message_id: int, rmt_delivered: bool = False) -> Message:
    return Message(MessageType.TRIGGER, int(rmt_delivered), _check_id(message_id))


def interrupted(message_id: int) -> Message:
    return Message(MessageType.INTERRUPTED, 0, _check_id(message_id))


def async_interrupted(message_id: int) -> Message:
    return Message(MessageType.ASYNC_INTERRUPTED, 0, _check_id(message_id))


def async_maximum_message_size(size: int) -> Message:
    return Message(MessageType.ASYNC_MAXIMUM_MESSAGE_SIZE, 0, 0, struct.pack("!Q", size))


def async_maximum_message_size_response(size: int) -> Message:
    return Message(MessageType.ASYNC_MAXIMUM_MESSAGE_SIZE_RESPONSE, 0, 0, struct.pack("!Q", size))


def async_initialize(session_id: int) -> Message:
    return Message(MessageType.ASYNC_INITIALIZE, 0, session_id & 0xFFFF)


def async_initialize_response(vendor: str = VENDOR_ID) -> Message:
    return Message(MessageType.ASYNC_INITIALIZE_RESPONSE, 0, _vendor_bits(vendor))


def async_device_clear() -> Message:
    return Message(MessageType.ASYNC_DEVICE_CLEAR)


def async_service_request(status_byte: int) -> Message:
    return Message(MessageType.ASYNC_SERVICE_REQUEST, status_byte & 0xFF)


def async_status_query(message_id: int, rmt_delivered: bool = False) -> Message:
    return Message(MessageType.ASYNC_STATUS_QUERY, int(rmt_delivered), _check_id(message_id))


def async_status_response(status_byte: int) -> Message:
    return Message(MessageType.ASYNC_STATUS_RESPONSE, status_byte & 0xFF)


def async_device_clear_acknowledge(overlapped: bool) -> Message:
    return Message(MessageType.ASYNC_DEVICE_CLEAR_ACKNOWLEDGE, int(overlapped))


def async_lock_info() -> Message:
    return Message(MessageType.ASYNC_LOCK_INFO)


def async_lock_info_response(exclusive_granted: bool, holders: int) -> Message:
    return Message(MessageType.ASYNC_LOCK_INFO_RESPONSE, int(exclusive_granted), holders)


# ------------------------------------------------------------------------------------------ reader
class HislipReader:
    """Incremental parser: `feed(bytes)`, then iterate `messages()` (or call `next_message()`).

    `max_payload` bounds every payload this reader accepts (the negotiated maximum message size): a
    larger announced length raises PayloadTooLarge before anything is allocated. A message of an unknown
    or vendor-specific type is skipped (payload included) and reported by raising UnrecognizedMessage;
    parsing can continue afterwards. Any HislipFormatError leaves the reader unusable.
    """

    def __init__(self, max_payload: int = CONTROL_PAYLOAD_LIMIT) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._start = 0
        self._broken: HislipFormatError | None = None

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as messages."""
        return len(self._buffer) - self._start

    def peek(self, n: int) -> bytes:
        """Up to `n` buffered bytes, not consumed (e.g. the header of a message that is waiting)."""
        return bytes(self._buffer[self._start : self._start + n])

    def feed(self, data: Payload) -> None:
        if self._start and self._start >= len(self._buffer) // 2:
            del self._buffer[: self._start]  # compact: amortised O(1) per byte, never quadratic
            self._start = 0
        self._buffer += data

    def next_message(self) -> Message | None:
        """The next complete message, or None if more bytes are needed."""
        if self._broken is not None:
            raise self._broken
        if self.buffered < HEADER_SIZE:
            return None
        try:
            header = decode_header(self._buffer[self._start : self._start + HEADER_SIZE], self.max_payload)
        except HislipFormatError as exc:
            self._broken = exc
            raise
        end = self._start + HEADER_SIZE + header.length
        if end > len(self._buffer):
            return None
        with memoryview(self._buffer) as view:
            payload = bytes(view[self._start + HEADER_SIZE : end])
        self._start = end
        return Message(header.message_type(), header.control, header.parameter, payload)

    def messages(self) -> Iterator[Message]:
        """Yield every complete buffered message (raises as next_message does)."""
        while (message := self.next_message()) is not None:
            yield message

"""ONC RPC v2 (RFC 5531) and XDR (RFC 4506), sans-IO: bytes in, objects out.

What VXI-11 and the portmapper need, and no more:

* `XdrPacker` / `XdrUnpacker` — int, uint, bool, enum, fixed and variable opaque (with a maximum
  length), string. Large opaque payloads are kept by reference (`get_parts()`), so a 64 MiB
  device_read reply or device_write call is never copied just to be framed.
* Record marking for stream transports — `record_mark`, `parse_record_mark`, `frame_record`,
  `frame_parts` (zero-copy, multi-fragment out) and `RecordReader` (feed bytes, get whole records,
  multi-fragment in, bounded by a configurable maximum record size).
* Call and reply messages with AUTH_NONE credentials — `encode_call`, `decode_call`,
  `encode_reply`, `encode_denied_reply`, `decode_reply`.

Every length a peer announces is checked against what is present and against a limit before it
is used, so a peer announcing 2 GiB gets a `RemoteProtocolError`, never an allocation. Replies may
carry trailing padding (an ICS 8065 gateway pads them); decoders of results decide whether to
tolerate it (`XdrUnpacker.done(allow_trailing=True)`).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import LocalProtocolError, RemoteProtocolError

Buffer = bytes | bytearray | memoryview

RPC_VERSION = 2
LAST_FRAGMENT = 0x80000000
MAX_FRAGMENT = 0x7FFFFFFF
DEFAULT_MAX_RECORD_SIZE = 8 << 20
MAX_AUTH_BODY = 400  # RFC 5531: opaque_auth body<400>
CALL_HEADER_SIZE = 40  # with AUTH_NONE credentials and verifier
REPLY_HEADER_SIZE = 24  # accepted reply with an AUTH_NONE verifier, up to and including accept_stat

_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_CALL_HEAD = struct.Struct(">IIIIIIIIII")  # xid CALL 2 prog vers proc cred(0,0) verf(0,0)
_REPLY_HEAD = struct.Struct(">IIIIII")  # xid REPLY ACCEPTED verf(0,0) accept_stat
_ZEROS = b"\x00\x00\x00"


class MsgType(enum.IntEnum):
    CALL = 0
    REPLY = 1


class ReplyStat(enum.IntEnum):
    MSG_ACCEPTED = 0
    MSG_DENIED = 1


class AcceptStat(enum.IntEnum):
    SUCCESS = 0
    PROG_UNAVAIL = 1
    PROG_MISMATCH = 2
    PROC_UNAVAIL = 3
    GARBAGE_ARGS = 4
    SYSTEM_ERR = 5


class RejectStat(enum.IntEnum):
    RPC_MISMATCH = 0
    AUTH_ERROR = 1


class AuthFlavor(enum.IntEnum):
    AUTH_NONE = 0
    AUTH_SYS = 1
    AUTH_SHORT = 2
    AUTH_DH = 3


def pad_length(n: int) -> int:
    """Zero bytes that follow `n` bytes of opaque data to reach a 4-byte boundary."""
    return -n % 4


def _byte_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    return view if view.format in ("B", "b", "c") and view.ndim == 1 else view.cast("B")


# ---------------------------------------------------------------------------------------------- XDR
class XdrPacker:
    """Builds an XDR byte string. Opaque bodies of `BIG` bytes or more are kept by reference."""

    BIG = 16 * 1024
    __slots__ = ("_buf", "_parts")

    def __init__(self) -> None:
        self._parts: list[Buffer] = []
        self._buf = bytearray()

    def pack_uint(self, value: int, what: str = "uint") -> None:
        if not 0 <= value <= 0xFFFFFFFF:
            raise LocalProtocolError(f"XDR {what}: {value} does not fit an unsigned 32-bit integer")
        self._buf += _U32.pack(value)

    def pack_int(self, value: int, what: str = "int") -> None:
        if not -0x80000000 <= value <= 0x7FFFFFFF:
            raise LocalProtocolError(f"XDR {what}: {value} does not fit a signed 32-bit integer")
        self._buf += _I32.pack(value)

    def pack_enum(self, value: int, what: str = "enum") -> None:
        self.pack_int(int(value), what)

    def pack_bool(self, value: bool | int, what: str = "bool") -> None:
        if value not in (0, 1):  # True/False compare equal to 1/0
            raise LocalProtocolError(f"XDR {what}: {value!r} is not a boolean")
        self._buf += _U32.pack(1 if value else 0)

    def pack_opaque_fixed(self, data: Buffer, size: int, what: str = "opaque") -> None:
        view = _byte_view(data)
        if len(view) != size:
            raise LocalProtocolError(f"XDR {what}: fixed opaque needs exactly {size} bytes, got {len(view)}")
        self._append_body(view)

    def pack_opaque(self, data: Buffer, max_length: int | None = None, what: str = "opaque") -> None:
        view = _byte_view(data)
        if max_length is not None and len(view) > max_length:
            raise LocalProtocolError(f"XDR {what}: {len(view)} bytes exceed the maximum of {max_length}")
        self.pack_uint(len(view), what)
        self._append_body(view)

    def pack_string(self, text: str | Buffer, max_length: int | None = None, what: str = "string") -> None:
        if isinstance(text, str):
            try:
                text = text.encode("ascii")
            except UnicodeEncodeError:
                raise LocalProtocolError(f"XDR {what}: {text!r} is not ASCII") from None
        self.pack_opaque(text, max_length, what)

    def _append_body(self, view: memoryview) -> None:
        if len(view) >= self.BIG:
            if self._buf:
                self._parts.append(bytes(self._buf))
                self._buf = bytearray()
            self._parts.append(view)
        else:
            self._buf += view
        self._buf += _ZEROS[: pad_length(len(view))]

    def get_parts(self) -> list[Buffer]:
        """The packed bytes as a list of buffers (for `frame_parts` / scatter sends)."""
        return [*self._parts, bytes(self._buf)] if self._buf else list(self._parts)

    def get_buffer(self) -> bytes:
        return b"".join(self.get_parts())

    def __len__(self) -> int:
        return sum(len(p) for p in self._parts) + len(self._buf)


class XdrUnpacker:
    """Reads XDR items from a buffer; every read is bounds-checked against the bytes present."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: Buffer, offset: int = 0) -> None:
        self._data = _byte_view(data)
        self._pos = offset

    @property
    def position(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def _need(self, n: int, what: str) -> int:
        pos = self._pos
        if n > len(self._data) - pos:
            raise RemoteProtocolError(
                f"XDR {what}: truncated, need {n} bytes at offset {pos}, only {len(self._data) - pos} left"
            )
        self._pos = pos + n
        return pos

    def unpack_uint(self, what: str = "uint") -> int:
        value: int = _U32.unpack_from(self._data, self._need(4, what))[0]
        return value

    def unpack_int(self, what: str = "int") -> int:
        value: int = _I32.unpack_from(self._data, self._need(4, what))[0]
        return value

    def unpack_enum(self, what: str = "enum") -> int:
        return self.unpack_int(what)

    def unpack_bool(self, what: str = "bool") -> bool:
        value = self.unpack_uint(what)
        if value > 1:
            raise RemoteProtocolError(f"XDR {what}: {value} is not a boolean (0 or 1)")
        return value == 1

    def unpack_opaque_fixed(self, size: int, what: str = "opaque") -> bytes:
        start = self._need(size + pad_length(size), what)
        return bytes(self._data[start : start + size])

    def unpack_opaque_view(self, max_length: int | None = None, what: str = "opaque") -> memoryview:
        """Variable-length opaque as a zero-copy view into the input buffer."""
        length = self.unpack_uint(what + " length")
        if max_length is not None and length > max_length:
            raise RemoteProtocolError(f"XDR {what}: announces {length} bytes, the maximum is {max_length}")
        if length > self.remaining:
            raise RemoteProtocolError(f"XDR {what}: announces {length} bytes, only {self.remaining} left")
        if length + pad_length(length) > self.remaining:
            raise RemoteProtocolError(f"XDR {what}: the padding after its {length} bytes is missing")
        start = self._pos
        self._pos += length + pad_length(length)
        return self._data[start : start + length]

    def unpack_opaque(self, max_length: int | None = None, what: str = "opaque") -> bytes:
        return bytes(self.unpack_opaque_view(max_length, what))

    def unpack_string(self, max_length: int | None = None, what: str = "string") -> bytes:
        return self.unpack_opaque(max_length, what)

    def rest(self) -> memoryview:
        """Everything not read yet (consumes it)."""
        view = self._data[self._pos :]
        self._pos = len(self._data)
        return view

    def done(self, *, allow_trailing: bool = False, what: str = "message") -> None:
        """Check that everything was consumed; `allow_trailing` tolerates padding after the data."""
        if self.remaining and not allow_trailing:
            raise RemoteProtocolError(f"{what}: {self.remaining} unexpected bytes after the last field")


# --------------------------------------------------------------------------------- record marking
def record_mark(length: int, last: bool = True) -> bytes:
    if not 0 <= length <= MAX_FRAGMENT:
        raise LocalProtocolError(f"RPC fragment of {length} bytes cannot be record-marked (max {MAX_FRAGMENT})")
    return _U32.pack(length | (LAST_FRAGMENT if last else 0))


def parse_record_mark(mark: Buffer) -> tuple[int, bool]:
    """(fragment length, is last fragment) from a 4-byte record mark."""
    if len(mark) != 4:
        raise RemoteProtocolError(f"RPC record mark must be 4 bytes, got {len(mark)}")
    value: int = _U32.unpack(mark)[0]
    return value & MAX_FRAGMENT, bool(value & LAST_FRAGMENT)


def frame_parts(parts: Sequence[Buffer], max_fragment: int = MAX_FRAGMENT) -> list[Buffer]:
    """Record-mark a message given as buffers, splitting into fragments of at most `max_fragment`
    bytes; payload buffers are sliced, never copied."""
    if not 1 <= max_fragment <= MAX_FRAGMENT:
        raise LocalProtocolError(f"max_fragment must be 1..{MAX_FRAGMENT}, got {max_fragment}")
    views = [_byte_view(p) for p in parts if len(p)]
    remaining = sum(len(v) for v in views)
    out: list[Buffer] = []
    if remaining == 0:
        return [record_mark(0, True)]
    index, offset = 0, 0
    while remaining:
        size = min(max_fragment, remaining)
        remaining -= size
        out.append(record_mark(size, remaining == 0))
        while size:
            view = views[index]
            take = min(size, len(view) - offset)
            out.append(view if offset == 0 and take == len(view) else view[offset : offset + take])
            size -= take
            offset += take
            if offset == len(view):
                index, offset = index + 1, 0
    return out


def frame_record(payload: Buffer, max_fragment: int = MAX_FRAGMENT) -> bytes:
    """One record-marked message (several fragments when it is longer than `max_fragment`)."""
    return b"".join(frame_parts([payload], max_fragment))


class RecordReader:
    """Reassembles RPC records from a byte stream fed in arbitrary pieces.

    After a `RemoteProtocolError` the stream is out of step; the caller must drop the connection.
    """

    def __init__(self, max_record_size: int = DEFAULT_MAX_RECORD_SIZE) -> None:
        self.max_record_size = max_record_size
        self._buf = bytearray()
        self._record = bytearray()  # completed fragments of the record in progress
        self._frag_need: int | None = None  # length of the fragment being received
        self._frag_last = False
        self._failed: RemoteProtocolError | None = None

    def feed(self, data: Buffer) -> list[bytes]:
        """Add stream bytes; return the records they complete (possibly none)."""
        if self._failed is not None:
            raise self._failed
        buf = self._buf
        buf += data
        pos, records = 0, []
        while True:
            if self._frag_need is None:
                if len(buf) - pos < 4:
                    break
                length, last = parse_record_mark(buf[pos : pos + 4])
                if len(self._record) + length > self.max_record_size:
                    self._failed = RemoteProtocolError(
                        f"RPC record of at least {len(self._record) + length} bytes exceeds the "
                        f"{self.max_record_size}-byte limit"
                    )
                    raise self._failed
                self._frag_need, self._frag_last = length, last
                pos += 4
            need = self._frag_need
            if len(buf) - pos < need:
                break
            if self._frag_last and not self._record:
                records.append(bytes(buf[pos : pos + need]))
            else:
                self._record += buf[pos : pos + need]
                if self._frag_last:
                    records.append(bytes(self._record))
                    self._record = bytearray()
            pos += need
            self._frag_need = None
        del buf[:pos]
        return records

    @property
    def in_record(self) -> bool:
        """True while part of a record has arrived but not all of it."""
        return bool(self._record or self._buf or self._frag_need is not None)

    def partial(self) -> bytes:
        """The bytes of the unfinished record received so far (for lenient peers, see portmapper)."""
        tail = self._buf if self._frag_need is not None else b""
        return bytes(self._record) + bytes(tail[: self._frag_need])

    def reset(self) -> None:
        """Forget the record in progress (after taking it via `partial()`)."""
        self._buf = bytearray()
        self._record = bytearray()
        self._frag_need = None
        self._failed = None


# ------------------------------------------------------------------------------- calls and replies
@dataclass(frozen=True)
class OpaqueAuth:
    flavor: int = AuthFlavor.AUTH_NONE
    body: bytes = b""


AUTH_NONE = OpaqueAuth()


@dataclass(frozen=True)
class Call:
    xid: int
    prog: int
    vers: int
    proc: int
    args: Buffer = b""
    cred: OpaqueAuth = AUTH_NONE
    verf: OpaqueAuth = AUTH_NONE

    def unpacker(self) -> XdrUnpacker:
        return XdrUnpacker(self.args)


@dataclass(frozen=True)
class Reply:
    xid: int
    reply_stat: ReplyStat
    accept_stat: AcceptStat | None = None
    reject_stat: RejectStat | None = None
    auth_stat: int | None = None
    mismatch: tuple[int, int] | None = None  # (low, high) for PROG_MISMATCH / RPC_MISMATCH
    verf: OpaqueAuth = AUTH_NONE
    results: Buffer = b""

    @property
    def ok(self) -> bool:
        return self.reply_stat is ReplyStat.MSG_ACCEPTED and self.accept_stat is AcceptStat.SUCCESS

    def describe(self) -> str:
        if self.ok:
            return "success"
        if self.reply_stat is ReplyStat.MSG_ACCEPTED:
            name = self.accept_stat.name if self.accept_stat is not None else "?"
            extra = f" (server supports versions {self.mismatch[0]}..{self.mismatch[1]})" if self.mismatch else ""
            return f"call not executed: {name}{extra}"
        if self.reject_stat is RejectStat.RPC_MISMATCH:
            return f"call denied: RPC_MISMATCH (server speaks RPC {self.mismatch})"
        return f"call denied: AUTH_ERROR (auth_stat {self.auth_stat})"

    def check(self) -> XdrUnpacker:
        """Unpacker over the results of a successful reply; RpcCallFailed otherwise."""
        if not self.ok:
            raise RpcCallFailed(self)
        return XdrUnpacker(self.results)


class RpcCallFailed(RemoteProtocolError):
    """The server answered, but did not run the procedure (PROG_UNAVAIL, GARBAGE_ARGS, denied...)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"RPC xid {reply.xid}: {reply.describe()}")
        self.reply = reply


class RpcVersionError(RemoteProtocolError):
    """A CALL asked for an RPC version other than 2; the server answers MSG_DENIED / RPC_MISMATCH."""

    def __init__(self, xid: int, version: int) -> None:
        super().__init__(f"RPC xid {xid}: RPC version {version} is not supported (only 2)")
        self.xid = xid


def encode_call_parts(xid: int, prog: int, vers: int, proc: int, args: Sequence[Buffer] = ()) -> list[Buffer]:
    """A CALL with AUTH_NONE credentials; `args` are appended by reference."""
    for name, value in (("xid", xid), ("prog", prog), ("vers", vers), ("proc", proc)):
        if not 0 <= value <= 0xFFFFFFFF:
            raise LocalProtocolError(f"RPC call {name} {value} does not fit an unsigned 32-bit integer")
    head = _CALL_HEAD.pack(xid, MsgType.CALL, RPC_VERSION, prog, vers, proc, 0, 0, 0, 0)
    return [head, *args]


def encode_call(xid: int, prog: int, vers: int, proc: int, args: Buffer = b"") -> bytes:
    return b"".join(encode_call_parts(xid, prog, vers, proc, [args]))


def _unpack_auth(unpacker: XdrUnpacker, what: str) -> OpaqueAuth:
    flavor = unpacker.unpack_enum(what + " flavor")
    body = unpacker.unpack_opaque(MAX_AUTH_BODY, what + " body")
    return OpaqueAuth(flavor, body)


def peek_message(data: Buffer) -> tuple[int, MsgType]:
    """(xid, message type) of an RPC message."""
    unpacker = XdrUnpacker(data)
    xid = unpacker.unpack_uint("xid")
    msg_type = unpacker.unpack_enum("msg_type")
    if msg_type not in (MsgType.CALL, MsgType.REPLY):
        raise RemoteProtocolError(f"RPC xid {xid}: message type {msg_type} is neither CALL (0) nor REPLY (1)")
    return xid, MsgType(msg_type)


def decode_call(data: Buffer) -> Call:
    xid, msg_type = peek_message(data)
    if msg_type is not MsgType.CALL:
        raise RemoteProtocolError(f"RPC xid {xid}: expected a CALL, got a REPLY")
    unpacker = XdrUnpacker(data, 8)
    rpcvers = unpacker.unpack_uint("rpcvers")
    if rpcvers != RPC_VERSION:
        raise RpcVersionError(xid, rpcvers)
    prog = unpacker.unpack_uint("prog")
    vers = unpacker.unpack_uint("vers")
    proc = unpacker.unpack_uint("proc")
    cred = _unpack_auth(unpacker, "credential")
    verf = _unpack_auth(unpacker, "verifier")
    return Call(xid, prog, vers, proc, unpacker.rest(), cred, verf)


def encode_reply_parts(xid: int, results: Sequence[Buffer] = (), *, accept_stat: AcceptStat = AcceptStat.SUCCESS,
                       mismatch: tuple[int, int] | None = None) -> list[Buffer]:
    """An accepted reply with an AUTH_NONE verifier; `results` only follow SUCCESS."""
    head = _REPLY_HEAD.pack(xid, MsgType.REPLY, ReplyStat.MSG_ACCEPTED, 0, 0, accept_stat)
    if accept_stat is AcceptStat.PROG_MISMATCH:
        if mismatch is None:
            raise LocalProtocolError("PROG_MISMATCH replies carry the supported (low, high) versions")
        return [head + struct.pack(">II", *mismatch)]
    if accept_stat is not AcceptStat.SUCCESS:
        return [head]
    return [head, *results]


def encode_reply(xid: int, results: Buffer = b"", *, accept_stat: AcceptStat = AcceptStat.SUCCESS,
                 mismatch: tuple[int, int] | None = None) -> bytes:
    return b"".join(encode_reply_parts(xid, [results], accept_stat=accept_stat, mismatch=mismatch))


def encode_denied_reply(xid: int, reject_stat: RejectStat, *, mismatch: tuple[int, int] = (2, 2),
                        auth_stat: int = 1) -> bytes:
    head = struct.pack(">IIII", xid, MsgType.REPLY, ReplyStat.MSG_DENIED, reject_stat)
    if reject_stat is RejectStat.RPC_MISMATCH:
        return head + struct.pack(">II", *mismatch)
    return head + _U32.pack(auth_stat)


def decode_reply(data: Buffer) -> Reply:
    """Decode a REPLY. `results` is a view of everything after the header (trailing padding included)."""
    xid, msg_type = peek_message(data)
    if msg_type is not MsgType.REPLY:
        raise RemoteProtocolError(f"RPC xid {xid}: expected a REPLY, got a CALL")
    unpacker = XdrUnpacker(data, 8)
    stat = unpacker.unpack_enum("reply_stat")
    if stat == ReplyStat.MSG_DENIED:
        reject = unpacker.unpack_enum("reject_stat")
        if reject == RejectStat.RPC_MISMATCH:
            low, high = unpacker.unpack_uint("low version"), unpacker.unpack_uint("high version")
            return Reply(xid, ReplyStat.MSG_DENIED, reject_stat=RejectStat.RPC_MISMATCH, mismatch=(low, high))
        if reject == RejectStat.AUTH_ERROR:
            auth_stat = unpacker.unpack_enum("auth_stat")
            return Reply(xid, ReplyStat.MSG_DENIED, reject_stat=RejectStat.AUTH_ERROR, auth_stat=auth_stat)
        raise RemoteProtocolError(f"RPC xid {xid}: unknown reject_stat {reject}")
    if stat != ReplyStat.MSG_ACCEPTED:
        raise RemoteProtocolError(f"RPC xid {xid}: unknown reply_stat {stat}")
    verf = _unpack_auth(unpacker, "verifier")
    accept = unpacker.unpack_enum("accept_stat")
    try:
        accept_stat = AcceptStat(accept)
    except ValueError:
        raise RemoteProtocolError(f"RPC xid {xid}: unknown accept_stat {accept}") from None
    if accept_stat is AcceptStat.PROG_MISMATCH:
        mismatch = (unpacker.unpack_uint("low version"), unpacker.unpack_uint("high version"))
        return Reply(xid, ReplyStat.MSG_ACCEPTED, accept_stat, mismatch=mismatch, verf=verf)
    results = unpacker.rest() if accept_stat is AcceptStat.SUCCESS else b""
    return Reply(xid, ReplyStat.MSG_ACCEPTED, accept_stat, verf=verf, results=results)


def is_plain_success_head(head: Buffer, xid: int | None = None) -> bool:
    """True if `head` (the first 24 bytes of a reply) is an accepted SUCCESS with an empty verifier.

    Lets a transport decide to receive the results of a large reply straight into a caller's
    buffer; anything else goes through `decode_reply` for a precise answer.
    """
    if len(head) < REPLY_HEADER_SIZE:
        return False
    rxid, mtype, stat, _flavor, vlen, accept = _REPLY_HEAD.unpack_from(head)  # any flavor, empty body
    return (xid is None or rxid == xid) and (mtype, stat, vlen, accept) == (1, 0, 0, 0)

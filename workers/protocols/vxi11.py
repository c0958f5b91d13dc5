"""VXI-11 (TCP/IP Instrument Protocol) codec, sans-IO: the RPC programs, procedures, argument and
result structures, flags, read reasons, error codes, and how each error maps to a VISA status.

Every structure is a frozen dataclass whose XDR layout is the data table `_xdr` (field, kind,
max length) in wire order, so one generic `encode()` / `decode()` serves client and server:

    CreateLinkParms(client_id=1, lock_device=False, lock_timeout=0, device=b"inst0").encode()
    DeviceReadResp.decode(results, allow_trailing=True).data     # a zero-copy memoryview

Kinds: "int" (signed 32), "uint", "bool", "opaque" (variable, copied to bytes) and "view"
(variable opaque kept as a memoryview of the input, for bulk data).

Error mapping (`visa_status`), decided from the VXI-11 spec, where PyVISA-py 0.8.1 guessed:

* 11 device_locked_by_another_link: from device_lock *with* waitlock it means "the lock did not
  come free within lock_timeout" -> VI_ERROR_TMO (what viLock reports when its timeout expires);
  everywhere else (device_lock without waitlock, or any I/O call meeting another link's lock)
  -> VI_ERROR_RSRC_LOCKED.
* 1 syntax error, 3 device not accessible, 21 invalid address: only create_link produces them;
  the named device does not exist -> VI_ERROR_RSRC_NFOUND (PyVISA-py: INV_FMT / CONN_LOST /
  KeyError).
* 4 invalid link identifier: the server no longer knows our link (it restarted or dropped it)
  -> VI_ERROR_CONN_LOST, so the worker reconnects (PyVISA-py: INV_ACCESS_KEY).
* 6 channel not established (create_intr_chan could not connect back) -> VI_ERROR_IO;
  29 channel already established -> VI_ERROR_RSRC_BUSY (PyVISA-py: HNDLR_NINSTALLED /
  WINDOW_MAPPED).
* 5 -> INV_PARAMETER, 8 -> NSUP_OPER, 9 -> ALLOC, 12 -> SESN_NLOCKED, 15 -> TMO, 17 -> IO,
  23 -> ABORT; reserved or unknown codes -> VI_ERROR_IO naming the code.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self

from visabus.sdk.errors import StatusCode, VisaBusError, error_from_status

from . import rpc
from .errors import RemoteProtocolError

DEVICE_CORE_PROG = 0x0607AF  # 395183
DEVICE_ASYNC_PROG = 0x0607B0  # 395184, the abort channel
DEVICE_INTR_PROG = 0x0607B1  # 395185, the interrupt channel (instrument -> controller)
DEVICE_CORE_VERS = DEVICE_ASYNC_VERS = DEVICE_INTR_VERS = 1
DEVICE_TCP = 0
DEVICE_UDP = 1

MIN_MAX_RECV_SIZE = 1024  # RULE B.6.3; some old firmware reports 0 anyway
FALLBACK_MAX_RECV_SIZE = 4096  # what liblxi uses when a server reports less than the minimum
MAX_HANDLE = 40  # device_enable_srq handle<40>
MAX_SRQ_HANDLE = 1024  # device_intr_srq's handle is unbounded in the RPCL; be lenient, not unbounded
MAX_DEVICE_NAME = 256  # RPCL leaves `device` unbounded; no real name is longer
INFINITE_TIMEOUT_MS = 0xFFFFFFFF


class Proc(enum.IntEnum):
    CREATE_LINK = 10
    DEVICE_WRITE = 11
    DEVICE_READ = 12
    DEVICE_READSTB = 13
    DEVICE_TRIGGER = 14
    DEVICE_CLEAR = 15
    DEVICE_REMOTE = 16
    DEVICE_LOCAL = 17
    DEVICE_LOCK = 18
    DEVICE_UNLOCK = 19
    DEVICE_ENABLE_SRQ = 20
    DEVICE_DOCMD = 22
    DESTROY_LINK = 23
    CREATE_INTR_CHAN = 25
    DESTROY_INTR_CHAN = 26
    DEVICE_ABORT = 1  # abort program
    DEVICE_INTR_SRQ = 30  # interrupt program


class OpFlag(enum.IntFlag):
    WAITLOCK = 0x01
    END = 0x08
    TERMCHRSET = 0x80


class ReadReason(enum.IntFlag):
    REQCNT = 0x01
    CHR = 0x02
    END = 0x04


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0
    SYNTAX_ERROR = 1
    DEVICE_NOT_ACCESSIBLE = 3
    INVALID_LINK_IDENTIFIER = 4
    PARAMETER_ERROR = 5
    CHANNEL_NOT_ESTABLISHED = 6
    OPERATION_NOT_SUPPORTED = 8
    OUT_OF_RESOURCES = 9
    DEVICE_LOCKED_BY_ANOTHER_LINK = 11
    NO_LOCK_HELD_BY_THIS_LINK = 12
    IO_TIMEOUT = 15
    IO_ERROR = 17
    INVALID_ADDRESS = 21
    ABORT = 23
    CHANNEL_ALREADY_ESTABLISHED = 29


# ------------------------------------------------------------------------------------ structures
_Field = tuple[str, str, int | None]


class _Struct:
    """Generic XDR encode/decode driven by the subclass's `_xdr` table."""

    _xdr: ClassVar[tuple[_Field, ...]]

    def pack(self, packer: rpc.XdrPacker) -> None:
        name = type(self).__name__
        for field, kind, limit in self._xdr:
            value = getattr(self, field)
            what = f"{name}.{field}"
            if kind == "int":
                packer.pack_int(value, what)
            elif kind == "uint":
                packer.pack_uint(value, what)
            elif kind == "bool":
                packer.pack_bool(value, what)
            else:
                packer.pack_opaque(value, limit, what)

    def encode_parts(self) -> list[rpc.Buffer]:
        packer = rpc.XdrPacker()
        self.pack(packer)
        return packer.get_parts()

    def encode(self) -> bytes:
        return b"".join(self.encode_parts())

    @classmethod
    def unpack(cls, unpacker: rpc.XdrUnpacker) -> Self:
        values: dict[str, Any] = {}
        for field, kind, limit in cls._xdr:
            what = f"{cls.__name__}.{field}"
            if kind == "int":
                values[field] = unpacker.unpack_int(what)
            elif kind == "uint":
                values[field] = unpacker.unpack_uint(what)
            elif kind == "bool":
                values[field] = unpacker.unpack_bool(what)
            elif kind == "view":
                values[field] = unpacker.unpack_opaque_view(limit, what)
            else:
                values[field] = unpacker.unpack_opaque(limit, what)
        return cls(**values)

    @classmethod
    def decode(cls, data: rpc.Buffer, *, allow_trailing: bool = False) -> Self:
        """Decode exactly one structure; `allow_trailing` tolerates padding after it (replies)."""
        unpacker = rpc.XdrUnpacker(data)
        value = cls.unpack(unpacker)
        unpacker.done(allow_trailing=allow_trailing, what=cls.__name__)
        return value

    def __repr__(self) -> str:  # bulk data would flood logs
        parts = []
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, bytes | bytearray | memoryview) and len(value) > 48:
                value = f"<{len(value)} bytes>"
            parts.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


@dataclass(frozen=True, repr=False)
class CreateLinkParms(_Struct):
    client_id: int
    lock_device: bool
    lock_timeout: int
    device: bytes
    _xdr = (("client_id", "int", None), ("lock_device", "bool", None), ("lock_timeout", "uint", None),
            ("device", "opaque", MAX_DEVICE_NAME))


@dataclass(frozen=True, repr=False)
class CreateLinkResp(_Struct):
    error: int
    lid: int
    abort_port: int
    max_recv_size: int
    _xdr = (("error", "int", None), ("lid", "int", None), ("abort_port", "uint", None),
            ("max_recv_size", "uint", None))


@dataclass(frozen=True, repr=False)
class DeviceWriteParms(_Struct):
    lid: int
    io_timeout: int
    lock_timeout: int
    flags: int
    data: rpc.Buffer
    _xdr = (("lid", "int", None), ("io_timeout", "uint", None), ("lock_timeout", "uint", None),
            ("flags", "int", None), ("data", "view", None))


@dataclass(frozen=True, repr=False)
class DeviceWriteResp(_Struct):
    error: int
    size: int
    _xdr = (("error", "int", None), ("size", "uint", None))


@dataclass(frozen=True, repr=False)
class DeviceReadParms(_Struct):
    lid: int
    request_size: int
    io_timeout: int
    lock_timeout: int
    flags: int
    term_char: int
    _xdr = (("lid", "int", None), ("request_size", "uint", None), ("io_timeout", "uint", None),
            ("lock_timeout", "uint", None), ("flags", "int", None), ("term_char", "int", None))


@dataclass(frozen=True, repr=False)
class DeviceReadResp(_Struct):
    error: int
    reason: int
    data: rpc.Buffer
    _xdr = (("error", "int", None), ("reason", "int", None), ("data", "view", None))


@dataclass(frozen=True, repr=False)
class DeviceGenericParms(_Struct):
    """procs 13-17. Note the order: lock_timeout before io_timeout (unlike write/read)."""

    lid: int
    flags: int
    lock_timeout: int
    io_timeout: int
    _xdr = (("lid", "int", None), ("flags", "int", None), ("lock_timeout", "uint", None),
            ("io_timeout", "uint", None))


@dataclass(frozen=True, repr=False)
class DeviceReadStbResp(_Struct):
    error: int
    stb: int
    _xdr = (("error", "int", None), ("stb", "uint", None))


@dataclass(frozen=True, repr=False)
class DeviceError(_Struct):
    error: int
    _xdr = (("error", "int", None),)


@dataclass(frozen=True, repr=False)
class DeviceLink(_Struct):
    """The bare link id: device_unlock, destroy_link, device_abort."""

    lid: int
    _xdr = (("lid", "int", None),)


@dataclass(frozen=True, repr=False)
class DeviceLockParms(_Struct):
    lid: int
    flags: int
    lock_timeout: int
    _xdr = (("lid", "int", None), ("flags", "int", None), ("lock_timeout", "uint", None))


@dataclass(frozen=True, repr=False)
class DeviceEnableSrqParms(_Struct):
    lid: int
    enable: bool
    handle: bytes
    _xdr = (("lid", "int", None), ("enable", "bool", None), ("handle", "opaque", MAX_HANDLE))


@dataclass(frozen=True, repr=False)
class DeviceDocmdParms(_Struct):
    """Yet another order: flags second, then io_timeout, then lock_timeout."""

    lid: int
    flags: int
    io_timeout: int
    lock_timeout: int
    cmd: int
    network_order: bool
    datasize: int
    data_in: bytes
    _xdr = (("lid", "int", None), ("flags", "int", None), ("io_timeout", "uint", None),
            ("lock_timeout", "uint", None), ("cmd", "int", None), ("network_order", "bool", None),
            ("datasize", "int", None), ("data_in", "opaque", None))


@dataclass(frozen=True, repr=False)
class DeviceDocmdResp(_Struct):
    error: int
    data_out: bytes
    _xdr = (("error", "int", None), ("data_out", "opaque", None))


@dataclass(frozen=True, repr=False)
class DeviceRemoteFunc(_Struct):
    host_addr: int  # IPv4 address of the controller as a 32-bit number
    host_port: int
    prog_num: int
    prog_vers: int
    prog_family: int  # DEVICE_TCP / DEVICE_UDP
    _xdr = (("host_addr", "uint", None), ("host_port", "uint", None), ("prog_num", "uint", None),
            ("prog_vers", "uint", None), ("prog_family", "int", None))


@dataclass(frozen=True, repr=False)
class DeviceSrqParms(_Struct):
    handle: bytes  # RPCL leaves it unbounded; it echoes the <=40-byte enable handle
    _xdr = (("handle", "opaque", MAX_SRQ_HANDLE),)


@dataclass(frozen=True, repr=False)
class Void(_Struct):
    _xdr = ()


# procedure -> (program, argument structure, result structure or None for one-way)
PROCEDURES: dict[Proc, tuple[int, type[_Struct], type[_Struct] | None]] = {
    Proc.CREATE_LINK: (DEVICE_CORE_PROG, CreateLinkParms, CreateLinkResp),
    Proc.DEVICE_WRITE: (DEVICE_CORE_PROG, DeviceWriteParms, DeviceWriteResp),
    Proc.DEVICE_READ: (DEVICE_CORE_PROG, DeviceReadParms, DeviceReadResp),
    Proc.DEVICE_READSTB: (DEVICE_CORE_PROG, DeviceGenericParms, DeviceReadStbResp),
    Proc.DEVICE_TRIGGER: (DEVICE_CORE_PROG, DeviceGenericParms, DeviceError),
    Proc.DEVICE_CLEAR: (DEVICE_CORE_PROG, DeviceGenericParms, DeviceError),
    Proc.DEVICE_REMOTE: (DEVICE_CORE_PROG, DeviceGenericParms, DeviceError),
    Proc.DEVICE_LOCAL: (DEVICE_CORE_PROG, DeviceGenericParms, DeviceError),
    Proc.DEVICE_LOCK: (DEVICE_CORE_PROG, DeviceLockParms, DeviceError),
    Proc.DEVICE_UNLOCK: (DEVICE_CORE_PROG, DeviceLink, DeviceError),
    Proc.DEVICE_ENABLE_SRQ: (DEVICE_CORE_PROG, DeviceEnableSrqParms, DeviceError),
    Proc.DEVICE_DOCMD: (DEVICE_CORE_PROG, DeviceDocmdParms, DeviceDocmdResp),
    Proc.DESTROY_LINK: (DEVICE_CORE_PROG, DeviceLink, DeviceError),
    Proc.CREATE_INTR_CHAN: (DEVICE_CORE_PROG, DeviceRemoteFunc, DeviceError),
    Proc.DESTROY_INTR_CHAN: (DEVICE_CORE_PROG, Void, DeviceError),
    Proc.DEVICE_ABORT: (DEVICE_ASYNC_PROG, DeviceLink, DeviceError),
    Proc.DEVICE_INTR_SRQ: (DEVICE_INTR_PROG, DeviceSrqParms, None),
}


def procedure(prog: int, proc: int) -> Proc | None:
    """The VXI-11 procedure for (program, procedure number), or None when it is not one."""
    try:
        found = Proc(proc)
    except ValueError:
        return None
    return found if PROCEDURES[found][0] == prog else None


def encode_call_parts(xid: int, proc: Proc, params: _Struct) -> list[rpc.Buffer]:
    """A complete RPC call (no record mark) for `proc`; bulk data stays by reference."""
    prog, params_type, _ = PROCEDURES[proc]
    if not isinstance(params, params_type):
        raise TypeError(f"{proc.name} takes {params_type.__name__}, not {type(params).__name__}")
    return rpc.encode_call_parts(xid, prog, 1, proc, params.encode_parts())


def encode_call(xid: int, proc: Proc, params: _Struct) -> bytes:
    return b"".join(encode_call_parts(xid, proc, params))


def decode_params(call: rpc.Call) -> _Struct:
    """The argument structure of a VXI-11 call (RemoteProtocolError -> answer GARBAGE_ARGS)."""
    proc = procedure(call.prog, call.proc)
    if proc is None:
        raise RemoteProtocolError(f"program {call.prog} has no VXI-11 procedure {call.proc}")
    return PROCEDURES[proc][1].decode(call.args)


def decode_result(proc: Proc, reply: rpc.Reply) -> _Struct:
    """The result structure of a successful reply; RpcCallFailed if the call was not executed."""
    result_type = PROCEDURES[proc][2]
    if result_type is None:
        raise TypeError(f"{proc.name} is one-way and has no result")
    if not reply.ok:
        raise rpc.RpcCallFailed(reply)
    return result_type.decode(reply.results, allow_trailing=True)


READ_RESP_HEAD_SIZE = 12  # error, reason, data length
_READ_HEAD = struct.Struct(">iiI")


def decode_read_resp_head(head: rpc.Buffer) -> tuple[int, int, int]:
    """(error, reason, data length) from the first 12 bytes of Device_ReadResp, for transports that
    receive the data straight into a caller's buffer."""
    if len(head) < READ_RESP_HEAD_SIZE:
        raise RemoteProtocolError(f"Device_ReadResp: truncated, {len(head)} of {READ_RESP_HEAD_SIZE} header bytes")
    error, reason, length = _READ_HEAD.unpack_from(head)
    return error, reason, length


# -------------------------------------------------------------------------------- error mapping
ERROR_TEXT: dict[int, str] = {
    0: "no error",
    1: "syntax error (device name not understood)",
    3: "device not accessible",
    4: "invalid link identifier",
    5: "parameter error",
    6: "channel not established",
    8: "operation not supported",
    9: "out of resources",
    11: "device locked by another link",
    12: "no lock held by this link",
    15: "I/O timeout",
    17: "I/O error",
    21: "invalid address",
    23: "abort",
    29: "channel already established",
}

VXI11_TO_VISA: dict[int, StatusCode] = {
    0: StatusCode.VI_SUCCESS,
    1: StatusCode.VI_ERROR_RSRC_NFOUND,
    3: StatusCode.VI_ERROR_RSRC_NFOUND,
    4: StatusCode.VI_ERROR_CONN_LOST,
    5: StatusCode.VI_ERROR_INV_PARAMETER,
    6: StatusCode.VI_ERROR_IO,
    8: StatusCode.VI_ERROR_NSUP_OPER,
    9: StatusCode.VI_ERROR_ALLOC,
    11: StatusCode.VI_ERROR_RSRC_LOCKED,
    12: StatusCode.VI_ERROR_SESN_NLOCKED,
    15: StatusCode.VI_ERROR_TMO,
    17: StatusCode.VI_ERROR_IO,
    21: StatusCode.VI_ERROR_RSRC_NFOUND,
    23: StatusCode.VI_ERROR_ABORT,
    29: StatusCode.VI_ERROR_RSRC_BUSY,
}


def visa_status(error: int, *, proc: Proc | None = None, waitlock: bool = False) -> StatusCode:
    """The VISA status for a VXI-11 error code returned by `proc` (see the module docstring)."""
    if error == ErrorCode.DEVICE_LOCKED_BY_ANOTHER_LINK and waitlock and proc is Proc.DEVICE_LOCK:
        return StatusCode.VI_ERROR_TMO
    return VXI11_TO_VISA.get(error, StatusCode.VI_ERROR_IO)


def vxi11_error(error: int, *, proc: Proc, waitlock: bool = False, context: str = "") -> VisaBusError:
    """The exception to raise for a non-zero VXI-11 error code."""
    text = ERROR_TEXT.get(error, "reserved/unknown error code")
    prefix = f"{context}: " if context else ""
    message = f"{prefix}VXI-11 {proc.name.lower()} failed with error {error} ({text})"
    if error == ErrorCode.DEVICE_LOCKED_BY_ANOTHER_LINK and waitlock and proc is Proc.DEVICE_LOCK:
        message += "; the lock did not come free within the timeout"
    return error_from_status(int(visa_status(error, proc=proc, waitlock=waitlock)), message)


# --------------------------------------------------------------------------- interrupt channel stream
def _srq_call_size(body: rpc.Buffer) -> int | None:
    """Bytes a device_intr_srq call occupies at the start of `body` (header, handle, padding); None
    while `body` is too short to tell or when it is some other call."""
    view = memoryview(body)
    if len(view) < 24:
        return None
    _, mtype, rpcvers, prog, _, proc = struct.unpack_from(">IIIIII", view)
    if (mtype, rpcvers, prog, proc) != (0, 2, DEVICE_INTR_PROG, Proc.DEVICE_INTR_SRQ):
        return None
    offset = 24
    for what in ("credential", "verifier"):  # flavor, body length, body
        if len(view) < offset + 8:
            return None
        size = struct.unpack_from(">I", view, offset + 4)[0]
        if size > rpc.MAX_AUTH_BODY:
            raise RemoteProtocolError(f"device_intr_srq: {what} body of {size} bytes")
        offset += 8 + size + rpc.pad_length(size)
    if len(view) < offset + 4:
        return None
    size = struct.unpack_from(">I", view, offset)[0]
    if size > MAX_SRQ_HANDLE:
        raise RemoteProtocolError(f"device_intr_srq: handle of {size} bytes")
    return offset + 4 + size + rpc.pad_length(size)


class InterruptStreamReader:
    """Splits the interrupt channel's stream into calls, tolerating a lying record mark.

    A Keithley DMM6500 announces 4 bytes more than it sends in device_intr_srq. So a device_intr_srq
    record ends where its call ends (header, handle, padding); bytes the mark announced beyond that
    are skipped only while they arrive as zeros (padding) — the next record mark starts with 0x80.
    Any other call is delimited by its record mark as usual.
    """

    def __init__(self, max_record_size: int = 64 * 1024) -> None:
        self.max_record_size = max_record_size
        self._buf = bytearray()
        self._prefix = bytearray()  # earlier fragments of the record in progress
        self._pad_left = 0

    def feed(self, data: rpc.Buffer) -> list[rpc.Call]:
        buf = self._buf
        buf += data
        calls: list[rpc.Call] = []
        while True:
            if self._pad_left:
                zeros = 0
                while zeros < min(self._pad_left, len(buf)) and buf[zeros] == 0:
                    zeros += 1
                del buf[:zeros]
                self._pad_left = 0 if buf else self._pad_left - zeros
                if not buf:
                    break
            if len(buf) < 4:
                break
            length, last = rpc.parse_record_mark(buf[:4])
            if len(self._prefix) + length > self.max_record_size:
                raise RemoteProtocolError(f"interrupt channel: record over {self.max_record_size} bytes")
            present = bytes(self._prefix) + bytes(buf[4 : 4 + length])
            if not last:
                if len(buf) < 4 + length:
                    break
                self._prefix += buf[4 : 4 + length]
                del buf[: 4 + length]
                continue
            size = _srq_call_size(present)
            full = len(self._prefix) + length
            if size is None or size > full or size < len(self._prefix):
                size = full  # not a device_intr_srq (or not yet known): trust the mark
            if len(present) < size:
                break
            calls.append(rpc.decode_call(present[:size]))
            del buf[: 4 + size - len(self._prefix)]
            self._prefix = bytearray()
            self._pad_left = full - size
        return calls

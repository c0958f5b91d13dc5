"""The visabus wire schema: the one place where messages between clients, broker and workers are defined.

A message is a ZeroMQ multipart message (after any ROUTER envelope frame):

    frame 0      msgpack map: the header (str keys)
    frames 1..n  raw bytes: bulk data (write payloads, read data, waveform chunks), never msgpack'ed

Every header has `v` (protocol version) and `op`. Client requests add `id` (chosen by the client, unique
within its session), `res` (resource string or alias) where the op concerns an instrument, and
`timeout_ms`. Replies echo `id` and `op` and carry `status` (a VISA status code, 0 = success); an error
reply adds `name` (the VISA symbolic name) and `msg` (what failed, what to check).

Large replies arrive as a stream: every reply frame carries `seq` (0, 1, 2...) and `more` (True until the
last). The receiver returns credit (`credit` op) as it consumes chunks, so nobody buffers without bound.

See PROTOCOL.md beside this file for the language-neutral specification.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from .errors import StatusCode

VERSION = 1
MAX_HEADER_BYTES = 64 * 1024  # a header is small; anything bigger is malformed

Header = dict[str, Any]

# ------------------------------------------------------------------------------------------ ops
# Client -> broker requests, with the header fields each one requires (name -> type) and may carry.
# `data` says how many raw frames follow the header (None = any number).
_I = int
_S = str
_B = bool

CLIENT_OPS: dict[str, dict[str, Any]] = {
    # session / directory (answered by the broker itself)
    "hello": {"required": {"sid": _S}, "optional": {"name": _S}},
    "heartbeat": {"required": {"sid": _S}, "optional": {}},
    "bye": {"required": {}, "optional": {}},
    "list": {"required": {}, "optional": {"pattern": _S}},
    "status": {"required": {}, "optional": {"res": _S}},
    "open": {"required": {"res": _S}, "optional": {}},
    "close": {"required": {"res": _S}, "optional": {}},
    "lock": {"required": {"res": _S}, "optional": {"exclusive": _B, "key": _S, "lock_timeout_ms": _I}},
    "unlock": {"required": {"res": _S}, "optional": {}},
    "cancel": {"required": {"target": _I}, "optional": {}},
    "credit": {"required": {"target": _I, "n": _I}, "optional": {}},
    "ping": {"required": {"token": _S}, "optional": {}},
    # instrument operations (routed to the owning worker)
    "write": {"required": {"res": _S}, "optional": {"end": _B}, "data": 1},
    "read": {"required": {"res": _S}, "optional": {"count": _I, "term": _I, "block": _B, "credit": _I, "chunk": _I}},
    "query": {
        "required": {"res": _S},
        "optional": {"count": _I, "term": _I, "block": _B, "credit": _I, "chunk": _I, "delay_ms": _I},
        "data": 1,
    },
    "read_stb": {"required": {"res": _S}, "optional": {}},
    "trigger": {"required": {"res": _S}, "optional": {}},
    "clear": {"required": {"res": _S}, "optional": {}},
    "remote": {"required": {"res": _S}, "optional": {}},
    "local": {"required": {"res": _S}, "optional": {}},
    "get_attr": {"required": {"res": _S, "name": _S}, "optional": {}},
    "set_attr": {"required": {"res": _S, "name": _S}, "optional": {"value": object}},
    "transaction": {"required": {"res": _S, "steps": list}, "optional": {}, "data": None},
}

# Ops the broker answers itself; all others with `res` go to the worker that owns the resource.
BROKER_OPS = frozenset({"hello", "heartbeat", "bye", "list", "status", "open", "close", "lock", "unlock", "cancel", "credit",
                        "ping"})
# Ops that reach the worker's control thread even while it is busy (out-of-band).
OUT_OF_BAND_OPS = frozenset({"clear", "cancel", "credit"})
# Ops a transaction step may use.
TRANSACTION_STEP_OPS = frozenset({"write", "read", "query", "read_stb", "trigger", "clear"})

# Worker -> broker messages (backend socket).
WORKER_OPS: dict[str, dict[str, Any]] = {
    "ready": {"required": {"res": _S, "state": _S, "wid": _S},
              "optional": {"alias": _S, "protocol": _S, "pid": _I, "fence": _B}},
    "attach": {"required": {"wid": _S}, "optional": {}},
    "heartbeat": {"required": {"state": _S}, "optional": {"detail": _S}},
    "state": {"required": {"state": _S}, "optional": {"detail": _S}},
    "reply": {"required": {"id": _I, "status": _I}, "optional": {}, "data": None},
    "event": {"required": {"topic": _S}, "optional": {"data": dict}},
    "bye": {"required": {}, "optional": {}},
}

# Jobs a worker executes: the instrument operations plus `fence` (the broker asking the worker to take or
# release the instrument's own lock while a bus lock is held; never accepted from a client).
WORKER_JOB_OPS = frozenset(CLIENT_OPS) - BROKER_OPS | {"fence"}

WORKER_STATES = ("connecting", "ready", "busy", "lost")

DEFAULT_TIMEOUT_MS = 2000
DEFAULT_CREDIT = 4               # stream chunks in flight per read
DEFAULT_CHUNK = 1 << 20          # bytes per stream chunk
MAX_CHUNK = 16 << 20
MAX_CREDIT = 64


class MalformedMessage(ValueError):
    """A message that does not follow the schema. `code` is the VISA status to answer with."""

    def __init__(self, message: str, code: StatusCode = StatusCode.VI_ERROR_INV_FMT, header: Header | None = None):
        super().__init__(message)
        self.code = code
        self.header = header or {}


# ------------------------------------------------------------------------------------ encoding
def pack(header: Header) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def unpack(frame: bytes | memoryview) -> Header:
    """Decode a header frame; MalformedMessage on anything that is not a small msgpack map with str keys."""
    if len(frame) > MAX_HEADER_BYTES:
        raise MalformedMessage(f"header frame of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=MAX_HEADER_BYTES)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
        raise MalformedMessage(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise MalformedMessage(f"header must be a msgpack map, got {type(header).__name__}")
    if not all(type(key) is str for key in header):
        raise MalformedMessage("header keys must be strings")
    return header


def encode(header: Header, *data: bytes | memoryview) -> list[bytes | memoryview]:
    """Header + raw data frames, ready for socket.send_multipart."""
    return [pack(header), *data]


def _is(value: Any, kind: Any) -> bool:
    if kind is object:
        return True
    if kind is int and isinstance(value, bool):
        return False
    return isinstance(value, kind)


def _check_fields(header: Header, spec: dict[str, Any], op: str) -> None:
    for key, kind in spec["required"].items():
        if key not in header:
            raise MalformedMessage(f"op {op!r} needs field {key!r}", header=header)
        if not _is(header[key], kind):
            raise MalformedMessage(f"field {key!r} of op {op!r} must be {kind.__name__}", header=header)
    for key, kind in spec["optional"].items():
        if header.get(key) is not None and not _is(header[key], kind):
            raise MalformedMessage(f"field {key!r} of op {op!r} must be {kind.__name__}", header=header)


def decode(frames: Sequence[bytes | memoryview], table: dict[str, dict[str, Any]] | None = None) -> tuple[Header, list[Any]]:
    """Split and validate a message: (header, data frames). Validates against `table` (CLIENT_OPS by default)."""
    if not frames:
        raise MalformedMessage("empty message")
    header = unpack(frames[0])
    data = list(frames[1:])
    if type(header.get("v")) is not int or header["v"] != VERSION:
        raise MalformedMessage(
            f"protocol version {header.get('v')!r} is not supported (this broker speaks v{VERSION})",
            StatusCode.VI_ERROR_NSUP_OPER,
            header,
        )
    op = header.get("op")
    spec = (CLIENT_OPS if table is None else table).get(op) if isinstance(op, str) else None
    if spec is None:
        raise MalformedMessage(f"unknown op {op!r}", StatusCode.VI_ERROR_NSUP_OPER, header)
    rid = header.get("id")
    if table is None and (type(rid) is not int or not 0 <= rid < 2**63):
        # The id keys replies and the at-most-once bookkeeping: it must be a plain, hashable integer.
        raise MalformedMessage("field 'id' must be an integer from 0 to 2**63-1", header={"op": op})
    _check_fields(header, spec, str(op))
    wanted = spec.get("data", 0)
    if wanted is not None and len(data) != wanted:
        raise MalformedMessage(f"op {op!r} carries {wanted} data frame(s), got {len(data)}", header=header)
    if "timeout_ms" in header and header["timeout_ms"] is not None:
        t = header["timeout_ms"]
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise MalformedMessage("timeout_ms must be a non-negative integer", header=header)
    return header, data


# ------------------------------------------------------------------------------------- replies
def reply(request: Header, status: int = 0, **fields: Any) -> Header:
    """A reply header for `request` (echoes id and op)."""
    out: Header = {"v": VERSION, "op": request.get("op"), "id": request.get("id"), "status": int(status)}
    out.update(fields)
    return out


def error_reply(request: Header, code: StatusCode, message: str, **fields: Any) -> Header:
    return reply(request, int(code), name=code.name, msg=message, more=False, **fields)


def request(op: str, req_id: int, **fields: Any) -> Header:
    header: Header = {"v": VERSION, "op": op, "id": req_id}
    header.update({k: v for k, v in fields.items() if v is not None})
    return header


def event_payload(topic: str, seq: int, timestamp: float, data: dict[str, Any]) -> list[bytes]:
    """An event on the PUB socket: [topic (utf-8), msgpack map {topic, seq, ts, ...data}].

    `seq` counts per topic from 1, so a subscriber sees a gap for every event of that topic it lost.
    """
    body = dict(data)
    body.update({"topic": topic, "seq": seq, "ts": timestamp})
    return [topic.encode(), pack(body)]

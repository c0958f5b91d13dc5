"""Wire schema (sdk/schema.py): every op round-trips, every malformed message is refused with a code."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from visabus.sdk import schema
from visabus.sdk.errors import StatusCode

INV_FMT = StatusCode.VI_ERROR_INV_FMT
NSUP = StatusCode.VI_ERROR_NSUP_OPER
RES = "TCPIP0::10.0.0.5::hislip0::INSTR"

# op -> (extra header fields, data frames). One valid message per op, with every optional field set.
CLIENT_EXAMPLES: dict[str, tuple[dict[str, Any], list[bytes]]] = {
    "hello": ({"sid": "c0ffee", "name": "bench-3"}, []),
    "heartbeat": ({"sid": "c0ffee"}, []),
    "bye": ({}, []),
    "list": ({"pattern": "TCPIP?*::INSTR"}, []),
    "status": ({"res": RES}, []),
    "open": ({"res": RES}, []),
    "close": ({"res": "scope"}, []),
    "lock": ({"res": RES, "exclusive": False, "key": "team-a", "lock_timeout_ms": 500}, []),
    "unlock": ({"res": RES}, []),
    "cancel": ({"target": 41}, []),
    "credit": ({"target": 41, "n": 3}, []),
    "ping": ({"token": "probe-1"}, []),
    "write": ({"res": RES, "end": True, "timeout_ms": 2000}, [b"VOLT 1.5\n"]),
    "read": ({"res": RES, "count": 1024, "term": 10, "block": False, "credit": 4, "chunk": 1 << 20,
              "timeout_ms": 0}, []),
    "query": ({"res": RES, "count": 64, "term": 10, "block": True, "credit": 8, "chunk": 65536, "delay_ms": 5},
              [b"WAV:DATA?\n"]),
    "read_stb": ({"res": RES}, []),
    "trigger": ({"res": RES}, []),
    "clear": ({"res": RES}, []),
    "remote": ({"res": RES}, []),
    "local": ({"res": RES}, []),
    "get_attr": ({"res": RES, "name": "timeout"}, []),
    "set_attr": ({"res": RES, "name": "timeout", "value": 2.5}, []),
    "transaction": ({"res": RES, "steps": [{"op": "write", "data": 0}, {"op": "read", "block": True}]},
                    [b"*TRG\n", b"\x00\x01\n\xff"]),
}

WORKER_EXAMPLES: dict[str, tuple[dict[str, Any], list[bytes]]] = {
    "ready": ({"res": RES, "state": "ready", "wid": "w-1", "alias": "scope", "protocol": "hislip", "pid": 4242}, []),
    "attach": ({"wid": "w-1"}, []),
    "heartbeat": ({"state": "busy"}, []),
    "state": ({"state": "lost", "detail": "connection refused"}, []),
    "reply": ({"id": 7, "status": 0, "seq": 0, "more": True}, [b"#210", b"0123456789\n"]),
    "event": ({"topic": "srq." + RES, "data": {"stb": 0x40}}, []),
    "bye": ({}, []),
}


def message(op: str, fields: dict[str, Any], data: list[bytes] = (), /, **over: Any) -> list[bytes]:  # type: ignore[assignment]
    """One client message; keyword arguments override header fields (_DROP removes one)."""
    header = {"v": schema.VERSION, "op": op, "id": 1, **fields, **over}
    return [schema.pack({k: v for k, v in header.items() if v is not _DROP}), *data]


_DROP = object()


# ------------------------------------------------------------------------------------ round trips
def test_examples_cover_every_op() -> None:
    # The round trips below run over the schema's own tables: an op without an example fails here.
    assert set(schema.CLIENT_OPS) <= set(CLIENT_EXAMPLES)
    assert set(schema.WORKER_OPS) <= set(WORKER_EXAMPLES)


@pytest.mark.parametrize("op", sorted(schema.CLIENT_OPS))
def test_client_op_round_trip(op: str) -> None:
    fields, data = CLIENT_EXAMPLES[op]
    header = schema.request(op, 17, **fields)
    frames = schema.encode(header, *data)
    assert len(frames) == 1 + len(data)
    decoded, decoded_data = schema.decode(frames)
    assert decoded == {"v": 1, "op": op, "id": 17, **fields}
    assert decoded_data == data


@pytest.mark.parametrize("op", sorted(schema.CLIENT_OPS))
def test_client_op_with_only_required_fields(op: str) -> None:
    fields, data = CLIENT_EXAMPLES[op]
    required = {k: v for k, v in fields.items() if k in schema.CLIENT_OPS[op]["required"]}
    decoded, _ = schema.decode(schema.encode(schema.request(op, 2, **required), *data))
    assert decoded == {"v": 1, "op": op, "id": 2, **required}


@pytest.mark.parametrize("op", sorted(schema.WORKER_OPS))
def test_worker_op_round_trip(op: str) -> None:
    fields, data = WORKER_EXAMPLES[op]
    header = {"v": schema.VERSION, "op": op, **fields}
    decoded, decoded_data = schema.decode(schema.encode(header, *data), schema.WORKER_OPS)
    assert decoded == header
    assert decoded_data == data


def test_decode_accepts_memoryview_frames_and_keeps_data_frames_untouched() -> None:
    payload = memoryview(bytearray(b"\x00\n\xff" * 10))
    frames = [memoryview(schema.pack(schema.request("write", 3, res=RES))), payload]
    header, data = schema.decode(frames)
    assert header["op"] == "write"
    assert data[0] is payload  # bulk data is never copied or msgpack'ed


def test_request_drops_none_fields() -> None:
    assert schema.request("read", 5, res=RES, count=None, term=10) == {
        "v": 1, "op": "read", "id": 5, "res": RES, "term": 10}


def test_optional_fields_may_be_nil() -> None:
    header, _ = schema.decode(message("read", {"res": RES, "count": None, "term": None, "timeout_ms": None}))
    assert header["count"] is None and header["timeout_ms"] is None


def test_header_at_the_size_limit_is_accepted() -> None:
    base = len(schema.pack({"v": 1, "op": "ping", "id": 1, "token": ""}))
    # str8/16 headers: find the token length that makes the packed header exactly MAX_HEADER_BYTES.
    n = schema.MAX_HEADER_BYTES - base - 2
    frame = schema.pack({"v": 1, "op": "ping", "id": 1, "token": "t" * n})
    assert len(frame) == schema.MAX_HEADER_BYTES
    header, _ = schema.decode([frame])
    assert len(header["token"]) == n


# ------------------------------------------------------------------------------------ validation
INVALID_FIELDS: list[tuple[str, dict[str, Any], list[bytes], str]] = [
    # (op, fields, data, fragment of the message)
    ("write", {}, [b"x"], "op 'write' needs field 'res'"),
    ("write", {"res": 5}, [b"x"], "field 'res' of op 'write' must be str"),
    ("write", {"res": b"TCPIP::h::INSTR"}, [b"x"], "field 'res' of op 'write' must be str"),
    ("hello", {}, [], "op 'hello' needs field 'sid'"),
    ("hello", {"sid": "s", "name": 3}, [], "field 'name' of op 'hello' must be str"),
    ("read", {"res": RES, "count": "10"}, [], "field 'count' of op 'read' must be int"),
    ("read", {"res": RES, "count": True}, [], "field 'count' of op 'read' must be int"),  # bool is not int
    ("read", {"res": RES, "count": 1.5}, [], "field 'count' of op 'read' must be int"),
    ("read", {"res": RES, "block": 1}, [], "field 'block' of op 'read' must be bool"),
    ("lock", {"res": RES, "exclusive": "yes"}, [], "field 'exclusive' of op 'lock' must be bool"),
    ("lock", {"res": RES, "lock_timeout_ms": "1s"}, [], "field 'lock_timeout_ms' of op 'lock' must be int"),
    ("cancel", {}, [], "op 'cancel' needs field 'target'"),
    ("cancel", {"target": "41"}, [], "field 'target' of op 'cancel' must be int"),
    ("credit", {"target": 41}, [], "op 'credit' needs field 'n'"),
    ("get_attr", {"res": RES}, [], "op 'get_attr' needs field 'name'"),
    ("transaction", {"res": RES, "steps": {"op": "read"}}, [], "field 'steps' of op 'transaction' must be list"),
    ("ping", {"token": 1}, [], "field 'token' of op 'ping' must be str"),
    ("query", {"res": RES, "delay_ms": "5"}, [b"x"], "field 'delay_ms' of op 'query' must be int"),
]


@pytest.mark.parametrize(("op", "fields", "data", "fragment"), INVALID_FIELDS)
def test_missing_or_ill_typed_field(op: str, fields: dict[str, Any], data: list[bytes], fragment: str) -> None:
    frames = message(op, fields, data)
    with pytest.raises(schema.MalformedMessage) as info:
        schema.decode(frames)
    assert fragment in str(info.value)
    assert info.value.code is INV_FMT
    assert info.value.header["id"] == 1  # the header travels with the error so the reply can echo the id


INVALID_WORKER: list[tuple[str, dict[str, Any], list[bytes], str]] = [
    ("ready", {"res": RES}, [], "op 'ready' needs field 'state'"),
    ("ready", {"res": RES, "state": "ready", "wid": "w-1", "pid": "42"}, [], "field 'pid' of op 'ready' must be int"),
    ("reply", {"status": 0}, [], "op 'reply' needs field 'id'"),
    ("reply", {"id": "7", "status": 0}, [], "field 'id' of op 'reply' must be int"),
    ("reply", {"id": 7, "status": False}, [], "field 'status' of op 'reply' must be int"),
    ("event", {"topic": "srq", "data": [1]}, [], "field 'data' of op 'event' must be dict"),
    ("heartbeat", {}, [], "op 'heartbeat' needs field 'state'"),
]


@pytest.mark.parametrize(("op", "fields", "data", "fragment"), INVALID_WORKER)
def test_worker_message_validation(op: str, fields: dict[str, Any], data: list[bytes], fragment: str) -> None:
    header = {"v": 1, "op": op, **fields}
    with pytest.raises(schema.MalformedMessage, match=fragment.replace("(", r"\(")):
        schema.decode(schema.encode(header, *data), schema.WORKER_OPS)


@pytest.mark.parametrize("op", ["frobnicate", "", "READ", 5, None, _DROP])
def test_unknown_op(op: object) -> None:
    with pytest.raises(schema.MalformedMessage, match="unknown op") as info:
        schema.decode(message("x", {}, op=op))
    assert info.value.code is NSUP


def test_ops_are_checked_against_the_given_table() -> None:
    with pytest.raises(schema.MalformedMessage, match="unknown op 'ready'"):
        schema.decode(message("ready", {"res": RES, "state": "ready"}))  # a worker op on the client table
    with pytest.raises(schema.MalformedMessage, match="unknown op 'write'"):
        schema.decode(message("write", {"res": RES}, [b"x"]), schema.WORKER_OPS)


@pytest.mark.parametrize("version", [0, 2, -1, "1", None, _DROP, [1]])
def test_wrong_version(version: object) -> None:
    with pytest.raises(schema.MalformedMessage, match="not supported") as info:
        schema.decode(message("bye", {}, v=version))
    assert info.value.code is NSUP
    assert info.value.header["op"] == "bye"


@pytest.mark.parametrize(
    ("op", "fields", "count"),
    [("write", {"res": RES}, 0), ("write", {"res": RES}, 2), ("query", {"res": RES}, 0),
     ("read", {"res": RES}, 1), ("hello", {"sid": "s"}, 1), ("lock", {"res": RES}, 3)],
)
def test_wrong_number_of_data_frames(op: str, fields: dict[str, Any], count: int) -> None:
    wanted = schema.CLIENT_OPS[op].get("data", 0)
    with pytest.raises(schema.MalformedMessage) as info:
        schema.decode(message(op, fields, [b"d"] * count))
    assert str(info.value) == f"op {op!r} carries {wanted} data frame(s), got {count}"
    assert info.value.code is INV_FMT


@pytest.mark.parametrize("count", [0, 1, 5])
def test_transaction_takes_any_number_of_data_frames(count: int) -> None:
    _, data = schema.decode(message("transaction", {"res": RES, "steps": []}, [b"x"] * count))
    assert len(data) == count


@pytest.mark.parametrize("timeout", [-1, "100", True, 1.5, [100]])
def test_bad_timeout_ms(timeout: object) -> None:
    with pytest.raises(schema.MalformedMessage, match="timeout_ms must be a non-negative integer"):
        schema.decode(message("read", {"res": RES, "timeout_ms": timeout}))


@pytest.mark.parametrize("timeout", [0, 1, 3_600_000, None])
def test_good_timeout_ms(timeout: int | None) -> None:
    header, _ = schema.decode(message("read", {"res": RES, "timeout_ms": timeout}))
    assert header["timeout_ms"] == timeout


def test_header_frame_too_big() -> None:
    frame = schema.pack({"v": 1, "op": "ping", "id": 1, "token": "t" * schema.MAX_HEADER_BYTES})
    with pytest.raises(schema.MalformedMessage, match=f"header frame of {len(frame)} bytes exceeds 65536") as info:
        schema.decode([frame])
    assert info.value.code is INV_FMT and info.value.header == {}


def test_oversized_frame_is_refused_before_parsing() -> None:
    # Not msgpack at all, but too big: the size check comes first, so no parser runs over 64 KiB + 1 of junk.
    with pytest.raises(schema.MalformedMessage, match="exceeds"):
        schema.unpack(b"\xc1" * (schema.MAX_HEADER_BYTES + 1))


@pytest.mark.parametrize(
    ("frame", "kind"),
    [(msgpack.packb([1, 2, 3]), "list"), (msgpack.packb("hello"), "str"), (msgpack.packb(7), "int"),
     (msgpack.packb(None), "NoneType"), (msgpack.packb(b"raw", use_bin_type=True), "bytes"),
     (msgpack.packb(1.5), "float")],
)
def test_header_must_be_a_map(frame: bytes, kind: str) -> None:
    with pytest.raises(schema.MalformedMessage, match=f"header must be a msgpack map, got {kind}"):
        schema.decode([frame])


@pytest.mark.parametrize(
    "frame",
    [
        b"",                                  # nothing
        b"\xc1",                              # the one byte msgpack never uses
        b"\x82\xa1v\x01",                     # map of 2, only one pair present
        b"\x81\xa1v\x01\xc0",                 # a map followed by extra data
        b"\x81\x01\x02",                      # int key
        b"\x81\xa1v\x81\x01\x02",             # int key in a nested map
        b"\x91" * 5000 + b"\xc0",             # nesting deeper than the unpacker allows
        b"\xdb\xff\xff\xff\xff",              # str32 announcing 4 GiB
        b"GET / HTTP/1.1\r\n\r\n",            # a confused peer
    ],
    ids=["empty", "c1", "truncated", "extra", "int-key", "nested-int-key", "deep", "huge-str", "http"],
)
def test_garbage_header(frame: bytes) -> None:
    with pytest.raises(schema.MalformedMessage) as info:
        schema.decode([frame, b"data"])
    assert info.value.code is INV_FMT
    assert info.value.header == {}


def test_empty_message() -> None:
    with pytest.raises(schema.MalformedMessage, match="empty message"):
        schema.decode([])


@pytest.mark.parametrize("req_id", [[1], {"a": 1}], ids=["list", "map"])
def test_client_request_id_must_be_hashable(req_id: object) -> None:
    with pytest.raises(schema.MalformedMessage, match="id"):
        schema.decode(message("read", {"res": RES}, id=req_id))


def test_header_keys_must_be_str() -> None:
    frame = msgpack.packb({"v": 1, "op": "bye", "id": 1, b"op": "write"}, use_bin_type=True)
    with pytest.raises(schema.MalformedMessage):
        schema.unpack(frame)


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_an_int(version: object) -> None:
    with pytest.raises(schema.MalformedMessage, match="version"):
        schema.decode(message("bye", {}, v=version))


# ------------------------------------------------------------------------------------ replies
def test_reply_echoes_id_and_op() -> None:
    req = schema.request("read", 9, res=RES, count=10)
    out = schema.reply(req, StatusCode.VI_SUCCESS_MAX_CNT, seq=0, more=False)
    assert out == {"v": 1, "op": "read", "id": 9, "status": 0x3FFF0006, "seq": 0, "more": False}
    assert type(out["status"]) is int  # a plain int on the wire, not the enum
    assert schema.unpack(schema.pack(out)) == out


def test_reply_to_a_header_without_id() -> None:
    assert schema.reply({}, 0) == {"v": 1, "op": None, "id": None, "status": 0}


def test_error_reply_fields() -> None:
    req = schema.request("query", 12, res=RES)
    out = schema.error_reply(req, StatusCode.VI_ERROR_TMO, "no answer within 2s", partial=3)
    assert out == {"v": 1, "op": "query", "id": 12, "status": -1073807339, "name": "VI_ERROR_TMO",
                   "msg": "no answer within 2s", "more": False, "partial": 3}
    assert schema.unpack(schema.pack(out)) == out
    # A worker's error reply validates as a worker `reply` message.
    header, _ = schema.decode([schema.pack(out | {"op": "reply"})], schema.WORKER_OPS)
    assert header["status"] == int(StatusCode.VI_ERROR_TMO)


def test_error_reply_from_malformed_message_carries_its_code() -> None:
    with pytest.raises(schema.MalformedMessage) as info:
        schema.decode(message("read", {"res": RES}, v=2))
    out = schema.error_reply(info.value.header, info.value.code, str(info.value))
    assert out["id"] == 1 and out["status"] == int(NSUP) and out["name"] == "VI_ERROR_NSUP_OPER"


def test_event_payload() -> None:
    data = {"stb": 0x40, "res": RES}
    frames = schema.event_payload("srq." + RES, 3, 1700000000.25, data)
    assert frames[0] == b"srq." + RES.encode()
    assert schema.unpack(frames[1]) == {"topic": "srq." + RES, "seq": 3, "ts": 1700000000.25, "stb": 0x40, "res": RES}
    assert data == {"stb": 0x40, "res": RES}  # the caller's dict is not modified


def test_event_payload_reserved_keys_win() -> None:
    frames = schema.event_payload("lock.x", 1, 2.0, {"seq": 99, "topic": "spoof", "ts": 0})
    assert schema.unpack(frames[1]) == {"topic": "lock.x", "seq": 1, "ts": 2.0}


def test_stream_defaults_are_consistent() -> None:
    assert 0 < schema.DEFAULT_CHUNK <= schema.MAX_CHUNK
    assert 0 < schema.DEFAULT_CREDIT <= schema.MAX_CREDIT
    assert schema.BROKER_OPS <= set(schema.CLIENT_OPS)
    assert schema.TRANSACTION_STEP_OPS <= set(schema.CLIENT_OPS) - schema.BROKER_OPS
    assert schema.OUT_OF_BAND_OPS <= set(schema.CLIENT_OPS)

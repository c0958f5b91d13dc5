"""ONC RPC / XDR codec: byte vectors, record marking, bounds. No sockets."""

from __future__ import annotations

import pytest

from visabus.workers.protocols import rpc
from visabus.workers.protocols.errors import LocalProtocolError, RemoteProtocolError


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# ------------------------------------------------------------------------------------------ XDR
@pytest.mark.parametrize(
    ("method", "value", "wire"),
    [
        ("pack_uint", 0, "00000000"),
        ("pack_uint", 0xFFFFFFFF, "ffffffff"),
        ("pack_int", -1, "ffffffff"),
        ("pack_int", -0x80000000, "80000000"),
        ("pack_int", 0x7FFFFFFF, "7fffffff"),
        ("pack_enum", 6, "00000006"),
        ("pack_bool", True, "00000001"),
        ("pack_bool", False, "00000000"),
    ],
)
def test_xdr_scalars(method: str, value: int, wire: str) -> None:
    packer = rpc.XdrPacker()
    getattr(packer, method)(value)
    assert packer.get_buffer() == h(wire)
    unpacker = rpc.XdrUnpacker(h(wire))
    reader = {"pack_uint": "unpack_uint", "pack_int": "unpack_int", "pack_enum": "unpack_enum",
              "pack_bool": "unpack_bool"}[method]
    assert getattr(unpacker, reader)() == value
    unpacker.done()


@pytest.mark.parametrize(("method", "value"), [("pack_uint", -1), ("pack_uint", 1 << 32), ("pack_int", 1 << 31),
                                               ("pack_int", -(1 << 31) - 1), ("pack_bool", 2)])
def test_xdr_out_of_range_values_are_local_errors(method: str, value: int) -> None:
    with pytest.raises(LocalProtocolError, match="XDR"):
        getattr(rpc.XdrPacker(), method)(value)


def test_xdr_bool_other_than_0_or_1_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="2 is not a boolean"):
        rpc.XdrUnpacker(h("00000002")).unpack_bool("flag")


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"", "00000000"),
        (b"a", "00000001 61000000"),
        (b"inst0", "00000005 696e7374 30000000"),
        (b"abcd", "00000004 61626364"),
    ],
)
def test_xdr_variable_opaque_is_length_bytes_and_zero_padding(data: bytes, wire: str) -> None:
    packer = rpc.XdrPacker()
    packer.pack_opaque(data)
    assert packer.get_buffer() == h(wire)
    assert rpc.XdrUnpacker(h(wire)).unpack_opaque() == data


def test_xdr_string_and_fixed_opaque() -> None:
    packer = rpc.XdrPacker()
    packer.pack_string("gpib0,5", max_length=16)
    packer.pack_opaque_fixed(b"xyz", 3)
    wire = packer.get_buffer()
    assert wire == h("00000007 67706962 302c3500 78797a00")
    unpacker = rpc.XdrUnpacker(wire)
    assert unpacker.unpack_string(16) == b"gpib0,5"
    assert unpacker.unpack_opaque_fixed(3) == b"xyz"
    unpacker.done()
    with pytest.raises(LocalProtocolError, match="not ASCII"):
        rpc.XdrPacker().pack_string("µ")
    with pytest.raises(LocalProtocolError, match="exactly 4 bytes, got 3"):
        rpc.XdrPacker().pack_opaque_fixed(b"abc", 4)


def test_xdr_opaque_over_its_maximum() -> None:
    with pytest.raises(LocalProtocolError, match="41 bytes exceed the maximum of 40"):
        rpc.XdrPacker().pack_opaque(b"x" * 41, 40, "handle")
    with pytest.raises(RemoteProtocolError, match="handle: announces 41 bytes, the maximum is 40"):
        rpc.XdrUnpacker(h("00000029") + b"x" * 44).unpack_opaque(40, "handle")


def test_xdr_opaque_announcing_2gib_is_rejected_without_allocating() -> None:
    with pytest.raises(RemoteProtocolError, match="data: announces 2147483648 bytes, only 4 left"):
        rpc.XdrUnpacker(h("80000000 61626364")).unpack_opaque(None, "data")


def test_xdr_truncated_input_names_the_field_and_offset() -> None:
    unpacker = rpc.XdrUnpacker(h("00000001 0000"))
    unpacker.unpack_uint("first")
    with pytest.raises(RemoteProtocolError, match=r"XDR second: truncated, need 4 bytes at offset 4, only 2 left"):
        unpacker.unpack_uint("second")


def test_xdr_missing_padding_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="padding after its 1 bytes is missing"):
        rpc.XdrUnpacker(h("00000001 61")).unpack_opaque()


def test_xdr_trailing_bytes_are_an_error_unless_allowed() -> None:
    unpacker = rpc.XdrUnpacker(h("00000001 00000000"))
    unpacker.unpack_uint()
    with pytest.raises(RemoteProtocolError, match="4 unexpected bytes"):
        unpacker.done(what="reply")
    unpacker.done(allow_trailing=True)


def test_xdr_big_opaque_is_kept_by_reference() -> None:
    payload = bytes(range(256)) * 256  # 64 KiB
    data = payload + b"x"
    packer = rpc.XdrPacker()
    packer.pack_uint(7)
    packer.pack_opaque(data)
    parts = packer.get_parts()
    big = [p for p in parts if len(p) >= rpc.XdrPacker.BIG]
    assert len(big) == 1 and isinstance(big[0], memoryview) and big[0].obj is data
    wire = packer.get_buffer()
    assert len(wire) == len(packer) == 8 + len(payload) + 1 + 3
    view = rpc.XdrUnpacker(wire, 4).unpack_opaque_view()
    assert isinstance(view, memoryview) and view.tobytes() == payload + b"x"


# ---------------------------------------------------------------------------------- record marking
def test_record_mark_vectors() -> None:
    assert rpc.record_mark(0x38) == h("80000038")
    assert rpc.record_mark(5, last=False) == h("00000005")
    assert rpc.parse_record_mark(h("8000001c")) == (28, True)
    assert rpc.parse_record_mark(h("7fffffff")) == (0x7FFFFFFF, False)
    with pytest.raises(LocalProtocolError):
        rpc.record_mark(1 << 31)
    with pytest.raises(RemoteProtocolError, match="4 bytes"):
        rpc.parse_record_mark(b"\x80\x00")


def test_frame_record_single_and_multi_fragment() -> None:
    assert rpc.frame_record(b"abcdefgh") == h("80000008") + b"abcdefgh"
    assert rpc.frame_record(b"abcdefgh", max_fragment=3) == (
        h("00000003") + b"abc" + h("00000003") + b"def" + h("80000002") + b"gh"
    )
    assert rpc.frame_record(b"") == h("80000000")


def test_frame_parts_splits_across_buffers_without_copying() -> None:
    big = bytearray(b"B" * 10)
    framed = rpc.frame_parts([b"head", big, b"tail"], max_fragment=8)
    assert b"".join(framed) == rpc.frame_record(b"head" + bytes(big) + b"tail", max_fragment=8)
    views = [p for p in framed if isinstance(p, memoryview)]
    assert views and all(v.obj is big or v.obj in (b"head", b"tail") for v in views)


def test_record_reader_byte_by_byte_and_multi_fragment() -> None:
    stream = rpc.frame_record(b"first record", max_fragment=5) + rpc.frame_record(b"second")
    reader = rpc.RecordReader()
    records: list[bytes] = []
    for i in range(len(stream)):
        records += reader.feed(stream[i : i + 1])
        if i < len(stream) - 1:
            assert reader.in_record or records
    assert records == [b"first record", b"second"]
    assert not reader.in_record


def test_record_reader_many_records_in_one_feed_and_empty_record() -> None:
    reader = rpc.RecordReader()
    stream = rpc.frame_record(b"a") + rpc.frame_record(b"") + rpc.frame_record(b"bc", max_fragment=1) + b"\x80"
    assert reader.feed(stream) == [b"a", b"", b"bc"]
    assert reader.in_record  # a partial mark is waiting


def test_record_reader_rejects_a_2gib_record_before_allocating() -> None:
    reader = rpc.RecordReader(max_record_size=1 << 20)
    with pytest.raises(RemoteProtocolError, match="2147483647 bytes exceeds the 1048576-byte limit"):
        reader.feed(h("ffffffff") + b"xx")
    with pytest.raises(RemoteProtocolError):  # the stream is out of step: it stays failed
        reader.feed(b"more")


def test_record_reader_limit_counts_all_fragments_of_a_record() -> None:
    reader = rpc.RecordReader(max_record_size=10)
    assert reader.feed(h("00000006") + b"abcdef") == []
    with pytest.raises(RemoteProtocolError, match="at least 12 bytes exceeds the 10-byte limit"):
        reader.feed(h("80000006"))


def test_record_reader_partial_and_reset() -> None:
    reader = rpc.RecordReader()
    assert reader.feed(h("00000004") + b"abcd" + h("80000008") + b"ef") == []
    assert reader.partial() == b"abcdef"
    reader.reset()
    assert not reader.in_record
    assert reader.feed(rpc.frame_record(b"ok")) == [b"ok"]


# -------------------------------------------------------------------------------- calls and replies
GETPORT_CALL = h(
    "000003e8 00000000 00000002 000186a0 00000002 00000003 00000000 00000000 00000000 00000000"
    " 000607af 00000001 00000006 00000000"
)


def test_encode_call_is_the_documented_40_byte_header_plus_arguments() -> None:
    args = h("000607af 00000001 00000006 00000000")
    assert rpc.encode_call(1000, 100000, 2, 3, args) == GETPORT_CALL
    assert len(rpc.encode_call(1, 2, 3, 4)) == rpc.CALL_HEADER_SIZE
    with pytest.raises(LocalProtocolError, match="xid"):
        rpc.encode_call(-1, 1, 1, 1)


def test_decode_call() -> None:
    call = rpc.decode_call(GETPORT_CALL)
    assert (call.xid, call.prog, call.vers, call.proc) == (1000, 100000, 2, 3)
    assert call.cred == rpc.AUTH_NONE and call.verf == rpc.AUTH_NONE
    assert bytes(call.args) == GETPORT_CALL[40:]
    assert call.unpacker().unpack_uint() == 0x0607AF


def test_decode_call_with_auth_sys_credentials() -> None:
    cred = h("00000001 00000008 01020304 05060708")
    data = h("00000009 00000000 00000002 00000064 00000001 00000000") + cred + h("00000000 00000000")
    call = rpc.decode_call(data)
    assert call.cred == rpc.OpaqueAuth(1, h("0102030405060708"))
    assert bytes(call.args) == b""


def test_decode_call_rejects_bad_messages() -> None:
    with pytest.raises(rpc.RpcVersionError, match="RPC version 3") as info:
        rpc.decode_call(h("00000007 00000000 00000003") + bytes(28))
    assert info.value.xid == 7
    with pytest.raises(RemoteProtocolError, match="expected a CALL"):
        rpc.decode_call(h("00000007 00000001 00000000"))
    with pytest.raises(RemoteProtocolError, match="message type 2"):
        rpc.decode_call(h("00000007 00000002"))
    oversized_cred = h("00000001 00000000 00000002 00000001 00000001 00000000 00000001 00000191")
    with pytest.raises(RemoteProtocolError, match="credential body: announces 401 bytes, the maximum is 400"):
        rpc.decode_call(oversized_cred + bytes(404))
    with pytest.raises(RemoteProtocolError, match="truncated"):
        rpc.decode_call(GETPORT_CALL[:30])


def test_success_reply_vector_and_decode() -> None:
    wire = rpc.encode_reply(1000, h("00000400"))
    assert wire == h("000003e8 00000001 00000000 00000000 00000000 00000000 00000400")
    reply = rpc.decode_reply(wire)
    assert reply.ok and reply.xid == 1000 and bytes(reply.results) == h("00000400")
    assert reply.check().unpack_uint() == 1024
    assert rpc.is_plain_success_head(wire[:24], 1000)
    assert not rpc.is_plain_success_head(wire[:24], 1001)
    assert not rpc.is_plain_success_head(wire[:20])


@pytest.mark.parametrize(
    ("stat", "wire_tail"),
    [
        (rpc.AcceptStat.PROG_UNAVAIL, "00000001"),
        (rpc.AcceptStat.PROC_UNAVAIL, "00000003"),
        (rpc.AcceptStat.GARBAGE_ARGS, "00000004"),
        (rpc.AcceptStat.SYSTEM_ERR, "00000005"),
    ],
)
def test_unsuccessful_accepted_replies(stat: rpc.AcceptStat, wire_tail: str) -> None:
    wire = rpc.encode_reply(5, accept_stat=stat)
    assert wire == h("00000005 00000001 00000000 00000000 00000000" + wire_tail)
    reply = rpc.decode_reply(wire)
    assert not reply.ok and reply.accept_stat is stat
    with pytest.raises(rpc.RpcCallFailed, match=stat.name):
        reply.check()


def test_prog_mismatch_reply_carries_versions() -> None:
    wire = rpc.encode_reply(5, accept_stat=rpc.AcceptStat.PROG_MISMATCH, mismatch=(1, 1))
    assert wire[-12:] == h("00000002 00000001 00000001")
    reply = rpc.decode_reply(wire)
    assert reply.mismatch == (1, 1)
    assert "versions 1..1" in reply.describe()
    with pytest.raises(LocalProtocolError):
        rpc.encode_reply(5, accept_stat=rpc.AcceptStat.PROG_MISMATCH)


def test_denied_replies() -> None:
    wire = rpc.encode_denied_reply(9, rpc.RejectStat.RPC_MISMATCH)
    assert wire == h("00000009 00000001 00000001 00000000 00000002 00000002")
    reply = rpc.decode_reply(wire)
    assert reply.reject_stat is rpc.RejectStat.RPC_MISMATCH and reply.mismatch == (2, 2) and not reply.ok
    wire = rpc.encode_denied_reply(9, rpc.RejectStat.AUTH_ERROR, auth_stat=5)
    assert wire == h("00000009 00000001 00000001 00000001 00000005")
    reply = rpc.decode_reply(wire)
    assert reply.auth_stat == 5
    with pytest.raises(rpc.RpcCallFailed, match="AUTH_ERROR"):
        reply.check()


def test_decode_reply_rejects_malformed() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown accept_stat 9"):
        rpc.decode_reply(h("00000001 00000001 00000000 00000000 00000000 00000009"))
    with pytest.raises(RemoteProtocolError, match="unknown reply_stat 2"):
        rpc.decode_reply(h("00000001 00000001 00000002"))
    with pytest.raises(RemoteProtocolError, match="unknown reject_stat 7"):
        rpc.decode_reply(h("00000001 00000001 00000001 00000007"))
    with pytest.raises(RemoteProtocolError, match="expected a REPLY"):
        rpc.decode_reply(GETPORT_CALL)
    with pytest.raises(RemoteProtocolError, match="accept_stat: truncated"):
        rpc.decode_reply(h("00000001 00000001 00000000 00000000 00000000"))


def test_reply_with_trailing_padding_keeps_it_in_results() -> None:
    wire = rpc.encode_reply(3, h("00000400 00000000"))  # an ICS 8065-style padded reply
    unpacker = rpc.decode_reply(wire).check()
    assert unpacker.unpack_uint() == 1024
    unpacker.done(allow_trailing=True)


def test_peek_message() -> None:
    assert rpc.peek_message(GETPORT_CALL) == (1000, rpc.MsgType.CALL)
    assert rpc.peek_message(rpc.encode_reply(4)) == (4, rpc.MsgType.REPLY)

"""VICP framing codec: byte vectors, sequence arithmetic, malformed and oversized headers (no sockets)."""

from __future__ import annotations

import tracemalloc

import pytest

from visabus.workers.protocols.errors import LocalProtocolError, RemoteProtocolError
from visabus.workers.protocols.vicp import (
    HEADER_SIZE,
    MAX_LENGTH,
    Block,
    BlockReader,
    Header,
    MessageAssembler,
    Op,
    SequenceCounter,
    encode_header,
    is_stale,
    next_sequence,
    parse_srq_payload,
)


# ---------------------------------------------------------------- header byte vectors
@pytest.mark.parametrize(
    ("op", "seq", "length", "wire"),
    [
        (Op.DATA | Op.EOI, 1, 5, "81 01 01 00 00 00 00 05"),                 # a command: "*IDN?"
        (Op.DATA, 7, 0x01020304, "80 01 07 00 01 02 03 04"),                 # big-endian length
        (Op.DATA | Op.CLEAR, 2, 0, "90 01 02 00 00 00 00 00"),               # device clear
        (Op.DATA | Op.SERIAL_POLL, 3, 0, "84 01 03 00 00 00 00 00"),         # in-band serial poll
        (Op.DATA | Op.SRQ, 9, 1, "88 01 09 00 00 00 00 01"),                 # SRQ notification
        (Op.DATA | Op.REMOTE | Op.LOCKOUT | Op.EOI, 255, MAX_LENGTH, "e1 01 ff 00 ff ff ff ff"),
        (Op.DATA | Op.EOI, 0, 0, "81 01 00 00 00 00 00 00"),                 # v1 peer: sequence 0
    ],
)
def test_header_vectors_round_trip(op: Op, seq: int, length: int, wire: str) -> None:
    raw = bytes.fromhex(wire)
    assert Header(op, seq, length).encode() == raw
    decoded = Header.decode(raw)
    assert (decoded.op, decoded.seq, decoded.length, decoded.version) == (op, seq, length, 1)


def test_operation_bits_match_the_vicp_table() -> None:
    assert [int(b) for b in (Op.DATA, Op.REMOTE, Op.LOCKOUT, Op.CLEAR, Op.SRQ, Op.SERIAL_POLL, Op.EOI)] == [
        0x80, 0x40, 0x20, 0x10, 0x08, 0x04, 0x01,
    ]
    h = Header.decode(bytes.fromhex("f5 01 01 00 00 00 00 00"))
    assert (h.remote, h.lockout, h.clear, h.serial_poll, h.eoi, h.srq) == (True, True, True, True, True, False)


def test_encode_header_always_sets_data() -> None:
    assert encode_header(Op.EOI, 4, 3) == bytes.fromhex("81 01 04 00 00 00 00 03")
    assert encode_header(Op.CLEAR, 1, 0)[0] == 0x90


def test_unused_byte_is_ignored_on_receive() -> None:
    assert Header.decode(bytes.fromhex("81 01 02 7f 00 00 00 02")).length == 2


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        ("81 02 01 00 00 00 00 05", "version must be 1"),
        ("81 00 01 00 00 00 00 05", "version must be 1"),
        ("01 01 01 00 00 00 00 05", "DATA bit"),
        ("48 54 54 50 2f 31 2e 31", "version must be 1"),   # "HTTP/1.1": not VICP at all
    ],
)
def test_invalid_headers_are_remote_errors(wire: str, why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        Header.decode(bytes.fromhex(wire))


def test_truncated_header_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="8 bytes"):
        Header.decode(b"\x81\x01\x01")


@pytest.mark.parametrize(
    "header",
    [Header(Op.DATA, 256, 0), Header(Op.DATA, -1, 0), Header(Op.DATA, 1, MAX_LENGTH + 1), Header(Op.DATA, 1, -5)],
)
def test_unencodable_headers_are_local_errors(header: Header) -> None:
    with pytest.raises(LocalProtocolError):
        header.encode()


# ---------------------------------------------------------------- sequence numbers
def test_sequence_advances_only_after_eoi_and_skips_zero() -> None:
    counter = SequenceCounter()
    assert [counter.take(eoi=True) for _ in range(3)] == [1, 2, 3]
    assert counter.take(eoi=False) == 4 and counter.take(eoi=False) == 4   # CLEAR / continuation blocks
    assert counter.take(eoi=True) == 4 and counter.next == 5
    assert next_sequence(254) == 255 and next_sequence(255) == 1
    counter.next = 255
    assert counter.take(eoi=True) == 255 and counter.next == 1


@pytest.mark.parametrize(
    ("seq", "last", "stale"),
    [
        (5, 5, False),     # answer to the last command
        (4, 5, True),      # unread answer to an older command
        (250, 3, True),    # older, across the 255 -> 1 wrap
        (3, 250, False),   # "ahead" cannot be an old answer (pyvicp would discard it)
        (0, 5, False),     # v1 peer: no sequence numbers, nothing can be judged stale
        (7, 0, False),     # nothing sent yet
        (133, 5, True),    # 127 behind across the wrap: the last distance still called old
        (132, 5, False),   # 128 behind = 127 ahead: not old
    ],
)
def test_stale_responses(seq: int, last: int, stale: bool) -> None:
    assert is_stale(seq, last) is stale


# ---------------------------------------------------------------- SRQ payload
def test_srq_payload_is_ascii_one_or_zero() -> None:
    assert parse_srq_payload(b"1") is True
    assert parse_srq_payload(b"0") is False
    assert parse_srq_payload(memoryview(b"1\n")) is True
    for bad in (b"", b"\x01", b"x" * 300):
        with pytest.raises(RemoteProtocolError):
            parse_srq_payload(bad)


# ---------------------------------------------------------------- buffered reading
def _block(op: Op, seq: int, payload: bytes) -> bytes:
    return encode_header(op, seq, len(payload)) + payload


def test_blocks_come_out_whole_whatever_the_split() -> None:
    stream = _block(Op.EOI, 1, b"*IDN?") + _block(Op.SRQ, 1, b"1") + _block(Op.DATA, 2, b"") + _block(Op.EOI, 2, b"ab")
    for step in (1, 3, 8, 9, len(stream)):
        reader = BlockReader()
        got: list[Block] = []
        for i in range(0, len(stream), step):
            reader.feed(stream[i : i + step])
            got.extend(reader.blocks())
        assert [(b.header.op, b.header.seq, b.payload) for b in got] == [
            (Op.DATA | Op.EOI, 1, b"*IDN?"), (Op.DATA | Op.SRQ, 1, b"1"), (Op.DATA, 2, b""), (Op.DATA | Op.EOI, 2, b"ab"),
        ]
        assert reader.buffered == 0


def test_oversized_block_is_refused_before_any_allocation() -> None:
    reader = BlockReader(max_payload=1024)
    reader.feed(bytes.fromhex("81 01 01 00 ff ff ff ff"))   # claims 4 GiB
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError, match="4294967295 bytes"):
            list(reader.blocks())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_malformed_header_in_stream_raises() -> None:
    reader = BlockReader()
    reader.feed(_block(Op.EOI, 1, b"ok") + b"GARBAGE!")
    blocks = reader.blocks()
    assert next(blocks).payload == b"ok"
    with pytest.raises(RemoteProtocolError, match="invalid VICP header"):
        next(blocks)


def test_message_assembler_joins_until_eoi_and_bounds_size() -> None:
    asm = MessageAssembler(max_message=10)
    assert asm.add(Block(Header(Op.DATA, 1, 3), b"abc")) is None
    assert asm.add(Block(Header(Op.DATA | Op.EOI, 1, 2), b"de")) == b"abcde"
    assert asm.pending == 0
    assert asm.add(Block(Header(Op.DATA, 1, 8), b"x" * 8)) is None
    with pytest.raises(RemoteProtocolError, match="longer than 10"):
        asm.add(Block(Header(Op.DATA | Op.EOI, 1, 3), b"yyy"))
    assert asm.pending == 0


# ---------------------------------------------------------------- streaming reading
def test_streaming_payload_goes_straight_into_caller_memory() -> None:
    payload = bytes(range(256)) * 64
    wire = encode_header(Op.EOI, 3, len(payload)) + payload
    reader = BlockReader()
    reader.feed(wire[:HEADER_SIZE + 100])          # header plus a little payload arrive together
    header = reader.next_header()
    assert header is not None and header.seq == 3 and reader.remaining == len(payload)
    dest = bytearray(len(payload))
    view = memoryview(dest)
    assert reader.payload_wanted() == 0            # take the buffered bytes first
    assert reader.payload_into(view) == 100
    assert reader.payload_wanted() == len(payload) - 100
    view[100:] = wire[HEADER_SIZE + 100 :]         # what a recv_into(view[100:]) would do
    reader.payload_received(len(payload) - 100)
    assert dest == payload and reader.header is None and reader.remaining == 0


def test_streaming_accepts_lengths_the_buffered_mode_refuses() -> None:
    reader = BlockReader(max_payload=16)
    reader.feed(encode_header(Op.EOI, 1, 1 << 30))
    header = reader.next_header()
    assert header is not None and reader.remaining == 1 << 30  # nothing allocated: the caller owns the memory
    with pytest.raises(LocalProtocolError):
        reader.payload_received((1 << 30) + 1)


def test_streaming_max_length_and_peek() -> None:
    reader = BlockReader()
    reader.feed(encode_header(Op.SRQ, 1, 10_000))
    peeked = reader.peek_header()
    assert peeked is not None and peeked.srq and reader.buffered == HEADER_SIZE   # peek consumes nothing
    with pytest.raises(RemoteProtocolError, match="10000 bytes"):
        reader.next_header(max_length=256)


def test_streaming_zero_length_block_and_skip() -> None:
    reader = BlockReader()
    reader.feed(encode_header(Op.EOI, 1, 0) + encode_header(Op.EOI, 2, 4) + b"abcd")
    empty = reader.next_header()
    assert empty is not None and empty.eoi and reader.header is None
    reader.next_header()
    with reader.buffered_payload(2) as view:
        assert view.tobytes() == b"ab"
    reader.skip_payload(2)
    with reader.buffered_payload() as view:
        assert view.tobytes() == b"cd"
    reader.skip_payload(2)
    assert reader.header is None and reader.buffered == 0 and reader.next_header() is None


def test_streaming_misuse_is_a_local_error() -> None:
    reader = BlockReader()
    reader.feed(encode_header(Op.EOI, 1, 4) + b"ab")
    reader.next_header()
    with pytest.raises(LocalProtocolError):
        reader.next_header()                       # payload not consumed yet
    with pytest.raises(LocalProtocolError):
        reader.payload_received(2)                 # buffered bytes must be taken first
    with pytest.raises(LocalProtocolError):
        list(reader.blocks())


def test_feeding_many_small_blocks_stays_linear() -> None:
    reader = BlockReader()
    one = _block(Op.EOI, 1, b"x")
    reader.feed(one * 20_000)
    assert sum(1 for _ in reader.blocks()) == 20_000
    reader.feed(one)
    assert len(list(reader.blocks())) == 1 and reader.buffered == 0

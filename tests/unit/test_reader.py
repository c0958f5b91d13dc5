"""Response reading (workers/reader.py) over fake in-memory sessions: termination, count, END, IEEE blocks.

Two fakes play the instrument's side, both serving scripted pieces (what one recv() or one protocol
message would deliver):
- `RawSocket`: a byte stream without END (SCPI-RAW). One piece per read_into at most, cut at the
  termination character with the rest kept for the next read; nothing left -> VisaTimeout.
- `EndSession`: messages with END (VXI-11/HiSLIP/VICP). read_into fills the buffer across pieces until
  it is full, the message ends, or the termination character arrives (the Session contract).
"""

from __future__ import annotations

import collections

import pytest

from visabus.sdk.errors import InvalidFormat, StatusCode, VisaTimeout
from visabus.sdk.resources import parse_resource
from visabus.sim.scpi import ieee_block, waveform_bytes
from visabus.workers import reader
from visabus.workers.reader import parse_block_header, read_block, read_message
from visabus.workers.sessions.base import Session

LF = 0x0A
SUCCESS, TERM, MAX_CNT = StatusCode.VI_SUCCESS, StatusCode.VI_SUCCESS_TERM_CHAR, StatusCode.VI_SUCCESS_MAX_CNT


class _Fake(Session):
    def __init__(self, resource: str) -> None:
        super().__init__(parse_resource(resource))
        self.reads: list[tuple[int, int | None]] = []  # (buffer size, term_char) of every read_into

    def open(self, timeout: float | None) -> None:
        pass

    def close(self) -> None:
        pass

    def write(self, data: bytes | memoryview, timeout: float | None) -> int:
        return len(data)


class RawSocket(_Fake):
    def __init__(self, *pieces: bytes) -> None:
        super().__init__("TCPIP::sim::5025::SOCKET")
        self.pieces = collections.deque(bytes(p) for p in pieces if p)

    @property
    def remaining(self) -> bytes:
        return b"".join(self.pieces)

    def read_into(self, buffer: memoryview, timeout: float | None, term_char: int | None) -> tuple[int, bool]:
        self.reads.append((len(buffer), term_char))
        if not self.pieces:
            raise VisaTimeout("no data within the timeout")
        piece = self.pieces.popleft()
        n = min(len(buffer), len(piece))
        found = piece.find(term_char, 0, n) if term_char is not None else -1
        if found >= 0:
            n = found + 1
        buffer[:n] = piece[:n]
        if n < len(piece):
            self.pieces.appendleft(piece[n:])
        return n, found >= 0


END = object()  # marks the end of a message in an EndSession script


class EndSession(_Fake):
    def __init__(self, *script: bytes | object) -> None:
        super().__init__("TCPIP::sim::hislip0::INSTR")
        self.script = collections.deque((p, False) if isinstance(p, bytes) else (b"", True) for p in script)

    @property
    def remaining(self) -> list[bytes | object]:
        return [END if end else data for data, end in self.script]

    def read_into(self, buffer: memoryview, timeout: float | None, term_char: int | None) -> tuple[int, bool]:
        self.reads.append((len(buffer), term_char))
        n = 0
        while n < len(buffer):
            if not self.script:
                if n:
                    return n, False
                raise VisaTimeout("no data within the timeout")
            data, end = self.script.popleft()
            if end:
                return n, True
            take = min(len(buffer) - n, len(data))
            found = data.find(term_char, 0, take) if term_char is not None else -1
            if found >= 0:
                take = found + 1
            buffer[n : n + take] = data[:take]
            n += take
            if take < len(data):
                self.script.appendleft((data[take:], False))
            elif self.script and self.script[0][1]:  # END arrives with the last byte of the message
                self.script.popleft()
                return n, True
            if found >= 0:
                return n, True
        return n, False


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class Sink:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def __call__(self, view: memoryview) -> None:
        assert isinstance(view, memoryview)
        self.chunks.append(bytes(view))  # the view may be reused after emit returns: copy it

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def message(session: Session, **kw: object) -> tuple[bytes, reader.ReadResult]:
    sink = Sink()
    result = read_message(session, sink, timeout=1.0, **{"term_char": LF, **kw})  # type: ignore[arg-type]
    assert result.count == len(sink.data)
    return sink.data, result


def block(session: Session, **kw: object) -> tuple[bytes, reader.ReadResult]:
    sink = Sink()
    result = read_block(session, sink, timeout=1.0, **{"term_char": LF, **kw})  # type: ignore[arg-type]
    assert result.count == len(sink.data) == result.block_len
    return sink.data, result


# ------------------------------------------------------------------------------------ plain reads
def test_fakes_follow_the_session_contract() -> None:
    raw = RawSocket(b"ab\ncd", b"e\n")
    buf = memoryview(bytearray(16))
    assert raw.read_into(buf, 1, LF) == (3, True) and bytes(buf[:3]) == b"ab\n"
    assert raw.read_into(buf, 1, LF) == (2, False)  # no END on a raw socket: a short read
    assert raw.read_into(buf, 1, LF) == (2, True)
    with pytest.raises(VisaTimeout):
        raw.read_into(buf, 1, LF)
    end = EndSession(b"ab", b"cd", END, b"x", END)
    assert end.read_into(buf, 1, None) == (4, True) and bytes(buf[:4]) == b"abcd"
    assert end.read_into(buf, 1, None) == (1, True)


@pytest.mark.parametrize(
    "session",
    [RawSocket(b"+1.50000E+00\n"), RawSocket(b"+1.5", b"0000", b"E+00\n"), RawSocket(*pieces(b"+1.50000E+00\n", 1)),
     EndSession(b"+1.50000E+00\n", END), EndSession(*pieces(b"+1.50000E+00\n", 2), END)],
    ids=["raw", "raw-split", "raw-bytewise", "end", "end-split"],
)
def test_read_to_termination_character(session: Session) -> None:
    data, result = message(session)
    assert data == b"+1.50000E+00\n"
    assert result.status is TERM and result.end


def test_raw_socket_keeps_what_follows_the_terminator() -> None:
    raw = RawSocket(b"1\n2\n", b"3", b"\n")
    assert [message(raw)[0] for _ in range(3)] == [b"1\n", b"2\n", b"3\n"]


def test_raw_socket_without_termination_times_out() -> None:
    # No END and no termination character: the message never ends (PROTOCOLS.md §5.1).
    with pytest.raises(VisaTimeout):
        message(RawSocket(b"1.5\n"), term_char=None)


def test_end_without_termination_character() -> None:
    session = EndSession(b"no newline here", END, b"next\n", END)
    data, result = message(session, term_char=None)
    assert data == b"no newline here" and result.status is SUCCESS and result.end
    assert message(session, term_char=None)[0] == b"next\n"


def test_end_with_terminator_disabled_reads_past_lf() -> None:
    session = EndSession(b"a\nb\nc\n", END)
    data, result = message(session, term_char=None)
    assert data == b"a\nb\nc\n" and result.status is SUCCESS


def test_termination_character_before_end() -> None:
    session = EndSession(b"ab\ncd\n", END)
    assert message(session) == (b"ab\n", reader.ReadResult(3, TERM, True))
    assert message(session) == (b"cd\n", reader.ReadResult(3, TERM, True))


@pytest.mark.parametrize("term", [ord("\r"), ord(";"), 0x00])
def test_other_termination_characters(term: int) -> None:
    text = b"abc" + bytes([term]) + b"rest" + bytes([term])
    assert message(RawSocket(text), term_char=term)[0] == b"abc" + bytes([term])
    assert message(EndSession(text, END), term_char=term)[0] == b"abc" + bytes([term])


@pytest.mark.parametrize("make", [lambda: RawSocket(b"0123", b"456789\n"), lambda: EndSession(b"0123456789\n", END)],
                         ids=["raw", "end"])
def test_count_limit(make: object) -> None:
    session = make()  # type: ignore[operator]
    data, result = message(session, count=4)
    assert data == b"0123" and result == reader.ReadResult(4, MAX_CNT, False)
    data, result = message(session, count=4)
    assert data == b"4567" and result.status is MAX_CNT
    data, result = message(session, count=4)
    assert data == b"89\n" and result.status is TERM and result.end  # fewer than count: the message ended


def test_count_reached_exactly_at_terminator_is_term_char() -> None:
    data, result = message(EndSession(b"1.5\n", END), count=4)
    assert data == b"1.5\n" and result.status is TERM and result.end


def test_count_reached_exactly_at_end_is_success() -> None:
    data, result = message(EndSession(b"abcd", END), count=4, term_char=None)
    assert data == b"abcd" and result.status is SUCCESS and result.end


def test_count_never_over_reads() -> None:
    session = EndSession(b"x" * 100_000, END)
    data, result = message(session, count=70_000, term_char=None, chunk=16_384)
    assert len(data) == 70_000 and result.status is MAX_CNT
    assert sum(size for size, _ in session.reads) == 70_000
    assert message(session, term_char=None)[0] == b"x" * 30_000


def test_long_message_is_emitted_in_chunks() -> None:
    payload = waveform_bytes(200_000) + b"\n"
    session = EndSession(*pieces(payload, 9_000), END)
    sink = Sink()
    result = read_message(session, sink, timeout=1.0, term_char=None, chunk=50_000)
    assert sink.data == payload and result.count == len(payload) and result.status is SUCCESS
    first = reader.FIRST_CHUNK
    assert [len(c) for c in sink.chunks] == [first] + [50_000] * 2 + [len(payload) - first - 100_000]


def test_timeout_mid_message_propagates() -> None:
    with pytest.raises(VisaTimeout):
        message(RawSocket(b"partial answer without terminator"))


# ------------------------------------------------------------------------------------ block headers
HEADERS = [
    (b"", None),
    (b"#", None),
    (b"#1", None),
    (b"#15", (3, 5)),
    (b"#15hello", (3, 5)),
    (b"#3100", (5, 100)),
    (b"#31", None),                          # length digits still coming
    (b"#310", None),
    (b"#0", (2, None)),
    (b"#0\x00\x01", (2, None)),
    (b"#10", (3, 0)),
    (b"#9123456789", (11, 123456789)),
    (b"  #15hello", (5, 5)),                 # leading whitespace / text is skipped, as PyVISA does
    (b"CURV #15hello", (8, 5)),
    (b"x" * 24, None),                       # no '#' yet, but it may still come within 25 bytes
    (b"x" * 24 + b"#15", (27, 5)),
]


@pytest.mark.parametrize(("prefix", "expected"), HEADERS, ids=[repr(p[:16]) for p, _ in HEADERS])
def test_parse_block_header(prefix: bytes, expected: tuple[int, int | None] | None) -> None:
    assert parse_block_header(prefix) == expected
    assert parse_block_header(memoryview(bytearray(prefix))) == expected


BAD_HEADERS = [
    (b"x" * 25, "expected an IEEE 488.2 block"),
    (b"x" * 25 + b"#15hello", "expected an IEEE 488.2 block"),   # '#' too late
    (b"ERROR: no waveform data available", "expected an IEEE 488.2 block"),
    (b"#A\x00\x10", "has no length digit"),                    # HP format
    (b"#(1000)", "has no length digit"),                       # R&S big-block format
    (b"# 5hello", "has no length digit"),
    (b"#2x1", "is not decimal"),
    (b"#3 10", "is not decimal"),
    (b"#2-1", "is not decimal"),
]


@pytest.mark.parametrize(("prefix", "fragment"), BAD_HEADERS, ids=[repr(p[:12]) for p, _ in BAD_HEADERS])
def test_parse_block_header_rejects(prefix: bytes, fragment: str) -> None:
    with pytest.raises(InvalidFormat, match=fragment.replace("(", r"\(")):
        parse_block_header(prefix)


# ------------------------------------------------------------------------------------ definite blocks
DATA = waveform_bytes(1000)  # contains 0x0A (and every other byte value) several times
assert DATA.count(b"\n") >= 3


def _block_sessions(data: bytes, trailer: bytes = b"\n") -> list[Session]:
    wire = ieee_block(data) + trailer
    return [RawSocket(wire), RawSocket(*pieces(wire, 7)), RawSocket(*pieces(wire, 1)),
            EndSession(wire, END), EndSession(*pieces(wire, 7), END), EndSession(*pieces(wire, 1), END)]


SESSION_IDS = ["raw", "raw-7", "raw-1", "end", "end-7", "end-1"]


@pytest.mark.parametrize("index", range(6), ids=SESSION_IDS)
def test_definite_block_with_lf_in_data(index: int) -> None:
    session = _block_sessions(DATA)[index]
    data, result = block(session, has_end=isinstance(session, EndSession))
    assert data == DATA
    assert result == reader.ReadResult(len(DATA), SUCCESS, True, block_len=len(DATA))
    assert not session.remaining  # the trailing LF was consumed too


@pytest.mark.parametrize("index", range(6), ids=SESSION_IDS)
def test_trailing_terminator_is_consumed_before_the_next_answer(index: int) -> None:
    session = _block_sessions(DATA)[index]
    if isinstance(session, RawSocket):
        session.pieces.append(b"+1.0\n")
    else:
        session.script.extend([(b"+1.0\n", False), (b"", True)])
    assert block(session, has_end=isinstance(session, EndSession))[0] == DATA
    assert message(session) == (b"+1.0\n", reader.ReadResult(5, TERM, True))  # not a stale "\n"


def test_crlf_trailer_on_raw_socket() -> None:
    session = RawSocket(ieee_block(b"abc") + b"\r", b"\n", b"NEXT\n")
    assert block(session, has_end=False)[0] == b"abc"
    assert message(session)[0] == b"NEXT\n"


def test_crlf_trailer_split_at_the_first_buffer_boundary() -> None:
    # The first read fills FIRST_CHUNK exactly: header + data + "\r"; "\n" and END are still to come.
    data = bytes(reader.FIRST_CHUNK - 8)
    wire = ieee_block(data) + b"\r\n"
    assert len(wire) == reader.FIRST_CHUNK + 1
    session = EndSession(*pieces(wire, 4096), END, b"NEXT\n", END)
    assert block(session)[0] == data
    assert message(session)[0] == b"NEXT\n"  # not the stale "\n" of the block's trailer


def test_block_ending_with_end_and_no_trailer() -> None:
    # END arrives with the last data byte: there is no terminator to consume, and the next message is left alone.
    session = EndSession(*pieces(ieee_block(DATA), 100), END, b"NEXT\n", END)
    assert block(session)[0] == DATA
    assert message(session)[0] == b"NEXT\n"


def test_empty_block() -> None:
    session = EndSession(b"#10\n", END, b"NEXT\n", END)
    data, result = block(session)
    assert data == b"" and result.block_len == 0
    assert message(session)[0] == b"NEXT\n"


def test_text_before_the_block_is_skipped() -> None:
    assert block(EndSession(b"  CURV #15hello\n", END))[0] == b"hello"


def test_big_block_is_streamed_in_chunks() -> None:
    payload = waveform_bytes(300_000)
    session = EndSession(*pieces(ieee_block(payload) + b"\n", 32_768), END)
    sink = Sink()
    announced: list[int] = []
    result = read_block(session, sink, timeout=1.0, term_char=LF, chunk=100_000, announce=announced.append)
    assert sink.data == payload and result.block_len == 300_000
    assert announced == [300_000]
    assert max(len(c) for c in sink.chunks) <= 100_000 and len(sink.chunks) >= 3
    assert all(term is None for _, term in session.reads[:-1])  # block data is never read with a termchar


def test_announce_comes_before_any_data() -> None:
    events: list[object] = []
    read_block(EndSession(ieee_block(b"xyz") + b"\n", END), lambda v: events.append(bytes(v)), timeout=1.0,
               term_char=LF, announce=lambda n: events.append(n))
    assert events == [3, b"xyz"]


def test_oversized_block_is_refused_before_allocation() -> None:
    wire = ieee_block(bytes(5000)) + b"\n"
    session = EndSession(*pieces(wire, 512), END, b"NEXT\n", END)
    sink = Sink()
    announced: list[int] = []
    with pytest.raises(InvalidFormat, match="announced a 5000-byte block, over the 4096-byte limit") as info:
        read_block(session, sink, timeout=1.0, term_char=LF, max_block=4096, announce=announced.append)
    assert info.value.code is StatusCode.VI_ERROR_INV_FMT
    assert sink.chunks == [] and announced == []
    assert max(size for size, _ in session.reads) <= reader.FIRST_CHUNK  # no buffer sized by the announcement
    assert message(session)[0] == b"NEXT\n"  # the refused response was discarded, the next one is intact


def test_absurd_announced_length() -> None:
    session = EndSession(b"#9999999999\x00\x01\n", END)
    with pytest.raises(InvalidFormat, match="999999999-byte block"):
        read_block(session, Sink(), timeout=1.0, term_char=LF, max_block=1 << 20)


def test_message_ends_inside_the_block() -> None:
    # END after 5 of the 10 announced bytes, all in the first read: refuse, without reading on past END.
    session = EndSession(b"#210hello", END, b"NEXT\n", END)
    with pytest.raises(InvalidFormat, match="block announced 10 bytes but the message ended after 5"):
        block(session)
    assert message(session)[0] == b"NEXT\n"


def test_message_ends_inside_a_big_block() -> None:
    wire = b"#6200000" + bytes(150_000)  # 150 000 of the 200 000 announced bytes, then END
    session = EndSession(*pieces(wire, 40_000), END, b"NEXT\n", END)
    with pytest.raises(InvalidFormat, match="block announced 200000 bytes but the message ended after 150000"):
        block(session)
    assert message(session)[0] == b"NEXT\n"


def test_message_ends_right_after_the_header() -> None:
    with pytest.raises(InvalidFormat, match="ended after 0"):
        block(EndSession(b"#15", END))


@pytest.mark.parametrize(
    ("session", "fragment"),
    [
        (EndSession(b"ERROR\n", END), "expected an IEEE 488.2 block"),
        (EndSession(b"", END), "expected an IEEE 488.2 block"),
        (EndSession(b"+1.23456789012345678901234567890E+00\n", END), "expected an IEEE 488.2 block"),
        (RawSocket(b"+1.23456789012345678901234567890E+00\n"), "expected an IEEE 488.2 block"),
        (EndSession(b"#A\x00\x05hello\n", END), "has no length digit"),
        (RawSocket(b"#x5hello\n"), "has no length digit"),
        (EndSession(b"#2ab", b"cdefghij\n", END), "is not decimal"),
    ],
    ids=["short-text", "empty", "long-text", "raw-long-text", "hp-format", "raw-bad-digit", "bad-length"],
)
def test_garbage_instead_of_a_block(session: Session, fragment: str) -> None:
    with pytest.raises(InvalidFormat, match=fragment):
        block(session, has_end=isinstance(session, EndSession))


def test_header_split_across_pieces() -> None:
    session = RawSocket(b"#", b"4", b"00", b"10", b"0123456789", b"\n")
    assert block(session, has_end=False)[0] == b"0123456789"
    assert not session.remaining


# ------------------------------------------------------------------------------------ indefinite blocks
def test_indefinite_block_on_raw_socket() -> None:
    session = RawSocket(b"#0abc", b"def\n", b"NEXT\n")
    data, result = block(session, has_end=False)
    assert data == b"abcdef" and result.block_len == 6
    assert message(session)[0] == b"NEXT\n"


@pytest.mark.parametrize("size", [1000, 100_000])
def test_indefinite_block_with_end_keeps_lf_bytes(size: int) -> None:
    # With END, a #0 block runs until LF+END: LF bytes inside the data do not end it (IEEE 488.2, §5.2).
    # 100 000 bytes: longer than the first read, so the reader must read on and not stop at an LF.
    payload = waveform_bytes(size)
    session = EndSession(*pieces(b"#0" + payload + b"\n", 7000), END, b"NEXT\n", END)
    data, result = block(session)
    assert data == payload and result.block_len == size
    assert message(session)[0] == b"NEXT\n"


def test_indefinite_block_in_one_piece() -> None:
    assert block(EndSession(b"#0xyz\n", END))[0] == b"xyz"

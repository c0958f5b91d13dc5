"""Reading one response message from a session, as chunks: plain reads and IEEE 488.2 blocks.

Works over any `Session.read_into`, so every protocol gets the same termination, count and block
semantics. Data lands directly in freshly allocated chunk buffers (recv_into on the socket drivers)
and each filled chunk is handed to `emit` without further copying; the caller streams it on.

Block mode reads exactly the length the instrument announces (`#<n><len>`), whatever bytes the data
contains, then consumes the trailing terminator. An announced length beyond `max_block` is refused
before anything is allocated; a lying length simply runs into the timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from visabus.sdk.errors import InvalidFormat, StatusCode, VisaTimeout

from .sessions.base import Session

FIRST_CHUNK = 64 * 1024          # small first buffer: most answers are a few bytes
BLOCK_SEARCH = 25                # '#' must appear within this many leading bytes (as PyVISA does)
DEFAULT_MAX_BLOCK = 4 << 30      # 4 GiB
MAX_INDEFINITE = 256 << 20       # #0 blocks are buffered whole (the end is only known at END)

Emit = Callable[[memoryview], None]


@dataclass
class ReadResult:
    count: int            # bytes delivered through emit
    status: StatusCode    # VI_SUCCESS / VI_SUCCESS_TERM_CHAR / VI_SUCCESS_MAX_CNT
    end: bool
    block_len: int | None = None


def _fill(session: Session, view: memoryview, timeout: float | None, term_char: int | None,
          stop_early: bool) -> tuple[int, bool]:
    """Read into `view` until full or end; with stop_early, return after the first successful read."""
    n = 0
    while n < len(view):
        k, end = session.read_into(view[n:], timeout, term_char)
        n += k
        if end or (stop_early and n):
            return n, end
    return n, False


def read_message(session: Session, emit: Emit, *, timeout: float | None, term_char: int | None,
                 count: int | None = None, chunk: int = 1 << 20) -> ReadResult:
    """Read until END, the termination character, or `count` bytes; emit chunks of up to `chunk` bytes."""
    total = 0
    size = FIRST_CHUNK
    while True:
        if count is not None:
            size = min(size, count - total)
        buf = bytearray(size)
        n, end = _fill(session, memoryview(buf), timeout, term_char, stop_early=False)
        total += n
        if n:
            emit(memoryview(buf)[:n])
        if end:
            term_seen = term_char is not None and n > 0 and buf[n - 1] == term_char
            return ReadResult(total, StatusCode.VI_SUCCESS_TERM_CHAR if term_seen else StatusCode.VI_SUCCESS, True)
        if count is not None and total >= count:
            return ReadResult(total, StatusCode.VI_SUCCESS_MAX_CNT, False)
        size = chunk


def parse_block_header(prefix: bytes | memoryview) -> tuple[int, int | None] | None:
    """(offset of data, length or None for #0) if `prefix` holds a complete block header, else None.

    Raises InvalidFormat when the bytes cannot start a definite or indefinite block.
    """
    data = bytes(prefix[: BLOCK_SEARCH + 11])
    hash_at = data.find(b"#", 0, BLOCK_SEARCH)
    if hash_at < 0:
        if len(data) >= BLOCK_SEARCH:
            raise InvalidFormat(f"expected an IEEE 488.2 block, got {data[:40]!r}")
        return None
    if len(data) < hash_at + 2:
        return None
    digit = data[hash_at + 1 : hash_at + 2]
    if digit == b"0":
        return hash_at + 2, None
    if not digit.isdigit():
        raise InvalidFormat(f"IEEE 488.2 block header {data[hash_at:hash_at + 12]!r} has no length digit")
    ndigits = int(digit)
    start = hash_at + 2 + ndigits
    if len(data) < start:
        return None
    length_text = data[hash_at + 2 : start]
    if not length_text.isdigit():
        raise InvalidFormat(f"IEEE 488.2 block length {length_text!r} is not decimal")
    return start, int(length_text)


def read_block(session: Session, emit: Emit, *, timeout: float | None, term_char: int | None,
               chunk: int = 1 << 20, max_block: int = DEFAULT_MAX_BLOCK, has_end: bool = True,
               announce: Callable[[int], None] | None = None) -> ReadResult:
    """Read one IEEE 488.2 block response and emit only its payload (header and terminator stripped)."""
    first = bytearray(FIRST_CHUNK)
    view = memoryview(first)
    n, end = 0, False
    header = None
    while header is None:
        if end or n == len(first):
            raise InvalidFormat(f"expected an IEEE 488.2 block, got {bytes(first[:min(n, 40)])!r}")
        k, end = _fill(session, view[n:], timeout, None, stop_early=True)
        n += k
        header = parse_block_header(view[:n])
    start, length = header
    if length is None:
        return _read_indefinite(session, emit, view, start, n, end, timeout, term_char, has_end)
    if length > max_block:
        _discard_rest(session, end, timeout, term_char)
        raise InvalidFormat(f"instrument announced a {length}-byte block, over the {max_block}-byte limit; "
                            "the response was discarded")
    if announce is not None:
        announce(length)
    in_first = min(n - start, length)
    if in_first:
        emit(view[start : start + in_first])
    got = in_first
    if end and got < length:  # END in the first read: reading on would eat the next message
        raise InvalidFormat(f"block announced {length} bytes but the message ended after {got}")
    # Bytes past the block in the first read are its trailer; it is complete at END (with END) or at the
    # terminator (raw socket). A "\r" of "\r\n" alone is not: its "\n" would answer the next read.
    term = term_char if term_char is not None else 0x0A
    trailer_seen = end or (not has_end and term in view[start + length : n])
    while got < length:
        size = min(chunk, length - got)
        buf = bytearray(size)
        k, end = _fill(session, memoryview(buf), timeout, None, stop_early=False)
        if k:
            emit(memoryview(buf)[:k])
        got += k
        if end and got < length:
            raise InvalidFormat(f"block announced {length} bytes but the message ended after {got}")
        trailer_seen = end
    if not trailer_seen:
        _consume_terminator(session, timeout, term_char if term_char is not None else 0x0A, has_end)
    return ReadResult(length, StatusCode.VI_SUCCESS, True, block_len=length)


def _read_indefinite(session: Session, emit: Emit, view: memoryview, start: int, n: int, end: bool,
                     timeout: float | None, term_char: int | None, has_end: bool) -> ReadResult:
    parts = bytearray(view[start:n])
    term = term_char if term_char is not None else 0x0A
    # With END the block runs to END (LF bytes in the data do not end it); a raw socket has only the LF.
    read_term = None if has_end else term
    while not end:
        buf = bytearray(FIRST_CHUNK)
        k, end = session.read_into(memoryview(buf), timeout, read_term)
        parts += buf[:k]
        if len(parts) > MAX_INDEFINITE:
            _discard_rest(session, end, timeout, term_char)
            raise InvalidFormat(f"indefinite (#0) block exceeds {MAX_INDEFINITE} bytes; use a definite block")
    if parts.endswith(b"\n"):
        del parts[-1:]
    emit(memoryview(parts))
    return ReadResult(len(parts), StatusCode.VI_SUCCESS, True, block_len=len(parts))


def _consume_terminator(session: Session, timeout: float | None, term_char: int, has_end: bool) -> None:
    buf = bytearray(256)
    try:
        for _ in range(64):
            k, end = session.read_into(memoryview(buf), timeout if has_end else min(timeout or 0.5, 0.5), term_char)
            if end or (not has_end and k and buf[k - 1] == term_char):
                return
    except VisaTimeout:
        return  # no terminator after the block: nothing more to consume


def _discard_rest(session: Session, end: bool, timeout: float | None, term_char: int | None) -> None:
    buf = bytearray(FIRST_CHUNK)
    while not end:
        _, end = session.read_into(memoryview(buf), timeout, term_char)

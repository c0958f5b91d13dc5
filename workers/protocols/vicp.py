"""VICP (LeCroy Versatile Instrument Control Protocol) framing, sans-IO.

Every block in either direction is an 8-byte header followed by `length` payload bytes:

    byte 0    operation flags (`Op`: DATA 0x80, REMOTE 0x40, LOCKOUT 0x20, CLEAR 0x10, SRQ 0x08,
              SERIAL_POLL 0x04, reserved 0x02, EOI 0x01)
    byte 1    protocol version, always 1
    byte 2    sequence number: 1..255 in "version 1a", 0 from pre-2003 peers
    byte 3    unused (0; ignored on receive)
    byte 4-7  payload length, unsigned 32-bit big-endian

A message is one or more DATA blocks, the last one carrying EOI. The client's sequence number advances
only after an EOI block (255 wraps to 1); a device tags each response with the number of the command
that produced it, which lets a client discard unread (stale) responses as IEEE 488.2 requires.

Nothing here touches a socket. `BlockReader` takes bytes in two ways:

* buffered - `feed(data)` then iterate `blocks()` for complete `(header, payload)` blocks. Payloads are
  bounded by `max_payload`: a header announcing more raises RemoteProtocolError before anything is
  allocated. Simulated servers and tests use this.
* streaming - `next_header()` then move the payload out piecewise: `payload_into(dest)` copies what is
  already buffered, and once the buffer is empty the caller may `recv_into` its own memory and report
  it with `payload_received(n)`. A 64 MiB block therefore lands in the caller's buffer without an
  intermediate copy, and a lying length costs nothing but a wait.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import LocalProtocolError, RemoteProtocolError

DEFAULT_PORT = 1861
HEADER_SIZE = 8
PROTOCOL_VERSION = 1
MAX_LENGTH = 0xFFFF_FFFF
MAX_SEQUENCE = 255
DEFAULT_MAX_PAYLOAD = 1 << 20  # what a BlockReader buffers for its owner in buffered mode
MAX_SRQ_PAYLOAD = 256           # an SRQ notification carries '1' or '0'; anything longer is garbage
OOB_SERIAL_POLL = b"S"          # v1a out-of-band serial-poll request (sent as TCP urgent data)

_HEADER = struct.Struct("!BBBBI")


class Op(enum.IntFlag):
    """Bits of the header's operation byte."""

    EOI = 0x01
    RESERVED = 0x02
    SERIAL_POLL = 0x04
    SRQ = 0x08
    CLEAR = 0x10
    LOCKOUT = 0x20
    REMOTE = 0x40
    DATA = 0x80


@dataclass(frozen=True, slots=True)
class Header:
    op: Op
    seq: int = 0
    length: int = 0
    version: int = PROTOCOL_VERSION

    @property
    def eoi(self) -> bool:
        return bool(self.op & Op.EOI)

    @property
    def srq(self) -> bool:
        return bool(self.op & Op.SRQ)

    @property
    def clear(self) -> bool:
        return bool(self.op & Op.CLEAR)

    @property
    def serial_poll(self) -> bool:
        return bool(self.op & Op.SERIAL_POLL)

    @property
    def remote(self) -> bool:
        return bool(self.op & Op.REMOTE)

    @property
    def lockout(self) -> bool:
        return bool(self.op & Op.LOCKOUT)

    def encode(self) -> bytes:
        """The 8 header bytes. LocalProtocolError for values the header cannot carry."""
        if not 0 <= int(self.op) <= 0xFF:
            raise LocalProtocolError(f"VICP operation byte {int(self.op):#x} out of range")
        if not 0 <= self.seq <= MAX_SEQUENCE:
            raise LocalProtocolError(f"VICP sequence number {self.seq} out of range 0..255")
        if not 0 <= self.length <= MAX_LENGTH:
            raise LocalProtocolError(f"VICP block of {self.length} bytes does not fit the 32-bit length field")
        if not 0 <= self.version <= 0xFF:
            raise LocalProtocolError(f"VICP version {self.version} out of range")
        return _HEADER.pack(int(self.op), self.version, self.seq, 0, self.length)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Header:
        """Parse 8 header bytes. RemoteProtocolError for a header VICP calls invalid."""
        if len(data) != HEADER_SIZE:
            raise RemoteProtocolError(f"VICP header must be {HEADER_SIZE} bytes, got {len(data)}")
        op, version, seq, _unused, length = _HEADER.unpack(data)
        if version != PROTOCOL_VERSION or not op & Op.DATA:
            raise RemoteProtocolError(
                f"invalid VICP header {bytes(data).hex(' ')}: "
                + ("version must be 1" if version != PROTOCOL_VERSION else "DATA bit (0x80) not set")
            )
        return cls(Op(op), seq, length, version)


def encode_header(op: Op | int, seq: int, length: int) -> bytes:
    """Header bytes for a block; DATA is always set (every valid VICP block carries it)."""
    return Header(Op(op) | Op.DATA, seq, length).encode()


def next_sequence(seq: int) -> int:
    """The number after `seq`: 1..255, wrapping 255 -> 1 (0 means "no sequence numbers", never used)."""
    return seq % MAX_SEQUENCE + 1


def is_stale(seq: int, last_sent: int) -> bool:
    """True if a block tagged `seq` answers a command older than the last block we sent.

    Distances are taken modulo 255 (the sequence space): up to 127 behind is stale; 0 is current; a tag
    "ahead" of us cannot be an old response, so it is kept. Tag 0 (a v1 peer) or nothing sent yet:
    never stale.
    """
    if seq == 0 or last_sent == 0:
        return False
    behind = (last_sent - seq) % MAX_SEQUENCE
    return 0 < behind <= 127


def parse_srq_payload(payload: bytes | bytearray | memoryview) -> bool:
    """An SRQ notification's state: ASCII '1' asserted, '0' deasserted. RemoteProtocolError otherwise."""
    if len(payload) == 0 or len(payload) > MAX_SRQ_PAYLOAD:
        raise RemoteProtocolError(f"VICP SRQ notification with {len(payload)} payload bytes (expected '1'/'0')")
    first = payload[0]
    if first == 0x31:
        return True
    if first == 0x30:
        return False
    raise RemoteProtocolError(f"VICP SRQ notification payload starts with {first:#04x}, expected '1' or '0'")


class SequenceCounter:
    """The sender's sequence numbers: a block carries `next`; EOI blocks advance it afterwards."""

    __slots__ = ("last", "next")

    def __init__(self) -> None:
        self.next = 1
        self.last = 0  # number carried by the last block sent; 0 before the first

    def take(self, eoi: bool) -> int:
        seq = self.last = self.next
        if eoi:
            self.next = next_sequence(seq)
        return seq

    def reset(self) -> None:
        self.next, self.last = 1, 0


@dataclass(frozen=True, slots=True)
class Block:
    header: Header
    payload: bytes


class BlockReader:
    """Splits a received VICP byte stream into blocks (see the module docstring for the two modes)."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        if max_payload < 0:
            raise LocalProtocolError(f"max_payload must be >= 0, got {max_payload}")
        self.max_payload = max_payload
        self._buf = bytearray()
        self._pos = 0                     # start of unconsumed bytes in _buf
        self._header: Header | None = None
        self._remaining = 0

    # ------------------------------------------------------------------ state
    @property
    def buffered(self) -> int:
        """Received bytes not yet consumed."""
        return len(self._buf) - self._pos

    @property
    def header(self) -> Header | None:
        """The block whose payload is being read, or None between blocks."""
        return self._header

    @property
    def remaining(self) -> int:
        """Payload bytes of the current block not yet consumed."""
        return self._remaining

    def reset(self) -> None:
        """Forget everything (after a reconnect)."""
        self._buf.clear()
        self._pos = 0
        self._header = None
        self._remaining = 0

    # ------------------------------------------------------------------ input
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]  # compact: keeps total work linear in the bytes received
            self._pos = 0
        self._buf += data

    # ------------------------------------------------------------------ buffered mode
    def blocks(self) -> Iterator[Block]:
        """Yield every complete block buffered so far. Must not be mixed with a streaming read in progress."""
        if self._header is not None:
            raise LocalProtocolError("blocks() called while a streamed block is being read")
        while self.buffered >= HEADER_SIZE:
            header = self._peek_header()
            if header.length > self.max_payload:
                raise RemoteProtocolError(
                    f"VICP block announces {header.length} bytes, more than the {self.max_payload} accepted"
                )
            end = self._pos + HEADER_SIZE + header.length
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[self._pos + HEADER_SIZE : end])
            self._pos = end
            yield Block(header, payload)

    # ------------------------------------------------------------------ streaming mode
    def peek_header(self) -> Header | None:
        """The next block's header if it is buffered, without consuming it (None between blocks only)."""
        if self._header is not None or self.buffered < HEADER_SIZE:
            return None
        return self._peek_header()

    def next_header(self, max_length: int = MAX_LENGTH) -> Header | None:
        """Start the next block if its header is buffered; None if more bytes are needed.

        A zero-length block is complete at once (`header` goes back to None).
        """
        if self._header is not None:
            raise LocalProtocolError("next_header() called before the current block's payload was consumed")
        if self.buffered < HEADER_SIZE:
            return None
        header = self._peek_header()
        if header.length > max_length:
            raise RemoteProtocolError(f"VICP block announces {header.length} bytes, more than the {max_length} accepted")
        self._pos += HEADER_SIZE
        if header.length:
            self._header, self._remaining = header, header.length
        return header

    def buffered_payload(self, limit: int | None = None) -> memoryview:
        """View of the current block's buffered payload (not consumed). Release it before feeding or consuming."""
        n = min(self._remaining, self.buffered)
        if limit is not None:
            n = min(n, limit)
        return memoryview(self._buf)[self._pos : self._pos + n]

    def skip_payload(self, n: int) -> None:
        """Consume `n` buffered payload bytes (after reading them via buffered_payload)."""
        if n < 0 or n > min(self._remaining, self.buffered):
            raise LocalProtocolError(f"cannot skip {n} payload bytes ({self.buffered} buffered)")
        self._pos += n
        self._advance(n)

    def payload_into(self, dest: memoryview) -> int:
        """Copy buffered payload bytes into `dest`; returns how many."""
        n = min(len(dest), self._remaining, self.buffered)
        if n:
            dest[:n] = memoryview(self._buf)[self._pos : self._pos + n]
            self._pos += n
            self._advance(n)
        return n

    def payload_wanted(self) -> int:
        """Payload bytes the caller may receive directly (0 while buffered bytes remain to be taken first)."""
        return 0 if self.buffered else self._remaining

    def payload_received(self, n: int) -> None:
        """The caller received `n` payload bytes straight from the transport into its own memory."""
        if self.buffered:
            raise LocalProtocolError("payload received directly while buffered bytes were still pending")
        if n < 0 or n > self._remaining:
            raise LocalProtocolError(f"{n} payload bytes received but only {self._remaining} expected")
        self._advance(n)

    # ------------------------------------------------------------------ internals
    def _peek_header(self) -> Header:
        return Header.decode(memoryview(self._buf)[self._pos : self._pos + HEADER_SIZE])

    def _advance(self, n: int) -> None:
        self._remaining -= n
        if self._remaining == 0:
            self._header = None
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0


class MessageAssembler:
    """Joins DATA blocks into messages (a message ends with an EOI block), bounded by `max_message`."""

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._parts: list[bytes] = []
        self._size = 0

    @property
    def pending(self) -> int:
        return self._size

    def clear(self) -> None:
        self._parts.clear()
        self._size = 0

    def add(self, block: Block) -> bytes | None:
        """Add one block's payload; return the whole message when the block carries EOI."""
        self._size += len(block.payload)
        if self._size > self.max_message:
            self.clear()
            raise RemoteProtocolError(f"VICP message longer than {self.max_message} bytes")
        if block.payload:
            self._parts.append(block.payload)
        if not block.header.eoi:
            return None
        message = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self.clear()
        return message

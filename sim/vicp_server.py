"""Simulated LeCroy-style VICP server (`VICP::host[,port]::INSTR`, TCP port 1861 on a real scope).

Per connection:
- a receive loop parses 8-byte headers (shared codec, bounded lengths) and assembles DATA blocks until
  EOI into one program message for the SCPI engine; CLEAR is applied before the block's data;
  an in-band SERIAL_POLL block is answered with a one-byte block holding the status byte;
- TCP urgent data 'S' (the v1a out-of-band serial poll) is answered with the status byte as urgent data;
- a sender thread takes responses from the engine and sends them as DATA blocks (at most `max_block`
  bytes each, EOI on the last), tagged with the sequence number of the command that produced them, so
  clients can discard responses they no longer want;
- a service request from the engine is announced with a DATA|SRQ block whose payload is b"1";
- the REMOTE / LOCKOUT bits of received data blocks are tracked (and logged) per connection.
"""

from __future__ import annotations

import errno
import fcntl
import select
import socket
import struct
import threading
from typing import Any

import structlog

from visabus.workers.protocols.errors import RemoteProtocolError
from visabus.workers.protocols.vicp import (
    DEFAULT_PORT,
    HEADER_SIZE,
    OOB_SERIAL_POLL,
    Block,
    BlockReader,
    MessageAssembler,
    Op,
    encode_header,
)

from .scpi import Instrument, ScpiSession
from .server import InstrumentServer

log = structlog.get_logger(__name__)

MAX_MESSAGE = 256 << 20       # longest program message accepted from a client
DEFAULT_MAX_BLOCK = 8 << 20   # responses longer than this go out as several blocks
_RECV_CHUNK = 1 << 16
_SIOCATMARK = 0x8905          # Linux ioctl: is the next byte to read the urgent byte?


class _Connection:
    def __init__(self, sock: socket.socket, peer: Any, instrument: Instrument, max_block: int) -> None:
        self.sock = sock
        self.peer = str(peer)
        self.max_block = max_block
        self.session = ScpiSession(instrument, self._on_srq)
        self.send_lock = threading.Lock()
        self.closed = threading.Event()
        self.last_seq = 0
        self.remote = False
        self.lockout = False

    # ------------------------------------------------------------------ receive side
    def run(self) -> None:
        sender = threading.Thread(target=self._send_responses, name="vicp-sim-send", daemon=True)
        sender.start()
        reader = BlockReader(max_payload=MAX_MESSAGE)
        message = MessageAssembler(MAX_MESSAGE)
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLPRI)
        try:
            while True:
                events = 0
                for _fd, ev in poller.poll():
                    events |= ev
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and not self._at_urgent_mark(events):
                    chunk = self.sock.recv(_RECV_CHUNK)  # stops at the urgent mark by itself
                    if not chunk:
                        return
                    reader.feed(chunk)
                    for block in reader.blocks():
                        self._handle_block(block, message)
                elif events & select.POLLPRI:
                    # Everything sent before the urgent byte has been parsed: a poll must not overtake
                    # the command written just before it.
                    self._out_of_band()
        except RemoteProtocolError as exc:
            log.warning("sim.vicp.protocol_error", peer=self.peer, error=str(exc))
        finally:
            self.closed.set()
            self.session.close()
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _handle_block(self, block: Block, message: MessageAssembler) -> None:
        header = block.header
        self.last_seq = header.seq
        if header.clear:
            message.clear()
            self.session.device_clear()
            log.debug("sim.vicp.device_clear", peer=self.peer, seq=header.seq)
        if header.serial_poll:
            stb = self.session.serial_poll()
            self._send_block(bytes((stb,)), header.seq, eoi=True)
        carries_data = bool(block.payload) or header.eoi  # CLEAR / poll blocks say nothing about remote state
        if carries_data and (header.remote, header.lockout) != (self.remote, self.lockout):
            self.remote, self.lockout = header.remote, header.lockout
            log.info("sim.vicp.remote_state", peer=self.peer, remote=self.remote, lockout=self.lockout)
        text = message.add(block)
        if text is not None:
            self.session.write(text, tag=header.seq)  # the response carries the command's sequence number

    def _at_urgent_mark(self, events: int) -> bool:
        """True when an urgent byte is pending and no ordinary data precedes it (SIOCATMARK)."""
        if not events & select.POLLPRI:
            return False
        try:
            return bool(struct.unpack("i", fcntl.ioctl(self.sock.fileno(), _SIOCATMARK, b"\0" * 4))[0])
        except OSError:
            return True  # no SIOCATMARK here: answer the poll, as before

    def _out_of_band(self) -> None:
        try:
            request = self.sock.recv(1, socket.MSG_OOB)
        except BlockingIOError:
            return  # urgent pointer seen, byte not here yet: the next poll reports it again
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EAGAIN):
                return
            raise
        if request != OOB_SERIAL_POLL:
            log.warning("sim.vicp.unknown_oob", peer=self.peer, byte=request.hex())
            return
        stb = self.session.serial_poll()
        # Answer from a helper thread: an urgent send can block when the send buffer is full of a big
        # response the client has not read yet, and the receive loop must keep going meanwhile.
        threading.Thread(target=self._send_oob, args=(stb,), name="vicp-sim-oob", daemon=True).start()

    def _send_oob(self, stb: int) -> None:
        try:
            self.sock.send(bytes((stb,)), socket.MSG_OOB)
        except OSError as exc:
            log.debug("sim.vicp.oob_send_failed", peer=self.peer, error=str(exc))

    # ------------------------------------------------------------------ send side
    def _send_responses(self) -> None:
        while not self.closed.is_set():
            item = self.session.wait_tagged(timeout=0.5)
            if item is None:
                continue
            data, tag = item
            try:
                self._send_message(data, tag)
            except OSError:
                return

    def _send_message(self, data: bytes, tag: int) -> None:
        view = memoryview(data)
        total = len(view)
        offset = 0
        while True:
            size = min(self.max_block, total - offset)
            last = offset + size >= total
            self._send_block(view[offset : offset + size], tag, eoi=last)
            offset += size
            if last:
                return

    def _send_block(self, payload: bytes | memoryview, seq: int, *, eoi: bool, op: Op = Op.DATA) -> None:
        header = encode_header(op | (Op.EOI if eoi else 0), seq, len(payload))
        with self.send_lock:
            _send_vectors(self.sock, [memoryview(header), memoryview(payload)])

    def _on_srq(self, stb: int) -> None:
        if self.closed.is_set():
            return
        try:
            self._send_block(b"1", self.last_seq, eoi=False, op=Op.DATA | Op.SRQ)
        except OSError as exc:
            log.debug("sim.vicp.srq_send_failed", peer=self.peer, error=str(exc))
        log.debug("sim.vicp.srq", peer=self.peer, stb=stb)


def _send_vectors(sock: socket.socket, parts: list[memoryview]) -> None:
    """sendmsg until every byte of `parts` is out (sendmsg may send only a prefix)."""
    parts = [p for p in parts if len(p)]
    while parts:
        sent = sock.sendmsg(parts)
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts.pop(0)
        if sent:
            parts[0] = parts[0][sent:]


class VicpServer(InstrumentServer):
    """VICP in front of the shared SCPI engine; the identity is the caller's Instrument's."""

    protocol = "vicp"

    def __init__(
        self,
        instrument: Instrument,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_block: int = DEFAULT_MAX_BLOCK,
    ) -> None:
        if max_block < 1:
            raise ValueError(f"max_block must be >= 1, got {max_block}")
        self.max_block = max_block
        super().__init__(instrument, host, port)

    @property
    def resource(self) -> str:
        host = self.url_host if self.port == DEFAULT_PORT else f"{self.url_host},{self.port}"
        return f"VICP::{host}::INSTR"

    def handle_connection(self, sock: socket.socket, peer: Any) -> None:
        log.debug("sim.vicp.connected", peer=str(peer), header_size=HEADER_SIZE)
        _Connection(sock, peer, self.instrument, self.max_block).run()

"""VICP driver (`VICP[board]::host[,port]::INSTR`): pyvicp's connection, our framing on its socket.

pyvicp (the project's chosen VICP client) connects - `pyvicp.Client(host, port=...)` with its
TCP_NODELAY and SO_LINGER(0) settings - and provides `keepalive` and `close()`. Everything on the wire
after that goes through the sans-IO codec `visabus.workers.protocols.vicp` on pyvicp's socket, because
pyvicp 1.1.0 gets it wrong: a 100 s sleep in device clear, SRQ state never parsed, an endless loop when
the peer closes, an out-of-band serial poll that times out, bytes lost on a timeout, unbounded
allocations, REMOTE/LOCKOUT never sent, no way to interrupt a blocked call. docs/vicp.md says what each
workaround covers and which test proves it.

Data moves with recv_into straight into the caller's buffer. All waiting is a poll() that also watches
a wake-up pipe, so clear()/abort() from the worker's control thread interrupt a blocked read or write
(it raises Aborted); operations started meanwhile wait for the interrupt instead. Stale responses
(tagged with an older sequence number) are dropped, as IEEE 488.2 "unread response" handling wants.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import socket
import threading
import time
from collections.abc import Iterator

import pyvicp
import structlog

from visabus.sdk.errors import (
    Aborted,
    ConnectionLost,
    IOFailure,
    NotSupported,
    ResourceNotFound,
    VisaBusError,
    VisaTimeout,
)
from visabus.sdk.resources import Resource
from visabus.workers.protocols.errors import ProtocolError, RemoteProtocolError
from visabus.workers.protocols.vicp import (
    HEADER_SIZE,
    MAX_LENGTH,
    MAX_SRQ_PAYLOAD,
    OOB_SERIAL_POLL,
    BlockReader,
    Op,
    SequenceCounter,
    encode_header,
    is_stale,
    parse_srq_payload,
)

from .base import Session, SessionAttributes, SrqHandler

log = structlog.get_logger(__name__)

STB_RQS = 0x40
KEEPALIVE_IDLE_S = 60
_CHUNK = 1 << 16
_RDHUP = getattr(select, "POLLRDHUP", 0)
_DEAD = select.POLLHUP | select.POLLERR | select.POLLNVAL | _RDHUP
SERIAL_POLL_MODES = ("auto", "oob", "inband")  # attributes.extra["vicp_serial_poll"]


class VicpSession(Session):
    def __init__(self, resource: Resource, attributes: SessionAttributes | None = None) -> None:
        super().__init__(resource, attributes)
        self._log = log.bind(resource=str(resource))
        self._client: pyvicp.Client | None = None
        self._sock: socket.socket | None = None
        self._reader = BlockReader(max_payload=MAX_SRQ_PAYLOAD)
        self._seq = SequenceCounter()
        self._scratch = memoryview(bytearray(_CHUNK))
        self._peer_v1a: bool | None = None      # None until a response header showed its sequence number
        self._tx_broken = False                  # a write stopped inside a block: the wire is out of step
        self._remote = False
        self._lockout = False
        self._io_lock = threading.Lock()         # one wire operation at a time (executor, clear, monitor)
        self._oob_lock = threading.Lock()        # one urgent-data serial poll at a time
        self._abort = threading.Event()          # set while clear()/abort() waits for the wire
        self._interrupts = 0                     # clear()/abort()/close() calls under way
        self._interrupt_epoch = 0                # counts clear()/abort()/close() calls
        self._op_epoch: int | None = None        # epoch when the worker's current operation began
        self._interrupt_done = threading.Condition()
        self._wake_r, self._wake_w = _pipe()     # wakes poll() when clear()/abort() is called
        self._op_generation = 0
        self._srq_pending = threading.Event()
        self._srq_stop = threading.Event()
        self._srq_thread: threading.Thread | None = None
        self._mon_r, self._mon_w = _pipe()       # wakes the SRQ monitor

    # ------------------------------------------------------------------------------ lifecycle
    def open(self, timeout: float | None) -> None:
        with self._io_lock:
            self._connect(timeout)

    def _connect(self, timeout: float | None) -> None:
        self._disconnect()
        host, port = self.resource.host, self.resource.transport_port
        try:
            # Host and port passed separately: the override PyVISA-py loses (it passes "host,port").
            client = pyvicp.Client(host, port=port, timeout=timeout)
        except TimeoutError:
            raise VisaTimeout(f"{self.resource}: no TCP connection to {host}:{port} within {timeout}s") from None
        except OSError as exc:
            raise ResourceNotFound(
                f"{self.resource}: cannot connect to {host}:{port}: {exc.strerror or exc}; "
                "is the instrument on and VICP (port 1861 unless given) reachable?"
            ) from None
        sock = getattr(client, "_socket", None)  # pyvicp exposes no accessor for its socket
        if not isinstance(sock, socket.socket):
            client.close()
            raise IOFailure(f"{self.resource}: pyvicp {pyvicp.__version__} has no socket to run VICP on")
        sock.setblocking(False)  # all waiting happens in our poll(), which also watches the wake-up pipe
        self._client, self._sock = client, sock
        self._apply_socket_options()
        self._reader.reset()
        self._seq.reset()
        self._peer_v1a = None
        self._tx_broken = False
        self._poke_monitor()
        self._log.debug("vicp.connected", host=host, port=port)

    def close(self) -> None:
        self.enable_srq(None)
        with self._interrupt():
            self._disconnect()

    def _disconnect(self) -> None:
        client, self._client, self._sock = self._client, None, None
        if client is not None:
            client.close()  # pyvicp: shutdown + close, OSError swallowed

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def begin(self) -> None:
        """A worker operation starts: a clear()/abort() before it ends ends it (its next call raises Aborted)."""
        self._op_epoch = self._interrupt_epoch

    def __del__(self) -> None:
        for name in ("_wake_r", "_wake_w", "_mon_r", "_mon_w"):
            fd = getattr(self, name, None)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    # ------------------------------------------------------------------------------ I/O
    def write(self, data: bytes | memoryview, timeout: float | None) -> int:
        view = memoryview(data).cast("B")
        eoi = self.attributes.send_end
        op = Op.DATA | (Op.REMOTE if self._remote else 0) | (Op.LOCKOUT if self._lockout else 0)
        with self._operation("write") as sock:
            deadline = _deadline(timeout)
            offset = 0
            while True:  # one block unless the message exceeds the 32-bit length field
                size = min(MAX_LENGTH, len(view) - offset)
                last = offset + size == len(view)
                seq = self._seq.take(eoi and last)
                header = encode_header(op | (Op.EOI if eoi and last else 0), seq, size)
                self._send(sock, [memoryview(header), view[offset : offset + size]], deadline)
                offset += size
                if last:
                    return len(view)

    def read_into(self, buffer: memoryview, timeout: float | None, term_char: int | None) -> tuple[int, bool]:
        dest = buffer.cast("B") if buffer.format != "B" else buffer
        if len(dest) == 0:
            return 0, False
        with self._operation("read") as sock:
            deadline = _deadline(timeout)
            reader = self._reader
            n = 0
            try:
                while n < len(dest):
                    self._to_response(sock, deadline, wait=True)
                    block = reader.header
                    if block is None:  # a data header is next: start its block
                        header = reader.next_header()
                        if header is not None and header.length == 0:
                            if header.eoi:
                                return n, True
                            continue
                        block = reader.header
                        if block is None:
                            continue
                    if term_char is not None:
                        got, found = self._payload_until(sock, dest[n:], term_char, deadline)
                        n += got
                        if found:
                            return n, True
                    else:
                        n += self._payload_into(sock, dest[n:], deadline)
                    if reader.header is None and block.eoi:
                        return n, True
                return n, False
            except VisaTimeout:
                if n:  # bytes already in the caller's buffer are never dropped; the next read times out
                    return n, False
                raise

    def _payload_into(self, sock: socket.socket, dest: memoryview, deadline: float | None) -> int:
        """Move payload of the current block into `dest`: buffered bytes first, then recv_into directly."""
        reader = self._reader
        got = reader.payload_into(dest)
        if got:
            return got
        want = min(reader.payload_wanted(), len(dest))
        got = self._recv_into(sock, dest[:want], deadline, wait=True)
        reader.payload_received(got)
        return got

    def _payload_until(
        self, sock: socket.socket, dest: memoryview, term_char: int, deadline: float | None
    ) -> tuple[int, bool]:
        """Like _payload_into but stops after `term_char`; bytes after it stay buffered for the next read."""
        reader = self._reader
        if not reader.buffered:
            self._fill(sock, deadline, wait=True)
        with reader.buffered_payload(len(dest)) as chunk:
            at = chunk.tobytes().find(term_char)
            count = at + 1 if at >= 0 else len(chunk)
            dest[:count] = chunk[:count]
        reader.skip_payload(count)
        return count, at >= 0

    # ------------------------------------------------------------------------------ control
    def clear(self) -> None:
        """Device clear: unblock any read/write (Aborted), send CLEAR, drop stale responses by sequence."""
        with self._interrupt():
            sock = self._sock
            if sock is None:
                raise ConnectionLost(f"{self.resource}: not connected; reopen the session")
            if self._tx_broken or self._peer_v1a is False:
                # Half a block on the wire, or a v1 peer whose responses carry no sequence number to
                # tell stale from fresh: only a new connection is clean (what LeCroy's own client does).
                self._log.info("vicp.clear_reconnect", v1_peer=self._peer_v1a is False, tx_broken=self._tx_broken)
                self._connect(self.attributes.timeout)
                return
            header = encode_header(Op.CLEAR, self._seq.take(False), 0)
            try:
                self._send(sock, [memoryview(header)], _deadline(self.attributes.timeout))
            except OSError as exc:
                self._disconnect()
                raise ConnectionLost(f"{self.resource}: connection lost during device clear ({exc})") from None
            self._log.debug("vicp.cleared", seq=self._seq.last)

    def abort(self) -> None:
        """Unblock a read/write in progress (it raises Aborted); nothing is sent to the instrument."""
        with self._interrupt():
            pass

    def read_stb(self) -> int:
        mode = str(self.attributes.extra.get("vicp_serial_poll", "auto"))
        if mode not in SERIAL_POLL_MODES:
            raise NotSupported(f"{self.resource}: vicp_serial_poll must be one of {SERIAL_POLL_MODES}, not {mode!r}")
        with self._operation("serial poll") as sock:
            deadline = _deadline(self.attributes.timeout)
            if mode == "inband" or (mode == "auto" and self._peer_v1a is False):
                return self._inband_poll(sock, deadline)
            with self._oob_lock:
                return self._oob_poll(sock, deadline)

    def _oob_poll(self, sock: socket.socket, deadline: float | None) -> int:
        with contextlib.suppress(OSError):
            sock.recv(1, socket.MSG_OOB)  # a late answer to an earlier, timed-out poll
        while True:
            try:
                sock.send(OOB_SERIAL_POLL, socket.MSG_OOB)
                break
            except BlockingIOError:
                self._wait(sock, select.POLLOUT, deadline, "serial poll")
        while True:
            events = self._wait(sock, select.POLLPRI | _RDHUP, deadline, "serial poll")
            try:
                return sock.recv(1, socket.MSG_OOB)[0]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            if events & _DEAD:
                raise ConnectionLost(f"{self.resource}: connection closed during a serial poll")

    def _inband_poll(self, sock: socket.socket, deadline: float | None) -> int:
        header = encode_header(Op.SERIAL_POLL, self._seq.take(False), 0)
        self._send(sock, [memoryview(header)], deadline)
        reader = self._reader
        while True:
            self._to_response(sock, deadline, wait=True)
            block = reader.next_header(max_length=MAX_SRQ_PAYLOAD) if reader.header is None else reader.header
            if block is None or block.length == 0:
                continue
            while reader.buffered < reader.remaining:
                self._fill(sock, deadline, wait=True)
            with reader.buffered_payload(1) as first:
                stb = first[0]
            self._discard_payload(sock, deadline, wait=True)
            return stb

    def remote(self) -> None:
        """REMOTE on every following data block (a flag-only block would make pending responses stale)."""
        self._remote = True

    def local(self) -> None:
        self._remote = self._lockout = False

    def lockout(self, enabled: bool = True) -> None:
        """Local lockout (front panel locked) on following data blocks; implies remote."""
        self._lockout = enabled
        self._remote = self._remote or enabled

    def set_attribute(self, name: str, value: object) -> None:
        super().set_attribute(name, value)
        if name in ("keepalive", "nodelay") and self._sock is not None:
            self._apply_socket_options()

    def _apply_socket_options(self) -> None:
        client, sock = self._client, self._sock
        if client is None or sock is None:
            return
        client.keepalive = self.attributes.keepalive  # pyvicp's own property (SO_KEEPALIVE)
        if self.attributes.keepalive and hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(self.attributes.nodelay))

    # ------------------------------------------------------------------------------ service requests
    def enable_srq(self, handler: SrqHandler | None) -> None:
        self.srq_handler = handler
        thread = self._srq_thread
        if handler is not None and thread is None:
            self._srq_stop.clear()
            self._srq_thread = threading.Thread(target=self._srq_monitor, name="vicp-srq", daemon=True)
            self._srq_thread.start()
        elif handler is None and thread is not None:
            self._srq_stop.set()
            self._poke_monitor()
            if thread is not threading.current_thread():
                thread.join(timeout=5)
            self._srq_thread = None

    def _note_srq(self, asserted: bool) -> None:
        self._log.debug("vicp.srq_notification", asserted=asserted)
        if asserted and self.srq_handler is not None:
            self._srq_pending.set()
            self._poke_monitor()

    def _srq_monitor(self) -> None:
        """Watch the idle connection for SRQ blocks; deliver each SRQ with the status byte it polled."""
        busy_generation: int | None = None  # response data waits for the executor: ignore the socket until its next op
        while not self._srq_stop.is_set():
            if self._srq_pending.is_set():
                self._srq_pending.clear()
                self._deliver_srq()
                continue
            sock = self._sock
            watch = sock is not None and self._op_generation != busy_generation
            poller = select.poll()
            poller.register(self._mon_r, select.POLLIN)
            if watch and sock is not None:
                try:
                    poller.register(sock, select.POLLIN)
                except ValueError:  # closed under us by a reconnect: look again
                    continue
            ready = {fd for fd, _ in poller.poll()}
            _drain(self._mon_r)
            if sock is None or not watch or sock.fileno() not in ready:
                continue
            generation = self._op_generation
            if not self._io_lock.acquire(blocking=False):
                busy_generation = generation  # the executor is on the wire and will see any SRQ itself
                continue
            try:
                if self._sock is sock and self._to_response(sock, None, wait=False):
                    busy_generation = generation
            except (VisaBusError, ProtocolError, OSError):
                busy_generation = generation  # let the executor's next operation meet and report it
            finally:
                self._io_lock.release()

    def _deliver_srq(self) -> None:
        stb = STB_RQS
        sock = self._sock
        try:
            if sock is not None and self._peer_v1a is not False:
                with self._oob_lock:
                    stb = self._oob_poll(sock, _deadline(self.attributes.timeout))
            elif sock is not None:
                stb = self.read_stb()
        except (VisaBusError, OSError) as exc:
            self._log.warning("vicp.srq_poll_failed", error=str(exc))
        handler = self.srq_handler
        if handler is None:
            return
        try:
            handler(stb)
        except Exception:  # noqa: BLE001 - the handler is the worker's code; keep monitoring regardless
            self._log.exception("vicp.srq_handler_failed")

    def _poke_monitor(self) -> None:
        if self._srq_thread is not None:
            _poke(self._mon_w)

    # ------------------------------------------------------------------------------ stream engine
    def _to_response(self, sock: socket.socket, deadline: float | None, wait: bool) -> bool:
        """Consume SRQ blocks and stale responses at the head of the stream.

        True when the head is response data for the caller (a block in progress or a data header);
        False only with wait=False when more bytes are needed.
        """
        reader = self._reader
        while True:
            current = reader.header
            if current is not None:
                if not is_stale(current.seq, self._seq.last):
                    return True
                if not self._discard_payload(sock, deadline, wait):
                    return False
                continue
            header = reader.peek_header()
            if header is None or (header.srq and reader.buffered < HEADER_SIZE + header.length):
                if header is not None and header.length > MAX_SRQ_PAYLOAD:
                    raise RemoteProtocolError(f"VICP SRQ block announces {header.length} bytes")
                if not self._fill(sock, deadline, wait):
                    return False
                continue
            if header.srq:
                reader.next_header(max_length=MAX_SRQ_PAYLOAD)
                with reader.buffered_payload() as payload:
                    asserted = parse_srq_payload(payload)
                reader.skip_payload(header.length)
                self._note_srq(asserted)
                continue
            if self._peer_v1a is None or self._peer_v1a != bool(header.seq):
                self._peer_v1a = bool(header.seq)
                self._log.debug("vicp.peer_version", v1a=self._peer_v1a)
            if is_stale(header.seq, self._seq.last):
                self._log.debug("vicp.stale_response", seq=header.seq, length=header.length, last_sent=self._seq.last)
                reader.next_header()
                continue
            return True

    def _discard_payload(self, sock: socket.socket, deadline: float | None, wait: bool) -> bool:
        """Drop the rest of the current block through the scratch buffer; False if it would block."""
        reader = self._reader
        while reader.header is not None:
            if reader.buffered:
                reader.skip_payload(min(reader.remaining, reader.buffered))
                continue
            got = self._recv_into(sock, self._scratch[: min(reader.remaining, _CHUNK)], deadline, wait)
            if got == 0:
                return False
            reader.payload_received(got)
        return True

    def _fill(self, sock: socket.socket, deadline: float | None, wait: bool) -> bool:
        got = self._recv_into(sock, self._scratch, deadline, wait)
        if got:
            self._reader.feed(self._scratch[:got])
        return bool(got)

    def _recv_into(self, sock: socket.socket, view: memoryview, deadline: float | None, wait: bool) -> int:
        """recv_into on the non-blocking socket; 0 only when wait=False and nothing is there."""
        while True:
            if wait and self._abort.is_set():
                raise Aborted(f"{self.resource}: read aborted")
            try:
                got = sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                if not wait:
                    return 0
                self._wait(sock, select.POLLIN, deadline, "read")
                continue
            if got == 0:
                raise ConnectionLost(f"{self.resource}: the instrument closed the connection")
            return got

    def _send(self, sock: socket.socket, parts: list[memoryview], deadline: float | None) -> None:
        parts = [p for p in parts if len(p)]
        sent_any = False
        try:
            while parts:
                if self._abort.is_set():
                    raise Aborted(f"{self.resource}: write aborted")
                try:
                    sent = sock.sendmsg(parts)
                except (BlockingIOError, InterruptedError):
                    self._wait(sock, select.POLLOUT, deadline, "write")
                    continue
                sent_any = True
                while parts and sent >= len(parts[0]):
                    sent -= len(parts[0])
                    parts.pop(0)
                if sent:
                    parts[0] = parts[0][sent:]
        except (Aborted, VisaTimeout):
            if sent_any and parts:
                self._tx_broken = True  # the peer holds part of a block; the next operation reconnects
            raise

    def _wait(self, sock: socket.socket, events: int, deadline: float | None, what: str) -> int:
        """poll() the socket and the wake-up pipe; Aborted / VisaTimeout, else the socket's events."""
        if self._abort.is_set():
            raise Aborted(f"{self.resource}: {what} aborted")
        if deadline is None:
            timeout_ms = None
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise VisaTimeout(f"{self.resource}: {what} did not complete in time")
            timeout_ms = max(1, math.ceil(left * 1000))
        poller = select.poll()
        poller.register(sock, events)
        poller.register(self._wake_r, select.POLLIN)
        ready = poller.poll(timeout_ms)
        if self._abort.is_set():
            raise Aborted(f"{self.resource}: {what} aborted")
        if not ready:
            raise VisaTimeout(f"{self.resource}: {what} did not complete in time")
        fd = sock.fileno()
        return sum(ev for f, ev in ready if f == fd)

    @contextlib.contextmanager
    def _operation(self, what: str) -> Iterator[socket.socket]:
        """One executor operation: exclusive use of the wire, errors mapped to VISA codes."""
        self._acquire_wire()
        try:
            try:
                if self._op_epoch is not None and self._op_epoch != self._interrupt_epoch:
                    raise Aborted(f"{self.resource}: {what} aborted: a device clear ended this operation")
                if self._sock is not None and self._tx_broken:
                    self._log.warning("vicp.reconnect_after_partial_write")
                    self._connect(self.attributes.timeout)
                sock = self._sock
                if sock is None:
                    raise ConnectionLost(f"{self.resource}: not connected; reopen the session")
                yield sock
            except ConnectionLost:
                self._disconnect()
                raise
            except RemoteProtocolError as exc:
                self._disconnect()
                raise IOFailure(f"{self.resource}: {exc}; connection closed, reopen to resynchronise") from None
            except OSError as exc:
                self._disconnect()
                raise ConnectionLost(f"{self.resource}: connection lost during {what} ({exc})") from None
        finally:
            self._op_generation += 1
            self._io_lock.release()
            self._poke_monitor()  # also after a failed operation: the monitor resumes watching

    def _acquire_wire(self) -> None:
        """Take the wire for a new operation, after any clear()/abort() that is under way.

        Only an operation already running when clear()/abort() is called raises Aborted; one that
        starts meanwhile waits for the interrupt to finish.
        """
        while True:
            with self._interrupt_done:
                self._interrupt_done.wait_for(lambda: self._interrupts == 0)
            self._io_lock.acquire()
            if self._interrupts == 0:
                return
            self._io_lock.release()

    @contextlib.contextmanager
    def _interrupt(self) -> Iterator[None]:
        """Make a running operation raise Aborted, then hold the wire for the caller."""
        with self._interrupt_done:
            self._interrupts += 1
            self._interrupt_epoch += 1
            self._abort.set()
        _poke(self._wake_w)
        try:
            with self._io_lock:
                try:
                    with self._interrupt_done:
                        _drain(self._wake_r)
                        if self._interrupts == 1:  # no other clear()/abort() waiting behind us
                            self._abort.clear()    # so our own I/O below does not abort itself
                    yield
                finally:
                    self._op_generation += 1
        finally:
            with self._interrupt_done:
                self._interrupts -= 1
                self._interrupt_done.notify_all()
            self._poke_monitor()


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def _poke(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, OSError):
        os.write(fd, b"!")


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, OSError):
        while os.read(fd, 4096):
            pass

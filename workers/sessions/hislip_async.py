"""The asynchronous channel of a HiSLIP client session.

One background thread reads the channel and files each response by message type for whoever waits on
it (`transaction`); AsyncServiceRequest goes to a dispatcher thread (so an SRQ handler may itself call
read_stb), AsyncInterrupted and loss of the channel go to callbacks of the session. Transactions of
different response types may overlap (a device clear must not wait behind a long lock request); two
of the same type take turns.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable

import structlog

from visabus.sdk.errors import ConnectionLost, VisaTimeout
from visabus.workers.protocols import hislip as h
from visabus.workers.protocols.hislip_client import ServerError, ServerFatalError

from .base import SrqHandler
from .hislip_io import remaining

log = structlog.get_logger(__name__)

POLL = 0.5  # the reader wakes this often to notice close()
_MT = h.MessageType


class AsyncChannel:
    """Owns the async socket, its reader thread and the SRQ dispatcher."""

    def __init__(
        self,
        sock: socket.socket,
        what: str,
        *,
        on_interrupted: Callable[[int], None],
        on_lost: Callable[[str], None],
        lost_reason: Callable[[], str | None],
    ) -> None:
        self.sock = sock
        self.what = what
        self.cond = threading.Condition()  # notified on every message that arrives (and on loss)
        self.srq_handler: SrqHandler | None = None
        self._on_interrupted = on_interrupted
        self._on_lost = on_lost
        self._lost_reason = lost_reason
        self._send_lock = threading.Lock()
        self._responses: dict[h.MessageType, h.Message] = {}
        self._errors: list[ServerError] = []
        self._waiters = 0
        self._turns: dict[h.MessageType, threading.Lock] = {}
        self._closing = False
        self._srq_queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._srq_thread: threading.Thread | None = None
        sock.settimeout(POLL)
        self._reader = threading.Thread(target=self._read_loop, name="hislip-async", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def close(self) -> None:
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.wake()
        if self._reader.is_alive() and self._reader is not threading.current_thread():
            self._reader.join(timeout=2.0)
        if self._srq_thread is not None:
            self._srq_queue.put(None)
            if self._srq_thread is not threading.current_thread():
                self._srq_thread.join(timeout=2.0)
            self._srq_thread = None
        self.sock.close()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    # ------------------------------------------------------------------ sending
    def send(self, message: h.Message) -> None:
        try:
            with self._send_lock:
                self.sock.sendall(message.encode())
        except OSError as exc:
            reason = f"asynchronous channel failed: {exc}"
            self._lost(reason)
            raise ConnectionLost(f"{self.what}: {reason}") from None

    def send_quietly(self, message: h.Message) -> None:
        try:
            self.send(message)
        except ConnectionLost:
            pass

    def transaction(self, request: h.Message, response: h.MessageType, deadline: float | None) -> h.Message:
        """Send `request`, wait for the message of type `response`. Error replies raise ServerError."""
        turn = self._turns.setdefault(response, threading.Lock())
        wait = remaining(deadline)
        if not turn.acquire(timeout=-1 if wait is None else wait):
            raise VisaTimeout(f"{self.what}: another {request.type.name} is still waiting for its answer")
        try:
            with self.cond:
                self._responses.pop(response, None)  # a late answer to an earlier, timed-out request
                self._waiters += 1
            try:
                self.send(request)
                with self.cond:
                    while True:
                        if response in self._responses:
                            return self._responses.pop(response)
                        if self._errors:
                            raise self._errors.pop(0)
                        lost = self._lost_reason()
                        if lost is not None:
                            raise ConnectionLost(f"{self.what}: {lost}")
                        left = remaining(deadline)
                        if left == 0:
                            raise VisaTimeout(f"{self.what}: no {response.name} from the server in time")
                        self.cond.wait(left)
            finally:
                with self.cond:
                    self._waiters -= 1
        finally:
            turn.release()

    # ------------------------------------------------------------------ receiving
    def _read_loop(self) -> None:
        reader = h.HislipReader(h.CONTROL_PAYLOAD_LIMIT)
        while not self._closing:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                self._lost(f"asynchronous channel failed: {exc}")
                return
            if not chunk:
                self._lost("the server closed the asynchronous channel")
                return
            reader.feed(chunk)
            while True:
                try:
                    message = reader.next_message()
                except h.UnrecognizedMessage as exc:
                    self.send_quietly(h.error(exc.error_code, str(exc)))
                    continue
                except h.HislipFormatError as exc:
                    self.send_quietly(h.fatal_error(exc.fatal_code, str(exc)))
                    self._lost(f"HiSLIP protocol error on the asynchronous channel: {exc}")
                    return
                if message is None:
                    break
                self._dispatch(message)

    def _dispatch(self, message: h.Message) -> None:
        kind = message.type
        if kind is _MT.ASYNC_SERVICE_REQUEST:
            if self.srq_handler is not None:
                self._srq_queue.put(message.control)
            return
        if kind is _MT.FATAL_ERROR:
            self._lost(str(ServerFatalError(message.control, message.text())))
            return
        with self.cond:
            if kind is _MT.ASYNC_INTERRUPTED:
                self._on_interrupted(message.message_id)
            elif kind is _MT.ERROR:
                error = ServerError(message.control, message.text())
                if self._waiters:
                    self._errors.append(error)
                else:
                    log.warning("hislip.async_error", resource=self.what, error=str(error))
            else:
                self._responses[kind] = message
            self.cond.notify_all()

    def _lost(self, reason: str) -> None:
        if self._closing:
            return
        self._on_lost(reason)
        self.wake()

    # ------------------------------------------------------------------ service requests
    def enable_srq(self, handler: SrqHandler | None) -> None:
        self.srq_handler = handler
        if handler is not None and self._srq_thread is None:
            self._srq_thread = threading.Thread(target=self._srq_loop, name="hislip-srq", daemon=True)
            self._srq_thread.start()

    def _srq_loop(self) -> None:
        while (status := self._srq_queue.get()) is not None:
            handler = self.srq_handler
            if handler is None:
                continue
            try:
                handler(status)
            except Exception:  # a failing user handler must not stop SRQ delivery (logged)
                log.exception("hislip.srq_handler_failed", resource=self.what, status=status)

"""Socket plumbing for the HiSLIP driver: an abortable non-blocking sync socket and blocking helpers.

`SyncSocket` keeps the synchronous channel non-blocking and waits with poll() on the socket plus a
wake-up socketpair, so another thread can abort a blocked read or write at once (`abort()`), without
closing the connection. Reads go straight into the caller's buffer (`recv_into`); writes hand the
header and the payload view to `sendmsg` without joining them.
"""

from __future__ import annotations

import math
import select
import socket
import time
from collections.abc import Callable

from visabus.sdk.errors import Aborted, ConnectionLost, ResourceNotFound, VisaTimeout
from visabus.workers.protocols import hislip as h

POLL_IN = select.POLLIN | select.POLLPRI
POLL_OUT = select.POLLOUT


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + max(0.0, timeout)


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def configure(sock: socket.socket, nodelay: bool, keepalive: bool) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(nodelay))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(keepalive))
    if keepalive:
        for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
            option = getattr(socket, name, None)
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


def connect(host: str, port: int, deadline: float | None, what: str) -> socket.socket:
    """TCP connect; refused/unreachable -> ResourceNotFound, too slow -> VisaTimeout."""
    try:
        return socket.create_connection((host, port), timeout=remaining(deadline))
    except TimeoutError:
        raise VisaTimeout(f"{what}: connecting to {host}:{port} timed out") from None
    except OSError as exc:
        raise ResourceNotFound(
            f"{what}: cannot connect to {host}:{port} ({exc.strerror or exc}); "
            "check the address, the port and that the instrument offers HiSLIP"
        ) from None


def recv_message_blocking(sock: socket.socket, deadline: float | None, max_payload: int, what: str) -> h.Message:
    """Read one whole message from a blocking socket (handshake and async channel use)."""
    header = h.decode_header(_recv_exact_blocking(sock, h.HEADER_SIZE, deadline, what), max_payload)
    payload = _recv_exact_blocking(sock, header.length, deadline, what) if header.length else b""
    return h.Message(header.message_type(), header.control, header.parameter, payload)


def _recv_exact_blocking(sock: socket.socket, n: int, deadline: float | None, what: str) -> bytes:
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        sock.settimeout(remaining(deadline))
        try:
            k = sock.recv_into(view[got:])
        except TimeoutError:
            raise VisaTimeout(f"{what}: no answer from the server in time") from None
        except OSError as exc:
            raise ConnectionLost(f"{what}: {exc}") from None
        if k == 0:
            raise ConnectionLost(f"{what}: the server closed the connection")
        got += k
    return bytes(buffer)


class SyncSocket:
    """The synchronous channel: non-blocking socket + wake-up pair; every call is abortable."""

    def __init__(self, sock: socket.socket, what: str) -> None:
        self.sock = sock
        self.what = what
        self.generation = 0  # bumped by abort(); an operation started under an older one raises Aborted
        self.lost: str | None = None
        sock.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller = select.poll()
        self._poller.register(sock, POLL_IN)
        self._poller.register(self._wake_r, select.POLLIN)
        self._sock_fd = sock.fileno()
        self._wake_fd = self._wake_r.fileno()

    def abort(self) -> None:
        """Make the blocked (or next) wait of an operation started before now raise Aborted."""
        self.generation += 1
        self.wake()

    def wake(self) -> None:
        try:
            self._wake_w.send(b"!")
        except OSError:
            pass  # the pair is full (already woken) or closed

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(256):
                pass
        except OSError:
            pass

    def mark_lost(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
        self.wake()

    def check(self, generation: int) -> None:
        if self.lost is not None:
            raise ConnectionLost(f"{self.what}: {self.lost}")
        if generation != self.generation:
            raise Aborted(f"{self.what}: operation aborted (device clear or abort)")

    def _wait(self, events: int, deadline: float | None, generation: int, doing: str) -> None:
        self._poller.modify(self._sock_fd, events)
        while True:
            self.check(generation)
            if deadline is None:
                timeout_ms = -1
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VisaTimeout(f"{self.what}: timed out {doing}")
                timeout_ms = max(1, math.ceil(left * 1000))
            ready = False
            for fd, _ in self._poller.poll(timeout_ms):
                if fd == self._wake_fd:
                    self._drain_wake()
                else:
                    ready = True
            if ready:
                self.check(generation)
                return

    def recv_into(self, view: memoryview, deadline: float | None, generation: int) -> int:
        """At least one byte into `view` (or an exception)."""
        while True:
            self.check(generation)
            try:
                n = self.sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                self._wait(POLL_IN, deadline, generation, "waiting for data")
                continue
            except OSError as exc:
                self.mark_lost(f"synchronous channel failed: {exc}")
                raise ConnectionLost(f"{self.what}: {self.lost}") from None
            if n == 0:
                self.mark_lost("the server closed the synchronous channel")
                raise ConnectionLost(f"{self.what}: {self.lost}")
            return n

    def recv_exact_into(self, view: memoryview, deadline: float | None, generation: int) -> None:
        got = 0
        while got < len(view):
            got += self.recv_into(view[got:], deadline, generation)

    def send(
        self,
        parts: list[memoryview],
        deadline: float | None,
        generation: int,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Send every byte of `parts`; `progress(n)` is told each chunk that left (for partial-write
        bookkeeping when the call is aborted or times out midway)."""
        views = [p for p in parts if len(p)]
        while views:
            self.check(generation)
            try:
                sent = self.sock.sendmsg(views)
            except (BlockingIOError, InterruptedError):
                self._wait(POLL_OUT, deadline, generation, "sending")
                continue
            except OSError as exc:
                self.mark_lost(f"synchronous channel failed: {exc}")
                raise ConnectionLost(f"{self.what}: {self.lost}") from None
            if progress is not None:
                progress(sent)
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views.pop(0))
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    def close(self) -> None:
        for sock in (self.sock, self._wake_r, self._wake_w):
            try:
                sock.close()
            except OSError:
                pass

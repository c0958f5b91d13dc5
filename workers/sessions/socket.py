"""Raw SCPI socket driver (`TCPIP::host::port::SOCKET`): a byte stream with no END, clear or status byte.

- Reads fill the caller's buffer with recv_into; a message ends only at the termination character.
  Bytes received past the terminator are kept for the next read (never lost, never re-read).
- `clear()` is the only honest device clear a raw socket has: drop the connection (discarding any late
  answer that would otherwise poison the next query) and reconnect. A read blocked meanwhile raises
  Aborted.
- Socket errors map to VISA codes: refused/unreachable -> RSRC_NFOUND, timeout -> TMO,
  reset/EOF -> CONN_LOST.
"""

from __future__ import annotations

import errno
import socket
import threading

import structlog

from visabus.sdk.errors import Aborted, ConnectionLost, ResourceNotFound, VisaTimeout
from visabus.sdk.resources import Resource

from .base import Session, SessionAttributes

log = structlog.get_logger(__name__)

_NOT_FOUND = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL}
KEEPALIVE_IDLE_S = 60


class SocketSession(Session):
    def __init__(self, resource: Resource, attributes: SessionAttributes | None = None) -> None:
        super().__init__(resource, attributes)
        self._sock: socket.socket | None = None
        self._pending = bytearray()         # received past the last terminator
        self._op_sock: socket.socket | None = None  # the connection the current operation started on
        # Connections a clear shut down. Only the executor thread closes them: closing a socket another
        # thread is about to poll makes CPython poll fd -1, which sleeps out the whole timeout.
        self._retired: list[socket.socket] = []
        self._lock = threading.Lock()       # guards _sock replacement against a concurrent clear()

    # ------------------------------------------------------------------------------ lifecycle
    def open(self, timeout: float | None) -> None:
        host, port = self.resource.host, self.resource.port
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError:
            raise VisaTimeout(f"{self.resource}: no TCP connection to {host}:{port} within {timeout}s") from None
        except OSError as exc:
            raise ResourceNotFound(f"{self.resource}: cannot connect to {host}:{port}: {exc.strerror or exc}; "
                                   "is the instrument on and the port right?") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(self.attributes.nodelay))
        self._apply_keepalive(sock)
        with self._lock:
            self._sock = sock
            self._pending.clear()

    def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
            retired, self._retired = self._retired, []
        for old in retired:
            old.close()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def begin(self) -> None:
        with self._lock:
            retired, self._retired = self._retired, []
        for old in retired:
            old.close()
        self._op_sock = self._sock

    def _require(self) -> socket.socket:
        sock = self._sock
        if sock is None:
            raise ConnectionLost(f"{self.resource}: not connected")
        if self._op_sock is not None and sock is not self._op_sock:
            # A clear replaced the connection mid-operation: the operation is over.
            raise Aborted(f"{self.resource}: operation aborted by a device clear")
        return sock

    # ------------------------------------------------------------------------------ I/O
    def write(self, data: bytes | memoryview, timeout: float | None) -> int:
        sock = self._require()
        try:
            sock.settimeout(timeout)
            sock.sendall(data)
        except TimeoutError:
            raise VisaTimeout(f"{self.resource}: write did not complete within {timeout}s") from None
        except OSError as exc:
            raise self._lost(exc, sock) from None
        return len(data)

    def read_into(self, buffer: memoryview, timeout: float | None, term_char: int | None) -> tuple[int, bool]:
        sock = self._require()
        if self._pending:
            return self._from_pending(buffer, term_char)
        try:
            sock.settimeout(timeout)
            n = sock.recv_into(buffer)
        except TimeoutError:
            # A late answer would poison the next query (raw sockets cannot tell answers apart):
            # start a fresh connection so whatever arrives late lands on the dead one.
            self._reconnect_quietly(sock)
            raise VisaTimeout(f"{self.resource}: no answer within {timeout}s (is the read termination right? "
                              "did the command produce a response?)") from None
        except OSError as exc:
            raise self._lost(exc, sock) from None
        if n == 0:
            raise self._lost(None, sock)
        if term_char is None:
            return n, False
        at = bytes(buffer[:n]).find(term_char)  # text reads are short; block reads pass term_char=None
        if at < 0:
            return n, False
        # Keep what followed the terminator for the next read.
        self._pending += buffer[at + 1 : n]
        return at + 1, True

    def _detach(self, expected: socket.socket | None = None) -> socket.socket | None:
        """Take the live connection out of service (only if it is still `expected`, when given).

        It is retired, not closed: another thread may be about to poll it, and closing it then would make
        CPython poll fd -1 for the whole timeout; the executor closes retired sockets at the next begin().
        """
        with self._lock:
            sock = self._sock
            if sock is None or (expected is not None and sock is not expected):
                return None
            self._sock = None
            self._retired.append(sock)
            return sock

    def _reconnect_quietly(self, sock: socket.socket) -> None:
        if self._detach(sock) is None:
            return
        try:
            self.open(self.attributes.timeout or 5.0)
        except (VisaTimeout, ResourceNotFound):
            pass  # the executor reopens (with backoff) before the next operation

    def _from_pending(self, buffer: memoryview, term_char: int | None) -> tuple[int, bool]:
        pending = self._pending
        limit = len(buffer)
        at = pending.find(term_char, 0, limit) if term_char is not None else -1
        n = at + 1 if at >= 0 else min(limit, len(pending))
        buffer[:n] = pending[:n]
        del pending[:n]
        return n, at >= 0

    def _lost(self, exc: OSError | None, sock: socket.socket) -> Exception:
        if self._detach(sock) is None:  # clear() swapped the connection under us
            return Aborted(f"{self.resource}: operation aborted by a device clear")
        why = "the instrument closed the connection" if exc is None else (exc.strerror or str(exc))
        return ConnectionLost(f"{self.resource}: connection lost ({why})")

    # ------------------------------------------------------------------------------ control
    def clear(self) -> None:
        """Raw sockets have no device clear: reconnect, which discards late answers and unblocks reads."""
        sock = self._detach()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv; the fd stays valid until begin()
            except OSError:
                pass
        self.open(self.attributes.timeout or 5.0)

    def abort(self) -> None:
        self.clear()

    def set_attribute(self, name: str, value: object) -> None:
        super().set_attribute(name, value)
        sock = self._sock
        if sock is None:
            return
        if name == "nodelay":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(bool(value)))
        elif name == "keepalive":
            self._apply_keepalive(sock)

    def _apply_keepalive(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(self.attributes.keepalive))
        if self.attributes.keepalive and hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 5)

"""Simulated HiSLIP instrument server (`TCPIP::host::hislipN,port::INSTR`).

A thin threaded driver around the sans-IO `HislipServerCore`: every TCP connection gets a thread
(from `InstrumentServer`); its first message says whether it is a session's synchronous channel
(Initialize) or asynchronous channel (AsyncInitialize). All protocol decisions happen in the core under
one lock; this module only reads messages, sends what the core returns and fetches responses from the
SCPI engine.

Sub-addresses `hislip0..N-1` are separate instruments (hislip0 is the one given); each session gets its
own `ScpiSession` (parser, output queue, status registers). Responses are sent from the connection's
sync thread in messages no larger than the client's maximum message size, the payload straight from
the engine's buffer (no copy). Synchronized mode is the default because PyVISA-py 0.8.1 cannot follow an
overlapped server.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from visabus.workers.protocols import hislip as h
from visabus.workers.protocols.hislip_server_state import (
    Action,
    AwaitResponse,
    Channel,
    HislipServerCore,
    Outgoing,
    ScheduleLockExpiry,
    ServerSession,
    SessionPhase,
)

from .scpi import Instrument, ScpiSession
from .server import InstrumentServer

log = structlog.get_logger(__name__)

RECV_CHUNK = 256 * 1024
SMALL_MESSAGE = 4096  # below this, header and payload are joined into one send


class _ConnectionClosed(Exception):
    pass


def _send_all(sock: socket.socket, parts: list[memoryview]) -> None:
    """sendmsg with partial-send handling: header and a payload view leave without being joined."""
    views = [p for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


class _Stream:
    """Reads whole HiSLIP messages from one connection."""

    def __init__(self, sock: socket.socket, max_payload: int) -> None:
        self.sock = sock
        self.reader = h.HislipReader(max_payload)

    def read_message(self) -> h.Message:
        while True:
            message = self.reader.next_message()
            if message is not None:
                return message
            chunk = self.sock.recv(RECV_CHUNK)
            if not chunk:
                raise _ConnectionClosed
            self.reader.feed(chunk)

    def waiting_message_id(self, fallback: int) -> int | None:
        """If a Data/DataEnd/Trigger is already waiting unread, its MessageID (else None)."""
        head = self.reader.peek(h.HEADER_SIZE)
        if len(head) < h.HEADER_SIZE:
            try:
                head += self.sock.recv(h.HEADER_SIZE - len(head), socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return None
        if not head:
            return None
        if len(head) < 8 or head[:2] != h.PROLOGUE:
            return fallback
        if head[2] not in (h.MessageType.DATA, h.MessageType.DATA_END, h.MessageType.TRIGGER):
            return None
        return int.from_bytes(head[4:8], "big")


class _Link:
    """The two sockets of one session and their send locks."""

    def __init__(self, session_id: int, sync_sock: socket.socket) -> None:
        self.session_id = session_id
        self.sockets: dict[Channel, socket.socket | None] = {Channel.SYNC: sync_sock, Channel.ASYNC: None}
        self.locks = {Channel.SYNC: threading.Lock(), Channel.ASYNC: threading.Lock()}

    def send(self, channel: Channel, message: h.Message) -> None:
        sock = self.sockets[channel]
        if sock is None:
            return
        header = message.header()
        try:
            with self.locks[channel]:
                if len(message.payload) <= SMALL_MESSAGE:
                    sock.sendall(header + bytes(message.payload))
                else:
                    _send_all(sock, [memoryview(header), memoryview(message.payload)])
        except OSError as exc:
            log.debug("hislip.send_failed", session=self.session_id, channel=channel.value, error=str(exc))

    def close(self) -> None:
        for sock in self.sockets.values():
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class HislipServer(InstrumentServer):
    """HiSLIP 1.0 server: several concurrent sessions, sub-addresses hislip0..N-1, locks, SRQ, clear."""

    protocol = "hislip"

    def __init__(
        self,
        instrument: Instrument,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sub_addresses: int = 4,
        max_message_size: int = 1 << 20,
        prefer_overlap: bool = False,
        max_sessions: int = 64,
    ) -> None:
        super().__init__(instrument, host, port)
        names = [f"hislip{i}" for i in range(max(1, sub_addresses))]
        self.instruments: dict[str, Instrument] = {names[0]: instrument}
        for name in names[1:]:
            self.instruments[name] = Instrument(identity=instrument.identity)
        self._cond = threading.Condition(threading.RLock())
        self._links: dict[int, _Link] = {}
        self._engines: dict[int, ScpiSession] = {}
        self.core = HislipServerCore(
            names, self._make_engine,
            prefer_overlap=prefer_overlap, max_message_size=max_message_size, max_sessions=max_sessions,
        )

    @property
    def resource(self) -> str:
        return f"TCPIP::{self.url_host}::hislip0,{self.port}::INSTR"

    def stop(self) -> None:
        """Stop listening and end every live session (their handler threads then finish)."""
        super().stop()
        with self._cond:
            links = list(self._links.values())
        for link in links:
            link.close()

    def _make_engine(self, name: str, session_id: int) -> ScpiSession:
        engine = ScpiSession(self.instruments[name], on_srq=lambda stb: self._on_srq(session_id, stb))
        self._engines[session_id] = engine
        return engine

    # ------------------------------------------------------------------ plumbing
    def _apply(self, compute: Callable[[], list[Action]]) -> list[AwaitResponse]:
        """Run a core transition under the lock, then send its messages outside the lock."""
        with self._cond:
            actions = compute()
            self._cond.notify_all()
            sends = [(self._links.get(a.session_id), a) for a in actions if isinstance(a, Outgoing)]
        tickets: list[AwaitResponse] = []
        for action in actions:
            if isinstance(action, ScheduleLockExpiry):
                timer = threading.Timer(max(0.0, action.deadline - time.monotonic()) + 0.001, self._expire_locks)
                timer.daemon = True
                timer.start()
            elif isinstance(action, AwaitResponse):
                tickets.append(action)
        for link, out in sends:
            if link is not None:
                link.send(out.channel, out.message)
        return tickets

    def _expire_locks(self) -> None:
        self._apply(lambda: self.core.expire_locks(time.monotonic()))

    def _on_srq(self, session_id: int, status_byte: int) -> None:
        def compute() -> list[Action]:
            session = self.core.sessions.get(session_id)
            return session.service_request(status_byte) if session is not None else []

        self._apply(compute)

    def _end_session(self, session_id: int) -> None:
        with self._cond:
            link = self._links.pop(session_id, None)
            self._engines.pop(session_id, None)
        self._apply(lambda: self.core.remove(session_id))
        if link is not None:
            link.close()
            log.info("hislip.session_closed", session=session_id)

    @staticmethod
    def _send_raw(sock: socket.socket, message: h.Message) -> None:
        try:
            sock.sendall(message.encode())
        except OSError:
            pass

    # ------------------------------------------------------------------ connections
    def handle_connection(self, sock: socket.socket, peer: Any) -> None:
        stream = _Stream(sock, h.CONTROL_PAYLOAD_LIMIT)
        try:
            first = stream.read_message()
        except _ConnectionClosed:
            return
        except h.HislipFormatError as exc:
            self._send_raw(sock, h.fatal_error(exc.fatal_code, str(exc)))
            return
        except h.UnrecognizedMessage as exc:
            text = f"first message must be Initialize or AsyncInitialize, got type {exc.header.type}"
            self._send_raw(sock, h.fatal_error(h.FatalErrorCode.INVALID_INITIALIZATION, text))
            return
        if first.type is h.MessageType.ASYNC_INITIALIZE:
            self._serve_async(sock, stream, first)
        else:
            self._serve_sync(sock, stream, first)

    def _read(self, stream: _Stream, link: _Link, channel: Channel) -> h.Message | None:
        """The next message; None when the connection is over (closed, or FatalError sent)."""
        while True:
            try:
                return stream.read_message()
            except h.UnrecognizedMessage as exc:
                link.send(channel, h.error(exc.error_code, str(exc)))
            except h.HislipFormatError as exc:
                fatal = h.fatal_error(exc.fatal_code, str(exc))
                link.send(Channel.SYNC, fatal)
                link.send(Channel.ASYNC, fatal)
                return None
            except (_ConnectionClosed, OSError):
                return None

    def _serve_sync(self, sock: socket.socket, stream: _Stream, first: h.Message) -> None:
        link: _Link | None = None
        with self._cond:
            session, reply = self.core.initialize(first)
            if session is not None:
                link = self._links[session.session_id] = _Link(session.session_id, sock)
        self._send_raw(sock, reply)
        if session is None or link is None:
            return
        log.info("hislip.session_opened", session=session.session_id, sub_address=session.device.name)
        stream.reader.max_payload = self.core.max_message_size
        try:
            while (message := self._read(stream, link, Channel.SYNC)) is not None:
                if message.type in (h.MessageType.DATA, h.MessageType.DATA_END, h.MessageType.TRIGGER):
                    self._wait_for_access(session)
                for ticket in self._apply(functools.partial(session.receive_sync, message)):
                    self._respond(link, stream, session, ticket)
                if session.closed:
                    return
        finally:
            self._end_session(session.session_id)

    def _wait_for_access(self, session: ServerSession) -> None:
        """Hold this session's sync input while another session's lock excludes it (TCP back-pressure
        does the rest). A device clear or close ends the wait; the core then drops the message."""
        with self._cond:
            while session.phase is SessionPhase.READY and not session.may_access():
                self._cond.wait(1.0)

    def _respond(self, link: _Link, stream: _Stream, session: ServerSession, ticket: AwaitResponse) -> None:
        while True:
            with self._cond:
                if ticket.generation != session.generation or session.closed:
                    return
            engine = self._engines.get(session.session_id)
            if engine is None:
                return
            data = engine.wait_response(timeout=0.25)
            if data is not None:
                break
        if not session.overlapped:
            interrupting = stream.waiting_message_id(h.next_message_id(ticket.message_id))
            if interrupting is not None:
                self._apply(lambda: session.interrupt(ticket, interrupting))
                return
        messages = session.response_messages(ticket, data)
        try:
            while True:
                with self._cond:
                    message = next(messages, None)
                if message is None:
                    return
                link.send(Channel.SYNC, message)
        finally:
            with self._cond:
                messages.close()

    def _serve_async(self, sock: socket.socket, stream: _Stream, first: h.Message) -> None:
        with self._cond:
            session, reply = self.core.async_initialize(first)
            link = self._links.get(session.session_id) if session is not None else None
            if link is not None:
                link.sockets[Channel.ASYNC] = sock
        self._send_raw(sock, reply)
        if session is None or link is None:
            return
        try:
            while (message := self._read(stream, link, Channel.ASYNC)) is not None:
                self._apply(functools.partial(session.receive_async, message, time.monotonic()))
                if session.closed:
                    return
        finally:
            self._end_session(session.session_id)

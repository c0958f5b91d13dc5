"""Raw SCPI socket server (`TCPIP::host::port::SOCKET`): LF-terminated messages over a byte stream."""

from __future__ import annotations

import socket
import threading
from typing import Any

from .scpi import ScpiSession
from .server import InstrumentServer

MAX_LINE = 1 << 20  # a command line longer than this is garbage: drop the connection


class SocketServer(InstrumentServer):
    protocol = "socket"

    @property
    def resource(self) -> str:
        return f"TCPIP::{self.url_host}::{self.port}::SOCKET"

    def handle_connection(self, sock: socket.socket, peer: Any) -> None:
        session = ScpiSession(self.instrument)
        # Responses go out on their own thread so a SLOW? query does not stop the parser, as on a real box.
        closed = threading.Event()
        sender = threading.Thread(target=self._send_responses, args=(sock, session, closed), daemon=True)
        sender.start()
        buffer = bytearray()
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                while (nl := buffer.find(b"\n")) >= 0:
                    line = bytes(buffer[:nl])
                    del buffer[: nl + 1]
                    session.write(line)
                if len(buffer) > MAX_LINE:
                    return
        finally:
            closed.set()
            session.close()
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _send_responses(sock: socket.socket, session: ScpiSession, closed: threading.Event) -> None:
        while not closed.is_set():
            data = session.wait_response(timeout=0.5)
            if data is None:
                continue
            try:
                sock.sendall(data)
            except OSError:
                return

"""Shared plumbing for simulated-instrument servers: a threaded TCP listener on a chosen host/port.

Each protocol server subclasses `InstrumentServer` and implements `handle_connection(sock, peer)`,
which runs on its own thread per connection. Port 0 binds an ephemeral port; `.port` tells which.
"""

from __future__ import annotations

import errno
import random
import socket
import socketserver
import threading
from typing import Any

import structlog

from .scpi import Instrument

log = structlog.get_logger(__name__)


class _Handler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.server.owner.handle_connection(self.request, self.client_address)
        except OSError as exc:  # peer vanished: normal for an instrument
            log.debug("sim.connection_closed", peer=str(self.client_address), error=str(exc))


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], owner: InstrumentServer, family: int) -> None:
        self.address_family = family
        self.owner = owner
        super().__init__(address, _Handler)


class InstrumentServer:
    """A TCP server in front of a simulated instrument. Subclasses implement `handle_connection`."""

    protocol = "abstract"

    def __init__(self, instrument: Instrument, host: str = "127.0.0.1", port: int = 0) -> None:
        self.instrument = instrument
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = _TCPServer((host, port), self, family)
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def resource(self) -> str:
        raise NotImplementedError

    def start(self) -> InstrumentServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"sim-{self.protocol}", daemon=True)
        self._thread.start()
        log.info("sim.listening", protocol=self.protocol, resource=self.resource)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def handle_connection(self, sock: socket.socket, peer: Any) -> None:
        raise NotImplementedError

    def __enter__(self) -> InstrumentServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_loopback_alias(port: int, tries: int = 8) -> tuple[str | None, str]:
    """A 127.0.0.x (x >= 2) where `port` can be bound, or (None, why not).

    For clients fixed to one port (PyVISA-py's VICP only reaches 1861): every 127/8 address is local on
    Linux, so a random one avoids colliding with anything on 127.0.0.1 without root or namespaces.
    """
    reason = "no address tried"
    for x in random.sample(range(2, 255), tries):
        host = f"127.0.0.{x}"
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
                return host, ""
            except OSError as exc:
                reason = f"cannot bind {host}:{port}: {exc.strerror}"
                if exc.errno != errno.EADDRINUSE:
                    break
    return None, reason

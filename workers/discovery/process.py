"""`visabus discovery` (the discovery worker process) and `visabus discover` (one-shot scan).

The discovery worker runs DiscoveryService continuously and sends every event to the broker's backend as
an `event` message; the broker republishes it (instrument.appeared / .disappeared / .changed) and keeps
the discovered resources for `list`. Identification asks each new resource `*IDN?` through a
short-lived session, so one instrument reachable by several protocols is reported once.
"""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any

import structlog
import zmq

from visabus.sdk import schema
from visabus.sdk.errors import VisaBusError
from visabus.sdk.logs import configure_logging
from visabus.sdk.resources import parse_resource
from visabus.sdk.transport import DEFAULT_BACKEND, make_socket

from ..reader import read_message
from ..sessions import SessionAttributes, session_for
from .service import DiscoveryConfig, DiscoveryService

log = structlog.get_logger(__name__)

IDENTIFY_TIMEOUT_S = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default=DEFAULT_BACKEND, help="broker backend endpoint (default %(default)s)")
    parser.add_argument("--interface", action="append", default=None,
                        help="interface name or IPv4 address to scan (repeatable; default 127.0.0.1 only)")
    parser.add_argument("--interval", type=float, default=1.0, help="broadcast scan period in s")
    parser.add_argument("--misses", type=int, default=3, help="missed scans before an instrument disappears")
    parser.add_argument("--portmapper-port", type=int, default=111, help="portmapper port to ask (default 111)")
    parser.add_argument("--no-mdns", action="store_true", help="do not browse mDNS")
    parser.add_argument("--no-broadcast", action="store_true", help="do not send VXI-11 broadcasts")
    parser.add_argument("--no-identify", action="store_true", help="do not ask new instruments *IDN?")


def identify(resource: str) -> str | None:
    """*IDN? through a short-lived session; None when the instrument does not answer."""
    try:
        session = session_for(parse_resource(resource), SessionAttributes(timeout=IDENTIFY_TIMEOUT_S))
        session.open(IDENTIFY_TIMEOUT_S)
    except VisaBusError:
        return None
    try:
        session.write(b"*IDN?\n", IDENTIFY_TIMEOUT_S)
        parts: list[bytes] = []
        read_message(session, lambda view: parts.append(bytes(view)), timeout=IDENTIFY_TIMEOUT_S, term_char=0x0A,
                     count=4096)
        return b"".join(parts).decode("latin-1").strip() or None
    except VisaBusError:
        return None
    finally:
        session.close()


def _config(interfaces: list[str] | None, interval: float, misses: int, portmapper_port: int, mdns: bool,
            broadcast: bool) -> DiscoveryConfig:
    return DiscoveryConfig(interfaces=tuple(interfaces or ["127.0.0.1"]), interval_s=interval, misses=misses,
                           mdns=mdns, broadcast=broadcast, portmapper_port=portmapper_port,
                           window_s=min(0.5, interval))


def main(args: argparse.Namespace) -> int:
    configure_logging("discovery")
    sock = make_socket(zmq.Context.instance(), zmq.DEALER, connect=args.backend)
    guard = threading.Lock()

    def emit(topic: str, data: dict[str, Any]) -> None:
        with guard:
            sock.send(schema.pack({"v": schema.VERSION, "op": "event", "topic": topic, "data": data}))

    config = _config(args.interface, args.interval, args.misses, args.portmapper_port, not args.no_mdns,
                     not args.no_broadcast)
    service = DiscoveryService(config, emit, identify=None if args.no_identify else identify)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("discovery.started", interfaces=list(config.interfaces), backend=args.backend)
    try:
        service.run(stop)
    finally:
        service.close()
        sock.close(linger=500)
    return 0


def discover_once(interfaces: list[str], timeout: float, *, portmapper_port: int = 111, mdns: bool = True,
                  identify_instruments: bool = True) -> list[dict[str, Any]]:
    """One scan, like PyVISA's list_resources: the instruments found within `timeout` seconds."""
    configure_logging("discover")
    config = _config(interfaces, min(1.0, timeout), 1, portmapper_port, mdns, True)
    service = DiscoveryService(config, lambda topic, data: None, identify=identify if identify_instruments else None)
    try:
        return service.scan_once(timeout)
    finally:
        service.close()

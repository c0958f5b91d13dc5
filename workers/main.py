"""Process entries for `visabus worker` and `visabus discovery`."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from visabus.sdk.errors import VisaBusError
from visabus.sdk.logs import configure_logging
from visabus.sdk.transport import DEFAULT_BACKEND


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("resource", help="the instrument this worker owns, e.g. TCPIP::10.0.0.5::INSTR")
    parser.add_argument("--backend", default=DEFAULT_BACKEND, help="broker backend endpoint (default %(default)s)")
    parser.add_argument("--alias", default=None, help="a short name clients may use instead of the resource")
    parser.add_argument("--heartbeat-ms", type=int, default=1000)
    parser.add_argument("--liveness", type=int, default=3)
    parser.add_argument("--attr", action="append", default=[], metavar="NAME=JSON",
                        help="session attribute, e.g. keepalive=true or portmapper_port=4111 (repeatable)")


def worker_main(args: argparse.Namespace) -> int:
    from .runtime import Worker
    from .sessions import SessionAttributes

    configure_logging("worker")
    attributes = SessionAttributes()
    for item in args.attr:
        name, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if hasattr(attributes, name) and name != "extra":
            setattr(attributes, name, value)
        else:
            attributes.extra[name] = value
    try:
        worker = Worker(args.resource, args.backend, alias=args.alias, heartbeat_ms=args.heartbeat_ms,
                        liveness=args.liveness, attributes=attributes)
    except VisaBusError as exc:
        print(f"visabus worker: {exc}", file=sys.stderr, flush=True)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.stop())
    return worker.run()

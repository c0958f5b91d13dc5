"""Process entries for `visabus broker` and `visabus serve`."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from visabus.sdk.logs import configure_logging
from visabus.sdk.transport import DEFAULT_BACKEND, DEFAULT_EVENTS, DEFAULT_FRONTEND


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frontend", default=DEFAULT_FRONTEND, help="endpoint for clients (default %(default)s)")
    parser.add_argument("--backend", default=DEFAULT_BACKEND, help="endpoint for workers (default %(default)s)")
    parser.add_argument("--events", default=DEFAULT_EVENTS, help="PUB endpoint for events (default %(default)s)")
    parser.add_argument("--heartbeat-ms", type=int, default=1000)
    parser.add_argument("--liveness", type=int, default=3, help="missed heartbeats before a worker is dead")
    parser.add_argument("--lease-ms", type=int, default=10_000, help="client lease (locks die with it)")
    parser.add_argument("--queue-limit", type=int, default=1024, help="queued requests per instrument")
    parser.add_argument("--grace-ms", type=int, default=1000, help="time a worker gets past a request's deadline")
    parser.add_argument("--max-frame-bytes", type=int, default=1 << 30,
                        help="largest frame a client may send (ZeroMQ drops the connection beyond it)")
    parser.add_argument("--queue-bytes-limit", type=int, default=512 << 20,
                        help="payload bytes that may wait per instrument (default 512 MiB)")
    parser.add_argument("--attach-on-demand", action="store_true",
                        help="an open of an unserved resource asks the supervisor to start a worker")
    parser.add_argument("--json", action="store_true", help="print the bound endpoints as one JSON line")


def broker_main(args: argparse.Namespace) -> int:
    from .router import Broker, BrokerConfig

    configure_logging("broker")
    broker = Broker(BrokerConfig(frontend=args.frontend, backend=args.backend, events=args.events,
                                 heartbeat_ms=args.heartbeat_ms, liveness=args.liveness, lease_ms=args.lease_ms,
                                 queue_limit=args.queue_limit, queue_bytes_limit=args.queue_bytes_limit,
                                 grace_ms=args.grace_ms, max_message_bytes=args.max_frame_bytes,
                                 attach_on_demand=args.attach_on_demand))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: broker.stop())
    if args.json:
        print(json.dumps(broker.endpoints), flush=True)
    broker.run()
    return 0


def serve_main(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config, parse_config
    from .supervisor import Supervisor

    configure_logging("supervisor")
    try:
        config = load_config(args.config) if args.config else parse_config(_demo_default(), "<embedded demo>")
    except ConfigError as exc:
        print(f"visabus serve: {exc}", file=sys.stderr, flush=True)
        return 2
    return Supervisor(config, json_output=args.json).run()


def _demo_default() -> dict[str, object]:
    import tomllib
    from importlib import resources

    return tomllib.loads(resources.files("visabus.broker").joinpath("demo.toml").read_text())

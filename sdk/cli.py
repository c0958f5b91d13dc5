"""`visabus`: the command line for the bus.

Client commands talk to a running broker (`--broker URL`, else $VISABUS_BROKER, else
tcp://127.0.0.1:5555). Server commands start processes (serve, broker, worker, sim, discovery).

Exit codes: 0 ok · 1 other VISA error · 2 usage or configuration error · 3 resource not found or
invalid · 4 timeout · 5 broker unreachable or connection lost · 6 resource locked · 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

from .errors import StatusCode, VisaBusError

EXIT_CODES = {
    StatusCode.VI_ERROR_RSRC_NFOUND: 3, StatusCode.VI_ERROR_INV_RSRC_NAME: 3, StatusCode.VI_ERROR_TMO: 4,
    StatusCode.VI_ERROR_CONN_LOST: 5, StatusCode.VI_ERROR_RSRC_LOCKED: 6,
}

# Server-side commands live outside the SDK; they are looked up by name so the SDK imports none of them.
SERVER_COMMANDS: dict[str, tuple[str, str, str, str]] = {
    # name: (module with add_arguments, adder, module with main, main)
    "serve": ("visabus.sdk.cli", "_add_serve_arguments", "visabus.broker.main", "serve_main"),
    "broker": ("visabus.broker.main", "add_broker_arguments", "visabus.broker.main", "broker_main"),
    "worker": ("visabus.workers.main", "add_worker_arguments", "visabus.workers.main", "worker_main"),
    "sim": ("visabus.sim.cli", "add_arguments", "visabus.sim.cli", "run"),
    "discovery": ("visabus.workers.discovery.process", "add_arguments", "visabus.workers.discovery.process", "main"),
}
SERVER_HELP = {
    "serve": "run a rack: broker, simulators, discovery and one worker per instrument (from a TOML config)",
    "broker": "run the broker alone",
    "worker": "run one instrument worker (connects to a broker's backend)",
    "sim": "run a simulated instrument (raw socket, VXI-11, HiSLIP, VICP servers)",
    "discovery": "run the discovery worker (VXI-11 broadcast + mDNS) against a broker",
}


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None,
                        help="rack config (TOML); default: the embedded demo rack of simulated instruments")
    parser.add_argument("--json", action="store_true", help="print endpoints and resources as one JSON line")


def _client(args: argparse.Namespace) -> Any:
    from .client import Client

    return Client(args.broker, name="visabus-cli", timeout=args.timeout, heartbeat=False)


def _out(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    print(json.dumps(data, default=str) if args.json else text())


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as bus:
        rows = bus.resources(args.pattern)
    def text() -> str:
        if not rows:
            return "no resources match"
        return "\n".join(f"{r['res']:48s} {r.get('alias') or '':16s} {r.get('state', '')}" for r in rows)
    _out(args, rows, text)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as bus:
        st = bus.status()
    def text() -> str:
        lines = [f"broker {st['endpoints']['frontend']}  clients: {st['clients']}"]
        for r in st["resources"]:
            lock = r["lock"]
            held = f" locked by {', '.join(lock['holders'])}" if lock["holders"] else ""
            lines.append(f"  {r['res']:46s} {r.get('alias') or '':14s} {r['state']:10s} queue={r['queue']} "
                         f"requests={r['stats']['requests']} errors={r['stats']['errors']}{held}")
        return "\n".join(lines)
    _out(args, {k: v for k, v in st.items() if k not in ("v", "op", "id")}, text)
    return 0


def _progress_bar(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    return Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), transient=False)


def _read_with_progress(inst: Any, args: argparse.Namespace, message: bytes | None) -> bytes:
    bar = _progress_bar(args.progress and not args.json)
    if bar is None:
        return b"".join(inst.iter_read(message=message, block=args.binary))  # one copy: the views keep their frames
    with bar:
        task = bar.add_task("reading", total=None)
        return b"".join(inst.iter_read(message=message, block=args.binary,
                                       progress=lambda done, total: bar.update(task, completed=done, total=total)))


def _emit_data(args: argparse.Namespace, data: bytes, res: str) -> None:
    if args.output:
        with open(args.output, "wb") as fh:
            fh.write(data)
        _out(args, {"res": res, "bytes": len(data), "output": args.output},
             lambda: f"{len(data)} bytes written to {args.output}")
    elif args.binary:
        _out(args, {"res": res, "bytes": len(data)}, lambda: f"{len(data)} bytes (use --output FILE to save them)")
    else:
        text = data.decode("latin-1").rstrip("\r\n")
        _out(args, {"res": res, "response": text}, lambda: text)


def cmd_query(args: argparse.Namespace) -> int:
    with _client(args) as bus:
        inst = bus.open(args.resource)
        data = _read_with_progress(inst, args, (args.command + "\n").encode())
        _emit_data(args, data, inst.resource_name)
    return 0


def cmd_read(args: argparse.Namespace) -> int:
    with _client(args) as bus:
        inst = bus.open(args.resource)
        data = _read_with_progress(inst, args, None)
        _emit_data(args, data, inst.resource_name)
    return 0


def cmd_write(args: argparse.Namespace) -> int:
    with _client(args) as bus:
        inst = bus.open(args.resource)
        count = inst.write(args.command)
    _out(args, {"res": inst.resource_name, "count": count}, lambda: f"wrote {count} bytes")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from datetime import datetime

    with _client(args) as bus:
        seen = 0
        with bus.subscribe(args.prefix) as stream:
            if not args.json:
                print(f"watching events '{args.prefix or '*'}' on {bus.events_url} (Ctrl-C to stop)", flush=True)
            while args.count is None or seen < args.count:
                event = stream.get(args.wait)
                if event is None:
                    break
                seen += 1
                if args.json:
                    print(json.dumps(event, default=str), flush=True)
                else:
                    when = datetime.fromtimestamp(event.get("ts", 0)).strftime("%H:%M:%S.%f")[:-3]
                    rest = {k: v for k, v in event.items() if k not in ("topic", "ts", "seq")}
                    print(f"{when} {event['topic']:32s} {json.dumps(rest, default=str)}", flush=True)
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    module = importlib.import_module("visabus.workers.discovery.process")
    found: list[dict[str, Any]] = module.discover_once(args.interface or ["127.0.0.1"], args.timeout,
                                                       portmapper_port=args.portmapper_port, mdns=not args.no_mdns)
    def text() -> str:
        if not found:
            return "no instruments found"
        return "\n".join(f"{', '.join(i['resources'])}  {i.get('metadata') or ''}" for i in found)
    _out(args, found, text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visabus", description="Instrument service bus: share LAN instruments between scripts and machines.",
        epilog="Start a demo rack with `visabus serve`, then try `visabus list` and "
               "`visabus query <resource> '*IDN?'` in another terminal.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--broker", default=None, help="broker URL (default $VISABUS_BROKER or tcp://127.0.0.1:5555)")
        p.add_argument("--timeout", type=int, default=5000, help="timeout in ms (default %(default)s)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = client_parser("list", "list instruments served or discovered (VISA pattern, default '?*')")
    p.add_argument("pattern", nargs="?", default="?*")
    p.set_defaults(func=cmd_list)
    p = client_parser("status", "show workers, queues, locks and counters")
    p.set_defaults(func=cmd_status)
    for name, help_text, func in (("query", "send a command and print the answer", cmd_query),
                                  ("read", "read one response", cmd_read)):
        p = client_parser(name, help_text)
        p.add_argument("resource", help="resource string or alias, e.g. TCPIP::127.0.0.1::5025::SOCKET")
        if name == "query":
            p.add_argument("command", help="SCPI command, e.g. '*IDN?'")
        p.add_argument("--binary", action="store_true", help="the answer is an IEEE 488.2 block")
        p.add_argument("--output", "-o", help="write the data to this file")
        p.add_argument("--progress", action="store_true", help="show a progress bar")
        p.set_defaults(func=func)
    p = client_parser("write", "send a command")
    p.add_argument("resource")
    p.add_argument("command")
    p.set_defaults(func=cmd_write)
    p = client_parser("watch", "print live bus events (instrument.*, worker.*, lock.*, srq.*)")
    p.add_argument("prefix", nargs="?", default="", help="topic prefix, e.g. instrument. or srq.")
    p.add_argument("--count", type=int, default=None, help="stop after N events")
    p.add_argument("--wait", type=float, default=None, help="stop after S seconds without events")
    p.set_defaults(func=cmd_watch)
    p = sub.add_parser("discover", help="one-shot discovery (VXI-11 broadcast + mDNS), like list_resources")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to listen (default %(default)s)")
    p.add_argument("--interface", action="append", help="interface name or address (default loopback only)")
    p.add_argument("--portmapper-port", type=int, default=111)
    p.add_argument("--no-mdns", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_discover)

    for name, (add_mod, add_fn, main_mod, main_fn) in SERVER_COMMANDS.items():
        p = sub.add_parser(name, help=SERVER_HELP[name], description=SERVER_HELP[name])
        try:
            getattr(importlib.import_module(add_mod), add_fn)(p)
        except ImportError:
            p.set_defaults(func=lambda a, n=name: _missing(n))
            continue
        p.set_defaults(func=_lazy(main_mod, main_fn))
    return parser


def _lazy(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        result: int = getattr(importlib.import_module(module), func)(args)
        return result
    return run


def _missing(name: str) -> int:
    print(f"visabus {name}: this installation has only the SDK (install the full visabus package)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VisaBusError as exc:
        print(f"visabus {args.command}: {exc}", file=sys.stderr)
        return EXIT_CODES.get(exc.code, 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

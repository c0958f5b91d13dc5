"""`visabus sim`: one simulated instrument (one SCPI engine) behind any of the four protocol servers.

    visabus sim --socket 0 --vxi11 0 --hislip 0 --vicp 0 --json
    {"socket": "TCPIP::127.0.0.1::40123::SOCKET", "vxi11": "TCPIP::127.0.0.1,40125::inst0::INSTR", ...}

Port 0 picks an ephemeral port; `--json` prints one line mapping each protocol to its resource string,
so scripts and tests can find the servers. Runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import threading
from typing import Any

import structlog

from .scpi import DEFAULT_IDENTITY, Instrument

log = structlog.get_logger(__name__)

# protocol -> (module, class) of its server; imported only when asked for.
SERVERS = {
    "socket": ("visabus.sim.socket_server", "SocketServer"),
    "vxi11": ("visabus.sim.vxi11_server", "Vxi11Server"),
    "hislip": ("visabus.sim.hislip_server", "HislipServer"),
    "vicp": ("visabus.sim.vicp_server", "VicpServer"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for proto in SERVERS:
        parser.add_argument(f"--{proto}", type=int, metavar="PORT", default=None,
                            help=f"serve {proto} on PORT (0 = ephemeral)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--identity", default=DEFAULT_IDENTITY, help="*IDN? answer: MFR,MODEL,SERIAL,FIRMWARE")
    parser.add_argument("--portmapper-port", type=int, default=0,
                        help="VXI-11 portmapper port (default ephemeral; 111 needs root)")
    parser.add_argument("--hislip-overlap", action="store_true", help="HiSLIP server prefers overlapped mode")
    parser.add_argument("--hislip-max-message", type=int, default=1 << 20, help="HiSLIP max message size (bytes)")
    parser.add_argument("--vxi11-max-recv", type=int, default=1 << 20, help="VXI-11 maxRecvSize (bytes)")
    parser.add_argument("--advertise", metavar="ADDR", default=None,
                        help="announce the servers over mDNS on the interface with this address")
    parser.add_argument("--json", action="store_true", help="print one JSON line: protocol -> resource string")


def start_servers(args: argparse.Namespace, instrument: Instrument) -> dict[str, Any]:
    servers: dict[str, Any] = {}
    for proto, (module_name, class_name) in SERVERS.items():
        port = getattr(args, proto)
        if port is None:
            continue
        cls = getattr(importlib.import_module(module_name), class_name)
        kwargs: dict[str, Any] = {}
        if proto == "vxi11":
            kwargs = {"portmapper_port": args.portmapper_port, "max_recv_size": args.vxi11_max_recv}
        elif proto == "hislip":
            kwargs = {"prefer_overlap": args.hislip_overlap, "max_message_size": args.hislip_max_message}
        servers[proto] = cls(instrument, args.host, port, **kwargs).start()
    return servers


def run(args: argparse.Namespace) -> int:
    from visabus.sdk.logs import configure_logging

    configure_logging("sim")
    if not any(getattr(args, p) is not None for p in SERVERS):
        args.socket = 0  # a bare `visabus sim` serves a raw socket
    instrument = Instrument(identity=args.identity)
    try:
        servers = start_servers(args, instrument)
    except OSError as exc:
        print(f"visabus sim: cannot listen: {exc}", file=sys.stderr)
        return 2
    advertiser = None
    if args.advertise:
        from .advertise import Advertiser

        ports = {p: (s.portmapper_port if p == "vxi11" else s.port) for p, s in servers.items()}
        advertiser = Advertiser(args.advertise, args.identity, ports)
        advertiser.start()
    resources = {proto: server.resource for proto, server in servers.items()}
    if "vxi11" in servers:  # clients that go through the portmapper need to know where it listens
        resources["vxi11_portmapper"] = servers["vxi11"].portmapper_port
    if args.json:
        print(json.dumps(resources), flush=True)
    else:
        for proto, res in resources.items():
            print(f"{proto:16s} {res}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    if advertiser is not None:
        advertiser.stop()
    for server in servers.values():
        server.stop()
    return 0

"""`make bench`: visabus vs PyVISA-py direct, same simulators, one run; writes docs/BENCHMARKS.md.

    .venv/bin/python bench/run.py --output docs/BENCHMARKS.md

One `visabus serve` rack (broker, simulators, one worker per resource) on a temporary config, all on
loopback with ephemeral ports — except VICP for PyVISA-py, which can only reach port 1861: for that an
extra simulator listens on 127.0.0.x:1861 (x >= 2, free alias; Linux routes all of 127/8 to `lo`).
Measures, in order:
  1. per protocol: `*IDN?` latency (median, p99) and a 64 MiB block read, PyVISA-py direct vs the bus;
  2. 32 client processes x 8 instruments: aggregate ECHO? queries/s and p99;
  3. peak broker / worker RSS while a slow consumer streams 512 MiB.
A protocol whose simulator server or worker is missing or failing is reported as "n/a (reason)".
The rack is always torn down (try/finally), whatever fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure
import rack as rackmod
import report

ROOT = Path(__file__).resolve().parent.parent
LABELS = {"socket": "SOCKET", "vxi11": "VXI-11", "hislip": "HiSLIP", "vicp": "VICP"}
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def attempt(what: str, fn: Any, *args: Any, **kw: Any) -> Any:
    """fn(...) or, on failure, the short reason (a str) — the report shows it as n/a (reason)."""
    try:
        result = fn(*args, **kw)
    except Exception as exc:  # noqa: BLE001 - any failure of one measurement is reported, not fatal
        reason = measure.short_reason(exc)
        say(f"  {what}: n/a ({reason})")
        return reason
    if isinstance(result, dict) and "median_us" in result:
        say(f"  {what}: median {result['median_us']:.0f} µs, p99 {result['p99_us']:.0f} µs")
    elif isinstance(result, dict) and "runs" in result:
        say(f"  {what}: {result['mbps']:.1f} MB/s (best of {result['runs']})")
    return result


CELLS = ("py_lat", "bus_lat", "py_qbv", "py_raw", "bus_blk")


def cells(proto: str) -> tuple[str, ...]:
    return tuple(c for c in CELLS if not (proto == "socket" and c == "py_raw"))


NAMES = {"py_lat": "PyVISA-py latency", "bus_lat": "visabus latency", "py_qbv": "PyVISA-py query_binary_values",
         "py_raw": "PyVISA-py read_raw", "bus_blk": "visabus query_binary_block"}


def log_results(row: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = row.get(key)
        if isinstance(value, str):
            say(f"  {NAMES[key]}: n/a ({value})")
        elif isinstance(value, dict) and "median_us" in value:
            say(f"  {NAMES[key]}: median {value['median_us']:.0f} µs, p99 {value['p99_us']:.0f} µs")
        elif isinstance(value, dict):
            say(f"  {NAMES[key]}: {value['mbps']:.1f} MB/s (best of {value['runs']})")


def command_line() -> str:
    exe = Path(sys.executable)
    try:
        exe_text = os.path.relpath(exe, Path.cwd()) if exe.is_relative_to(Path.cwd()) else str(exe)
    except ValueError:
        exe_text = str(exe)
    script = os.path.relpath(Path(sys.argv[0]).resolve(), Path.cwd())
    return " ".join([exe_text, script, *map(shlex.quote, sys.argv[1:])])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=None, help="write the Markdown report here (default: stdout)")
    p.add_argument("--queries", type=int, default=2000, help="*IDN? queries per latency measurement")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--block", type=int, default=64 << 20, help="block size in bytes (default 64 MiB)")
    p.add_argument("--reps", type=int, default=3, help="block reads per path (best is reported)")
    p.add_argument("--block-budget", type=float, default=15.0,
                   help="stop repeating a block read once this many seconds are spent on it")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--instruments", type=int, default=8)
    p.add_argument("--duration", type=float, default=5.0, help="many-clients run time (s)")
    p.add_argument("--stream", type=int, default=512 << 20, help="slow-consumer stream size in bytes")
    p.add_argument("--chunk-sleep-ms", type=float, default=5.0)
    p.add_argument("--protocols", default=",".join(report.PROTOCOLS))
    p.add_argument("--skip-load", action="store_true", help="skip the many-clients and slow-consumer parts")
    return p.parse_args()


def protocol_bench(bus: Any, rm: Any, rack: rackmod.Rack, proto: str, args: argparse.Namespace,
                   vicp_alias: str | None, vicp_reason: str) -> dict[str, Any]:
    row: dict[str, Any] = {"label": LABELS[proto]}
    alias = "vicp1861-vicp" if proto == "vicp" and vicp_alias else f"sim-{proto}"
    res = rack.resources.get(alias)
    if res is None:
        row.update(dict.fromkeys(cells(proto), f"no {proto} resource served (simulator server missing?)"))
        return row
    row["label"] = f"{LABELS[proto]} `{res}`"
    say(f"{LABELS[proto]}: {res}")
    ready = attempt("bus ready", measure.wait_ready, bus, alias)
    bus_why = ready if isinstance(ready, str) else None
    py_why = None
    if isinstance(rm, str):
        py_why = rm
    elif proto == "vicp" and not vicp_alias:
        py_why = f"PyVISA-py VICP is fixed to port 1861; {vicp_reason}"

    def py(make: Any, *a: Any) -> Any:
        return py_why if py_why else measure.open_path(lambda: make(rm, res, *a))

    def on_bus(make: Any, *a: Any) -> Any:
        return bus_why if bus_why else measure.open_path(lambda: make(bus, alias, *a))

    paths = {"py_lat": py(measure.pyvisa_query), "bus_lat": on_bus(measure.bus_query)}
    try:
        row.update(measure.interleaved_latency(paths, args.queries, args.warmup))
    finally:
        measure.close_paths(paths)
    log_results(row, ("py_lat", "bus_lat"))
    paths = {"py_qbv": py(measure.pyvisa_qbv, args.block)}
    if proto != "socket":
        paths["py_raw"] = py(measure.pyvisa_raw, args.block)
    paths["bus_blk"] = on_bus(measure.bus_blockread, args.block)
    try:
        row.update(measure.interleaved_blocks(paths, args.block, args.reps, args.block_budget))
    finally:
        measure.close_paths(paths)
    log_results(row, tuple(paths))
    if proto == "socket" and not bus_why:
        row["breakdown"] = attempt("latency breakdown", measure.latency_breakdown, bus, alias, res,
                                   args.queries, args.warmup)
    return row


def main() -> int:
    args = parse_args()
    results: dict[str, Any] = {
        "command": command_line(),
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": rackmod.machine_info(),
        "config": {"queries": args.queries, "warmup": args.warmup, "block": args.block, "reps": args.reps,
                   "clients": args.clients, "instruments": args.instruments, "duration": args.duration,
                   "stream": args.stream, "chunk_sleep_ms": args.chunk_sleep_ms},
        "protocols": {p: {"label": LABELS[p]} for p in report.PROTOCOLS},
        "notes": [],
    }
    wanted = [p for p in args.protocols.split(",") if p in report.PROTOCOLS]
    vicp_alias, vicp_reason = rackmod.free_loopback_alias() if "vicp" in wanted else (None, "not requested")
    load = 0 if args.skip_load else args.instruments
    say("probing the simulator's protocol servers")
    broken = rackmod.probe_protocols(sorted(set(wanted) | ({"socket"} if load else set())))
    for proto, why in broken.items():
        say(f"  {proto}: {why}")
        if proto in wanted:
            results["protocols"][proto] = {"label": LABELS[proto], **dict.fromkeys(cells(proto), why)}
    if "vicp" in broken:
        vicp_alias = None
    if vicp_alias:
        results["notes"].append(f"VICP (both columns) uses an extra simulator on {vicp_alias}:1861, because "
                                "PyVISA-py 0.8.1 drops the port of `VICP::host,port::INSTR` and always dials 1861.")
    served = [p for p in wanted if p not in broken]
    if "socket" in broken:
        load = 0
    rack = rackmod.Rack(rackmod.rack_config(served, vicp_alias, load))
    try:
        import pyvisa

        rm: Any = pyvisa.ResourceManager("@py")
    except Exception as exc:  # noqa: BLE001 - PyVISA-py missing or broken: every PyVISA-py cell says why
        rm = measure.short_reason(exc)
    try:
        say("starting visabus serve")
        rack.start()
        say(f"rack up: broker {rack.frontend}, {len(rack.resources)} resources")
        from visabus.sdk import Client

        with Client(rack.frontend, name="bench") as bus:
            for proto in served:
                results["protocols"][proto] = protocol_bench(bus, rm, rack, proto, args, vicp_alias, vicp_reason)
            if args.skip_load:
                results["many"] = results["slow"] = "skipped (--skip-load)"
            elif not load:
                results["many"] = results["slow"] = broken.get("socket", "no socket simulator")
            else:
                aliases = [f"load{i}-socket" for i in range(args.instruments)]
                say(f"many clients: {args.clients} processes x {len(aliases)} instruments, {args.duration:.0f} s")
                ready = [attempt(f"{a} ready", measure.wait_ready, bus, a) for a in aliases]
                bad = [r for r in ready if isinstance(r, str)]
                if bad:
                    results["many"] = bad[0]
                else:
                    groups = {"broker": [rack.pid("broker")],
                              "workers": [rack.pid(f"worker:{a}") for a in aliases],
                              "simulators": [rack.pid(f"load{i}") for i in range(args.instruments)]}
                    groups = {k: [p for p in v if p] for k, v in groups.items()}
                    results["many"] = attempt("many clients", measure.many_clients, rack.frontend, aliases,
                                              args.clients, args.duration, groups)
                    if isinstance(results["many"], dict):
                        mc = results["many"]
                        say(f"  {mc['qps']:.0f} q/s, p99 {mc['p99_us']:.0f} µs, errors {mc['errors']}, "
                            f"mismatches {mc['mismatches']}, cpu {mc['cpu_percent']}")
                say(f"slow consumer: {args.stream >> 20} MiB, {args.chunk_sleep_ms} ms per chunk")
                pids = {"broker": rack.pid("broker"), "worker": rack.pid("worker:load0-socket"),
                        "simulator": rack.pid("load0")}
                results["slow"] = attempt("slow consumer", measure.slow_consumer, bus, "load0-socket", args.stream,
                                          args.chunk_sleep_ms / 1000.0, pids)
                if isinstance(results["slow"], dict):
                    s = results["slow"]
                    say("  peak RSS " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in s["peak"].items()))
    except Exception as exc:  # noqa: BLE001 - the rack itself failed: still write what we have, with the reason
        reason = measure.short_reason(exc)
        say(f"bench aborted: {reason}\n{rack.log_tail()}")
        results["notes"].append(f"The run was cut short: {reason}")
        results.setdefault("many", reason)
        results.setdefault("slow", reason)
        for proto in served:
            row = results["protocols"][proto]
            for cell in cells(proto):
                row.setdefault(cell, reason)
    finally:
        say("stopping the rack")
        rack.stop()
        if not isinstance(rm, str):
            rm.close()
    results["wall_s"] = time.monotonic() - T0
    results["loadavg_end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    text = report.render(results)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        say(f"wrote {out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The measurements: query latency and block throughput (PyVISA-py direct and through the bus), the
many-clients load and the slow-consumer stream. Each function returns plain dicts for the report."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

MB = 1e6
HERE = Path(__file__).resolve().parent


# ================================================================================ helpers
def summarize(lat_s: list[float]) -> dict[str, float]:
    """Median / p99 / max in microseconds."""
    xs = sorted(lat_s)
    if not xs:
        return {"n": 0, "median_us": float("nan"), "p99_us": float("nan"), "max_us": float("nan")}
    p99 = xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]
    return {"n": len(xs), "median_us": statistics.median(xs) * 1e6, "p99_us": p99 * 1e6, "max_us": xs[-1] * 1e6}


_EXPECTED: dict[int, bytes] = {}


def expected_block(size: int) -> bytes:
    """The simulator's waveform: byte i = i mod 256."""
    if size not in _EXPECTED:
        _EXPECTED.clear()
        _EXPECTED[size] = (bytes(range(256)) * (size // 256 + 1))[:size]
    return _EXPECTED[size]


def check_payload(payload: bytes | bytearray | memoryview, size: int) -> None:
    if len(payload) != size:
        raise RuntimeError(f"block has {len(payload)} bytes, expected {size}")
    if payload != expected_block(size):
        raise RuntimeError("block content differs from the simulator's pattern")


def short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 110 else text[:107] + "..."


def timed_latency(query: Any, n: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        query()
    lat: list[float] = []
    clock = time.perf_counter
    for _ in range(n):
        t = clock()
        query()
        lat.append(clock() - t)
    return summarize(lat)


# ================================================================================ measurement paths
# A runner is (callable, close) for one way of doing the operation (PyVISA-py direct, or the bus), or a str
# saying why it is not available. Paths of one comparison run interleaved, so load that comes and goes on
# the machine hits both sides alike and the ratios stay honest.
Runner = tuple[Callable[[], Any], Callable[[], None]]


def open_path(make: Callable[[], Runner]) -> Runner | str:
    try:
        return make()
    except Exception as exc:  # noqa: BLE001 - any failure to set a path up is reported as its n/a reason
        return short_reason(exc)


def close_paths(paths: dict[str, Runner | str]) -> None:
    for path in paths.values():
        if not isinstance(path, str):
            try:
                path[1]()
            except Exception:  # noqa: BLE001, S110 - closing must not hide the results
                pass


def interleaved_latency(paths: dict[str, Runner | str], n: int, warmup: int, rounds: int = 10) -> dict[str, Any]:
    """Each path runs n queries in `rounds` alternating slices; returns summary or reason per path."""
    live = {k: p for k, p in paths.items() if not isinstance(p, str)}
    lat: dict[str, list[float]] = {k: [] for k in live}
    out: dict[str, Any] = {k: p for k, p in paths.items() if isinstance(p, str)}
    clock = time.perf_counter
    for name in list(lat):
        try:
            for _ in range(warmup):
                live[name][0]()
        except Exception as exc:  # noqa: BLE001 - this path is broken: report why, keep measuring the others
            out[name] = short_reason(exc)
            del lat[name]
    per_round = max(1, n // rounds)
    for _ in range(rounds):
        for name in list(lat):
            query = live[name][0]
            xs = lat[name]
            try:
                for _ in range(per_round):
                    t = clock()
                    query()
                    xs.append(clock() - t)
            except Exception as exc:  # noqa: BLE001 - as above
                out[name] = short_reason(exc)
                del lat[name]
    for name, xs in lat.items():
        out[name] = summarize(xs)
    return out


def interleaved_blocks(paths: dict[str, Runner | str], size: int, reps: int, budget_s: float) -> dict[str, Any]:
    """Up to `reps` verified block reads per path, paths alternating; a path stops repeating after budget_s."""
    out: dict[str, Any] = {k: p for k, p in paths.items() if isinstance(p, str)}
    live = {k: p for k, p in paths.items() if not isinstance(p, str)}
    rates: dict[str, list[float]] = {k: [] for k in live}
    spent = dict.fromkeys(rates, 0.0)
    for rep in range(reps):
        for name in list(rates):
            if rep > 0 and spent[name] > budget_s:
                continue
            try:
                t = time.perf_counter()
                payload = live[name][0]()
                dt = time.perf_counter() - t
                check_payload(payload, size)
                del payload
            except Exception as exc:  # noqa: BLE001 - wrong size / content or I/O error: the path is n/a with the reason
                out[name] = short_reason(exc)
                del rates[name]
                continue
            spent[name] += dt
            rates[name].append(size / dt / MB)
    for name, xs in rates.items():
        out[name] = {"mbps": max(xs), "runs": len(xs), "all_mbps": xs}
    return out


# ---------------------------------------------------------------------------------- PyVISA-py direct
def pyvisa_query(rm: Any, res: str) -> Runner:
    inst = rm.open_resource(res, timeout=10_000, read_termination="\n", write_termination="\n")
    return (lambda: inst.query("*IDN?")), inst.close


def pyvisa_qbv(rm: Any, res: str, size: int) -> Runner:
    """PyVISA's binary API as documented: query_binary_values with the usual '\\n' read termination."""
    inst = rm.open_resource(res, timeout=180_000, read_termination="\n", write_termination="\n")
    inst.write(f"WAV:POIN {size}")
    return (lambda: inst.query_binary_values("WAV:DATA?", datatype="B", container=bytes)), inst.close


def pyvisa_raw(rm: Any, res: str, size: int) -> Runner:
    """PyVISA-py's fastest path for END-terminated protocols: termchar off, write + read_raw, parse header."""
    inst = rm.open_resource(res, timeout=180_000, read_termination=None, write_termination="\n")
    inst.write(f"WAV:POIN {size}")

    def read() -> memoryview:
        inst.write("WAV:DATA?")
        raw = inst.read_raw()
        if raw[:1] != b"#":
            raise RuntimeError(f"no IEEE block header: {raw[:16]!r}")
        ndig = int(raw[1:2])
        length = int(raw[2 : 2 + ndig])
        return memoryview(raw)[2 + ndig : 2 + ndig + length]

    return read, inst.close


# ---------------------------------------------------------------------------------- through the bus
def bus_query(bus: Any, alias: str) -> Runner:
    inst = bus.open(alias, timeout=10_000)
    return (lambda: inst.query("*IDN?")), inst.close


def bus_blockread(bus: Any, alias: str, size: int) -> Runner:
    inst = bus.open(alias, timeout=180_000)
    inst.write(f"WAV:POIN {size}")
    return (lambda: inst.query_binary_block("WAV:DATA?")), inst.close


def wait_ready(bus: Any, alias: str, timeout_s: float = 30.0) -> None:
    """Until the worker answers `*IDN?` (workers connect to their instruments after `serve` reports)."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            inst = bus.open(alias, timeout=3000)
            try:
                if inst.query("*IDN?"):
                    return
            finally:
                inst.close()
        except Exception as exc:  # noqa: BLE001 - the worker may still be connecting; keep the last reason
            last = exc
        time.sleep(0.3)
    raise RuntimeError(f"{alias} not ready after {timeout_s:.0f}s ({short_reason(last) if last else 'no answer'})")


# ================================================================================ many clients
class CpuProbe:
    """CPU seconds used by a set of processes between start() and stop()."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.before: dict[str, float] = {}
        self.wall = 0.0

    @staticmethod
    def _cpu(pids: list[int]) -> float:
        total = 0.0
        for pid in pids:
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
        return total

    def start(self) -> None:
        self.wall = time.monotonic()
        self.before = {k: self._cpu(v) for k, v in self.groups.items()}

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.wall
        return {k: (self._cpu(v) - self.before[k]) / wall * 100.0 for k, v in self.groups.items()}


def many_clients(broker: str, aliases: list[str], clients: int, duration_s: float,
                 cpu_groups: dict[str, list[int]]) -> dict[str, Any]:
    """`clients` processes, client i on aliases[i % len], each running ECHO? queries back to back."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(clients):
            procs.append(subprocess.Popen(
                [sys.executable, str(HERE / "loadgen.py"), "--broker", broker, "--resource", aliases[i % len(aliases)],
                 "--client", str(i), "--duration", str(duration_s)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        for p in procs:  # each says "ready" once connected and warmed up
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith("ready"):
                err = p.stderr.read() if p.stderr else ""
                raise RuntimeError(f"load client failed to start: {line!r} {err[-300:]}")
        start_at = time.time() + 0.5
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"{start_at}\n")
            p.stdin.flush()
        time.sleep(max(0.0, start_at - time.time()))
        probe = CpuProbe({**cpu_groups, "clients": [p.pid for p in procs]})
        probe.start()
        time.sleep(duration_s)
        cpu = probe.stop()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=duration_s + 60)
            try:
                results.append(json.loads(out.strip().splitlines()[-1]))
            except (ValueError, IndexError):
                raise RuntimeError(f"load client printed no result: {out[-200:]!r} {err[-300:]}") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    lat = [x / 1e6 for r in results for x in r["lat_us"]]
    total = sum(r["count"] for r in results)
    window = max(r["elapsed_s"] for r in results)
    stats = summarize(lat)
    return {
        "clients": clients, "instruments": len(set(aliases)), "duration_s": window, "queries": total,
        "qps": total / window, "errors": sum(r["errors"] for r in results),
        "mismatches": sum(r["mismatches"] for r in results), **stats,
        "per_client_min_qps": min(r["count"] / r["elapsed_s"] for r in results),
        "per_client_max_qps": max(r["count"] / r["elapsed_s"] for r in results),
        "cpu_percent": cpu,
    }


# ================================================================================ slow consumer
def slow_consumer(bus: Any, alias: str, size: int, sleep_s: float, pids: dict[str, int | None]) -> dict[str, Any]:
    """Stream `size` bytes with a sleep per chunk while sampling RSS of the broker and the worker."""
    procs = {name: psutil.Process(pid) for name, pid in pids.items() if pid}
    baseline = {name: p.memory_info().rss for name, p in procs.items()}
    peak = dict(baseline)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for name, p in procs.items():
                try:
                    peak[name] = max(peak[name], p.memory_info().rss)
                except psutil.Error:
                    continue
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True, name="rss-sampler")
    inst = bus.open(alias, timeout=600_000)
    try:
        inst.write(f"WAV:POIN {size}")
        sampler.start()
        received = chunks = 0
        t = time.perf_counter()
        for chunk in inst.iter_read(message=b"WAV:DATA?\n", block=True):
            received += len(chunk)
            chunks += 1
            time.sleep(sleep_s)
        elapsed = time.perf_counter() - t
        inst.write("WAV:POIN 1000")
    finally:
        stop.set()
        if sampler.is_alive():
            sampler.join()
        inst.close()
    if received != size:
        raise RuntimeError(f"stream delivered {received} bytes, expected {size}")
    return {"size": size, "chunks": chunks, "sleep_ms": sleep_s * 1000, "elapsed_s": elapsed,
            "mbps": size / elapsed / MB, "baseline": baseline, "peak": peak}


# ================================================================================ latency breakdown
def latency_breakdown(bus: Any, alias: str, res: str, n: int, warmup: int) -> dict[str, dict[str, float]]:
    """Where a bus query's time goes, hop by hop, for a raw SOCKET resource `TCPIP::host::port::SOCKET`."""
    import socket

    parts = res.split("::")
    host, port = parts[1], int(parts[2])
    out: dict[str, dict[str, float]] = {}
    with socket.create_connection((host, port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def raw() -> None:
            s.sendall(b"*IDN?\n")
            buf = s.recv(4096)
            while not buf.endswith(b"\n"):
                buf += s.recv(4096)

        out["raw"] = timed_latency(raw, n, warmup)
    out["zmq"] = zmq_floor(n, warmup)
    out["broker"] = timed_latency(lambda: bus.request("heartbeat", timeout_ms=5000), n, warmup)
    inst = bus.open(alias, timeout=10_000)
    try:
        out["worker"] = timed_latency(lambda: inst.get_attribute("keepalive"), n, warmup)
        out["query"] = timed_latency(lambda: inst.query("*IDN?"), n, warmup)
    finally:
        inst.close()
    return out


_ECHO = """
import sys, zmq
ctx = zmq.Context()
router = ctx.socket(zmq.ROUTER)
print(router.bind_to_random_port("tcp://127.0.0.1"), flush=True)
while True:
    router.send_multipart(router.recv_multipart(copy=False), copy=False)
"""


def zmq_floor(n: int, warmup: int) -> dict[str, float]:
    """One DEALER->ROUTER->DEALER round trip to another Python process: the cost of one bus leg's transport."""
    import zmq

    proc = subprocess.Popen([sys.executable, "-c", _ECHO], stdout=subprocess.PIPE, text=True)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        assert proc.stdout is not None
        sock.connect(f"tcp://127.0.0.1:{int(proc.stdout.readline())}")
        header = b"\x84" + b"h" * 40

        def ping() -> None:
            sock.send_multipart([header, b"*IDN?\n"])
            sock.recv_multipart(copy=False)

        return timed_latency(ping, n, warmup)
    finally:
        sock.close()
        ctx.term()
        proc.kill()
        proc.wait()

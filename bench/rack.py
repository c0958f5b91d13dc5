"""Start and stop the benchmark rack: one `visabus serve` on a temporary config, all on loopback.

The rack is a process tree (supervisor -> broker, simulators, workers). `Rack.stop()` terminates it
politely, then kills whatever psutil still finds of it: a benchmark must never leave processes behind.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from visabus.sim.server import free_loopback_alias as sim_free_loopback_alias

VICP_PORT = 1861  # the only port PyVISA-py's VICP resource can reach (it drops ",port")

BROKER = """\
[broker]
frontend = "tcp://127.0.0.1:0"
backend  = "tcp://127.0.0.1:0"
events   = "tcp://127.0.0.1:0"
"""


def free_loopback_alias() -> tuple[str | None, str]:
    """A 127.0.0.x (x >= 2) on which port 1861 can be bound, or (None, reason)."""
    return sim_free_loopback_alias(VICP_PORT)


def probe_protocols(protocols: list[str], python: str = sys.executable, timeout: float = 20.0) -> dict[str, str]:
    """Start `visabus sim --PROTO 0` for each protocol alone; return {protocol: why it failed} for the broken ones.

    A protocol server that cannot start would take the whole `serve` down, so it is left out of the rack
    and reported as n/a instead.
    """
    procs = {p: subprocess.Popen([python, "-m", "visabus.sdk.cli", "sim", f"--{p}", "0", "--json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                 start_new_session=True) for p in protocols}
    failed: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    try:
        for proto, proc in procs.items():
            line: list[bytes] = []

            def read(out: list[bytes] = line, p: subprocess.Popen[bytes] = proc) -> None:
                assert p.stdout is not None
                out.append(p.stdout.readline())

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            reader.join(max(0.1, deadline - time.monotonic()))
            try:
                ok = bool(line) and proto in json.loads(line[0])
            except ValueError:
                ok = False
            if not ok:
                proc.kill()
                err = proc.stderr.read().decode(errors="replace").strip().splitlines() if proc.stderr else []  # type: ignore[union-attr]
                last = err[-1] if err else f"exit code {proc.poll()}"
                failed[proto] = f"simulator {proto} server failed to start: {last[-120:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return failed


def rack_config(protocols: list[str], vicp_alias: str | None, load_instruments: int) -> str:
    parts = [BROKER]
    if protocols:
        parts.append(f"""
[[simulator]]                      # the instrument every protocol comparison talks to
name      = "sim"
protocols = {json.dumps(protocols)}
identity  = "VISABUS,SIM-BENCH,0001,1.0"
""")
    if vicp_alias:
        parts.append(f"""
[[simulator]]                      # VICP on {vicp_alias}:1861, reachable by PyVISA-py and by the bus
name      = "vicp1861"
protocols = ["vicp"]
host      = "{vicp_alias}"
ports     = {{ vicp = {VICP_PORT} }}
identity  = "LECROY,SIM-BENCH,0002,1.0"
""")
    for i in range(load_instruments):
        parts.append(f"""
[[simulator]]                      # many-clients load instrument {i}
name      = "load{i}"
protocols = ["socket"]
identity  = "VISABUS,SIM-LOAD,{i:04d},1.0"
""")
    return "".join(parts)


class Rack:
    def __init__(self, config_text: str, python: str = sys.executable) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="visabus-bench-")
        self.config_path = Path(self.tmp.name) / "rack.toml"
        self.config_path.write_text(config_text)
        self.log_path = Path(self.tmp.name) / "serve.log"
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self._tree: set[int] = set()

    # ------------------------------------------------------------------------------ start
    def start(self, timeout: float = 90.0) -> Rack:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.python, "-m", "visabus.sdk.cli", "serve", str(self.config_path), "--json"],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        line: list[bytes] = []
        got = threading.Event()

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            line.append(self.proc.stdout.readline())
            got.set()
            for _ in iter(self.proc.stdout.readline, b""):
                pass

        threading.Thread(target=read, daemon=True, name="serve-stdout").start()
        if not got.wait(timeout) or not line[0]:
            self.stop()
            raise RuntimeError(f"visabus serve did not start; log tail:\n{self.log_tail()}")
        self.info = json.loads(line[0])
        self._remember_tree()
        return self

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _remember_tree(self) -> None:
        if self.proc is None:
            return
        try:
            root = psutil.Process(self.proc.pid)
            self._tree |= {root.pid} | {c.pid for c in root.children(recursive=True)}
        except psutil.Error:
            pass

    @property
    def frontend(self) -> str:
        return str(self.info["frontend"])

    @property
    def resources(self) -> dict[str, str]:
        return dict(self.info.get("resources", {}))

    def pid(self, name: str) -> int | None:
        value = self.info.get("pids", {}).get(name)
        return int(value) if value else None

    # ------------------------------------------------------------------------------ stop
    def stop(self) -> None:
        self._remember_tree()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
        for pid in self._tree:  # anything that escaped the process group
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE and "visabus" in " ".join(p.cmdline()):
                    p.kill()
            except psutil.Error:
                continue
        self.tmp.cleanup()


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for mod in ("zmq", "msgpack", "pyvisa", "pyvisa_py", "pyvicp", "psutil"):
        try:
            versions[mod] = str(getattr(__import__(mod), "__version__", "?"))
        except ImportError:
            versions[mod] = "missing"
    try:
        import zmq

        versions["libzmq"] = zmq.zmq_version()
    except ImportError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent.parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    mem = psutil.virtual_memory().total / 2**30
    return {
        "nproc": str(os.cpu_count()),
        "affinity": str(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else "?",
        "cpu": cpu,
        "memory": f"{mem:.1f} GiB",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": platform.release(),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "commit": commit,
        "loadavg": " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?",
    }

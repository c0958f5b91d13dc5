"""Fixtures shared by every test layer: leak checks and real-process helpers.

Every test is checked for leaked child processes (as python-zeroconf checks for leaked threads):
a test that leaves a simulator, worker or broker running fails.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
VISABUS = [sys.executable, "-m", "visabus.sdk.cli"]


# Processes owned by module-scoped fixtures (and their descendants) are not leaks of a single test.
LONG_LIVED: set[int] = set()


def _children() -> set[int]:
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    owned = set()
    for pid in LONG_LIVED:
        try:
            owned |= {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            continue
    return mine - owned


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    before = _children()
    yield
    leaked = []
    for pid in _children() - before:
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            leaked.append(f"{pid}: {' '.join(proc.cmdline()[:6])}")
            proc.kill()
        except psutil.Error:
            continue
    assert not leaked, f"test leaked processes: {leaked}"


class Proc:
    """A visabus subprocess whose first stdout line is JSON; killed (with its children) on exit."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, read_json: bool = True,
                 timeout: float = 30.0) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [*VISABUS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.info: dict[str, Any] = {}
        if read_json:
            line = self._readline(timeout)
            try:
                self.info = json.loads(line)
            except ValueError:
                self.kill()
                raise RuntimeError(f"visabus {' '.join(args)} printed {line!r}; stderr: "
                                   f"{''.join(self.stderr_lines[-20:])}") from None
        threading.Thread(target=self._drain_stdout, daemon=True).start()

    def _readline(self, timeout: float) -> str:
        result: list[bytes] = []
        done = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            result.append(self.proc.stdout.readline())
            done.set()

        threading.Thread(target=read, daemon=True).start()
        if not done.wait(timeout):
            self.kill()
            raise RuntimeError(f"visabus {' '.join(self.args)} printed nothing within {timeout}s; stderr: "
                               f"{''.join(self.stderr_lines[-20:])}")
        return result[0].decode(errors="replace")

    def _drain_stdout(self) -> None:
        assert self.proc.stdout is not None
        for _ in iter(self.proc.stdout.readline, b""):
            pass

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in iter(self.proc.stderr.readline, b""):
            self.stderr_lines.append(line.decode(errors="replace"))
            del self.stderr_lines[:-500]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def terminate(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        try:
            group = os.getpgid(self.proc.pid)
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()
        self.kill()


class ScriptChild:
    """A `python -c SCRIPT ARGS` child that prints one JSON line once ready and exits when its stdin closes
    (so it cannot outlive the test even if the test process dies). Its stderr goes to `log_path`."""

    def __init__(self, script: str, args: list[str], log_path: Path, what: str, timeout: float = 30.0) -> None:
        self.what = what
        self._log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the child; closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-c", script, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        try:
            self.info: dict[str, Any] = json.loads(self._first_line(timeout))
        except (RuntimeError, ValueError):
            self.stop()
            raise

    def _first_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise RuntimeError(f"{self.what} printed nothing in {timeout}s (log: {self._log.name})")
        line = self.proc.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"{self.what} exited with {self.proc.wait()} (log: {self._log.name})")
        return line

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def write_config(tmp: Path, text: str) -> Path:
    path = tmp / "rack.toml"
    path.write_text(text)
    return path


TEST_BROKER = """
[broker]
frontend = "tcp://127.0.0.1:0"
backend  = "tcp://127.0.0.1:0"
events   = "tcp://127.0.0.1:0"
heartbeat_ms = 200
liveness = 3
lease_ms = 2000
"""


def rack_fixture(config_text: str) -> Any:
    """A module-scoped `visabus serve` of `config_text`, shared by the module's tests: `rack = rack_fixture(X)`."""

    @pytest.fixture(scope="module")
    def rack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
        proc = Proc(["serve", str(write_config(tmp_path_factory.mktemp("rack"), config_text)), "--json"], timeout=60)
        LONG_LIVED.add(proc.pid)
        try:
            yield proc
        finally:
            LONG_LIVED.discard(proc.pid)
            proc.terminate()
            proc.kill()

    return rack


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """serve(config_text) -> running `visabus serve` Proc; stopped (and checked for orphans) afterwards."""
    started: list[Proc] = []

    def start(config_text: str, timeout: float = 60.0) -> Proc:
        path = write_config(tmp_path, config_text)
        proc = Proc(["serve", str(path), "--json"], timeout=timeout)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        pids = [p for p in proc.info.get("pids", {}).values() if p]
        code = proc.terminate()
        assert code == 0, f"serve exited with {code}: {''.join(proc.stderr_lines[-10:])}"
        alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        proc.kill()
        assert not alive, f"children outlived the supervisor: {alive}"

"""`make demo`: a scripted tour of visabus on the demo rack of simulated instruments.

Starts `visabus serve` on the demo config (broker on ephemeral loopback ports so it never collides with
a `make run` in another terminal), lists the instruments, queries each one, downloads a 64 MiB waveform
with a progress bar, shows the errors a user gets for an unknown resource and for a timeout, and shuts
everything down. Exits 0 when every step behaved as described.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from visabus.sdk import Client
from visabus.sdk.errors import ResourceNotFound, VisaTimeout

ROOT = Path(__file__).resolve().parent.parent
console = Console()


def start_rack(tmp: Path) -> tuple[subprocess.Popen[str], dict[str, object]]:
    config = tomllib.loads((ROOT / "configs" / "demo.toml").read_text())
    lines = ['[broker]', 'frontend = "tcp://127.0.0.1:0"', 'backend = "tcp://127.0.0.1:0"',
             'events = "tcp://127.0.0.1:0"']
    for sim in config["simulator"]:
        lines += ["[[simulator]]"] + [f"{k} = {json.dumps(v)}" for k, v in sim.items()]
    path = tmp / "demo.toml"
    path.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "visabus.sdk.cli", "serve", str(path), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    return proc, info


def main() -> int:
    console.rule("[bold]visabus demo")
    with tempfile.TemporaryDirectory() as tmp:
        console.print("Starting [bold]visabus serve[/] on the demo rack (broker + simulators + one worker each)…")
        proc, info = start_rack(Path(tmp))
        try:
            return tour(info)
        finally:
            proc.terminate()
            code = proc.wait(15)
            console.print(f"serve stopped (exit code {code}); no process outlives it.")


def tour(info: dict[str, object]) -> int:
    url = str(info["frontend"])
    console.print(f"Broker: clients at [cyan]{url}[/], events at [cyan]{info['events']}[/]\n")
    with Client(url, name="demo") as bus:
        table = Table("resource", "alias", "protocol", "state", "*IDN?", "query time")
        for row in bus.resources("?*"):
            inst = bus.open(row["res"], timeout=5000)
            start = time.perf_counter()
            idn = inst.query("*IDN?")
            table.add_row(row["res"], row.get("alias") or "", row.get("protocol") or "", row["state"], idn,
                          f"{(time.perf_counter() - start) * 1e3:.2f} ms")
        console.print(table)

        scope = bus.open("scope-hislip", timeout=20_000)
        n = 64 << 20
        scope.write(f"WAV:POIN {n}")
        console.print(f"\nDownloading a {n >> 20} MiB waveform from scope-hislip (IEEE 488.2 block, streamed):")
        with Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn()) as bar:
            task = bar.add_task("WAV:DATA?", total=n)
            data = scope.query_binary_block("WAV:DATA?",
                                            progress=lambda done, total: bar.update(task, completed=done))
        intact = len(data) == n and data[:256] == bytes(range(256)) and data[-1] == (n - 1) % 256
        console.print(f"received {len(data)} bytes, pattern intact: {intact}")
        scope.write("WAV:POIN 1000")

        console.print("\nAn unknown resource fails at once with a precise error:")
        try:
            bus.open("TCPIP::127.0.0.1::1::SOCKET")
            return 1
        except ResourceNotFound as exc:
            console.print(f"  [red]{exc.name}[/]: {exc.message}")

        console.print("\nA query slower than its timeout fails with VI_ERROR_TMO (and the next query is clean):")
        dmm = bus.open("dmm-socket", timeout=300)
        try:
            dmm.query("SLOW? 2000")
            return 1
        except VisaTimeout as exc:
            console.print(f"  [red]{exc.name}[/]: {exc.message}")
        dmm.timeout = 5000
        console.print(f"  next query: ECHO? -> {dmm.query('ECHO? still in sync')!r}")
    console.rule("[green]demo complete")
    return 0 if intact else 1


if __name__ == "__main__":
    sys.exit(main())

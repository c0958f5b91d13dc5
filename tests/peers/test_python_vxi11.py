"""python-vxi11 (PyPI `python-vxi11`, an independent VXI-11 client) against our simulator subprocess.

python-vxi11 always asks the portmapper for the core port, and its TCP portmapper client reads the
module global `vxi11.rpc.PMAP_PORT` each time it connects (`TCPPortMapperClient.__init__`), so the
in-process tests redirect it to the simulator's ephemeral portmapper with monkeypatch: this exercises
our portmapper, core and abort channels without privileges.

`test_unmodified_client_in_a_network_namespace` also runs python-vxi11 untouched, against a
simulator whose portmapper listens on the real port 111, inside a network namespace the test
creates (needs root and `ip netns`; skipped with the reason otherwise).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

vxi11 = pytest.importorskip("vxi11")

from visabus.sim.scpi import DEFAULT_IDENTITY, waveform_bytes  # noqa: E402 - after importorskip

_SIM = """
import json, logging, sys
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                    wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
from visabus.sim.scpi import Instrument
from visabus.sim.vxi11_server import Vxi11Server
server = Vxi11Server(Instrument(), **json.loads(sys.argv[1])).start()
print(json.dumps({"vxi11": server.resource, "portmapper_port": server.portmapper_port}), flush=True)
sys.stdin.read()
"""

_CLIENT = """
import vxi11
dev = vxi11.Instrument("127.0.0.1")
print(dev.ask("*IDN?"))
print(dev.read_stb())
dev.close()
"""


def start_sim(log_path: Path, prefix: list[str], **kwargs: Any) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    log = open(log_path, "wb")  # noqa: SIM115 - the child owns it; closed below
    proc = subprocess.Popen([*prefix, sys.executable, "-c", _SIM, json.dumps(kwargs)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    log.close()
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline() if ready else b""
    if not line:
        stop_sim(proc)
        raise RuntimeError(f"simulator did not start: {log_path.read_text(errors='replace')}")
    return proc, json.loads(line)


def stop_sim(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    proc, info = start_sim(tmp_path_factory.mktemp("python_vxi11") / "sim.log", [])
    try:
        yield info
    finally:
        stop_sim(proc)


@pytest.fixture
def redirected(sim: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setattr(vxi11.rpc, "PMAP_PORT", sim["portmapper_port"])
    return sim


@pytest.fixture
def dev(redirected: dict[str, Any]) -> Iterator[Any]:
    device = vxi11.Instrument("127.0.0.1")
    device.timeout = 5
    yield device
    device.close()


def test_ask_through_the_portmapper(dev: Any) -> None:
    assert dev.ask("*IDN?") == DEFAULT_IDENTITY


def test_visa_resource_string_form(redirected: dict[str, Any]) -> None:
    device = vxi11.Instrument("TCPIP::127.0.0.1::inst0::INSTR")
    try:
        assert device.ask("ECHO? resource-form") == "resource-form"
    finally:
        device.close()


def test_unknown_device_name_fails_create_link(redirected: dict[str, Any]) -> None:
    device = vxi11.Instrument("127.0.0.1", "gpib0,5")
    with pytest.raises(vxi11.vxi11.Vxi11Exception) as info:
        device.open()
    assert info.value.err == 3


def test_stb_trigger_clear_remote_local(dev: Any) -> None:
    dev.write("*IDN?")
    assert dev.read_stb() & 0x10
    dev.clear()
    assert dev.read_stb() & 0x10 == 0
    dev.trigger()
    dev.remote()
    dev.local()
    assert dev.ask("*OPC?") == "1"


def test_lock_between_two_devices(dev: Any) -> None:
    other = vxi11.Instrument("127.0.0.1")
    try:
        dev.lock()
        with pytest.raises(vxi11.vxi11.Vxi11Exception) as info:
            other.lock()
        assert info.value.err == 11
        dev.unlock()
        other.lock()
        other.unlock()
        with pytest.raises(vxi11.vxi11.Vxi11Exception) as info:
            other.unlock()
        assert info.value.err == 12
    finally:
        other.close()


def test_abort_channel_ends_a_blocked_read(dev: Any) -> None:
    dev.write("SLOW? 5000")
    errors: list[Any] = []
    done = threading.Event()

    def reader() -> None:
        try:
            dev.read_raw()
        except vxi11.vxi11.Vxi11Exception as exc:
            errors.append(exc.err)
        finally:
            done.set()

    thread = threading.Thread(target=reader)
    thread.start()
    while not done.wait(0.05):  # an abort before the read is in progress is ignored: repeat it
        dev.abort()
    thread.join()
    assert errors == [23]
    dev.clear()
    assert dev.ask("ECHO? after-abort") == "after-abort"


def test_large_block(dev: Any) -> None:
    points = 4 << 20
    dev.write(f"WAV:POIN {points}")
    try:
        raw = dev.ask_raw(b"WAV:DATA?")
    finally:
        dev.write("WAV:POIN 1000")
    header = b"#7%d" % points
    assert raw[: len(header)] == header and raw[-1:] == b"\n"
    assert raw[len(header) : -1] == waveform_bytes(points)


def _netns_unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "needs root to create a network namespace"
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    return None


@pytest.mark.netns
def test_unmodified_client_in_a_network_namespace(tmp_path: Path) -> None:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    ns = f"vbtest-{uuid.uuid4().hex[:8]}"
    created = subprocess.run(["ip", "netns", "add", ns], check=False, capture_output=True, text=True)
    if created.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {created.stderr.strip()}")
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        proc, info = start_sim(tmp_path / "sim.log", ["ip", "netns", "exec", ns], portmapper_port=111)
        try:
            assert info["portmapper_port"] == 111
            client = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _CLIENT],
                                    check=False, capture_output=True, text=True, timeout=30)
        finally:
            stop_sim(proc)
        assert client.returncode == 0, client.stderr
        assert client.stdout.splitlines() == [DEFAULT_IDENTITY, "0"]
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)

"""PyVISA-py (`@py`) as a client of our VXI-11 simulator, which runs as `visabus sim --vxi11 0 --json`.

The simulator's resource names the core port (`TCPIP::127.0.0.1,<port>::inst0::INSTR`), a form
PyVISA-py accepts and which skips the portmapper, so nothing needs port 111.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from collections.abc import Iterator

import pytest
import pyvisa
from pyvisa import constants
from pyvisa.errors import VisaIOError
from pyvisa.resources import MessageBasedResource

from visabus.sim.scpi import DEFAULT_IDENTITY, waveform_bytes

pytest.importorskip("pyvisa_py")


@pytest.fixture(scope="module")
def resource(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("pyvisa_vxi11") / "sim.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "visabus.sdk.cli", "sim", "--vxi11", "0", "--json"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 20)
            line = proc.stdout.readline() if ready else b""
            if not line:
                raise RuntimeError(f"simulator did not start: {log_path.read_text(errors='replace')}")
            yield str(json.loads(line)["vxi11"])
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def rm() -> Iterator[pyvisa.ResourceManager]:
    manager = pyvisa.ResourceManager("@py")
    yield manager
    manager.close()


@pytest.fixture
def inst(rm: pyvisa.ResourceManager, resource: str) -> Iterator[MessageBasedResource]:
    opened = rm.open_resource(resource, read_termination="\n", write_termination="\n", timeout=2000)
    assert isinstance(opened, MessageBasedResource)
    yield opened
    opened.close()


def test_query(inst: MessageBasedResource) -> None:
    assert inst.query("*IDN?") == DEFAULT_IDENTITY
    assert inst.query("ECHO? hello;*OPC?") == "hello;1"


def test_read_stb_sees_mav(inst: MessageBasedResource) -> None:
    assert inst.read_stb() == 0
    inst.write("*IDN?")
    assert inst.read_stb() & 0x10
    assert inst.read() == DEFAULT_IDENTITY


def test_clear_discards_a_pending_response(inst: MessageBasedResource) -> None:
    inst.write("ECHO? stale")
    inst.clear()
    assert inst.read_stb() & 0x10 == 0
    assert inst.query("ECHO? fresh") == "fresh"


def test_assert_trigger(inst: MessageBasedResource) -> None:
    inst.assert_trigger()
    assert inst.query("*OPC?") == "1"


def test_lock_excludes_a_second_link(rm: pyvisa.ResourceManager, resource: str, inst: MessageBasedResource) -> None:
    other = rm.open_resource(resource, read_termination="\n", write_termination="\n", timeout=2000)
    assert isinstance(other, MessageBasedResource)
    try:
        inst.lock_excl()
        with pytest.raises(VisaIOError) as info:
            other.lock_excl()  # PyVISA-py sends no waitlock: error 11 comes back at once
        assert info.value.error_code == constants.StatusCode.error_resource_locked
        with pytest.raises(VisaIOError):
            other.write("*IDN?")
        assert inst.query("*OPC?") == "1"
        inst.unlock()
        other.lock_excl()
        assert other.query("ECHO? mine") == "mine"
        other.unlock()
    finally:
        other.close()


@pytest.mark.parametrize("points", [1000, 1 << 20])
def test_binary_block(inst: MessageBasedResource, points: int) -> None:
    inst.write(f"WAV:POIN {points}")
    try:
        data = inst.query_binary_values("WAV:DATA?", datatype="B", container=bytes)
    finally:
        inst.write("WAV:POIN 1000")
    assert data == waveform_bytes(points)


def test_read_timeout_is_reported_as_visa_timeout(inst: MessageBasedResource) -> None:
    inst.timeout = 200
    with pytest.raises(VisaIOError) as info:
        inst.read()
    assert info.value.error_code == constants.StatusCode.error_timeout

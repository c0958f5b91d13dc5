"""PyVISA-py (`@py`), an independent implementation, as a client of our raw SCPI socket simulator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Proc
from visabus.sim.scpi import waveform_bytes

pyvisa = pytest.importorskip("pyvisa")


@pytest.fixture(scope="module")
def sim() -> Iterator[str]:
    proc = Proc(["sim", "--socket", "0", "--json", "--identity", "ACME,PEER-1,0009,2.0"])
    try:
        yield proc.info["socket"]
    finally:
        proc.terminate()
        proc.kill()


@pytest.fixture
def inst(sim: str) -> Iterator[object]:
    rm = pyvisa.ResourceManager("@py")
    resource = rm.open_resource(sim, read_termination="\n", write_termination="\n", timeout=5000)
    try:
        yield resource
    finally:
        resource.close()
        rm.close()


def test_pyvisa_py_query(inst) -> None:  # type: ignore[no-untyped-def]
    assert inst.query("*IDN?") == "ACME,PEER-1,0009,2.0"
    assert inst.query("ECHO? hello peer") == "hello peer"
    inst.write("FOO:BAR")
    assert inst.query("SYST:ERR?").startswith("-113,")


def test_pyvisa_py_binary_block(inst) -> None:  # type: ignore[no-untyped-def]
    inst.write("WAV:POIN 100000")
    data = inst.query_binary_values("WAV:DATA?", datatype="B", container=bytes)
    assert data == waveform_bytes(100000)  # includes LF bytes inside the block: length-driven read
    assert inst.query("*OPC?") == "1"  # the trailing terminator was consumed

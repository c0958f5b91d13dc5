"""PyVISA-py's VICP resource (`VICP::host::INSTR`, via pyvicp) against our simulator in a child process.

PyVISA-py 0.8.1 can only reach port 1861 (it passes "host,port" to pyvicp as the host name), so the
simulator listens on 127.0.0.<random>:1861. On Linux all of 127.0.0.0/8 is local to `lo`, so this needs
no alias setup, no root and no namespace, and does not collide with anything on 127.0.0.1:1861. Where
such an address cannot be bound (another OS, or a wildcard listener on port 1861) the tests are skipped
with the bind error as the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import pyvisa
from pyvisa import constants
from pyvisa.errors import VisaIOError
from pyvisa.resources import MessageBasedResource

from tests.conftest import ScriptChild
from visabus.sim.server import free_loopback_alias

pytest.importorskip("pyvisa_py")
pytest.importorskip("pyvicp")

IDENTITY = "LECROY,WAVERUNNER-SIM,LCRY0001,9.0"
VICP_PORT = 1861

_SIM = """
import json, logging, sys
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                    wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
from visabus.sim.scpi import Instrument
from visabus.sim.vicp_server import VicpServer
server = VicpServer(Instrument(identity=sys.argv[1]), host=sys.argv[2], port=int(sys.argv[3])).start()
print(json.dumps({"vicp": server.resource, "port": server.port}), flush=True)
sys.stdin.read()
"""


def _free_loopback_alias() -> str:
    """A 127.0.0.x (x >= 2) where port 1861 can be bound, or skip with the reason."""
    host, reason = free_loopback_alias(VICP_PORT)
    if host is None:
        pytest.skip(f"PyVISA-py only reaches VICP port {VICP_PORT} and no loopback alias is free ({reason})")
    return host


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(resource, host) of a simulator on 127.0.0.x:1861."""
    host = _free_loopback_alias()
    log_path = tmp_path_factory.mktemp("pyvisa_vicp") / "sim.log"
    try:
        child = ScriptChild(_SIM, [IDENTITY, host, str(VICP_PORT)], log_path, "VICP simulator", timeout=20)
    except RuntimeError:
        pytest.skip(f"VICP simulator could not listen on {host}:{VICP_PORT}: {Path(log_path).read_text()[-500:]}")
    try:
        yield child.info["vicp"], host
    finally:
        child.stop()


@pytest.fixture(scope="module")
def rm() -> Iterator[pyvisa.ResourceManager]:
    manager = pyvisa.ResourceManager("@py")
    yield manager
    manager.close()


@pytest.fixture
def inst(sim: tuple[str, str], rm: pyvisa.ResourceManager) -> Iterator[MessageBasedResource]:
    resource, _ = sim
    assert resource == f"VICP::{sim[1]}::INSTR"   # port 1861 is left out, as PyVISA expects
    instrument = rm.open_resource(resource, read_termination="\n", timeout=5000)
    assert isinstance(instrument, MessageBasedResource)
    yield instrument
    instrument.close()


def test_query(inst: MessageBasedResource) -> None:
    assert inst.query("*IDN?") == IDENTITY


def test_binary_block(inst: MessageBasedResource) -> None:
    points = 8 << 20
    inst.write(f"WAV:POIN {points}")
    data = inst.query_binary_values("WAV:DATA?", datatype="B", container=bytes)
    assert len(data) == points and data == bytes(range(256)) * (points // 256)
    inst.write("WAV:POIN 1000")


def test_clear_after_a_query(inst: MessageBasedResource) -> None:
    assert inst.query("*IDN?") == IDENTITY   # sequence numbers seen first: pyvicp's clear does not sleep
    inst.write("SLOW? 500")
    inst.clear()
    assert inst.query("ECHO? after clear") == "after clear"


def test_read_stb_is_not_supported_by_pyvisa_py(inst: MessageBasedResource) -> None:
    with pytest.raises(VisaIOError) as info:
        inst.read_stb()
    assert info.value.error_code == constants.StatusCode.error_nonsupported_operation


def test_port_override_does_not_work_in_pyvisa_py(sim: tuple[str, str], rm: pyvisa.ResourceManager) -> None:
    """Why the simulator must sit on port 1861 here: "host,port" reaches pyvicp as the host name."""
    _, host = sim
    with pytest.raises(VisaIOError) as info:
        rm.open_resource(f"VICP::{host},{VICP_PORT}::INSTR")
    assert info.value.error_code == constants.StatusCode.error_resource_not_found

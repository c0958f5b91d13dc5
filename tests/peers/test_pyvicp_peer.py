"""pyvicp (the LeCroy client library, used directly) against our VICP simulator in a child process.

Shows the simulator speaks VICP the way pyvicp expects: sequence numbers echoed (so pyvicp detects
"v1a" and flushes unread responses), EOI-terminated messages split over several blocks, device clear,
in-band serial poll. pyvicp's own defects are covered in tests/integration/test_vicp_driver.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import pyvicp

from tests.conftest import ScriptChild

IDENTITY = "LECROY,WAVERUNNER-SIM,LCRY0001,9.0"

_SIM = """
import json, logging, sys
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                    wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
from visabus.sim.scpi import Instrument
from visabus.sim.vicp_server import VicpServer
server = VicpServer(Instrument(identity=sys.argv[1])).start()
print(json.dumps({"vicp": server.resource, "port": server.port}), flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def sim_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    log_path = tmp_path_factory.mktemp("pyvicp") / "sim.log"
    try:
        child = ScriptChild(_SIM, [IDENTITY], log_path, "VICP simulator", timeout=20)
    except RuntimeError:
        pytest.fail(f"VICP simulator did not start: {Path(log_path).read_text()}")
    try:
        yield int(child.info["port"])
    finally:
        child.stop()


@pytest.fixture
def client(sim_port: int) -> Iterator[pyvicp.Client]:
    c = pyvicp.Client("127.0.0.1", sim_port, timeout=5)
    c.timeout = 5
    yield c
    c.close()


def test_query(client: pyvicp.Client) -> None:
    client.send(b"*IDN?")
    assert client.receive() == IDENTITY.encode() + b"\n"
    assert client._vicpversion1a_supported  # our sequence numbers made pyvicp switch to "v1a"


def test_64_mib_block_over_several_blocks(client: pyvicp.Client) -> None:
    points = 64 << 20
    client.send(b"WAV:POIN %d" % points)
    client.send(b"WAV:DATA?")
    data = client.receive()
    prefix = b"#8%d" % points
    assert len(data) == len(prefix) + points + 1
    assert data[: len(prefix)] == prefix and data[-1:] == b"\n"
    assert memoryview(data)[len(prefix) : -1] == bytes(range(256)) * (points // 256)
    client.send(b"WAV:POIN 1000")


def test_unread_response_is_flushed_by_sequence_number(client: pyvicp.Client) -> None:
    client.send(b"ECHO? old")                 # never read
    client.send(b"ECHO? new")
    assert client.receive() == b"new\n"       # pyvicp dropped "old": its tag is the older number


def test_device_clear_drops_a_pending_answer(client: pyvicp.Client) -> None:
    client.send(b"*IDN?")
    client.receive()                          # v1a seen: pyvicp's clear sends CLEAR (no 100 s sleep)
    client.send(b"SLOW? 500")
    client.device_clear()
    client.send(b"ECHO? after")
    assert client.receive() == b"after\n"


def test_in_band_serial_poll(client: pyvicp.Client) -> None:
    # A fresh connection (no response seen yet) makes pyvicp poll in band: a DATA|SERIALPOLL block.
    # Its answer carries a sequence number, after which pyvicp would poll out of band - which times
    # out on Linux (see tests/integration/test_vicp_driver.py) - so one poll per connection here.
    client.send(b"*ESE 1;*SRE 32;*OPC")       # OPC -> ESR bit 0 -> ESB (0x20) -> RQS (0x40)
    assert client.serial_poll() == 0x60
    client.send(b"*ESR?;*STB?")               # the poll cleared RQS, *ESR? then clears ESB
    assert client.receive() == b"1;0\n"

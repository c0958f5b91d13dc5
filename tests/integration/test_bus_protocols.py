"""Every protocol driver through the whole bus (SDK -> broker -> worker -> simulator process)."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from tests.conftest import TEST_BROKER, Proc, rack_fixture
from visabus.sdk import Client
from visabus.sdk.errors import Aborted
from visabus.sim.scpi import waveform_bytes

RACK = TEST_BROKER + """
[[simulator]]
name = "v"
protocols = ["vxi11"]
identity = "ACME,VXI-SIM,0001,1.0"

[[simulator]]
name = "hs"
protocols = ["hislip"]
identity = "ACME,HISLIP-SYNC,0002,1.0"

[[simulator]]
name = "ho"
protocols = ["hislip"]
identity = "ACME,HISLIP-OVERLAP,0003,1.0"
hislip_overlap = true

[[simulator]]
name = "lc"
protocols = ["vicp"]
identity = "LECROY,VICP-SIM,0004,1.0"
"""
ALIASES = {"v-vxi11": "ACME,VXI-SIM,0001,1.0", "hs-hislip": "ACME,HISLIP-SYNC,0002,1.0",
           "ho-hislip": "ACME,HISLIP-OVERLAP,0003,1.0", "lc-vicp": "LECROY,VICP-SIM,0004,1.0"}


rack = rack_fixture(RACK)


@pytest.mark.parametrize("alias", ALIASES)
def test_query_and_64_mib_block(rack: Proc, alias: str) -> None:
    with Client(rack.info["frontend"]) as bus:
        inst = bus.open(alias, timeout=30_000)
        assert inst.query("*IDN?") == ALIASES[alias]
        n = 64 << 20  # larger than HiSLIP's 1 MiB max message and VXI-11's maxRecvSize: many messages
        inst.write(f"WAV:POIN {n}")
        try:
            data = inst.query_binary_block("WAV:DATA?")
        finally:
            inst.write("WAV:POIN 1000")
        assert len(data) == n
        assert hashlib.sha256(data).digest() == hashlib.sha256(waveform_bytes(n)).digest()
        assert inst.query("ECHO? in sync") == "in sync"


@pytest.mark.parametrize("alias", ["v-vxi11", "hs-hislip", "ho-hislip"])
def test_status_byte_shows_message_available(rack: Proc, alias: str) -> None:
    with Client(rack.info["frontend"]) as bus:
        inst = bus.open(alias)
        assert not inst.read_stb() & 0x10
        inst.write("ECHO? pending")
        assert inst.read_stb() & 0x10  # MAV: an answer waits in the instrument's output queue
        assert inst.read() == "pending"


def test_vicp_serial_poll_between_write_and_read(rack: Proc) -> None:
    # A VICP scope pushes its answer onto the wire at once, so MAV is not seen in the poll; what matters is
    # that a serial poll between a write and its read neither loses nor corrupts the answer.
    with Client(rack.info["frontend"]) as bus:
        inst = bus.open("lc-vicp")
        inst.write("ECHO? pending")
        assert 0 <= inst.read_stb() <= 255
        assert inst.read() == "pending"


@pytest.mark.parametrize("alias", ALIASES)
def test_clear_from_another_client_ends_a_blocked_read(rack: Proc, alias: str) -> None:
    url = rack.info["frontend"]
    outcome: dict[str, object] = {}
    with Client(url) as reader_bus, Client(url) as other:
        inst = reader_bus.open(alias, timeout=20_000)

        def blocked() -> None:
            try:
                outcome["answer"] = inst.query("SLOW? 10000")
            except Aborted as exc:
                outcome["aborted"] = exc

        thread = threading.Thread(target=blocked)
        thread.start()
        deadline = time.monotonic() + 10
        while not any(r["alias"] == alias and r["busy"] for r in other.status()["resources"]):
            assert time.monotonic() < deadline, "the query never started"
        other.open(alias).clear()
        thread.join(8)
        assert not thread.is_alive() and "aborted" in outcome, outcome
        assert inst.query("ECHO? after") == "after"

"""Events to clients: SRQs from every protocol that has them, fanned out to every subscriber."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import TEST_BROKER, Proc, rack_fixture
from visabus.sdk import Client

RACK = TEST_BROKER + """
[[simulator]]
name = "srq"
protocols = ["vxi11", "hislip", "vicp"]
identity = "LECROY,SRQ-SIM,0007,1.0"
"""


rack = rack_fixture(RACK)


@pytest.mark.parametrize("alias", ["srq-vxi11", "srq-hislip", "srq-vicp"])
def test_srq_reaches_two_subscribed_clients(rack: Proc, alias: str) -> None:
    url = rack.info["frontend"]
    with Client(url, name="a") as a, Client(url, name="b") as b, Client(url, name="trigger") as c:
        inst_a, inst_b = a.open(alias), b.open(alias)
        with inst_a.srq_events() as sub_a, inst_b.srq_events() as sub_b:
            trigger = c.open(alias)
            trigger.write("SRQ 50")  # the simulator requests service 50 ms later
            got_a, got_b = sub_a.get(10.0), sub_b.get(10.0)
        for event in (got_a, got_b):
            assert event is not None, f"no SRQ event from {alias}"
            assert event["res"] == trigger.resource_name and event["topic"] == f"srq.{trigger.resource_name}"
            assert event["stb"] & 0x40, event  # RQS set in the status byte delivered with the event
        assert sub_a.dropped == 0 and sub_b.dropped == 0


def test_wait_for_srq_times_out_cleanly(rack: Proc) -> None:
    with Client(rack.info["frontend"]) as bus:
        assert bus.open("srq-hislip").wait_for_srq(timeout=0.3) is None


def test_events_iterator_filters_by_prefix(rack: Proc) -> None:
    with Client(rack.info["frontend"]) as bus:
        inst = bus.open("srq-vxi11")
        with bus.subscribe("lock.") as stream:
            with inst.lock():
                pass
            topics = [stream.get(5.0), stream.get(5.0)]
        assert [e["action"] for e in topics if e] == ["acquired", "released"]
        assert all(e and e["topic"] == f"lock.{inst.resource_name}" for e in topics)


@pytest.mark.parametrize("alias", ["srq-vxi11", "srq-hislip"])
def test_assert_trigger_reaches_the_instrument(rack: Proc, alias: str) -> None:
    with Client(rack.info["frontend"]) as bus:
        inst = bus.open(alias)
        before = int(inst.query("TRG:COUN?"))
        inst.assert_trigger()
        inst.trigger()
        assert int(inst.query("TRG:COUN?")) == before + 2


def test_cli_watch_prints_events_as_json_lines(rack: Proc) -> None:
    watch = subprocess.Popen([sys.executable, "-m", "visabus.sdk.cli", "watch", "lock.", "--json", "--count", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "VISABUS_BROKER": rack.info["frontend"]})
    try:
        with Client(rack.info["frontend"]) as bus:
            inst = bus.open("srq-hislip")
            deadline = time.monotonic() + 20
            while watch.poll() is None and time.monotonic() < deadline:
                with inst.lock():  # repeated until the watcher (subscribing meanwhile) has seen one
                    pass
        out, err = watch.communicate(timeout=20)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, err
    event = json.loads(out.strip().splitlines()[0])
    assert event["topic"] == f"lock.{inst.resource_name}" and event["action"] in ("acquired", "released")

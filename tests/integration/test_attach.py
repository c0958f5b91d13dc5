"""The supervisor starting workers by itself: on demand (a client opens an unserved resource) and
automatically for instruments discovery finds (mDNS on loopback), retiring them when they go away."""

from __future__ import annotations

import time

import pytest

from tests.conftest import TEST_BROKER, Proc
from visabus.sdk import Client
from visabus.sdk.errors import ResourceNotFound
from visabus.sdk.resources import canonical


def _wait_served(bus: Client, res: str, deadline_s: float) -> dict[str, object]:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for row in bus.resources("?*"):
            if row["res"] == res and row["source"] == "worker" and row["state"] == "ready":
                return row
        time.sleep(0.1)  # polling the broker's directory; discovery has no event we could join earlier
    raise AssertionError(f"{res} was never attached")


def test_open_of_an_unserved_resource_starts_a_worker(serve) -> None:  # type: ignore[no-untyped-def]
    with Proc(["sim", "--socket", "0", "--json", "--identity", "ACME,ONDEMAND,0042,1.0"]) as sim:
        rack = serve(TEST_BROKER + "[discovery]\nattach_on_demand = true\n")
        with Client(rack.info["frontend"]) as bus:
            assert bus.list_resources("?*") == ()
            inst = bus.open(sim.info["socket"], timeout=10_000)  # no worker yet: the supervisor starts one
            assert inst.query("*IDN?") == "ACME,ONDEMAND,0042,1.0"
            assert bus.list_resources("?*") == (canonical(sim.info["socket"]),)
            with bus.subscribe("supervisor.detached") as detached:
                start = time.monotonic()
                with pytest.raises(ResourceNotFound) as info:
                    bus.open("TCPIP::127.0.0.1::1::SOCKET", timeout=10_000)  # nothing listens on port 1
                assert "not reachable" in info.value.message
                assert time.monotonic() - start < 8.0
                event = detached.get(10.0)  # the worker for the unreachable instrument is retired
            assert event is not None and event["res"] == "TCPIP0::127.0.0.1::1::SOCKET"
            assert "TCPIP0::127.0.0.1::1::SOCKET" not in bus.list_resources("?*")


def test_discovered_instruments_are_attached_and_retired(serve) -> None:  # type: ignore[no-untyped-def]
    sim = Proc(["sim", "--hislip", "0", "--advertise", "127.0.0.1", "--json",
                "--identity", "ACME,AUTO-SCOPE,SN77,1.0"], timeout=30)
    try:
        res = canonical(sim.info["hislip"])
        rack = serve(TEST_BROKER + """
[discovery]
enabled = true
interfaces = ["127.0.0.1"]
broadcast = false
mdns = true
detach_grace_s = 1.0
auto_attach = [{ protocol = "hislip", manufacturer = "acme*" }, { protocol = "vicp" }]
""")
        with Client(rack.info["frontend"]) as bus:
            _wait_served(bus, res, 30.0)
            assert bus.open(res).query("*IDN?") == "ACME,AUTO-SCOPE,SN77,1.0"
            with bus.subscribe("supervisor.detached") as detached, bus.subscribe("instrument.disappeared") as gone:
                sim.terminate()  # a clean stop sends the mDNS goodbye
                left = gone.get(20.0)
                assert left is not None and res in left["resources"]
                event = detached.get(20.0)  # retired after the 1 s grace period
            assert event is not None and event["res"] == res
    finally:
        sim.terminate()
        sim.kill()

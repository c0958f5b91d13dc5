"""Discovery as users see it: `visabus discover`, discovered resources in `list`, live instrument events.

Simulators announce themselves over mDNS on loopback only (never the machine's real interfaces)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.conftest import TEST_BROKER, Proc
from visabus.sdk import Client
from visabus.sdk.resources import canonical

IDENTITY = "ACME,MULTI-SIM,SN9001,2.1"


def _sim(identity: str) -> Proc:
    return Proc(["sim", "--socket", "0", "--hislip", "0", "--advertise", "127.0.0.1", "--json",
                 "--identity", identity], timeout=30)


def test_discover_groups_one_instrument_reachable_by_several_protocols() -> None:
    with _sim(IDENTITY) as sim:
        out = subprocess.run([sys.executable, "-m", "visabus.sdk.cli", "discover", "--timeout", "4", "--json",
                              "--interface", "127.0.0.1"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        found = [i for i in json.loads(out.stdout) if (i.get("metadata") or {}).get("serial") == "SN9001"]
        assert len(found) == 1, found  # one instrument, not one per protocol
        resources = set(found[0]["resources"])
        assert {canonical(sim.info["socket"]), canonical(sim.info["hislip"])} <= resources
        assert found[0]["metadata"]["manufacturer"] == "ACME" and found[0]["metadata"]["model"] == "MULTI-SIM"


def test_discovered_instruments_are_listed_and_announced(serve) -> None:  # type: ignore[no-untyped-def]
    rack = serve(TEST_BROKER + """
[discovery]
enabled = true
interfaces = ["127.0.0.1"]
broadcast = false
""")
    with Client(rack.info["frontend"]) as bus, bus.subscribe("instrument.") as events:
        with _sim("ACME,LIVE-SIM,SN9002,1.0") as sim:
            hislip, socket_res = canonical(sim.info["hislip"]), canonical(sim.info["socket"])
            # Its services are found in any order: appeared with one resource, changed as the others come.
            found = _wait_event(events, lambda e: e["topic"] in ("instrument.appeared", "instrument.changed")
                                and {hislip, socket_res} <= set(e["resources"]))
            assert found["metadata"]["serial"] == "SN9002" and found["address"] == "127.0.0.1"
            listed = {r["res"]: r for r in bus.resources("TCPIP?*::hislip?*::INSTR")}
            assert listed[hislip]["source"] == "discovery" and listed[hislip]["state"] == "unattached"
        # The simulator stopped cleanly (mDNS goodbye): the instrument disappears and leaves the directory.
        _wait_event(events, lambda e: e["topic"] == "instrument.disappeared" and e["key"] == found["key"])
        listed_after = bus.list_resources("?*")
        assert hislip not in listed_after and socket_res not in listed_after


def _wait_event(events, match, deadline_s: float = 20.0):  # type: ignore[no-untyped-def]
    seen = []
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        event = events.get(1.0)
        if event is not None:
            seen.append((event["topic"], event.get("resources")))
            if match(event):
                return event
    raise AssertionError(f"expected event never came; saw {seen}")

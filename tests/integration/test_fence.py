"""Fenced locks: while a bus client holds a lock, the worker also holds the instrument's own lock, so a
client outside the bus (here: a driver session opened straight from this test process) is kept out."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import TEST_BROKER, Proc
from visabus.sdk import Client
from visabus.sdk.errors import ResourceLocked, VisaBusError, VisaTimeout
from visabus.sdk.resources import parse_resource
from visabus.workers.sessions import SessionAttributes, session_for


@pytest.fixture(params=["vxi11", "hislip"])
def fenced_rack(request: pytest.FixtureRequest, serve) -> Iterator[tuple[Proc, str]]:  # type: ignore[no-untyped-def]
    proto = request.param
    with Proc(["sim", f"--{proto}", "0", "--json"]) as sim:
        res = sim.info[proto]
        rack = serve(TEST_BROKER + f"""
[[instrument]]
resource = "{res}"
name = "fenced"
attributes = {{ fence_locks = true }}
""")
        yield rack, res


def _outside_session(res: str):  # type: ignore[no-untyped-def]
    session = session_for(parse_resource(res), SessionAttributes(timeout=2.0))
    session.open(2.0)
    return session


def test_bus_lock_fences_out_a_client_outside_the_bus(fenced_rack: tuple[Proc, str]) -> None:
    rack, res = fenced_rack
    outside = _outside_session(res)
    try:
        with Client(rack.info["frontend"]) as bus:
            inst = bus.open("fenced")
            with inst.lock():
                with pytest.raises((VisaTimeout, ResourceLocked)):
                    outside.lock(True, 0.3)  # the instrument itself says: locked by another link
                assert inst.query("ECHO? inside") == "inside"
            outside.lock(True, 2.0)  # released with the bus lock
            outside.unlock()
    finally:
        outside.close()


def test_instrument_locked_outside_the_bus_refuses_the_bus_lock(fenced_rack: tuple[Proc, str]) -> None:
    rack, res = fenced_rack
    outside = _outside_session(res)
    try:
        outside.lock(True, 2.0)
        with Client(rack.info["frontend"]) as bus:
            inst = bus.open("fenced")
            with pytest.raises(VisaBusError) as info:
                inst.lock(timeout=300)
            assert "outside the bus" in info.value.message
            assert bus.status()["resources"][0]["lock"]["holders"] == []  # nothing half-held at the bus
            outside.unlock()
            with inst.lock(timeout=2000):
                assert inst.query("ECHO? ok") == "ok"
    finally:
        outside.close()

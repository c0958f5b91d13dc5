"""Discovery on loopback: a simulated instrument in a subprocess (portmapper with the VXI-11 core program on
an ephemeral port + mDNS advertisement on 127.0.0.1) is found by broadcast and mDNS, disappears when killed,
reappears when restarted, and withdraws at once on a clean stop (mDNS goodbye).

mDNS on the host's `lo`: `lo` has no MULTICAST flag here, yet multicast sent with IP_MULTICAST_IF=127.0.0.1
is delivered to every group member on the host and never leaves it (checked: eth0's tx counter does not move),
so this works without changing the host. Port 5353 is inherent to mDNS; nothing else uses a fixed port.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from visabus.sim.advertise import Advertiser
from visabus.workers.discovery import DiscoveryConfig, DiscoveryService, resolve_interfaces
from visabus.workers.discovery.interfaces import Interface
from visabus.workers.discovery.vxi11_scan import BroadcastScanner
from visabus.workers.protocols.portmapper import IPPROTO_TCP, PortmapperServer

pytestmark = pytest.mark.timeout(60)

# A simulated instrument: portmapper (VXI-11 core registered) + mDNS advertisement; prints one JSON line
# when ready; SIGTERM = clean stop with mDNS goodbye; SIGKILL = vanishing without one.
SIM = r"""
import json, signal, sys, threading
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from visabus.workers.protocols.portmapper import PortmapperServer, IPPROTO_TCP
from visabus.sim.advertise import Advertiser
address, identity, pmap_port, core, hislip, raw = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
pm = PortmapperServer(address, pmap_port).start()
pm.register(0x0607AF, 1, IPPROTO_TCP, core)
adv = Advertiser(address, identity, {"vxi11": pm.udp_port, "hislip": hislip, "socket": raw}).start()
print(json.dumps({"pmap_port": pm.udp_port}), flush=True)
stop.wait()
adv.stop()
pm.stop()
"""


class Sim:
    def __init__(self, serial: str, pmap_port: int = 0) -> None:
        self.serial = serial
        self.core, self.hislip, self.raw = (random.randint(20000, 30000) for _ in range(3))
        self.pmap_port = pmap_port
        self.proc: subprocess.Popen[str] | None = None
        self.ready_at = 0.0

    def start(self) -> Sim:
        identity = f"ACME,SIM-1,{self.serial},1.0"
        args = ["127.0.0.1", identity, str(self.pmap_port), str(self.core), str(self.hislip), str(self.raw)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SIM, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.kill()
            pytest.fail("simulated instrument did not start within 15 s")
        self.pmap_port = json.loads(line)["pmap_port"]
        self.ready_at = time.monotonic()
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None

    @property
    def key(self) -> str:
        return f"id:acme:{self.serial}"

    @property
    def resources(self) -> set[str]:
        return {
            f"TCPIP0::127.0.0.1,{self.core}::inst0::INSTR",
            f"TCPIP0::127.0.0.1::hislip0,{self.hislip}::INSTR",
            f"TCPIP0::127.0.0.1::{self.raw}::SOCKET",
        }


class Events:
    """Collects emitted events; `wait_for` polls them with a deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.items: list[tuple[float, str, dict[str, Any]]] = []

    def emit(self, topic: str, data: dict[str, Any]) -> None:
        with self._cond:
            self.items.append((time.monotonic(), topic, data))
            self._cond.notify_all()

    def wait_for(
        self, what: str, predicate: Callable[[str, dict[str, Any]], bool], timeout: float, since: int = 0
    ) -> tuple[int, float, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for index in range(since, len(self.items)):
                    at, topic, data = self.items[index]
                    if predicate(topic, data):
                        return index, at, data
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(t, d["key"], d["resources"]) for _, t, d in self.items[since:]]
                    pytest.fail(f"no {what} within {timeout} s; events: {seen}")
                self._cond.wait(left)


@pytest.fixture
def sims() -> Iterator[list[Sim]]:
    started: list[Sim] = []
    yield started
    for sim in started:
        sim.kill()


@contextlib.contextmanager
def running_discovery(config: DiscoveryConfig, events: Events) -> Iterator[DiscoveryService]:
    service = DiscoveryService(config, events.emit)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), name="discovery", daemon=True)
    thread.start()
    try:
        yield service
    finally:
        stop.set()
        thread.join(timeout=10)
        service.close()
        assert not thread.is_alive(), "discovery loop did not stop"


def test_loopback_instrument_appears_disappears_and_reappears(sims: list[Sim]) -> None:
    serial = f"LB{os.getpid()}{random.randint(0, 9999)}"
    sim = Sim(serial).start()
    sims.append(sim)
    events = Events()
    config = DiscoveryConfig(interfaces=("127.0.0.1",), portmapper_port=sim.pmap_port)
    with running_discovery(config, events):
        ours = sim.key
        # Broadcast and mDNS both find it; the three resources group under manufacturer + serial.
        _, found_at, data = events.wait_for(
            "all three resources", lambda t, d: d["key"] == ours and set(d["resources"]) == sim.resources, 5
        )
        assert data["metadata"] == {"manufacturer": "ACME", "model": "SIM-1", "serial": serial, "firmware": "1.0"}
        assert "mdns" in data["sources"]  # the VXI-11 resource may come from either source first
        assert data["protocol"] == "hislip"
        assert found_at - sim.ready_at <= 2.5

        # Killed without a goodbye: gone once broadcast and mDNS probes miss `misses` rounds.
        mark = len(events.items)
        sim.kill(signal.SIGKILL)
        killed_at = time.monotonic()
        _, gone_at, data = events.wait_for(
            "disappearance", lambda t, d: t == "instrument.disappeared" and d["key"] == ours, 10, since=mark
        )
        assert data["reason"] == "missed"
        assert set(data["resources"]) <= sim.resources
        assert gone_at - killed_at >= (config.misses - 1) * config.interval_s  # hysteresis, not one lost reply
        assert gone_at - killed_at <= 8.0

        # Restarted on the same portmapper port: appears again. The broadcast reply may come first, before
        # the mDNS announcement names the instrument: it then appears under its address and is renamed by
        # a "changed" event carrying `previous_keys`.
        mark = len(events.items)
        sim.start()
        _, _, data = events.wait_for(
            "reappearance", lambda t, d: t == "instrument.appeared" and bool(set(d["resources"]) & sim.resources), 4,
            since=mark,
        )
        if data["key"] != ours:
            assert data["key"] == "addr:127.0.0.1/vxi11"
            _, _, renamed = events.wait_for("rename", lambda t, d: d["key"] == ours, 4, since=mark)
            assert renamed["previous_keys"] == ["addr:127.0.0.1/vxi11"]
        events.wait_for("all resources back", lambda t, d: d["key"] == ours and set(d["resources"]) == sim.resources,
                        4, since=mark)

        # Clean stop: the mDNS goodbye withdraws the mDNS resources at once; broadcast misses follow.
        mark = len(events.items)
        sim.kill(signal.SIGTERM)
        stopped_at = time.monotonic()
        vxi11 = f"TCPIP0::127.0.0.1,{sim.core}::inst0::INSTR"
        _, at, data = events.wait_for(
            "goodbye", lambda t, d: t == "instrument.changed" and d["key"] == ours and d["resources"] == [vxi11],
            3, since=mark,
        )
        assert data["metadata"]["serial"] == serial  # the VXI-11 responder keeps the identity it had
        assert at - stopped_at < config.interval_s + 1.0
        events.wait_for("disappearance", lambda t, d: t == "instrument.disappeared" and d["key"] == ours, 10,
                        since=mark)


def test_scan_once_lists_the_instrument_like_list_resources(sims: list[Sim]) -> None:
    sim = Sim(f"ONE{os.getpid()}{random.randint(0, 9999)}").start()
    sims.append(sim)
    service = DiscoveryService(DiscoveryConfig(portmapper_port=sim.pmap_port), lambda topic, data: None)
    try:
        found = service.scan_once(timeout_s=2.0)
    finally:
        service.close()
    (ours,) = [i for i in found if i["key"] == sim.key]
    assert set(ours["resources"]) == sim.resources


def test_broadcast_scanner_survives_garbage_and_finds_the_real_reply() -> None:
    """A responder that sends garbage, a wrong xid and a truncated reply before the real one."""
    responder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    responder.bind(("127.0.0.1", 0))
    port = responder.getsockname()[1]

    def answer() -> None:
        data, peer = responder.recvfrom(1024)
        xid = int.from_bytes(data[:4], "big")
        good = (xid.to_bytes(4, "big") + bytes.fromhex("00000001 00000000 00000000 00000000 00000000".replace(" ", ""))
                + (4242).to_bytes(4, "big"))
        for datagram in (b"\x00garbage", ((xid + 1) & 0xFFFFFFFF).to_bytes(4, "big") + good[4:], good[:20], good):
            responder.sendto(datagram, peer)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    iface = Interface("lo", "127.0.0.1", "255.255.255.255", "127.0.0.1")  # unicast only: one request
    scanner = BroadcastScanner([iface], pmap_port=port)
    scanner.open()
    try:
        hits = scanner.scan(window_s=0.5)
    finally:
        scanner.close()
        responder.close()
    assert [(h.address, h.core_port, h.resource) for h in hits] == [
        ("127.0.0.1", 4242, "TCPIP0::127.0.0.1,4242::inst0::INSTR")
    ]


def test_broadcast_scanner_reaches_a_portmapper_bound_to_loopback() -> None:
    with PortmapperServer("127.0.0.1", 0) as pm:
        pm.register(0x0607AF, 1, IPPROTO_TCP, 31337)
        (lo,) = resolve_interfaces(["127.0.0.1"])
        assert lo.scan_targets == ("127.255.255.255", "127.0.0.1")
        scanner = BroadcastScanner([lo], pmap_port=pm.udp_port)
        scanner.open()
        try:
            hits = scanner.scan(window_s=0.3)
        finally:
            scanner.close()
    assert [h.resource for h in hits] == ["TCPIP0::127.0.0.1,31337::inst0::INSTR"]


def test_identify_hook_names_a_broadcast_only_instrument() -> None:
    calls: list[str] = []

    def identify(resource: str) -> str | None:
        calls.append(resource)
        return "ACME,SIM-9,ID42,2.0\n"

    with PortmapperServer("127.0.0.1", 0) as pm:
        pm.register(0x0607AF, 1, IPPROTO_TCP, 31338)
        resource = "TCPIP0::127.0.0.1,31338::inst0::INSTR"
        config = DiscoveryConfig(mdns=False, portmapper_port=pm.udp_port)
        events = Events()
        service = DiscoveryService(config, events.emit, identify=identify)
        stop = threading.Event()
        thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
        thread.start()
        try:
            _, _, first = events.wait_for("appearance", lambda t, d: resource in d["resources"], 3)
            _, _, named = events.wait_for("identification", lambda t, d: d["key"] == "id:acme:ID42", 3)
        finally:
            stop.set()
            thread.join(timeout=10)
            service.close()
    assert first["key"] == "addr:127.0.0.1/vxi11"
    assert named["previous_keys"] == ["addr:127.0.0.1/vxi11"]
    assert named["metadata"] == {"manufacturer": "ACME", "model": "SIM-9", "serial": "ID42", "firmware": "2.0"}
    assert calls == [resource]  # asked once, not every round


def test_malformed_mdns_records_are_skipped_and_discovery_goes_on() -> None:
    serial = f"MAL{os.getpid()}{random.randint(0, 9999)}"
    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    # On 127.0.0.2 so that the anonymous one does not adopt the good instrument's identity by address.
    bad = [
        ServiceInfo("_lxi._tcp.local.", f"nomaker {serial}._lxi._tcp.local.", port=80,
                    properties={"Model": "X"}, server=f"bad-{serial}.local.", addresses=[socket.inet_aton("127.0.0.2")]),
        ServiceInfo("_vicp._tcp.local.", f"noport {serial}._vicp._tcp.local.", port=0,
                    properties={"Manufacturer": "LECROY"}, server=f"bad-{serial}.local.",
                    addresses=[socket.inet_aton("127.0.0.2")]),
        ServiceInfo("_scpi-raw._tcp.local.", f"nones {serial}._scpi-raw._tcp.local.", port=5025,
                    properties={"Manufacturer": None, "SerialNumber": None}, server=f"bad-{serial}.local.",
                    addresses=[socket.inet_aton("127.0.0.2")]),
    ]
    good_raw = random.randint(20000, 30000)
    for info in bad:
        zc.register_service(info, cooperating_responders=True)  # no name probing: quick
    events = Events()
    try:
        with running_discovery(DiscoveryConfig(broadcast=False), events), Advertiser(
            "127.0.0.1", f"ACME,SIM-1,{serial},1.0", {"socket": good_raw}
        ):
            _, _, data = events.wait_for("the good instrument", lambda t, d: d["key"] == f"id:acme:{serial}", 5)
            assert data["resources"] == [f"TCPIP0::127.0.0.1::{good_raw}::SOCKET"]
            # The record with None TXT values still names a resource (without metadata); the others name none.
            _, _, anonymous = events.wait_for(
                "the record with None values", lambda t, d: d["resources"] == ["TCPIP0::127.0.0.2::5025::SOCKET"], 5
            )
            assert (anonymous["key"], anonymous["metadata"]) == ("addr:127.0.0.2/socket", {})
            assert not [d for _, _, d in events.items if any(r.startswith("VICP") for r in d["resources"])]
    finally:
        zc.unregister_all_services()
        zc.close()

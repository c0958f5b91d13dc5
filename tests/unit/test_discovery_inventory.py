"""The discovery inventory: hysteresis, grouping by identity, changed events; and the mDNS record mapping that
feeds it. Pure: no sockets, no clock."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
from structlog.testing import capture_logs
from zeroconf import DNSOutgoing, DNSRecord, DNSService, DNSText

from visabus.workers.discovery.inventory import (
    APPEARED,
    CHANGED,
    DISAPPEARED,
    Event,
    Inventory,
    Observation,
    Source,
    metadata_from_idn,
)
from visabus.workers.discovery.mdns import record_to_resource
from visabus.workers.discovery.mdns_probe import answered_names

VXI = "TCPIP0::10.0.0.5::inst0::INSTR"
HISLIP = "TCPIP0::10.0.0.5::hislip0::INSTR"
SOCKET = "TCPIP0::10.0.0.5::5025::SOCKET"
ACME = {"manufacturer": "ACME", "model": "SIM-1", "serial": "0001", "firmware": "1.0"}


def bcast(resource: str = VXI, address: str = "10.0.0.5", t: float = 0.0) -> Observation:
    return Observation(resource, "vxi11", address, {}, Source.BROADCAST, t)


def mdns(
    resource: str, protocol: str, origin: str, metadata: Mapping[str, str] = ACME, address: str = "10.0.0.5",
    t: float = 0.0,
) -> Observation:
    return Observation(resource, protocol, address, metadata, Source.MDNS, t, origin=origin)


def topics(events: list[Event]) -> list[str]:
    return [e.topic for e in events]


def test_broadcast_appearance_carries_the_event_shape() -> None:
    inv = Inventory(misses=3)
    (event,) = inv.observe(bcast(t=12.5))
    assert event.topic == APPEARED
    assert event.data == {
        "key": "addr:10.0.0.5/vxi11",
        "resources": [VXI],
        "protocol": "vxi11",
        "protocols": ["vxi11"],
        "address": "10.0.0.5",
        "addresses": ["10.0.0.5"],
        "metadata": {},
        "sources": ["broadcast"],
        "timestamp": 12.5,
    }


def test_seeing_the_same_resource_again_is_silent() -> None:
    inv = Inventory()
    inv.observe(bcast())
    assert inv.observe(bcast(t=1.0)) == []
    assert inv.end_round(Source.BROADCAST, 1.0) == []


@pytest.mark.parametrize("misses", [1, 2, 3, 5])
def test_disappears_only_after_n_consecutive_missed_rounds(misses: int) -> None:
    inv = Inventory(misses=misses)
    inv.observe(bcast())
    assert inv.end_round(Source.BROADCAST, 0.5) == []  # round in which it was seen
    for i in range(misses - 1):
        assert inv.end_round(Source.BROADCAST, 1.0 + i) == [], f"gone after {i + 1} misses"
    (event,) = inv.end_round(Source.BROADCAST, 99.0)
    assert event.topic == DISAPPEARED
    assert event.data["resources"] == [VXI]
    assert event.data["reason"] == "missed"
    assert event.data["timestamp"] == 99.0
    assert inv.instruments() == []


def test_one_lost_reply_resets_the_miss_count() -> None:
    inv = Inventory(misses=3)
    inv.observe(bcast())
    inv.end_round(Source.BROADCAST, 0)
    for t in range(1, 20):
        # miss two rounds, then answer once: never three in a row
        if t % 3 == 0:
            assert inv.observe(bcast(t=t)) == []
        assert inv.end_round(Source.BROADCAST, t) == []
    assert inv.resources() == [VXI]


def test_rounds_of_one_source_do_not_expire_another_sources_resources() -> None:
    inv = Inventory(misses=1)
    inv.observe(mdns(HISLIP, "hislip", "a._hislip._tcp.local."))
    inv.end_round(Source.MDNS, 0)
    for t in range(5):
        assert inv.end_round(Source.BROADCAST, t) == []
    assert inv.resources() == [HISLIP]


def test_mdns_goodbye_is_an_immediate_disappearance() -> None:
    inv = Inventory()
    inv.observe(mdns(HISLIP, "hislip", "a._hislip._tcp.local."))
    (event,) = inv.withdraw(Source.MDNS, 3.0, origin="a._hislip._tcp.local.")
    assert event.topic == DISAPPEARED
    assert event.data["reason"] == "goodbye"
    assert event.data["key"] == "id:acme:0001"
    assert inv.withdraw(Source.MDNS, 4.0, origin="a._hislip._tcp.local.") == []  # unknown origin: nothing


def test_mdns_liveness_answers_keep_a_resource_alive() -> None:
    inv = Inventory(misses=2)
    inv.observe(mdns(HISLIP, "hislip", "a._hislip._tcp.local."))
    for t in range(10):
        inv.seen(Source.MDNS, origin="a._hislip._tcp.local.")
        assert inv.end_round(Source.MDNS, t) == []
    inv.end_round(Source.MDNS, 10)
    assert topics(inv.end_round(Source.MDNS, 11)) == [DISAPPEARED]


def test_protocols_of_one_identified_instrument_group_into_one() -> None:
    inv = Inventory()
    assert topics(inv.observe(mdns(HISLIP, "hislip", "a._hislip._tcp.local."))) == [APPEARED]
    (event,) = inv.observe(mdns(SOCKET, "socket", "a._scpi-raw._tcp.local."))
    assert event.topic == CHANGED
    assert event.data["key"] == "id:acme:0001"
    assert event.data["resources"] == [HISLIP, SOCKET]  # preferred protocol first
    assert event.data["protocol"] == "hislip"
    assert event.data["changes"] == ["resources"]
    assert event.data["previous"] == {"resources": [HISLIP]}
    assert event.data["metadata"] == ACME
    assert len(inv.instruments()) == 1


def test_anonymous_broadcast_resource_joins_the_identified_instrument_at_its_address() -> None:
    inv = Inventory()
    inv.observe(mdns(HISLIP, "hislip", "a._hislip._tcp.local."))
    (event,) = inv.observe(bcast())
    assert event.topic == CHANGED
    assert event.data["key"] == "id:acme:0001"
    assert event.data["resources"] == [HISLIP, VXI]
    assert event.data["sources"] == ["broadcast", "mdns"]


def test_identification_arriving_later_renames_instead_of_disappearing() -> None:
    inv = Inventory()
    assert topics(inv.observe(bcast())) == [APPEARED]
    (event,) = inv.observe(mdns(HISLIP, "hislip", "a._hislip._tcp.local."))
    assert event.topic == CHANGED
    assert event.data["key"] == "id:acme:0001"
    assert event.data["previous_keys"] == ["addr:10.0.0.5/vxi11"]
    assert event.data["resources"] == [HISLIP, VXI]


def test_same_resource_from_two_sources_is_one_resource_and_survives_either() -> None:
    inv = Inventory(misses=1)
    inv.observe(bcast())
    inv.observe(mdns(VXI, "vxi11", "a._vxi-11._tcp.local."))
    assert inv.resources() == [VXI]
    inv.end_round(Source.BROADCAST, 0)
    assert inv.end_round(Source.BROADCAST, 1) == []  # broadcast lost it; mDNS still has it
    (event,) = inv.withdraw(Source.MDNS, 2, origin="a._vxi-11._tcp.local.")
    assert event.topic == DISAPPEARED


def test_two_identities_at_one_address_keep_anonymous_resources_apart() -> None:
    # A LAN/GPIB gateway: one address, several instruments.
    inv = Inventory()
    inv.observe(mdns("TCPIP0::10.0.0.5::gpib0,1::INSTR", "vxi11", "a", {"manufacturer": "A", "serial": "1"}))
    inv.observe(mdns("TCPIP0::10.0.0.5::gpib0,2::INSTR", "vxi11", "b", {"manufacturer": "B", "serial": "2"}))
    inv.observe(bcast())
    keys = [i["key"] for i in inv.instruments()]
    assert keys == ["addr:10.0.0.5/vxi11", "id:a:1", "id:b:2"]


def test_unidentified_resources_are_keyed_by_address_and_protocol() -> None:
    inv = Inventory()
    inv.observe(bcast())
    inv.observe(mdns(SOCKET, "socket", "s", metadata={"model": "X"}))
    assert [i["key"] for i in inv.instruments()] == ["addr:10.0.0.5/socket", "addr:10.0.0.5/vxi11"]


def test_address_change_of_an_mdns_record_is_one_changed_event() -> None:
    inv = Inventory()
    inv.observe(mdns(HISLIP, "hislip", "a._hislip._tcp.local."))
    moved = "TCPIP0::10.0.0.9::hislip0::INSTR"
    (event,) = inv.observe(mdns(moved, "hislip", "a._hislip._tcp.local.", address="10.0.0.9", t=5.0))
    assert event.topic == CHANGED
    assert event.data["changes"] == ["resources", "address"]
    assert event.data["previous"] == {"resources": [HISLIP], "address": "10.0.0.5"}
    assert event.data["address"] == "10.0.0.9"
    assert inv.resources() == [moved]


def test_metadata_change_is_a_changed_event() -> None:
    inv = Inventory()
    inv.observe(mdns(HISLIP, "hislip", "a._hislip._tcp.local."))
    upgraded = dict(ACME, firmware="2.0")
    (event,) = inv.observe(mdns(HISLIP, "hislip", "a._hislip._tcp.local.", metadata=upgraded))
    assert event.topic == CHANGED
    assert event.data["changes"] == ["metadata"]
    assert event.data["previous"]["metadata"]["firmware"] == "1.0"
    assert event.data["metadata"]["firmware"] == "2.0"


def test_identify_hook_result_groups_and_outranks_txt() -> None:
    inv = Inventory()
    inv.observe(bcast())
    assert inv.needs_identity(VXI)
    (event,) = inv.identify(VXI, metadata_from_idn("ACME,SIM-1,0001,1.0\n"), 1.0)
    assert event.topic == CHANGED
    assert event.data["key"] == "id:acme:0001"
    assert event.data["previous_keys"] == ["addr:10.0.0.5/vxi11"]
    assert not inv.needs_identity(VXI)
    (event,) = inv.observe(mdns(HISLIP, "hislip", "h", metadata=dict(ACME, model="TXT-SAYS-SO")))
    assert event.data["resources"] == [HISLIP, VXI]
    assert event.data["metadata"]["model"] == "SIM-1"  # an *IDN? answer outranks any TXT record
    assert inv.identify("TCPIP0::10.9.9.9::INSTR", ACME, 2.0) == []  # unknown resource: ignored


def test_disappearance_of_the_last_resource_reports_the_whole_instrument() -> None:
    inv = Inventory(misses=1)
    inv.observe(mdns(HISLIP, "hislip", "h"))
    inv.observe(bcast())
    inv.end_round(Source.BROADCAST, 0)
    (event,) = inv.end_round(Source.BROADCAST, 1)
    assert event.topic == CHANGED and event.data["resources"] == [HISLIP]
    (event,) = inv.withdraw(Source.MDNS, 2, origin="h")
    assert event.topic == DISAPPEARED
    assert event.data["resources"] == [HISLIP]
    assert event.data["metadata"] == ACME


def test_metadata_from_idn_tolerates_short_and_blank_answers() -> None:
    assert metadata_from_idn("ACME,SIM-1") == {"manufacturer": "ACME", "model": "SIM-1"}
    assert metadata_from_idn(" ,X, ,") == {"model": "X"}
    assert metadata_from_idn("") == {}


def test_misses_must_be_positive() -> None:
    with pytest.raises(ValueError, match="misses"):
        Inventory(misses=0)


def test_adopted_identity_sticks_when_the_identified_records_say_goodbye() -> None:
    inv = Inventory(misses=2)
    inv.observe(mdns(HISLIP, "hislip", "h"))
    inv.observe(bcast())
    (event,) = inv.withdraw(Source.MDNS, 5.0, origin="h")
    assert event.topic == CHANGED
    assert event.data["key"] == "id:acme:0001"  # the VXI-11 responder is still that instrument
    assert event.data["resources"] == [VXI]
    assert event.data["metadata"] == ACME
    assert event.data["previous"] == {"resources": [HISLIP, VXI]}
    inv.end_round(Source.BROADCAST, 6.0)
    inv.end_round(Source.BROADCAST, 7.0)
    (event,) = inv.end_round(Source.BROADCAST, 8.0)
    assert (event.topic, event.data["key"], event.data["reason"]) == (DISAPPEARED, "id:acme:0001", "missed")


def test_own_identity_is_remembered_when_only_another_source_still_sees_the_resource() -> None:
    # The instrument's _vxi-11 mDNS record names it; the broadcast finds the same resource anonymously.
    inv = Inventory()
    inv.observe(bcast())
    inv.observe(mdns(VXI, "vxi11", "v._vxi-11._tcp.local."))
    assert inv.withdraw(Source.MDNS, 1.0, origin="v._vxi-11._tcp.local.") == []  # only `sources` changed
    (instrument,) = inv.instruments()
    assert instrument["key"] == "id:acme:0001"
    assert instrument["sources"] == ["broadcast"]
    assert instrument["metadata"] == ACME


# ---------------------------------------------------------------- mDNS record → observation (pure mapping)
# The inventory's mDNS input comes from `record_to_resource`; malformed records must map to nothing.

LXI_TXT = {b"txtvers": b"1", b"Manufacturer": b"Teledyne LeCroy", b"Model": b"WR8104", b"SerialNumber": b"LCRY1",
           b"FirmwareVersion": b"9.2"}


def mapped(service_type: str, port: int | None, properties: Mapping[Any, Any] | None,
           addresses: tuple[str, ...] = ("10.0.0.5",), lookup: Callable[[str, int], int | None] | None = None,
           ) -> str | None:
    record = record_to_resource(service_type, "X._t._tcp.local.", addresses, port, properties,
                                core_port_lookup=lookup)
    return record.resource if record else None


@pytest.mark.parametrize(
    ("service_type", "port", "expected"),
    [
        ("_hislip._tcp.local.", 4880, "TCPIP0::10.0.0.5::hislip0::INSTR"),
        ("_hislip._tcp.local.", 4881, "TCPIP0::10.0.0.5::hislip0,4881::INSTR"),
        ("_scpi-raw._tcp.local.", 5025, "TCPIP0::10.0.0.5::5025::SOCKET"),
        ("_vxi-11._tcp.local.", 111, "TCPIP0::10.0.0.5::inst0::INSTR"),
        ("_vicp._tcp.local.", 1861, "VICP0::10.0.0.5::INSTR"),
        ("_vicp._tcp.local.", 1862, "VICP0::10.0.0.5,1862::INSTR"),
        ("_lxi._tcp.local.", 80, "VICP0::10.0.0.5::INSTR"),  # LeCroy maker → VICP; SRV port is the web's
    ],
)
def test_records_map_to_canonical_resources(service_type: str, port: int, expected: str) -> None:
    assert mapped(service_type, port, LXI_TXT) == expected


def test_txt_keys_become_metadata_case_insensitively() -> None:
    record = record_to_resource("_hislip._tcp.local.", "A._hislip._tcp.local.", ["10.0.0.5"], 4880,
                                {b"MANUFACTURER": b"ACME", b"serialnumber": b" 7 ", b"Other": b"x"})
    assert record is not None
    assert record.metadata == {"manufacturer": "ACME", "serial": "7"}
    assert record.name == "a._hislip._tcp.local."


def test_vxi11_record_off_port_111_asks_the_portmapper_for_the_core_port() -> None:
    assert mapped("_vxi-11._tcp.local.", 40111, {}, lookup=lambda host, port: 40222) == (
        "TCPIP0::10.0.0.5,40222::inst0::INSTR"
    )
    assert mapped("_vxi-11._tcp.local.", 40111, {}, lookup=lambda host, port: None) is None
    assert mapped("_vxi-11._tcp.local.", 40111, {}) is None


@pytest.mark.parametrize(
    ("service_type", "port", "properties", "addresses"),
    [
        pytest.param("_hislip._tcp.local.", 0, {}, ("10.0.0.5",), id="port-0"),
        pytest.param("_hislip._tcp.local.", 70000, {}, ("10.0.0.5",), id="port-too-big"),
        pytest.param("_hislip._tcp.local.", None, {}, ("10.0.0.5",), id="no-port"),
        pytest.param("_scpi-raw._tcp.local.", 5025, {}, (), id="no-address"),
        pytest.param("_scpi-raw._tcp.local.", 5025, {}, ("fe80::1", "not-an-ip"), id="no-ipv4-address"),
        pytest.param("_lxi._tcp.local.", 80, {b"Model": b"X"}, ("10.0.0.5",), id="lxi-without-manufacturer"),
        pytest.param("_lxi._tcp.local.", 80, {b"Manufacturer": None}, ("10.0.0.5",), id="lxi-manufacturer-None"),
        pytest.param("_lxi._tcp.local.", 80, {b"Manufacturer": b"Keysight"}, ("10.0.0.5",), id="lxi-not-vicp"),
        pytest.param("_printer._tcp.local.", 631, {}, ("10.0.0.5",), id="unknown-type"),
    ],
)
def test_malformed_records_are_skipped_with_a_log_line(
    service_type: str, port: int | None, properties: Mapping[Any, Any], addresses: tuple[str, ...]
) -> None:
    with capture_logs() as logs:
        assert mapped(service_type, port, properties, addresses) is None
    assert logs, "a skipped record must say why"


def test_bad_txt_values_are_dropped_but_the_record_is_kept() -> None:
    properties = {b"Manufacturer": None, b"Model": b"\xff\xfeBAD", b"SerialNumber": b"", b"\xff": b"x",
                  b"FirmwareVersion": 3}
    with capture_logs() as logs:
        record = record_to_resource("_scpi-raw._tcp.local.", "A._scpi-raw._tcp.local.", ["10.0.0.5"], 5025,
                                    properties)
    assert record is not None and record.resource == "TCPIP0::10.0.0.5::5025::SOCKET"
    assert record.metadata == {"model": "\ufffd\ufffdBAD"}  # undecodable bytes replaced, not fatal
    assert {e["event"] for e in logs} == {
        "discovery.mdns_txt_without_value", "discovery.mdns_bad_txt_key", "discovery.mdns_bad_txt_value"
    }


def _response(*records: DNSRecord, flags: int = 0x8400) -> bytes:
    out = DNSOutgoing(flags, multicast=False, id_=7)
    for record in records:
        out.add_answer_at_time(record, 0)
    return out.packets()[0]


def test_probe_answers_name_the_services_that_are_alive() -> None:
    srv = DNSService("A._hislip._tcp.local.", 33, 1, 10, 0, 0, 4880, "box.local.")
    txt = DNSText("B._scpi-raw._tcp.local.", 16, 1, 10, b"\x07txtvers")
    goodbye = DNSService("C._hislip._tcp.local.", 33, 1, 0, 0, 0, 4880, "box.local.")
    assert answered_names(_response(srv, txt, goodbye)) == {"a._hislip._tcp.local.", "b._scpi-raw._tcp.local."}
    assert answered_names(_response(srv, flags=0x0000)) == set()  # a query, not an answer
    assert answered_names(b"\x00\x07\x84") == set()  # truncated header
    assert answered_names(bytes(range(256))) == set()  # noise

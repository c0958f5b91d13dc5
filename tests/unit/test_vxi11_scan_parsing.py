"""VXI-11 broadcast scan: the request bytes and the judgement of reply datagrams. Byte vectors, no sockets."""

from __future__ import annotations

import struct

import pytest
from structlog.testing import capture_logs

from visabus.workers.discovery.vxi11_scan import ScanRound, scan_resource

SOURCE = ("10.0.0.5", 111)
XID = 0x1234ABCD


def reply(xid: int = XID, port: int = 1024, *, accept_stat: int = 0, msg_type: int = 1, reply_stat: int = 0) -> bytes:
    """A GETPORT reply built by hand: xid, REPLY, MSG_ACCEPTED, AUTH_NONE verifier, accept_stat, port."""
    return struct.pack(">IIIIIII", xid, msg_type, reply_stat, 0, 0, accept_stat, port)


def judge(data: bytes, pmap_port: int = 111) -> tuple[str | None, list[str]]:
    scan = ScanRound(XID, pmap_port)
    with capture_logs() as logs:
        hit = scan.feed(data, SOURCE)
    return (hit.resource if hit else None), [entry["event"] for entry in logs]


def test_request_is_the_documented_getport_call() -> None:
    # PROTOCOLS.md §1.5 worked example (xid 1000): 56 bytes, no record mark.
    expected = bytes.fromhex(
        "000003e8 00000000 00000002 000186a0 00000002 00000003"
        " 00000000 00000000 00000000 00000000"
        " 000607af 00000001 00000006 00000000".replace(" ", "")
    )
    assert ScanRound(1000).request() == expected


def test_well_formed_reply_names_the_instrument() -> None:
    resource, logs = judge(reply())
    assert resource == "TCPIP0::10.0.0.5::inst0::INSTR"
    assert logs == []


def test_portmapper_off_port_111_puts_the_core_port_in_the_resource() -> None:
    resource, _ = judge(reply(port=40123), pmap_port=45111)
    assert resource == "TCPIP0::10.0.0.5,40123::inst0::INSTR"
    assert scan_resource("10.0.0.5", 1024) == "TCPIP0::10.0.0.5::inst0::INSTR"


def test_padded_reply_is_tolerated_as_lan_gpib_gateways_pad() -> None:
    resource, logs = judge(reply() + b"\x00" * 4)
    assert resource == "TCPIP0::10.0.0.5::inst0::INSTR"
    assert logs == ["discovery.vxi11_padded_reply"]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(reply()[:-1], id="truncated-port"),
        pytest.param(reply()[:24], id="no-port"),
        pytest.param(reply()[:3], id="three-bytes"),
        pytest.param(b"", id="empty"),
        pytest.param(reply(msg_type=0), id="a-call-not-a-reply"),
        pytest.param(reply(msg_type=7), id="unknown-message-type"),
        pytest.param(reply(reply_stat=1), id="denied"),
        pytest.param(reply(accept_stat=1), id="prog-unavail"),
        pytest.param(reply(accept_stat=4), id="garbage-args"),
        pytest.param(reply(port=70000), id="port-beyond-65535"),
        pytest.param(bytes(range(256)) * 3, id="noise"),
        pytest.param(struct.pack(">IIIII", XID, 1, 0, 0, 0xFFFFFFF0) + b"\x00" * 8, id="lying-verifier-length"),
    ],
)
def test_malformed_replies_are_ignored_with_a_log_line(data: bytes) -> None:
    resource, logs = judge(data)
    assert resource is None
    assert logs == ["discovery.vxi11_bad_reply"]


def test_reply_to_another_round_is_ignored_with_a_log_line() -> None:
    resource, logs = judge(reply(xid=XID + 1))
    assert resource is None
    assert logs == ["discovery.vxi11_wrong_xid"]


def test_not_registered_reply_is_ignored() -> None:
    resource, logs = judge(reply(port=0))
    assert resource is None
    assert logs == ["discovery.vxi11_not_registered"]


def test_one_hit_per_address_and_garbage_does_not_spoil_the_round() -> None:
    scan = ScanRound(XID)
    assert scan.feed(b"\xff" * 5, ("10.0.0.9", 111)) is None
    assert scan.feed(reply(port=1024), ("10.0.0.5", 111)) is not None
    scan.feed(reply(port=1024), ("10.0.0.5", 111))  # the loopback scan asks twice: same answer
    scan.feed(reply(port=2048), ("10.0.0.6", 111))
    assert sorted(scan.hits) == ["10.0.0.5", "10.0.0.6"]
    assert scan.hits["10.0.0.6"].core_port == 2048

"""VISA resource strings (sdk/resources.py): parse, canonicalise, refuse with a precise message, match patterns."""

from __future__ import annotations

import pytest

from visabus.sdk.errors import InvalidResourceName, StatusCode
from visabus.sdk.resources import (
    HISLIP_DEFAULT_PORT,
    VICP_DEFAULT_PORT,
    Protocol,
    Resource,
    canonical,
    match_pattern,
    parse_resource,
)

VXI11, HISLIP, SOCKET, VICP = Protocol.VXI11, Protocol.HISLIP, Protocol.SOCKET, Protocol.VICP

# text -> (protocol, host, board, device, port, canonical text, TCP port to connect to)
VALID = [
    # PyVISA 1.16.2 cases (PROTOCOLS.md §7.2)
    ("TCPIP::192.168.1.10::INSTR", VXI11, "192.168.1.10", 0, "inst0", None, "TCPIP0::192.168.1.10::inst0::INSTR", None),
    ("TCPIP::192.168.1.10", VXI11, "192.168.1.10", 0, "inst0", None, "TCPIP0::192.168.1.10::inst0::INSTR", None),
    ("tcpip::1.2.3.4::hislip0::INSTR", HISLIP, "1.2.3.4", 0, "hislip0", None, "TCPIP0::1.2.3.4::hislip0::INSTR", 4880),
    ("TCPIP::1.2.3.4::hislip0,4880::INSTR", HISLIP, "1.2.3.4", 0, "hislip0", 4880, "TCPIP0::1.2.3.4::hislip0::INSTR",
     4880),
    ("TCPIP::1.2.3.4::gpib0,5::INSTR", VXI11, "1.2.3.4", 0, "gpib0,5", None, "TCPIP0::1.2.3.4::gpib0,5::INSTR", None),
    ("TCPIP3::host::INSTR", VXI11, "host", 3, "inst0", None, "TCPIP3::host::inst0::INSTR", None),
    ("TCPIP::1.2.3.4::5025::SOCKET", SOCKET, "1.2.3.4", 0, "", 5025, "TCPIP0::1.2.3.4::5025::SOCKET", 5025),
    # where we deliberately differ from PyVISA: the class suffix is case-insensitive (VISA says so)...
    ("TCPIP::1.2.3.4::instr", VXI11, "1.2.3.4", 0, "inst0", None, "TCPIP0::1.2.3.4::inst0::INSTR", None),
    ("tcpip::1.2.3.4::5025::socket", SOCKET, "1.2.3.4", 0, "", 5025, "TCPIP0::1.2.3.4::5025::SOCKET", 5025),
    # ...bracketed IPv6 literals parse...
    ("TCPIP::[fe80::1]::INSTR", VXI11, "fe80::1", 0, "inst0", None, "TCPIP0::[fe80::1]::inst0::INSTR", None),
    # ...and host,port is split into a port (pyvisa-py's VXI-11 portmapper bypass, §7.3)
    ("TCPIP::1.2.3.4,1024::INSTR", VXI11, "1.2.3.4", 0, "inst0", 1024, "TCPIP0::1.2.3.4,1024::inst0::INSTR", 1024),
    ("VICP::1.2.3.4", VICP, "1.2.3.4", 0, "", None, "VICP0::1.2.3.4::INSTR", 1861),
    ("VICP0::1.2.3.4::INSTR", VICP, "1.2.3.4", 0, "", None, "VICP0::1.2.3.4::INSTR", 1861),
    # VXI-11: boards, device names, gateways
    ("TCPIP0::10.0.0.7::inst0::INSTR", VXI11, "10.0.0.7", 0, "inst0", None, "TCPIP0::10.0.0.7::inst0::INSTR", None),
    ("TCPIP12::dmm::inst3", VXI11, "dmm", 12, "inst3", None, "TCPIP12::dmm::inst3::INSTR", None),
    ("TCPIP1::dmm::INST1::INSTR", VXI11, "dmm", 1, "inst1", None, "TCPIP1::dmm::inst1::INSTR", None),
    ("TCPIP::gw::GPIB0,5,3::INSTR", VXI11, "gw", 0, "gpib0,5,3", None, "TCPIP0::gw::gpib0,5,3::INSTR", None),
    ("TCPIP::gw::hpib1,7::INSTR", VXI11, "gw", 0, "hpib1,7", None, "TCPIP0::gw::hpib1,7::INSTR", None),
    ("TCPIP::gw::usb0::INSTR", VXI11, "gw", 0, "usb0", None, "TCPIP0::gw::usb0::INSTR", None),
    ("TCPIP::gw::my_dev.1::INSTR", VXI11, "gw", 0, "my_dev.1", None, "TCPIP0::gw::my_dev.1::INSTR", None),
    ("TCPIP::[::1],1024::INSTR", VXI11, "::1", 0, "inst0", 1024, "TCPIP0::[::1],1024::inst0::INSTR", 1024),
    ("TCPIP::dmm,9000::inst1::INSTR", VXI11, "dmm", 0, "inst1", 9000, "TCPIP0::dmm,9000::inst1::INSTR", 9000),
    # HiSLIP: default port canonicalised away, others kept
    ("TCPIP::scope::hislip1,4881::INSTR", HISLIP, "scope", 0, "hislip1", 4881, "TCPIP0::scope::hislip1,4881::INSTR",
     4881),
    ("TCPIP2::Scope::HiSLIP0::instr", HISLIP, "scope", 2, "hislip0", None, "TCPIP2::scope::hislip0::INSTR", 4880),
    ("TCPIP::scope::hislip0", HISLIP, "scope", 0, "hislip0", None, "TCPIP0::scope::hislip0::INSTR", 4880),
    ("TCPIP::[FE80:0:0::1]::hislip0,4880::INSTR", HISLIP, "fe80::1", 0, "hislip0", 4880,
     "TCPIP0::[fe80::1]::hislip0::INSTR", 4880),
    ("TCPIP::[2001:db8::5]::hislip2,5000::INSTR", HISLIP, "2001:db8::5", 0, "hislip2", 5000,
     "TCPIP0::[2001:db8::5]::hislip2,5000::INSTR", 5000),
    # SOCKET
    ("TCPIP7::psu.lab::9221::SOCKET", SOCKET, "psu.lab", 7, "", 9221, "TCPIP7::psu.lab::9221::SOCKET", 9221),
    ("TCPIP::[2001:DB8::5]::5025::SOCKET", SOCKET, "2001:db8::5", 0, "", 5025, "TCPIP0::[2001:db8::5]::5025::SOCKET",
     5025),
    ("TCPIP::h::1::SOCKET", SOCKET, "h", 0, "", 1, "TCPIP0::h::1::SOCKET", 1),
    ("TCPIP::h::65535::SOCKET", SOCKET, "h", 0, "", 65535, "TCPIP0::h::65535::SOCKET", 65535),
    # VICP with host,port
    ("VICP2::scope,1862::INSTR", VICP, "scope", 2, "", 1862, "VICP2::scope,1862::INSTR", 1862),
    ("vicp::scope,1861", VICP, "scope", 0, "", 1861, "VICP0::scope::INSTR", 1861),
    ("VICP::[::1],1862", VICP, "::1", 0, "", 1862, "VICP0::[::1],1862::INSTR", 1862),
    ("VICP::[fe80::2]::INSTR", VICP, "fe80::2", 0, "", None, "VICP0::[fe80::2]::INSTR", 1861),
    # host names are case-folded; surrounding whitespace is ignored
    ("TCPIP::Scope-7.Lab.Example::INSTR", VXI11, "scope-7.lab.example", 0, "inst0", None,
     "TCPIP0::scope-7.lab.example::inst0::INSTR", None),
    ("  TCPIP::h::INSTR \n", VXI11, "h", 0, "inst0", None, "TCPIP0::h::inst0::INSTR", None),
]


@pytest.mark.parametrize(("text", "protocol", "host", "board", "device", "port", "canon", "tcp_port"), VALID,
                         ids=[v[0].strip() for v in VALID])
def test_parse(text: str, protocol: Protocol, host: str, board: int, device: str, port: int | None, canon: str,
               tcp_port: int | None) -> None:
    res = parse_resource(text)
    assert res == Resource(protocol, host, board, device, port)
    assert res.canonical == canon == str(res) == canonical(text)
    assert res.transport_port == tcp_port
    assert parse_resource(canon).canonical == canon  # canonical text is a fixed point


# Spellings of one instrument must route to one worker.
SAME = [
    ["TCPIP::192.168.1.10", "TCPIP::192.168.1.10::INSTR", "tcpip0::192.168.1.10::INST0::instr",
     "TCPIP0::192.168.1.10::inst0::INSTR"],
    ["TCPIP::scope::hislip0::INSTR", "TCPIP0::SCOPE::HISLIP0,4880::INSTR", "tcpip::scope::hislip0,4880"],
    ["TCPIP::[::1]::5025::SOCKET", "TCPIP0::[0:0:0:0:0:0:0:1]::5025::socket", "tcpip::[0::1]::5025::SOCKET"],
    ["VICP::scope", "VICP0::scope::INSTR", "vicp::SCOPE,1861", "VICP0::scope,1861::instr"],
]


@pytest.mark.parametrize("spellings", SAME, ids=lambda s: s[0])
def test_spellings_canonicalise_alike(spellings: list[str]) -> None:
    assert len({canonical(s) for s in spellings}) == 1


def test_distinct_instruments_stay_distinct() -> None:
    texts = ["TCPIP0::h::inst0::INSTR", "TCPIP1::h::inst0::INSTR", "TCPIP0::h::inst1::INSTR",
             "TCPIP0::h::hislip0::INSTR", "TCPIP0::h::hislip0,4881::INSTR", "TCPIP0::h,1024::inst0::INSTR",
             "TCPIP0::h::5025::SOCKET", "VICP0::h::INSTR", "TCPIP0::h2::inst0::INSTR"]
    assert len({canonical(t) for t in texts}) == len(texts)


def test_default_ports() -> None:
    assert HISLIP_DEFAULT_PORT == 4880 and VICP_DEFAULT_PORT == 1861


# text -> fragment the message must contain (naming the bad part)
INVALID = [
    ("", "empty resource string"),
    ("   ", "empty resource string"),
    ("GPIB0::5::INSTR", "interface 'GPIB0'"),
    ("ASRL1::INSTR", "interface 'ASRL1'"),
    ("TCPIPX::h::INSTR", "interface 'TCPIPX'"),
    ("TCPIP:h::INSTR", "interface 'TCPIP:h'"),
    ("TCPIP-1::h::INSTR", "interface 'TCPIP-1'"),
    ("TCPIP", "missing host address"),
    ("TCPIP::INSTR", "missing host address"),
    ("TCPIP::SOCKET", "missing host address"),
    ("VICP::INSTR", "missing host address"),
    ("TCPIP::::INSTR", "missing host address"),
    ("TCPIP::,5025::INSTR", "missing host address"),
    ("TCPIP::1.2.3.4::SOCKET", "TCPIP[board]::host::port::SOCKET"),  # PyVISA too: the port is mandatory
    ("TCPIP::h::inst0::5025::SOCKET", "TCPIP[board]::host::port::SOCKET"),
    ("TCPIP::h::0::SOCKET", "port '0'"),
    ("TCPIP::h::65536::SOCKET", "port '65536'"),
    ("TCPIP::h::-1::SOCKET", "port '-1'"),
    ("TCPIP::h::http::SOCKET", "port 'http'"),
    ("TCPIP::h::\u00b2::SOCKET", "port '\u00b2'"),                      # superscript two: isdigit() but not int()
    ("TCPIP::h::\u0665\u0660\u0662\u0665::SOCKET", "port '\u0665\u0660\u0662\u0665'"),  # Arabic-Indic 5025
    ("TCPIP::h::hislip0,99999::INSTR", "HiSLIP port '99999'"),
    ("TCPIP::h::hislip0,x::INSTR", "HiSLIP port 'x'"),
    ("TCPIP::h::hislip0,::INSTR", "HiSLIP port ''"),
    ("TCPIP::h::hislip0,4880,1::INSTR", "HiSLIP port '4880,1'"),
    ("TCPIP::h,4880::hislip0::INSTR", "give the HiSLIP port as hislipN,port"),
    ("TCPIP::h,::INSTR", "port ''"),
    ("TCPIP::h,abc::INSTR", "port 'abc'"),
    ("TCPIP::h,70000::INSTR", "port '70000'"),
    ("TCPIP::[fe80::1::INSTR", "unbalanced '['"),
    ("TCPIP::fe80::1]::INSTR", "unbalanced ']'"),
    ("TCPIP::[fe80::zz]::INSTR", "host '[fe80::zz]'"),
    ("TCPIP::[1.2.3.4]::INSTR", "host '[1.2.3.4]'"),
    ("TCPIP::[::1]x::INSTR", "host '[::1]x'"),
    ("TCPIP::[]::INSTR", "host '[]'"),
    ("TCPIP::bad host!::INSTR", "host 'bad host!'"),
    ("TCPIP::h/x::INSTR", "host 'h/x'"),
    ("TCPIP::h::inst0::extra::INSTR", "too many parts"),
    ("TCPIP::h::in st0::INSTR", "LAN device name 'in st0'"),
    ("TCPIP::h::::INSTR", "LAN device name ''"),
    ("TCPIP::h::[x]::INSTR", "LAN device name '[x]'"),
    ("VICP::h::1861::INSTR", "VICP[board]::host[,port][::INSTR]"),
    ("VICP::h::5025::SOCKET", "VICP[board]::host[,port][::INSTR]"),
    ("VICP::h,0", "port '0'"),
    ("VICP::h,port", "port 'port'"),
]


@pytest.mark.parametrize(("text", "fragment"), INVALID, ids=[t or "<empty>" for t, _ in INVALID])
def test_invalid(text: str, fragment: str) -> None:
    with pytest.raises(InvalidResourceName) as info:
        parse_resource(text)
    assert fragment in info.value.message
    assert info.value.code is StatusCode.VI_ERROR_INV_RSRC_NAME
    if text.strip():
        assert repr(text.strip()) in info.value.message  # every message quotes the whole string too


@pytest.mark.parametrize("value", [None, 5, b"TCPIP::h::INSTR"])
def test_non_string(value: object) -> None:
    with pytest.raises(InvalidResourceName):
        parse_resource(value)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ patterns
LISTED = [
    "TCPIP0::1.2.3.4::inst0::INSTR",
    "TCPIP0::1.2.3.4::hislip0::INSTR",
    "TCPIP1::[::1]::hislip1,4881::INSTR",
    "TCPIP0::1.2.3.4::5025::SOCKET",
    "TCPIP0::gw::gpib0,5::INSTR",
    "VICP0::scope::INSTR",
]

PATTERNS = [
    ("?*::INSTR", [0, 1, 2, 4, 5]),
    ("TCPIP?*::hislip?*::INSTR", [1, 2]),
    ("TCPIP?*::SOCKET", [3]),
    ("VICP?*::INSTR", [5]),
    ("?*", [0, 1, 2, 3, 4, 5]),
    ("tcpip?*::instr", [0, 1, 2, 4]),                   # case-insensitive
    ("TCPIP[0-9]::?*", [0, 1, 2, 3, 4]),
    ("TCPIP[^0]::?*", [2]),
    ("TCPIP0::1.2.3.4::inst0::INSTR", [0]),             # an exact name is a pattern too
    ("?*SOCKET|VICP?*", [3, 5]),
    ("TCPIP0::1.2.3.4::?*", [0, 1, 3]),
    ("?*gpib?*", [4]),
    ("TCPIP", []),                                       # a pattern matches the whole string, not a prefix
    ("?*::INST", []),
    ("TCPIP0?::?*", []),                                 # '?' is exactly one character
    ("TCPIP0+::?*", [0, 1, 3, 4]),                       # '+' repeats the previous character
]


@pytest.mark.parametrize(("pattern", "expected"), PATTERNS, ids=[p for p, _ in PATTERNS])
def test_match_pattern(pattern: str, expected: list[int]) -> None:
    assert [i for i, res in enumerate(LISTED) if match_pattern(pattern, res)] == expected


def test_pattern_dot_is_literal() -> None:
    assert match_pattern("TCPIP0::1.2.3.4::?*", "TCPIP0::1.2.3.4::inst0::INSTR")
    assert not match_pattern("TCPIP0::1.2.3.4::?*", "TCPIP0::1x2y3z4::inst0::INSTR")


def test_pattern_matches_aliases() -> None:
    assert match_pattern("scope?*", "scope-7") and not match_pattern("scope?*", "dmm")


@pytest.mark.parametrize("pattern", ["*", "+?*", "TCPIP[0-9", "(?*", "?*)", "?**"])
def test_invalid_pattern(pattern: str) -> None:
    # The broker's `list` op answers InvalidResourceName; anything else would escape its error handling.
    with pytest.raises(InvalidResourceName) as info:
        match_pattern(pattern, "TCPIP0::h::inst0::INSTR")
    assert repr(pattern) in info.value.message

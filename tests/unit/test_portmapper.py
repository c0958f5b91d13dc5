"""Portmapper v2 codec and registry: byte vectors (PROTOCOLS.md §1.5), no sockets."""

from __future__ import annotations

import pytest

from visabus.workers.protocols import portmapper as pm
from visabus.workers.protocols import rpc
from visabus.workers.protocols.errors import RemoteProtocolError


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# PROTOCOLS.md §1.5 worked example: GETPORT for the VXI-11 core program, xid 1000.
WORKED_CALL = h(
    "000003e8 00000000 00000002 000186a0 00000002 00000003"
    " 00000000 00000000 00000000 00000000"
    " 000607af 00000001 00000006 00000000"
)
WORKED_REPLY = h("000003e8 00000001 00000000 00000000 00000000 00000000 00000400")


def test_constants() -> None:
    assert (pm.PMAP_PROG, pm.PMAP_PORT, pm.IPPROTO_TCP, pm.IPPROTO_UDP) == (100000, 111, 6, 17)


def test_encode_getport_call_is_the_worked_example() -> None:
    call = pm.encode_getport_call(1000, 0x0607AF, 1, pm.IPPROTO_TCP)
    assert call == WORKED_CALL and len(call) == 56
    assert rpc.frame_record(call)[:4] == h("80000038")  # the TCP form


def test_decode_getport_reply_worked_example() -> None:
    assert len(WORKED_REPLY) == 28
    assert pm.decode_getport_reply(WORKED_REPLY) == (1000, 1024)
    assert rpc.frame_record(WORKED_REPLY)[:4] == h("8000001c")


def test_decode_getport_reply_not_registered_is_port_0() -> None:
    assert pm.decode_getport_reply(WORKED_REPLY[:-4] + bytes(4)) == (1000, 0)


def test_decode_getport_reply_tolerates_trailing_padding() -> None:
    assert pm.decode_getport_reply(WORKED_REPLY + bytes(8)) == (1000, 1024)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (WORKED_REPLY[:26], "GETPORT port: truncated"),
        (WORKED_REPLY[:-4] + h("00010000"), "port 65536 is not a TCP/UDP port"),
        (WORKED_CALL, "expected a REPLY"),
        (h("000003e8 00000001 00000000 00000000 00000000 00000001"), "PROG_UNAVAIL"),
        (h("000003e8 00000001 00000001 00000001 00000001"), "AUTH_ERROR"),
        (b"", "xid: truncated"),
        (h("000003e8 00000001 00000000 00000000 000001f4"), "verifier body: announces 500 bytes"),
    ],
)
def test_decode_getport_reply_rejects_malformed(data: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        pm.decode_getport_reply(data)


def test_set_unset_dump_call_vectors() -> None:
    mapping = pm.Mapping(0x0607AF, 1, 6, 1024)
    assert pm.encode_set_call(1, mapping)[20:24] == h("00000001")
    assert pm.encode_set_call(1, mapping)[40:] == h("000607af 00000001 00000006 00000400")
    assert pm.encode_unset_call(2, mapping)[20:24] == h("00000002")
    assert pm.encode_dump_call(3) == rpc.encode_call(3, 100000, 2, 4)
    assert len(pm.encode_null_call(4)) == 40


def test_decode_dump_reply() -> None:
    wire = rpc.encode_reply(
        7,
        h("00000001 000607af 00000001 00000006 00000400") + h("00000001 000186a0 00000002 00000011 0000006f")
        + h("00000000"),
    )
    xid, mappings = pm.decode_dump_reply(wire)
    assert xid == 7
    assert mappings == [pm.Mapping(0x0607AF, 1, 6, 1024), pm.Mapping(100000, 2, 17, 111)]
    assert pm.decode_dump_reply(rpc.encode_reply(8, h("00000000"))) == (8, [])


def test_decode_dump_reply_rejects_endless_or_truncated_lists() -> None:
    endless = rpc.encode_reply(1, h("00000001 00000001 00000001 00000006 00000001") * (pm.MAX_DUMP_ENTRIES + 1))
    with pytest.raises(RemoteProtocolError, match="more than 4096 entries"):
        pm.decode_dump_reply(endless)
    with pytest.raises(RemoteProtocolError, match="DUMP list marker: truncated"):
        pm.decode_dump_reply(rpc.encode_reply(1, h("00000001 000607af 00000001 00000006 00000400")))


def test_decode_bool_reply() -> None:
    assert pm.decode_bool_reply(rpc.encode_reply(4, h("00000001"))) == (4, True)
    assert pm.decode_bool_reply(rpc.encode_reply(4, h("00000000"))) == (4, False)


# ------------------------------------------------------------------------------------ registry
@pytest.fixture
def registry() -> pm.PortmapRegistry:
    reg = pm.PortmapRegistry()
    reg.register(0x0607AF, 1, pm.IPPROTO_TCP, 1024)
    return reg


def test_registry_answers_getport_with_the_worked_reply(registry: pm.PortmapRegistry) -> None:
    assert registry.handle(WORKED_CALL) == WORKED_REPLY


def test_registry_answers_0_for_unknown_programs(registry: pm.PortmapRegistry) -> None:
    reply = registry.handle(pm.encode_getport_call(5, 0x0607AF, 1, pm.IPPROTO_UDP))
    assert reply is not None and pm.decode_getport_reply(reply) == (5, 0)


def test_registry_set_unset_dump(registry: pm.PortmapRegistry) -> None:
    mapping = pm.Mapping(200000, 3, pm.IPPROTO_UDP, 4000)
    reply = registry.handle(pm.encode_set_call(1, mapping))
    assert reply is not None and pm.decode_bool_reply(reply) == (1, True)
    reply = registry.handle(pm.encode_set_call(2, mapping))  # already registered
    assert reply is not None and pm.decode_bool_reply(reply) == (2, False)
    reply = registry.handle(pm.encode_dump_call(3))
    assert reply is not None
    assert pm.decode_dump_reply(reply)[1] == [pm.Mapping(200000, 3, 17, 4000), pm.Mapping(0x0607AF, 1, 6, 1024)]
    reply = registry.handle(pm.encode_unset_call(4, mapping))
    assert reply is not None and pm.decode_bool_reply(reply) == (4, True)
    assert registry.lookup(200000, 3, pm.IPPROTO_UDP) == 0


def test_registry_refuses_changes_from_untrusted_peers(registry: pm.PortmapRegistry) -> None:
    reply = registry.handle(pm.encode_set_call(1, pm.Mapping(1, 1, 6, 1)), trusted=False)
    assert reply is not None and pm.decode_bool_reply(reply) == (1, False)
    reply = registry.handle(pm.encode_unset_call(2, pm.Mapping(0x0607AF, 1, 6, 0)), trusted=False)
    assert reply is not None and pm.decode_bool_reply(reply) == (2, False)
    assert registry.lookup(0x0607AF, 1, 6) == 1024


def test_registry_null_procedure(registry: pm.PortmapRegistry) -> None:
    assert registry.handle(pm.encode_null_call(9)) == rpc.encode_reply(9)


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (rpc.encode_call(1, 100001, 2, 3), rpc.encode_reply(1, accept_stat=rpc.AcceptStat.PROG_UNAVAIL)),
        (rpc.encode_call(1, 100000, 3, 3),
         rpc.encode_reply(1, accept_stat=rpc.AcceptStat.PROG_MISMATCH, mismatch=(2, 2))),
        (rpc.encode_call(1, 100000, 2, 5), rpc.encode_reply(1, accept_stat=rpc.AcceptStat.PROC_UNAVAIL)),
        (rpc.encode_call(1, 100000, 2, 3, h("000607af")),
         rpc.encode_reply(1, accept_stat=rpc.AcceptStat.GARBAGE_ARGS)),
        (WORKED_CALL[:8] + h("00000003") + WORKED_CALL[12:],
         rpc.encode_denied_reply(1000, rpc.RejectStat.RPC_MISMATCH, mismatch=(2, 2))),
    ],
)
def test_registry_error_replies(registry: pm.PortmapRegistry, call: bytes, expected: bytes) -> None:
    assert registry.handle(call) == expected


def test_registry_ignores_undecodable_messages(registry: pm.PortmapRegistry) -> None:
    assert registry.handle(b"\x00\x01") is None
    assert registry.handle(WORKED_REPLY) is None

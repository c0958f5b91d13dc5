"""VXI-11 codec: every structure as a byte vector (PROTOCOLS.md §2.6, §2.16), calls, error mapping."""

from __future__ import annotations

import pytest

from visabus.sdk.errors import (
    Aborted,
    ConnectionLost,
    InvalidParameter,
    IOFailure,
    NotSupported,
    ResourceBusy,
    ResourceLocked,
    ResourceNotFound,
    SessionNotLocked,
    StatusCode,
    VisaTimeout,
)
from visabus.workers.protocols import rpc
from visabus.workers.protocols import vxi11 as v
from visabus.workers.protocols.errors import RemoteProtocolError


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# (structure, wire bytes). The first six are the pyvisa-py 0.8.1 captures of PROTOCOLS.md §2.16.
VECTORS = [
    (v.CreateLinkParms(0x619789B0, False, 10000, b"inst0"), "619789b0 00000000 00002710 00000005 696e7374 30000000"),
    (v.DeviceWriteParms(42, 2000, 10000, v.OpFlag.END, b"*IDN?\r\n"),
     "0000002a 000007d0 00002710 00000008 00000007 2a49444e 3f0d0a00"),
    (v.DeviceReadParms(42, 1024, 2000, 10000, v.OpFlag.TERMCHRSET, 0x0A),
     "0000002a 00000400 000007d0 00002710 00000080 0000000a"),
    (v.DeviceGenericParms(42, 0, 10000, 2000), "0000002a 00000000 00002710 000007d0"),
    (v.DeviceLockParms(42, 0, 10000), "0000002a 00000000 00002710"),
    (v.DeviceLink(42), "0000002a"),
    (v.CreateLinkResp(0, 0, 40001, 1 << 20), "00000000 00000000 00009c41 00100000"),
    (v.DeviceWriteResp(0, 7), "00000000 00000007"),
    (v.DeviceReadResp(0, v.ReadReason.END, b"1.5\n"), "00000000 00000004 00000004 312e350a"),
    (v.DeviceReadResp(15, 0, b""), "0000000f 00000000 00000000"),
    (v.DeviceReadStbResp(0, 0x50), "00000000 00000050"),
    (v.DeviceError(11), "0000000b"),
    (v.DeviceEnableSrqParms(0, True, b"h1"), "00000000 00000001 00000002 68310000"),
    (v.DeviceDocmdParms(3, 1, 1000, 2000, 0x020001, True, 2, h("0001")),
     "00000003 00000001 000003e8 000007d0 00020001 00000001 00000002 00000002 00010000"),
    (v.DeviceDocmdResp(8, b""), "00000008 00000000"),
    (v.DeviceRemoteFunc(0x7F000001, 40000, v.DEVICE_INTR_PROG, 1, v.DEVICE_TCP),
     "7f000001 00009c40 000607b1 00000001 00000000"),
    (v.DeviceSrqParms(b"visabus:0"), "00000009 76697361 6275733a 30000000"),
    (v.Void(), ""),
]


@pytest.mark.parametrize(("struct", "wire"), VECTORS, ids=lambda x: type(x).__name__ if not isinstance(x, str) else "")
def test_structure_byte_vectors(struct: v._Struct, wire: str) -> None:
    assert struct.encode() == h(wire)
    decoded = type(struct).decode(h(wire))
    assert decoded.encode() == h(wire)
    for name, kind, _ in struct._xdr:
        if kind == "view":
            assert bytes(getattr(decoded, name)) == bytes(getattr(struct, name))
        else:
            assert getattr(decoded, name) == getattr(struct, name)


def test_generic_parms_order_is_lock_then_io_timeout_but_docmd_is_io_then_lock() -> None:
    assert v.DeviceGenericParms(1, 0, lock_timeout=0xAAAA, io_timeout=0xBBBB).encode()[8:] == h("0000aaaa 0000bbbb")
    docmd = v.DeviceDocmdParms(1, 0, io_timeout=0xBBBB, lock_timeout=0xAAAA, cmd=0, network_order=True,
                               datasize=1, data_in=b"")
    assert docmd.encode()[8:16] == h("0000bbbb 0000aaaa")


def test_bulk_read_data_decodes_as_a_view_of_the_reply() -> None:
    data = bytes(range(256)) * 512
    wire = v.DeviceReadResp(0, v.ReadReason.END, data).encode()
    resp = v.DeviceReadResp.decode(wire)
    assert isinstance(resp.data, memoryview) and resp.data.obj is wire and bytes(resp.data) == data
    assert "131072 bytes" in repr(resp)


def test_write_encode_parts_keeps_bulk_data_by_reference() -> None:
    data = b"x" * (1 << 20)
    parts = v.DeviceWriteParms(1, 1000, 0, v.OpFlag.END, data).encode_parts()
    assert any(isinstance(p, memoryview) and p.obj is data for p in parts)


def test_call_vectors_use_the_right_program() -> None:
    call = v.encode_call(7, v.Proc.CREATE_LINK, v.CreateLinkParms(1, False, 0, b"inst0"))
    assert call[:24] == h("00000007 00000000 00000002 000607af 00000001 0000000a")
    abort = v.encode_call(8, v.Proc.DEVICE_ABORT, v.DeviceLink(3))
    assert abort == h("00000008 00000000 00000002 000607b0 00000001 00000001") + bytes(16) + h("00000003")
    srq = v.encode_call(9, v.Proc.DEVICE_INTR_SRQ, v.DeviceSrqParms(b"h"))
    assert srq[12:24] == h("000607b1 00000001 0000001e") and srq[40:] == h("00000001 68000000")
    destroy_intr = v.encode_call(10, v.Proc.DESTROY_INTR_CHAN, v.Void())
    assert len(destroy_intr) == 40 and destroy_intr[20:24] == h("0000001a")
    with pytest.raises(TypeError, match="DEVICE_READ takes DeviceReadParms"):
        v.encode_call(1, v.Proc.DEVICE_READ, v.DeviceLink(1))


def test_decode_params_round_trip_through_a_call() -> None:
    params = v.DeviceReadParms(5, 4096, 1000, 0, 0, 0)
    call = rpc.decode_call(v.encode_call(1, v.Proc.DEVICE_READ, params))
    assert v.decode_params(call) == params
    assert v.procedure(call.prog, call.proc) is v.Proc.DEVICE_READ


def test_procedure_lookup_checks_the_program() -> None:
    assert v.procedure(v.DEVICE_CORE_PROG, 1) is None  # device_abort lives on the abort program
    assert v.procedure(v.DEVICE_ASYNC_PROG, 1) is v.Proc.DEVICE_ABORT
    assert v.procedure(v.DEVICE_CORE_PROG, 21) is None  # unused number
    assert v.procedure(v.DEVICE_INTR_PROG, 30) is v.Proc.DEVICE_INTR_SRQ
    with pytest.raises(RemoteProtocolError, match="no VXI-11 procedure 21"):
        v.decode_params(rpc.Call(1, v.DEVICE_CORE_PROG, 1, 21))


def test_decode_result_of_a_reply_with_padding_and_of_a_refusal() -> None:
    reply = rpc.decode_reply(rpc.encode_reply(3, h("00000000 00000007 00000000")))  # padded (ICS 8065)
    assert v.decode_result(v.Proc.DEVICE_WRITE, reply) == v.DeviceWriteResp(0, 7)
    refused = rpc.decode_reply(rpc.encode_reply(3, accept_stat=rpc.AcceptStat.PROC_UNAVAIL))
    with pytest.raises(rpc.RpcCallFailed, match="PROC_UNAVAIL"):
        v.decode_result(v.Proc.DEVICE_WRITE, refused)
    with pytest.raises(TypeError):
        v.decode_result(v.Proc.DEVICE_INTR_SRQ, reply)


@pytest.mark.parametrize(
    ("cls", "wire", "message"),
    [
        (v.DeviceEnableSrqParms, "00000000 00000001 00000029" + "00" * 44, "handle: announces 41 bytes, the maximum is 40"),
        (v.DeviceReadResp, "00000000 00000004 7fffffff 00", "data: announces 2147483647 bytes, only 1 left"),
        (v.CreateLinkResp, "00000000 00000001 00000400", r"CreateLinkResp.max_recv_size: truncated"),
        (v.DeviceEnableSrqParms, "00000000 00000002 00000000", "enable: 2 is not a boolean"),
        (v.DeviceLink, "00000001 00000000", "DeviceLink: 4 unexpected bytes"),
    ],
)
def test_malformed_structures_are_rejected_precisely(cls: type[v._Struct], wire: str, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        cls.decode(h(wire))


def test_decode_read_resp_head() -> None:
    assert v.decode_read_resp_head(h("00000000 00000005 00001000")) == (0, 5, 4096)
    with pytest.raises(RemoteProtocolError, match="truncated, 8 of 12"):
        v.decode_read_resp_head(bytes(8))


def test_flag_and_reason_values() -> None:
    assert (v.OpFlag.WAITLOCK, v.OpFlag.END, v.OpFlag.TERMCHRSET) == (1, 8, 128)
    assert (v.ReadReason.REQCNT, v.ReadReason.CHR, v.ReadReason.END) == (1, 2, 4)
    assert (v.DEVICE_CORE_PROG, v.DEVICE_ASYNC_PROG, v.DEVICE_INTR_PROG) == (395183, 395184, 395185)


# ------------------------------------------------------------------------------- error mapping
@pytest.mark.parametrize(
    ("error", "proc", "waitlock", "status", "cls"),
    [
        (1, v.Proc.CREATE_LINK, False, StatusCode.VI_ERROR_RSRC_NFOUND, ResourceNotFound),
        (3, v.Proc.CREATE_LINK, False, StatusCode.VI_ERROR_RSRC_NFOUND, ResourceNotFound),
        (21, v.Proc.CREATE_LINK, False, StatusCode.VI_ERROR_RSRC_NFOUND, ResourceNotFound),
        (4, v.Proc.DEVICE_READ, False, StatusCode.VI_ERROR_CONN_LOST, ConnectionLost),
        (5, v.Proc.DEVICE_WRITE, False, StatusCode.VI_ERROR_INV_PARAMETER, InvalidParameter),
        (6, v.Proc.CREATE_INTR_CHAN, False, StatusCode.VI_ERROR_IO, IOFailure),
        (8, v.Proc.DEVICE_TRIGGER, False, StatusCode.VI_ERROR_NSUP_OPER, NotSupported),
        (9, v.Proc.CREATE_LINK, False, StatusCode.VI_ERROR_ALLOC, None),
        (11, v.Proc.DEVICE_LOCK, True, StatusCode.VI_ERROR_TMO, VisaTimeout),
        (11, v.Proc.DEVICE_LOCK, False, StatusCode.VI_ERROR_RSRC_LOCKED, ResourceLocked),
        (11, v.Proc.DEVICE_WRITE, True, StatusCode.VI_ERROR_RSRC_LOCKED, ResourceLocked),
        (11, v.Proc.DEVICE_READ, False, StatusCode.VI_ERROR_RSRC_LOCKED, ResourceLocked),
        (12, v.Proc.DEVICE_UNLOCK, False, StatusCode.VI_ERROR_SESN_NLOCKED, SessionNotLocked),
        (15, v.Proc.DEVICE_READ, False, StatusCode.VI_ERROR_TMO, VisaTimeout),
        (17, v.Proc.DEVICE_WRITE, False, StatusCode.VI_ERROR_IO, IOFailure),
        (23, v.Proc.DEVICE_READ, False, StatusCode.VI_ERROR_ABORT, Aborted),
        (29, v.Proc.CREATE_INTR_CHAN, False, StatusCode.VI_ERROR_RSRC_BUSY, ResourceBusy),
        (2, v.Proc.DEVICE_READ, False, StatusCode.VI_ERROR_IO, IOFailure),  # reserved
        (-7, v.Proc.DEVICE_READ, False, StatusCode.VI_ERROR_IO, IOFailure),
    ],
)
def test_error_mapping(error: int, proc: v.Proc, waitlock: bool, status: StatusCode, cls: type | None) -> None:
    assert v.visa_status(error, proc=proc, waitlock=waitlock) is status
    exc = v.vxi11_error(error, proc=proc, waitlock=waitlock, context="TCPIP0::h::inst0::INSTR")
    assert exc.code is status
    if cls is not None:
        assert type(exc) is cls
    assert f"error {error}" in exc.message and exc.message.startswith("TCPIP0::h::inst0::INSTR: VXI-11 ")


def test_error_table_covers_every_defined_code() -> None:
    assert set(v.VXI11_TO_VISA) == {int(c) for c in v.ErrorCode}
    assert set(v.ERROR_TEXT) == {int(c) for c in v.ErrorCode}


# ------------------------------------------------------------------------- interrupt channel stream
def srq_record(handle: bytes, *, announce_extra: int = 0, pad: bytes = b"", xid: int = 1) -> bytes:
    message = v.encode_call(xid, v.Proc.DEVICE_INTR_SRQ, v.DeviceSrqParms(handle))
    return rpc.record_mark(len(message) + announce_extra) + message + pad


def handles(calls: list[rpc.Call]) -> list[bytes]:
    return [v.DeviceSrqParms.decode(c.args).handle for c in calls]


def test_intr_stream_well_formed_records_byte_by_byte() -> None:
    stream = srq_record(b"a", xid=1) + srq_record(b"bcdef", xid=2)
    reader = v.InterruptStreamReader()
    calls: list[rpc.Call] = []
    for i in range(len(stream)):
        calls += reader.feed(stream[i : i + 1])
    assert handles(calls) == [b"a", b"bcdef"] and [c.xid for c in calls] == [1, 2]


def test_intr_stream_takes_a_call_whose_mark_announced_4_bytes_too_many() -> None:
    reader = v.InterruptStreamReader()
    assert handles(reader.feed(srq_record(b"dmm", announce_extra=4))) == [b"dmm"]  # no waiting
    assert handles(reader.feed(srq_record(b"next"))) == [b"next"]  # still in step


def test_intr_stream_sloppy_record_followed_at_once_by_the_next() -> None:
    reader = v.InterruptStreamReader()
    stream = srq_record(b"one", announce_extra=4) + srq_record(b"two")
    assert handles(reader.feed(stream)) == [b"one", b"two"]


def test_intr_stream_skips_announced_zero_padding_even_when_late() -> None:
    reader = v.InterruptStreamReader()
    assert handles(reader.feed(srq_record(b"p", announce_extra=8, pad=bytes(4)))) == [b"p"]
    assert reader.feed(bytes(4)) == []  # the rest of the padding arrives later
    assert handles(reader.feed(srq_record(b"q"))) == [b"q"]


def test_intr_stream_multi_fragment_call() -> None:
    message = v.encode_call(5, v.Proc.DEVICE_INTR_SRQ, v.DeviceSrqParms(b"frag"))
    stream = rpc.frame_record(message, max_fragment=10)
    assert handles(v.InterruptStreamReader().feed(stream)) == [b"frag"]


def test_intr_stream_other_calls_are_delimited_by_their_mark() -> None:
    other = rpc.frame_record(rpc.encode_call(3, v.DEVICE_INTR_PROG, 1, 0, b"\x00" * 8))
    calls = v.InterruptStreamReader().feed(other + srq_record(b"z"))
    assert [(c.proc, bytes(c.args)) for c in calls[:1]] == [(0, bytes(8))]
    assert handles(calls[1:]) == [b"z"]


def test_intr_stream_rejects_oversized_records_and_handles() -> None:
    with pytest.raises(RemoteProtocolError, match="record over 65536 bytes"):
        v.InterruptStreamReader().feed(rpc.record_mark(1 << 20) + bytes(8))
    huge_handle = srq_record(b"h")[:44] + (5000).to_bytes(4, "big")
    with pytest.raises(RemoteProtocolError, match="handle of 5000 bytes"):
        v.InterruptStreamReader().feed(huge_handle)

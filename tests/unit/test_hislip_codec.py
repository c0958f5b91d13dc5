"""HiSLIP codec: byte vectors for every message type 0-25, malformed and hostile headers, helpers.

The expected bytes are written out by hand from IVI-6.1's header layout ("HS", type, control code,
32-bit parameter, 64-bit payload length, payload; big-endian), not computed with the codec's struct.
"""

from __future__ import annotations

import pytest

from visabus.workers.protocols import hislip as h
from visabus.workers.protocols.errors import LocalProtocolError, RemoteProtocolError

T = h.MessageType


def hx(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# (message, expected header bytes, expected payload) — one row per message type.
VECTORS: list[tuple[h.Message, bytes, bytes]] = [
    (h.initialize("hislip0", "xx"), hx("4853 00 00 01007878 0000000000000007"), b"hislip0"),
    (h.initialize_response(0x0001, overlapped=False), hx("4853 01 00 01000001 0000000000000000"), b""),
    (h.initialize_response(0xBEEF, overlapped=True), hx("4853 01 01 0100BEEF 0000000000000000"), b""),
    (h.fatal_error(h.FatalErrorCode.MAX_CLIENTS_EXCEEDED, "busy"), hx("4853 02 04 00000000 0000000000000004"),
     b"busy"),
    (h.error(h.ErrorCode.UNRECOGNIZED_MESSAGE_TYPE, ""), hx("4853 03 01 00000000 0000000000000000"), b""),
    (h.async_lock_request(2500, ""), hx("4853 04 01 000009C4 0000000000000000"), b""),
    (h.async_lock_request(0, "key"), hx("4853 04 01 00000000 0000000000000003"), b"key"),
    (h.async_lock_release(0xFFFFFEFE), hx("4853 04 00 FFFFFEFE 0000000000000000"), b""),
    (h.async_lock_response(h.LockResult.SUCCESS_SHARED), hx("4853 05 02 00000000 0000000000000000"), b""),
    (h.data(0xFFFFFF00, b"ab", rmt_delivered=True), hx("4853 06 01 FFFFFF00 0000000000000002"), b"ab"),
    (h.data_end(0xFFFFFF02, b"*IDN?\n"), hx("4853 07 00 FFFFFF02 0000000000000006"), b"*IDN?\n"),
    (h.device_clear_complete(overlapped=True), hx("4853 08 01 00000000 0000000000000000"), b""),
    (h.device_clear_acknowledge(overlapped=False), hx("4853 09 00 00000000 0000000000000000"), b""),
    (h.async_remote_local_control(h.RemoteLocal.GO_TO_LOCAL, 0xFFFFFF04),
     hx("4853 0A 06 FFFFFF04 0000000000000000"), b""),
    (h.async_remote_local_response(), hx("4853 0B 00 00000000 0000000000000000"), b""),
    (h.trigger(0x00000000, rmt_delivered=True), hx("4853 0C 01 00000000 0000000000000000"), b""),
    (h.interrupted(0xFFFFFF06), hx("4853 0D 00 FFFFFF06 0000000000000000"), b""),
    (h.async_interrupted(0xFFFFFF06), hx("4853 0E 00 FFFFFF06 0000000000000000"), b""),
    (h.async_maximum_message_size(0x100000), hx("4853 0F 00 00000000 0000000000000008"),
     hx("0000000000100000")),
    (h.async_maximum_message_size_response(272), hx("4853 10 00 00000000 0000000000000008"),
     hx("0000000000000110")),
    (h.async_initialize(0x0001), hx("4853 11 00 00000001 0000000000000000"), b""),
    (h.async_initialize_response("VB"), hx("4853 12 00 00005642 0000000000000000"), b""),
    (h.async_device_clear(), hx("4853 13 00 00000000 0000000000000000"), b""),
    (h.async_service_request(0x50), hx("4853 14 50 00000000 0000000000000000"), b""),
    (h.async_status_query(0xFFFFFEFE, rmt_delivered=True), hx("4853 15 01 FFFFFEFE 0000000000000000"), b""),
    (h.async_status_response(0x10), hx("4853 16 10 00000000 0000000000000000"), b""),
    (h.async_device_clear_acknowledge(overlapped=True), hx("4853 17 01 00000000 0000000000000000"), b""),
    (h.async_lock_info(), hx("4853 18 00 00000000 0000000000000000"), b""),
    (h.async_lock_info_response(True, 3), hx("4853 19 01 00000003 0000000000000000"), b""),
]


def test_every_message_type_has_a_vector() -> None:
    assert {int(m.type) for m, _, _ in VECTORS} == set(range(26))


@pytest.mark.parametrize(("message", "header", "payload"), VECTORS, ids=lambda v: getattr(v, "name", None))
def test_encode_matches_vector(message: h.Message, header: bytes, payload: bytes) -> None:
    assert message.header() == header
    assert message.encode() == header + payload


@pytest.mark.parametrize(("message", "header", "payload"), VECTORS, ids=lambda v: getattr(v, "name", None))
def test_decode_vector_roundtrip(message: h.Message, header: bytes, payload: bytes) -> None:
    reader = h.HislipReader()
    reader.feed(header + payload)
    decoded = reader.next_message()
    assert decoded == message
    assert reader.next_message() is None
    assert reader.buffered == 0


def test_field_views() -> None:
    init = h.initialize("hislip3", "xx", version=0x0100)
    assert (init.high16, h.vendor_text(init.low16), init.text()) == (0x0100, "xx", "hislip3")
    response = h.initialize_response(7, overlapped=True)
    assert (response.high16, response.low16, response.overlapped) == (0x0100, 7, True)
    assert h.async_maximum_message_size(12345).size_value() == 12345
    assert h.data(5, b"").rmt_delivered is False and h.trigger(5, True).rmt_delivered is True


def test_reader_reassembles_byte_by_byte() -> None:
    stream = b"".join(m.encode() for m, _, _ in VECTORS)
    reader = h.HislipReader()
    out: list[h.Message] = []
    for i in range(len(stream)):
        reader.feed(stream[i : i + 1])
        out.extend(reader.messages())
    assert out == [m for m, _, _ in VECTORS]


def test_reader_large_payload_in_pieces_is_linear() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    reader = h.HislipReader(max_payload=1 << 20)
    wire = h.data_end(0xFFFFFF00, payload).encode() + h.async_lock_info().encode()
    for start in range(0, len(wire), 65536):
        reader.feed(wire[start : start + 65536])
    first, second = list(reader.messages())
    assert first.payload == payload and second.type is T.ASYNC_LOCK_INFO


def test_bad_prologue_is_fatal_and_sticky() -> None:
    reader = h.HislipReader()
    reader.feed(hx("4854 07 00 FFFFFF00 0000000000000000"))  # "HT"
    with pytest.raises(h.HislipFormatError) as info:
        reader.next_message()
    assert info.value.fatal_code is h.FatalErrorCode.POORLY_FORMED_HEADER
    assert isinstance(info.value, RemoteProtocolError)
    reader.feed(h.async_lock_info().encode())
    with pytest.raises(h.HislipFormatError):
        reader.next_message()  # the stream cannot be trusted any more


def test_lying_length_raises_before_any_allocation() -> None:
    reader = h.HislipReader(max_payload=1 << 20)
    reader.feed(hx("4853 07 00 FFFFFF00 4000000000000000"))  # 2**62-byte payload announced
    with pytest.raises(h.PayloadTooLarge) as info:
        reader.next_message()
    assert info.value.header.length == 1 << 62
    assert info.value.error_code is h.ErrorCode.MESSAGE_TOO_LARGE
    assert reader.buffered == 16


def test_decode_header_bounds_length_and_needs_16_bytes() -> None:
    header = hx("4853 06 00 00000001 0000000000000401")
    assert h.decode_header(header, 1025) == h.Header(6, 0, 1, 1025)
    with pytest.raises(h.PayloadTooLarge):
        h.decode_header(header, 1024)
    with pytest.raises(LocalProtocolError):
        h.decode_header(header[:15], 1024)


@pytest.mark.parametrize(("mtype", "code"), [(26, h.ErrorCode.UNRECOGNIZED_MESSAGE_TYPE),
                                             (127, h.ErrorCode.UNRECOGNIZED_MESSAGE_TYPE),
                                             (128, h.ErrorCode.UNRECOGNIZED_VENDOR_MESSAGE),
                                             (255, h.ErrorCode.UNRECOGNIZED_VENDOR_MESSAGE)])
def test_unknown_and_vendor_types_are_skipped_with_the_right_error(mtype: int, code: h.ErrorCode) -> None:
    reader = h.HislipReader()
    reader.feed(bytes([0x48, 0x53, mtype, 9]) + hx("00000002 0000000000000003") + b"xyz")
    reader.feed(h.async_lock_info().encode())
    with pytest.raises(h.UnrecognizedMessage) as info:
        reader.next_message()
    assert info.value.error_code is code
    assert (info.value.header.type, info.value.header.control, info.value.header.length) == (mtype, 9, 3)
    assert reader.next_message() == h.async_lock_info()  # parsing resumes after the skipped payload


def test_size_payload_must_be_8_bytes() -> None:
    bad = h.Message(T.ASYNC_MAXIMUM_MESSAGE_SIZE_RESPONSE, 0, 0, b"\x00\x01")
    with pytest.raises(RemoteProtocolError):
        bad.size_value()


@pytest.mark.parametrize("build", [
    lambda: h.Message(T.DATA, 256, 0),
    lambda: h.Message(T.DATA, 0, 1 << 32),
    lambda: h.initialize("x" * 257),
    lambda: h.initialize("hislip\u00e9"),
    lambda: h.initialize("hislip0", vendor="xyz"),
    lambda: h.async_lock_request(0, "k" * 257),
    lambda: h.initialize_response(0x10000, False),
    lambda: h.data(-2, b""),
])
def test_local_misuse_is_a_local_protocol_error(build: object) -> None:
    with pytest.raises(LocalProtocolError):
        build()  # type: ignore[operator]


def test_message_id_arithmetic_wraps() -> None:
    assert h.next_message_id(0xFFFFFF00) == 0xFFFFFF02
    assert h.next_message_id(0xFFFFFFFE) == 0
    assert h.id_reached(0xFFFFFF04, 0xFFFFFF00) and h.id_reached(0x00000002, 0xFFFFFFFE)
    assert not h.id_reached(0xFFFFFF00, 0xFFFFFF02) and not h.id_reached(h.MESSAGE_ID_NONE_SENT, 0xFFFFFF00)
    assert h.id_reached(h.MESSAGE_ID_NONE_SENT, h.MESSAGE_ID_NONE_SENT)


def test_error_tables_have_meanings_and_statuses() -> None:
    assert h.describe_fatal_error(4) == "server refused connection: maximum number of clients exceeded"
    assert h.describe_fatal_error(200) == "device-defined fatal error"
    assert h.describe_fatal_error(50) == "reserved fatal error code"
    assert h.describe_error(4) == "message too large"
    assert h.describe_error(130) == "device-defined error"
    assert set(h.ERROR_STATUS) == set(h.ErrorCode)
    assert all(code.is_error for code in h.ERROR_STATUS.values())


def test_text_payloads_are_ascii_and_bounded() -> None:
    message = h.fatal_error(0, "x" * 1000)
    assert len(message.payload) == h.MAX_TEXT
    assert h.error(1, "caf\u00e9").payload == b"caf?"


def test_memoryview_payload_is_not_copied_into_the_message() -> None:
    big = bytearray(1 << 20)
    view = memoryview(big)[16:]
    message = h.data_end(0xFFFFFF00, view)
    assert message.payload is view
    assert message.header() == hx("4853 07 00 FFFFFF00 00000000000FFFF0")

"""Wire-protocol conformance: speak sdk/PROTOCOL.md with nothing but pyzmq + msgpack.

This is what a Node.js, C# or Go client has to get right, checked against a real `visabus serve`
(broker + raw-socket simulator + worker as subprocesses). Nothing from visabus.sdk is imported: status
codes, field names and framing are written out here exactly as the spec gives them, so a drift between
the spec and the broker fails this file.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import zmq

from tests.conftest import TEST_BROKER

pytestmark = pytest.mark.timeout(60)

CONFIG = TEST_BROKER + """
[[simulator]]
name = "dmm"
protocols = ["socket"]
"""
ALIAS = "dmm-socket"                  # the simulator section's name + "-" + protocol
IDENTITY = b"VISABUS,SIM-1,0001,1.0"  # the simulator's default *IDN? answer
VERSION = 1
LF = 0x0A
REPLY_WAIT_S = 5.0                    # upper bound for any single reply; never a synchronisation sleep
STARTUP_S = 20.0


def _signed(code: int) -> int:
    """VISA codes are signed 32-bit; the spec lists them in hex."""
    return code - (1 << 32) if code & 0x8000_0000 else code


VI_SUCCESS = 0
VI_SUCCESS_TERM_CHAR = 0x3FFF0005
VI_ERROR_RSRC_LOCKED = _signed(0xBFFF000F)
VI_ERROR_RSRC_NFOUND = _signed(0xBFFF0011)
VI_ERROR_INV_RSRC_NAME = _signed(0xBFFF0012)
VI_ERROR_INV_FMT = _signed(0xBFFF003F)
VI_ERROR_NSUP_OPER = _signed(0xBFFF0067)
VI_ERROR_INV_PARAMETER = _signed(0xBFFF0078)


def pack(header: Any) -> bytes:
    out: bytes = msgpack.packb(header, use_bin_type=True)
    return out


def unpack(frame: bytes) -> dict[str, Any]:
    header = msgpack.unpackb(frame, raw=False)
    assert isinstance(header, dict), f"frame 0 must be a msgpack map, got {header!r}"
    return header


class Wire:
    """A minimal client: one DEALER, one session id, integer request ids."""

    def __init__(self, ctx: zmq.Context, endpoint: str, sid: str | None = None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.sid = sid or secrets.token_hex(8)
        self._ids = itertools.count(1)

    def send(self, op: str, *data: bytes, id: Any = None, **fields: Any) -> Any:
        rid = next(self._ids) if id is None else id
        header = {"v": VERSION, "op": op, "id": rid, "sid": self.sid, **fields}
        self.sock.send_multipart([pack(header), *data])
        return rid

    def send_frames(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, wait_s: float = REPLY_WAIT_S) -> tuple[dict[str, Any], list[bytes]]:
        assert self.sock.poll(int(wait_s * 1000)), f"no message from the broker within {wait_s}s"
        frames = self.sock.recv_multipart()
        return unpack(frames[0]), frames[1:]

    def reply(self, rid: Any, wait_s: float = REPLY_WAIT_S) -> tuple[dict[str, Any], list[bytes]]:
        header, data = self.recv(wait_s)
        assert header.get("id") == rid, f"expected the reply to id {rid!r}, got {header!r}"
        assert header.get("v") == VERSION
        return header, data

    def request(self, op: str, *data: bytes, **fields: Any) -> tuple[dict[str, Any], list[bytes]]:
        rid = self.send(op, *data, **fields)
        header, frames = self.reply(rid)
        assert header["op"] == op, f"a reply echoes op: {header!r}"
        return header, frames

    def close(self) -> None:
        self.sock.close(linger=0)


class Events:
    """A SUB socket on the broker's events endpoint."""

    def __init__(self, ctx: zmq.Context, endpoint: str, *prefixes: bytes) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        for prefix in prefixes:
            self.sock.setsockopt(zmq.SUBSCRIBE, prefix)

    def confirm(self, client: Wire, deadline_s: float = 5.0) -> tuple[dict[str, Any], list[bytes]]:
        """The ping trick: publish a probe until it arrives, so the subscription is provably live."""
        token = secrets.token_hex(6)
        topic = f"ping.{token}".encode()
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        deadline = time.monotonic() + deadline_s
        try:
            while time.monotonic() < deadline:
                reply, _ = client.request("ping", token=token)
                assert reply["status"] == VI_SUCCESS, reply
                if self.sock.poll(100):  # waiting for the probe itself; no event, no confirmation
                    while self.sock.poll(0):
                        frames = self.sock.recv_multipart()
                        if frames[0] == topic:
                            return reply, frames
            raise AssertionError(f"the ping probe {topic!r} never arrived on the events socket")
        finally:
            self.sock.setsockopt(zmq.UNSUBSCRIBE, topic)

    def next(self, wanted: Callable[[bytes, dict[str, Any]], bool],
             wait_s: float = REPLY_WAIT_S) -> tuple[bytes, dict[str, Any]]:
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and self.sock.poll(int(left * 1000) + 1), "expected event did not arrive"
            frames = self.sock.recv_multipart()
            assert len(frames) == 2, f"an event is [topic, msgpack body], got {len(frames)} frames"
            topic, body = frames[0], unpack(frames[1])
            if topic.startswith(b"ping."):
                continue
            if wanted(topic, body):
                return topic, body

    def close(self) -> None:
        self.sock.close(linger=0)


@dataclass
class Bus:
    info: dict[str, Any]
    ctx: zmq.Context
    res: str = ""                       # canonical resource of the simulator's worker
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def client(self, sid: str | None = None, name: str | None = None) -> Wire:
        wire = Wire(self.ctx, self.info["frontend"], sid)
        self._closers.append(wire.close)
        hello, _ = wire.request("hello", **({"name": name} if name else {}))
        assert hello["status"] == VI_SUCCESS, hello
        return wire

    def events(self, *prefixes: bytes) -> Events:
        sub = Events(self.ctx, self.info["events"], *prefixes)
        self._closers.append(sub.close)
        return sub

    def close(self) -> None:
        for closer in reversed(self._closers):
            closer()


def _wait_ready(bus: Bus) -> str:
    """Return the canonical resource once the worker reports `ready` (driven by worker.* events)."""
    probe = bus.client()
    sub = bus.events(b"worker.")
    sub.confirm(probe)
    deadline = time.monotonic() + STARTUP_S
    while True:
        reply, _ = probe.request("list")
        rows = [r for r in reply["resources"] if r.get("alias") == ALIAS and r.get("source") == "worker"]
        if rows and rows[0]["state"] == "ready":
            return str(rows[0]["res"])
        left = deadline - time.monotonic()
        assert left > 0, f"worker for {ALIAS} never became ready: {reply['resources']}"
        if sub.sock.poll(int(min(left, 1.0) * 1000)):  # a worker.up / worker.state event: look again
            sub.sock.recv_multipart()


@pytest.fixture
def bus(serve: Callable[[str], Any]) -> Iterator[Bus]:
    proc = serve(CONFIG)
    ctx = zmq.Context()
    b = Bus(proc.info, ctx)
    try:
        b.res = _wait_ready(b)
        yield b
    finally:
        b.close()
        ctx.term()


def _query(client: Wire, res: str, command: bytes, **fields: Any) -> tuple[dict[str, Any], bytes]:
    """A non-streamed query: exactly one reply, data in its frames."""
    header, frames = client.request("query", command, res=res, term=LF, timeout_ms=3000, **fields)
    assert header["status"] >= 0, header
    assert header["more"] is False
    return header, b"".join(frames)


def _assert_error(header: dict[str, Any], code: int, name: str) -> None:
    assert header["status"] == code, header
    assert header["name"] == name, header
    assert isinstance(header["msg"], str) and header["msg"], header
    assert header["more"] is False, header


# ================================================================================================ tests
def test_hello_heartbeat_list_open_status(bus: Bus) -> None:
    client = Wire(bus.ctx, bus.info["frontend"])
    bus._closers.append(client.close)

    hello, frames = client.request("hello", name="conformance")
    assert frames == []
    assert hello["status"] == VI_SUCCESS and hello["version"] == VERSION
    assert hello["events"] == bus.info["events"]
    assert isinstance(hello["lease_ms"], int) and hello["lease_ms"] == 2000      # TEST_BROKER's lease_ms
    assert isinstance(hello["heartbeat_ms"], int) and hello["heartbeat_ms"] == 200

    beat, _ = client.request("heartbeat")
    assert beat["status"] == VI_SUCCESS

    listed, _ = client.request("list", pattern="TCPIP?*::SOCKET")
    rows = {r["res"]: r for r in listed["resources"]}
    assert rows[bus.res]["alias"] == ALIAS
    assert rows[bus.res] | {"state": "ready", "protocol": "socket", "source": "worker", "locked": False} == rows[bus.res]
    nothing, _ = client.request("list", pattern="VICP?*::INSTR")
    assert nothing["status"] == VI_SUCCESS and nothing["resources"] == []

    # open resolves an alias or any spelling of the resource to its canonical form
    by_alias, _ = client.request("open", res=ALIAS)
    by_spelling, _ = client.request("open", res=bus.info["resources"][ALIAS].lower())
    for opened in (by_alias, by_spelling):
        assert opened["status"] == VI_SUCCESS
        assert (opened["res"], opened["alias"], opened["protocol"]) == (bus.res, ALIAS, "socket")

    status, _ = client.request("status")
    row = next(r for r in status["resources"] if r["res"] == bus.res)
    assert isinstance(row["pid"], int) and row["busy"] is False and row["queue"] == 0
    assert status["endpoints"]["frontend"] == bus.info["frontend"]

    closed, _ = client.request("close", res=ALIAS)
    assert closed["status"] == VI_SUCCESS


def test_query_idn_is_one_reply_with_a_raw_data_frame(bus: Bus) -> None:
    client = bus.client()
    for res in (ALIAS, bus.res):
        header, data = _query(client, res, b"*IDN?\n")
        assert data == IDENTITY + b"\n"
        assert header["status"] == VI_SUCCESS_TERM_CHAR        # ended on the termination character
        assert header["count"] == len(data) and header["seq"] == 0 and header["end"] is True

    # write then read as two requests: the same bytes, and the data frame is never inside msgpack
    wid = client.send("write", b"ECHO? raw\xffbytes\n", res=ALIAS, timeout_ms=3000)
    written, frames = client.reply(wid)
    assert written["status"] == VI_SUCCESS and written["count"] == len(b"ECHO? raw\xffbytes\n") and frames == []
    got, frames = client.request("read", res=ALIAS, term=LF, timeout_ms=3000)
    assert got["status"] == VI_SUCCESS_TERM_CHAR and b"".join(frames) == b"raw\xffbytes\n"


def test_streamed_block_read_with_explicit_credit(bus: Bus) -> None:
    points = 3_000_000
    chunk = 1 << 20
    client = bus.client()
    command = f"WAV:POIN {points}\n".encode()
    written, _ = client.request("write", command, res=ALIAS, timeout_ms=3000)
    assert written["status"] == VI_SUCCESS and written["count"] == len(command)

    qid = client.send("query", b"WAV:DATA?\n", res=ALIAS, block=True, chunk=chunk, credit=1, timeout_ms=10_000)
    replies: list[dict[str, Any]] = []
    payload = bytearray()
    header, frames = client.reply(qid)
    while True:
        assert header["op"] == "query" and header["status"] >= 0, header
        assert len(frames) <= 1 and all(0 < len(f) <= chunk for f in frames)
        replies.append(header)
        payload += b"".join(frames)
        if not header["more"]:
            break
        if len(replies) == 1:
            # credit=1 was spent on this chunk: the worker must not send another until we return one
            assert not client.sock.poll(300), "the worker sent a chunk it had no credit for"
        client.send("credit", target=qid, n=1)       # fire-and-forget: no reply comes back for credit
        header, frames = client.reply(qid)

    seqs = [r["seq"] for r in replies]
    assert len(replies) >= 3 and seqs == list(range(len(replies))), seqs
    assert all(r["more"] is True for r in replies[:-1])
    assert all(r["total"] == points for r in replies), "every chunk announces the block length"
    final = replies[-1]
    assert final["status"] == VI_SUCCESS
    assert final["count"] == points and final["block_len"] == points and final["end"] is True
    # the block header (#7...) and trailing LF are stripped: only the payload, byte i == i mod 256
    assert len(payload) == points
    assert payload == (bytes(range(256)) * (points // 256 + 1))[:points]
    # and the instrument is free again: nothing left over from the block
    _, data = _query(client, ALIAS, b"*IDN?\n")
    assert data == IDENTITY + b"\n"


def test_error_replies(bus: Bus) -> None:
    client = bus.client()

    rid = client.send("query", b"*IDN?\n", res="TCPIP::192.0.2.1::INSTR", term=LF, timeout_ms=3000)
    header, _ = client.reply(rid)
    _assert_error(header, VI_ERROR_RSRC_NFOUND, "VI_ERROR_RSRC_NFOUND")
    assert header["op"] == "query" and "TCPIP0::192.0.2.1::inst0::INSTR" in header["msg"]
    opened, _ = client.request("open", res="no-such-alias")
    _assert_error(opened, VI_ERROR_INV_RSRC_NAME, "VI_ERROR_INV_RSRC_NAME")   # not an alias, not a resource
    opened, _ = client.request("open", res="TCPIP::192.0.2.1::5025::SOCKET")
    _assert_error(opened, VI_ERROR_RSRC_NFOUND, "VI_ERROR_RSRC_NFOUND")

    client.send_frames(pack({"v": 2, "op": "list", "id": 7001, "sid": client.sid}))
    header, _ = client.reply(7001)
    _assert_error(header, VI_ERROR_NSUP_OPER, "VI_ERROR_NSUP_OPER")
    assert header["op"] == "list" and "version" in header["msg"]
    client.send_frames(pack({"op": "list", "id": 7002}))                  # no `v` at all
    _assert_error(client.reply(7002)[0], VI_ERROR_NSUP_OPER, "VI_ERROR_NSUP_OPER")

    rid = client.send("frobnicate", res=ALIAS)
    header, _ = client.reply(rid)
    _assert_error(header, VI_ERROR_NSUP_OPER, "VI_ERROR_NSUP_OPER")
    assert header["op"] == "frobnicate" and "frobnicate" in header["msg"]

    for garbage in (b"\xc1not msgpack", pack([1, 2, 3]), pack({1: "int key"})):   # undecodable / not a str-keyed map
        client.send_frames(garbage)
        header, frames = client.recv()
        _assert_error(header, VI_ERROR_INV_FMT, "VI_ERROR_INV_FMT")
        assert header["id"] is None and header["op"] is None and frames == []

    rid = client.send("query", res=ALIAS)                                   # query needs its one data frame
    _assert_error(client.reply(rid)[0], VI_ERROR_INV_FMT, "VI_ERROR_INV_FMT")
    rid = client.send("read", res=ALIAS, count="ten")                        # wrong field type
    header, _ = client.reply(rid)
    _assert_error(header, VI_ERROR_INV_FMT, "VI_ERROR_INV_FMT")
    assert "count" in header["msg"]
    rid = client.send("query", b"*IDN?\n", res="bogus::thing")               # unparsable resource string
    _assert_error(client.reply(rid)[0], VI_ERROR_INV_RSRC_NAME, "VI_ERROR_INV_RSRC_NAME")

    # none of that poisoned the session
    _, data = _query(client, ALIAS, b"*IDN?\n")
    assert data == IDENTITY + b"\n"


def test_duplicate_request_id_is_rejected_not_executed(bus: Bus) -> None:
    client = bus.client()
    first, _ = client.request("write", b"VOLT 1.5\n", id=42, res=ALIAS, timeout_ms=3000)
    assert first["status"] == VI_SUCCESS

    again, _ = client.request("write", b"VOLT 2.5\n", id=42, res=ALIAS, timeout_ms=3000)
    _assert_error(again, VI_ERROR_INV_PARAMETER, "VI_ERROR_INV_PARAMETER")
    assert again["duplicate"] is True

    # the session is the `sid`, not the socket: a second socket of the same session is refused too
    other_socket = bus.client(sid=client.sid)
    again, _ = other_socket.request("write", b"VOLT 3.5\n", id=42, res=ALIAS, timeout_ms=3000)
    assert again["status"] == VI_ERROR_INV_PARAMETER and again["duplicate"] is True

    # a duplicate of a request still in flight is refused as well; the original runs once
    client.send("write", b"VOLT 4.5\n", id=43, res=ALIAS, timeout_ms=3000)
    client.send("write", b"VOLT 5.5\n", id=43, res=ALIAS, timeout_ms=3000)
    answers = sorted((client.reply(43)[0] for _ in range(2)), key=lambda h: h["status"])
    assert answers[0]["status"] == VI_ERROR_INV_PARAMETER and answers[0]["duplicate"] is True
    assert answers[1]["status"] == VI_SUCCESS

    # the instrument saw 1.5 then 4.5 and nothing else
    _, data = _query(client, ALIAS, b"VOLT?\n")
    assert data == b"4.5\n"

    # ids are per session: another client may use 42
    stranger = bus.client()
    _, data = _query(stranger, ALIAS, b"VOLT?\n", id=42)
    assert data == b"4.5\n"


def test_events_subscription_confirmed_with_ping(bus: Bus) -> None:
    owner = bus.client(name="conformance")
    sub = bus.events(b"lock.", b"client.gone")
    pong, frames = sub.confirm(owner)
    assert pong["status"] == VI_SUCCESS
    assert frames[0].startswith(b"ping.") and unpack(frames[1]) == {"ping": True}   # probes carry no seq

    topic = f"lock.{bus.res}".encode()
    locked, _ = owner.request("lock", res=ALIAS, exclusive=True, lock_timeout_ms=1000, timeout_ms=1000)
    assert locked["status"] == VI_SUCCESS and locked.get("key") is None          # exclusive: no key
    got_topic, acquired = sub.next(lambda t, b: t == topic)
    assert acquired["topic"] == got_topic.decode()
    assert acquired["action"] == "acquired" and acquired["exclusive"] is True
    assert acquired["holders"] == [f"conformance({owner.sid})"] and acquired["res"] == bus.res
    assert isinstance(acquired["seq"], int) and acquired["seq"] >= 1 and isinstance(acquired["ts"], float)

    # another session is kept out for its whole timeout
    rival = bus.client()
    rid = rival.send("query", b"*IDN?\n", res=ALIAS, term=LF, timeout_ms=300)
    _assert_error(rival.reply(rid)[0], VI_ERROR_RSRC_LOCKED, "VI_ERROR_RSRC_LOCKED")

    # bye ends the session at once: its lock is released (next seq on the topic) and client.gone follows
    bye, _ = owner.request("bye")
    assert bye["status"] == VI_SUCCESS
    _, released = sub.next(lambda t, b: t == topic)
    assert released["action"] == "released" and released["holders"] == []
    assert released["seq"] == acquired["seq"] + 1, "per-topic seq is contiguous when nothing was dropped"
    _, gone = sub.next(lambda t, b: t == b"client.gone")
    assert gone["client"] == owner.sid and gone["released"] == [bus.res] and gone["reason"] == "said goodbye"

    _, data = _query(rival, ALIAS, b"*IDN?\n")
    assert data == IDENTITY + b"\n"

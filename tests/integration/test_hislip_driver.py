"""HislipSession against the HiSLIP simulator running in a separate process, in both server modes.

The simulator is started with `python -c` (HislipServer on an ephemeral loopback port; it prints its
resource as one JSON line and exits when its stdin closes), once per module and mode. Failures the
simulator never produces (FatalError mid-session, a lying payload length, Error replies) come from
`ScriptedServer`, a tiny HiSLIP peer on a loopback socket in this process.
"""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ScriptChild
from visabus.sdk.errors import (
    Aborted,
    ConnectionLost,
    ResourceLocked,
    ResourceNotFound,
    StatusCode,
    VisaBusError,
    VisaTimeout,
)
from visabus.sdk.resources import parse_resource
from visabus.workers.protocols import hislip as h
from visabus.workers.sessions.base import SessionAttributes
from visabus.workers.sessions.hislip import HislipSession
from visabus.workers.sessions.hislip_io import recv_message_blocking

IDENTITY = "VISABUS,HISLIP-SIM,0042,1.0"
BLOCK = 64 << 20

_SIM = """
import json, logging, sys
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                    wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
from visabus.sim.scpi import Instrument
from visabus.sim.hislip_server import HislipServer
server = HislipServer(Instrument(identity=sys.argv[1]), "127.0.0.1", 0,
                      prefer_overlap=sys.argv[2] == "overlap", max_message_size=int(sys.argv[3])).start()
print(json.dumps({"hislip": server.resource, "port": server.port}), flush=True)
sys.stdin.read()
server.stop()
"""


class Simulator(ScriptChild):
    """The HiSLIP simulator as a child process; stopped by closing its stdin, killed if it lingers."""

    def __init__(self, log_path: Path, mode: str, max_message_size: int = 1 << 20) -> None:
        super().__init__(_SIM, [IDENTITY, mode, str(max_message_size)], log_path, "HiSLIP simulator")
        self.mode = mode
        self.resource: str = self.info["hislip"]
        self.port: int = self.info["port"]


@pytest.fixture(scope="module", params=["sync", "overlap"])
def sim(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    simulator = Simulator(tmp_path_factory.mktemp("hislip") / "sim.log", request.param)
    yield simulator
    simulator.stop()


Opener = Callable[..., HislipSession]


@pytest.fixture
def open_session(sim: Simulator) -> Iterator[Opener]:
    opened: list[HislipSession] = []

    def open_(resource: str | None = None, timeout: float = 5.0, **extra: object) -> HislipSession:
        session = HislipSession(parse_resource(resource or sim.resource), SessionAttributes(timeout=timeout,
                                                                                           extra=dict(extra)))
        session.open(timeout)
        opened.append(session)
        return session

    yield open_
    for session in opened:
        session.close()


def query(session: HislipSession, command: str, size: int = 4096, timeout: float = 5.0) -> bytes:
    session.write(command.encode() + b"\n", timeout)
    buffer = bytearray(size)
    n, end = session.read_into(memoryview(buffer), timeout, None)
    assert end, f"{command!r}: response longer than {size} bytes"
    return bytes(buffer[:n])


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


# ------------------------------------------------------------------------------------ basic I/O
def test_open_and_query(sim: Simulator, open_session: Opener) -> None:
    session = open_session()
    assert session.connected
    assert session.overlapped is (sim.mode == "overlap")  # the client follows the server's preference
    assert query(session, "*IDN?") == IDENTITY.encode() + b"\n"
    assert query(session, "ECHO? hello") == b"hello\n"


def test_block_of_64_mib_through_messages_smaller_than_the_block(open_session: Opener) -> None:
    session = open_session(timeout=30.0)
    assert session.server_max_message_size < BLOCK
    session.write(f"WAV:POIN {BLOCK}\n".encode(), 5)
    try:
        header = f"#{len(str(BLOCK))}{BLOCK}".encode()
        buffer = bytearray(len(header) + BLOCK + 1)
        view = memoryview(buffer)
        for _ in range(2):  # the first round also makes the simulator build its cached block
            start = time.perf_counter()
            session.write(b"WAV:DATA?\n", 5)
            n, end = 0, False
            while not end:
                k, end = session.read_into(view[n:], 30, None)
                n += k
            elapsed = time.perf_counter() - start
        assert n == len(buffer) and buffer[-1:] == b"\n"
        assert view[: len(header)] == header
        assert view[len(header) : len(header) + BLOCK] == bytes(range(256)) * (BLOCK // 256)
        rate = BLOCK / elapsed
        print(f"64 MiB HiSLIP block: {rate / 1e9:.2f} GB/s")
        assert rate > 50e6, "far too slow: look for quadratic copying"
    finally:
        session.write(b"WAV:POIN 1000\n", 5)


def test_small_read_buffer_returns_pieces_then_end(open_session: Opener) -> None:
    session = open_session()
    session.write(b"ECHO? abcdefghij\n", 5)
    pieces = []
    end = False
    while not end:
        buffer = bytearray(4)
        n, end = session.read_into(memoryview(buffer), 5, None)
        pieces.append(bytes(buffer[:n]))
    assert pieces == [b"abcd", b"efgh", b"ij\n"]


def test_term_char_ends_a_read_and_keeps_the_rest(open_session: Opener) -> None:
    session = open_session()
    session.write(b"ECHO? ab,cd\n", 5)
    buffer = bytearray(64)
    n, end = session.read_into(memoryview(buffer), 5, ord(","))
    assert (bytes(buffer[:n]), end) == (b"ab,", True)
    n, end = session.read_into(memoryview(buffer), 5, ord(","))
    assert (bytes(buffer[:n]), end) == (b"cd\n", True)


def test_pipelined_queries(sim: Simulator, open_session: Opener) -> None:
    session = open_session()
    for word in ("one", "two", "three"):
        session.write(f"ECHO? {word}\n".encode(), 5)
    replies = []
    buffer = bytearray(64)
    for _ in range(3 if session.overlapped else 1):
        n, end = session.read_into(memoryview(buffer), 5, None)
        assert end
        replies.append(bytes(buffer[:n]))
    if session.overlapped:  # overlapped: every response, in order
        assert replies == [b"one\n", b"two\n", b"three\n"]
    else:  # synchronized: newer messages interrupt older queries; only the newest answer is delivered
        assert replies == [b"three\n"]
    assert query(session, "*IDN?").startswith(b"VISABUS")


def test_read_timeout_then_next_query_is_not_poisoned(open_session: Opener) -> None:
    session = open_session()
    session.write(b"SLOW? 400\n", 5)
    with pytest.raises(VisaTimeout):
        session.read_into(memoryview(bytearray(64)), 0.1, None)
    if session.overlapped:
        session.clear()  # overlapped responses are not matched to queries: clear drops the late one
    assert query(session, "ECHO? fresh") == b"fresh\n"


# ------------------------------------------------------------------------------------ clear, stb, trigger
def test_clear_during_a_blocked_read(open_session: Opener) -> None:
    session = open_session(timeout=10.0)
    session.write(b"SLOW? 5000\n", 5)
    outcome: list[BaseException | tuple[int, bool]] = []

    def reader() -> None:
        try:
            outcome.append(session.read_into(memoryview(bytearray(64)), 10, None))
        except VisaBusError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    wait_until(lambda: session._sync_lock.locked())  # the reader is inside read_into
    start = time.monotonic()
    session.clear()
    thread.join(5)
    assert not thread.is_alive() and isinstance(outcome[0], Aborted)
    assert time.monotonic() - start < 2.0, "clear waited for the slow response"
    assert query(session, "ECHO? after") == b"after\n"


def test_clear_drains_a_response_already_in_flight(open_session: Opener) -> None:
    session = open_session()
    session.write(b"WAV:POIN 4000000\n", 5)
    try:
        session.write(b"WAV:DATA?\n", 5)
        n, end = session.read_into(memoryview(bytearray(1024)), 5, None)  # the block is on its way
        assert (n, end) == (1024, False)
        session.clear()
        assert query(session, "ECHO? clean") == b"clean\n"
    finally:
        session.write(b"WAV:POIN 1000\n", 5)


def test_clear_between_write_and_read_aborts_the_operation(open_session: Opener) -> None:
    session = open_session()
    session.begin()  # the worker starts a query operation
    session.write(b"ECHO? lost\n", 5)
    session.clear()  # lands before the operation's read
    with pytest.raises(Aborted):
        session.read_into(memoryview(bytearray(64)), 5, None)
    session.begin()  # the next operation is unaffected
    assert query(session, "ECHO? next") == b"next\n"


def test_read_stb_reports_mav_until_the_response_is_read(open_session: Opener) -> None:
    session = open_session()
    assert session.read_stb() & 0x10 == 0
    session.write(b"ECHO? 0123456789\n", 5)
    buffer = bytearray(4)
    n, end = session.read_into(memoryview(buffer), 5, None)  # response started: it is on its way
    assert (n, end) == (4, False)
    assert session.read_stb() & 0x10
    rest = bytearray(64)
    n, end = session.read_into(memoryview(rest), 5, None)
    assert end and bytes(buffer) + bytes(rest[:n]) == b"0123456789\n"
    assert session.read_stb() & 0x10 == 0
    session.write(b"*ESE 1;*OPC\n", 5)
    assert query(session, "*OPC?") == b"1\n"
    assert session.read_stb() & 0x20  # ESB, as the SCPI engine computes it


def test_trigger_keeps_message_ids_in_step(open_session: Opener) -> None:
    session = open_session()
    session.trigger()
    session.trigger()
    assert query(session, "ECHO? triggered") == b"triggered\n"


def test_remote_and_local(open_session: Opener) -> None:
    session = open_session()
    session.remote()
    session.local()
    assert query(session, "*IDN?").startswith(b"VISABUS")


def test_srq_reaches_the_handler(open_session: Opener) -> None:
    session = open_session()
    got: list[int] = []
    arrived = threading.Event()

    def handler(stb: int) -> None:
        got.append(stb)
        arrived.set()

    session.enable_srq(handler)
    session.write(b"SRQ 100\n", 5)
    assert arrived.wait(5), "no AsyncServiceRequest reached the handler"
    assert got[0] & 0x40
    assert session.read_stb() & 0x40  # the status query reads and clears RQS...
    assert session.read_stb() & 0x40 == 0
    assert query(session, "*IDN?").startswith(b"VISABUS")  # ...and the async channel stays in step


# ------------------------------------------------------------------------------------ locks
def test_exclusive_lock_between_two_sessions(open_session: Opener) -> None:
    a, b = open_session(), open_session()
    a.lock(True, 1.0)
    try:
        assert b.lock_info() == (True, 1)
        with pytest.raises(ResourceLocked):
            b.lock(True, 0)
        with pytest.raises(VisaTimeout):
            b.lock(True, 0.2)
        b.write(b"ECHO? held\n", 5)  # kept unread by the server while a holds the lock
        with pytest.raises(VisaTimeout):
            b.read_into(memoryview(bytearray(64)), 0.3, None)
        assert query(a, "ECHO? mine") == b"mine\n"
    finally:
        a.unlock()
    buffer = bytearray(64)
    n, end = b.read_into(memoryview(buffer), 5, None)
    assert (bytes(buffer[:n]), end) == (b"held\n", True)
    b.lock(True, 1.0)
    assert a.lock_info() == (True, 1)
    b.unlock()
    assert a.lock_info() == (False, 0)


def test_waiting_lock_is_granted_when_the_holder_closes(open_session: Opener) -> None:
    a, b = open_session(), open_session()
    a.lock(True, 1.0)
    result: list[BaseException | None] = []

    def take() -> None:
        try:
            b.lock(True, 5.0)
            result.append(None)
        except VisaBusError as exc:
            result.append(exc)

    thread = threading.Thread(target=take)
    thread.start()
    a.close()
    thread.join(6)
    assert result == [None]
    assert b.lock_info() == (True, 1)
    b.unlock()


def test_shared_locks_between_sessions(open_session: Opener) -> None:
    a = open_session(lock_key="bench-7")
    b = open_session()
    c = open_session()
    a.lock(False, 1.0)  # shared, key from attributes.extra["lock_key"]
    b.lock_shared("bench-7", 1.0)
    try:
        assert c.lock_info() == (False, 2)
        with pytest.raises(ResourceLocked):
            c.lock_shared("other", 0)
        with pytest.raises(ResourceLocked):
            c.lock(True, 0)
        a.lock(True, 1.0)  # a shared holder may add the exclusive lock
        assert c.lock_info() == (True, 2)
        a.unlock()  # releases the exclusive lock first
        assert c.lock_info() == (False, 2)
        assert query(b, "ECHO? shared") == b"shared\n"
    finally:
        a.unlock()
        b.unlock()
    assert c.lock_info() == (False, 0)


def test_clear_aborts_a_write_held_back_by_another_sessions_lock(open_session: Opener) -> None:
    a, b = open_session(), open_session(timeout=10.0)
    a.lock(True, 1.0)
    outcome: list[BaseException | None] = []
    payload = b"ECHO? " + b"x" * (32 << 20) + b"\n"  # far more than the socket buffers hold

    def writer() -> None:
        try:
            b.write(payload, 10)
            outcome.append(None)
        except VisaBusError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=writer)
    try:
        thread.start()
        wait_until(lambda: b._sync_lock.locked())  # the write is under way (the server holds it back)
        b.clear()  # the server drops the held input; the cut-off message is completed with filler
        thread.join(5)
        assert not thread.is_alive() and isinstance(outcome[0], Aborted)
    finally:
        a.unlock()
    assert query(b, "ECHO? ok") == b"ok\n"


def test_operations_on_a_session_that_is_not_open() -> None:
    session = HislipSession(parse_resource("TCPIP::127.0.0.1::hislip0,1::INSTR"))
    assert not session.connected
    for call in (session.read_stb, session.trigger, session.lock_info, lambda: session.write(b"x", 1)):
        with pytest.raises(ConnectionLost):
            call()
    session.close()  # harmless


def test_nested_lock_and_unlock_without_lock(open_session: Opener) -> None:
    session = open_session()
    session.lock(True, 1.0)
    session.lock(True, 1.0)
    session.unlock()
    assert session.lock_info() == (True, 1)
    session.unlock()
    assert session.lock_info() == (False, 0)
    with pytest.raises(VisaBusError) as info:
        session.unlock()
    assert info.value.code is StatusCode.VI_ERROR_SESN_NLOCKED


# ------------------------------------------------------------------------------------ attributes, errors
def test_smaller_max_message_size_still_moves_a_block(open_session: Opener) -> None:
    session = open_session()
    session.set_attribute("max_message_kb", 1)
    session.set_attribute("keepalive", True)
    session.write(b"WAV:POIN 100000\n", 5)
    try:
        session.write(b"WAV:DATA?\n", 5)
        buffer = bytearray(200_000)
        n, end = 0, False
        while not end:
            k, end = session.read_into(memoryview(buffer)[n:], 5, None)
            n += k
        assert bytes(buffer[:n]) == b"#6100000" + bytes(i % 256 for i in range(100_000)) + b"\n"
    finally:
        session.write(b"WAV:POIN 1000\n", 5)


def test_unknown_sub_address_is_resource_not_found(sim: Simulator, open_session: Opener) -> None:
    with pytest.raises(ResourceNotFound, match="hislip7"):
        open_session(sim.resource.replace("hislip0", "hislip7"))


def test_other_sub_addresses_are_separate_instruments(sim: Simulator, open_session: Opener) -> None:
    first = open_session()
    second = open_session(sim.resource.replace("hislip0", "hislip2"))
    second.write(b"VOLT 4.5\n", 5)
    assert query(second, "VOLT?") == b"4.5\n"
    assert query(first, "VOLT?") == b"0.0\n"


def test_refused_connection_is_resource_not_found() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    session = HislipSession(parse_resource(f"TCPIP::127.0.0.1::hislip0,{port}::INSTR"))
    with pytest.raises(ResourceNotFound, match="cannot connect"):
        session.open(2.0)


# ------------------------------------------------------------------------------------ simulator robustness
def _raw(sim: Simulator) -> socket.socket:
    return socket.create_connection(("127.0.0.1", sim.port), timeout=5)


def test_simulator_survives_a_probe_that_closes_after_initialize(sim: Simulator, open_session: Opener) -> None:
    for _ in range(3):
        with _raw(sim) as probe:
            probe.sendall(h.initialize("hislip0", "xx").encode())
            reply = recv_message_blocking(probe, time.monotonic() + 5, 4096, "probe")
            assert reply.type is h.MessageType.INITIALIZE_RESPONSE
    assert query(open_session(), "*IDN?") == IDENTITY.encode() + b"\n"


def test_simulator_answers_garbage_with_fatal_error(sim: Simulator) -> None:
    with _raw(sim) as peer:
        peer.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reply = recv_message_blocking(peer, time.monotonic() + 5, 4096, "garbage")
        assert reply.type is h.MessageType.FATAL_ERROR
        assert reply.control == h.FatalErrorCode.POORLY_FORMED_HEADER
        assert peer.recv(1) == b""  # and closes


def test_simulator_answers_vendor_messages_with_error_3(sim: Simulator) -> None:
    deadline = time.monotonic() + 5
    with _raw(sim) as sync, _raw(sim) as asyn:
        sync.sendall(h.initialize("hislip1", "xx").encode())
        session_id = recv_message_blocking(sync, deadline, 4096, "sync").low16
        asyn.sendall(h.async_initialize(session_id).encode())
        assert recv_message_blocking(asyn, deadline, 4096, "async").type is h.MessageType.ASYNC_INITIALIZE_RESPONSE
        asyn.sendall(h.encode_header(200, 1, 2, 3) + b"abc" + h.async_lock_info().encode())
        error = recv_message_blocking(asyn, deadline, 4096, "async")
        assert (error.type, error.control) == (h.MessageType.ERROR, h.ErrorCode.UNRECOGNIZED_VENDOR_MESSAGE)
        info = recv_message_blocking(asyn, deadline, 4096, "async")
        assert info.type is h.MessageType.ASYNC_LOCK_INFO_RESPONSE  # the channel is still in step


# ------------------------------------------------------------------------------------ scripted server faults
class ScriptedServer:
    """A minimal HiSLIP peer: does the handshake, then hands each sync message to `script`."""

    def __init__(self, script: Callable[[socket.socket, h.Message], None]) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            sync, _ = self.listener.accept()
            self.sockets.append(sync)
            recv_message_blocking(sync, None, 4096, "scripted")
            sync.sendall(h.initialize_response(1, False).encode())
            asyn, _ = self.listener.accept()
            self.sockets.append(asyn)
            recv_message_blocking(asyn, None, 4096, "scripted")
            asyn.sendall(h.async_initialize_response("SC").encode())
            recv_message_blocking(asyn, None, 4096, "scripted")
            asyn.sendall(h.async_maximum_message_size_response(1 << 20).encode())
            while True:
                self.script(sync, recv_message_blocking(sync, None, 1 << 20, "scripted"))
        except (OSError, VisaBusError):
            return

    @property
    def resource(self) -> str:
        return f"TCPIP::127.0.0.1::hislip0,{self.port}::INSTR"

    def close(self) -> None:
        for sock in [self.listener, *self.sockets]:
            sock.close()
        self.thread.join(2)


@pytest.fixture
def scripted() -> Iterator[Callable[[Callable[[socket.socket, h.Message], None]], HislipSession]]:
    servers: list[ScriptedServer] = []
    sessions: list[HislipSession] = []

    def start(script: Callable[[socket.socket, h.Message], None]) -> HislipSession:
        server = ScriptedServer(script)
        servers.append(server)
        session = HislipSession(parse_resource(server.resource), SessionAttributes(timeout=3.0))
        session.open(3.0)
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        session.close()
    for server in servers:
        server.close()


def test_fatal_error_is_connection_lost_with_the_server_message(scripted: Callable[..., HislipSession]) -> None:
    def script(sync: socket.socket, message: h.Message) -> None:
        sync.sendall(h.fatal_error(200, "scripted meltdown").encode())
        sync.close()

    session = scripted(script)
    session.write(b"*IDN?\n", 3)
    with pytest.raises(ConnectionLost, match="scripted meltdown"):
        session.read_into(memoryview(bytearray(64)), 3, None)
    with pytest.raises(ConnectionLost):
        session.write(b"*IDN?\n", 3)
    assert not session.connected


def test_lying_length_is_refused_without_allocating_it(scripted: Callable[..., HislipSession]) -> None:
    def script(sync: socket.socket, message: h.Message) -> None:
        sync.sendall(h.encode_header(h.MessageType.DATA_END, 0, message.message_id, 1 << 40))

    session = scripted(script)
    session.write(b"*IDN?\n", 3)
    tracemalloc.start()
    try:
        with pytest.raises(ConnectionLost, match="payload"):
            session.read_into(memoryview(bytearray(64)), 3, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_error_reply_maps_to_a_visa_status_and_the_session_goes_on(scripted: Callable[..., HislipSession]) -> None:
    replies = iter([h.error(h.ErrorCode.UNRECOGNIZED_CONTROL_CODE, "bad control"), None])

    def script(sync: socket.socket, message: h.Message) -> None:
        reply = next(replies, None)
        sync.sendall((reply or h.data_end(message.message_id, b"ok\n")).encode())

    session = scripted(script)
    session.write(b"FIRST\n", 3)
    with pytest.raises(VisaBusError, match="bad control") as info:
        session.read_into(memoryview(bytearray(64)), 3, None)
    assert info.value.code is StatusCode.VI_ERROR_INV_PARAMETER
    session.write(b"SECOND\n", 3)
    buffer = bytearray(64)
    n, end = session.read_into(memoryview(buffer), 3, None)
    assert (bytes(buffer[:n]), end) == (b"ok\n", True)

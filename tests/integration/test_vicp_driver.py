"""VicpSession against the VICP simulator running in a separate process, plus scripted peers for faults.

The simulator is started with `python -c` (VicpServer on an ephemeral loopback port; it prints its
resource as one JSON line and exits when its stdin closes). Faults the simulator never makes (lying
lengths, half blocks, a peer that stops reading, a v1 peer) come from `ScriptedPeer`, a socket in this
process. Tests named `test_pyvicp_*` show the pyvicp 1.1.0 defect each workaround exists for.
"""

from __future__ import annotations

import json
import os
import queue
import selectors
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import pyvicp

from tests.conftest import ScriptChild
from visabus.sdk.errors import Aborted, ConnectionLost, IOFailure, ResourceNotFound, VisaBusError, VisaTimeout
from visabus.sdk.resources import parse_resource
from visabus.workers.protocols.vicp import HEADER_SIZE, Header, Op, encode_header
from visabus.workers.sessions.base import SessionAttributes
from visabus.workers.sessions.vicp import VicpSession

IDENTITY = "LECROY,WAVERUNNER-SIM,LCRY0001,9.0"
BLOCK_POINTS = 64 << 20
PYVICP_DEFECTS = pyvicp.__version__ == "1.1.0"  # the version whose defects the workarounds were written for

_SIM = """
import json, logging, sys
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                    wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
from visabus.sim.scpi import Instrument
from visabus.sim.vicp_server import VicpServer
server = VicpServer(Instrument(identity=sys.argv[1]), host=sys.argv[2], port=int(sys.argv[3])).start()
print(json.dumps({"vicp": server.resource, "port": server.port}), flush=True)
sys.stdin.read()
"""


class Simulator(ScriptChild):
    """The VICP simulator as a child process; stopped by closing its stdin, killed if it lingers."""

    def __init__(self, log_path: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(_SIM, [IDENTITY, host, str(port)], log_path, "VICP simulator", timeout=20)
        self.resource: str = self.info["vicp"]
        self.port: int = self.info["port"]

@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    s = Simulator(tmp_path_factory.mktemp("vicp") / "sim.log")
    yield s
    s.stop()


@pytest.fixture
def own_sim(tmp_path: Path) -> Iterator[Simulator]:
    """A simulator this test may kill."""
    s = Simulator(tmp_path / "sim.log")
    yield s
    s.stop()


def _open(resource: str, **attrs: object) -> VicpSession:
    session = VicpSession(parse_resource(resource), SessionAttributes(**attrs))  # type: ignore[arg-type]
    session.open(5)
    return session


@pytest.fixture
def session(sim: Simulator) -> Iterator[VicpSession]:
    s = _open(sim.resource)
    yield s
    s.close()


def query(session: VicpSession, command: bytes, size: int = 4096, timeout: float = 5) -> bytes:
    session.write(command, timeout)
    buf = bytearray(size)
    n, end = session.read_into(memoryview(buf), timeout, None)
    assert end, f"{command!r}: message did not end within {size} bytes"
    return bytes(buf[:n])


def _signal_when_waiting(session: VicpSession) -> threading.Event:
    """An event set when the session's I/O starts waiting for the wire (so the test knows a read is blocked)."""
    entered = threading.Event()
    original = session._wait

    def spy(*args: object) -> int:
        entered.set()
        return original(*args)  # type: ignore[arg-type]

    session._wait = spy  # type: ignore[method-assign]
    return entered


def _read_in_thread(session: VicpSession, timeout: float) -> tuple[threading.Thread, queue.Queue[object]]:
    results: queue.Queue[object] = queue.Queue()

    def run() -> None:
        started = time.monotonic()
        try:
            buf = bytearray(100)
            n, end = session.read_into(memoryview(buf), timeout, None)
            results.put((bytes(buf[:n]), end))
        except VisaBusError as exc:  # handed to the test thread
            results.put(exc)
        results.put(time.monotonic() - started)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, results


# ------------------------------------------------------------------ basics against the simulator
def test_query_returns_lecroy_identity_with_eoi(session: VicpSession, sim: Simulator) -> None:
    assert sim.port != 1861 and session.resource.transport_port == sim.port   # port override honoured
    assert query(session, b"*IDN?") == IDENTITY.encode() + b"\n"
    assert query(session, b"VOLT 1.5;VOLT?") == b"1.5\n"


def test_64_mib_block_lands_in_the_callers_buffer(session: VicpSession) -> None:
    session.write(b"WAV:POIN %d" % BLOCK_POINTS, 5)
    assert query(session, b"WAV:POIN?") == b"%d\n" % BLOCK_POINTS
    prefix = b"#8%d" % BLOCK_POINTS
    buf = bytearray(len(prefix) + BLOCK_POINTS + 1)
    started = time.monotonic()
    session.write(b"WAV:DATA?", 5)
    n, end = session.read_into(memoryview(buf), 20, None)
    elapsed = time.monotonic() - started
    assert (n, end) == (len(buf), True)
    assert buf[: len(prefix)] == prefix and buf[-1:] == b"\n"
    assert memoryview(buf)[len(prefix) : -1] == bytes(range(256)) * (BLOCK_POINTS // 256)
    assert elapsed < 10, f"64 MiB took {elapsed:.1f}s"
    # The same block again, read in 1 MiB pieces: message boundaries survive partial reads.
    session.write(b"WAV:DATA?", 5)
    piece = memoryview(bytearray(1 << 20))
    total, end = 0, False
    while not end:
        n, end = session.read_into(piece, 20, None)
        total += n
    assert total == len(buf)
    session.write(b"WAV:POIN 1000", 5)


def test_termination_character_splits_a_message_and_keeps_the_rest(session: VicpSession) -> None:
    session.write(b"ECHO? one\ntwo", 5)
    buf = bytearray(64)
    n, end = session.read_into(memoryview(buf), 5, 0x0A)
    assert (bytes(buf[:n]), end) == (b"one\n", True)
    n, end = session.read_into(memoryview(buf), 5, 0x0A)
    assert (bytes(buf[:n]), end) == (b"two\n", True)


def test_timeout_then_stale_answer_is_discarded(session: VicpSession) -> None:
    session.write(b"SLOW? 300", 5)
    with pytest.raises(VisaTimeout):
        session.read_into(memoryview(bytearray(64)), 0.05, None)
    # The late "1" (tagged with the old sequence number) arrives first and must be dropped.
    assert query(session, b"ECHO? fresh") == b"fresh\n"


def test_serial_poll_out_of_band_repeatedly_and_in_band(session: VicpSession) -> None:
    assert query(session, b"*IDN?").startswith(b"LECROY")   # sequence numbers seen: v1a peer
    assert [session.read_stb() for _ in range(20)] == [0] * 20
    session.write(b"SLOW? 2000", 5)
    assert session.read_stb() & 0x10                      # MAV: a response is queued
    session.attributes.extra["vicp_serial_poll"] = "inband"
    session.clear()
    assert session.read_stb() & 0x10 == 0
    session.attributes.extra["vicp_serial_poll"] = "oob"
    assert session.read_stb() == 0
    assert query(session, b"*OPC?") == b"1\n"


def test_srq_reaches_the_handler_with_the_status_byte(session: VicpSession) -> None:
    got: queue.Queue[int] = queue.Queue()
    session.enable_srq(got.put)
    session.write(b"SRQ 20", 5)
    assert got.get(timeout=5) & 0x40                       # idle session: the monitor saw it
    session.write(b"SRQ 10;SLOW? 300", 5)                  # SRQ arrives while a read is blocked
    buf = bytearray(16)
    assert session.read_into(memoryview(buf), 5, None) == (2, True)
    assert got.get(timeout=5) & 0x40
    session.enable_srq(None)
    assert query(session, b"*IDN?").startswith(b"LECROY")


def test_keepalive_and_nodelay_via_set_attribute(session: VicpSession) -> None:
    sock = session._sock
    assert sock is not None
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    session.set_attribute("keepalive", True)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    session.set_attribute("nodelay", False)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0


def test_refused_connection_is_resource_not_found() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]   # bound, never listening: connecting is refused
        session = VicpSession(parse_resource(f"VICP::127.0.0.1,{port}::INSTR"))
        with pytest.raises(ResourceNotFound, match=str(port)):
            session.open(2)
    assert not session.connected


def test_visabus_sim_cli_serves_vicp(tmp_path: Path) -> None:
    """The same server through the real entry point: `visabus sim --vicp 0 --json`."""
    with open(tmp_path / "cli.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "visabus.sdk.cli", "sim", "--vicp", "0", "--identity", IDENTITY, "--json"],
            stdout=subprocess.PIPE, stderr=log, env={**os.environ, "VISABUS_LOG_LEVEL": "WARNING"},
        )
        try:
            assert proc.stdout is not None
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                assert sel.select(20), (tmp_path / "cli.log").read_text()
            resource = json.loads(proc.stdout.readline())["vicp"]
            assert resource.startswith("VICP::127.0.0.1,")
            session = _open(resource)
            try:
                assert query(session, b"*IDN?") == IDENTITY.encode() + b"\n"
            finally:
                session.close()
            proc.terminate()
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


# ------------------------------------------------------------------ clear and abort
def test_clear_unblocks_a_blocked_read_and_drops_its_answer(session: VicpSession) -> None:
    session.write(b"SLOW? 5000", 5)
    waiting = _signal_when_waiting(session)
    thread, results = _read_in_thread(session, timeout=10)
    assert waiting.wait(5)
    session.clear()
    outcome, elapsed = results.get(timeout=5), results.get(timeout=5)
    thread.join(5)
    assert isinstance(outcome, Aborted)
    assert isinstance(elapsed, float) and elapsed < 2
    assert query(session, b"ECHO? after clear") == b"after clear\n"


def test_abort_unblocks_without_clearing(session: VicpSession) -> None:
    session.write(b"SLOW? 300", 5)
    waiting = _signal_when_waiting(session)
    thread, results = _read_in_thread(session, timeout=10)
    assert waiting.wait(5)
    session.abort()
    assert isinstance(results.get(timeout=5), Aborted)
    thread.join(5)
    buf = bytearray(16)
    assert session.read_into(memoryview(buf), 5, None) == (2, True) and buf[:2] == b"1\n"  # answer kept


def test_clear_between_calls_ends_the_workers_operation(session: VicpSession) -> None:
    session.begin()                                        # what the worker does per operation
    session.write(b"SLOW? 200", 5)
    session.clear()                                        # e.g. the control thread, between two calls
    with pytest.raises(Aborted, match="ended this operation"):
        session.read_into(memoryview(bytearray(16)), 5, None)
    session.begin()                                        # the next operation is unaffected
    assert query(session, b"ECHO? next") == b"next\n"


def test_clear_in_the_middle_of_a_64_mib_block(session: VicpSession) -> None:
    session.write(b"WAV:POIN %d" % BLOCK_POINTS, 5)
    session.write(b"WAV:DATA?", 5)
    n, end = session.read_into(memoryview(bytearray(1 << 20)), 10, None)
    assert (n, end) == (1 << 20, False)
    session.clear()                                        # the other 63 MiB are stale now
    assert query(session, b"*IDN?") == IDENTITY.encode() + b"\n"
    session.write(b"WAV:POIN 1000", 5)


def test_clear_before_any_response_is_prompt(sim: Simulator) -> None:
    """pyvicp sleeps 100 s here (no sequence numbers seen yet); we just send CLEAR."""
    session = _open(sim.resource)
    try:
        started = time.monotonic()
        session.clear()
        assert time.monotonic() - started < 2
        assert query(session, b"*IDN?").startswith(b"LECROY")
    finally:
        session.close()


def test_peer_exit_during_a_blocked_read_is_connection_lost(own_sim: Simulator) -> None:
    """pyvicp spins forever when recv returns 0; we report the lost connection at once."""
    session = _open(own_sim.resource)
    try:
        session.write(b"SLOW? 5000", 5)
        waiting = _signal_when_waiting(session)
        thread, results = _read_in_thread(session, timeout=10)
        assert waiting.wait(5)
        own_sim.proc.kill()
        outcome, elapsed = results.get(timeout=5), results.get(timeout=5)
        thread.join(5)
        assert isinstance(outcome, ConnectionLost), outcome
        assert isinstance(elapsed, float) and elapsed < 3
        assert not session.connected
        with pytest.raises(ConnectionLost):
            session.write(b"*IDN?", 1)
    finally:
        session.close()


# ------------------------------------------------------------------ scripted peers for the faults
class ScriptedPeer:
    """A VICP 'instrument' in this process whose every byte the test writes by hand."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.resource = f"VICP::127.0.0.1,{self.port}::INSTR"
        self.conns: list[socket.socket] = []

    def accept(self, timeout: float = 5) -> socket.socket:
        self.listener.settimeout(timeout)
        conn, _ = self.listener.accept()
        conn.settimeout(timeout)
        self.conns.append(conn)
        return conn

    @staticmethod
    def read_block(conn: socket.socket) -> tuple[Header, bytes]:
        header = Header.decode(_recv_exact(conn, HEADER_SIZE))
        return header, _recv_exact(conn, header.length)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.listener.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("client closed")
        data += chunk
    return bytes(data)


def _closed_by_peer(conn: socket.socket) -> bool:
    """Read (and drop) whatever the client sent until its close shows up as EOF or reset."""
    try:
        while conn.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.fixture
def peer() -> Iterator[ScriptedPeer]:
    p = ScriptedPeer()
    yield p
    p.close()


def test_lying_srq_length_is_an_io_error_without_allocation(peer: ScriptedPeer) -> None:
    session = _open(peer.resource)
    conn = peer.accept()
    try:
        session.write(b"*IDN?", 2)
        peer.read_block(conn)
        conn.sendall(encode_header(Op.SRQ, 1, 0xFFFF_FFFF) + b"1")
        tracemalloc.start()
        try:
            with pytest.raises(IOFailure, match="4294967295"):
                session.read_into(memoryview(bytearray(64)), 2, None)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20
        assert not session.connected
    finally:
        session.close()


def test_invalid_header_is_an_io_error(peer: ScriptedPeer) -> None:
    session = _open(peer.resource)
    conn = peer.accept()
    try:
        session.write(b"*IDN?", 2)
        peer.read_block(conn)
        conn.sendall(b"\x81\x02\x01\x00\x00\x00\x00\x02ok")
        with pytest.raises(IOFailure, match="version must be 1"):
            session.read_into(memoryview(bytearray(64)), 2, None)
    finally:
        session.close()


def test_peer_close_inside_a_header_is_connection_lost(peer: ScriptedPeer) -> None:
    session = _open(peer.resource)
    conn = peer.accept()
    try:
        session.write(b"*IDN?", 2)
        peer.read_block(conn)
        conn.sendall(encode_header(Op.EOI, 1, 5)[:4])
        conn.close()
        with pytest.raises(ConnectionLost, match="closed the connection"):
            session.read_into(memoryview(bytearray(64)), 2, None)
    finally:
        session.close()


def test_timeout_inside_a_block_loses_no_byte(peer: ScriptedPeer) -> None:
    """pyvicp forgets bytes received before a timeout and falls out of step; we count every byte."""
    session = _open(peer.resource)
    conn = peer.accept()
    try:
        session.write(b"CURV?", 2)
        peer.read_block(conn)
        conn.sendall(encode_header(Op.EOI, 1, 10) + b"0123")
        buf = bytearray(64)
        assert session.read_into(memoryview(buf), 0.3, None) == (4, False) and buf[:4] == b"0123"
        with pytest.raises(VisaTimeout):
            session.read_into(memoryview(buf), 0.1, None)
        conn.sendall(b"456789" + encode_header(Op.EOI, 2, 3) + b"new")
        assert session.read_into(memoryview(buf), 2, None) == (6, True) and buf[:6] == b"456789"
        session.write(b"NEXT?", 2)
        assert session.read_into(memoryview(buf), 2, None) == (3, True) and buf[:3] == b"new"
    finally:
        session.close()


def test_remote_and_lockout_bits_reach_the_wire(peer: ScriptedPeer) -> None:
    """pyvicp keeps remote/lockout flags but never sends them."""
    session = _open(peer.resource)
    conn = peer.accept()
    try:
        ops = []
        for change in (session.remote, session.lockout, session.local):
            change()
            session.write(b"X", 2)
            ops.append(peer.read_block(conn)[0].op)
        assert ops == [Op.DATA | Op.EOI | Op.REMOTE, Op.DATA | Op.EOI | Op.REMOTE | Op.LOCKOUT, Op.DATA | Op.EOI]
    finally:
        session.close()


def test_write_stopped_inside_a_block_forces_a_reconnect(peer: ScriptedPeer) -> None:
    session = _open(peer.resource)
    first = peer.accept()
    try:
        with pytest.raises(VisaTimeout):
            session.write(b"x" * (64 << 20), 0.3)           # the peer reads nothing: send buffers fill
        session.clear()                                     # half a block on the wire: reconnect
        second = peer.accept()
        session.write(b"*IDN?", 2)
        header, payload = peer.read_block(second)
        assert (header.seq, header.eoi, payload) == (1, True, b"*IDN?")
        assert _closed_by_peer(first)                      # the old connection was dropped
    finally:
        session.close()


def test_v1_peer_gets_in_band_poll_and_reconnecting_clear(peer: ScriptedPeer) -> None:
    session = _open(peer.resource)
    conn = peer.accept()
    try:
        session.write(b"*IDN?", 2)
        peer.read_block(conn)
        conn.sendall(encode_header(Op.EOI, 0, 4) + b"OLD\n")   # sequence 0: a pre-2003 scope
        assert session.read_into(memoryview(bytearray(64)), 2, None) == (4, True)
        results: queue.Queue[object] = queue.Queue()
        poller = threading.Thread(target=lambda: results.put(session.read_stb()), daemon=True)
        poller.start()
        header, _ = peer.read_block(conn)
        assert header.serial_poll and not header.eoi
        conn.sendall(encode_header(Op.EOI, 0, 1) + b"\x50")
        assert results.get(timeout=5) == 0x50
        session.clear()
        peer.accept()                                       # v1: the clear reconnected
        assert session.connected
    finally:
        session.close()


# ------------------------------------------------------------------ the pyvicp 1.1.0 defects themselves
pyvicp_defect = pytest.mark.skipif(not PYVICP_DEFECTS, reason=f"defects characterised for pyvicp 1.1.0, not {pyvicp.__version__}")


@pyvicp_defect
def test_pyvicp_device_clear_sleeps_100_seconds(sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    class Stop(Exception):
        pass

    def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        raise Stop

    monkeypatch.setattr(pyvicp.vicpclient.time, "sleep", fake_sleep)
    client = pyvicp.Client("127.0.0.1", sim.port, timeout=2)
    try:
        with pytest.raises(Stop):
            client.device_clear()
    finally:
        client.close()
    assert slept == [100]


@pyvicp_defect
def test_pyvicp_records_an_asserted_srq_as_deasserted(sim: Simulator) -> None:
    client = pyvicp.Client("127.0.0.1", sim.port, timeout=2)
    try:
        client.send(b"SRQ 10;SLOW? 300")        # the SRQ block ('1') comes before the answer
        assert client.receive() == b"1\n"
        assert client._recv_block.srq_state is False
    finally:
        client.close()


@pyvicp_defect
def test_pyvicp_out_of_band_serial_poll_times_out(sim: Simulator, session: VicpSession) -> None:
    client = pyvicp.Client("127.0.0.1", sim.port, timeout=2)
    try:
        client.send(b"*IDN?")
        client.receive()                        # sequence numbers seen: pyvicp now polls out of band
        client.timeout = 0.5
        with pytest.raises(TimeoutError):
            client.serial_poll()
    finally:
        client.close()
    assert query(session, b"*IDN?").startswith(b"LECROY") and session.read_stb() == 0   # ours answers


@pyvicp_defect
def test_pyvicp_spins_when_the_peer_closes(peer: ScriptedPeer) -> None:
    code = (
        "import pyvicp, sys\n"
        f"c = pyvicp.Client('127.0.0.1', {peer.port}, timeout=2)\n"
        "c.send(b'*IDN?')\n"
        "c.receive()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        conn = peer.accept()
        peer.read_block(conn)
        conn.close()                            # EOF: pyvicp's recv_into loop gets 0 forever
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.5)
        ticks = sum(int(v) for v in Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
        assert ticks / os.sysconf("SC_CLK_TCK") > 0.5   # busy, not blocked
    finally:
        proc.kill()
        proc.wait()

"""Vxi11Session against the VXI-11 simulator running in its own process, on loopback.

Most tests share one `visabus sim --vxi11 0 --json` process (the resource names the core port, so
no portmapper is needed). Tests that need the simulator's portmapper port, a small maxRecvSize or a
simulator they may kill start their own with `python -c` (`SimProcess`), which prints its ports as
one JSON line and exits when its stdin closes.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from visabus.sdk.errors import (
    Aborted,
    ConnectionLost,
    IOFailure,
    NotSupported,
    ResourceLocked,
    ResourceNotFound,
    SessionNotLocked,
    VisaBusError,
    VisaTimeout,
)
from visabus.sdk.resources import parse_resource
from visabus.sim.scpi import DEFAULT_IDENTITY, waveform_bytes
from visabus.workers.protocols import portmapper as pm
from visabus.workers.protocols import rpc, vxi11
from visabus.workers.sessions.base import SessionAttributes
from visabus.workers.sessions.vxi11 import Vxi11Session

_SIM = """
import json, logging, sys
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                    wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
from visabus.sim.scpi import Instrument
from visabus.sim.vxi11_server import Vxi11Server
server = Vxi11Server(Instrument(), **json.loads(sys.argv[1])).start()
print(json.dumps({"vxi11": server.resource, "core_port": server.core_port, "abort_port": server.abort_port,
                  "portmapper_port": server.portmapper_port, "udp_port": server.portmapper.udp_port}), flush=True)
sys.stdin.read()
"""


class SimProcess:
    """A simulator child process whose first stdout line is JSON; stopped by closing its stdin and
    SIGTERM, killed if it lingers."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log)
        try:
            assert self.proc.stdout is not None
            ready, _, _ = select.select([self.proc.stdout], [], [], 20)
            line = self.proc.stdout.readline() if ready else b""
            self.info: dict[str, Any] = json.loads(line)
        except (ValueError, OSError):
            self.stop()
            raise RuntimeError(f"VXI-11 simulator did not start: {log_path.read_text(errors='replace')}") from None

    @classmethod
    def helper(cls, log_path: Path, **kwargs: Any) -> SimProcess:
        """Vxi11Server(**kwargs) via `python -c`, printing all its ports."""
        return cls(["-c", _SIM, json.dumps(kwargs)], log_path)

    def stop(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            if self.proc.poll() is None:
                self.proc.terminate()
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self._log.close()


@pytest.fixture
def sim_process(tmp_path: Path) -> Iterator[Callable[..., SimProcess]]:
    started: list[SimProcess] = []

    def start(**kwargs: Any) -> SimProcess:
        sim = SimProcess.helper(tmp_path / f"sim{len(started)}.log", **kwargs)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The shared simulator (`visabus sim --vxi11 0 --json`); yields its resource string."""
    log_path = tmp_path_factory.mktemp("vxi11") / "sim.log"
    process = SimProcess(["-m", "visabus.sdk.cli", "sim", "--vxi11", "0", "--json"], log_path)
    try:
        yield str(process.info["vxi11"])
    finally:
        process.stop()


Opener = Callable[..., Vxi11Session]


@pytest.fixture
def open_session(sim: str) -> Iterator[Opener]:
    sessions: list[Vxi11Session] = []

    def make(resource: str | None = None, **extra: object) -> Vxi11Session:
        session = Vxi11Session(parse_resource(resource or sim), SessionAttributes(timeout=2.0, extra=dict(extra)))
        sessions.append(session)
        session.open(5.0)
        return session

    yield make
    for session in sessions:
        session.close()


def read_message(session: Vxi11Session, size: int = 1 << 16, timeout: float = 2.0) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while True:
        n, end = session.read_into(view[received:], timeout, None)
        received += n
        if end:
            return bytes(buffer[:received])
        if received == size:
            raise AssertionError(f"message longer than {size} bytes")


def query(session: Vxi11Session, command: bytes, timeout: float = 2.0) -> bytes:
    session.write(command + b"\n", timeout)
    return read_message(session, timeout=timeout)


def run_blocked_read(session: Vxi11Session, interrupt: Callable[[], None]) -> tuple[BaseException | None, float]:
    """Start a read that blocks (SLOW? 5000), call `interrupt` until it ends; (its error, seconds taken)."""
    session.write(b"SLOW? 5000\n", 2.0)
    outcome: list[BaseException | None] = [None]
    done = threading.Event()

    def reader() -> None:
        try:
            session.read_into(memoryview(bytearray(64)), 10.0, None)
        except VisaBusError as exc:
            outcome[0] = exc
        finally:
            done.set()

    start = time.monotonic()
    thread = threading.Thread(target=reader)
    thread.start()
    while not done.wait(0.05):  # the interrupt is ignored until the read is in progress: repeat it
        interrupt()
    thread.join()
    return outcome[0], time.monotonic() - start


# ------------------------------------------------------------------------------------------ data
def test_query_via_host_port_bypassing_the_portmapper(open_session: Opener, sim: str) -> None:
    assert parse_resource(sim).port is not None
    session = open_session()
    assert query(session, b"*IDN?") == DEFAULT_IDENTITY.encode() + b"\n"
    assert session.connected


def test_query_via_portmapper_lookup(open_session: Opener, sim_process: Callable[..., SimProcess]) -> None:
    info = sim_process().info
    session = open_session("TCPIP::127.0.0.1::INSTR", portmapper_port=info["portmapper_port"])
    assert query(session, b"ECHO? via-portmapper") == b"via-portmapper\n"


def test_portmapper_client_over_tcp_and_udp(sim_process: Callable[..., SimProcess]) -> None:
    info = sim_process().info
    core = (vxi11.DEVICE_CORE_PROG, vxi11.DEVICE_CORE_VERS, pm.IPPROTO_TCP)
    assert pm.getport("127.0.0.1", *core, port=info["portmapper_port"]) == info["core_port"]
    assert pm.getport("127.0.0.1", *core, port=info["udp_port"], transport="udp", timeout=2) == info["core_port"]
    assert pm.getport("127.0.0.1", vxi11.DEVICE_ASYNC_PROG, 1, pm.IPPROTO_TCP, port=info["portmapper_port"]) == 0
    assert pm.Mapping(*core, info["core_port"]) in pm.dump("127.0.0.1", port=info["portmapper_port"])
    extra = pm.Mapping(400000, 1, pm.IPPROTO_UDP, 5000)
    assert pm.set_mapping("127.0.0.1", extra, port=info["portmapper_port"])
    assert pm.getport("127.0.0.1", 400000, 1, pm.IPPROTO_UDP, port=info["udp_port"], transport="udp") == 5000
    assert pm.unset_mapping("127.0.0.1", extra, port=info["portmapper_port"])


def test_getport_accepts_a_reply_without_the_last_fragment_bit() -> None:
    """Anritsu MS9740 style: one complete fragment, last-fragment bit clear."""
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                reader = rpc.RecordReader()
                records: list[bytes] = []
                while not records:
                    records = reader.feed(conn.recv(4096))
                reply = rpc.encode_reply(rpc.peek_message(records[0])[0], (1024).to_bytes(4, "big"))
                conn.sendall(rpc.record_mark(len(reply), last=False) + reply)
                conn.recv(1)  # hold the connection open until the client is done

        thread = threading.Thread(target=serve)
        thread.start()
        port = pm.getport("127.0.0.1", vxi11.DEVICE_CORE_PROG, 1, pm.IPPROTO_TCP,
                          port=listener.getsockname()[1], timeout=5)
        thread.join()
    assert port == 1024


def test_block_of_64_mib(open_session: Opener) -> None:
    session = open_session()
    points = 64 << 20
    session.write(b"WAV:POIN %d\n" % points, 2.0)
    try:
        session.write(b"WAV:DATA?\n", 2.0)
        buffer = bytearray(points + 64)
        view = memoryview(buffer)
        start = time.monotonic()
        received, end = 0, False
        while not end:
            n, end = session.read_into(view[received:], 20.0, None)
            received += n
        elapsed = time.monotonic() - start
    finally:
        session.write(b"WAV:POIN 1000\n", 2.0)
    header = b"#8%d" % points
    assert received == len(header) + points + 1
    assert view[: len(header)] == header and buffer[received - 1] == 0x0A
    assert view[len(header) : len(header) + points] == waveform_bytes(points)
    assert elapsed < 10.0, f"64 MiB took {elapsed:.1f} s"


def test_write_is_chunked_to_max_recv_size(open_session: Opener, sim_process: Callable[..., SimProcess]) -> None:
    small = sim_process(max_recv_size=1024).info
    session = open_session(small["vxi11"])
    text = bytes(range(0x41, 0x5B)) * 200  # 5200 bytes: six device_write calls, END only on the last
    assert query(session, b"ECHO? " + text, timeout=5.0) == text + b"\n"


def test_read_with_a_small_buffer_and_term_char(open_session: Opener) -> None:
    session = open_session()
    session.write(b"*IDN?\n", 2.0)
    pieces, end = [], False
    buffer = memoryview(bytearray(5))
    while not end:
        n, end = session.read_into(buffer, 2.0, None)
        assert n == 5 or end
        pieces.append(bytes(buffer[:n]))
    assert b"".join(pieces) == DEFAULT_IDENTITY.encode() + b"\n"
    session.write(b"ECHO? abc,def\n", 2.0)
    big = memoryview(bytearray(64))
    assert session.read_into(big, 2.0, ord(",")) == (4, True) and big[:4] == b"abc,"
    assert session.read_into(big, 2.0, None) == (4, True) and big[:4] == b"def\n"


def test_read_timeout_leaves_the_session_usable(open_session: Opener) -> None:
    session = open_session()
    start = time.monotonic()
    with pytest.raises(VisaTimeout, match="error 15"):
        session.read_into(memoryview(bytearray(16)), 0.3, None)
    assert 0.3 <= time.monotonic() - start < 1.3
    assert query(session, b"ECHO? still-alive") == b"still-alive\n"


# ---------------------------------------------------------------------------------------- control
def test_abort_during_a_blocked_read(open_session: Opener) -> None:
    session = open_session()
    error, elapsed = run_blocked_read(session, session.abort)
    assert isinstance(error, Aborted), error
    assert elapsed < 3.0
    session.clear()  # the SLOW? answer is still queued: clear it, as a VISA user would
    assert query(session, b"ECHO? after-abort") == b"after-abort\n"


def test_clear_from_another_thread_unblocks_a_read(open_session: Opener) -> None:
    session = open_session()
    error, elapsed = run_blocked_read(session, session.clear)
    assert isinstance(error, Aborted), error
    assert elapsed < 3.0
    assert query(session, b"ECHO? after-clear") == b"after-clear\n"


def test_clear_between_an_operations_write_and_read_ends_it(open_session: Opener) -> None:
    session = open_session()
    session.begin()  # the worker starts a query operation
    session.write(b"*IDN?\n", 2.0)
    session.clear()  # lands before the read: the answer is gone, so the read must not wait for it
    start = time.monotonic()
    with pytest.raises(Aborted, match="device clear or abort"):
        session.read_into(memoryview(bytearray(64)), 2.0, None)
    assert time.monotonic() - start < 0.5
    session.begin()  # the next operation is unaffected
    assert query(session, b"ECHO? next-op") == b"next-op\n"


def test_read_stb_trigger_remote_local(open_session: Opener) -> None:
    session = open_session()
    assert session.read_stb() == 0
    session.write(b"*IDN?\n", 2.0)
    assert session.read_stb() & 0x10  # MAV: a response is waiting
    read_message(session)
    assert session.read_stb() & 0x10 == 0
    session.trigger()
    session.remote()
    session.local()
    assert query(session, b"*OPC?") == b"1\n"


def test_lock_contention_between_two_links(open_session: Opener) -> None:
    a, b = open_session(), open_session()
    a.lock(True, 1.0)
    a.lock(True, 1.0)  # nested: counted locally, one lock on the wire
    start = time.monotonic()
    with pytest.raises(VisaTimeout, match="did not come free"):
        b.lock(True, 0.3)
    assert time.monotonic() - start >= 0.3
    with pytest.raises(ResourceLocked):
        b.lock(True, 0)
    with pytest.raises(ResourceLocked, match="device_write"):
        b.write(b"*IDN?\n", 1.0)
    a.unlock()
    with pytest.raises(ResourceLocked):
        b.read_stb()
    waiter_error: list[BaseException] = []

    def wait_for_lock() -> None:
        try:
            b.lock(True, 5.0)
        except VisaBusError as exc:
            waiter_error.append(exc)

    waiter = threading.Thread(target=wait_for_lock)
    waiter.start()
    a.unlock()
    waiter.join()
    assert waiter_error == []
    with pytest.raises(ResourceLocked):
        a.write(b"*IDN?\n", 1.0)
    assert query(b, b"ECHO? b-owns-it") == b"b-owns-it\n"
    b.unlock()
    with pytest.raises(SessionNotLocked):
        b.unlock()
    b.lock(True, 0)
    b.close()  # destroy_link releases the lock
    a.lock(True, 0)
    a.unlock()


def test_losing_the_connection_mid_read_releases_the_lock(open_session: Opener) -> None:
    a, b = open_session(), open_session()
    a.lock(True, 1.0)
    a.write(b"SLOW? 60000\n", 2.0)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            a.read_into(memoryview(bytearray(64)), None, None)  # blocks for a minute
        except VisaBusError as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    core = a._core
    assert core is not None
    core.sock.shutdown(socket.SHUT_RDWR)  # the controller vanishes (crash, cable pulled)
    thread.join(5.0)
    assert not thread.is_alive() and isinstance(errors[0], ConnectionLost)
    start = time.monotonic()
    b.lock(True, 5.0)  # granted once the server notices: RULE B.6.77, not after the minute
    assert time.monotonic() - start < 2.0
    b.unlock()


def test_srq_is_delivered_through_the_interrupt_channel(open_session: Opener) -> None:
    session = open_session()
    received: list[int] = []
    arrived = threading.Event()

    def handler(stb: int) -> None:
        received.append(stb)
        arrived.set()

    session.enable_srq(handler)
    session.write(b"SRQ 100\n", 2.0)
    assert arrived.wait(5.0)
    assert received[0] & 0x40
    assert session.read_stb() & 0x40 == 0  # the handler's readstb cleared RQS
    session.enable_srq(None)
    assert query(session, b"ECHO? after-srq") == b"after-srq\n"


def test_keepalive_attribute_reaches_the_socket(open_session: Opener) -> None:
    session = open_session()
    core = session._core
    assert core is not None
    assert core.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    session.set_attribute("keepalive", True)
    assert core.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0


# ------------------------------------------------------------------------------------------ errors
def test_refused_port_is_resource_not_found() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, not listening: connecting is refused
        port = unused.getsockname()[1]
        session = Vxi11Session(parse_resource(f"TCPIP::127.0.0.1,{port}::INSTR"))
        with pytest.raises(ResourceNotFound, match="cannot reach"):
            session.open(2.0)
        session.close()


def test_portmapper_without_the_core_program_is_resource_not_found() -> None:
    with pm.PortmapperServer("127.0.0.1", 0) as portmapper:
        session = Vxi11Session(parse_resource("TCPIP::127.0.0.1::INSTR"),
                               SessionAttributes(extra={"portmapper_port": portmapper.tcp_port}))
        with pytest.raises(ResourceNotFound, match="knows no VXI-11 core program"):
            session.open(2.0)


def test_unknown_device_name_is_resource_not_found(sim: str) -> None:
    resource = sim.replace("::inst0::", "::inst7::")
    session = Vxi11Session(parse_resource(resource))
    with pytest.raises(ResourceNotFound, match="create_link failed with error 3"):
        session.open(2.0)
    assert not session.connected


def test_instrument_gone_is_connection_lost(open_session: Opener, sim_process: Callable[..., SimProcess]) -> None:
    doomed = sim_process()
    session = open_session(doomed.info["vxi11"])
    assert query(session, b"*OPC?") == b"1\n"
    doomed.proc.kill()
    doomed.proc.wait()
    with pytest.raises(ConnectionLost):
        query(session, b"*OPC?")
    assert not session.connected
    with pytest.raises(ConnectionLost, match="reopen"):
        session.read_stb()


# ------------------------------------------------------------------ simulator conformance (raw RPC)
class RawCore:
    """A bare RPC client on the simulator's core port, for calls the driver would never make."""

    def __init__(self, resource: str) -> None:
        res = parse_resource(resource)
        assert res.port is not None
        self.sock = socket.create_connection((res.host, res.port), timeout=5)
        self.reader = rpc.RecordReader()
        self.xid = 0

    def raw(self, prog: int, vers: int, proc: int, args: bytes) -> rpc.Reply:
        self.xid += 1
        self.sock.sendall(rpc.frame_record(rpc.encode_call(self.xid, prog, vers, proc, args)))
        records: list[bytes] = []
        while not records:
            records = self.reader.feed(self.sock.recv(65536))
        reply = rpc.decode_reply(records[0])
        assert reply.xid == self.xid
        return reply

    def call(self, proc: vxi11.Proc, params: vxi11._Struct) -> Any:
        return vxi11.decode_result(proc, self.raw(vxi11.DEVICE_CORE_PROG, 1, proc, params.encode()))

    def link(self, lock_device: bool = False, lock_timeout: int = 0) -> vxi11.CreateLinkResp:
        return self.call(vxi11.Proc.CREATE_LINK, vxi11.CreateLinkParms(1, lock_device, lock_timeout, b"inst0"))


@pytest.fixture
def raw_core(sim: str) -> Iterator[Callable[[], RawCore]]:
    clients: list[RawCore] = []

    def make() -> RawCore:
        clients.append(RawCore(sim))
        return clients[-1]

    yield make
    for client in clients:
        client.sock.close()


def test_sim_answers_rpc_level_errors(raw_core: Callable[[], RawCore]) -> None:
    core = raw_core()
    assert core.raw(vxi11.DEVICE_CORE_PROG + 7, 1, 10, b"").accept_stat is rpc.AcceptStat.PROG_UNAVAIL
    mismatch = core.raw(vxi11.DEVICE_CORE_PROG, 2, 10, b"")
    assert mismatch.accept_stat is rpc.AcceptStat.PROG_MISMATCH and mismatch.mismatch == (1, 1)
    assert core.raw(vxi11.DEVICE_CORE_PROG, 1, 21, b"").accept_stat is rpc.AcceptStat.PROC_UNAVAIL
    assert core.raw(vxi11.DEVICE_CORE_PROG, 1, 10, b"\x00\x00").accept_stat is rpc.AcceptStat.GARBAGE_ARGS
    assert core.link().error == 0  # the connection survived all of that


def test_sim_link_level_errors(raw_core: Callable[[], RawCore]) -> None:
    core = raw_core()
    P, link = vxi11.Proc, core.link()
    assert link.error == 0 and link.max_recv_size == 1 << 20 and link.abort_port
    lid = link.lid
    assert core.call(P.CREATE_LINK, vxi11.CreateLinkParms(1, False, 0, b"bad name!")).error == 1
    assert core.call(P.DEVICE_READSTB, vxi11.DeviceGenericParms(lid + 1000, 0, 0, 100)).error == 4
    oversized = vxi11.DeviceWriteParms(lid, 1000, 0, vxi11.OpFlag.END, bytes((1 << 20) + 1))
    assert core.call(P.DEVICE_WRITE, oversized) == vxi11.DeviceWriteResp(5, 0)
    docmd = vxi11.DeviceDocmdParms(lid, 0, 100, 0, 0x020001, True, 2, b"\x00\x01")
    assert core.call(P.DEVICE_DOCMD, docmd).error == 8
    assert core.call(P.DEVICE_UNLOCK, vxi11.DeviceLink(lid)).error == 12
    assert core.call(P.DEVICE_LOCK, vxi11.DeviceLockParms(lid, 0, 0)).error == 0
    assert core.call(P.DEVICE_LOCK, vxi11.DeviceLockParms(lid, 0, 0)).error == 11  # no nesting on the wire
    assert core.call(P.DESTROY_INTR_CHAN, vxi11.Void()).error == 6
    udp = vxi11.DeviceRemoteFunc(0x7F000001, 9, vxi11.DEVICE_INTR_PROG, 1, vxi11.DEVICE_UDP)
    assert core.call(P.CREATE_INTR_CHAN, udp).error == 8
    assert core.call(P.DESTROY_LINK, vxi11.DeviceLink(lid)).error == 0
    assert core.call(P.DESTROY_LINK, vxi11.DeviceLink(lid)).error == 4


def test_sim_device_read_reasons(raw_core: Callable[[], RawCore]) -> None:
    core = raw_core()
    P, R, lid = vxi11.Proc, vxi11.ReadReason, core.link().lid

    def read(size: int, flags: int = 0, term: int = 0) -> vxi11.DeviceReadResp:
        return core.call(P.DEVICE_READ, vxi11.DeviceReadParms(lid, size, 1000, 0, flags, term))

    assert core.call(P.DEVICE_WRITE, vxi11.DeviceWriteParms(lid, 1000, 0, 8, b"ECHO? ab,cdefg")).error == 0
    assert (r := read(0)).reason == R.REQCNT and bytes(r.data) == b""
    assert (r := read(2)).reason == R.REQCNT and bytes(r.data) == b"ab"
    assert (r := read(100, vxi11.OpFlag.TERMCHRSET, ord(","))).reason == R.CHR and bytes(r.data) == b","
    assert (r := read(6)).reason == R.END | R.REQCNT and bytes(r.data) == b"cdefg\n"
    timed_out = core.call(P.DEVICE_READ, vxi11.DeviceReadParms(lid, 10, 50, 0, 0, 0))
    assert (timed_out.error, timed_out.reason, bytes(timed_out.data)) == (15, 0, b"")


def test_sim_create_link_with_lock_device_waits_for_the_lock(raw_core: Callable[[], RawCore]) -> None:
    first, second = raw_core(), raw_core()
    holder = first.link(lock_device=True)
    assert holder.error == 0
    start = time.monotonic()
    assert second.link(lock_device=True, lock_timeout=200).error == 11
    assert time.monotonic() - start >= 0.2
    assert second.link(lock_device=False).error == 0  # links without lockDevice ignore locks
    assert first.call(vxi11.Proc.DESTROY_LINK, vxi11.DeviceLink(holder.lid)).error == 0
    assert second.link(lock_device=True, lock_timeout=0).error == 0


# ------------------------------------------------------------- scripted peers: faults the sim never makes
Responder = Callable[["FakeInstrument", rpc.Call, socket.socket], None]


class FakeInstrument:
    """A scripted VXI-11 core server in this process. create_link and destroy_link are answered
    normally (no abort channel); every other call goes to `respond`, which sends whatever bytes the
    test wants, when it wants."""

    def __init__(self, respond: Responder, max_recv_size: int = 1 << 20) -> None:
        self.respond = respond
        self.max_recv_size = max_recv_size
        self.calls: list[rpc.Call] = []
        self.intr: socket.socket | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.resource = f"TCPIP::127.0.0.1,{self.listener.getsockname()[1]}::inst0::INSTR"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            reader = rpc.RecordReader()
            try:
                while chunk := conn.recv(65536):
                    for record in reader.feed(chunk):
                        call = rpc.decode_call(record)
                        self.calls.append(call)
                        if call.proc == vxi11.Proc.CREATE_LINK:
                            conn.sendall(reply_to(call, vxi11.CreateLinkResp(0, 7, 0, self.max_recv_size)))
                        elif call.proc == vxi11.Proc.DESTROY_LINK:
                            conn.sendall(reply_to(call, vxi11.DeviceError(0)))
                        else:
                            self.respond(self, call, conn)
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        if self.intr is not None:
            self.intr.close()
        self.thread.join(5)


def reply_to(call: rpc.Call, result: vxi11._Struct, max_fragment: int = rpc.MAX_FRAGMENT, pad: bytes = b"") -> bytes:
    return rpc.frame_record(rpc.encode_reply(call.xid, result.encode() + pad), max_fragment)


@pytest.fixture
def fake() -> Iterator[Callable[..., tuple[FakeInstrument, Vxi11Session]]]:
    made: list[tuple[FakeInstrument, Vxi11Session]] = []

    def make(respond: Responder, max_recv_size: int = 1 << 20) -> tuple[FakeInstrument, Vxi11Session]:
        instrument = FakeInstrument(respond, max_recv_size)
        session = Vxi11Session(parse_resource(instrument.resource))
        made.append((instrument, session))
        session.open(5.0)
        return instrument, session

    yield make
    for instrument, session in made:
        session.close()
        instrument.close()


def test_read_reply_in_many_fragments_with_padding(fake: Callable[..., tuple[FakeInstrument, Vxi11Session]]) -> None:
    def respond(inst: FakeInstrument, call: rpc.Call, conn: socket.socket) -> None:
        resp = vxi11.DeviceReadResp(0, vxi11.ReadReason.END, b"fragmented answer\n")
        conn.sendall(reply_to(call, resp, max_fragment=7, pad=bytes(8)))  # ICS 8065-style trailing pad

    _, session = fake(respond)
    buffer = memoryview(bytearray(64))
    assert session.read_into(buffer, 2.0, None) == (18, True)
    assert buffer[:18] == b"fragmented answer\n"
    assert session.read_into(buffer, 2.0, None) == (18, True)  # the stream stayed in step


def test_late_reply_of_a_timed_out_call_is_skipped(fake: Callable[..., tuple[FakeInstrument, Vxi11Session]]) -> None:
    held: list[rpc.Call] = []

    def respond(inst: FakeInstrument, call: rpc.Call, conn: socket.socket) -> None:
        if not held:
            held.append(call)  # no answer until the client has given up
            return
        conn.sendall(reply_to(held[0], vxi11.DeviceReadResp(0, vxi11.ReadReason.END, b"old\n")))
        conn.sendall(reply_to(call, vxi11.DeviceReadResp(0, vxi11.ReadReason.END, b"new\n")))

    _, session = fake(respond)
    buffer = memoryview(bytearray(64))
    with pytest.raises(VisaTimeout, match="no reply"):
        session.read_into(buffer, 0.01, None)
    assert session.connected
    assert session.read_into(buffer, 2.0, None) == (4, True) and buffer[:4] == b"new\n"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (lambda call: rpc.frame_record(rpc.encode_reply(call.xid + 5, vxi11.DeviceError(0).encode())),
         "does not match the call's xid"),
        (lambda call: b"\xff\xff\xff\xff" + bytes(64), "exceeds"),
        (lambda call: reply_to(call, vxi11.DeviceReadResp(0, 4, b"x" * 65)), "65 bytes, 64 were asked for"),
        (lambda call: rpc.frame_record(b"\x00\x00\x00"), "truncated"),
    ],
    ids=["future-xid", "2GiB-record", "more-than-asked", "truncated"],
)
def test_malformed_replies_are_io_failures_that_end_the_session(
    fake: Callable[..., tuple[FakeInstrument, Vxi11Session]], answer: Callable[[rpc.Call], bytes], message: str
) -> None:
    def respond(inst: FakeInstrument, call: rpc.Call, conn: socket.socket) -> None:
        conn.sendall(answer(call))

    _, session = fake(respond)
    with pytest.raises(IOFailure, match=message):
        session.read_into(memoryview(bytearray(64)), 2.0, None)
    assert not session.connected


def test_unimplemented_procedure_is_not_supported(fake: Callable[..., tuple[FakeInstrument, Vxi11Session]]) -> None:
    def respond(inst: FakeInstrument, call: rpc.Call, conn: socket.socket) -> None:
        conn.sendall(rpc.frame_record(rpc.encode_reply(call.xid, accept_stat=rpc.AcceptStat.PROC_UNAVAIL)))

    _, session = fake(respond)
    with pytest.raises(NotSupported, match="PROC_UNAVAIL"):
        session.trigger()
    assert session.connected


def test_max_recv_size_0_falls_back_to_4096_byte_writes(
    fake: Callable[..., tuple[FakeInstrument, Vxi11Session]],
) -> None:
    def respond(inst: FakeInstrument, call: rpc.Call, conn: socket.socket) -> None:
        params = vxi11.DeviceWriteParms.decode(call.args)
        conn.sendall(reply_to(call, vxi11.DeviceWriteResp(0, len(params.data))))

    inst, session = fake(respond, max_recv_size=0)  # old Infiniium firmware
    assert session.write(bytes(10000), 2.0) == 10000
    writes = [vxi11.DeviceWriteParms.decode(c.args) for c in inst.calls if c.proc == vxi11.Proc.DEVICE_WRITE]
    assert [len(w.data) for w in writes] == [4096, 4096, 1808]
    assert [w.flags for w in writes] == [0, 0, vxi11.OpFlag.END]


@pytest.mark.parametrize("together", [False, True], ids=["separate", "same-segment"])
def test_srq_under_a_sloppy_record_length_is_still_delivered(
    fake: Callable[..., tuple[FakeInstrument, Vxi11Session]], together: bool
) -> None:
    """Keithley DMM6500 announces 4 bytes more than it sends in device_intr_srq."""

    def srq(handle: bytes, sloppy: bool) -> bytes:
        message = vxi11.encode_call(99, vxi11.Proc.DEVICE_INTR_SRQ, vxi11.DeviceSrqParms(handle))
        return rpc.record_mark(len(message) + (4 if sloppy else 0)) + message

    def respond(inst: FakeInstrument, call: rpc.Call, conn: socket.socket) -> None:
        if call.proc == vxi11.Proc.CREATE_INTR_CHAN:
            func = vxi11.DeviceRemoteFunc.decode(call.args)
            host = socket.inet_ntoa(func.host_addr.to_bytes(4, "big"))
            inst.intr = socket.create_connection((host, func.host_port), timeout=5)
            conn.sendall(reply_to(call, vxi11.DeviceError(0)))
        elif call.proc == vxi11.Proc.DEVICE_ENABLE_SRQ:
            params = vxi11.DeviceEnableSrqParms.decode(call.args)
            conn.sendall(reply_to(call, vxi11.DeviceError(0)))
            if params.enable and inst.intr is not None:
                first, second = srq(params.handle, sloppy=True), srq(params.handle, sloppy=False)
                if together:
                    inst.intr.sendall(first + second)  # the second's mark must not be taken as padding
                else:
                    inst.intr.sendall(first)
                    inst.intr.sendall(second)
        elif call.proc == vxi11.Proc.DEVICE_READSTB:
            conn.sendall(reply_to(call, vxi11.DeviceReadStbResp(0, 0x41)))

    _, session = fake(respond)
    received: list[int] = []
    both = threading.Event()

    def handler(stb: int) -> None:
        received.append(stb)
        if len(received) == 2:
            both.set()

    session.enable_srq(handler)
    assert both.wait(5.0)
    assert received == [0x41, 0x41]

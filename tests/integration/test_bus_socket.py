"""The bus end to end over raw SCPI sockets: `visabus serve` as a subprocess, driven through SDK and CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import msgpack
import psutil
import pytest
import zmq

from tests.conftest import TEST_BROKER, Proc, rack_fixture
from visabus.sdk import Client
from visabus.sdk.errors import (
    Aborted,
    ConnectionLost,
    InvalidResourceName,
    ResourceNotFound,
    StatusCode,
    VisaTimeout,
)
from visabus.sim.scpi import waveform_bytes

RACK = TEST_BROKER + """
[[simulator]]
name = "dmm"
protocols = ["socket"]
identity = "ACME,DMM-1,0001,1.0"

[[simulator]]
name = "scope"
protocols = ["socket"]
identity = "ACME,SCOPE-1,0002,1.0"
"""


rack = rack_fixture(RACK)


@pytest.fixture
def bus(rack: Proc) -> Iterator[Client]:
    with Client(rack.info["frontend"], name="pytest") as client:
        yield client


def test_query_by_alias_and_by_any_spelling_of_the_resource(bus: Client, rack: Proc) -> None:
    res = rack.info["resources"]["dmm-socket"]
    port = res.split("::")[2]
    by_alias = bus.open("dmm-socket")
    by_other_spelling = bus.open(f"tcpip0::127.0.0.1::{port}::socket")
    assert by_alias.query("*IDN?") == "ACME,DMM-1,0001,1.0"
    assert by_other_spelling.resource_name == by_alias.resource_name
    assert by_other_spelling.query("ECHO? spelled differently") == "spelled differently"


def test_list_resources_with_visa_patterns(bus: Client, rack: Proc) -> None:
    listed = bus.list_resources("TCPIP?*::SOCKET")
    expected = {f"TCPIP0::{r.split('::', 1)[1]}" for r in rack.info["resources"].values()}
    assert set(listed) == expected
    assert bus.list_resources("VICP?*::INSTR") == ()
    rows = bus.resources("?*")
    assert {r["alias"] for r in rows} >= {"dmm-socket", "scope-socket"}
    assert all(r["state"] == "ready" for r in rows)


def test_64_mib_waveform_arrives_intact(bus: Client) -> None:
    scope = bus.open("scope-socket", timeout=20_000)
    n = 64 << 20
    scope.write(f"WAV:POIN {n}")
    seen: list[tuple[int, int | None]] = []
    data = scope.query_binary_block("WAV:DATA?", progress=lambda done, total: seen.append((done, total)))
    assert len(data) == n
    assert hashlib.sha256(data).digest() == hashlib.sha256(waveform_bytes(n)).digest()
    assert len(seen) > 4 and seen[-1] == (n, n)  # streamed in chunks, with the total known
    assert scope.query("*OPC?") == "1"  # the trailing terminator was consumed: the stream is in sync
    scope.write("WAV:POIN 1000")


def test_query_binary_values_matches_pyvisa_conventions(bus: Client) -> None:
    scope = bus.open("scope-socket")
    scope.write("WAV:POIN 1024")
    as_bytes = scope.query_binary_values("CURV?", datatype="B", container=bytes)
    assert as_bytes == waveform_bytes(1024)
    as_shorts = scope.query_binary_values("CURV?", datatype="H", is_big_endian=True)
    assert as_shorts[:2] == [0x0001, 0x0203] and len(as_shorts) == 512


def test_unknown_resource_fails_at_once_with_rsrc_nfound(bus: Client) -> None:
    start = time.monotonic()
    with pytest.raises(ResourceNotFound) as info:
        bus.open("TCPIP::127.0.0.1::1::SOCKET", timeout=30_000)
    assert time.monotonic() - start < 5.0  # answered immediately, not after the 30 s timeout
    assert info.value.code == StatusCode.VI_ERROR_RSRC_NFOUND
    assert "visabus list" in info.value.message


def test_malformed_resource_string_names_the_bad_part(bus: Client) -> None:
    with pytest.raises(InvalidResourceName) as info:
        bus.open("TCPIP::127.0.0.1::notaport::SOCKET")
    assert "'notaport'" in info.value.message


def test_timeout_then_no_stale_answer(bus: Client) -> None:
    dmm = bus.open("dmm-socket", timeout=300)
    with pytest.raises(VisaTimeout):
        dmm.query("SLOW? 1500")
    dmm.timeout = 5000
    # The late "1" must not be read as the answer to the next question.
    assert dmm.query("ECHO? fresh") == "fresh"


def _wait_busy(bus: Client, res: str, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if any(r["res"] == res and r["busy"] for r in bus.status()["resources"]):
            return
    raise AssertionError(f"{res} never became busy")


def test_clear_interrupts_a_blocked_read_from_another_client(rack: Proc) -> None:
    outcome: dict[str, BaseException | str] = {}
    with Client(rack.info["frontend"]) as reader_bus, Client(rack.info["frontend"]) as other:
        dmm = reader_bus.open("dmm-socket", timeout=20_000)

        def blocked_query() -> None:
            try:
                outcome["result"] = dmm.query("SLOW? 15000")
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
                outcome["error"] = exc

        thread = threading.Thread(target=blocked_query)
        thread.start()
        _wait_busy(other, dmm.resource_name)
        started = time.monotonic()
        other.open("dmm-socket").clear()
        thread.join(10)
        assert not thread.is_alive()
        assert isinstance(outcome.get("error"), Aborted), outcome
        assert time.monotonic() - started < 5.0
        assert dmm.query("ECHO? after clear") == "after clear"


def test_malformed_frames_get_errors_and_break_nothing(bus: Client, rack: Proc) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(rack.info["frontend"])
    try:
        cases = [
            [b"\xc1\xc1 not msgpack"],
            [msgpack.packb([1, 2, 3])],
            [msgpack.packb({"v": 1, "op": "frobnicate", "id": 7})],
            [msgpack.packb({"v": 99, "op": "list", "id": 8})],
            [msgpack.packb({"v": 1, "op": "write", "id": 9, "res": "dmm-socket"})],  # missing data frame
            [msgpack.packb({"v": 1, "op": "query", "id": 10, "res": 5}), b"*IDN?\n"],
            [b"x" * 100_000],
            [],
        ]
        for frames in cases:
            if frames:
                sock.send_multipart(frames)
        codes = []
        for _ in range(len([c for c in cases if c])):
            assert sock.poll(5000), "broker did not answer a malformed message"
            header = msgpack.unpackb(sock.recv_multipart()[0])
            assert header["status"] < 0 and header["msg"]
            codes.append(header["name"])
        assert "VI_ERROR_NSUP_OPER" in codes and "VI_ERROR_INV_FMT" in codes
    finally:
        sock.close()
    assert bus.open("dmm-socket").query("*IDN?") == "ACME,DMM-1,0001,1.0"


def test_duplicate_request_id_is_not_executed_twice(rack: Proc) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(rack.info["frontend"])
    try:
        request = msgpack.packb({"v": 1, "op": "query", "id": 42, "sid": "dup-test", "res": "dmm-socket",
                                 "timeout_ms": 2000, "term": 10})
        sock.send_multipart([request, b"ECHO? once\n"])
        assert sock.poll(5000)
        first = msgpack.unpackb(sock.recv_multipart()[0])
        sock.send_multipart([request, b"ECHO? once\n"])
        assert sock.poll(5000)
        second = msgpack.unpackb(sock.recv_multipart()[0])
    finally:
        sock.close()
    assert first["status"] == StatusCode.VI_SUCCESS_TERM_CHAR  # read ended on the LF
    assert second["status"] == StatusCode.VI_ERROR_INV_PARAMETER and second["duplicate"] is True


def test_no_broker_is_a_clear_error() -> None:
    ctx = zmq.Context.instance()
    probe = ctx.socket(zmq.ROUTER)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close()  # nothing listens there now
    with pytest.raises(ConnectionLost) as info:
        Client(f"tcp://127.0.0.1:{port}")
    assert "no visabus broker answered" in info.value.message


# ------------------------------------------------------------------------------ CLI
def _cli(rack: Proc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "visabus.sdk.cli", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "VISABUS_BROKER": rack.info["frontend"]})


def test_cli_list_query_write_status(rack: Proc) -> None:
    listed = _cli(rack, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {r["alias"] for r in json.loads(listed.stdout)} >= {"dmm-socket", "scope-socket"}
    res = rack.info["resources"]["dmm-socket"]
    answer = _cli(rack, "query", res, "*IDN?")
    assert answer.returncode == 0 and answer.stdout.strip() == "ACME,DMM-1,0001,1.0"
    wrote = _cli(rack, "write", "dmm-socket", "VOLT 2.5", "--json")
    assert wrote.returncode == 0 and json.loads(wrote.stdout)["count"] == len("VOLT 2.5\n")
    assert _cli(rack, "query", "dmm-socket", "VOLT?").stdout.strip() == "2.5"
    status = json.loads(_cli(rack, "status", "--json").stdout)
    assert any(r["alias"] == "dmm-socket" and r["stats"]["requests"] >= 2 for r in status["resources"])


def test_cli_exit_codes_mean_something(rack: Proc, tmp_path: os.PathLike[str]) -> None:
    assert _cli(rack, "query", "TCPIP::127.0.0.1::1::SOCKET", "*IDN?").returncode == 3
    assert _cli(rack, "query", "TCPIP::bad host::INSTR", "*IDN?").returncode == 3
    slow = _cli(rack, "query", "dmm-socket", "SLOW? 2000", "--timeout", "200")
    assert slow.returncode == 4 and "VI_ERROR_TMO" in slow.stderr
    out = os.path.join(tmp_path, "wave.bin")
    assert _cli(rack, "write", "scope-socket", "WAV:POIN 1000").returncode == 0
    got = _cli(rack, "query", "scope-socket", "WAV:DATA?", "--binary", "-o", out, "--json")
    assert got.returncode == 0 and json.loads(got.stdout)["bytes"] == 1000
    with open(out, "rb") as fh:
        assert fh.read() == waveform_bytes(1000)
    nobroker = subprocess.run([sys.executable, "-m", "visabus.sdk.cli", "list", "--broker", "tcp://127.0.0.1:1",
                               "--timeout", "300"], capture_output=True, text=True, timeout=30)
    assert nobroker.returncode == 5


# ------------------------------------------------------------------------------ crashes
def test_kill_9_worker_fails_callers_fast_and_supervisor_restarts_it(serve) -> None:  # type: ignore[no-untyped-def]
    rack = serve(RACK)
    with Client(rack.info["frontend"]) as bus, bus.subscribe("worker.") as events:
        dmm = bus.open("dmm-socket", timeout=30_000)
        scope = bus.open("scope-socket")
        worker_pid = rack.info["pids"]["worker:dmm-socket"]
        failure: dict[str, BaseException] = {}
        with Client(rack.info["frontend"]) as caller_bus:
            caller = caller_bus.open("dmm-socket", timeout=30_000)
            thread = threading.Thread(target=lambda: _run_into(failure, caller))
            thread.start()
            _wait_busy(bus, dmm.resource_name)
            killed_at = time.monotonic()
            os.kill(worker_pid, signal.SIGKILL)
            thread.join(15)
            assert not thread.is_alive()
        error = failure.get("error")
        assert isinstance(error, ConnectionLost), error
        assert error.details.get("outcome") == "unknown"
        assert time.monotonic() - killed_at < 5.0  # heartbeat-based detection, not the 30 s timeout
        assert scope.query("*IDN?") == "ACME,SCOPE-1,0002,1.0"  # the other instrument never noticed
        # The supervisor restarts the worker; it registers again and the instrument works.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            event = events.get(1.0)
            if event and event["topic"] == "worker.up" and event["res"] == dmm.resource_name:
                break
        else:
            raise AssertionError("worker was not restarted")
        assert event["pid"] != worker_pid and psutil.pid_exists(event["pid"])
        assert dmm.query("ECHO? back") == "back"


def _run_into(store: dict[str, BaseException], inst) -> None:  # type: ignore[no-untyped-def]
    try:
        inst.query("SLOW? 20000")
    except BaseException as exc:  # noqa: BLE001
        store["error"] = exc


def test_block_into_a_reused_buffer(bus: Client) -> None:
    scope = bus.open("scope-socket")
    buffer = bytearray(16)  # too small: grown to fit, then reused
    scope.write("WAV:POIN 5000")
    first = scope.query_binary_block("CURV?", out=buffer)
    assert bytes(first) == waveform_bytes(5000) and len(buffer) == 5000
    scope.write("WAV:POIN 3000")
    second = scope.query_binary_block("CURV?", out=buffer)
    assert len(second) == 3000 and bytes(second) == waveform_bytes(3000) and len(buffer) == 5000
    scope.write("WAV:POIN 1000")


def test_long_operation_shows_worker_busy(rack: Proc) -> None:
    with Client(rack.info["frontend"]) as bus, bus.subscribe("worker.state") as states:
        dmm = bus.open("dmm-socket", timeout=10_000)
        assert dmm.query("SLOW? 1800") == "1"
        seen = []
        while (event := states.get(2.0)) is not None and len(seen) < 2:
            if event["res"] == dmm.resource_name:
                seen.append(event["state"])
        assert seen == ["busy", "ready"]  # reported for an operation over a second, not for every request

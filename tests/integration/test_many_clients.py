"""Many clients sharing instruments safely: no interleaving, locks with leases, fairness, bounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import msgpack
import psutil
import pytest
import zmq

from tests.conftest import ROOT, TEST_BROKER, Proc, rack_fixture
from visabus.sdk import Client
from visabus.sdk.errors import ResourceLocked, StatusCode, VisaBusError, VisaTimeout

INSTRUMENTS = 4
RACK = TEST_BROKER.replace("lease_ms = 2000", "lease_ms = 2000\nqueue_limit = 64\nqueue_bytes_limit = 1048576") + "".join(
    f"""
[[simulator]]
name = "i{n}"
protocols = ["socket"]
identity = "ACME,SIM-{n},{n:04d},1.0"
"""
    for n in range(INSTRUMENTS)
)
ALIASES = [f"i{n}-socket" for n in range(INSTRUMENTS)]


rack = rack_fixture(RACK)


def _raw(url: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    return sock


def _req(op: str, rid: int, sid: str, **fields: object) -> bytes:
    return msgpack.packb({"v": 1, "op": op, "id": rid, "sid": sid, "timeout_ms": 20_000, **fields})


def test_32_client_processes_never_get_each_others_answers(rack: Proc) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.integration.load_client", rack.info["frontend"], *ALIASES,
                          "--rounds", "6"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(32)
    ]
    totals = {"ok": 0, "mismatch": 0, "errors": 0}
    try:
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err[-2000:]
            counts = json.loads(out.strip().splitlines()[-1])
            for key in totals:
                totals[key] += counts[key]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert totals == {"ok": 32 * 6 * INSTRUMENTS * 2, "mismatch": 0, "errors": 0}


def test_exclusive_lock_blocks_others_until_released(rack: Proc) -> None:
    with Client(rack.info["frontend"], name="holder") as a, Client(rack.info["frontend"], name="other") as b:
        mine, theirs = a.open("i0-socket"), b.open("i0-socket", timeout=400)
        with mine.lock():
            assert mine.query("ECHO? held") == "held"
            with pytest.raises(ResourceLocked) as info:
                theirs.query("ECHO? blocked")
            assert "holder" in info.value.message  # says who holds it
            with pytest.raises(VisaTimeout):
                theirs.lock(timeout=300)
            status = {r["alias"]: r for r in b.status()["resources"]}
            assert status["i0-socket"]["lock"]["exclusive"] and "holder" in status["i0-socket"]["lock"]["holders"][0]
        assert theirs.query("ECHO? free") == "free"


def test_waiting_lock_is_granted_when_released(rack: Proc) -> None:
    with Client(rack.info["frontend"]) as a, Client(rack.info["frontend"]) as b:
        mine, theirs = a.open("i1-socket"), b.open("i1-socket")
        got: list[str] = []
        mine.lock()
        waiter = threading.Thread(target=lambda: got.append(theirs.lock(timeout=10_000)))
        with b.subscribe("lock.") as events:
            waiter.start()
            mine.unlock()
            waiter.join(10)
            assert got == [""]  # exclusive grant: empty access key
            actions = []
            while (event := events.get(2.0)) is not None and len(actions) < 2:
                actions.append(event["action"])
            assert actions == ["released", "acquired"]
        theirs.unlock()


def test_shared_lock_admits_key_holders_only(rack: Proc) -> None:
    url = rack.info["frontend"]
    with Client(url) as a, Client(url) as b, Client(url) as c:
        ia, ib, ic = a.open("i2-socket"), b.open("i2-socket"), c.open("i2-socket", timeout=300)
        key = ia.lock(requested_key="team-k")
        assert key == "team-k"
        assert ib.lock(requested_key="team-k") == "team-k"
        assert ia.query("ECHO? a") == "a" and ib.query("ECHO? b") == "b"
        with pytest.raises(ResourceLocked):
            ic.query("ECHO? c")
        with pytest.raises(VisaTimeout):
            ic.lock(timeout=200, requested_key="wrong-key")
        ia.unlock()
        ib.unlock()
        assert ic.query("ECHO? c") == "c"


def test_lock_of_a_killed_holder_is_released_at_lease_end(rack: Proc) -> None:
    holder = subprocess.Popen([sys.executable, "-m", "tests.integration.load_client", rack.info["frontend"],
                               "i3-socket", "--hold-lock", "i3-socket"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert json.loads(holder.stdout.readline()) == {"locked": True}
        with Client(rack.info["frontend"]) as bus, bus.subscribe("client.gone") as gone:
            inst = bus.open("i3-socket", timeout=300)
            with pytest.raises(ResourceLocked):
                inst.query("ECHO? x")
            os.kill(holder.pid, signal.SIGKILL)
            killed = time.monotonic()
            inst.lock(timeout=15_000)  # granted once the dead holder's 2 s lease runs out
            waited = time.monotonic() - killed
            assert waited > 1.0 and waited < 10.0  # not before the lease, not much after
            event = gone.get(5.0)
            assert event is not None and event["released"] == [inst.resource_name]
            assert inst.query("ECHO? mine") == "mine"
            inst.unlock()
    finally:
        holder.kill()
        holder.wait()


def test_one_busy_client_cannot_starve_another(rack: Proc) -> None:
    flood, fair = _raw(rack.info["frontend"]), _raw(rack.info["frontend"])
    try:
        for i in range(40):
            flood.send_multipart([_req("query", i + 1, "flooder", res="i0-socket", term=10), b"SLOW? 20\n"])
        # Wait until the flood is queued at the broker (status shows it), then ask one question.
        with Client(rack.info["frontend"]) as bus:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                row = next(r for r in bus.status()["resources"] if r["alias"] == "i0-socket")
                if row["queue"] >= 30:
                    break
            else:
                raise AssertionError("flood never queued")
        fair.send_multipart([_req("query", 1, "patient", res="i0-socket", term=10), b"ECHO? my turn\n"])
        flood_replies_before = None
        poller = zmq.Poller()
        poller.register(flood, zmq.POLLIN)
        poller.register(fair, zmq.POLLIN)
        flood_count = 0
        while flood_count < 40:
            ready = dict(poller.poll(10_000))
            assert ready, "replies stopped"
            if fair in ready:
                reply = msgpack.unpackb(fair.recv_multipart()[0])
                assert reply["status"] >= 0
                flood_replies_before = flood_count
            if flood in ready:
                flood.recv_multipart()
                flood_count += 1
        # Round robin: the patient client is served right after the request in flight, not after 40.
        assert flood_replies_before is not None and flood_replies_before <= 3
    finally:
        flood.close()
        fair.close()


def test_queue_overflow_is_an_error_not_memory(rack: Proc) -> None:
    sock = _raw(rack.info["frontend"])
    try:
        n = 100
        for i in range(n):
            sock.send_multipart([_req("query", i + 1, "overflow", res="i1-socket", term=10), b"SLOW? 5\n"])
        names = []
        for _ in range(n):
            assert sock.poll(20_000)
            reply = msgpack.unpackb(sock.recv_multipart()[0])
            names.append(reply.get("name", "ok"))
        assert names.count("VI_ERROR_RSRC_BUSY") >= n - 64 - 1  # queue_limit = 64 in this rack
        assert names.count("ok") >= 60
    finally:
        sock.close()


def test_queued_bytes_are_bounded_too(rack: Proc) -> None:
    sock = _raw(rack.info["frontend"])
    try:
        sock.send_multipart([_req("query", 1, "bulky", res="i3-socket", term=10), b"SLOW? 300\n"])
        payload = b"VOLT 1" + b" " * (400 << 10) + b"\n"  # 400 KiB each; this rack allows 1 MiB waiting
        for i in range(2, 6):
            sock.send_multipart([_req("write", i, "bulky", res="i3-socket"), payload])
        replies = {}
        while len(replies) < 5:
            assert sock.poll(10_000)
            reply = msgpack.unpackb(sock.recv_multipart()[0])
            replies[reply["id"]] = reply
        busy = [r for r in replies.values() if r.get("name") == "VI_ERROR_RSRC_BUSY"]
        assert busy and all("bytes already wait" in r["msg"] for r in busy)
        assert sum(1 for r in replies.values() if r["status"] >= 0) >= 3  # the query and two writes ran
        with Client(rack.info["frontend"]) as bus:
            row = next(r for r in bus.status()["resources"] if r["alias"] == "i3-socket")
            assert row["queued_bytes"] == 0  # bookkeeping returns to zero once all left the queue
    finally:
        sock.close()


def test_cancel_removes_a_queued_request(rack: Proc) -> None:
    sock = _raw(rack.info["frontend"])
    try:
        sock.send_multipart([_req("query", 1, "canceller", res="i2-socket", term=10), b"SLOW? 500\n"])
        sock.send_multipart([_req("query", 2, "canceller", res="i2-socket", term=10), b"ECHO? never\n"])
        sock.send(_req("cancel", 3, "canceller", target=2))
        replies = {}
        while len(replies) < 3:
            assert sock.poll(10_000)
            reply = msgpack.unpackb(sock.recv_multipart()[0])
            replies[reply["id"]] = reply
        assert replies[3]["state"] == "dequeued"
        assert replies[2]["status"] == StatusCode.VI_ERROR_ABORT
        assert replies[1]["status"] >= 0
    finally:
        sock.close()


def test_sdk_timeout_gives_up_and_the_instrument_stays_usable(rack: Proc) -> None:
    with Client(rack.info["frontend"]) as bus:
        inst = bus.open("i3-socket", timeout=200)
        with pytest.raises(VisaTimeout):
            inst.query("SLOW? 1000")
        inst.timeout = 5000
        assert inst.query("ECHO? next") == "next"


def test_transaction_runs_atomically(rack: Proc) -> None:
    with Client(rack.info["frontend"]) as bus:
        inst = bus.open("i0-socket")
        results = inst.transaction([("write", "VOLT 1.25"), ("query", "VOLT?"), ("write", "ECHO? tx"), ("read",)])
        assert results == [None, "1.25", None, "tx"]
        with pytest.raises(VisaBusError) as info:  # a failing step fails the whole transaction
            inst.transaction([("query", "ECHO? ok"), ("frobnicate", "x")])
        assert info.value.code == StatusCode.VI_ERROR_INV_PARAMETER


def test_slow_consumer_keeps_broker_and_worker_memory_bounded(serve) -> None:  # type: ignore[no-untyped-def]
    rack = serve(TEST_BROKER + '[[simulator]]\nname = "big"\nprotocols = ["socket"]\n')
    broker = psutil.Process(rack.info["pids"]["broker"])
    worker = psutil.Process(rack.info["pids"]["worker:big-socket"])
    n = 512 << 20
    peaks = {"broker": 0, "worker": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peaks["broker"] = max(peaks["broker"], broker.memory_info().rss)
            peaks["worker"] = max(peaks["worker"], worker.memory_info().rss)

    with Client(rack.info["frontend"]) as bus:
        inst = bus.open("big-socket", timeout=60_000)
        inst.write(f"WAV:POIN {n}")
        base = {"broker": broker.memory_info().rss, "worker": worker.memory_info().rss}
        sampler = threading.Thread(target=sample)
        sampler.start()
        received = 0
        try:
            for chunk in inst.iter_read(message=b"WAV:DATA?\n", block=True):
                received += len(chunk)
                time.sleep(0.004)  # a slow consumer: ~250 MiB/s at most
        finally:
            stop.set()
            sampler.join()
    assert received == n
    for name in ("broker", "worker"):
        grew = (peaks[name] - base[name]) >> 20
        assert grew < 64, f"{name} RSS grew by {grew} MiB while streaming 512 MiB to a slow client"


def test_broker_restart_workers_reregister_and_subscriptions_survive(serve) -> None:  # type: ignore[no-untyped-def]
    rack = serve(TEST_BROKER + '[[simulator]]\nname = "r"\nprotocols = ["socket"]\n')
    old_broker = rack.info["pids"]["broker"]
    with Client(rack.info["frontend"]) as bus, bus.subscribe("lock.") as events:
        before = bus.open("r-socket")
        before.clear()  # the worker remembers what this clear covered; a new broker numbers afresh
        assert before.query("ECHO? before") == "before"
        os.kill(old_broker, signal.SIGKILL)
        # The supervisor restarts the broker on the same endpoints; the worker notices and registers again.
        deadline = time.monotonic() + 30
        inst = None
        while time.monotonic() < deadline:
            try:
                inst = bus.open("r-socket", timeout=1000)
                break
            except VisaBusError:
                continue  # broker still coming back, or the worker not yet registered
        assert inst is not None, "worker never re-registered with the restarted broker"
        for n in range(5):  # none of the new broker's first requests is taken for one the old clear covered
            assert inst.query(f"ECHO? again {n}") == f"again {n}"
        # The subscription made before the crash still delivers events from the new broker, once the SUB
        # socket has reconnected by itself (ZeroMQ resubscribes; nothing to redo on our side).
        event = None
        deadline = time.monotonic() + 15
        while event is None and time.monotonic() < deadline:
            with inst.lock():
                pass
            event = events.get(0.5)
        assert event is not None and event["action"] == "acquired" and event["res"] == inst.resource_name


def test_worker_restarted_before_its_predecessor_is_declared_dead(serve) -> None:  # type: ignore[no-untyped-def]
    # Default timing: the supervisor restarts a worker after 1 s, the broker declares the old one dead after
    # 3 s. The newcomer is refused at first, waits out the liveness period, and then takes over.
    rack = serve('[broker]\nfrontend = "tcp://127.0.0.1:0"\nbackend = "tcp://127.0.0.1:0"\n'
                 'events = "tcp://127.0.0.1:0"\n[[simulator]]\nname = "d"\nprotocols = ["socket"]\n')
    with Client(rack.info["frontend"]) as bus, bus.subscribe("worker.up") as ups:
        os.kill(rack.info["pids"]["worker:d-socket"], signal.SIGKILL)
        event = ups.get(30.0)
        assert event is not None and event["alias"] == "d-socket"
        assert event["pid"] != rack.info["pids"]["worker:d-socket"]
        assert bus.open("d-socket", timeout=5000).query("ECHO? back") == "back"

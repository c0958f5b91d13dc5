"""`visabus serve CONFIG`: start the broker, simulators, discovery and one worker per instrument.

Children are separate OS processes. A child that dies is restarted with exponential backoff (logged and
published as `supervisor.restart`). SIGINT/SIGTERM stop everything within a few seconds; every child is
started with PR_SET_PDEATHSIG so none outlives the supervisor even if it is killed outright, and psutil
sweeps any descendant left at shutdown.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import structlog
import zmq

from visabus.sdk import schema
from visabus.sdk.errors import VisaBusError
from visabus.sdk.resources import canonical, parse_resource
from visabus.sdk.transport import make_socket

from .attach import Action, AttachPolicy
from .config import ServeConfig

log = structlog.get_logger(__name__)

STARTUP_TIMEOUT_S = 20.0
STOP_GRACE_S = 3.0
STABLE_AFTER_S = 30.0  # a child up this long gets its backoff reset


def _die_with_parent() -> None:
    """preexec: ask Linux to SIGTERM the child when the supervisor dies (no orphans, even on kill -9)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _visabus_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "visabus.sdk.cli", *args]


@dataclass
class Child:
    name: str
    argv: list[str]
    kind: str                       # broker / simulator / discovery / worker
    reads_json: bool = False        # first stdout line is a JSON object we need
    proc: subprocess.Popen[bytes] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0
    backoff: float = 1.0
    restart_at: float | None = None
    restarts: int = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE if self.reads_json else subprocess.DEVNULL, stderr=None,
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
        self.started_at = time.monotonic()
        if self.reads_json:
            self.info = _read_json_line(self.proc, self.name)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


def _read_json_line(proc: subprocess.Popen[bytes], name: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    got = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        try:
            result.update(json.loads(line))
        except ValueError:
            pass
        got.set()
        for _ in iter(proc.stdout.readline, b""):  # keep draining so the child never blocks on a full pipe
            pass

    threading.Thread(target=reader, daemon=True, name=f"stdout-{name}").start()
    if not got.wait(STARTUP_TIMEOUT_S) or not result:
        proc.kill()
        raise RuntimeError(f"{name} did not report its endpoints at start-up (exit code {proc.poll()})")
    return result


class Supervisor:
    def __init__(self, config: ServeConfig, *, json_output: bool = False) -> None:
        self.config = config
        self.json_output = json_output
        self.children: list[Child] = []
        self.endpoints: dict[str, str] = {}
        self.resources: dict[str, str] = {}   # alias-or-resource -> resource
        self._stop = threading.Event()
        self._events: zmq.Socket | None = None
        self._sub: zmq.Socket | None = None
        d = config.discovery
        self.policy = AttachPolicy(d.auto_attach, d.attach_on_demand, d.detach_grace_s)
        self.dynamic: dict[str, Child] = {}  # workers started by auto-attach or attach-on-demand

    # ------------------------------------------------------------------------------ start
    def start(self) -> None:
        b = self.config.broker
        broker = Child("broker", _visabus_cmd(
            "broker", "--frontend", b.frontend, "--backend", b.backend, "--events", b.events,
            "--heartbeat-ms", str(b.heartbeat_ms), "--liveness", str(b.liveness), "--lease-ms", str(b.lease_ms),
            "--queue-limit", str(b.queue_limit), "--queue-bytes-limit", str(b.queue_bytes_limit),
            "--grace-ms", str(b.grace_ms), "--max-frame-bytes", str(b.max_message_bytes), "--json",
            *(["--attach-on-demand"] if self.config.discovery.attach_on_demand else [])), "broker", reads_json=True)
        broker.start()
        self.endpoints = broker.info
        # Pin ephemeral ports so a restarted broker comes back where clients and workers look for it.
        broker.argv[broker.argv.index("--frontend") + 1] = self.endpoints["frontend"]
        broker.argv[broker.argv.index("--backend") + 1] = self.endpoints["backend"]
        broker.argv[broker.argv.index("--events") + 1] = self.endpoints["events"]
        self.children.append(broker)
        self._events = make_socket(zmq.Context.instance(), zmq.DEALER, connect=self.endpoints["backend"])
        if self.policy.rules or self.policy.on_demand:
            self._sub = make_socket(zmq.Context.instance(), zmq.SUB, connect=self.endpoints["events"])
            for prefix in (b"attach.", b"instrument."):
                self._sub.setsockopt(zmq.SUBSCRIBE, prefix)

        for i, sim in enumerate(self.config.simulators):
            args = ["sim", "--json", "--host", sim.host, "--identity", sim.identity]
            for proto in sim.protocols:
                args += [f"--{proto}", str(sim.ports.get(proto, 0))]
            if sim.advertise:
                args += ["--advertise", sim.advertise]
            if sim.hislip_overlap:
                args.append("--hislip-overlap")
            child = Child(sim.name or f"sim{i}", _visabus_cmd(*args), "simulator", reads_json=True)
            child.start()
            self.children.append(child)
            for proto, res in child.info.items():
                if proto in sim.protocols:
                    # Pin the ephemeral port so a restarted simulator serves the same resource.
                    port = _port_of(res, proto)
                    if port is not None:
                        child.argv[child.argv.index(f"--{proto}") + 1] = str(port)
                    if sim.attach:
                        alias = f"{sim.name}-{proto}" if sim.name else None
                        self._add_worker(res, alias, {})
        for inst in self.config.instruments:
            self._add_worker(inst.resource, inst.name, inst.attributes)
        if self.config.discovery.enabled:
            d = self.config.discovery
            args = ["discovery", "--backend", self.endpoints["backend"], "--interval", str(d.interval_s),
                    "--misses", str(d.misses), "--portmapper-port", str(d.portmapper_port)]
            for iface in d.interfaces:
                args += ["--interface", iface]
            if not d.mdns:
                args.append("--no-mdns")
            if not d.broadcast:
                args.append("--no-broadcast")
            child = Child("discovery", _visabus_cmd(*args), "discovery")
            child.start()
            self.children.append(child)
        self._wait_registered(STARTUP_TIMEOUT_S)
        self._announce()

    def _wait_registered(self, timeout: float) -> None:
        """Announce once every worker has registered and tried its instrument (so `serve` output means ready)."""
        wanted = {canonical(res) for res in self.resources.values()}
        sock = make_socket(zmq.Context.instance(), zmq.DEALER, connect=self.endpoints["frontend"])
        deadline = time.monotonic() + timeout
        try:
            for attempt in itertools.count(1):
                sock.send(schema.pack(schema.request("list", attempt, sid="supervisor", timeout_ms=1000)))
                if sock.poll(1000):
                    reply = schema.unpack(sock.recv_multipart()[0])
                    have = {r["res"] for r in reply.get("resources", [])
                            if r.get("source") == "worker" and r.get("state") != "connecting"}
                    if wanted <= have:
                        return
                if time.monotonic() > deadline:
                    log.warning("supervisor.workers_slow_to_register", missing=sorted(wanted - have))
                    return
                time.sleep(0.05)  # poll interval while workers start (no event to wait on yet)
        finally:
            sock.send(schema.pack(schema.request("bye", 0, sid="supervisor")))
            sock.close(linger=100)

    def _add_worker(self, resource: str, alias: str | None, attributes: dict[str, Any]) -> Child:
        b = self.config.broker
        args = ["worker", resource, "--backend", self.endpoints["backend"], "--heartbeat-ms", str(b.heartbeat_ms),
                "--liveness", str(b.liveness)]
        if alias:
            args += ["--alias", alias]
        for key, value in attributes.items():
            args += ["--attr", f"{key}={json.dumps(value)}"]
        child = Child(f"worker:{alias or resource}", _visabus_cmd(*args), "worker")
        child.start()
        self.children.append(child)
        self.resources[alias or resource] = resource
        return child

    def _announce(self) -> None:
        summary = {**self.endpoints, "resources": self.resources,
                   "pids": {c.name: c.pid for c in self.children}}
        if self.json_output:
            print(json.dumps(summary), flush=True)
        else:
            print(f"visabus serving — clients connect to {self.endpoints['frontend']}", flush=True)
            print(f"  events published on {self.endpoints['events']}, workers on {self.endpoints['backend']}")
            for name, res in self.resources.items():
                print(f"  {name:24s} {res}" if name != res else f"  {res}")
            print("Ctrl-C stops everything.", flush=True)

    # ------------------------------------------------------------------------------ supervise
    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        try:
            self.start()
            while not self._stop.is_set():
                self._wait_for_events(0.2)
                self._check_children()
                self._apply(self.policy.due(time.monotonic()))
        finally:
            self.shutdown()
        return 0

    def _wait_for_events(self, timeout: float) -> None:
        if self._sub is None:
            self._stop.wait(timeout)
            return
        if not self._sub.poll(int(timeout * 1000)):
            return
        while self._sub.poll(0):
            _, body = self._sub.recv_multipart()[:2]
            try:
                event = schema.unpack(body)
            except schema.MalformedMessage:
                continue
            served = {canonical(r) for r in self.resources.values()}
            self._apply(self.policy.on_event(str(event.get("topic")), event, time.monotonic(), served))

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if action.kind == "start" and action.res not in self.dynamic:
                log.info("supervisor.attach", resource=action.res, reason=action.reason)
                self.dynamic[action.res] = self._add_worker(action.res, None, {})
                self._publish("supervisor.attached", {"res": action.res, "reason": action.reason})
            elif action.kind == "stop" and action.res in self.dynamic:
                child = self.dynamic.pop(action.res)
                log.info("supervisor.detach", resource=action.res, reason=action.reason)
                self.children.remove(child)
                self.resources = {k: v for k, v in self.resources.items() if v != action.res}
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.terminate()
                    try:
                        child.proc.wait(STOP_GRACE_S)
                    except subprocess.TimeoutExpired:
                        child.proc.kill()
                        child.proc.wait()
                self._publish("supervisor.detached", {"res": action.res, "reason": action.reason})

    def _check_children(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.proc is None:
                if child.restart_at is not None and now >= child.restart_at:
                    self._restart(child)
                continue
            code = child.proc.poll()
            if code is None:
                if now - child.started_at > STABLE_AFTER_S:
                    child.backoff = 1.0
                continue
            if child.kind == "worker" and code == 3:
                # Another live worker owns the resource; try again later (backoff) rather than never.
                log.error("supervisor.worker_rejected", child=child.name, retry_in_s=child.backoff)
            child.proc = None
            child.restart_at = now + child.backoff
            log.warning("supervisor.child_died", child=child.name, exit_code=code, restart_in_s=child.backoff)
            self._publish("supervisor.child_died", {"child": child.name, "exit_code": code,
                                                    "restart_in_s": child.backoff})
            child.backoff = min(child.backoff * 2, self.config.restart_max_backoff_s)

    def _restart(self, child: Child) -> None:
        child.restart_at = None
        child.restarts += 1
        try:
            child.start()
        except (OSError, RuntimeError) as exc:
            log.error("supervisor.restart_failed", child=child.name, error=str(exc))
            child.proc = None
            child.restart_at = time.monotonic() + child.backoff
            return
        log.info("supervisor.restarted", child=child.name, pid=child.pid, restarts=child.restarts)
        self._publish("supervisor.restart", {"child": child.name, "pid": child.pid, "restarts": child.restarts})

    def _publish(self, topic: str, data: dict[str, Any]) -> None:
        if self._events is None:
            return
        try:
            self._events.send(schema.pack({"v": schema.VERSION, "op": "event", "topic": topic, "data": data}),
                              flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # ------------------------------------------------------------------------------ stop
    def shutdown(self) -> None:
        order = {"worker": 0, "discovery": 1, "simulator": 2, "broker": 3}
        live = [(c.name, c.proc) for c in sorted(self.children, key=lambda c: order[c.kind])
                if c.proc is not None and c.proc.poll() is None]
        for _, proc in live:
            proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for name, proc in live:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("supervisor.kill", child=name)
                proc.kill()
                proc.wait()
        for leftover in psutil.Process().children(recursive=True):
            try:
                log.warning("supervisor.sweep", pid=leftover.pid, cmd=" ".join(leftover.cmdline()[:4]))
                leftover.kill()
            except psutil.Error:
                pass
        for sock in (self._events, self._sub):
            if sock is not None:
                sock.close(linger=0)
        log.info("supervisor.stopped")


def _port_of(resource: str, protocol: str) -> int | None:
    try:
        return parse_resource(resource).port
    except VisaBusError:
        return None

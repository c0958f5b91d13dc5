"""The discovery service: VXI-11 broadcast scans and mDNS browsing feeding one inventory, whose events go
to `emit(topic, data)`.

One thread owns the inventory and runs the loop, in the spirit of a Majordomo actor:

    select(scan sockets, probe sockets, wake socket) → observe each reply as it arrives → end the
    broadcast round when its window closes (hysteresis) → end the mDNS liveness round and send the next
    probes → drain the queue of mDNS updates and identification results → emit events

zeroconf's browser thread and the identification pool only put items on a queue and wake the loop.
`run(stop)` goes on until `stop` is set; `scan_once(timeout_s)` runs the same loop for a while and returns
the instruments found, as `list_resources` would.
"""

from __future__ import annotations

import ipaddress
import math
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog

from .interfaces import Interface, resolve_interfaces
from .inventory import DISAPPEARED, Event, Inventory, Observation, Source, metadata_from_idn
from .mdns import MdnsBrowser, MdnsFound, MdnsGone, MdnsRecord
from .mdns_probe import MdnsProber
from .vxi11_scan import BroadcastScanner, ScanHit, core_port_lookup

log = structlog.get_logger(__name__)

Emit = Callable[[str, dict[str, Any]], None]
Identify = Callable[[str], "str | None"]
_MAX_SELECT_S = 0.2  # how long the loop may go without looking at the stop flag
_IDENTIFY_WORKERS = 4


class DiscoveryConfigError(ValueError):
    """A discovery setting is invalid; the message names the key."""


@dataclass(frozen=True)
class DiscoveryConfig:
    interfaces: tuple[str, ...] = ("127.0.0.1",)
    interval_s: float = 1.0  # broadcast scan period
    misses: int = 3  # consecutive missed rounds before a resource is gone
    mdns: bool = True
    broadcast: bool = True
    portmapper_port: int = 111
    window_s: float = 0.5  # how long a broadcast round collects replies (≤ interval_s)
    mdns_probe_s: float | None = None  # mDNS liveness probe period; None = interval_s

    def __post_init__(self) -> None:
        if isinstance(self.interfaces, str) or not all(isinstance(i, str) and i for i in self.interfaces):
            raise DiscoveryConfigError(f"discovery.interfaces must be a list of names or addresses: {self.interfaces!r}")
        if not self.interfaces:
            raise DiscoveryConfigError("discovery.interfaces is empty: name at least one interface or address")
        object.__setattr__(self, "interfaces", tuple(self.interfaces))
        for key in ("interval_s", "window_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise DiscoveryConfigError(f"discovery.{key} must be a positive number of seconds, not {value!r}")
        if self.window_s > self.interval_s:
            raise DiscoveryConfigError(
                f"discovery.window_s ({self.window_s}) must not exceed discovery.interval_s ({self.interval_s})"
            )
        probe = self.mdns_probe_s
        if probe is not None and (isinstance(probe, bool) or not isinstance(probe, int | float) or not 0 < probe < math.inf):
            raise DiscoveryConfigError(f"discovery.mdns_probe_s must be a positive number of seconds, not {probe!r}")
        if isinstance(self.misses, bool) or not isinstance(self.misses, int) or self.misses < 1:
            raise DiscoveryConfigError(f"discovery.misses must be an integer ≥ 1, not {self.misses!r}")
        port = self.portmapper_port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise DiscoveryConfigError(f"discovery.portmapper_port must be a UDP port (1-65535), not {port!r}")
        for key in ("mdns", "broadcast"):
            if not isinstance(getattr(self, key), bool):
                raise DiscoveryConfigError(f"discovery.{key} must be true or false, not {getattr(self, key)!r}")

    @property
    def probe_s(self) -> float:
        return self.mdns_probe_s if self.mdns_probe_s is not None else self.interval_s

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> DiscoveryConfig:
        """From a `[discovery]` TOML table; unknown keys are an error naming them ("enabled" is the
        supervisor's and is ignored here)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known - {"enabled"})
        if unknown:
            raise DiscoveryConfigError(f"unknown discovery setting(s): {', '.join('discovery.' + k for k in unknown)}")
        values = {k: v for k, v in data.items() if k in known}
        if "interfaces" in values and isinstance(values["interfaces"], list):
            values["interfaces"] = tuple(values["interfaces"])
        return cls(**values)


@dataclass
class _Run:
    """State of one loop run (continuous or one-shot). Other threads only `post` to it."""

    inventory: Inventory
    emit: Emit | None
    queue: queue.SimpleQueue[tuple[str, Any]] = field(default_factory=queue.SimpleQueue)
    wake_r: socket.socket = field(init=False)
    wake_w: socket.socket = field(init=False)
    scanner: BroadcastScanner | None = None
    prober: MdnsProber | None = None
    browser: MdnsBrowser | None = None
    round_ends_at: float | None = None
    next_scan_at: float = 0.0
    next_probe_at: float = 0.0
    identifying: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)

    def post(self, kind: str, item: Any) -> None:
        """From any thread: queue an item for the loop and wake it."""
        self.queue.put((kind, item))
        try:
            self.wake_w.send(b"\0")
        except OSError:  # buffer full (the loop is awake anyway) or the run has ended
            pass

    def clear_wake(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except OSError:  # BlockingIOError: drained
            pass

    def close(self) -> None:
        self.wake_r.close()
        self.wake_w.close()


class DiscoveryService:
    """Finds instruments on the configured interfaces and reports them as events.

    `emit(topic, data)` is called from the loop thread for every `instrument.appeared`,
    `instrument.disappeared` and `instrument.changed`. `identify(resource)` (optional) returns the
    instrument's *IDN? answer or None; it runs on a small pool for resources whose records carry no
    manufacturer and serial, so they can be grouped with the instrument's other resources.
    """

    def __init__(self, config: DiscoveryConfig, emit: Emit, *, identify: Identify | None = None) -> None:
        self.config = config
        self._emit = emit
        self._identify = identify

    # ------------------------------------------------------------------ public
    def run(self, stop: threading.Event) -> None:
        """Discover continuously until `stop` is set."""
        self._loop(_Run(Inventory(self.config.misses), self._emit), stop, deadline=None)

    def scan_once(self, timeout_s: float = 2.0) -> list[dict[str, Any]]:
        """Discover for `timeout_s` and return the instruments found (event-shaped dicts, no events)."""
        if not timeout_s > 0:
            raise ValueError(f"scan timeout must be positive, not {timeout_s!r}")
        # Nothing found in a one-shot scan is forgotten for missing later rounds; goodbyes still count.
        state = _Run(Inventory(misses=1 << 30), None)
        self._loop(state, threading.Event(), deadline=time.monotonic() + timeout_s)
        return state.inventory.instruments(time.time())

    def close(self) -> None:
        """Nothing to release: each run opens and closes its own sockets. Kept so callers may always
        pair construction with close()."""

    # -------------------------------------------------------------------- loop
    def _loop(self, state: _Run, stop: threading.Event, deadline: float | None) -> None:
        cfg = self.config
        interfaces = resolve_interfaces(cfg.interfaces)
        log.info(
            "discovery.started",
            interfaces=[f"{i.name}={i.address}" for i in interfaces],
            broadcast=cfg.broadcast, mdns=cfg.mdns, interval_s=cfg.interval_s, misses=cfg.misses,
        )
        pool = ThreadPoolExecutor(_IDENTIFY_WORKERS, "discovery-identify") if self._identify else None
        try:
            self._open(state, interfaces)
            now = time.monotonic()
            state.next_scan_at = state.next_probe_at = now
            while not stop.is_set():
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                self._tick(state, now, pool)
                self._drain(state, pool)
                self._wait(state, now, deadline, pool)
            if deadline is not None and state.scanner is not None and state.round_ends_at is not None:
                self._end_scan_round(state, state.scanner, pool)
            self._drain(state, pool)
        finally:
            self._close(state)
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            state.close()
            log.info("discovery.stopped")

    def _open(self, state: _Run, interfaces: Sequence[Interface]) -> None:
        cfg = self.config
        if cfg.broadcast:
            state.scanner = BroadcastScanner(interfaces, cfg.portmapper_port)
            state.scanner.open()
        if cfg.mdns:
            addresses = [i.address for i in interfaces]
            networks = [ipaddress.IPv4Network(f"{i.address}/{i.netmask}", strict=False) for i in interfaces]
            state.prober = MdnsProber(addresses)
            state.prober.open()
            state.browser = MdnsBrowser(
                addresses, lambda update: state.post("mdns", update), networks=networks,
                core_port_lookup=core_port_lookup(),
            )
            state.browser.start()

    def _close(self, state: _Run) -> None:
        if state.browser is not None:
            state.browser.stop()
        if state.prober is not None:
            state.prober.close()
        if state.scanner is not None:
            state.scanner.close()

    def _tick(self, state: _Run, now: float, pool: ThreadPoolExecutor | None) -> None:
        cfg = self.config
        if state.scanner is not None:
            if state.round_ends_at is not None and now >= state.round_ends_at:
                self._end_scan_round(state, state.scanner, pool)
            if state.round_ends_at is None and now >= state.next_scan_at:
                state.scanner.begin_round()
                state.round_ends_at = now + cfg.window_s
                state.next_scan_at = max(state.next_scan_at + cfg.interval_s, now + cfg.window_s)
        if state.prober is not None and state.browser is not None and now >= state.next_probe_at:
            # Records multicast since the last round count as answers too: a responder that ignores
            # one-shot queries still answers the multicast one the browser sends.
            self._on_probe_answers(state, state.browser, state.browser.take_heard(), pool)
            self._deliver(state, state.inventory.end_round(Source.MDNS, time.time()), pool)
            names = [r.name for r in state.browser.records()]
            state.prober.send(names)
            state.browser.query(names)
            state.browser.retry_pending()
            state.next_probe_at = max(state.next_probe_at + cfg.probe_s, now)

    def _end_scan_round(self, state: _Run, scanner: BroadcastScanner, pool: ThreadPoolExecutor | None) -> None:
        scanner.end_round()
        state.round_ends_at = None
        self._deliver(state, state.inventory.end_round(Source.BROADCAST, time.time()), pool)

    def _on_scan_hits(self, state: _Run, hits: Sequence[ScanHit], pool: ThreadPoolExecutor | None) -> None:
        when = time.time()
        for hit in hits:
            obs = Observation(hit.resource, "vxi11", hit.address, {}, Source.BROADCAST, when)
            self._deliver(state, state.inventory.observe(obs), pool)

    def _on_probe_answers(
        self, state: _Run, browser: MdnsBrowser, names: set[str], pool: ThreadPoolExecutor | None
    ) -> None:
        when = time.time()
        for name in sorted(names):
            record = browser.record(name)
            if record is not None and not state.inventory.seen(Source.MDNS, origin=record.name):
                # answering again after it was given up: it is back
                self._deliver(state, state.inventory.observe(_mdns_observation(record, when)), pool)

    def _drain(self, state: _Run, pool: ThreadPoolExecutor | None) -> None:
        while True:
            try:
                kind, item = state.queue.get_nowait()
            except queue.Empty:
                return
            when = time.time()
            if kind == "mdns" and isinstance(item, MdnsFound):
                self._deliver(state, state.inventory.observe(_mdns_observation(item.record, when)), pool)
            elif kind == "mdns" and isinstance(item, MdnsGone):
                self._deliver(state, state.inventory.withdraw(Source.MDNS, when, origin=item.name), pool)
            elif kind == "identified":
                resource, idn = item
                self._deliver(state, state.inventory.identify(resource, metadata_from_idn(idn), when), pool)

    def _wait(self, state: _Run, now: float, deadline: float | None, pool: ThreadPoolExecutor | None) -> None:
        wake_at = [now + _MAX_SELECT_S]
        if state.scanner is not None:
            wake_at.append(state.round_ends_at if state.round_ends_at is not None else state.next_scan_at)
        if state.prober is not None:
            wake_at.append(state.next_probe_at)
        if deadline is not None:
            wake_at.append(deadline)
        timeout = max(0.0, min(wake_at) - time.monotonic())
        sockets: list[socket.socket] = [state.wake_r]
        if state.scanner is not None:
            sockets += state.scanner.sockets
        if state.prober is not None:
            sockets += state.prober.sockets
        readable, _, _ = select.select(sockets, [], [], timeout)
        for sock in readable:
            if sock is state.wake_r:
                state.clear_wake()
            elif state.scanner is not None and sock in state.scanner.sockets:
                self._on_scan_hits(state, state.scanner.read(sock), pool)
            elif state.prober is not None and state.browser is not None:
                self._on_probe_answers(state, state.browser, state.prober.read(sock), pool)

    # ---------------------------------------------------------------- helpers
    def _deliver(self, state: _Run, events: list[Event], pool: ThreadPoolExecutor | None) -> None:
        for topic, data in events:
            if topic == DISAPPEARED:
                state.identifying.difference_update(data["resources"])
            else:
                self._maybe_identify(state, data["resources"], pool)
            log.info(topic, key=data["key"], resources=data["resources"])
            if state.emit is None:
                continue
            try:
                state.emit(topic, data)
            except Exception:  # the emitter is the caller's plumbing: report it, keep discovering
                log.exception("discovery.emit_failed", topic=topic, key=data["key"])

    def _maybe_identify(self, state: _Run, resources: Sequence[str], pool: ThreadPoolExecutor | None) -> None:
        if pool is None or self._identify is None:
            return
        for resource in resources:
            if resource in state.identifying or not state.inventory.needs_identity(resource):
                continue
            state.identifying.add(resource)
            pool.submit(self._run_identify, state, self._identify, resource)

    @staticmethod
    def _run_identify(state: _Run, identify: Identify, resource: str) -> None:
        try:
            idn = identify(resource)
        except Exception:  # a user hook: its failure must not end discovery
            log.exception("discovery.identify_failed", resource=resource)
            return
        if idn:
            state.post("identified", (resource, idn))


def _mdns_observation(record: MdnsRecord, when: float) -> Observation:
    return Observation(
        record.resource, record.protocol, record.address, record.metadata, Source.MDNS, when, origin=record.name
    )

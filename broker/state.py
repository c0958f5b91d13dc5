"""The broker's bookkeeping records: requests, workers, resources, client sessions."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from visabus.sdk.schema import Header

from .fairqueue import FairQueue
from .locks import LockState

DONE_IDS_KEPT = 4096  # per client session, for at-most-once duplicate detection


@dataclass
class Request:
    bid: int                 # broker-wide id (what the worker sees)
    rid: bytes               # client's routing id (where replies go)
    sid: str                 # client session (who owns it: locks, fairness, leases)
    cid: Any                 # the client's own request id
    header: Header
    frames: list[Any]
    res: str
    received: float
    deadline: float | None   # None = wait forever
    timeout_s: float | None = None  # the effective per-operation timeout (default applied)
    answered: bool = False   # the broker already answered (timeout/worker death); drop late replies
    internal: bool = False   # issued by the broker itself (fence): the reply is handled, not forwarded
    queued_bytes: int = 0    # payload bytes counted in its instrument's queue while it waits there
    chunks: int = 0

    @property
    def op(self) -> str:
        return str(self.header.get("op"))


@dataclass
class LockWaiter:
    rid: bytes
    sid: str
    header: Header
    exclusive: bool
    key: str | None
    deadline: float | None


@dataclass
class WorkerEntry:
    rid: bytes               # control socket: registration, heartbeats, out-of-band (clear/cancel/credit)
    res: str
    state: str
    last_seen: float
    wid: str = ""
    data_rid: bytes | None = None  # data socket: requests and replies (attached by the worker's executor)
    dispatched: int = 0      # requests sent so far; a clear tells the worker it covers all up to this
    fence: bool = False      # take the instrument's own lock while a bus lock is held
    pid: int | None = None
    protocol: str | None = None
    inflight: Request | None = None
    oob: dict[int, Request] = field(default_factory=dict)  # out-of-band requests (clear) in progress


@dataclass
class ResourceStats:
    requests: int = 0
    errors: int = 0
    timeouts: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    max_queue: int = 0


@dataclass
class ResourceEntry:
    res: str
    queue: FairQueue[Request]
    alias: str | None = None
    worker: bytes | None = None
    state: str = "down"
    protocol: str | None = None
    locks: LockState = field(default_factory=LockState)
    lock_waiters: list[LockWaiter] = field(default_factory=list)
    open_waiters: list[LockWaiter] = field(default_factory=list)  # opens waiting for an on-demand worker
    priority: list[Request] = field(default_factory=list)  # broker jobs (fence) that go before the queue
    fence_state: str = "off"           # the instrument's own lock: off / taking / on / releasing
    fence_grants: list[tuple[LockWaiter, str | None, int]] = field(default_factory=list)  # held until fenced
    on_demand: bool = False            # created by attach-on-demand: forgotten again if no worker comes
    reserved_by: str | None = None     # a client that wrote a query and has not read its answer yet
    reserved_until: float = 0.0
    stats: ResourceStats = field(default_factory=ResourceStats)
    queued_bytes: int = 0              # payload bytes of the queued requests


@dataclass
class ClientSession:
    sid: str
    last_seen: float
    name: str = ""
    rids: set[bytes] = field(default_factory=set)
    pending: dict[Any, int] = field(default_factory=dict)  # client id -> broker id (queued or in flight)
    done_order: collections.deque[Any] = field(default_factory=collections.deque)
    done: set[Any] = field(default_factory=set)

    def mark_done(self, cid: Any) -> None:
        self.pending.pop(cid, None)
        if cid is None or cid in self.done:
            return
        self.done.add(cid)
        self.done_order.append(cid)
        if len(self.done_order) > DONE_IDS_KEPT:
            self.done.discard(self.done_order.popleft())

"""The broker: one event loop routing client requests to the worker that owns each instrument.

    poll -> handle clients -> handle workers -> purge (deadlines, leases, liveness) -> heartbeat

It never touches an instrument. It answers at once for unknown resources, bad input and dead workers;
expires requests past their deadline; serves each instrument's queue fairly across clients; holds the
locks (leased to client sessions); and publishes events. Every message is validated against the wire
schema in visabus.sdk.schema: malformed input is answered with an error or dropped with a log line.
"""

from __future__ import annotations

import collections
import itertools
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import zmq

from visabus.sdk import schema
from visabus.sdk.errors import InvalidResourceName, StatusCode, VisaBusError
from visabus.sdk.resources import canonical
from visabus.sdk.transport import (
    DEFAULT_BACKEND,
    DEFAULT_EVENTS,
    DEFAULT_FRONTEND,
    EVENT_HWM,
    bound_endpoint,
    make_socket,
)

from .directory import Directory
from .fairqueue import FairQueue
from .locking import LockManager
from .state import ClientSession, Request, ResourceEntry, WorkerEntry

log = structlog.get_logger(__name__)

RETIRED_SESSIONS_KEPT = 1024  # ended client sessions whose request ids are still remembered
CANONICAL_CACHE_SIZE = 4096
PURGE_INTERVAL_S = 0.02       # deadlines, leases and liveness are checked this often, not per message


@dataclass
class BrokerConfig:
    frontend: str = DEFAULT_FRONTEND
    backend: str = DEFAULT_BACKEND
    events: str = DEFAULT_EVENTS
    heartbeat_ms: int = 1000
    liveness: int = 3               # missed worker heartbeats before a worker is declared dead
    lease_ms: int = 10_000          # a client silent this long loses its locks and queued requests
    queue_limit: int = 1024         # per instrument
    queue_bytes_limit: int = 512 << 20  # payload bytes waiting per instrument
    max_message_bytes: int = 1 << 30    # per frame: ZeroMQ drops a client connection that sends a larger one
    grace_ms: int = 1000            # extra time a worker gets past a request's deadline
    attach_on_demand: bool = False  # open of an unserved resource asks the supervisor for a worker
    attach_timeout_ms: int = 10_000


class Broker:
    def __init__(self, config: BrokerConfig | None = None, ctx: zmq.Context | None = None) -> None:
        self.config = config or BrokerConfig()
        self.ctx = ctx or zmq.Context.instance()
        self.frontend = make_socket(self.ctx, zmq.ROUTER, bind=self.config.frontend,
                                    max_message=self.config.max_message_bytes)
        self.backend = make_socket(self.ctx, zmq.ROUTER, bind=self.config.backend)
        self.events = make_socket(self.ctx, zmq.PUB, bind=self.config.events, hwm=EVENT_HWM)
        self.endpoints = {
            "frontend": bound_endpoint(self.frontend),
            "backend": bound_endpoint(self.backend),
            "events": bound_endpoint(self.events),
        }
        self.workers: dict[bytes, WorkerEntry] = {}       # by control-socket routing id
        self.data_rids: dict[bytes, bytes] = {}           # data-socket routing id -> control routing id
        self.pending_attach: dict[str, bytes] = {}        # worker id -> data rid seen before its `ready`
        self.resources: dict[str, ResourceEntry] = {}
        self.aliases: dict[str, str] = {}
        self.sessions: dict[str, ClientSession] = {}
        self.rid_sid: dict[bytes, str] = {}
        self.discovered: dict[str, dict[str, Any]] = {}
        self.instrument_resources: dict[str, set[str]] = {}  # discovery key -> its resources
        self.retired: collections.OrderedDict[str, ClientSession] = collections.OrderedDict()
        self._canonical_cache: dict[str, str] = {}  # resource spelling -> canonical (parsing is not free)
        self._next_purge = 0.0
        self.inflight_by_bid: dict[int, Request] = {}
        self._bids = itertools.count(1)
        self.instance = secrets.token_hex(4)  # dispatch numbers and clears are meaningful per broker run
        self._topic_seq: dict[str, int] = {}
        self._stopping = False
        self._next_heartbeat = 0.0
        self.dropped_replies = 0
        self.locking = LockManager(self)
        self.directory = Directory(self)
        self._broker_ops: dict[str, Callable[[bytes, ClientSession, schema.Header, list[Any]], None]] = {
            "hello": self._op_hello, "heartbeat": self._op_heartbeat, "bye": self._op_bye, "list": self.directory.op_list,
            "status": self.directory.op_status, "open": self.directory.op_open, "close": self._op_close, "lock": self.locking.op_lock,
            "unlock": self.locking.op_unlock, "cancel": self._op_cancel, "credit": self._op_credit, "ping": self._op_ping,
        }

    # ================================================================================== loop
    def stop(self) -> None:
        self._stopping = True

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        log.info("broker.started", pid=os.getpid(), **self.endpoints)
        while not self._stopping:
            ready = dict(poller.poll(self._poll_timeout_ms()))
            if self.backend in ready:
                self._drain(self.backend, self._on_worker_message)
            if self.frontend in ready:
                self._drain(self.frontend, self._on_client_message)
            now = time.monotonic()
            if now >= self._next_purge:
                self._next_purge = now + PURGE_INTERVAL_S
                self._purge(now)
            if now >= self._next_heartbeat:
                self._heartbeat(now)
        self.close()

    def close(self) -> None:
        for entry in list(self.workers.values()):
            self._send_worker(entry.rid, {"v": schema.VERSION, "op": "disconnect"})
        for sock in (self.frontend, self.backend, self.events):
            sock.close(linger=0)

    def _poll_timeout_ms(self) -> int:
        return max(1, min(250, self.config.heartbeat_ms // 2))

    def _drain(self, sock: zmq.Socket, handler: Callable[[list[Any]], None]) -> None:
        for _ in range(256):  # bounded so neither side starves the other
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handler(frames)
            except VisaBusError as exc:  # a handler's precise error that had no request to answer
                log.warning("broker.handler_error", error=str(exc))
            except Exception:  # a bug in one message's handling must not stop the bus for everyone
                log.exception("broker.handler_bug")

    # ========================================================================= sending helpers
    def _send(self, sock: zmq.Socket, rid: bytes, header: schema.Header, frames: Sequence[Any] = ()) -> bool:
        try:
            sock.send_multipart([rid, schema.pack(header), *frames], flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.dropped_replies += 1
            log.warning("broker.peer_not_reading", peer=rid.hex(), op=header.get("op"))
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone
            self.dropped_replies += 1
            log.info("broker.peer_gone", peer=rid.hex(), op=header.get("op"), error=str(exc))
        return False

    def _send_client(self, rid: bytes, header: schema.Header, frames: Sequence[Any] = ()) -> bool:
        return self._send(self.frontend, rid, header, frames)

    def _send_worker(self, rid: bytes, header: schema.Header, frames: Sequence[Any] = ()) -> bool:
        return self._send(self.backend, rid, header, frames)

    def _error(self, rid: bytes, header: schema.Header, code: StatusCode, message: str, **fields: Any) -> None:
        self._send_client(rid, schema.error_reply(header, code, message, **fields))

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        seq = self._topic_seq[topic] = self._topic_seq.get(topic, 0) + 1
        try:
            self.events.send_multipart(schema.event_payload(topic, seq, time.time(), data), flags=zmq.NOBLOCK)
        except zmq.Again:  # PUB drops rather than blocks; subscribers see the gap in `seq`
            pass

    # ========================================================================= client side
    def _on_client_message(self, frames: list[Any]) -> None:
        rid = frames[0].bytes
        try:
            header, data = schema.decode([f.buffer for f in frames[1:2]] + frames[2:])
        except schema.MalformedMessage as exc:
            log.warning("broker.malformed_client_message", peer=rid.hex(), error=str(exc))
            rid_ok = type(exc.header.get("id")) is int
            echo = {"op": exc.header.get("op") if isinstance(exc.header.get("op"), str) else None,
                    "id": exc.header["id"] if rid_ok else None}
            self._error(rid, echo, exc.code, str(exc))
            return
        session = self._session_for(rid, header)
        handler = self._broker_ops.get(header["op"])
        if handler is not None:
            handler(rid, session, header, data)
        else:
            self._enqueue(rid, session, header, data)

    def _session_for(self, rid: bytes, header: schema.Header) -> ClientSession:
        now = time.monotonic()
        sid = header.get("sid") if isinstance(header.get("sid"), str) else self.rid_sid.get(rid)
        if not sid:
            sid = self.rid_sid.get(rid) or f"anon-{rid.hex()}"  # clients that skip hello still get a session
        session = self.sessions.get(sid)
        if session is None:
            session = self.retired.pop(sid, None) or ClientSession(sid=sid, last_seen=now)
            session.rids = set()
            self.sessions[sid] = session
        if rid not in session.rids:
            session.rids.add(rid)
            self.rid_sid[rid] = sid
        session.last_seen = now
        return session

    def _resolve(self, rid: bytes, header: schema.Header) -> ResourceEntry | None:
        """The resource a request names (alias or any spelling), or None after answering the error."""
        text = header.get("res", "")
        res = self.aliases.get(text) or self._canonical_cache.get(text)
        if res is None:
            try:
                res = canonical(text)
            except InvalidResourceName as exc:
                self._error(rid, header, exc.code, exc.message)
                return None
            if len(self._canonical_cache) >= CANONICAL_CACHE_SIZE:
                self._canonical_cache.clear()
            self._canonical_cache[text] = res
        entry = self.resources.get(res)
        if entry is None:
            known = ", ".join(sorted(self.resources)[:8]) or "none"
            hint = " (seen by discovery but no worker is attached)" if res in self.discovered else ""
            self._error(rid, header, StatusCode.VI_ERROR_RSRC_NFOUND,
                        f"no worker serves {res}{hint}; served resources: {known}. Check `visabus list`.")
            return None
        return entry

    def _op_hello(self, rid: bytes, session: ClientSession, header: schema.Header, data: list[Any]) -> None:
        session.name = str(header.get("name") or session.name)
        self._send_client(rid, schema.reply(header, 0, events=self.endpoints["events"], lease_ms=self.config.lease_ms,
                                            heartbeat_ms=self.config.heartbeat_ms, version=schema.VERSION))

    def _op_heartbeat(self, rid: bytes, session: ClientSession, header: schema.Header, data: list[Any]) -> None:
        self._send_client(rid, schema.reply(header, 0))

    def _op_bye(self, rid: bytes, session: ClientSession, header: schema.Header, data: list[Any]) -> None:
        self._send_client(rid, schema.reply(header, 0))
        self._expire_session(session, "said goodbye")

    def _op_ping(self, rid: bytes, session: ClientSession, header: schema.Header, data: list[Any]) -> None:
        # Lets a subscriber prove its subscription is live: the probe is published, not sequenced.
        try:
            self.events.send_multipart([f"ping.{header['token']}".encode(), schema.pack({"ping": True})],
                                       flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
        self._send_client(rid, schema.reply(header, 0))


    def _session_label(self, sid: str) -> str:
        session = self.sessions.get(sid)
        return f"{session.name}({sid})" if session and session.name else sid


    def _op_close(self, rid: bytes, session: ClientSession, header: schema.Header, data: list[Any]) -> None:
        entry = self._resolve(rid, header)
        if entry is None:
            return
        if entry.locks.release_session(session.sid):
            self.locking.changed(entry, session.sid, "released")
        if entry.reserved_by == session.sid:
            entry.reserved_by = None
        self._send_client(rid, schema.reply(header, 0))
        self._dispatch(entry)



    def _op_cancel(self, rid: bytes, session: ClientSession, header: schema.Header, data: list[Any]) -> None:
        bid = session.pending.get(header["target"])
        state = "unknown"
        if bid is not None:
            req = self.inflight_by_bid.get(bid)
            if req is not None and not req.answered:
                state = "aborting"
                worker = self.resources[req.res].worker
                if worker is not None:
                    self._send_worker(worker, {"v": schema.VERSION, "op": "cancel", "id": bid})
            else:
                for entry in self.resources.values():
                    for dropped in entry.queue.remove(session.sid, lambda r: r.bid == bid):
                        state = "dequeued"
                        self._fail(dropped, StatusCode.VI_ERROR_ABORT, "request cancelled by the client before it ran")
        self._send_client(rid, schema.reply(header, 0, state=state))

    def _op_credit(self, rid: bytes, session: ClientSession, header: schema.Header, data: list[Any]) -> None:
        bid = session.pending.get(header["target"])
        req = self.inflight_by_bid.get(bid) if bid is not None else None
        if req is not None:
            worker = self.resources[req.res].worker
            if worker is not None:
                self._send_worker(worker, {"v": schema.VERSION, "op": "credit", "id": bid, "n": header["n"]})

    # ------------------------------------------------------------------------------ requests
    def _enqueue(self, rid: bytes, session: ClientSession, header: schema.Header, data: list[Any]) -> None:
        cid = header.get("id")
        if cid in session.pending or cid in session.done:
            # At-most-once: a resent id is never executed again.
            self._error(rid, header, StatusCode.VI_ERROR_INV_PARAMETER,
                        f"request id {cid!r} was already received from this client; it is not executed twice",
                        duplicate=True)
            return
        entry = self._resolve(rid, header)
        if entry is None:
            return
        now = time.monotonic()
        timeout_ms = header.get("timeout_ms", schema.DEFAULT_TIMEOUT_MS)
        timeout_s = None if timeout_ms is None else timeout_ms / 1000.0
        req = Request(bid=next(self._bids), rid=rid, sid=session.sid, cid=cid, header=header, frames=data,
                      res=entry.res, received=now, deadline=None if timeout_s is None else now + timeout_s,
                      timeout_s=timeout_s)
        size = sum(len(f) for f in data)
        entry.stats.requests += 1
        entry.stats.bytes_in += size
        if entry.worker is None:
            self._fail(req, StatusCode.VI_ERROR_CONN_LOST,
                       f"{entry.res}: its worker is down (restarting?); the request was not executed",
                       outcome="not_executed")
            return
        if header["op"] == "clear":
            self._send_out_of_band(entry, req)
            return
        if entry.queued_bytes + size > self.config.queue_bytes_limit and len(entry.queue):
            self._fail(req, StatusCode.VI_ERROR_RSRC_BUSY,
                       f"{entry.res}: {entry.queued_bytes} bytes already wait for this instrument "
                       f"(limit {self.config.queue_bytes_limit}); retry later")
            return
        if not entry.queue.push(session.sid, req):
            self._fail(req, StatusCode.VI_ERROR_RSRC_BUSY,
                       f"{entry.res}: request queue is full ({entry.queue.limit} waiting); retry later")
            return
        entry.queued_bytes += size
        req.queued_bytes = size
        session.pending[cid] = req.bid
        entry.stats.max_queue = max(entry.stats.max_queue, len(entry.queue))
        self._dispatch(entry)

    def _send_out_of_band(self, entry: ResourceEntry, req: Request) -> None:
        if not entry.locks.admits(req.sid):
            self._fail(req, StatusCode.VI_ERROR_RSRC_LOCKED,
                       f"{entry.res} is locked by {', '.join(map(self._session_label, entry.locks.holders()))}")
            return
        worker = self.workers.get(entry.worker) if entry.worker is not None else None
        if worker is None:
            self._fail(req, StatusCode.VI_ERROR_CONN_LOST, f"{entry.res}: its worker is down; the clear was not sent",
                       outcome="not_executed")
            return
        worker.oob[req.bid] = req
        self.inflight_by_bid[req.bid] = req
        self.sessions[req.sid].pending[req.cid] = req.bid
        self._send_worker(worker.rid, {**req.header, "id": req.bid, "upto": worker.dispatched, "bi": self.instance},
                          req.frames)

    def _dispatch(self, entry: ResourceEntry) -> None:
        worker = self.workers.get(entry.worker) if entry.worker else None
        if worker is None or worker.inflight is not None or worker.data_rid is None:
            return
        now = time.monotonic()
        if entry.reserved_by is not None and now >= entry.reserved_until:
            entry.reserved_by = None

        def eligible(sid: str, req: Request) -> bool:
            return entry.locks.admits(sid) and entry.reserved_by in (None, sid)

        req = entry.priority.pop(0) if entry.priority else entry.queue.pop_next(eligible)
        if req is None:
            return
        self._unqueue(entry, req)
        worker.inflight = req
        worker.dispatched += 1
        self.inflight_by_bid[req.bid] = req
        # The worker gets what is left of the caller's timeout, not a fresh one after the queueing.
        left = None if req.deadline is None else max(1, int((req.deadline - now) * 1000))
        self._send_worker(worker.data_rid, {**req.header, "id": req.bid, "n": worker.dispatched, "timeout_ms": left,
                                            "bi": self.instance}, req.frames)

    @staticmethod
    def _unqueue(entry: ResourceEntry, req: Request) -> None:
        entry.queued_bytes -= req.queued_bytes
        req.queued_bytes = 0

    def _fail(self, req: Request, code: StatusCode, message: str, **fields: Any) -> None:
        if req.answered:
            return
        req.answered = True
        entry = self.resources.get(req.res)
        if entry is not None:
            self._unqueue(entry, req)
        if req.internal:
            if entry is not None:
                self.locking.fence_done(entry, req, int(code), message)
            return
        if entry is not None:
            entry.stats.errors += 1
            entry.stats.timeouts += code == StatusCode.VI_ERROR_TMO
        session = self.sessions.get(req.sid)
        if session is not None:
            session.mark_done(req.cid)
        self._error(req.rid, req.header, code, message, **fields)

    # ========================================================================= worker side
    def _on_worker_message(self, frames: list[Any]) -> None:
        rid = frames[0].bytes
        try:
            header, data = schema.decode([f.buffer for f in frames[1:2]] + frames[2:], schema.WORKER_OPS)
        except schema.MalformedMessage as exc:
            log.warning("broker.malformed_worker_message", peer=rid.hex(), error=str(exc))
            return
        op = header["op"]
        now = time.monotonic()
        if op == "event":
            self._on_event(rid, header)
            return
        if op == "ready":
            self._register_worker(rid, header, now)
            return
        if op == "attach":
            self._attach_data_socket(rid, header["wid"])
            return
        worker = self.workers.get(rid) or self.workers.get(self.data_rids.get(rid, b""))
        if worker is None:
            # A worker we do not know (we restarted, or declared it dead): ask it to register again.
            self._send_worker(rid, {"v": schema.VERSION, "op": "reconnect"})
            return
        worker.last_seen = now
        if op == "reply":
            self._on_reply(worker, header, data, now)
        elif op == "state" or (op == "heartbeat" and header["state"] != worker.state):
            self._set_worker_state(worker, header["state"], header.get("detail"))
        elif op == "bye":
            self._worker_gone(worker, "worker said goodbye")

    def _register_worker(self, rid: bytes, header: schema.Header, now: float) -> None:
        try:
            res = canonical(header["res"])
        except InvalidResourceName as exc:
            self._send_worker(rid, {"v": schema.VERSION, "op": "reject", "msg": exc.message})
            return
        entry = self.resources.get(res)
        current = self.workers.get(entry.worker) if entry is not None and entry.worker is not None else None
        if current is not None and current.wid == header["wid"]:
            # The same worker on a new control socket (it reconnected): keep its state and in-flight work.
            del self.workers[current.rid]
            current.rid, current.last_seen = rid, now
            self.workers[rid] = current
            assert entry is not None  # `current` came from this entry
            entry.worker = rid
            if current.data_rid is not None:
                self.data_rids[current.data_rid] = rid
            return
        if current is not None and current.rid != rid:
            self._send_worker(rid, {"v": schema.VERSION, "op": "reject",
                                    "msg": f"{res} is already served by worker pid {current.pid}"})
            return
        if entry is None:
            entry = self.resources[res] = ResourceEntry(res=res, queue=FairQueue(self.config.queue_limit))
        alias = header.get("alias")
        if alias:
            if self.aliases.get(alias, res) != res:
                log.warning("broker.alias_taken", alias=alias, res=res, owner=self.aliases[alias])
            else:
                self.aliases[alias] = res
                entry.alias = alias
        worker = WorkerEntry(rid=rid, res=res, state=header["state"], last_seen=now, pid=header.get("pid"),
                             protocol=header.get("protocol"), wid=header["wid"], fence=bool(header.get("fence")))
        self.workers[rid] = worker
        data_rid = self.pending_attach.pop(worker.wid, None)
        if data_rid is not None:
            worker.data_rid = data_rid
            self.data_rids[data_rid] = rid
        entry.worker, entry.state, entry.protocol = rid, worker.state, worker.protocol
        log.info("broker.worker_up", resource=res, worker_pid=worker.pid, state=worker.state)
        if worker.fence and entry.locks.locked and entry.fence_state == "off":
            self.locking.fence(entry, True, schema.DEFAULT_TIMEOUT_MS)  # locks outlived the old worker
        if entry.open_waiters and worker.state in ("ready", "lost"):
            self.directory.settle_open_waiters(entry, None if worker.state == "ready" else f"{res}: instrument not reachable")
        self.publish("worker.up", {"res": res, "alias": entry.alias, "pid": worker.pid, "state": worker.state})
        self._dispatch(entry)

    def _attach_data_socket(self, data_rid: bytes, wid: str) -> None:
        for worker in self.workers.values():
            if worker.wid == wid:
                if worker.data_rid is not None:
                    self.data_rids.pop(worker.data_rid, None)
                worker.data_rid = data_rid
                self.data_rids[data_rid] = worker.rid
                self._dispatch(self.resources[worker.res])
                return
        if len(self.pending_attach) < 4096:  # bounded: a stray attach cannot grow memory
            self.pending_attach[wid] = data_rid

    def _set_worker_state(self, worker: WorkerEntry, state: str, detail: str | None) -> None:
        if state == worker.state:
            return
        worker.state = state
        entry = self.resources[worker.res]
        entry.state = state
        if entry.open_waiters and state in ("ready", "lost"):
            self.directory.settle_open_waiters(entry, None if state == "ready" else
                                      f"{worker.res}: instrument not reachable ({detail or 'no answer'})")
        self.publish("worker.state", {"res": worker.res, "state": state, "detail": detail})

    def _on_reply(self, worker: WorkerEntry, header: schema.Header, data: list[Any], now: float) -> None:
        bid = header["id"]
        req = self.inflight_by_bid.get(bid)
        if req is None:
            log.debug("broker.reply_for_unknown_request", bid=bid)
            return
        more = bool(header.get("more"))
        entry = self.resources[req.res]
        entry.stats.bytes_out += sum(len(f) for f in data)
        if req.internal:
            self.inflight_by_bid.pop(bid, None)
            if worker.inflight is req:
                worker.inflight = None
            if not req.answered:
                req.answered = True
                self.locking.fence_done(entry, req, header["status"], str(header.get("msg", "")))
            self._dispatch(entry)
            return
        if not req.answered:
            out = {**header, "op": req.op, "id": req.cid}
            if header["status"] < 0:
                out.setdefault("name", _status_name(header["status"]))
            self._send_client(req.rid, out, data)
            if more and req.timeout_s is not None:
                req.deadline = now + req.timeout_s  # a stream that makes progress is alive
        if more:
            return
        # Final frame of this request.
        self.inflight_by_bid.pop(bid, None)
        if worker.oob.pop(bid, None) is None and worker.inflight is req:
            worker.inflight = None
        session = self.sessions.get(req.sid)
        if session is not None:
            session.mark_done(req.cid)
        if header["status"] < 0:
            entry.stats.errors += 1
        self._update_reservation(entry, req, header["status"], now)
        self._dispatch(entry)

    def _update_reservation(self, entry: ResourceEntry, req: Request, status: int, now: float) -> None:
        """A write that asks a question reserves the instrument for its writer until the answer is read."""
        if req.op == "write" and status >= 0 and req.frames and _asks_question(req.frames[0]):
            entry.reserved_by = req.sid
            hold = req.timeout_s if req.timeout_s is not None else 10.0
            entry.reserved_until = now + max(1.0, hold)
        elif req.op in ("read", "query") and entry.reserved_by == req.sid:
            entry.reserved_by = None

    def _on_event(self, rid: bytes, header: schema.Header) -> None:
        topic: str = header["topic"]
        data = header.get("data") or {}
        worker = self.workers.get(rid)
        if worker is not None:
            worker.last_seen = time.monotonic()
            data.setdefault("res", worker.res)
        if topic.startswith("instrument."):
            self.directory.track_instrument(topic, data)
        self.publish(topic, data)


    def _worker_gone(self, worker: WorkerEntry, why: str) -> None:
        self.workers.pop(worker.rid, None)
        if worker.data_rid is not None:
            self.data_rids.pop(worker.data_rid, None)
        entry = self.resources.get(worker.res)
        log.warning("broker.worker_down", resource=worker.res, worker_pid=worker.pid, reason=why)
        for req in [worker.inflight, *worker.oob.values()]:
            if req is not None:
                self.inflight_by_bid.pop(req.bid, None)
                self._fail(req, StatusCode.VI_ERROR_CONN_LOST,
                           f"{worker.res}: the worker died while executing this request ({why}); its outcome is "
                           "unknown: it may or may not have reached the instrument", outcome="unknown")
        if entry is not None and entry.worker == worker.rid:
            entry.worker, entry.state = None, "down"
            for req in entry.priority:
                self._fail(req, StatusCode.VI_ERROR_CONN_LOST, f"{worker.res}: the worker died")
            entry.priority.clear()
            entry.fence_state = "off"  # the instrument releases a dead link's lock by itself
            if entry.on_demand:  # a worker attached on demand leaves no trace once it is gone
                self.resources.pop(entry.res, None)
            for req in entry.queue.drain():
                self._fail(req, StatusCode.VI_ERROR_CONN_LOST,
                           f"{worker.res}: the worker died ({why}); this request was not executed",
                           outcome="not_executed")
        self.publish("worker.down", {"res": worker.res, "pid": worker.pid, "reason": why})

    # ============================================================================ timers
    def _purge(self, now: float) -> None:
        for entry in list(self.resources.values()):
            expired = entry.queue.remove_all(lambda r: r.deadline is not None and now >= r.deadline)
            for req in expired:
                if not entry.locks.admits(req.sid):
                    holders = ", ".join(map(self._session_label, entry.locks.holders()))
                    self._fail(req, StatusCode.VI_ERROR_RSRC_LOCKED,
                               f"{entry.res} stayed locked by {holders} for the whole timeout")
                else:
                    self._fail(req, StatusCode.VI_ERROR_TMO,
                               f"{entry.res}: request waited its whole timeout in the queue behind other requests")
            if entry.lock_waiters:
                keep = []
                for waiter in entry.lock_waiters:
                    if waiter.deadline is not None and now >= waiter.deadline:
                        holders = ", ".join(map(self._session_label, entry.locks.holders()))
                        self._error(waiter.rid, waiter.header, StatusCode.VI_ERROR_TMO,
                                    f"{entry.res}: could not get the lock within the lock timeout (held by {holders})")
                    else:
                        keep.append(waiter)
                entry.lock_waiters = keep
            if entry.reserved_by is not None and now >= entry.reserved_until:
                entry.reserved_by = None
                self._dispatch(entry)
            if entry.open_waiters:
                self.directory.expire_open_waiters(entry, now)
        grace = self.config.grace_ms / 1000.0
        for req in list(self.inflight_by_bid.values()):
            if not req.answered and req.deadline is not None and now >= req.deadline + grace:
                self._fail(req, StatusCode.VI_ERROR_TMO,
                           f"{req.res}: the worker did not answer within the timeout; the operation was aborted")
                owner = self.resources[req.res].worker
                if owner is not None:
                    self._send_worker(owner, {"v": schema.VERSION, "op": "cancel", "id": req.bid})
        dead_after = self.config.heartbeat_ms * self.config.liveness / 1000.0
        for worker in list(self.workers.values()):
            if now - worker.last_seen > dead_after:
                self._worker_gone(worker, f"silent for {now - worker.last_seen:.1f}s")
        lease = self.config.lease_ms / 1000.0
        for session in list(self.sessions.values()):
            if now - session.last_seen > lease:
                self._expire_session(session, "lease expired")

    def _expire_session(self, session: ClientSession, why: str) -> None:
        self.sessions.pop(session.sid, None)
        for rid in session.rids:
            self.rid_sid.pop(rid, None)
        # Keep the ids it used for a while: a client that comes back with the same session id must not
        # get an old request executed twice (at-most-once outlives the lease).
        self.retired[session.sid] = session
        while len(self.retired) > RETIRED_SESSIONS_KEPT:
            self.retired.popitem(last=False)
        released = []
        for entry in self.resources.values():
            for req in entry.queue.remove(session.sid, lambda r: True):
                self._fail(req, StatusCode.VI_ERROR_ABORT, f"the client session ended ({why}) before this ran",
                           outcome="not_executed")
            for waiter in [w for w in entry.lock_waiters if w.sid == session.sid]:
                self._error(waiter.rid, waiter.header, StatusCode.VI_ERROR_ABORT,
                            f"the client session ended ({why}) while waiting for the lock")
            entry.lock_waiters = [w for w in entry.lock_waiters if w.sid != session.sid]
            if entry.reserved_by == session.sid:
                entry.reserved_by = None
            if entry.locks.release_session(session.sid):
                released.append(entry.res)
                self.locking.changed(entry, session.sid, "released")
            self._dispatch(entry)
        log.info("broker.client_gone", client=session.sid, reason=why, released_locks=released)
        self.publish("client.gone", {"client": session.sid, "name": session.name, "reason": why,
                                     "released": released})

    def _heartbeat(self, now: float) -> None:
        self._next_heartbeat = now + self.config.heartbeat_ms / 1000.0
        for worker in list(self.workers.values()):
            self._send_worker(worker.rid, {"v": schema.VERSION, "op": "heartbeat"})


def _asks_question(frame: Any) -> bool:
    """Does this program message contain a query? Looks at the text before any binary block only."""
    head = bytes(frame.buffer[:4096]) if hasattr(frame, "buffer") else bytes(frame[:4096])
    return b"?" in head.split(b"#", 1)[0]


def _status_name(code: int) -> str:
    try:
        return StatusCode(code).name
    except ValueError:
        return "VI_ERROR_SYSTEM_ERROR"

"""What the bus serves and has seen: `list`, `status`, `open` (with attach on demand), discovered instruments.

- `list` merges resources served by workers with those discovery announced (tracked per instrument key, so
  a resource an `instrument.changed` drops leaves the directory too);
- `open` of a resource nobody serves, when the broker runs with attach_on_demand, publishes
  `attach.request` for the supervisor and holds the open until a worker registers and reports `ready`
  (answered) or `lost` (VI_ERROR_RSRC_NFOUND and `attach.failed`, so the supervisor retires it).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog

from visabus.sdk import schema
from visabus.sdk.errors import InvalidResourceName, StatusCode
from visabus.sdk.resources import canonical, match_pattern, parse_resource

from .fairqueue import FairQueue
from .state import ClientSession, LockWaiter, ResourceEntry

if TYPE_CHECKING:
    from .router import Broker

log = structlog.get_logger(__name__)


class Directory:
    def __init__(self, broker: Broker) -> None:
        self.b = broker

    def op_list(self, rid: bytes, session: ClientSession, header: schema.Header, data: list[Any]) -> None:
        pattern = header.get("pattern") or "?*"
        rows: dict[str, dict[str, Any]] = {}
        try:
            for res, info in self.b.discovered.items():
                if match_pattern(pattern, res) or (info.get("alias") and match_pattern(pattern, info["alias"])):
                    rows[res] = {"res": res, "source": "discovery", "state": "unattached", **info,
                                 "protocol": parse_resource(res).protocol.value}
            for res, entry in self.b.resources.items():
                if match_pattern(pattern, res) or (entry.alias and match_pattern(pattern, entry.alias)):
                    rows[res] = {"res": res, "alias": entry.alias, "state": entry.state, "protocol": entry.protocol,
                                 "source": "worker", "locked": entry.locks.locked}
        except InvalidResourceName as exc:
            self.b._error(rid, header, exc.code, exc.message)
            return
        self.b._send_client(rid, schema.reply(header, 0, resources=[rows[k] for k in sorted(rows)]))

    def op_status(self, rid: bytes, session: ClientSession, header: schema.Header, data: list[Any]) -> None:
        out = []
        only = header.get("res")
        if only:
            try:
                only = self.b.aliases.get(only) or canonical(only)
            except InvalidResourceName as exc:
                self.b._error(rid, header, exc.code, exc.message)
                return
        for res, entry in sorted(self.b.resources.items()):
            if only and res != only and entry.alias != only:
                continue
            worker = self.b.workers.get(entry.worker) if entry.worker else None
            out.append({
                "res": res, "alias": entry.alias, "state": entry.state, "protocol": entry.protocol,
                "pid": worker.pid if worker else None,
                "busy": bool(worker and worker.inflight), "queue": len(entry.queue), "queued_bytes": entry.queued_bytes,
                "lock": {"exclusive": entry.locks.exclusive is not None,
                         "holders": [self.b._session_label(s) for s in entry.locks.holders()],
                         "waiting": len(entry.lock_waiters)},
                "stats": vars(entry.stats),
            })
        self.b._send_client(rid, schema.reply(header, 0, resources=out, clients=len(self.b.sessions),
                                            endpoints=self.b.endpoints, dropped_replies=self.b.dropped_replies))

    def op_open(self, rid: bytes, session: ClientSession, header: schema.Header, data: list[Any]) -> None:
        if self.b.config.attach_on_demand and self.attach_on_demand(rid, session, header):
            return
        entry = self.b._resolve(rid, header)
        if entry is not None:
            self.answer_open(rid, header, entry)

    def answer_open(self, rid: bytes, header: schema.Header, entry: ResourceEntry) -> None:
        self.b._send_client(rid, schema.reply(header, 0, res=entry.res, alias=entry.alias, state=entry.state,
                                            protocol=entry.protocol))

    def attach_on_demand(self, rid: bytes, session: ClientSession, header: schema.Header) -> bool:
        """Open of a resource no worker serves: ask the supervisor for one and hold the open meanwhile."""
        text = header.get("res", "")
        if text in self.b.aliases:
            return False
        try:
            res = canonical(text)
        except InvalidResourceName:
            return False  # _resolve answers with the precise error
        entry = self.b.resources.get(res)
        if entry is not None and not (entry.on_demand and entry.worker is None):
            return False
        if entry is None:
            entry = self.b.resources[res] = ResourceEntry(res=res, queue=FairQueue(self.b.config.queue_limit),
                                                         on_demand=True)
        if entry.state != "attaching":
            entry.state = "attaching"
            self.b.publish("attach.request", {"res": res, "client": self.b._session_label(session.sid)})
        wait_ms = min(header.get("timeout_ms") or self.b.config.attach_timeout_ms, self.b.config.attach_timeout_ms)
        entry.open_waiters.append(LockWaiter(rid, session.sid, header, False, None,
                                             time.monotonic() + max(wait_ms, 1000) / 1000.0))
        return True

    def settle_open_waiters(self, entry: ResourceEntry, failure: str | None) -> None:
        waiters, entry.open_waiters = entry.open_waiters, []
        for waiter in waiters:
            if failure is None:
                self.answer_open(waiter.rid, waiter.header, entry)
            else:
                self.b._error(waiter.rid, waiter.header, StatusCode.VI_ERROR_RSRC_NFOUND, failure)
        if failure is not None and entry.on_demand:
            self.b.publish("attach.failed", {"res": entry.res, "reason": failure})
            if entry.worker is None:
                self.b.resources.pop(entry.res, None)

    def track_instrument(self, topic: str, data: dict[str, Any]) -> None:
        """Keep `list`'s view of discovered resources: per instrument, the resources its last event named."""
        key = str(data.get("key") or ",".join(map(str, data.get("resources", []))))
        old = set(self.b.instrument_resources.pop(key, set()))
        for previous in data.get("previous_keys") or []:
            old |= self.b.instrument_resources.pop(str(previous), set())
        new: set[str] = set()
        if topic != "instrument.disappeared":
            for res in data.get("resources", []):
                try:
                    new.add(canonical(res))
                except InvalidResourceName:
                    log.warning("broker.bad_discovered_resource", res=res)
            info = {k: data.get(k) for k in ("protocol", "address", "metadata")}
            for res in new:
                self.b.discovered[res] = info
            if new and len(self.b.instrument_resources) < 65536:  # bounded whatever discovery sends
                self.b.instrument_resources[key] = new
        for res in old - new:
            self.b.discovered.pop(res, None)

    def expire_open_waiters(self, entry: ResourceEntry, now: float) -> None:
        """Fail the held opens whose own time ran out; give up on the attach when none is left waiting."""
        expired = [w for w in entry.open_waiters if w.deadline is not None and now >= w.deadline]
        if not expired:
            return
        if len(expired) == len(entry.open_waiters):
            self.settle_open_waiters(entry, f"{entry.res}: no worker could be attached in time "
                                            "(is attach_on_demand on and the instrument reachable?)")
            return
        entry.open_waiters = [w for w in entry.open_waiters if w not in expired]
        for waiter in expired:
            self.b._error(waiter.rid, waiter.header, StatusCode.VI_ERROR_RSRC_NFOUND,
                          f"{entry.res}: no worker was ready within this open's timeout")

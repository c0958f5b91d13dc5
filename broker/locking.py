"""Bus locks on instruments, granted to client sessions, and fencing with the instruments' own locks.

VISA semantics (exclusive, shared with a key, nested, lock timeout) live in `LockState`; this component does
the broker-side choreography: answering `lock`/`unlock`, granting waiters when a lock frees, publishing
`lock.<resource>` events, and — for instruments configured with `fence_locks` — granting a bus lock only once
the worker holds the instrument's own lock (an internal `fence` job), releasing it with the last bus lock.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog

from visabus.sdk import schema
from visabus.sdk.errors import StatusCode, VisaBusError

from .locks import validate_lock_request
from .state import ClientSession, LockWaiter, Request, ResourceEntry

if TYPE_CHECKING:
    from .router import Broker

log = structlog.get_logger(__name__)


class LockManager:
    def __init__(self, broker: Broker) -> None:
        self.b = broker

    def op_lock(self, rid: bytes, session: ClientSession, header: schema.Header, data: list[Any]) -> None:
        entry = self.b._resolve(rid, header)
        if entry is None:
            return
        try:
            exclusive = header.get("exclusive")
            exclusive, key = validate_lock_request(True if exclusive is None else exclusive, header.get("key"))
        except VisaBusError as exc:
            self.b._error(rid, header, exc.code, exc.message)
            return
        granted = entry.locks.try_acquire(session.sid, exclusive, key)
        if granted is not None:
            depth = entry.locks.exclusive_depth if exclusive else entry.locks.shared.get(session.sid, 1)
            nested = StatusCode.VI_SUCCESS_NESTED_EXCLUSIVE if exclusive else StatusCode.VI_SUCCESS_NESTED_SHARED
            self.grant(entry, LockWaiter(rid, session.sid, header, exclusive, key, None), granted,
                        int(nested) if depth > 1 else 0)
            self.changed(entry, session.sid, "acquired")
            return
        wait_ms = header.get("lock_timeout_ms", header.get("timeout_ms", schema.DEFAULT_TIMEOUT_MS))
        deadline = None if wait_ms is None else time.monotonic() + wait_ms / 1000.0
        entry.lock_waiters.append(LockWaiter(rid, session.sid, header, exclusive, key, deadline))

    def op_unlock(self, rid: bytes, session: ClientSession, header: schema.Header, data: list[Any]) -> None:
        entry = self.b._resolve(rid, header)
        if entry is None:
            return
        try:
            entry.locks.release(session.sid)
        except VisaBusError as exc:
            self.b._error(rid, header, exc.code, f"{entry.res}: {exc.message}")
            return
        self.b._send_client(rid, schema.reply(header, 0))
        self.changed(entry, session.sid, "released")

    def changed(self, entry: ResourceEntry, sid: str, action: str) -> None:
        self.b.publish(f"lock.{entry.res}", {"res": entry.res, "action": action, "client": self.b._session_label(sid),
                                           "holders": [self.b._session_label(s) for s in entry.locks.holders()],
                                           "exclusive": entry.locks.exclusive is not None})
        still_waiting = []
        for waiter in entry.lock_waiters:
            if waiter.sid not in self.b.sessions:
                continue
            granted = entry.locks.try_acquire(waiter.sid, waiter.exclusive, waiter.key)
            if granted is None:
                still_waiting.append(waiter)
            else:
                self.grant(entry, waiter, granted, 0)
                self.b.publish(f"lock.{entry.res}", {"res": entry.res, "action": "acquired",
                                                   "client": self.b._session_label(waiter.sid),
                                                   "holders": [self.b._session_label(s) for s in entry.locks.holders()],
                                                   "exclusive": entry.locks.exclusive is not None})
        entry.lock_waiters = still_waiting
        if not entry.locks.locked and entry.fence_state == "on":
            self.fence(entry, False, schema.DEFAULT_TIMEOUT_MS)
        self.b._dispatch(entry)

    def grant(self, entry: ResourceEntry, waiter: LockWaiter, key: str, status: int) -> None:
        """Answer a granted lock, after the worker has taken the instrument's own lock if it fences."""
        worker = self.b.workers.get(entry.worker) if entry.worker else None
        if worker is None or not worker.fence or entry.fence_state == "on":
            self.b._send_client(waiter.rid, schema.reply(waiter.header, status, key=key or None))
            return
        entry.fence_grants.append((waiter, key, status))
        if entry.fence_state == "off":
            wait_ms = waiter.header.get("lock_timeout_ms", waiter.header.get("timeout_ms", schema.DEFAULT_TIMEOUT_MS))
            self.fence(entry, True, wait_ms)

    def fence(self, entry: ResourceEntry, lock: bool, timeout_ms: int | None) -> None:
        now = time.monotonic()
        timeout_s = None if timeout_ms is None else timeout_ms / 1000.0
        req = Request(bid=next(self.b._bids), rid=b"", sid="@broker", cid=None,
                      header={"v": schema.VERSION, "op": "fence", "lock": lock, "timeout_ms": timeout_ms},
                      frames=[], res=entry.res, received=now, deadline=None if timeout_s is None else now + timeout_s,
                      timeout_s=timeout_s, internal=True)
        entry.fence_state = "taking" if lock else "releasing"
        entry.priority.append(req)
        self.b._dispatch(entry)

    def fence_done(self, entry: ResourceEntry, req: Request, status: int, message: str) -> None:
        worker = self.b.workers.get(entry.worker) if entry.worker else None
        if req.header["lock"]:
            if status >= 0 or status == StatusCode.VI_ERROR_NSUP_OPER:
                if status < 0 and worker is not None:
                    log.warning("broker.fence_unsupported", resource=entry.res, reason=message)
                    worker.fence = False  # this protocol has no instrument lock: bus locks only
                entry.fence_state = "on" if status >= 0 else "off"
                grants, entry.fence_grants = entry.fence_grants, []
                for waiter, key, granted_status in grants:
                    self.b._send_client(waiter.rid, schema.reply(waiter.header, granted_status, key=key or None))
                if status >= 0 and not entry.locks.locked:
                    self.fence(entry, False, schema.DEFAULT_TIMEOUT_MS)
                return
            # Someone outside the bus holds the instrument: the bus lock cannot be honoured.
            entry.fence_state = "off"
            grants, entry.fence_grants = entry.fence_grants, []
            for waiter, _, _ in grants:
                entry.locks.release_session(waiter.sid)
                self.b._error(waiter.rid, waiter.header, StatusCode(status) if status in StatusCode._value2member_map_
                            else StatusCode.VI_ERROR_RSRC_LOCKED,
                            f"{entry.res}: the instrument's own lock could not be taken (a client outside the bus "
                            f"may hold it): {message}")
                self.b.publish(f"lock.{entry.res}", {"res": entry.res, "action": "released",
                                                   "client": self.b._session_label(waiter.sid), "holders": [],
                                                   "exclusive": False})
            return
        entry.fence_state = "off"
        if entry.fence_grants:  # locked again while we were releasing
            self.fence(entry, True, schema.DEFAULT_TIMEOUT_MS)

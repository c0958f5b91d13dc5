"""Per-device server state shared by every HiSLIP session of one sub-address: locks and remote/local.

`LockTable` arbitrates IVI-6.1 §2.6 locks between sessions (exclusive, shared with a key, both) as a
pure state machine: callers pass the time in, get decisions out, and schedule the next expiry
themselves. `RemoteLocalState` holds the Remote / RemoteEnable / LocalLockout flags of §4.7.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .hislip import LockResult, RemoteLocal


class LockOutcome(enum.Enum):
    GRANTED = "granted"
    FAILED = "failed"  # not available and no time to wait
    ERROR = "error"  # redundant request (already holding that lock, or already waiting)
    PENDING = "pending"  # queued until granted, cancelled or `deadline`


@dataclass
class LockWaiter:
    session_id: int
    key: str  # "" = exclusive
    deadline: float


@dataclass(frozen=True)
class LockDecision:
    """The AsyncLockResponse a (possibly different) session must now receive."""

    session_id: int
    result: LockResult


class LockTable:
    """Lock state of one device across all its sessions."""

    def __init__(self) -> None:
        self.exclusive: int | None = None
        self.shared: dict[int, str] = {}  # session id -> key (all holders share one key)
        self._waiters: list[LockWaiter] = []

    # ------------------------------------------------------------------ queries
    @property
    def shared_key(self) -> str | None:
        return next(iter(self.shared.values()), None)

    def holds(self, session_id: int) -> bool:
        return self.exclusive == session_id or session_id in self.shared

    def waiting(self, session_id: int) -> bool:
        return any(w.session_id == session_id for w in self._waiters)

    def may_access(self, session_id: int) -> bool:
        """May this session's sync messages reach the device now?"""
        if self.exclusive is not None:
            return self.exclusive == session_id
        return not self.shared or session_id in self.shared

    def info(self) -> tuple[bool, int]:
        """(an exclusive lock is granted, number of sessions holding any lock)."""
        holders = set(self.shared)
        if self.exclusive is not None:
            holders.add(self.exclusive)
        return self.exclusive is not None, len(holders)

    def next_deadline(self) -> float | None:
        return min((w.deadline for w in self._waiters), default=None)

    # ------------------------------------------------------------------ transitions
    def _evaluate(self, session_id: int, key: str) -> LockOutcome:
        if self.exclusive == session_id:
            return LockOutcome.ERROR  # holder asks again for any lock
        if not key:  # exclusive
            if self.exclusive is not None:
                return LockOutcome.PENDING
            if self.shared and session_id not in self.shared:
                return LockOutcome.PENDING
            return LockOutcome.GRANTED  # unlocked, or shared holder upgrading to "both"
        if session_id in self.shared:
            return LockOutcome.ERROR
        if self.exclusive is not None:
            return LockOutcome.PENDING
        if self.shared and key != self.shared_key:
            return LockOutcome.PENDING
        return LockOutcome.GRANTED

    def _grant(self, session_id: int, key: str) -> None:
        if key:
            self.shared[session_id] = key
        else:
            self.exclusive = session_id

    def request(self, session_id: int, key: str, timeout: float, now: float) -> LockOutcome:
        """AsyncLock request: exclusive when `key` is empty. `timeout` in seconds (0 = don't wait)."""
        if self.waiting(session_id):
            return LockOutcome.ERROR
        outcome = self._evaluate(session_id, key)
        if outcome is LockOutcome.GRANTED:
            self._grant(session_id, key)
        elif outcome is LockOutcome.PENDING:
            if timeout <= 0:
                return LockOutcome.FAILED
            self._waiters.append(LockWaiter(session_id, key, now + timeout))
        return outcome

    def release(self, session_id: int) -> tuple[LockResult, list[LockDecision]]:
        """AsyncLock release: the exclusive lock first ("both" -> shared), else the shared one."""
        if self.exclusive == session_id:
            self.exclusive = None
            result = LockResult.SUCCESS
        elif session_id in self.shared:
            del self.shared[session_id]
            result = LockResult.SUCCESS_SHARED
        else:
            return LockResult.ERROR, []
        return result, self._wake()

    def _wake(self) -> list[LockDecision]:
        decisions: list[LockDecision] = []
        for waiter in list(self._waiters):
            if self._evaluate(waiter.session_id, waiter.key) is LockOutcome.GRANTED:
                self._grant(waiter.session_id, waiter.key)
                self._waiters.remove(waiter)
                decisions.append(LockDecision(waiter.session_id, LockResult.SUCCESS))
        return decisions

    def cancel(self, session_id: int) -> list[LockDecision]:
        """Device clear: a pending request of this session fails now."""
        cancelled = [w for w in self._waiters if w.session_id == session_id]
        self._waiters = [w for w in self._waiters if w.session_id != session_id]
        return [LockDecision(w.session_id, LockResult.FAILURE) for w in cancelled]

    def expire(self, now: float) -> list[LockDecision]:
        expired = [w for w in self._waiters if w.deadline <= now]
        self._waiters = [w for w in self._waiters if w.deadline > now]
        return [LockDecision(w.session_id, LockResult.FAILURE) for w in expired]

    def drop(self, session_id: int) -> list[LockDecision]:
        """The session closed: forget its wait, release everything it held, grant waiters."""
        self._waiters = [w for w in self._waiters if w.session_id != session_id]
        if self.exclusive == session_id:
            self.exclusive = None
        self.shared.pop(session_id, None)
        return self._wake()


@dataclass
class RemoteLocalState:
    """IVI-6.1 §4.7: initial Remote false, RemoteEnable true, LocalLockout false."""

    remote: bool = False
    remote_enable: bool = True
    local_lockout: bool = False

    def touch(self) -> None:
        """Data, DataEnd, Trigger, AsyncStatusQuery, AsyncDeviceClear and AsyncLock put the device in
        remote when remote is enabled."""
        if self.remote_enable:
            self.remote = True

    def apply(self, request: int) -> bool:
        """Apply an AsyncRemoteLocalControl code; False if the code is not defined."""
        try:
            code = RemoteLocal(request)
        except ValueError:
            return False
        if code in (RemoteLocal.DISABLE_REMOTE, RemoteLocal.DISABLE_REMOTE_GO_TO_LOCAL):
            self.remote_enable = self.local_lockout = self.remote = False
            return True
        if code is RemoteLocal.GO_TO_LOCAL:
            self.remote = False
            return True
        self.remote_enable = True
        if code in (RemoteLocal.ENABLE_REMOTE_LOCK_OUT_LOCAL, RemoteLocal.ENABLE_REMOTE_GO_TO_REMOTE_LOCK_OUT_LOCAL):
            self.local_lockout = True
        if code in (RemoteLocal.ENABLE_REMOTE_GO_TO_REMOTE, RemoteLocal.ENABLE_REMOTE_GO_TO_REMOTE_LOCK_OUT_LOCAL):
            self.remote = True
        return True


@dataclass
class HislipDevice:
    """One sub-address (virtual instrument) of a HiSLIP server."""

    name: str
    locks: LockTable = field(default_factory=LockTable)
    remote_local: RemoteLocalState = field(default_factory=RemoteLocalState)

"""VISA-style locks on one instrument, held by client sessions (sans-IO: no sockets, no clocks read).

- An exclusive lock admits only its holder; nested locks by the holder count up (VISA nesting).
- A shared lock carries a key; any session presenting the same key joins it. Sessions outside the
  lock cannot do I/O on the instrument until it is released.
- Locks are leased: when a session dies, `release_session` drops everything it held.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from visabus.sdk.errors import InvalidParameter, SessionNotLocked


@dataclass
class LockState:
    exclusive: str | None = None           # holder session id
    exclusive_depth: int = 0
    shared_key: str | None = None
    shared: dict[str, int] = field(default_factory=dict)  # session id -> nesting depth

    @property
    def locked(self) -> bool:
        return self.exclusive is not None or bool(self.shared)

    def admits(self, sid: str) -> bool:
        """May session `sid` do I/O now?"""
        if self.exclusive is not None:
            return self.exclusive == sid
        if self.shared:
            return sid in self.shared
        return True

    def holders(self) -> list[str]:
        return [self.exclusive] if self.exclusive else sorted(self.shared)

    def try_acquire(self, sid: str, exclusive: bool, key: str | None) -> str | None:
        """Grant the lock and return the access key ('' for exclusive), or None if it must wait."""
        if exclusive:
            if self.exclusive == sid:
                self.exclusive_depth += 1
                return ""
            if self.exclusive is None and (not self.shared or set(self.shared) == {sid}):
                # VISA lets the sole shared holder upgrade to exclusive.
                self.exclusive, self.exclusive_depth = sid, 1
                return ""
            return None
        if self.exclusive is not None and self.exclusive != sid:
            return None
        if self.shared:
            if key is not None and key != self.shared_key and sid not in self.shared:
                return None
            if key is None and sid not in self.shared:
                return None  # joining a shared lock needs its key
            self.shared[sid] = self.shared.get(sid, 0) + 1
            return self.shared_key
        self.shared_key = key or secrets.token_hex(8)
        self.shared[sid] = 1
        return self.shared_key

    def release(self, sid: str) -> None:
        """Undo one level of `sid`'s lock (exclusive first, as VISA does)."""
        if self.exclusive == sid:
            self.exclusive_depth -= 1
            if self.exclusive_depth <= 0:
                self.exclusive, self.exclusive_depth = None, 0
            return
        if sid in self.shared:
            self.shared[sid] -= 1
            if self.shared[sid] <= 0:
                del self.shared[sid]
                if not self.shared:
                    self.shared_key = None
            return
        raise SessionNotLocked("this client holds no lock on the instrument")

    def release_session(self, sid: str) -> bool:
        """Drop every lock level `sid` holds; True if anything was released."""
        changed = False
        if self.exclusive == sid:
            self.exclusive, self.exclusive_depth = None, 0
            changed = True
        if self.shared.pop(sid, None) is not None:
            changed = True
            if not self.shared:
                self.shared_key = None
        return changed


def validate_lock_request(exclusive: object, key: object) -> tuple[bool, str | None]:
    if not isinstance(exclusive, bool):
        raise InvalidParameter("lock 'exclusive' must be true or false")
    if key is not None and (not isinstance(key, str) or not key or len(key) > 256):
        raise InvalidParameter("lock key must be a non-empty string of at most 256 characters")
    if exclusive and key is not None:
        raise InvalidParameter("an exclusive lock takes no key; pass exclusive=False for a shared lock")
    return exclusive, key

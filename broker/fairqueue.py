"""Per-instrument request queue served fairly across client sessions.

Each client session has its own FIFO (its requests keep their order); the dispatcher takes the head of
the next eligible session in round-robin order, so one busy client cannot starve another. The total
length is bounded: `push` refuses past `limit`, and the caller answers with an overflow error.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._by_owner: collections.OrderedDict[str, collections.deque[T]] = collections.OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, owner: str, item: T) -> bool:
        if self._size >= self.limit:
            return False
        self._by_owner.setdefault(owner, collections.deque()).append(item)
        self._size += 1
        return True

    def pop_next(self, eligible: Callable[[str, T], bool]) -> T | None:
        """Remove and return the first eligible head item, rotating owners for fairness."""
        for owner in list(self._by_owner):
            fifo = self._by_owner[owner]
            if eligible(owner, fifo[0]):
                item = fifo.popleft()
                self._size -= 1
                # The served owner goes to the back of the rotation.
                del self._by_owner[owner]
                if fifo:
                    self._by_owner[owner] = fifo
                return item
        return None

    def remove(self, owner: str, predicate: Callable[[T], bool]) -> list[T]:
        """Remove and return the items of `owner` matching `predicate` (cancellation, expiry)."""
        fifo = self._by_owner.get(owner)
        if not fifo:
            return []
        kept = collections.deque(x for x in fifo if not predicate(x))
        removed = [x for x in fifo if predicate(x)]
        self._size -= len(removed)
        if kept:
            self._by_owner[owner] = kept
        else:
            del self._by_owner[owner]
        return removed

    def remove_all(self, predicate: Callable[[T], bool]) -> list[T]:
        removed: list[T] = []
        for owner in list(self._by_owner):
            removed += self.remove(owner, predicate)
        return removed

    def drain(self) -> list[T]:
        items = [x for fifo in self._by_owner.values() for x in fifo]
        self._by_owner.clear()
        self._size = 0
        return items

    def __iter__(self) -> Iterator[T]:
        for fifo in self._by_owner.values():
            yield from fifo

    def depth_by_owner(self) -> dict[str, int]:
        return {owner: len(fifo) for owner, fifo in self._by_owner.items()}

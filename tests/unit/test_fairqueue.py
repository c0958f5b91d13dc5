"""Per-instrument request queue (broker/fairqueue.py): round robin across sessions, FIFO within one."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from visabus.broker.fairqueue import FairQueue

Item = tuple[str, int]  # (owner, sequence number)


def anyone(owner: str, item: Item) -> bool:
    return True


def filled(*pushes: str, limit: int = 100) -> FairQueue[Item]:
    """Push one item per owner name, numbered per owner: filled("a", "a", "b") -> a0, a1, b0."""
    q: FairQueue[Item] = FairQueue(limit)
    counts: dict[str, int] = {}
    for owner in pushes:
        n = counts.get(owner, 0)
        counts[owner] = n + 1
        assert q.push(owner, (owner, n))
    return q


def pop_all(q: FairQueue[Item], eligible: Callable[[str, Item], bool] = anyone) -> list[str]:
    out = []
    while (item := q.pop_next(eligible)) is not None:
        out.append(f"{item[0]}{item[1]}")
    return out


# ------------------------------------------------------------------------------------ fairness
ORDERS = [
    (["a", "a", "a", "b", "b", "c"], ["a0", "b0", "c0", "a1", "b1", "a2"]),
    (["a"] * 4, ["a0", "a1", "a2", "a3"]),
    (["a", "b", "a", "b"], ["a0", "b0", "a1", "b1"]),
    (["b", "a", "a", "a", "a", "c"], ["b0", "a0", "c0", "a1", "a2", "a3"]),  # first come, first in the rotation
    ([], []),
]


@pytest.mark.parametrize(("pushes", "expected"), ORDERS, ids=[" ".join(p) or "empty" for p, _ in ORDERS])
def test_round_robin_across_owners(pushes: list[str], expected: list[str]) -> None:
    q = filled(*pushes)
    assert pop_all(q) == expected
    assert len(q) == 0 and q.depth_by_owner() == {}


def pop_all_n(q: FairQueue[Item], n: int) -> list[str]:
    return [f"{i[0]}{i[1]}" for i in (q.pop_next(anyone) for _ in range(n)) if i is not None]


def test_busy_owner_cannot_starve_a_newcomer() -> None:
    q = filled(*["hog"] * 50)
    assert pop_all_n(q, 3) == ["hog0", "hog1", "hog2"]
    q.push("late", ("late", 0))
    q.push("late", ("late", 1))
    # The newcomer waits at most one item of the hog's, then they alternate.
    assert pop_all_n(q, 5) == ["hog3", "late0", "hog4", "late1", "hog5"]


def test_served_owner_goes_to_the_back_of_the_rotation() -> None:
    q = filled("a", "a", "b", "c")
    assert pop_all_n(q, 1) == ["a0"]
    q.push("d", ("d", 0))
    assert pop_all(q) == ["b0", "c0", "a1", "d0"]


def test_owner_that_empties_rejoins_at_the_back() -> None:
    q = filled("a", "b", "b")
    assert pop_all_n(q, 1) == ["a0"]                 # a is now empty and out of the rotation
    q.push("a", ("a", 1))
    assert pop_all(q) == ["b0", "a1", "b1"]


# ------------------------------------------------------------------------------------ eligibility
def test_ineligible_owner_is_skipped_but_keeps_its_turn() -> None:
    q = filled("locked", "locked", "b", "b", "c")
    blocked = {"locked"}

    def eligible(owner: str, item: Item) -> bool:
        return owner not in blocked

    assert pop_all_n_with(q, eligible, 2) == ["b0", "c0"]
    blocked.clear()                                  # the lock was released
    assert pop_all(q) == ["locked0", "b1", "locked1"]


def pop_all_n_with(q: FairQueue[Item], eligible: Callable[[str, Item], bool], n: int) -> list[str]:
    out = []
    for _ in range(n):
        item = q.pop_next(eligible)
        assert item is not None
        out.append(f"{item[0]}{item[1]}")
    return out


def test_only_the_head_of_each_owner_is_considered() -> None:
    # Per-owner FIFO is kept: when a's head may not run, a's later items wait behind it.
    q = filled("a", "a", "a")
    assert q.pop_next(lambda owner, item: item[1] != 0) is None
    assert len(q) == 3
    assert pop_all(q) == ["a0", "a1", "a2"]


def test_nothing_eligible() -> None:
    q = filled("a", "b")
    seen: list[Item] = []

    def never(owner: str, item: Item) -> bool:
        seen.append(item)
        return False

    assert q.pop_next(never) is None
    assert seen == [("a", 0), ("b", 0)]            # each owner's head asked once
    assert len(q) == 2 and q.depth_by_owner() == {"a": 1, "b": 1}


def test_eligibility_sees_owner_and_item() -> None:
    q = filled("a", "b")
    assert q.pop_next(lambda owner, item: owner == "b" and item == ("b", 0)) == ("b", 0)


# ------------------------------------------------------------------------------------ bound
def test_push_refuses_past_the_limit() -> None:
    q: FairQueue[Item] = FairQueue(3)
    assert [q.push(o, (o, 0)) for o in ("a", "b", "a")] == [True, True, True]
    assert q.push("c", ("c", 0)) is False           # the limit is on the total, not per owner
    assert q.push("a", ("a", 9)) is False
    assert len(q) == 3 and "c" not in q.depth_by_owner()
    q.pop_next(anyone)
    assert q.push("c", ("c", 0)) is True             # room again
    assert len(q) == 3


def test_zero_limit_refuses_everything() -> None:
    q: FairQueue[Item] = FairQueue(0)
    assert q.push("a", ("a", 0)) is False and len(q) == 0


# ------------------------------------------------------------------------------------ remove / drain
def test_remove_matching_items_of_one_owner() -> None:
    q = filled("a", "a", "a", "b", "b")
    assert q.remove("a", lambda item: item[1] == 1) == [("a", 1)]
    assert len(q) == 4 and q.depth_by_owner() == {"a": 2, "b": 2}
    assert pop_all(q) == ["a0", "b0", "a2", "b1"]   # order and rotation intact


def test_remove_keeps_the_owner_rotation_position() -> None:
    q = filled("a", "a", "b")
    q.remove("a", lambda item: item[1] == 0)
    assert pop_all(q) == ["a1", "b0"]


def test_remove_everything_of_an_owner() -> None:
    q = filled("a", "b", "a")
    assert q.remove("a", lambda item: True) == [("a", 0), ("a", 1)]
    assert q.depth_by_owner() == {"b": 1} and len(q) == 1
    assert q.remove("a", lambda item: True) == []
    assert q.remove("nobody", lambda item: True) == []


def test_remove_all_across_owners() -> None:
    q = filled("a", "b", "a", "c", "b")
    expired = q.remove_all(lambda item: item[1] == 0)
    assert sorted(expired) == [("a", 0), ("b", 0), ("c", 0)]
    assert len(q) == 2 and pop_all(q) == ["a1", "b1"]


def test_drain() -> None:
    q = filled("a", "b", "a")
    assert q.drain() == [("a", 0), ("a", 1), ("b", 0)]
    assert len(q) == 0 and q.depth_by_owner() == {} and list(q) == []
    assert q.pop_next(anyone) is None
    assert q.push("a", ("a", 5)) and len(q) == 1    # usable afterwards


def test_iteration_and_depths() -> None:
    q = filled("a", "b", "a")
    assert list(q) == [("a", 0), ("a", 1), ("b", 0)]
    assert q.depth_by_owner() == {"a": 2, "b": 1}
    assert len(q) == 3 and len(list(q)) == 3         # iterating does not consume


def test_size_stays_consistent_under_mixed_operations() -> None:
    q: FairQueue[Item] = FairQueue(1000)
    for i in range(60):
        q.push("abc"[i % 3], ("abc"[i % 3], i))
        if i % 4 == 0:
            q.pop_next(anyone)
        if i % 10 == 0:
            q.remove("b", lambda item: item[1] % 2 == 0)
        assert len(q) == len(list(q)) == sum(q.depth_by_owner().values())

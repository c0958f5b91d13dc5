"""VISA-style instrument locks held by client sessions (broker/locks.py): pure state, no clocks."""

from __future__ import annotations

import pytest

from visabus.broker.locks import LockState, validate_lock_request
from visabus.sdk.errors import InvalidParameter, SessionNotLocked, StatusCode

EXCL, SHARED = True, False


def state(*grants: tuple[str, bool, str | None]) -> LockState:
    """A LockState after the given grants (each must succeed)."""
    lock = LockState()
    for sid, exclusive, key in grants:
        assert lock.try_acquire(sid, exclusive, key) is not None, (sid, exclusive, key)
    return lock


def test_unlocked_admits_everyone() -> None:
    lock = LockState()
    assert not lock.locked and lock.holders() == []
    assert lock.admits("a") and lock.admits("b")


# ------------------------------------------------------------------------------------ exclusive
def test_exclusive_admits_only_its_holder() -> None:
    lock = LockState()
    assert lock.try_acquire("a", EXCL, None) == ""  # exclusive locks have no access key
    assert lock.locked and lock.holders() == ["a"]
    assert lock.admits("a") and not lock.admits("b")


@pytest.mark.parametrize(("exclusive", "key"), [(EXCL, None), (SHARED, None), (SHARED, "k")])
def test_exclusive_blocks_every_other_request(exclusive: bool, key: str | None) -> None:
    lock = state(("a", EXCL, None))
    before = (lock.exclusive, lock.exclusive_depth, dict(lock.shared), lock.shared_key)
    assert lock.try_acquire("b", exclusive, key) is None  # the caller waits
    assert (lock.exclusive, lock.exclusive_depth, dict(lock.shared), lock.shared_key) == before


def test_exclusive_nesting_counts_levels() -> None:
    lock = state(("a", EXCL, None), ("a", EXCL, None), ("a", EXCL, None))
    assert lock.exclusive_depth == 3
    for _ in range(2):
        lock.release("a")
        assert not lock.admits("b")  # still held until the last level goes
    lock.release("a")
    assert not lock.locked and lock.admits("b") and lock.exclusive_depth == 0
    with pytest.raises(SessionNotLocked):
        lock.release("a")


def test_release_by_a_non_holder() -> None:
    lock = state(("a", EXCL, None))
    with pytest.raises(SessionNotLocked) as info:
        lock.release("b")
    assert info.value.code is StatusCode.VI_ERROR_SESN_NLOCKED
    assert lock.exclusive == "a"  # unchanged


def test_release_when_unlocked() -> None:
    with pytest.raises(SessionNotLocked, match="holds no lock"):
        LockState().release("a")


def test_next_exclusive_after_release() -> None:
    lock = state(("a", EXCL, None))
    assert lock.try_acquire("b", EXCL, None) is None
    lock.release("a")
    assert lock.try_acquire("b", EXCL, None) == ""
    assert lock.holders() == ["b"] and not lock.admits("a")


# ------------------------------------------------------------------------------------ shared
def test_shared_with_requested_key() -> None:
    lock = LockState()
    assert lock.try_acquire("a", SHARED, "team") == "team"
    assert lock.try_acquire("b", SHARED, "team") == "team"   # same key joins
    assert lock.holders() == ["a", "b"]
    assert lock.admits("a") and lock.admits("b") and not lock.admits("c")


def test_shared_without_key_generates_one() -> None:
    lock = LockState()
    key = lock.try_acquire("a", SHARED, None)
    assert isinstance(key, str) and len(key) >= 8
    assert lock.try_acquire("b", SHARED, key) == key
    other = LockState().try_acquire("a", SHARED, None)
    assert other != key  # generated keys are not predictable


@pytest.mark.parametrize("key", ["wrong", None], ids=["key-mismatch", "no-key"])
def test_joining_a_shared_lock_needs_its_key(key: str | None) -> None:
    lock = state(("a", SHARED, "team"))
    assert lock.try_acquire("b", SHARED, key) is None
    assert lock.holders() == ["a"] and lock.shared_key == "team" and not lock.admits("b")


def test_shared_nesting() -> None:
    lock = state(("a", SHARED, "k"), ("a", SHARED, None), ("a", SHARED, "k"))  # the holder may omit the key
    assert lock.shared == {"a": 3}
    lock.release("a")
    lock.release("a")
    assert lock.admits("a") and not lock.admits("b")
    lock.release("a")
    assert not lock.locked and lock.shared_key is None


def test_key_is_forgotten_when_the_last_sharer_leaves() -> None:
    lock = state(("a", SHARED, "old"), ("b", SHARED, "old"))
    lock.release("a")
    assert lock.shared_key == "old"        # b still holds it
    lock.release("b")
    assert lock.shared_key is None
    assert lock.try_acquire("c", SHARED, "new") == "new"
    assert lock.try_acquire("d", SHARED, "old") is None


def test_exclusive_waits_for_other_sharers() -> None:
    lock = state(("a", SHARED, "k"), ("b", SHARED, "k"))
    assert lock.try_acquire("c", EXCL, None) is None
    assert lock.try_acquire("a", EXCL, None) is None   # a is not the only sharer
    assert lock.exclusive is None


# ------------------------------------------------------------------------------------ upgrade
def test_sole_sharer_upgrades_to_exclusive() -> None:
    lock = state(("a", SHARED, "k"))
    assert lock.try_acquire("a", EXCL, None) == ""
    assert lock.exclusive == "a" and lock.holders() == ["a"]
    assert lock.try_acquire("b", SHARED, "k") is None  # the key no longer lets anyone in
    lock.release("a")                                  # exclusive level goes first (VISA)
    assert lock.exclusive is None and lock.shared == {"a": 1}
    assert lock.try_acquire("b", SHARED, "k") == "k"   # back to a shared lock
    assert lock.holders() == ["a", "b"]


def test_exclusive_holder_may_also_take_a_shared_lock() -> None:
    lock = state(("a", EXCL, None))
    assert lock.try_acquire("a", SHARED, "k") == "k"
    assert lock.try_acquire("b", SHARED, "k") is None  # exclusive still rules
    lock.release("a")
    assert lock.try_acquire("b", SHARED, "k") == "k"


# ------------------------------------------------------------------------------------ release_session
def test_release_session_drops_every_level() -> None:
    lock = state(("a", SHARED, "k"), ("a", SHARED, "k"), ("a", EXCL, None), ("a", EXCL, None))
    assert lock.release_session("a") is True
    assert not lock.locked and lock.exclusive_depth == 0 and lock.shared_key is None
    assert lock.admits("b")
    assert lock.release_session("a") is False


def test_release_session_keeps_other_sharers() -> None:
    lock = state(("a", SHARED, "k"), ("b", SHARED, "k"))
    assert lock.release_session("a") is True
    assert lock.holders() == ["b"] and lock.shared_key == "k"
    assert not lock.admits("a")


def test_release_session_of_a_bystander() -> None:
    lock = state(("a", EXCL, None))
    assert lock.release_session("b") is False
    assert lock.exclusive == "a" and lock.exclusive_depth == 1


# ------------------------------------------------------------------------------------ request validation
@pytest.mark.parametrize(
    ("exclusive", "key", "expected"),
    [(True, None, (True, None)), (False, None, (False, None)), (False, "team", (False, "team")),
     (False, "k" * 256, (False, "k" * 256))],
)
def test_valid_lock_requests(exclusive: object, key: object, expected: tuple[bool, str | None]) -> None:
    assert validate_lock_request(exclusive, key) == expected


@pytest.mark.parametrize(
    ("exclusive", "key", "fragment"),
    [(1, None, "'exclusive' must be true or false"), ("yes", None, "'exclusive' must be true or false"),
     (None, None, "'exclusive' must be true or false"),
     (False, "", "non-empty string"), (False, 5, "non-empty string"), (False, "k" * 257, "at most 256"),
     (True, "team", "an exclusive lock takes no key")],
)
def test_invalid_lock_requests(exclusive: object, key: object, fragment: str) -> None:
    with pytest.raises(InvalidParameter, match=fragment) as info:
        validate_lock_request(exclusive, key)
    assert info.value.code is StatusCode.VI_ERROR_INV_PARAMETER

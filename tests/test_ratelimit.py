"""Token bucket and upload slots."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pull.core.ratelimit import TokenBucket, UploadSlots


def test_unlimited_never_waits():
    bucket = TokenBucket(None, 0)
    assert bucket.reserve(10**12, 0.0) == 0.0
    assert bucket.reserve(10**12, 0.0) == 0.0
    assert bucket.available(0.0) == float("inf")


def test_burst_then_rate():
    bucket = TokenBucket(rate=100.0, burst=50.0)
    assert bucket.reserve(50, 0.0) == 0.0  # the burst is there at once
    assert bucket.reserve(100, 0.0) == pytest.approx(1.0)  # 100 bytes of debt at 100 B/s
    # the next reservation queues behind the debt
    assert bucket.reserve(100, 0.0) == pytest.approx(2.0)
    # time pays the debt
    assert bucket.reserve(0, 2.0) == 0.0
    assert bucket.available(2.0) == pytest.approx(0.0)


def test_refill_is_capped_at_burst():
    bucket = TokenBucket(rate=10.0, burst=30.0)
    bucket.reserve(30, 0.0)
    assert bucket.available(100.0) == pytest.approx(30.0)
    assert bucket.reserve(40, 100.0) == pytest.approx(1.0)


def test_chunk_larger_than_burst_is_allowed():
    bucket = TokenBucket(rate=1000.0, burst=10.0)
    assert bucket.reserve(5000, 0.0) == pytest.approx(4.99)


def test_clock_going_backwards_refills_nothing():
    bucket = TokenBucket(rate=10.0, burst=10.0)
    bucket.reserve(10, 5.0)
    assert bucket.reserve(10, 4.0) == pytest.approx(1.0)
    assert bucket.available(5.0) == pytest.approx(-10.0)


@pytest.mark.parametrize("rate, burst", [(0, 1), (-1, 1), (1, -1)])
def test_bad_parameters(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_negative_reservation():
    with pytest.raises(ValueError):
        TokenBucket(1.0, 1.0).reserve(-1, 0.0)


@settings(max_examples=100)
@given(st.floats(1.0, 1e9), st.floats(0.0, 1e9),
       st.lists(st.tuples(st.floats(0.0, 1e8), st.floats(0.0, 1.0)), min_size=1,
                max_size=40))
def test_long_run_rate_never_exceeds_rate_plus_burst(rate, burst, steps):
    """Sending each reservation after its wait never moves more than burst + rate x time."""
    bucket = TokenBucket(rate, burst)
    now, sent = 0.0, 0.0
    for nbytes, gap in steps:
        now += gap
        now += bucket.reserve(nbytes, now)
        sent += nbytes
        assert sent <= burst + rate * now + 1e-6 * max(1.0, sent)


def test_upload_slots():
    slots = UploadSlots(2)
    assert slots.try_acquire("a")
    assert slots.try_acquire("a")  # already holds one: still one slot
    assert slots.try_acquire("b")
    assert not slots.try_acquire("c")
    assert slots.free == 0 and len(slots) == 2
    assert slots.holders == ("a", "b")
    slots.release("a")
    slots.release("a")  # releasing twice is harmless
    slots.release("never")
    assert slots.try_acquire("c")
    assert slots.holds("c") and not slots.holds("a")
    assert slots.holders == ("b", "c")


def test_freed_slots_go_to_the_peers_receiving_least():
    slots = UploadSlots(2)
    assert slots.try_acquire("a") and slots.try_acquire("b")
    for peer, receiving in (("c", 5), ("d", 2), ("e", 9), ("f", 2)):
        assert not slots.try_acquire(peer, queue=True, receiving=receiving)
    assert slots.line_length == 4
    slots.release("a")
    assert slots.grant() == ["d"]  # the least; "f" receives as little but came later
    slots.update("e", 1)  # a further request from "e": it receives less now
    slots.update("never", 0)  # not in line: nothing happens
    assert not slots.try_acquire("c", queue=True, receiving=7)  # asks again: 7 now
    slots.release("b")
    slots.release("d")
    assert slots.grant() == ["e", "f"]
    assert slots.waiting == ("c",) and slots.line_length == 1


def test_queued_peers_get_freed_slots_first_come_first():
    slots = UploadSlots(1)
    assert slots.try_acquire("a", queue=True)
    assert not slots.try_acquire("b", queue=True)
    assert not slots.try_acquire("c", queue=True)
    assert not slots.try_acquire("b", queue=True)  # once in line, whatever it asks again
    assert slots.waiting == ("b", "c")
    assert slots.grant() == []  # no slot free yet
    slots.release("a")
    # a newcomer does not overtake the line, even to a free slot
    assert not slots.try_acquire("d")
    assert slots.waiting == ("b", "c")
    assert slots.grant() == ["b"]
    assert slots.holders == ("b",) and slots.waiting == ("c",)
    slots.release("c")  # gone while waiting: out of the line
    slots.release("b")
    assert slots.grant() == [] and slots.free == 1
    assert slots.try_acquire("d")


def test_unlimited_and_zero_slots():
    unlimited = UploadSlots(None)
    assert all(unlimited.try_acquire(f"p{n}") for n in range(1000))
    assert unlimited.free is None
    assert not UploadSlots(0).try_acquire("a")
    with pytest.raises(ValueError):
        UploadSlots(-1)

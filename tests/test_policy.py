"""Origin concurrency and retry backoff, driven with synthetic time and seeded randomness."""

from __future__ import annotations

import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pull.core.policy import (BACKOFF_BASE_SECONDS, BACKOFF_CAP_SECONDS, GROWTH_THRESHOLD,
                                MIN_WINDOW_SECONDS, AdaptiveConcurrency, backoff_delay,
                                origin_connection_share)

UNIT = 1_000_000  # bytes per second that one request in flight moves


class FarOrigin:
    """Each request in flight moves UNIT bytes/s, up to ``ceiling`` requests' worth (the
    origin's or the link's limit): throughput is proportional to the limit until it caps."""

    def __init__(self, ceiling: float):
        self.ceiling = ceiling
        self.now = 0.0

    def rate(self, limit: int) -> float:
        return min(limit, self.ceiling) * UNIT

    def run(self, policy: AdaptiveConcurrency, seconds: float, step: float) -> list[int]:
        """Feed a sample every ``step`` seconds; return the limit after each sample."""
        limits = []
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now += step
            nbytes = int(self.rate(policy.limit) * step)
            limits.append(policy.on_bytes(nbytes, self.now))
            assert limits[-1] == policy.limit
        return limits


def test_limit_is_clamped_at_construction():
    assert AdaptiveConcurrency(limit=100, cap=16).limit == 16
    assert AdaptiveConcurrency(limit=0, cap=16, floor=2).limit == 2


@pytest.mark.parametrize("step", [0.01, 0.05, 0.3, 1.0])
def test_grows_while_throughput_rises(step):
    origin = FarOrigin(ceiling=float("inf"))
    policy = AdaptiveConcurrency(limit=4, cap=64)
    limits = origin.run(policy, seconds=20, step=step)
    assert limits[-1] == 64
    assert limits == sorted(limits)  # never shrinks while nothing pushes back
    # it doubles, one step at a time
    assert set(limits) <= {4, 8, 16, 32, 64}


@pytest.mark.parametrize("ceiling", [5, 12, 16, 20])
@pytest.mark.parametrize("step", [0.02, 0.3])
def test_holds_when_throughput_stops_rising(ceiling, step):
    origin = FarOrigin(ceiling=ceiling)
    policy = AdaptiveConcurrency(limit=4, cap=256)
    origin.run(policy, seconds=20, step=step)
    settled = policy.limit
    # enough requests to reach the ceiling, and not more than one doubling past the one
    # that reached it (the window that proves a doubling useless comes after it)
    assert ceiling <= settled <= 4 * ceiling
    assert settled < 256
    # and it stays there
    later = origin.run(policy, seconds=30, step=step)
    assert set(later) == {settled}


def test_small_gains_do_not_grow_the_pool():
    """A window better by less than GROWTH_THRESHOLD is noise: no doubling."""
    policy = AdaptiveConcurrency(limit=4, cap=64)
    now = 0.0
    policy.on_bytes(0, now)
    now += 1.0
    policy.on_bytes(10**6, now)
    settled, best = policy.limit, policy.best_rate
    for _ in range(20):
        now += 1.0
        policy.on_bytes(int(best * (GROWTH_THRESHOLD - 0.02)), now)
    assert policy.limit == settled
    now += 1.0
    policy.on_bytes(int(best * (GROWTH_THRESHOLD + 0.05)), now)
    assert policy.limit == 2 * settled


def test_never_exceeds_cap():
    origin = FarOrigin(ceiling=float("inf"))
    for cap in (1, 3, 5, 16, 100):
        policy = AdaptiveConcurrency(limit=2, cap=cap)
        limits = origin.run(policy, seconds=30, step=0.05)
        assert max(limits) <= cap
        assert limits[-1] == cap


def test_the_cap_follows_the_share_and_the_limit_moves_with_it():
    origin = FarOrigin(ceiling=float("inf"))
    policy = AdaptiveConcurrency(limit=4, cap=16)
    origin.run(policy, seconds=30, step=0.05)
    assert policy.limit == 16
    policy.set_cap(2)  # seven more nodes share the origin now
    assert policy.limit == 2 and policy.cap == 2
    policy.set_cap(0)
    assert policy.cap == policy.limit == 1  # never below the floor
    policy.set_cap(8)  # the last node with origin work: it takes more at once
    assert policy.limit == 8
    policy.on_pushback(100.0)
    assert policy.limit == 4
    policy.set_cap(10)
    assert policy.limit == 6  # the pushback's halving stays
    assert max(origin.run(policy, seconds=30, step=0.05)) <= 10


def test_a_lower_cap_before_the_first_window_keeps_what_it_allows():
    """At the start a node has 4 of 16 requests and learns that its share is 2: it keeps
    2, not 4 - (16 - 2)."""
    policy = AdaptiveConcurrency(limit=4, cap=16)
    policy.set_cap(2)
    assert policy.limit == 2
    policy.set_cap(3)
    assert policy.limit == 3


def test_short_windows_do_not_count():
    policy = AdaptiveConcurrency(limit=4, cap=64)
    now = 0.0
    policy.on_bytes(1, now)
    # a flood of bytes within less than one window: no decision yet
    for _ in range(10):
        now += (MIN_WINDOW_SECONDS / 20)
        assert policy.on_bytes(10**9, now) == 4
    assert policy.best_rate == 0.0


def test_halves_on_pushback():
    policy = AdaptiveConcurrency(limit=16, cap=16)
    assert policy.on_pushback(0.0) == 8
    assert policy.limit == 8
    assert policy.on_pushback(0.1) == 4
    assert policy.on_pushback(0.2) == 2
    assert policy.on_pushback(0.3) == 1
    assert policy.on_pushback(0.4) == 1  # floor
    floored = AdaptiveConcurrency(limit=16, cap=16, floor=3)
    for _ in range(5):
        floored.on_pushback(0.0)
    assert floored.limit == 3


def test_pushback_is_not_undone_by_a_steady_origin():
    origin = FarOrigin(ceiling=float("inf"))
    policy = AdaptiveConcurrency(limit=4, cap=64)
    origin.run(policy, seconds=20, step=0.05)
    assert policy.limit == 64
    policy.on_pushback(origin.now)
    assert policy.limit == 32
    # an origin that says "too many" and then serves at the same per-request rate must not
    # be pushed straight back to the limit it refused
    origin.ceiling = 32
    limits = origin.run(policy, seconds=20, step=0.05)
    assert set(limits) == {32}


def test_grows_again_after_pushback_when_throughput_rises():
    policy = AdaptiveConcurrency(limit=8, cap=64)
    policy.on_pushback(0.0)
    assert policy.limit == 4
    now, rate = 0.0, 1e6
    for _ in range(3):
        now += 1.0
        policy.on_bytes(int(rate), now)
    assert policy.limit == 4  # measured afresh, no reason to grow yet
    now += 1.0
    policy.on_bytes(int(rate * 2), now)
    assert policy.limit == 8


# -- backoff ------------------------------------------------------------------------------


def ceiling(attempt: int) -> float:
    return min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))


@given(st.integers(1, 5000), st.integers(0, 2**32))
def test_backoff_within_its_ceiling(attempt, seed):
    delay = backoff_delay(attempt, random.Random(seed))
    assert 0 <= delay <= ceiling(min(attempt, 64)) <= BACKOFF_CAP_SECONDS


def test_first_attempt_waits_at_most_the_base():
    rng = random.Random(1)
    assert max(backoff_delay(1, rng) for _ in range(1000)) <= BACKOFF_BASE_SECONDS


def test_backoff_grows_in_expectation_until_the_cap():
    rng = random.Random(7)
    attempts = range(1, 11)
    means = {a: statistics.fmean(backoff_delay(a, rng) for _ in range(2000)) for a in attempts}
    for attempt in attempts:
        # full jitter: uniform over [0, ceiling]
        assert means[attempt] == pytest.approx(ceiling(attempt) / 2, rel=0.1)
        if attempt > 1 and ceiling(attempt) > ceiling(attempt - 1):
            assert means[attempt] > 1.5 * means[attempt - 1]
    assert ceiling(10) == BACKOFF_CAP_SECONDS


def test_backoff_is_jittered():
    rng = random.Random(3)
    delays = {backoff_delay(4, rng) for _ in range(50)}
    assert len(delays) > 40


def test_backoff_respects_retry_after():
    rng = random.Random(5)
    for attempt in (1, 3, 8):
        for _ in range(100):
            assert backoff_delay(attempt, rng, retry_after=7.5) >= 7.5
            assert backoff_delay(attempt, rng, retry_after=0.0) >= 0.0
    # a huge Retry-After is bounded, so a hostile server cannot park the client forever
    assert backoff_delay(1, rng, retry_after=10**9) <= 60.0
    assert backoff_delay(1, rng, retry_after=10**9) >= BACKOFF_CAP_SECONDS


def test_backoff_is_deterministic_with_a_seeded_random():
    first = [backoff_delay(a, random.Random(42)) for a in range(1, 12)]
    second = [backoff_delay(a, random.Random(42)) for a in range(1, 12)]
    assert first == second
    rng_a, rng_b = random.Random(9), random.Random(9)
    assert ([backoff_delay(a, rng_a, 0.1) for a in range(1, 12)]
            == [backoff_delay(a, rng_b, 0.1) for a in range(1, 12)])
    assert first != [backoff_delay(a, random.Random(43)) for a in range(1, 12)]


def test_a_node_keeps_to_its_share_of_the_origin_connections():
    assert origin_connection_share(16, 2, 16) == 2  # one node of 8
    assert origin_connection_share(16, 1, 1000) == 1  # at least one
    assert origin_connection_share(16, 0, 10) == 1
    assert origin_connection_share(16, 30, 40) == 12
    assert origin_connection_share(16, 0, 0) == 16  # nothing left: all of them

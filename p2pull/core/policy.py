"""Bandwidth and retry policy: pure functions and small state machines, fed with measured
bytes, time and randomness by the caller."""

from __future__ import annotations

import random
from dataclasses import dataclass

#: a new window counts as better only above this gain, so noise does not grow the pool
GROWTH_THRESHOLD = 1.10
#: a window shorter than this measures scheduling noise rather than throughput
MIN_WINDOW_SECONDS = 0.25


def origin_connection_share(max_connections: int, mine: int, remaining: int) -> int:
    """The origin connections a node keeps to: its part of ``max_connections`` (it fetches
    ``mine`` of the ``remaining`` chunks the origin still has to send to the swarm), at
    least one; all of them when nothing remains. The daemon's origin pool and the
    simulator's both keep to it."""
    share = mine / remaining if remaining else 1.0
    return max(1, round(max_connections * share))


@dataclass
class AdaptiveConcurrency:
    """How many ranged requests to keep in flight against one origin.

    Starts small and doubles after its first measured window (a probe), then doubles again
    while each window is clearly faster than the best so far (a far origin caps each
    connection, so more connections help); holds once throughput stops rising, and halves
    when the origin pushes back (429/503), measuring afresh without probing."""

    limit: int = 4
    cap: int = 16
    floor: int = 1
    best_rate: float = 0.0
    _window_start: float | None = None
    _window_bytes: int = 0
    #: double after the first window even though nothing was faster before it; off after a
    #: pushback, so the limit the origin refused is not retaken at once
    _probe: bool = True

    def __post_init__(self):
        self.limit = max(self.floor, min(self.limit, self.cap))

    def on_bytes(self, nbytes: int, now: float) -> int:
        """Record ``nbytes`` received at time ``now``; return the limit to use from now."""
        if self._window_start is None:
            # these bytes arrived before ``now``, over a time we do not know: they open the
            # first window but do not count in it, or its rate would be overstated
            self._window_start = now
            return self.limit
        self._window_bytes += nbytes
        elapsed = now - self._window_start
        if elapsed >= MIN_WINDOW_SECONDS:
            rate = self._window_bytes / elapsed
            if rate > self.best_rate * GROWTH_THRESHOLD:
                if self.best_rate or self._probe:
                    self.limit = min(self.cap, self.limit * 2)
                self.best_rate = rate
            self._window_start, self._window_bytes = now, 0
        return self.limit

    def set_cap(self, cap: int) -> None:
        """Change the most requests allowed (this node's share of the origin changed): a
        higher cap raises the limit by as much (what a pushback took stays taken), a lower
        one bounds it; the rate is measured afresh, the old one having been taken under
        other sharing. (Lowering by as much as the cap took a node that had not probed up
        to its cap yet, 4 of 16 at the start, down to one connection for its first window.)"""
        cap = max(self.floor, cap)
        if cap != self.cap:
            if cap > self.cap:
                self.limit = min(cap, self.limit + cap - self.cap)
            else:
                self.limit = min(cap, self.limit)
            self.cap = cap
            self.best_rate = 0.0
            self._window_start, self._window_bytes = None, 0

    def on_pushback(self, now: float) -> int:
        """The origin answered 429 or 503: back off, and measure afresh."""
        self.limit = max(self.floor, self.limit // 2)
        self.best_rate = 0.0
        self._probe = False
        self._window_start, self._window_bytes = now, 0
        return self.limit


#: first retry waits up to this long
BACKOFF_BASE_SECONDS = 0.2
#: no single wait between attempts is longer than this
BACKOFF_CAP_SECONDS = 10.0


def backoff_delay(attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1): full
    jitter over an exponential ceiling, so a crowd of clients does not retry in step; never
    less than the server's Retry-After."""
    # the exponent is bounded so that any attempt count stays a float (2**1100 is not one)
    ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** min(attempt - 1, 64))
    delay = rng.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, 60.0))
    return delay

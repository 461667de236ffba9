"""Bandwidth and concurrency limits for serving peers: a token bucket for bytes per second and
a fixed number of upload slots. Pure: the caller passes the time and sleeps."""

from __future__ import annotations


class TokenBucket:
    """Bytes per second with bursts: ``rate`` tokens (bytes) flow in per second, at most
    ``burst`` are kept. ``rate=None`` is unlimited.

    ``reserve`` always succeeds and may drive the bucket into debt: a chunk larger than the
    burst is sent whole, and the caller waits for the debt first. Reservations queue up, so
    concurrent senders sharing a bucket share the rate."""

    __slots__ = ("rate", "burst", "_tokens", "_last")

    def __init__(self, rate: float | None, burst: float):
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be positive or None, got {rate}")
        if burst < 0:
            raise ValueError(f"negative burst {burst}")
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)  # a fresh bucket is full
        self._last: float | None = None

    def _refill(self, now: float) -> None:
        if self._last is not None and now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        if self._last is None or now > self._last:
            self._last = now  # a clock going backwards refills nothing

    def reserve(self, nbytes: float, now: float) -> float:
        """Take ``nbytes`` tokens at time ``now``; return how many seconds the caller must
        wait before sending them (0.0 when tokens were there)."""
        if nbytes < 0:
            raise ValueError(f"negative byte count {nbytes}")
        if self.rate is None:
            return 0.0
        self._refill(now)
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def available(self, now: float) -> float:
        """Tokens in the bucket at ``now`` (negative while in debt); inf when unlimited."""
        if self.rate is None:
            return float("inf")
        self._refill(now)
        return self._tokens


class UploadSlots:
    """At most ``limit`` peers are served at a time (``None``: no limit). A peer holds one slot
    however many of its requests are queued; the caller releases it when the peer's queue
    is empty or the peer is gone. A refused peer is answered busy, or, asked to ``queue``,
    waits in line: a freed slot goes to the waiting peer receiving from the fewest peers
    (what it said with its latest request), the one waiting longest among equals
    (``grant``).

    Why not first come first: with every sender's slots taken, a requester's share of the
    senders whose lines it waits in comes and goes at random, and a node served by few
    downloads below its link's rate while its senders split their uploads with nodes
    whose downloads are full. 140 GB to 1,000 nodes in the simulator: the uploads ran at
    95 % of their rate first come first, 97.7 % least served first. A peer that lies
    (says 0 while it receives plenty) wins only its own one slot each time, as any peer
    holds one slot at most."""

    __slots__ = ("limit", "_holders", "_waiting")

    def __init__(self, limit: int | None):
        if limit is not None and limit < 0:
            raise ValueError(f"negative slot limit {limit}")
        self.limit = limit
        self._holders: dict[str, None] = {}  # insertion-ordered, for a stable ``holders``
        #: the line, first come first: peer -> how many peers it receives from
        self._waiting: dict[str, int] = {}

    def try_acquire(self, peer: str, queue: bool = False, receiving: int = 0) -> bool:
        """True if ``peer`` holds a slot now (it already did, or a free one was taken while
        nobody waited for one). Otherwise, with ``queue``, ``peer`` joins the line (once;
        keeping its place, a peer in line updates ``receiving``, the number of peers it
        said it receives from)."""
        if peer in self._holders:
            return True
        if (self.limit is None or len(self._holders) < self.limit) and not self._waiting:
            self._holders[peer] = None
            return True
        if queue:
            self._waiting[peer] = receiving
        return False

    def update(self, peer: str, receiving: int) -> None:
        """``peer`` now receives from ``receiving`` peers (told with a further request): its
        rank in the line, if it is in line."""
        if peer in self._waiting:
            self._waiting[peer] = receiving

    def release(self, peer: str) -> None:
        """Free ``peer``'s slot, or take it out of the line; a peer with neither is
        ignored. The freed slot is given out by ``grant``."""
        self._holders.pop(peer, None)
        self._waiting.pop(peer, None)

    def grant(self) -> list[str]:
        """Give the free slots to the waiting peers receiving least, longest waiting first
        among equals; returns those peers."""
        granted = []
        waiting = self._waiting
        while waiting and (self.limit is None or len(self._holders) < self.limit):
            peer = min(waiting, key=waiting.__getitem__)  # the first of the least
            del waiting[peer]
            self._holders[peer] = None
            granted.append(peer)
        return granted

    def holds(self, peer: str) -> bool:
        return peer in self._holders

    @property
    def holders(self) -> tuple[str, ...]:
        return tuple(self._holders)

    @property
    def waiting(self) -> tuple[str, ...]:
        """The peers in line, first come first (not the order ``grant`` serves them in)."""
        return tuple(self._waiting)

    @property
    def line_length(self) -> int:
        return len(self._waiting)

    @property
    def free(self) -> int | None:
        """Slots left, or None when unlimited."""
        return None if self.limit is None else self.limit - len(self._holders)

    def __len__(self) -> int:
        return len(self._holders)

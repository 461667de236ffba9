"""The book of chunk requests sent to peers: what is outstanding with whom since when, when
it expires, how each peer has served us so far, and who is banned.

Bookkeeping only (Kraken's ``piecerequest/manager.go``): it sends nothing and reads no
clock; the caller passes ``now``. Every operation is O(1) or O(log n) (expiry is a heap with
lazy deletion), except those that by their nature touch all of one peer's requests.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

#: a request expires after this many times the time the peer's measured rate needs for the
#: chunk, counted once it is the oldest of ours there (a peer serves a link's requests in
#: order): the margin covers the other requesters the peer's uplink serves meanwhile
TIMEOUT_RATE_FACTOR = 4.0
#: elapsed times shorter than this are measured as this, so an instant reply (a test, a
#: loopback peer) does not produce an infinite rate
MIN_ELAPSED = 1e-6


@dataclass(frozen=True, slots=True)
class Request:
    peer: str
    index: int
    sent_at: float
    expires_at: float


@dataclass(slots=True)
class PeerRecord:
    """What we measured of one peer: it outlives the peer's connection, so a peer that comes
    back is judged on its past."""

    #: EWMA of bytes per second per request, from the later of its sending and the peer's
    #: previous piece to its verified piece: the peer's rate for us, not our queue there
    #: (None: unmeasured)
    throughput: float | None = None
    #: when the peer's last piece arrived (None: none yet)
    last_piece_at: float | None = None
    #: pieces received and verified
    successes: int = 0
    #: requests that expired, came back busy, rejected or in error
    failures: int = 0
    #: recent failures: +1 per failure, halved per success; divides the score
    penalty: float = 0.0
    banned: bool = False
    ban_reason: str | None = None


class RequestBook:
    """Outstanding requests keyed by (peer, index), with a per-peer pipeline limit.

    ``pipeline_depth`` bounds the requests outstanding with one peer; ``timeout_min`` is the
    least time a request is given; ``assumed_throughput`` (bytes/s) stands in for a peer not
    measured yet, for timeouts and scores; ``smoothing`` is the weight of a new throughput
    sample in the EWMA."""

    def __init__(self, pipeline_depth: int = 3, timeout_min: float = 5.0,
                 assumed_throughput: float = 8 * 1024 * 1024, smoothing: float = 0.25):
        if pipeline_depth < 1:
            raise ValueError(f"pipeline depth must be at least 1, got {pipeline_depth}")
        if assumed_throughput <= 0 or not 0 < smoothing <= 1:
            raise ValueError("assumed_throughput must be positive and smoothing in (0, 1]")
        self.pipeline_depth = pipeline_depth
        self.timeout_min = timeout_min
        self.assumed_throughput = assumed_throughput
        self.smoothing = smoothing
        self._by_peer: dict[str, dict[int, Request]] = {}
        self._by_index: dict[int, dict[str, Request]] = {}
        self._expiry: list[tuple[float, int, Request]] = []
        self._seq = 0
        self._records: dict[str, PeerRecord] = {}
        #: requests outstanding, with all peers
        self.open = 0

    # -- requests ---------------------------------------------------------------------------

    def timeout(self, peer: str, nbytes: int) -> float:
        """Seconds a request for ``nbytes`` from ``peer`` is given:
        max(timeout_min, TIMEOUT_RATE_FACTOR x nbytes / the peer's throughput estimate)."""
        return self._timeout_of(self._records.get(peer), nbytes)

    def _timeout_of(self, record: PeerRecord | None, nbytes: int) -> float:
        rate = record.throughput if record is not None and record.throughput else None
        return max(self.timeout_min,
                   TIMEOUT_RATE_FACTOR * nbytes / (rate or self.assumed_throughput))

    def add(self, peer: str, index: int, now: float, nbytes: int) -> Request:
        """Record a request sent now. Raises ValueError if it is already outstanding, the
        peer's pipeline is full or the peer is banned."""
        requests = self._by_peer.get(peer)
        if requests is None:
            requests = self._by_peer[peer] = {}
        if index in requests:
            raise ValueError(f"chunk {index} already requested from {peer}")
        if len(requests) >= self.pipeline_depth:
            raise ValueError(f"pipeline to {peer} is full")
        # is_banned and timeout on one look-up of the record: a swarm sends a request for
        # about every busy answer it gets, several per chunk
        record = self._records.get(peer)
        if record is not None and record.banned:
            raise ValueError(f"{peer} is banned")
        expires_at = now + self._timeout_of(record, nbytes)
        request = Request(peer, index, now, expires_at)
        requests[index] = request
        self.open += 1
        peers = self._by_index.get(index)
        if peers is None:
            self._by_index[index] = {peer: request}
        else:
            peers[peer] = request
        self._schedule_expiry(expires_at, request)
        return request

    def _remove(self, peer: str, index: int) -> Request | None:
        requests = self._by_peer.get(peer)
        if not requests:
            return None
        request = requests.pop(index, None)
        if request is None:
            return None
        if not requests:
            del self._by_peer[peer]
        peers = self._by_index[index]
        del peers[peer]
        if not peers:
            del self._by_index[index]
        self.open -= 1
        return request

    def complete(self, peer: str, index: int, nbytes: int, now: float) -> Request | None:
        """A verified piece arrived: close the request (if any) and learn the peer's rate."""
        request = self._remove(peer, index)
        record = self.record(peer)
        record.successes += 1
        record.penalty /= 2
        if request is not None:
            sample = nbytes / max(MIN_ELAPSED, now - self._service_start(request, record))
            old = record.throughput
            record.throughput = sample if old is None else \
                old + self.smoothing * (sample - old)
        record.last_piece_at = now
        return request

    @staticmethod
    def _service_start(request: Request, record: PeerRecord | None) -> float:
        """When the peer began on ``request``, as far as we can tell: when it was sent or
        when the piece before it arrived, whichever is later."""
        last = record.last_piece_at if record is not None else None
        return request.sent_at if last is None else max(request.sent_at, last)

    def fail(self, peer: str, index: int) -> Request | None:
        """The request failed (busy, rejected, error): close it and count a failure."""
        request = self._remove(peer, index)
        self._count_failure(peer)
        return request

    def cancel(self, peer: str, index: int) -> Request | None:
        """We withdrew the request (another source won, the peer left): no blame."""
        return self._remove(peer, index)

    def drop_peer(self, peer: str) -> list[Request]:
        """Close all of ``peer``'s requests without blame; returns them, oldest first."""
        requests = self._by_peer.get(peer)
        if not requests:
            return []
        dropped = list(requests.values())
        for request in dropped:
            self._remove(peer, request.index)
        return dropped

    def expired(self, now: float) -> list[Request]:
        """Close and return the requests whose time ran out at ``now`` (each counts as a
        failure of its peer), soonest expiry first.

        A request's time (``expires_at - sent_at``) runs only while it is the oldest of
        ours at its peer, from its sending or the peer's previous piece, whichever is
        later: the peer serves our requests in order, so one queued behind our others
        there is not late, and expiring it would fetch the chunk twice (the peer sends it
        anyway, unless our cancel overtakes it). A peer that stops sending lets all our
        requests there expire one time after its last piece (or their sending)."""
        found = []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            request = heapq.heappop(heap)[2]
            live = self._by_peer.get(request.peer)
            if live is None or live.get(request.index) is not request:
                continue  # closed meanwhile
            allowed = request.expires_at - request.sent_at
            if next(iter(live.values())) is not request:  # its time has not begun
                self._schedule_expiry(now + allowed, request)
                continue
            due = self._service_start(request, self._records.get(request.peer)) + allowed
            if due > now:
                self._schedule_expiry(due, request)
                continue
            self._remove(request.peer, request.index)
            self._count_failure(request.peer)
            found.append(request)
        return found

    def _schedule_expiry(self, when: float, request: Request) -> None:
        self._seq += 1
        heapq.heappush(self._expiry, (when, self._seq, request))

    def next_expiry(self) -> float | None:
        """When ``expired`` may next return something (possibly early: entries for closed
        requests are dropped lazily)."""
        heap = self._expiry
        while heap:
            request = heap[0][2]
            live = self._by_peer.get(request.peer)
            if live is not None and live.get(request.index) is request:
                return heap[0][0]
            heapq.heappop(heap)
        return None

    def get(self, peer: str, index: int) -> Request | None:
        requests = self._by_peer.get(peer)
        return requests.get(index) if requests else None

    def has(self, peer: str, index: int) -> bool:
        requests = self._by_peer.get(peer)
        return bool(requests) and index in requests

    def outstanding(self, peer: str) -> int:
        requests = self._by_peer.get(peer)
        return len(requests) if requests else 0

    def has_capacity(self, peer: str) -> bool:
        """True if ``peer`` may be sent another request (not banned, pipeline not full)."""
        return self.outstanding(peer) < self.pipeline_depth and not self.is_banned(peer)

    def requests_of(self, peer: str) -> list[int]:
        requests = self._by_peer.get(peer)
        return list(requests) if requests else []

    def peers_for(self, index: int) -> list[str]:
        """Peers asked for chunk ``index``, in the order they were asked."""
        peers = self._by_index.get(index)
        return list(peers) if peers else []

    def sources(self, index: int) -> int:
        peers = self._by_index.get(index)
        return len(peers) if peers else 0

    def __len__(self) -> int:
        return self.open

    # -- peers ------------------------------------------------------------------------------

    def stats(self, peer: str) -> PeerRecord | None:
        """What we measured of ``peer`` (None: nothing yet), for status displays."""
        return self._records.get(peer)

    def record(self, peer: str) -> PeerRecord:
        """The peer's record, created empty if new."""
        record = self._records.get(peer)
        if record is None:
            record = self._records[peer] = PeerRecord()
        return record

    def _count_failure(self, peer: str) -> None:
        record = self.record(peer)
        record.failures += 1
        record.penalty += 1.0

    def throughput(self, peer: str) -> float | None:
        record = self._records.get(peer)
        return record.throughput if record is not None else None

    def failures(self, peer: str) -> int:
        record = self._records.get(peer)
        return record.failures if record is not None else 0

    def score(self, peer: str) -> float:
        """Higher is better: the measured (else assumed) throughput, divided by 1 + recent
        failures. A banned peer scores -1."""
        record = self._records.get(peer)
        if record is None:
            return self.assumed_throughput
        if record.banned:
            return -1.0
        return (record.throughput or self.assumed_throughput) / (1.0 + record.penalty)

    def ban(self, peer: str, reason: str) -> bool:
        """Ban ``peer`` for good and drop its requests; True the first time only."""
        record = self.record(peer)
        if record.banned:
            return False
        record.banned = True
        record.ban_reason = reason
        self.drop_peer(peer)
        return True

    def is_banned(self, peer: str) -> bool:
        record = self._records.get(peer)
        return record is not None and record.banned

    @property
    def banned(self) -> dict[str, str]:
        """Banned peers and why."""
        return {peer: record.ban_reason or "" for peer, record in self._records.items()
                if record.banned}

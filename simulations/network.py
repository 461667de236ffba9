"""Flows on links of fixed capacity, on virtual time: who is sending how fast, and when each
transfer ends.

Rates are exact max-min (``maxmin.max_min``) after every ``rebalance``, which the engine calls
every ``rate_interval`` of virtual time while flows exist. Between two rebalances rates stay
fixed, except that
- a flow that starts takes what its links have left (the least spare capacity over its
  links; possibly 0 until the next rebalance), so no link ever carries more than its
  capacity, and a chunk that follows another on the same connection picks up the rate the
  finished one freed (work-conserving in the steady state);
- a flow that ends frees its rate for flows that start later.
Why not exact max-min at every start and end: in a swarm every flow is connected to every
other through shared links, so an exact update touches all flows (thousands) on every one of
a million chunk transfers. With the interval at about one chunk time the error is a share
of one interval per flow start; ``tests/test_simulations.py`` checks the rates against the
exact ones and the run times against a smaller interval.

Completion times are returned to the engine as (time, flow, version); a flow's version
changes whenever its rate does, so an outdated completion is recognised and dropped.
Bytes moved are credited to each flow's first link (its sender) in ``sent``, when a flow is
settled (at a rebalance or at its end).
"""

from __future__ import annotations

import math

import numpy as np

from simulations.maxmin import max_min


class FlowNetwork:
    """``capacity``: bytes/s per link (``inf`` for the padding link). ``width``: links per
    flow (pad shorter ones with ``pad``)."""

    def __init__(self, capacity: list[float], width: int, initial: int = 1024):
        self.capacity = np.asarray(capacity, dtype=np.float64)
        self._cap_list = [float(c) for c in capacity]
        self.width = width
        #: sum of the current rates of the flows on each link
        self._allocated = [0.0] * len(capacity)
        #: bytes sent by each link's flows (sender side), settled so far
        self.sent = np.zeros(len(capacity))
        self._links = np.zeros((initial, width), dtype=np.int64)
        self._remaining = np.zeros(initial)
        self._rate = np.zeros(initial)
        self._since = np.zeros(initial)
        self._active = np.zeros(initial, dtype=bool)
        self._scheduled = np.zeros(initial, dtype=bool)
        self.version = np.zeros(initial, dtype=np.int64)
        self.payload: list = [None] * initial
        self._link_rows: list[tuple] = [()] * initial
        self._free = list(range(initial - 1, -1, -1))
        self.active_count = 0
        #: a flow started or ended since the last rebalance (else the rates are still exact)
        self._changed = False

    def _grow(self) -> None:
        old = len(self._remaining)
        new = old * 2
        self._links = np.concatenate([self._links, np.zeros((old, self.width), np.int64)])
        for name in ("_remaining", "_rate", "_since"):
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros(old)]))
        self._active = np.concatenate([self._active, np.zeros(old, bool)])
        self._scheduled = np.concatenate([self._scheduled, np.zeros(old, bool)])
        self.version = np.concatenate([self.version, np.zeros(old, np.int64)])
        self.payload += [None] * old
        self._link_rows += [()] * old
        self._free = list(range(new - 1, old - 1, -1))

    def add(self, links: tuple, nbytes: float, now: float, payload,
            horizon: float) -> tuple[int, int, float | None]:
        """Start a flow of ``nbytes`` over ``links`` (``width`` link indexes). Returns (flow,
        version, completion time or None when it ends after ``horizon``, the next
        rebalance, or has no rate yet)."""
        if not self._free:
            self._grow()
        fid = self._free.pop()
        allocated = self._allocated
        cap = self._cap_list
        rate = math.inf
        for link in links:
            spare = cap[link] - allocated[link]
            if spare < rate:
                rate = spare
        if rate < 0.0:
            rate = 0.0
        for link in links:
            allocated[link] += rate
        self._links[fid] = links
        self._link_rows[fid] = links
        self._remaining[fid] = nbytes
        self._rate[fid] = rate
        self._since[fid] = now
        self._active[fid] = True
        self.payload[fid] = payload
        self.active_count += 1
        self._changed = True
        version = int(self.version[fid]) + 1
        self.version[fid] = version
        finish = now + nbytes / rate if rate > 0.0 else math.inf
        if finish <= horizon:
            self._scheduled[fid] = True
            return fid, version, finish
        self._scheduled[fid] = False
        return fid, version, None

    def remove(self, fid: int, now: float) -> float:
        """End flow ``fid`` (done or cut); returns the bytes it had left (0 when done)."""
        rate = float(self._rate[fid])
        links = self._link_rows[fid]
        moved = rate * (now - float(self._since[fid]))
        left = float(self._remaining[fid]) - moved
        allocated = self._allocated
        for link in links:
            allocated[link] -= rate
        self.sent[links[0]] += moved if left > 0 else moved + left
        self._active[fid] = False
        self.version[fid] += 1
        self.payload[fid] = None
        self.active_count -= 1
        self._changed = True
        self._free.append(fid)
        return max(0.0, left)

    def settle(self, now: float) -> None:
        """Credit every flow's bytes up to ``now`` to ``sent`` (rates unchanged), so that a
        sample of ``sent`` taken now is exact."""
        active = np.flatnonzero(self._active)
        if not len(active):
            return
        moved = self._rate[active] * (now - self._since[active])
        self._remaining[active] -= moved
        self._since[active] = now
        self.sent += np.bincount(self._links[active, 0], weights=moved,
                                 minlength=len(self.capacity))

    def rebalance(self, now: float, horizon: float) -> list[tuple[float, int, int]]:
        """Settle every flow up to ``now``, give all of them their exact max-min rates, and
        return (completion, flow, version) for the flows ending by ``horizon`` that had no
        valid completion out yet."""
        active = np.flatnonzero(self._active)
        if not len(active):
            return []
        rate = self._rate[active]
        moved = rate * (now - self._since[active])
        remaining = np.maximum(self._remaining[active] - moved, 0.0)
        links = self._links[active]
        nlinks = len(self.capacity)
        self.sent += np.bincount(links[:, 0], weights=moved, minlength=nlinks)
        self._remaining[active] = remaining
        self._since[active] = now
        if not self._changed:  # same flows, same max-min rates: only schedule
            return self._due(active, rate, remaining, now, horizon)
        self._changed = False
        new = max_min(self.capacity, links)
        changed = new != rate
        if changed.any():
            moved_ids = active[changed]
            self._rate[moved_ids] = new[changed]
            self.version[moved_ids] += 1
            self._scheduled[moved_ids] = False
        self._allocated = np.bincount(links.ravel(), weights=np.repeat(new, self.width),
                                      minlength=nlinks).tolist()
        return self._due(active, new, remaining, now, horizon)

    def _due(self, active, rate, remaining, now: float,
             horizon: float) -> list[tuple[float, int, int]]:
        with np.errstate(divide="ignore"):
            finish = now + remaining / rate
        due = (finish <= horizon) & ~self._scheduled[active]
        ids = active[due]
        self._scheduled[ids] = True
        return list(zip(finish[due].tolist(), ids.tolist(), self.version[ids].tolist()))

    def rate(self, fid: int) -> float:
        return float(self._rate[fid])

    def rates(self) -> dict[int, float]:
        """Current rate of every active flow (for tests and reports)."""
        active = np.flatnonzero(self._active)
        return dict(zip(active.tolist(), self._rate[active].tolist()))

    def flows(self) -> list[int]:
        return np.flatnonzero(self._active).tolist()

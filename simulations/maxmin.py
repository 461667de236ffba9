"""Max-min fair rates of flows over links of fixed capacity.

Each flow crosses a few links (its sender's upload, its receiver's download, maybe the origin
link and rack uplinks); max-min fairness gives every flow the largest rate such that raising
any flow would lower another that is no faster. TCP flows sharing bottlenecks settle near
it, which is why flow-level simulators use it.

Two implementations that must agree:
- ``progressive_filling``: the textbook algorithm, one link saturated per round, in plain
  Python. Slow and obviously right: the reference for tests.
- ``max_min``: the same allocation with numpy, saturating in each round every link whose fair
  share is the smallest among all links it shares an unfrozen flow with. Such a link's
  flows can never get more than its share (every other link they cross offers at least as
  much, and links only offer more as other flows freeze), so freezing them at once is exact;
  the number of rounds is the depth of the bottleneck chain (a handful in a swarm), not the
  number of links.
"""

from __future__ import annotations

import math

import numpy as np

#: shares within this relative distance count as equal (float sums of many flows)
RELATIVE_TOLERANCE = 1e-9
#: rounds of ``max_min`` before the remaining flows get their current fair share as is
#: (never reached in the scenarios we run; a bound, not a tuning knob)
MAX_ROUNDS = 64


def progressive_filling(capacity: list[float], flows: list[list[int]]) -> list[float]:
    """Rates of ``flows`` (each a list of link indexes into ``capacity``)."""
    remaining = list(capacity)
    rate = [0.0] * len(flows)
    active = set(range(len(flows)))
    while active:
        count = [0] * len(capacity)
        for f in active:
            for link in set(flows[f]):
                count[link] += 1
        share, link = min((remaining[l] / count[l], l) for l in range(len(capacity))
                          if count[l])
        for f in [f for f in active if link in flows[f]]:
            rate[f] = share
            for other in set(flows[f]):
                remaining[other] -= share
            active.discard(f)
    return rate


def max_min(capacity: np.ndarray, links: np.ndarray) -> np.ndarray:
    """Rates of the flows whose links are the rows of ``links`` (shape flows x K, int; a flow
    crossing fewer than K links is padded with a link of infinite capacity: a finite link
    named twice by one flow would be counted twice).
    ``capacity`` is float per link (``inf`` allowed). Returns float64 rates."""
    flows, width = links.shape
    rate = np.zeros(flows)
    if not flows:
        return rate
    nlinks = len(capacity)
    remaining = capacity.astype(np.float64, copy=True)
    todo = np.arange(flows)
    rows = links
    for _ in range(MAX_ROUNDS):
        flat = rows.ravel()
        count = np.bincount(flat, minlength=nlinks)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(count > 0, remaining / np.maximum(count, 1), math.inf)
        flow_share = share[rows]  # (n, K)
        least = flow_share.min(axis=1)
        # a link is a bottleneck when every flow through it gets its least share there
        above = flow_share > least[:, None] * (1 + RELATIVE_TOLERANCE)
        spoiled = np.bincount(flat, weights=above.ravel(), minlength=nlinks)
        bottleneck = (count > 0) & (spoiled == 0) & np.isfinite(share)
        freeze = bottleneck[rows].any(axis=1)
        if not freeze.any():
            break
        frozen = todo[freeze]
        rate[frozen] = least[freeze]
        used = np.bincount(rows[freeze].ravel(), weights=np.repeat(least[freeze], width),
                           minlength=nlinks)
        remaining = np.maximum(remaining - used, 0.0)
        keep = ~freeze
        todo, rows = todo[keep], rows[keep]
        if not len(todo):
            return rate
    if len(todo):  # unreachable in practice (MAX_ROUNDS); never leave a flow at rate 0
        count = np.bincount(rows.ravel(), minlength=nlinks)
        share = np.where(count > 0, remaining / np.maximum(count, 1), math.inf)
        rate[todo] = share[rows].min(axis=1)
    return rate

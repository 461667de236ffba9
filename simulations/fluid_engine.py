"""The fluid engine: bytes as a fluid, nodes as classes, for very large N and quick sweeps.

Nodes with the same links and the same arrival (and departure) times form one class; a
class's nodes all hold the same number of bytes x(t). Between two events (an arrival, a
departure, a class finishing, a class catching up with the newest data) every rate is
constant, so the run is a few steps per class, not per byte or per chunk.

The schedule is the ideal one of Kumar and Ross, generalised to arrivals:
- ``D(t)`` is the data the origin has injected into the swarm (distinct bytes); a node can
  hold no more than D unless D = F. Nodes at the frontier (x = D) can grow no faster than
  the origin injects new bytes; nodes behind it catch up from their peers.
- Upload supply = the origin's capacity plus every present node's upload (relaying is
  instant in a fluid, as in the bound); it is shared max-min among the downloading nodes,
  each capped by its download link (and, at the frontier, by the origin's rate).
- ``origin-only``: no peers; the origin's capacity is shared among the downloading nodes.
With every node starting at once and staying, this reaches T_min exactly (the test checks
it within 1 %). Not modelled: round trips, chunks (the pipelining tail), racks, upload
slots: use the chunk engine for those.
"""

from __future__ import annotations

import math
import time

from simulations.bound import bound_of
from simulations.scenario import Scenario

#: bytes below which a class counts as finished (float rounding over many steps)
BYTE_EPSILON = 1e-6


class _Class:
    __slots__ = ("count", "up", "down", "arrival", "leave_after", "abort_at", "held",
                 "finish", "members")

    def __init__(self, count, up, down, arrival, leave_after, abort_at, members):
        self.count = count
        self.up = up
        self.down = down
        self.arrival = arrival
        self.leave_after = leave_after
        self.abort_at = abort_at
        self.held = 0.0
        self.finish: float | None = None
        self.members = members


def _water_fill(supply: float, caps: list[float], counts: list[int]) -> float:
    """The level L with sum(count_i x min(cap_i, L)) = supply (inf when every cap fits)."""
    order = sorted(range(len(caps)), key=caps.__getitem__)
    remaining_count = sum(counts)
    left = supply
    for i in order:
        if remaining_count <= 0:
            break
        level = left / remaining_count
        if caps[i] <= level:
            left -= caps[i] * counts[i]
            remaining_count -= counts[i]
        else:
            return level
    return math.inf


class FluidEngine:
    def __init__(self, scenario: Scenario, seed: int | None = None):
        self.scenario = scenario
        self.seed = scenario.seed if seed is None else seed
        self.bound = bound_of(scenario)

    def _classes(self) -> list[_Class]:
        """One class per (group, arrival time); aborting nodes get a class of their own."""
        import random
        sc = self.scenario
        rng = random.Random(self.seed)
        ups, downs = sc.node_links()
        n = sc.node_count
        order = list(range(n))
        rng.shuffle(order)  # the chunk engine's arrival order, so runs compare
        arrival = [0.0] * n
        abort = [None] * n
        when = 0.0
        for position, node in enumerate(order):
            if sc.arrivals == "staggered":
                when = position * sc.arrival_interval
            elif sc.arrivals == "churn" and position:
                when += rng.expovariate(1.0 / sc.arrival_interval) if sc.arrival_interval else 0
            arrival[node] = when
            if sc.arrivals == "churn" and rng.random() < sc.abort_fraction:
                abort[node] = when + rng.uniform(0, sc.abort_within)
        leave = sc.linger if sc.arrivals == "churn" else math.inf
        classes: dict[tuple, _Class] = {}
        for node in range(n):
            key = (ups[node], downs[node], arrival[node], abort[node])
            found = classes.get(key)
            if found is None:
                classes[key] = _Class(1, ups[node], downs[node], arrival[node], leave,
                                      abort[node], [node])
            else:
                found.count += 1
                found.members.append(node)
        return sorted(classes.values(), key=lambda c: c.arrival)

    def run(self) -> dict:
        started = time.perf_counter()
        sc = self.scenario
        size = float(sc.size)
        classes = self._classes()
        origin_up = sc.origin_up
        peers = sc.uses_peers
        now = 0.0
        injected = 0.0  # D(t)
        origin_sent = 0.0
        origin_series = []
        steps = 0
        limit = sc.time_limit or 20 * self.bound.t_min + 60
        while now < limit:
            steps += 1
            present = [c for c in classes if c.arrival <= now and self._present(c, now)]
            downloading = [c for c in present if c.finish is None]
            upcoming = [c.arrival for c in classes if c.arrival > now]
            if not downloading and not upcoming:
                break
            rates = {}
            inject = 0.0
            if downloading:
                if peers:
                    supply = origin_up + sum(c.up * c.count for c in present)
                    frontier_cap = origin_up if injected < size - BYTE_EPSILON else math.inf
                    caps = [min(c.down, frontier_cap) if c.held >= injected - BYTE_EPSILON
                            else c.down for c in downloading]
                else:
                    supply = origin_up
                    caps = [c.down for c in downloading]
                level = _water_fill(supply, caps, [c.count for c in downloading])
                for c, cap in zip(downloading, caps):
                    rates[id(c)] = min(cap, level)
                if peers:
                    frontier = [rates[id(c)] for c in downloading
                                if c.held >= injected - BYTE_EPSILON]
                    inject = max(frontier, default=0.0) if injected < size else 0.0
                    # bytes moved: the origin injects first, then helps with its spare rate
                    demand = sum(rates[id(c)] * c.count for c in downloading)
                    peer_supply = sum(c.up * c.count for c in present)
                    origin_rate = min(origin_up, max(inject, demand - peer_supply))
                else:
                    origin_rate = sum(rates[id(c)] * c.count for c in downloading)
            else:
                origin_rate = 0.0
            # the next event
            step = limit - now
            if upcoming:
                step = min(step, min(upcoming) - now)
            for c in present:
                if c.finish is not None and math.isfinite(c.leave_after):
                    step = min(step, c.finish + c.leave_after - now)
                if c.abort_at is not None and c.finish is None:
                    step = min(step, c.abort_at - now)
            for c in downloading:
                rate = rates[id(c)]
                if rate > 0:
                    step = min(step, (size - c.held) / rate)
                    if peers and c.held < injected - BYTE_EPSILON and rate > inject:
                        step = min(step, (injected - c.held) / (rate - inject))
            if peers and inject > 0:
                step = min(step, (size - injected) / inject)
            step = max(step, 0.0)
            # advance
            for c in downloading:
                c.held = min(size, c.held + rates[id(c)] * step)
                if peers and c.held > injected + inject * step:  # rounding at the frontier
                    c.held = injected + inject * step
            injected = min(size, injected + inject * step)
            origin_series.append((now, now + step, origin_rate * step))
            origin_sent += origin_rate * step
            now += step
            for c in downloading:
                if c.held >= size - BYTE_EPSILON * max(1.0, size):
                    c.held = size
                    c.finish = now
        wall = time.perf_counter() - started
        return self._result(classes, origin_sent, origin_series, now, wall, steps)

    @staticmethod
    def _present(c: _Class, now: float) -> bool:
        if c.abort_at is not None and c.finish is None and now >= c.abort_at:
            return False
        if c.finish is not None and now >= c.finish + c.leave_after:
            return False
        return True

    def _result(self, classes, origin_sent, origin_series, end, wall, steps) -> dict:
        sc = self.scenario
        ups, _ = sc.node_links()
        nodes = [None] * sc.node_count
        for c in classes:
            for node in c.members:
                nodes[node] = {"node": f"node-{node:05d}", "group": None, "rack": None,
                               "arrival": c.arrival, "finish": c.finish,
                               "seconds": None if c.finish is None else c.finish - c.arrival,
                               "aborted": c.abort_at is not None,
                               "origin_bytes": None, "peer_bytes": None,
                               "uploaded_bytes": None}
        return {
            "engine": "fluid", "scenario": sc.name, "seed": self.seed,
            "bound": self.bound.as_dict(), "size_bytes": sc.size, "layers": list(sc.layers),
            "chunk_sizes": None, "chunks": None, "nodes": nodes,
            "origin_bytes": origin_sent, "peer_bytes": None, "end_seconds": end,
            "series": {"origin": origin_series, "upload_utilisation": []},
            "stats": {"wall_seconds": wall, "steps": steps, "classes": len(classes)},
        }


def run(scenario: Scenario, seed: int | None = None) -> dict:
    return FluidEngine(scenario, seed).run()

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

A class's rate depends only on its download link and whether it is at the frontier, so the
classes sharing both move in lockstep: a *bucket* keeps them in the order of what they
hold, each as an offset from the bytes the bucket moved, and a step costs O(buckets), not
O(classes). Only a bucket's head (who holds most) can reach the frontier or finish, a new
arrival (who holds nothing) joins at the tail, and classes falling off the frontier rejoin
at the head: 10,000 staggered arrivals take ~0.1 s, where visiting every class at every
step took minutes (``fluid_reference.py``, kept as the reference the tests compare with).
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque

from simulations.bound import bound_of
from simulations.scenario import Scenario

#: bytes below which a class counts as finished (float rounding over many steps)
BYTE_EPSILON = 1e-6


class _Class:
    __slots__ = ("count", "up", "down", "arrival", "leave_after", "abort_at", "held",
                 "finish", "members", "base", "bucket")

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
        #: while in a bucket: what it holds is base + the bucket's moved bytes
        self.base = 0.0
        self.bucket: _Bucket | None = None


class _Bucket:
    """The downloading classes with one download link, at the frontier or behind it: one
    rate for all. ``classes`` runs from who holds most to who holds least; a class that
    left early stays in it, ``bucket`` None, until it reaches the head."""
    __slots__ = ("down", "frontier", "moved", "classes", "count", "rate")

    def __init__(self, down: float, frontier: bool):
        self.down = down
        self.frontier = frontier
        self.moved = 0.0
        self.classes: deque[_Class] = deque()
        self.count = 0  # nodes in the live classes
        self.rate = 0.0

    def add(self, c: _Class, held: float, first: bool) -> None:
        c.base = held - self.moved
        c.bucket = self
        self.count += c.count
        if first:
            self.classes.appendleft(c)
        else:
            self.classes.append(c)

    def head(self) -> _Class | None:
        classes = self.classes
        while classes and classes[0].bucket is not self:
            classes.popleft()
        return classes[0] if classes else None

    def remove(self, c: _Class) -> float:
        """Take ``c`` out (lazily unless it is the head); returns what it holds."""
        held = c.base + self.moved
        c.bucket = None
        self.count -= c.count
        if self.classes and self.classes[0] is c:
            self.classes.popleft()
        return held


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
        epsilon = BYTE_EPSILON * max(1.0, size)
        classes = self._classes()
        origin_up = sc.origin_up
        peers = sc.uses_peers
        buckets: dict[tuple[float, bool], _Bucket] = {}

        def bucket_of(down: float, frontier: bool) -> _Bucket:
            found = buckets.get((down, frontier))
            if found is None:
                found = buckets[(down, frontier)] = _Bucket(down, frontier)
            return found

        leaving: list[tuple[float, int, int]] = []  # (when, class index, abort?) heap
        now = 0.0
        # D(t); without peers nothing is relayed, so every node is behind the whole blob
        injected = 0.0 if peers else size
        supply_of_nodes = 0.0  # Σ up over present nodes
        origin_sent = 0.0
        origin_series = []
        steps = 0
        arrived = 0
        limit = sc.time_limit or 20 * self.bound.t_min + 60

        index_of = {id(c): i for i, c in enumerate(classes)}

        def finish(c: _Class) -> None:
            c.held = size
            c.finish = now
            if math.isfinite(c.leave_after):
                heapq.heappush(leaving, (now + c.leave_after, index_of[id(c)], 0))

        while now < limit:
            steps += 1
            while arrived < len(classes) and classes[arrived].arrival <= now:
                c = classes[arrived]
                supply_of_nodes += c.up * c.count
                at_frontier = peers and injected < size and injected <= epsilon
                bucket_of(c.down, at_frontier).add(c, injected if at_frontier else 0.0, False)
                if c.abort_at is not None:
                    heapq.heappush(leaving, (c.abort_at, arrived, 1))
                arrived += 1
            while leaving and leaving[0][0] <= now:
                _, i, abort = heapq.heappop(leaving)
                c = classes[i]
                if abort:
                    if c.finish is not None:
                        continue  # it finished first: it leaves after lingering
                    c.held = c.bucket.remove(c)
                supply_of_nodes -= c.up * c.count
            live = [b for b in buckets.values() if b.count]
            if not live and arrived == len(classes):
                break
            inject = 0.0
            if live:
                supply = origin_up + supply_of_nodes if peers else origin_up
                frontier_cap = origin_up if injected < size else math.inf
                caps = [min(b.down, frontier_cap) if b.frontier else b.down for b in live]
                level = _water_fill(supply, caps, [b.count for b in live])
                demand = 0.0
                for b, cap in zip(live, caps):
                    b.rate = min(cap, level)
                    demand += b.rate * b.count
                if peers:
                    if injected < size:
                        inject = max((b.rate for b in live if b.frontier), default=0.0)
                    for b in live:  # too slow a download to stay at the frontier
                        if b.frontier and b.rate < inject:
                            self._fall_behind(b, bucket_of(b.down, False), injected)
                    origin_rate = min(origin_up, max(inject, demand - supply_of_nodes))
                else:
                    origin_rate = demand
                live = [b for b in buckets.values() if b.count]
            else:
                origin_rate = 0.0
            # the next event
            step = limit - now
            if arrived < len(classes):
                step = min(step, classes[arrived].arrival - now)
            if leaving:
                step = min(step, leaving[0][0] - now)
            for b in live:
                if not b.frontier and b.rate > inject:  # its head catches up (or finishes)
                    step = min(step, (injected - (b.head().base + b.moved)) / (b.rate - inject))
            if inject > 0:
                step = min(step, (size - injected) / inject)
            step = max(step, 0.0)
            # advance
            for b in live:
                b.moved += b.rate * step
            injected = min(size, injected + inject * step)
            origin_series.append((now, now + step, origin_rate * step))
            origin_sent += origin_rate * step
            now += step
            done = injected >= size - epsilon
            for b in live:
                if b.frontier:
                    if done:
                        while (c := b.head()) is not None:
                            b.remove(c)
                            finish(c)
                    continue
                while (c := b.head()) is not None and c.base + b.moved >= injected - epsilon:
                    b.remove(c)
                    if done:
                        finish(c)
                    else:
                        bucket_of(b.down, True).add(c, injected, False)
        for c in classes:  # what those still downloading at the limit hold
            if c.bucket is not None:
                c.held = c.base + c.bucket.moved
        wall = time.perf_counter() - started
        return self._result(classes, origin_sent, origin_series, now, wall, steps)

    @staticmethod
    def _fall_behind(frontier: _Bucket, behind: _Bucket, held: float) -> None:
        """Every class of ``frontier`` (holding ``held``, the most anyone holds) goes to the
        head of ``behind``, in the order they had."""
        moving = [c for c in frontier.classes if c.bucket is frontier]
        frontier.classes.clear()
        frontier.count = 0
        behind.rate = frontier.rate
        for c in reversed(moving):
            c.bucket = None
            behind.add(c, held, True)

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

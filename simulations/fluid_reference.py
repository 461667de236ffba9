"""The fluid engine as it first was: every step visits every class, O(classes²) per run.
Slow and plainly the schedule ``simulations.fluid_engine`` describes: the reference its
bucketed, event-driven form is checked against (tests/test_simulations.py)."""

from __future__ import annotations

import math
import time

from simulations.fluid_engine import BYTE_EPSILON, FluidEngine, _Class, _water_fill


class ReferenceFluidEngine(FluidEngine):
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


"""Fluid engine benchmark: 10,000 nodes in under a second (issue 6), for every arrival mode.

Runs ``simulations.fluid_engine`` on 10,000 nodes arriving all at once (one class),
staggered (10,000 classes) and by churn (exponential gaps, a quarter aborting, finished
nodes leaving: 10,000 classes), each ``--rounds`` times, and prints the median wall time
of each. As the baseline measured in the same run it times the reference engine
(``simulations.fluid_reference``, every class visited at every step) against the engine on
the same staggered scenario of ``--baseline-nodes`` nodes (the reference is O(classes²):
10,000 would take minutes), after checking that both give the same completion times.

Usage::

    .venv/bin/python -m benchmarks.fluid_engine [--rounds 5] [--baseline-nodes 1000] [--check]

Exit status 3 with ``--check`` when a 10,000-node median is 1 s or more, 1 when the two
engines disagree.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from simulations import fluid_engine
from simulations.fluid_reference import ReferenceFluidEngine
from simulations.scenario import load

GOAL_SECONDS = 1.0
NODES = 10_000
#: the three arrival modes at NODES nodes: study-100's links (100 Mbit/s, 256 MiB)
CASES = {
    "all at once": [],
    "staggered 10 ms": ['arrivals.mode="staggered"', 'arrivals.interval="10ms"'],
    "churn, mean gap 10 ms": ['arrivals.mode="churn"', 'arrivals.interval="10ms"',
                              "arrivals.abort_fraction=0.25", 'arrivals.abort_within="3s"',
                              'arrivals.linger="2s"'],
}
#: relative difference of completion times the two engines may show (float rounding)
AGREEMENT = 1e-9


def _timed(run) -> tuple[float, dict]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def _finishes(result: dict) -> list[float | None]:
    return [node["finish"] for node in result["nodes"]]


def _agree(ours: dict, reference: dict) -> bool:
    for a, b in zip(_finishes(ours), _finishes(reference), strict=True):
        if (a is None) != (b is None):
            return False
        if a is not None and abs(a - b) > AGREEMENT * max(abs(b), 1.0):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline-nodes", type=int, default=1000)
    parser.add_argument("--check", action="store_true",
                        help="exit 3 when a 10,000-node median misses the goal")
    args = parser.parse_args(argv)

    missed = False
    print(f"fluid engine, {NODES:,} nodes (study-100: 100 Mbit/s, 256 MiB), "
          f"median of {args.rounds} runs")
    for name, overrides in CASES.items():
        scenario = load("study-100", [f"nodes.count={NODES}", *overrides])
        walls, result = [], None
        for _ in range(args.rounds):
            wall, result = _timed(lambda: fluid_engine.run(scenario))
            walls.append(wall)
        median = statistics.median(walls)
        done = sum(finish is not None for finish in _finishes(result))
        verdict = "PASS" if median < GOAL_SECONDS else "FAIL"
        missed |= median >= GOAL_SECONDS
        print(f"  {name:<22} {median:7.3f} s  {result['stats']['classes']:>6,} classes  "
              f"{result['stats']['steps']:>7,} steps  {done:,} finished  "
              f"goal < {GOAL_SECONDS:.0f} s: {verdict}")

    scenario = load("study-100", [f"nodes.count={args.baseline_nodes}", *CASES["staggered 10 ms"]])
    engine_wall, ours = _timed(lambda: fluid_engine.run(scenario))
    reference_wall, reference = _timed(lambda: ReferenceFluidEngine(scenario).run())
    if not _agree(ours, reference):
        print("the engine and the reference disagree on completion times", file=sys.stderr)
        return 1
    print(f"baseline, {args.baseline_nodes:,} staggered nodes: reference {reference_wall:.3f} s, "
          f"engine {engine_wall:.3f} s: {reference_wall / engine_wall:,.0f} x faster, "
          f"the same completion times within {AGREEMENT:g}")
    return 3 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())

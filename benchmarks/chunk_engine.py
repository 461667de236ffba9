"""Chunk engine benchmark: chunk transfers per minute of wall time on one core (issue 6).

Runs ``simulations.chunk_engine`` on a scenario (``speed`` by default: 1,000 nodes x 1,000
chunks, the goal's example) ``--rounds`` times in this process and prints, per round, the
chunk transfers, the Have deliveries per transfer (each a ``PeerHave`` handed to one
receiver's swarm), wall and CPU seconds around the whole run (set-up included), and
transfers per wall-minute and per CPU-minute; then the medians and the goal line
(1,000,000 transfers per wall-minute).

As the baseline measured in the same run it times the *Have floor*: the least a receiver
can do with a Have while it keeps a bitmap per peer in Python objects (find the sender's
record in a dict, set its heard time, OR the chunk's bit into its bitmap, count the
chunk's holders), nothing decided, over as many receivers as the scenario's nodes, each
knowing the run's number of senders, in random order as a swarm's Haves come. Times the
run's Have deliveries per transfer, it is the part of each transfer's budget (60 us at the
goal) that a pure-Python core with this fan-out spends before it decides anything.

Usage::

    .venv/bin/python -m benchmarks.chunk_engine                      # speed, whole run
    .venv/bin/python -m benchmarks.chunk_engine --set sim.time_limit=4 --rounds 3
    .venv/bin/python -m benchmarks.chunk_engine --scenario kraken --set nodes.count=80

A run cut short by ``sim.time_limit`` (a part of a long scenario) says so on its line.
Exit status 3 with ``--check`` when the median misses the goal.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

from benchmarks.peer_throughput import print_load
from simulations import chunk_engine, report
from simulations.scenario import load

GOAL_PER_MINUTE = 1_000_000
#: Have deliveries the floor times (a few seconds)
FLOOR_DELIVERIES = 2_000_000


class _Record:
    __slots__ = ("bits", "heard")

    def __init__(self):
        self.bits = 0
        self.heard = 0.0


class _Receiver:
    __slots__ = ("records", "holders")

    def __init__(self, chunks: int):
        self.records: dict[str, _Record] = {}
        self.holders = [0] * chunks


def have_floor(nodes: int, fanout: int, chunks: int, seed: int = 1) -> float:
    """Seconds per Have delivery of the least a Python receiver does with one (above)."""
    rng = random.Random(seed)
    names = [chunk_engine.node_name(i) for i in range(nodes)]
    receivers = [_Receiver(chunks) for _ in range(nodes)]
    audience: list[list[_Receiver]] = [[] for _ in range(nodes)]
    fanout = min(fanout, nodes - 1)
    for sender in range(nodes):
        # ``fanout`` of the others: a sample of the nodes but one, those from the sender
        # on shifted up by one
        for receiver in (r + (r >= sender) for r in rng.sample(range(nodes - 1), fanout)):
            receivers[receiver].records[names[sender]] = _Record()
            audience[sender].append(receivers[receiver])
    haves = [(names[s], audience[s], rng.randrange(chunks))
             for s in (rng.randrange(nodes) for _ in range(FLOOR_DELIVERIES // fanout + 1))]
    delivered = 0
    started = time.perf_counter()
    for name, receivers_of, index in haves:
        bit = 1 << index
        for receiver in receivers_of:
            record = receiver.records.get(name)
            record.heard = 1.0
            bits = record.bits
            if not bits & bit:
                record.bits = bits | bit
                receiver.holders[index] += 1
        delivered += len(receivers_of)
    return (time.perf_counter() - started) / delivered


def _round(scenario_name: str, overrides: list[str]) -> dict:
    scenario = load(scenario_name, overrides)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = chunk_engine.run(scenario)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    stats = result["stats"]
    summary = report.summary(result)
    transfers = stats["transfers"]
    return {
        "nodes": len(result["nodes"]), "chunks": result["chunks"],
        "finished": summary["completed"] >= summary["expected"],
        "transfers": transfers, "have_deliveries": stats["have_deliveries"],
        "events": stats["events"], "wall_seconds": wall, "cpu_seconds": cpu,
        "per_wall_minute": transfers / wall * 60, "per_cpu_minute": transfers / cpu * 60,
        "max_over_t_min": summary.get("max_over_t_min"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="speed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a scenario key, as in python -m simulations run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--check", action="store_true",
                        help="exit 3 when the median misses the goal")
    args = parser.parse_args(argv)

    print(f"chunk engine, scenario {args.scenario} {' '.join(args.set)}".rstrip()
          + f", {args.rounds} round(s)")
    load_before = print_load("before the benchmark")
    rounds = []
    for number in range(1, args.rounds + 1):
        r = _round(args.scenario, args.set)
        rounds.append(r)
        print(f"  round {number}: {r['nodes']:,} nodes x {r['chunks']:,} chunks, "
              f"{r['transfers']:,} transfers, "
              f"{r['have_deliveries'] / max(r['transfers'], 1):.1f} Have deliveries each, "
              f"{r['events']:,} events; wall {r['wall_seconds']:.1f} s, "
              f"CPU {r['cpu_seconds']:.1f} s: {r['per_wall_minute']:,.0f} per wall-minute, "
              f"{r['per_cpu_minute']:,.0f} per CPU-minute"
              + ("" if r["finished"] else ", cut at sim.time_limit"))
    per_wall = statistics.median(r["per_wall_minute"] for r in rounds)
    per_cpu = statistics.median(r["per_cpu_minute"] for r in rounds)
    fanout = statistics.median(r["have_deliveries"] / max(r["transfers"], 1) for r in rounds)
    floor = have_floor(rounds[0]["nodes"], max(round(fanout), 1), rounds[0]["chunks"])
    budget_us = 60e6 / GOAL_PER_MINUTE
    floor_us = floor * fanout * 1e6
    print(f"median: {per_wall:,.0f} transfers per wall-minute, {per_cpu:,.0f} per CPU-minute; "
          f"{60e6 / per_wall:.0f} us of wall time per transfer (goal {budget_us:.0f} us)")
    print(f"baseline, the Have floor: {floor * 1e6:.2f} us a delivery x {fanout:.1f} per "
          f"transfer = {floor_us:.1f} us per transfer ({floor_us / budget_us:.0%} of the "
          f"goal's budget) before anything is decided; this run spends "
          f"{60e6 / per_wall / floor_us:.1f}x that per transfer in all")
    met = per_wall >= GOAL_PER_MINUTE
    print(f"goal: >= {GOAL_PER_MINUTE:,} chunk transfers per wall-minute: "
          f"{'PASS' if met else 'FAIL'} ({per_wall / GOAL_PER_MINUTE:.2f}x)")
    print(f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    load_after = print_load("at the end")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"scenario": args.scenario, "set": args.set, "rounds": rounds,
             "median_per_wall_minute": per_wall, "median_per_cpu_minute": per_cpu,
             "have_floor_seconds": floor, "have_deliveries_per_transfer": fanout,
             "goal_per_wall_minute": GOAL_PER_MINUTE,
             "load_average": {"before": load_before, "after": load_after}}, indent=1))
    return 3 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(main())

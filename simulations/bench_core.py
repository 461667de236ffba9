"""Micro-benchmark of the swarm core: events per second through ``BlobSwarm.handle``.

An in-memory swarm on a trivial network: every message is delivered at once, in FIFO order,
no link has a capacity, time stands still (so nothing expires and nobody's origin wait runs
out). What is left is the cost of the scheduling code itself, plus this loop.

    python simulations/bench_core.py                      # 100 nodes x 1000 chunks, full mesh
    python simulations/bench_core.py --nodes 300 --peers 30 --chunks 1000
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pull.core.bitmap import Bitmap  # noqa: E402
from p2pull.core.chunks import ChunkPlan  # noqa: E402
from p2pull.core.swarm import (  # noqa: E402
    AnnounceHave, BlobSwarm, Completed, FetchFromOrigin, PeerHave, PeerJoined, PieceFailed,
    PieceVerified, SendRequest, SwarmConfig, Tick,
)

BLOB = "sha256:" + "ab" * 32


def neighbours(nodes: list[str], peers: int | None, rng: random.Random) -> dict[str, list[str]]:
    """Full mesh, or a random symmetric graph where each node links to about ``peers``."""
    if peers is None or peers >= len(nodes) - 1:
        return {node: [other for other in nodes if other != node] for node in nodes}
    links: dict[str, set[str]] = {node: set() for node in nodes}
    for node in nodes:
        while len(links[node]) < peers:
            other = rng.choice(nodes)
            if other != node:
                links[node].add(other)
                links[other].add(node)
    return {node: sorted(linked) for node, linked in links.items()}


def run(nodes_count: int, chunks: int, peers: int | None, seed: int) -> dict:
    rng = random.Random(seed)
    plan = ChunkPlan(chunks * 1024 * 1024, 1024 * 1024)
    names = [f"node-{n:05d}" for n in range(nodes_count)]
    graph = neighbours(names, peers, rng)
    config = SwarmConfig()
    swarms = {name: BlobSwarm(BLOB, plan, name, Bitmap(plan.count), config,
                              random.Random(seed * 7919 + n))
              for n, name in enumerate(names)}
    queue: deque = deque()
    for name in names:
        for other in graph[name]:
            queue.append((name, PeerJoined(other, Bitmap(plan.count))))
        queue.append((name, Tick()))
    counts = {"events": 0, "origin": 0, "requests": 0, "completed": 0}
    in_handle = 0.0
    clock = time.perf_counter
    start = clock()
    while queue:
        name, event = queue.popleft()
        swarm = swarms[name]
        t0 = clock()
        actions = swarm.handle(event, 0.0)
        in_handle += clock() - t0
        counts["events"] += 1
        for action in actions:
            kind = type(action)
            if kind is AnnounceHave:
                have = PeerHave(name, action.index)
                for other in graph[name]:
                    queue.append((other, have))
            elif kind is SendRequest:
                counts["requests"] += 1
                if swarms[action.peer].holds(action.index):
                    queue.append((name, PieceVerified(action.peer, action.index,
                                                      plan.length(action.index))))
                else:
                    queue.append((name, PieceFailed(action.peer, action.index, "rejected")))
            elif kind is FetchFromOrigin:
                counts["origin"] += 1
                queue.append((name, PieceVerified(None, action.index,
                                                  plan.length(action.index))))
            elif kind is Completed:
                counts["completed"] += 1
    wall = clock() - start
    return {**counts, "wall": wall, "in_handle": in_handle}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=1000)
    parser.add_argument("--peers", type=int, default=None,
                        help="neighbours per node (default: everyone)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    result = run(args.nodes, args.chunks, args.peers, args.seed)
    events = result["events"]
    print(f"{args.nodes} nodes x {args.chunks} chunks, "
          f"{'full mesh' if args.peers is None else f'{args.peers} peers each'}")
    print(f"  completed {result['completed']}/{args.nodes}, origin fetches "
          f"{result['origin']} (chunks {args.chunks}), peer requests {result['requests']}")
    print(f"  {events:,} events in {result['wall']:.2f} s: "
          f"{events / result['wall']:,.0f} events/s overall, "
          f"{events / result['in_handle']:,.0f} events/s inside handle()")
    print(f"  chunk transfers: {(result['requests'] + result['origin']) / result['wall']:,.0f}"
          f" per second of wall time")


if __name__ == "__main__":
    main()

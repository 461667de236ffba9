"""Rendezvous hashing: who fetches a chunk nobody holds from the origin."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from p2pull.core.responsibility import (chunk_key, fetcher_weight, fetchers, ranking,
                                        responsible_node, weight)

BLOB = "sha256:" + "12" * 32
NODES = [f"node-{n}" for n in range(8)]


def test_deterministic_and_order_independent():
    first = [responsible_node(BLOB, index, NODES) for index in range(200)]
    again = [responsible_node(BLOB, index, list(reversed(NODES))) for index in range(200)]
    assert first == again
    assert all(node in NODES for node in first)


def test_same_answer_in_another_process():
    """No per-process salt (Python's hash() would differ between these two runs)."""
    code = ("from p2pull.core.responsibility import responsible_node as r; "
            f"print([r({BLOB!r}, i, {NODES!r}) for i in range(50)])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env={"PYTHONHASHSEED": "123", "PYTHONPATH": "."}).stdout
    assert out.strip() == str([responsible_node(BLOB, i, NODES) for i in range(50)])


def test_pinned_values():
    """The function is part of the protocol: every node must compute the same one, so a
    change here is a protocol change."""
    assert chunk_key("sha256:00", 0) == 7544558269617393260
    assert weight(chunk_key("sha256:00", 0), "a") == 953928220570829019
    assert chunk_key("sha256:00", 0) != chunk_key("sha256:00", 1)
    assert chunk_key("sha256:00", 0) != chunk_key("sha256:01", 0)
    assert [responsible_node("sha256:00", i, ["a", "b", "c"]) for i in range(12)] == \
        PINNED


PINNED = ["b", "a", "c", "b", "c", "a", "b", "a", "c", "c", "a", "a"]


@pytest.mark.parametrize("count", [2, 5, 16])
def test_balanced(count):
    nodes = [f"10.0.0.{n}:7400" for n in range(count)]
    chunks = 20000
    wins = Counter(responsible_node(BLOB, index, nodes) for index in range(chunks))
    assert set(wins) == set(nodes)
    for node in nodes:
        assert abs(wins[node] / chunks - 1 / count) < 0.15 / count, wins


def test_minimal_disruption_when_a_node_leaves():
    before = {index: responsible_node(BLOB, index, NODES) for index in range(3000)}
    gone = NODES[3]
    rest = [node for node in NODES if node != gone]
    after = {index: responsible_node(BLOB, index, rest) for index in range(3000)}
    moved = {index for index in before if before[index] != after[index]}
    assert moved == {index for index, node in before.items() if node == gone}
    # they spread over the others, each going to the node that ranked second
    assert len({after[index] for index in moved}) == len(rest)
    for index in list(moved)[:50]:
        assert after[index] == ranking(BLOB, index, NODES)[1]


def test_minimal_disruption_when_a_node_joins():
    before = {index: responsible_node(BLOB, index, NODES) for index in range(3000)}
    after = {index: responsible_node(BLOB, index, NODES + ["newcomer"])
             for index in range(3000)}
    assert {after[i] for i in before if before[i] != after[i]} == {"newcomer"}


def test_ranking_agrees_with_responsible_node():
    for index in range(100):
        order = ranking(BLOB, index, NODES)
        assert order[0] == responsible_node(BLOB, index, NODES)
        assert sorted(order) == sorted(NODES)
        key = chunk_key(BLOB, index)
        assert [weight(key, node) for node in order] == \
            sorted((weight(key, node) for node in NODES), reverse=True)


MANY = [f"node-{n:04d}" for n in range(300)]


def test_the_fetchers_are_the_highest_blob_weights_and_fetch_every_chunk():
    chosen = fetchers(BLOB, MANY, 16)
    assert len(chosen) == 16
    lowest = min(fetcher_weight(BLOB, node) for node in chosen)
    assert all(fetcher_weight(BLOB, node) < lowest for node in set(MANY) - chosen)
    wins = Counter(responsible_node(BLOB, index, MANY, 16) for index in range(4000))
    assert set(wins) == chosen  # every fetcher has a share, nobody else any
    # another blob, other fetchers: the origin work of many blobs spreads over the nodes
    assert fetchers("sha256:" + "34" * 32, MANY, 16) != chosen
    assert fetchers(BLOB, MANY[:10], 16) == set(MANY[:10])
    assert fetchers(BLOB, MANY, 0) == set(MANY)


def test_fetchers_rank_first_and_the_next_node_replaces_one_that_leaves():
    chosen = fetchers(BLOB, MANY, 4)
    for index in range(50):
        order = ranking(BLOB, index, MANY, 4)
        assert set(order[:4]) == chosen
        assert order[0] == responsible_node(BLOB, index, MANY, 4)
    gone = max(chosen, key=lambda node: fetcher_weight(BLOB, node))
    rest = [node for node in MANY if node != gone]
    after = fetchers(BLOB, rest, 4)
    newcomer, = after - chosen
    assert chosen - after == {gone}
    assert newcomer == max(set(rest) - chosen, key=lambda node: fetcher_weight(BLOB, node))


def test_pinned_fetcher_weight():
    """Part of the protocol, as the chunk weights are."""
    assert fetcher_weight("sha256:00", "a") == PINNED_FETCHER_WEIGHT
    assert fetcher_weight("sha256:00", "a") != fetcher_weight("sha256:01", "a")


def test_single_node_and_empty():
    assert responsible_node(BLOB, 0, ["only"]) == "only"
    with pytest.raises(ValueError):
        responsible_node(BLOB, 0, [])


PINNED_FETCHER_WEIGHT = 18127453128066303698

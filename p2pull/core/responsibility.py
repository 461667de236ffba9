"""Which node fetches a chunk that no peer holds: rendezvous (highest random weight) hashing.

Every node interested in a blob computes, for each chunk, a weight per interested live node
and takes the node with the highest weight. All nodes with the same view agree without
talking, the load is spread evenly (each of N nodes wins about 1/N of the chunks), and when
a node leaves only the chunks it won move, each to the node that ranked second for it.

The weights are xxh3-64, a fixed and portable function (never Python's ``hash()``, which is
salted per process): ``chunk_key = xxh3_64(blob, seed=index)`` and
``weight = xxh3_64(node, seed=chunk_key)``, so every chunk gets its own hash function of the
node name. Ties (two 64-bit weights equal) go to the greater node name.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from xxhash import xxh3_64_intdigest


@lru_cache(maxsize=4096)
def _blob_bytes(blob: str) -> bytes:
    return blob.encode()


@lru_cache(maxsize=65536)
def node_bytes(node: str) -> bytes:
    """The bytes a node's weights are computed from (cached: the swarm asks often)."""
    return node.encode()


def chunk_key(blob: str, index: int) -> int:
    """The seed of chunk ``index``'s weight function."""
    return xxh3_64_intdigest(_blob_bytes(blob), index)


def weight(key: int, node: str) -> int:
    """The weight of ``node`` for the chunk whose ``chunk_key`` is ``key``."""
    return xxh3_64_intdigest(node_bytes(node), key)


def outranks(key: int, node: str, other: str) -> bool:
    """True if ``node`` ranks above ``other`` for the chunk of ``key``."""
    a, b = weight(key, node), weight(key, other)
    return a > b or (a == b and node > other)


def responsible_node(blob: str, index: int, nodes: Iterable[str]) -> str:
    """The node that fetches chunk ``index`` of ``blob`` from the origin, among ``nodes``
    (the interested live nodes, including the caller). Raises ValueError if ``nodes`` is
    empty."""
    key = chunk_key(blob, index)
    best: str | None = None
    best_weight = -1
    for node in nodes:
        w = weight(key, node)
        if w > best_weight or (w == best_weight and best is not None and node > best):
            best, best_weight = node, w
    if best is None:
        raise ValueError("no nodes to choose from")
    return best


def ranking(blob: str, index: int, nodes: Iterable[str]) -> list[str]:
    """``nodes`` from the one responsible for chunk ``index`` down: who takes over when the
    first is gone."""
    key = chunk_key(blob, index)
    return sorted(set(nodes), key=lambda node: (weight(key, node), node), reverse=True)

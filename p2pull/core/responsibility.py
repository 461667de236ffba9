"""Which node fetches a chunk that no peer holds: rendezvous (highest random weight) hashing.

Every node interested in a blob computes, for each chunk, a weight per interested live node
and takes the node with the highest weight. All nodes with the same view agree without
talking, the load is spread evenly (each of N nodes wins about 1/N of the chunks), and when
a node leaves only the chunks it won move, each to the node that ranked second for it.

The weights are xxh3-64, a fixed and portable function (never Python's ``hash()``, which is
salted per process): ``chunk_key = xxh3_64(blob, seed=index)`` and
``weight = xxh3_64(node, seed=chunk_key)``, so every chunk gets its own hash function of the
node name. Ties (two 64-bit weights equal) go to the greater node name.

Origin fetchers: in a large swarm only the ``count`` nodes with the highest blob weight
(``fetcher_weight``, the same scheme with one hash function per blob) fetch from the origin;
a node outside them never outranks one inside. Spread over every node, the origin would
stream a chunk to each of N nodes at once, and at N = 1,000 every chunk would arrive
at the very end of the origin's work, with the peers idle until then; a few fetchers
stream their shares chunk after chunk, and the peers pass each on while the origin sends
the next. When a fetcher leaves, the node ranking next for the blob takes its place.
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


@lru_cache(maxsize=4096)
def fetcher_key(blob: str) -> int:
    """The seed of ``blob``'s fetcher weight function (no chunk's key: a different input)."""
    return xxh3_64_intdigest(b"fetchers\0" + blob.encode())


def fetcher_weight(blob: str, node: str) -> int:
    """The weight of ``node`` for being one of ``blob``'s origin fetchers."""
    return xxh3_64_intdigest(node_bytes(node), fetcher_key(blob))


def fetchers(blob: str, nodes: Iterable[str], count: int) -> set[str]:
    """The origin fetchers of ``blob`` among ``nodes``: the ``count`` with the highest
    fetcher weight, or all of them when ``count`` is 0 or they are no more."""
    unique = set(nodes)
    if not count or len(unique) <= count:
        return unique
    ranked = sorted(unique, key=lambda node: (fetcher_weight(blob, node), node), reverse=True)
    return set(ranked[:count])


def chunk_key(blob: str, index: int) -> int:
    """The seed of chunk ``index``'s weight function."""
    return xxh3_64_intdigest(_blob_bytes(blob), index)


def weight(key: int, node: str) -> int:
    """The weight of ``node`` for the chunk whose ``chunk_key`` is ``key``."""
    return xxh3_64_intdigest(node_bytes(node), key)


def responsible_node(blob: str, index: int, nodes: Iterable[str],
                     fetcher_count: int = 0) -> str:
    """The node that fetches chunk ``index`` of ``blob`` from the origin, among ``nodes``
    (the interested live nodes, including the caller) of which ``fetcher_count`` fetch
    (0: all). Raises ValueError if ``nodes`` is empty."""
    ranked = ranking(blob, index, nodes, fetcher_count)
    if not ranked:
        raise ValueError("no nodes to choose from")
    return ranked[0]


def ranking(blob: str, index: int, nodes: Iterable[str], fetcher_count: int = 0) -> list[str]:
    """``nodes`` from the one responsible for chunk ``index`` down: who takes over when the
    first is gone. The origin fetchers come first (``fetchers``)."""
    unique = set(nodes)
    chosen = fetchers(blob, unique, fetcher_count)
    key = chunk_key(blob, index)
    return sorted(unique, key=lambda node: (node in chosen, weight(key, node), node),
                  reverse=True)

"""How a blob is cut into chunks. Every node must cut a blob the same way, so the chunk size
is a pure function of the blob size, fixed by the protocol version, unless a cluster-wide
``chunk_size`` overrides it."""

from __future__ import annotations

from dataclasses import dataclass

#: 2: the chunk rule below went from ~512 to ~2048 chunks per blob; a peer of version 1
#: would cut the same blob otherwise, so the hello refuses it. 3: the Line message (a
#: version 2 peer would take it for an unknown message and drop the connection). 4: a
#: Request says how many peers the requester receives from (a version 3 peer would send
#: none and be refused)
PROTOCOL_VERSION = 4
#: enough chunks per blob for a swarm to pipeline: the tail costs about (N-1)/k of the ideal
#: time when k chunks finish together (DESIGN.md), and a chunk must arrive whole before it
#: is passed on, so each hop of a chunk costs its size over the link's share. Measured on
#: the lab's model (8 nodes at 100 Mbit/s; its 410 MiB layer), slowest node: 1 MiB chunks
#: (512 per blob) 52.2 s, 512 KiB 49.2 s, 256 KiB 47.2-49.3 s, median of twelve 47.95 s
#: (T_min 42.95 s), with up to 30 % more daemon CPU than 1 MiB. The simulator, which has
#: no TCP queues, ranks them 46.4 / 48.0 / 46.2 s. The cost is on fast links: one peer
#: over loopback moves a 1 GiB blob in 512 KiB chunks at ~550 MB/s, in 2 MiB at ~750 MB/s
#: (benchmarks/README.md, peer_throughput).
TARGET_CHUNKS_PER_BLOB = 2048
#: below this a ranged request costs more in round trips than it moves
MIN_CHUNK_SIZE = 256 * 1024
#: above this one lost chunk costs too much to fetch again, and memory per request grows
MAX_CHUNK_SIZE = 16 * 1024 * 1024


def chunk_size_for(blob_size: int) -> int:
    """Protocol v1: the power of two nearest above blob_size / TARGET_CHUNKS_PER_BLOB, kept
    within [MIN_CHUNK_SIZE, MAX_CHUNK_SIZE]."""
    if blob_size < 0:
        raise ValueError(f"negative blob size {blob_size}")
    wanted = max(1, -(-blob_size // TARGET_CHUNKS_PER_BLOB))
    size = 1 << (wanted - 1).bit_length()
    return min(MAX_CHUNK_SIZE, max(MIN_CHUNK_SIZE, size))


@dataclass(frozen=True)
class ChunkPlan:
    """The chunks of one blob: fixed ``chunk_size`` slices, the last one shorter."""

    blob_size: int
    chunk_size: int

    @classmethod
    def for_blob(cls, blob_size: int, chunk_size: int | None = None) -> "ChunkPlan":
        return cls(blob_size, chunk_size or chunk_size_for(blob_size))

    def __post_init__(self):
        if self.blob_size < 0 or self.chunk_size <= 0:
            raise ValueError(f"bad chunk plan {self.blob_size}/{self.chunk_size}")

    @property
    def count(self) -> int:
        """An empty blob has one empty chunk, so that every blob has a chunk to hold."""
        return max(1, -(-self.blob_size // self.chunk_size))

    def offset(self, index: int) -> int:
        self._check(index)
        return index * self.chunk_size

    def length(self, index: int) -> int:
        self._check(index)
        return min(self.chunk_size, self.blob_size - index * self.chunk_size)

    def bytes_between(self, first: int, end: int) -> int:
        """Bytes in chunks ``first .. end-1``."""
        if first >= end:
            return 0
        return self.offset(end - 1) + self.length(end - 1) - self.offset(first)

    def span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``."""
        return self.offset(index), self.length(index)

    def _check(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise IndexError(f"chunk {index} outside 0..{self.count - 1}")

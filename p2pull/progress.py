"""The counters of a get, shared by the fetch that updates them, the CLI that draws them and
the daemon that streams them: kept apart from the fetch machinery so that a CLI talking to a
daemon does not import it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BlobProgress:
    digest: str
    size: int
    title: str
    #: queued, waiting (another process has it), fetching, verifying, done
    state: str = "queued"
    held: int = 0
    from_origin: int = 0
    from_peers: int = 0
    reused: int = 0
    #: pieces from peers whose bytes did not match their xxh3
    rejected: int = 0


@dataclass
class Progress:
    """Counters of one get, updated by the fetch and read by whoever renders them."""

    blobs: dict[str, BlobProgress] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(b.size for b in self.blobs.values())

    @property
    def held(self) -> int:
        return sum(b.held for b in self.blobs.values())

    @property
    def from_origin(self) -> int:
        return sum(b.from_origin for b in self.blobs.values())

    @property
    def from_peers(self) -> int:
        return sum(b.from_peers for b in self.blobs.values())

    @property
    def reused(self) -> int:
        return sum(b.reused for b in self.blobs.values())

"""A blob session's origin queue against its swarm: a chunk a peer got while it waited
there is not fetched from the origin (the daemon queues all of its origin chunks at once,
and origin help on another node may fetch the top of them meanwhile)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import trio
import trio.testing

from p2pull.core.bitmap import Bitmap
from p2pull.core.chunks import ChunkPlan
from p2pull.core.refs import parse_ref
from p2pull.core.swarm import BlobSwarm, FetchFromOrigin, PeerHave, PeerJoined, SwarmConfig, Tick
from p2pull.net.fetch import MAX_ORIGIN_CHUNKS, BlobSession, _OriginPool
from p2pull.origin.manifest import Descriptor
from p2pull.progress import BlobProgress

DIGEST = "sha256:" + "ab" * 32
CHUNK = 1024 * 1024
CHUNKS = 24


class Messenger:
    def __init__(self):
        self.requests: list[tuple[str, str, int]] = []

    def send_request(self, peer, blob, index):
        self.requests.append((peer, blob, index))

    def send_cancel(self, peer, blob, index):
        pass

    def announce_have(self, blob, index):
        pass


async def test_a_queued_origin_chunk_a_peer_holds_now_goes_to_the_peer():
    messenger = Messenger()
    session = BlobSession(None, parse_ref("127.0.0.1:5000/model:v1"),
                          Descriptor("application/octet-stream", DIGEST, CHUNKS * CHUNK),
                          BlobProgress(DIGEST, CHUNKS * CHUNK, "weights"), CHUNK, node_id="me",
                          messenger=messenger)
    session.partial = SimpleNamespace(bitmap=Bitmap(CHUNKS))  # nothing held yet
    session.swarm = BlobSwarm(DIGEST, session.plan, "me", Bitmap(CHUNKS),
                              SwarmConfig(max_origin_in_flight=MAX_ORIGIN_CHUNKS),
                              random.Random(0))
    now = trio.current_time()
    session.swarm.handle(PeerJoined("helper", Bitmap(CHUNKS)), now)
    ours = sorted(a.index for a in session.swarm.handle(Tick(), now)
                  if isinstance(a, FetchFromOrigin))
    assert len(ours) >= 2
    top = ours[-1]
    session.swarm.handle(PeerHave("helper", top), now)  # helped while it waited here
    assert not session._origin_wanted(top)
    assert messenger.requests == [("helper", DIGEST, top)]
    assert top not in session.swarm.fetching_from_origin
    assert session._origin_wanted(ours[0])  # nobody else has that one
    assert ours[0] in session.swarm.fetching_from_origin


class _HeldSession:
    """Stands in for a blob session in the origin pool: each fetch waits until released,
    so the test sees how many run at once."""

    def __init__(self, chunks: int):
        self.plan = ChunkPlan(chunks * CHUNK, CHUNK)
        self.running = 0
        self.release = trio.Event()

    async def fetch_from_origin(self, first, count, pool):
        self.running += 1
        try:
            await self.release.wait()
        finally:
            self.running -= 1


async def test_a_larger_share_of_the_origin_work_opens_connections_at_once():
    """A node whose part of the swarm's origin work grows (it fell behind, or the others
    are done) gets more connections as soon as the share is known, not after a rate
    window: in the lab, a node left on two connections finished its share 3 s late."""
    session = _HeldSession(64)
    async with trio.open_nursery() as nursery:
        pool = _OriginPool(None, None, nursery, cap=16)
        pool.share_work(session, 8, 64)  # one eighth of the work: two connections
        pool.submit(session, list(range(0, 64, 2)))  # runs of one chunk each
        await trio.testing.wait_all_tasks_blocked()
        assert session.running == pool.concurrency.limit == 2
        pool.share_work(session, 32, 32)  # the others are done: all that is left is ours
        await trio.testing.wait_all_tasks_blocked()
        assert session.running == pool.concurrency.limit == 16
        session.release.set()

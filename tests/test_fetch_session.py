"""A blob session's origin queue against its swarm: a chunk a peer got while it waited
there is not fetched from the origin (the daemon queues all of its origin chunks at once,
and origin help on another node may fetch the top of them meanwhile)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import trio

from p2pull.core.bitmap import Bitmap
from p2pull.core.refs import parse_ref
from p2pull.core.swarm import BlobSwarm, FetchFromOrigin, PeerHave, PeerJoined, SwarmConfig, Tick
from p2pull.net.fetch import MAX_ORIGIN_CHUNKS, BlobSession
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

"""Fetch the blobs of a manifest into the store: one session per blob, one shared pool of
ranged origin requests.

Ownership: ``fetch_blobs`` owns a nursery with one task per blob session and the origin
workers. A session owns its PartialBlob (and so the blob's lock) and one hashing task that
feeds held chunks to the sha256 while downloads continue. Chunks come from the origin here;
the swarm adds peers as a second source of the same chunks (the seam is ``ChunkSource``).
"""

from __future__ import annotations

import collections
import logging
import random
from typing import Callable, Protocol

import trio
import xxhash

from p2pull.core.chunks import ChunkPlan
from p2pull.core.policy import AdaptiveConcurrency, origin_connection_share
from p2pull.core.ratelimit import TokenBucket
from p2pull.core.refs import Ref
from p2pull.core.swarm import (AnnounceHave, BanPeer, BlobCorrupt, BlobSwarm, Completed,
                               FetchFromOrigin, OriginDropped, PieceFailed, PieceVerified,
                               SendCancel, SendRequest, SwarmConfig, Tick, Urgent)
from p2pull.errors import IntegrityError, OriginError, first_error
from p2pull.origin.client import OriginClient
from p2pull.origin.manifest import Descriptor
from p2pull.progress import BlobProgress, Progress
from p2pull.store.cas import PartialBlob, Store, chunk_checksum

log = logging.getLogger("p2pull.fetch")

#: bytes gathered from the network before one pwrite in a worker thread: large enough that
#: the thread hand-off is cheap against the write, small enough to bound memory per request
WRITE_BATCH = 1024 * 1024
#: how often a session waiting for another process's lock on the same blob looks again
LOCK_POLL_SECONDS = 0.1
#: refetches of a blob whose bytes did not match its digest, before giving up: one for
#: chunks torn by a crash, one for a whole blob an origin served wrong once
INTEGRITY_RETRIES = 2
#: concurrency the origin pool starts at, before it measures
INITIAL_ORIGIN_CONCURRENCY = 4
#: chunks a swarm may have queued for the origin at once: all of them, in practice; the
#: origin pool's adaptive concurrency is what limits the requests in flight
MAX_ORIGIN_CHUNKS = 1 << 20
#: peer pieces verified by xxh3 and waiting for (or in) their disk write, per node: a link's
#: reader goes on receiving while earlier pieces are written, and stops when this many are
#: pending (memory: this many chunks)
PEER_WRITES_IN_FLIGHT = 2
#: chunks at most this large are written (and, by the node, read to serve) in the event
#: loop itself: a pwrite of 256 KiB into the page cache costs less than handing it to a
#: worker thread and back (a GIL hand-off each way), which on a busy machine dominated
#: the CPU of a daemon moving small chunks
INLINE_IO_MAX = 512 * 1024
#: chunks just past the sha256's prefix that are marked urgent: the hash is a streaming
#: reader too, and a blob whose chunks arrive in random order would be hashed only after
#: its last chunk, one core busy for size / 1.25 GB/s at the end. Few, so that peers still
#: fetch the rarest chunks first: with every node wanting the same chunks first, the nodes
#: hold the same chunks and have little to give each other.
HASH_URGENT_CHUNKS = 4
#: ... but with one peer or none (a seed serving a blob, an origin) rarity spreads nothing,
#: and this many pipelines of a peer are urgent: when a piece lands, its pipeline's other
#: requests are urgent chunks already, so the next pick is the next urgent one, not a
#: random chunk; the blob arrives in order and is hashed from the receive buffers
HASH_URGENT_PIPELINES = 2
#: the largest range asked in one request: a broken connection costs at most a resume, but
#: a long request keeps a slow connection busy at the tail of a blob
MAX_REQUEST_BYTES = 32 * 1024 * 1024


class _OriginPool:
    """Ranged requests to the origin for chunks of any blob of one get, kept at the
    concurrency that AdaptiveConcurrency finds best.

    Requests are carved from the queued runs of missing chunks when a worker takes one,
    at a size that shrinks with the work left: large while much is queued (CNCF
    Distribution spends ~8 ms per request), down to one chunk at the end, so the last
    requests finish together instead of one large request running alone at the tail."""

    def __init__(self, origin: OriginClient, ref: Ref, nursery: trio.Nursery, cap: int):
        self.origin = origin
        self.ref = ref
        self.max_connections = cap
        #: session -> (its chunks for the origin, the swarm's), from ``share_work``
        self._work: dict[BlobSession, tuple[int, int]] = {}
        self._nursery = nursery
        # runs of consecutive missing chunks, [first, end), in the order they were queued
        self._runs: collections.deque[tuple[BlobSession, int, int]] = collections.deque()
        self._queued_bytes = 0
        self._workers = 0
        self.concurrency = AdaptiveConcurrency(limit=min(INITIAL_ORIGIN_CONCURRENCY, cap),
                                               cap=cap)

    def submit(self, session: "BlobSession", missing: list[int]) -> None:
        """Queue ``missing`` chunks (ascending) as runs of consecutive chunks."""
        first = previous = None
        for index in missing:
            if first is not None and index != previous + 1:
                self._queue_run(session, first, previous + 1)
                first = None
            if first is None:
                first = index
            previous = index
        if first is not None:
            self._queue_run(session, first, previous + 1)
        self._spawn()

    def _queue_run(self, session: "BlobSession", first: int, end: int) -> None:
        self._runs.append((session, first, end))
        self._queued_bytes += session.plan.bytes_between(first, end)

    def _take(self) -> tuple["BlobSession", int, int]:
        """The next request: (session, first chunk, number of chunks)."""
        session, first, end = self._runs.popleft()
        plan = session.plan
        wanted = min(MAX_REQUEST_BYTES, self._queued_bytes // (2 * self.concurrency.cap))
        count = min(end - first, max(1, wanted // plan.chunk_size))
        if first + count < end:
            self._runs.appendleft((session, first + count, end))
        self._queued_bytes -= plan.bytes_between(first, first + count)
        return session, first, count

    def share_work(self, session: "BlobSession", mine: int, remaining: int) -> None:
        """``session`` fetches ``mine`` of the ``remaining`` chunks the origin still has to
        send to the swarm: keep to that share of ``origin_max_connections``.

        At the start every node has about 1/N of the work. Connections beyond its share
        would take a larger part of the origin, but every chunk would then take that much
        longer to arrive, and a chunk can be passed on to peers only once it is whole
        (with 8 nodes x 16 connections a 2 MiB chunk of a 100 Mbit/s origin takes 20 s,
        and the peers wait idle that long at the start). At the end the last node with
        origin work holds most of it: more connections then keep the origin busy against
        the peer connections that share the node's download link."""
        self._work[session] = (mine, remaining)
        mine = sum(m for m, _ in self._work.values())
        remaining = sum(r for _, r in self._work.values())
        self.concurrency.set_cap(origin_connection_share(self.max_connections, mine,
                                                         remaining))
        # a larger share takes its connections now: waiting for the next rate window to
        # raise the limit left a node that fell behind on its few early connections
        self._spawn()

    def session_done(self, session: "BlobSession") -> None:
        self._work.pop(session, None)

    def on_bytes(self, nbytes: int) -> None:
        before = self.concurrency.limit
        if self.concurrency.on_bytes(nbytes, trio.current_time()) > before:
            self._spawn()

    def on_pushback(self) -> None:
        self.concurrency.on_pushback(trio.current_time())

    def _spawn(self) -> None:
        while self._runs and self._workers < self.concurrency.limit:
            self._workers += 1
            self._nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        try:
            while self._runs and self._workers <= self.concurrency.limit:
                session, first, count = self._take()
                await session.fetch_from_origin(first, count, self)
        finally:
            self._workers -= 1
        self._spawn()


async def throttle(bucket: TokenBucket, nbytes: int) -> None:
    """Wait as long as ``bucket`` says before ``nbytes`` more may move."""
    delay = bucket.reserve(nbytes, trio.current_time())
    if delay > 0:
        await trio.sleep(delay)


class PeerMessenger(Protocol):
    """What a blob session needs from the node's peer links (nothing, with no peers)."""

    def send_request(self, peer: str, blob: str, index: int) -> None: ...

    def send_cancel(self, peer: str, blob: str, index: int) -> None: ...

    def announce_have(self, blob: str, index: int) -> None: ...

    def ban(self, peer: str, reason: str) -> None: ...

    def session_started(self, session: "BlobSession") -> None: ...

    async def wait_for_bitmaps(self, session: "BlobSession") -> None:
        """Return once every connected peer sent its bitmap of the blob, or soon after."""

    def session_ended(self, session: "BlobSession") -> None: ...


class NoPeers:
    """The messenger of a node with no peers: every chunk comes from the origin."""

    def send_request(self, peer, blob, index): raise AssertionError("no peers to ask")

    def send_cancel(self, peer, blob, index): pass

    def announce_have(self, blob, index): pass

    def ban(self, peer, reason): pass

    def session_started(self, session): pass

    async def wait_for_bitmaps(self, session): pass

    def session_ended(self, session): pass


class BlobSession:
    """Brings one blob into the store, resuming what an earlier run left, with chunks from
    peers first and the origin last as its BlobSwarm decides.

    Swarm state changes only in ``apply``, which never awaits: trio runs it whole, so the
    reader tasks of peers, the origin workers and the ticker can all feed it events."""

    def __init__(self, store: Store, ref: Ref, descriptor: Descriptor, progress: BlobProgress,
                 chunk_size: int | None, *, node_id: str = "local",
                 messenger: PeerMessenger | None = None,
                 swarm_config: SwarmConfig | None = None, rng: random.Random | None = None,
                 download_bucket: TokenBucket | None = None,
                 write_slots: trio.Semaphore | None = None,
                 release_payload: Callable[[memoryview], None] = lambda payload: None,
                 rack: str | None = None):
        self.store = store
        self.ref = ref
        self.descriptor = descriptor
        self.digest = descriptor.digest
        self.progress = progress
        self.plan = ChunkPlan.for_blob(descriptor.size, chunk_size)
        self.node_id = node_id
        self.messenger = messenger or NoPeers()
        self.swarm_config = swarm_config or SwarmConfig(max_origin_in_flight=MAX_ORIGIN_CHUNKS)
        self.rng = rng or random.Random()
        #: our rack label: the swarm asks other racks' peers only for what it imports
        self.rack = rack
        self.download_bucket = download_bucket or TokenBucket(None, 0)
        self.partial: PartialBlob | None = None
        self.swarm: BlobSwarm | None = None
        self.host: str | None = None
        #: chunk -> the peer it came from, for finding a liar when the blob's sha256 fails
        self.chunk_sources: dict[int, str] = {}
        #: chunk -> (peer, its checksum) of peer chunks re-fetched after a failed sha256
        self._suspects: dict[int, tuple[str, bytes]] = {}
        self._pool: _OriginPool | None = None
        #: set once the swarm may use the origin; the node ticks only such sessions
        self.ticking = False
        self._committed = trio.Event()
        self._integrity_failures = 0
        #: bounds the peer pieces held in memory for their write, across the node's sessions
        self._write_slots = write_slots or trio.Semaphore(PEER_WRITES_IN_FLIGHT)
        #: gives a peer piece's buffer back once its bytes are written or dropped
        self._release_payload = release_payload
        #: owns the write tasks of peer pieces while the session runs
        self._writes: trio.Nursery | None = None
        #: chunks a peer's piece is being written for: a duplicate of one is dropped, and
        #: the origin's stream reads past it (one writer per chunk: PartialBlob's rule)
        self._peer_writes: set[int] = set()
        #: chunks the origin's stream is writing right now: a peer's piece of one is dropped
        self._origin_writes: set[int] = set()
        #: set when the sha256's prefix may have moved (a peer piece's write task ended, the
        #: hashing thread returned): a piece just past it waits for it (``_hash_in_order``)
        self._prefix_may_move = trio.Event()
        #: disk writes in flight (peers' and the origin's): publish and close wait for none
        self._writing = 0
        self._writes_done = trio.Event()

    async def run(self, pool: _OriginPool) -> None:
        if await self._wait_for_lock():
            return
        self._pool = pool
        try:
            async with trio.open_nursery() as writes:
                self._writes = writes
                await self._fetch_and_publish(pool)
            self.progress.state = "done"
        finally:
            self._writes = None
            pool.session_done(self)
            self.messenger.session_ended(self)
            with trio.CancelScope(shield=True):
                await self._until_writes_done()
            self.partial.close()

    async def _fetch_and_publish(self, pool: _OriginPool) -> None:
        self.progress.held = self.progress.reused = sum(
            self.plan.length(i) for i in self.partial.bitmap.held())
        self.swarm = BlobSwarm(self.digest, self.plan, self.node_id, self.partial.bitmap,
                               self.swarm_config, self.rng, rack=self.rack)
        if not self.swarm.complete:
            self.progress.state = "fetching"
            # before any peer joins, so that its first requests are in order too; how many
            # peers there are is not known yet
            self._mark_urgent(self.partial.hashed_chunks, HASH_URGENT_CHUNKS)
            await self._find_host(pool.origin)
            self.messenger.session_started(self)
            # who is responsible for what depends on who else wants the blob: hear
            # from the peers before the first Tick sends anything to the origin
            await self.messenger.wait_for_bitmaps(self)
            self.ticking = True
            self.apply(Tick())
        while not await self._hash_and_publish():
            pass

    # -- events in, actions out -------------------------------------------------------------

    def apply(self, event) -> None:
        """Feed ``event`` to the swarm and carry out what it decides."""
        if self.swarm is None:
            return
        origin_chunks = []
        for action in self.swarm.handle(event, trio.current_time()):
            if isinstance(action, FetchFromOrigin):
                origin_chunks.append(action.index)
            elif isinstance(action, SendRequest):
                self.messenger.send_request(action.peer, self.digest, action.index)
            elif isinstance(action, SendCancel):
                self.messenger.send_cancel(action.peer, self.digest, action.index)
            elif isinstance(action, AnnounceHave):
                self.messenger.announce_have(self.digest, action.index)
            elif isinstance(action, BanPeer):
                log.warning("banning peer %s: %s", action.peer, action.reason)
                self.messenger.ban(action.peer, action.reason)
            elif isinstance(action, Completed):
                self._committed.set()
        if type(event) is Tick:
            self._pool.share_work(self, *self.swarm.origin_work())
        if origin_chunks:
            origin_chunks.sort()
            log.debug("%s: chunks %s from the origin", self.digest[7:19], origin_chunks)
            self._pool.submit(self, origin_chunks)

    def holds(self, index: int) -> bool:
        return self.partial is not None and index in self.partial.bitmap

    def _wants_piece(self, peer: str, index: int) -> bool:
        return self.swarm is not None and self._writes is not None and \
            index not in self._peer_writes and index not in self._origin_writes and \
            self.swarm.accepts_piece(peer, index)

    async def piece_from_peer(self, peer: str, index: int, checksum: bytes, payload) -> None:
        """A piece from ``peer``: check its length and xxh3, then hand it to a write task
        (which commits it), waiting while PEER_WRITES_IN_FLIGHT pieces are pending. Pieces
        we did not ask that peer for, duplicates and chunks held meanwhile are dropped.
        The payload goes back to ``release_payload`` once written or dropped."""
        handed_over = False
        try:
            if not 0 <= index < self.plan.count or len(payload) != self.plan.length(index):
                self.apply(PieceFailed(peer, index, "corrupt"))
                return
            if not self._wants_piece(peer, index):
                return
            if chunk_checksum(payload) != checksum:
                self.progress.rejected += 1
                self.apply(PieceFailed(peer, index, "corrupt"))
                return
            if len(payload) <= INLINE_IO_MAX:
                self.partial.write(index, 0, payload)
                self.partial.hash_next_chunk(index, payload)
                self._committed_from_peer(peer, index, checksum, len(payload))
                return
            await self._write_slots.acquire()
            if not self._wants_piece(peer, index):  # held, or being written, meanwhile
                self._write_slots.release()
                return
            self._peer_writes.add(index)
            self._writes.start_soon(self._write_peer_piece, peer, index, checksum, payload)
            handed_over = True
        finally:
            if not handed_over:
                self._release_payload(payload)

    async def _write_peer_piece(self, peer: str, index: int, checksum: bytes, payload) -> None:
        slot_held = True
        try:
            await self.write_in_thread(self.partial.write, index, 0, payload)
            # the links' readers go on while this piece waits its turn for the sha256
            self._write_slots.release()
            slot_held = False
            await self._hash_in_order(index, payload)
        finally:
            self._peer_writes.discard(index)
            if slot_held:
                self._write_slots.release()
            self._release_payload(payload)
            self._prefix_may_move_now()
        self._committed_from_peer(peer, index, checksum, len(payload))

    def _prefix_may_move_now(self) -> None:
        self._prefix_may_move.set()
        self._prefix_may_move = trio.Event()

    async def _hash_in_order(self, index: int, payload) -> None:
        """Feed a written peer piece to the blob's sha256 from its buffer if it continues the
        hashed prefix, once the chunks just before it are hashed, when each of them is held
        or being written: a piece that overtook its predecessor in the other write task, or
        the hashing thread, would otherwise be read back from disk."""
        partial = self.partial
        while partial.hashed_chunks < index <= partial.hashed_chunks + self._urgent_span() \
                and all(i in self._peer_writes or i in partial.bitmap
                        for i in range(partial.hashed_chunks, index)):
            await self._prefix_may_move.wait()
        if partial.hashed_chunks == index:
            await self.write_in_thread(partial.hash_next_chunk, index, payload)

    def _committed_from_peer(self, peer: str, index: int, checksum: bytes, length: int) -> None:
        if self.partial.commit(index, checksum):
            self.chunk_sources[index] = peer
            self.progress.from_peers += length
            self.progress.held += length
            self._committed.set()
            self.apply(PieceVerified(peer, index, length))

    async def write_in_thread(self, write, *args) -> None:
        """Run ``write(*args)`` (a PartialBlob write) in a worker thread, counted, so that
        the partial file is neither published nor closed under it."""
        self._writing += 1
        try:
            await trio.to_thread.run_sync(write, *args)
        finally:
            self._writing -= 1
            if not self._writing:
                self._writes_done.set()

    async def _until_writes_done(self) -> None:
        while self._writing:
            self._writes_done = trio.Event()
            await self._writes_done.wait()

    def committed_from_origin(self, index: int, checksum: bytes) -> None:
        """Chunk ``index`` arrived from the origin and its bytes are written."""
        if not self.partial.commit(index, checksum):
            return  # held already: a peer was faster
        suspect = self._suspects.pop(index, None)
        if suspect is not None and suspect[1] != checksum:
            # this peer's bytes passed their own xxh3 but broke the blob's sha256
            self.apply(PieceFailed(suspect[0], index, "corrupt"))
        self._committed.set()
        self.apply(PieceVerified(None, index, self.plan.length(index)))

    # -- lock, hash, publish ----------------------------------------------------------------

    async def _wait_for_lock(self) -> bool:
        """Take the blob's lock; True if the blob is (or became) complete meanwhile."""
        while True:
            if self.store.has_blob(self.descriptor.digest, self.descriptor.size):
                self.progress.held = self.progress.reused = self.descriptor.size
                self.progress.state = "done"
                self.store.touch(self.descriptor.digest)
                return True
            self.partial = await trio.to_thread.run_sync(
                self.store.try_open_partial, self.descriptor.digest, self.descriptor.size,
                self.plan.chunk_size)
            if self.partial is not None:
                return False
            self.progress.state = "waiting"
            await trio.sleep(LOCK_POLL_SECONDS)

    async def _find_host(self, origin: OriginClient) -> None:
        self.host, size = await origin.blob_host(self.ref, self.descriptor.digest)
        if size >= 0 and size != self.descriptor.size:
            raise OriginError(f"{self.host} holds {self.descriptor.digest} with {size} bytes "
                              f"but the manifest says {self.descriptor.size}")

    async def _hash_and_publish(self) -> bool:
        """Hash chunks as they land; when all are held, publish. False if chunks were found
        damaged or wrong and are being fetched again."""
        partial = self.partial
        frontier = -1
        while True:
            self._committed = trio.Event()
            # a worker thread only when the prefix can grow: most commits land elsewhere
            frontier_held = partial.hashed_chunks == self.plan.count or \
                partial.hashed_chunks in partial.bitmap
            if frontier_held:
                done = await trio.to_thread.run_sync(partial.advance_hash)
                self._prefix_may_move_now()
                if done:
                    break
            if partial.hashed_chunks != frontier:
                frontier = partial.hashed_chunks
                self._mark_urgent(frontier)
            await self._committed.wait()
        self.progress.state = "verifying"
        await self._until_writes_done()
        try:
            await trio.to_thread.run_sync(partial.publish)
            log.info("%s published: %d chunks, %d hashed from receive buffers", self.digest,
                     self.plan.count, partial.hashed_from_buffers)
            return True
        except IntegrityError as exc:
            self._integrity_failures += 1
            if self._integrity_failures > INTEGRITY_RETRIES:
                partial.discard_all()
                raise IntegrityError(f"{self.ref}: {self.digest} did not match its bytes "
                                     f"after {self._integrity_failures} attempts, the origin "
                                     "serving them wrong; nothing was published") from exc
        # Fetch again from the origin: chunks torn by a crash, and chunks from peers (one
        # of them lied, with a checksum matching its wrong bytes). With neither, the origin
        # itself served wrong bytes: try the whole blob once more.
        damaged = await trio.to_thread.run_sync(partial.find_damaged_chunks)
        refetch = {index: "damaged" for index in damaged}
        for index, peer in self.chunk_sources.items():
            # bytes counted from peers are counted again when the origin sends them
            self.progress.from_peers -= self.plan.length(index)
            if index not in refetch and index in partial.checksums:
                self._suspects[index] = (peer, partial.checksums[index])
                refetch[index] = peer
        self.chunk_sources.clear()
        if not refetch:
            refetch = {index: "origin" for index in range(self.plan.count)}
        partial.forget(refetch)
        log.warning("%s failed its sha256; fetching %d chunks again from the origin",
                    self.digest, len(refetch))
        self.progress.held = sum(self.plan.length(i) for i in partial.bitmap.held())
        self.progress.state = "fetching"
        self.apply(BlobCorrupt(refetch))
        return False

    def _urgent_span(self) -> int:
        if self.swarm.peer_count > 1:
            return HASH_URGENT_CHUNKS
        return max(HASH_URGENT_CHUNKS, HASH_URGENT_PIPELINES * self.swarm_config.pipeline_depth)

    def _mark_urgent(self, frontier: int, span: int | None = None) -> None:
        """Mark the first ``span`` chunks we miss from ``frontier`` on (the sha256's
        prefix) urgent."""
        span = span or self._urgent_span()
        ahead = []
        for index in range(frontier, self.plan.count):
            if len(ahead) == span:
                break
            if not self.holds(index):
                ahead.append(index)
        self.apply(Urgent(tuple(ahead)))

    async def fetch_from_origin(self, first: int, count: int, pool: _OriginPool) -> None:
        """Fetch chunks ``first .. first+count-1`` with one HTTP Range request, write them as
        they stream in, and commit each with the xxh3 of exactly the bytes written. Chunks
        that peers delivered since the run was queued are not asked for, nor those at its
        ends that a peer holds now (they go back to the swarm), and the request stops once
        the rest of its range is held."""
        while count and not self._origin_wanted(first):
            first, count = first + 1, count - 1
        while count and not self._origin_wanted(first + count - 1):
            count -= 1
        if not count or self.partial is None or self.partial.bitmap.complete:
            return
        writer = _ChunkWriter(self, first)
        start = self.plan.offset(first)
        last_offset, last_length = self.plan.span(first + count - 1)
        end = first + count

        with trio.CancelScope() as rest_held:
            async def sink(piece: memoryview) -> None:
                await throttle(self.download_bucket, len(piece))
                self.progress.from_origin += len(piece)
                pool.on_bytes(len(piece))
                await writer.feed(piece)
                if writer.skipping and all(self.holds(i) for i in range(writer.index, end)):
                    rest_held.cancel()

            try:
                await pool.origin.read_blob_range(self.ref, self.descriptor.digest, start,
                                                  last_offset + last_length - start, sink,
                                                  on_pushback=pool.on_pushback, host=self.host)
            finally:
                self.progress.held -= writer.uncommitted

    def _origin_wanted(self, index: int) -> bool:
        """Chunk ``index``, queued for the origin, is still to be fetched there. One a peer
        holds now (origin help fetched it while it waited here) is handed back to the
        swarm, which asks the peer for it."""
        if self.holds(index):
            return False
        if self.swarm is not None and not self.swarm.origin_needed(index):
            self.apply(OriginDropped(index))
            return False
        return True


class _ChunkWriter:
    """Cuts a byte stream that starts at chunk ``first`` into chunks: buffers up to
    WRITE_BATCH, writes in a worker thread, commits each chunk when its last byte is
    written."""

    def __init__(self, session: BlobSession, first: int):
        self.session = session
        self.index = first
        self.position = 0  # bytes of chunk ``index`` received
        self.written = 0  # bytes of chunk ``index`` written
        self.checksum = xxhash.xxh3_128()
        self.pending: list = []
        self.uncommitted = 0  # counted in progress.held but not committed yet
        # a chunk a peer delivered meanwhile is read past, not written over: a peer may be
        # reading it from our partial file to serve it
        self.skipping = session.holds(first)

    async def feed(self, piece: memoryview) -> None:
        plan = self.session.plan
        while piece:
            length = plan.length(self.index)
            take = min(len(piece), length - self.position)
            part, piece = piece[:take], piece[take:]
            self.position += take
            if not self.skipping:
                self.checksum.update(part)
                self.pending.append(part)
                self.uncommitted += take
                self.session.progress.held += take
            if self.position == length:
                if not self.skipping:
                    await self._flush()
                if not self.skipping:  # _flush may have found it held meanwhile
                    self.uncommitted -= length
                    self.session.committed_from_origin(self.index, self.checksum.digest())
                self.index += 1
                self.position = self.written = 0
                self.checksum = xxhash.xxh3_128()
                self.skipping = self.index < plan.count and self.session.holds(self.index)
            elif not self.skipping and self.position - self.written >= WRITE_BATCH:
                await self._flush()

    async def _flush(self) -> None:
        batch, self.pending = self.pending, []
        session = self.session
        if session.holds(self.index) or self.index in session._peer_writes:
            # a peer delivered this chunk while it streamed in (the endgame asks a peer for
            # chunks the origin is sending): read past the rest of it, as for a chunk held
            # at its start; the blob may even be published and its partial file closed
            self.skipping = True
            self.uncommitted -= self.position
            session.progress.held -= self.position
            return
        if self.position - self.written <= INLINE_IO_MAX:
            session.partial.write_many(self.index, self.written, batch)
        else:
            session._origin_writes.add(self.index)
            try:
                await session.write_in_thread(session.partial.write_many, self.index,
                                              self.written, batch)
            finally:
                session._origin_writes.discard(self.index)
        self.written = self.position


async def fetch_blobs(store: Store, origin: OriginClient, ref: Ref,
                      descriptors: list[Descriptor], progress: Progress,
                      chunk_size: int | None = None, **session_options) -> None:
    """Bring every blob of ``descriptors`` into ``store``, verified. Raises the first error
    of any blob; partial downloads stay for the next attempt. ``session_options`` go to
    each BlobSession (a node passes its id, messenger, swarm config and generator)."""
    for descriptor in descriptors:
        title = descriptor.annotations.get("org.opencontainers.image.title") or \
            descriptor.digest[7:19]
        progress.blobs.setdefault(descriptor.digest,
                                  BlobProgress(descriptor.digest, descriptor.size, title))
    try:
        async with trio.open_nursery() as nursery:
            pool = _OriginPool(origin, ref, nursery, origin.config.origin_max_connections)
            for descriptor in descriptors:
                session = BlobSession(store, ref, descriptor,
                                      progress.blobs[descriptor.digest], chunk_size,
                                      **session_options)
                nursery.start_soon(session.run, pool)
    except BaseExceptionGroup as group:
        raise first_error(group) from None

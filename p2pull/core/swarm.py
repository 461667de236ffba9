"""The swarm of one blob on one node: a pure state machine, ``handle(event, now) -> actions``.

The daemon (or the simulator) owns one ``BlobSwarm`` per blob being fetched or served, feeds
it every event that concerns the blob with the time it happened, and carries out the actions
it returns; the swarm does no I/O and reads no clock. Same events, same times and the same
seeded ``random.Random`` give the same actions.

Contract with the driver
- Feed ``PeerJoined`` for the peers you already know, then a first ``Tick``: the swarm asks
  peers for chunks from the start but touches the origin only once it has been ticked, so
  that it decides who fetches what from the origin on a full view of the swarm.
- Tick again no later than ``next_deadline()`` (or at a steady interval): requests expire,
  origin waits run out and backed-off peers come back only on a ``Tick``.
- Tell the swarm that its peers are alive with ``PeerAlive``, or, when the driver tracks
  liveness per connection anyway, pass ``liveness``: a function of a peer's name returning
  the last times (heard from, showed progress) the driver knows of. The swarm takes the
  later of those and what its own events told it, and asks only when it decides an orphan,
  so a driver with many swarms and peers need not send N x swarms ``PeerAlive`` per period.
- Send ``PeerJoined`` before anything else about a peer (a ``PeerHave`` from a peer that has
  not joined, or has left, is ignored) and ``PeerLeft`` when its connection is gone. A peer
  that stays connected but never answers only costs request timeouts (and a back-off); the
  chunks only it holds wait for it, so drop dead connections.
- Write a peer's piece only if ``accepts_piece`` says so (asked of that peer, still missing,
  not forced to the origin). ``PieceVerified`` means the chunk passed its xxh3 and is
  committed: the swarm counts it held. ``BlobCorrupt`` takes chunks back; they then come
  from the origin only.

How chunks are sourced
- A chunk some live peer holds goes to a peer: whenever a peer has a free pipeline slot, it is
  asked for the urgent chunk it holds, else the rarest, ties at random (``picker.pick``). A
  chunk that becomes wanted again (a failed request) goes to the best-scoring free holder.
- A chunk no peer holds (an orphan) is fetched from the origin by the node that ranks first
  for it by rendezvous hashing over the interested live nodes (self and the peers that joined
  with an incomplete bitmap). In a swarm of more than ``origin_fetchers`` such nodes only
  that many, the highest by the blob's own weight, fetch: any of them outranks every other
  node (``responsibility``: every chunk would otherwise take the whole origin time to
  arrive). Every other node waits: it fetches the chunk itself once it has
  needed it for ``origin_wait_limit`` and every node that outranks it for that chunk has been
  silent for ``origin_wait_limit`` (no join, Have, piece or answer) or has shown no progress
  (no Have, no piece) for ``origin_stall_limit``, longer as the origin is slow
  (``_stall_limit``; ``origin_silence_limit`` for a node with no origin chunks of its own to
  tell the origin's pace by). So a dead first node costs
  one wait and one extra fetch (by the second node), not one fetch per node, and a slow but
  live first node costs nothing. A Have from any peer ends the wait: the chunk goes to it.
- Origin help: a node whose own origin chunks are all in takes, from the top down and a
  few at a time, orphans it ranks second for while the live first node still has at least
  ``origin_help_margin`` of its orphans below them (``_help_origin``): nodes fetch their
  shares at uneven rates, and the swarm's last chunks would otherwise wait for the slowest.
- At most ``max_origin_in_flight`` origin fetches at once; the rest queue (urgent first).
- Endgame: once every missing chunk is in flight, each free peer holding an in-flight chunk
  is asked for it too, up to ``endgame_duplicates`` sources per chunk; the first piece wins
  and the other requests are cancelled.
- Racks: a swarm given a rack label (the daemon's ``rack`` setting; peers tell theirs in
  ``PeerJoined``) asks a peer of another rack only for chunks no peer of its own rack holds,
  and of those only the ones it *imports*: it outranks every peer of its rack in the chunk's
  rendezvous weight, so each chunk crosses into a rack about once, and spreads inside it
  (neither the endgame nor a request moved out of a line brings in what the rack holds).
  With nothing coming in, it may ask another rack for one chunk its rack lacks at a time
  (its rack mates may be slow to import theirs). Without a label, or with no peer of its
  rack, nothing changes.

Cost: an event costs O(1) big-int operations on chunk sets (ints, bit i = chunk i) plus what
it changes; no event scans chunks x peers. A peer's bitmap joining or leaving costs O(its
chunks); deciding who fetches an orphan scans the origin fetchers only until one outranks us
(about ln of their number hashes on average; none for a node outside them). A member joining
costs one hash and, while it ranks below the lowest fetcher, one comparison. With a rack
label, a peer of our rack joining costs O(chunks) hashes, and one leaving O(its rack
mates x chunks).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, Iterable, Literal

from xxhash import xxh3_64_intdigest

from p2pull.core.bitmap import Bitmap, set_bits
from p2pull.core.book import RequestBook
from p2pull.core.chunks import ChunkPlan
from p2pull.core.picker import Rarity, pick, pick_duplicate
from p2pull.core.responsibility import chunk_key, fetcher_key, node_bytes
from p2pull.errors import ProtocolError

#: a live member without progress is stalled after this many of our own origin chunk times
STALL_PACES = 3.0
#: weight of a new sample of our own origin chunk time
ORIGIN_PACE_SMOOTHING = 0.25
#: a Tick rebuilds the deadline heap once it has popped more stale entries than 1/this of
#: (chunks + entries left), the rebuild's cost: so a rebuild costs at most about as much
#: as the pops before it, and saves the rest when most entries are stale
DEADLINE_REBUILD_RATIO = 16

FailureReason = Literal["corrupt", "rejected", "busy", "error"]
FAILURE_REASONS = ("corrupt", "rejected", "busy", "error")


@dataclass(frozen=True)
class SwarmConfig:
    """Scheduling knobs of one blob swarm. Times in seconds, rates in bytes per second."""

    #: requests outstanding with one peer while it is the only one to have held chunks:
    #: enough to keep its link busy across a round trip (a single peer over loopback lost
    #: up to a tenth of its rate at 2)
    pipeline_depth: int = 3
    #: ... and once two or more peers have: the pipelines together still cover the round
    #: trip, and no deeper, as a request waiting at a busy peer holds its chunk there while
    #: a free peer could have sent it. In the namespace lab (256 KiB chunks, 8 nodes,
    #: interleaved runs) the slowest node's median was 48.7 s at 4, 48.1 s at 3 and 47.6 s
    #: at 2. At most pipeline_depth.
    shared_pipeline_depth: int = 2
    #: the least time a request is given before it is re-sent elsewhere; a peer measured
    #: slow gets 4 x chunk length / its throughput instead, if that is longer
    request_timeout_min: float = 5.0
    #: how long a node that is not responsible for a chunk nobody holds waits (since it first
    #: needed it, and since it last heard from each node outranking it) before fetching the
    #: chunk from the origin itself; 0 turns origin deduplication off
    origin_wait_limit: float = 2.0
    #: a node outranking us that stays alive but has shown no progress (no Have, no piece)
    #: for this long is not waited for any more: its origin access may be broken, or it
    #: only claims interest; waiting on liveness alone would wait for ever
    origin_stall_limit: float = 10.0
    #: ... for a node with origin chunks of its own, whose pace tells how long a chunk
    #: takes (``_stall_limit``); one without, in a swarm larger than its origin fetchers,
    #: waits this long: the origin may be slow for all (a 16 MiB chunk from a
    #: 100 Mbit/s origin shared by 16 fetchers takes 21 s), and fetching the fetchers'
    #: chunks as well only slows it further: 1,000 nodes in the simulator took the 16 for
    #: stalled at 10 s, fetched their chunks too, and at 60 s the origin streamed 6,818
    #: chunks at once. A fetcher that stalls is replaced sooner by the other fetchers,
    #: which have paces of their own.
    origin_silence_limit: float = 60.0
    #: sources per chunk in the endgame (first request included); 1 turns the endgame off
    endgame_duplicates: int = 2
    #: origin fetches in flight at once from this swarm; the rest wait in a queue
    max_origin_in_flight: int = 8
    #: a peer that answered busy or error, or let a request expire, gets no new request for
    #: this long
    peer_backoff: float = 1.0
    #: the throughput assumed for a peer not measured yet, for its timeouts and score
    assumed_throughput: float = 8 * 1024 * 1024
    #: weight of a new throughput sample in a peer's EWMA
    throughput_smoothing: float = 0.25
    #: origin help: a node with none of its own origin chunks left fetches, from the last
    #: index down, orphans it ranks second for while the live node ranking first still
    #: has them to do, at most this many at once. Nodes fetch their origin shares at
    #: uneven rates (a node whose uplink is saturated gets its origin data slowly), and
    #: without help the swarm's last chunks wait for the slowest share while the origin
    #: idles. A chunk helped while it waited in the first node's queue is not fetched
    #: again (``origin_needed``); 0 turns help off.
    origin_help_in_flight: int = 2
    #: origin help is for swarms of at most this many interested nodes: in a larger
    #: swarm the peers' tail, not the fetchers', is the last (140 GB to 1,000 nodes in the
    #: simulator: the same times without help, and 1.000 x F from the origin, not 1.052)
    origin_help_members: int = 32
    #: origin help takes a chunk only if at least this many of the first node's orphans
    #: lie below it: that node fetches its share in ascending order, with as many
    #: requests under way as its origin connections (the daemon's origin_max_connections,
    #: 16), and those must not be fetched twice
    origin_help_margin: int = 16
    #: at most this many interested nodes fetch the blob from the origin, the ones with
    #: the highest fetcher weight (``responsibility.fetchers``); the others wait for them.
    #: With every node fetching its 1/N, the origin streams up to N chunks at once and
    #: each arrives only when the origin has sent nearly all: at N = 1,000 nodes the peers
    #: idled for the whole of the origin's work. 0: every interested node fetches.
    origin_fetchers: int = 16

    def __post_init__(self):
        if min(self.origin_help_in_flight, self.origin_help_members,
               self.origin_help_margin, self.origin_fetchers) < 0:
            raise ValueError("origin_help_in_flight, origin_help_members, "
                             "origin_help_margin and origin_fetchers must not be negative")
        if min(self.pipeline_depth, self.shared_pipeline_depth, self.endgame_duplicates,
               self.max_origin_in_flight) < 1:
            raise ValueError("pipeline_depth, shared_pipeline_depth, endgame_duplicates and "
                             "max_origin_in_flight must be at least 1")
        if min(self.request_timeout_min, self.origin_wait_limit, self.origin_stall_limit,
               self.peer_backoff) < 0:
            raise ValueError("times must not be negative")
        if self.origin_silence_limit < self.origin_stall_limit:
            raise ValueError("origin_silence_limit must be at least origin_stall_limit")


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerJoined:
    """A peer interested in or holding this blob, with its bitmap (full: a seeder). Sent
    again for a known peer, the bitmap replaces the one we had. ``rack``: the peer's rack
    label, if it told one (a swarm with a rack of its own prefers the peers of its rack)."""

    peer: str
    bitmap: Bitmap
    rack: str | None = None


@dataclass(frozen=True, slots=True)
class PeerLeft:
    peer: str


@dataclass(frozen=True, slots=True)
class PeerAlive:
    """``peer``'s connection delivered something (a message about any blob, a Pong): it is
    alive even if it sent nothing about this blob for a while (busy fetching another blob's
    chunks from the origin, say), so orphans it outranks us for keep waiting for it.
    ``progressed``: what it delivered shows progress (a Have or a piece of any blob), which
    keeps its ``origin_stall_limit`` from running out."""

    peer: str
    progressed: bool = False


@dataclass(frozen=True, slots=True)
class PeerHave:
    """``peer`` now holds chunk ``index``. Ignored from a peer that has not joined (or has
    left): send ``PeerJoined`` first."""

    peer: str
    index: int


@dataclass(frozen=True, slots=True)
class PieceVerified:
    """Chunk ``index`` arrived from ``peer`` (None: the origin), passed its check and is
    committed; ``nbytes`` is its length."""

    peer: str | None
    index: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class PieceFailed:
    """A request to ``peer`` came to nothing: ``corrupt`` (the piece failed its check: the peer
    is banned), ``rejected`` (the peer does not serve that chunk), ``busy`` (no upload slot),
    ``error`` (anything else)."""

    peer: str
    index: int
    reason: FailureReason


@dataclass(frozen=True, slots=True)
class OriginFailed:
    """The origin fetch of chunk ``index`` failed for good (after the client's own retries);
    the swarm tries peers, or the origin again after ``origin_wait_limit``."""

    index: int


@dataclass(frozen=True, slots=True)
class OriginDropped:
    """The driver did not fetch chunk ``index`` from the origin after all, because
    ``origin_needed`` said a peer holds it now (origin help fetched it while it waited in
    the driver's queue); the swarm asks peers for it."""

    index: int


@dataclass(frozen=True, slots=True)
class UploadLine:
    """``peer`` has every upload slot taken and our requests wait in its line
    (``waiting``), or it has given us a slot again (not ``waiting``). While we wait, the
    peer is asked for nothing more, and a chunk we asked it for is asked of a free holder
    instead (and cancelled there) when one announces it."""

    peer: str
    waiting: bool


@dataclass(frozen=True, slots=True)
class Tick:
    pass


@dataclass(frozen=True, slots=True)
class Urgent:
    """These chunks are wanted first (a streaming reader, a critical layer)."""

    indexes: tuple[int, ...]


@dataclass(frozen=True)
class BlobCorrupt:
    """The blob's sha256 failed with every chunk held. ``peer_chunks`` maps each chunk that
    came from a peer to that peer: they are taken back and fetched from the origin only."""

    peer_chunks: dict[int, str]


Event = PeerJoined | PeerLeft | PeerAlive | PeerHave | PieceVerified | PieceFailed | \
    OriginFailed | UploadLine | Tick | Urgent | BlobCorrupt


# -- actions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendRequest:
    peer: str
    index: int


@dataclass(frozen=True, slots=True)
class SendCancel:
    peer: str
    index: int


@dataclass(frozen=True, slots=True)
class FetchFromOrigin:
    index: int


@dataclass(frozen=True, slots=True)
class AnnounceHave:
    """Tell every peer of this blob that we now hold chunk ``index``."""

    index: int


@dataclass(frozen=True, slots=True)
class BanPeer:
    peer: str
    reason: str


@dataclass(frozen=True, slots=True)
class Completed:
    """Every chunk is held: check the blob's digest. Emitted once each time the swarm becomes
    complete (again after a ``BlobCorrupt``); a swarm created complete does not emit it."""


Action = SendRequest | SendCancel | FetchFromOrigin | AnnounceHave | BanPeer | Completed


class _Peer:
    """A live, unbanned peer of this blob."""

    __slots__ = ("name", "key", "bits", "requested", "heard", "progressed", "member",
                 "backoff_until", "freed_at", "free", "holding", "rank", "fetcher",
                 "in_line", "near")

    def __init__(self, name: str, now: float):
        self.name = name
        #: the bytes its rendezvous weights are hashed from
        self.key = node_bytes(name)
        #: chunks it holds
        self.bits = 0
        #: chunks outstanding with it
        self.requested = 0
        #: last time it showed it is alive (joined, Have, piece, answer)
        self.heard = now
        #: last time it showed progress (joined, a Have, a piece)
        self.progressed = now
        #: joined incomplete: one of the nodes sharing origin fetches
        self.member = False
        #: a member's (fetcher weight, name): the origin fetchers are the highest
        self.rank: tuple[int, str] | None = None
        #: a member that is one of the origin fetchers
        self.fetcher = False
        #: our requests wait in its line for an upload slot (``UploadLine``)
        self.in_line = False
        #: no new requests before this time (busy, error, timeout)
        self.backoff_until: float | None = None
        #: when it last entered the swarm's free peers (a counter): their order, so that
        #: ties between holders are broken as a scan of the free peers would
        self.freed_at = 0
        #: may be sent a request now (pipeline not full, not backed off): every Have asks,
        #: so it is kept on the peer, which is at hand, not in a dict of the swarm's
        self.free = False
        #: has held some chunk since it joined: can be offered a chunk
        self.holding = False
        #: in our rack: its chunks are not asked of peers outside it
        self.near = False


def receiving_from(swarms: Iterable[BlobSwarm]) -> int:
    """The peers a node receives from, as its requests tell it: ``serving`` summed over
    its blobs' swarms (a peer serving two blobs counts twice). The daemon and the
    simulator both send it."""
    return sum(swarm.serving for swarm in swarms)


def _freed_at(peer: _Peer) -> int:
    return peer.freed_at


class BlobSwarm:
    """Scheduling state of one blob on node ``node_id``. ``held`` is copied: the swarm keeps
    its own view (``held`` property), updated by ``PieceVerified`` and ``BlobCorrupt``."""

    # Slots, not a __dict__ (past 30 attributes an instance's dict is a table of its own):
    # a driver with a thousand swarms meets each in a cold cache, and what a Have reads is
    # in the first few lines of the object, in the order below
    __slots__ = (
        "_peers", "_count", "_missing", "_rarity", "_queued", "_orphan_since",
        "_orphan_deadline", "_watched_by", "_now", "_acts", "_origin_count", "config",
        "_endgame", "_free_holding", "_urgent", "_rng", "_sourced", "_saturated", "_forced",
        "_book", "_sources", "_freed", "_last_length", "plan", "_holders", "_seq",
        "_backoffs", "_deadlines", "_retries", "_origin", "_origin_queue",
        "_origin_asked", "_first_origin_fetch", "_origin_chunk_seconds",
        "_origin_piece_at", "_members",
        "_self_key", "_chunk_keys", "_helping", "_started", "_fetcher_peers",
        "_self_fetcher", "_self_rank", "_fetch_key", "_fetch_floor", "_in_line", "_lined",
        "_moved", "_serving", "_rack", "_near", "_near_peers", "_import", "_own_weights",
        "_completed_sent", "_liveness", "_all", "blob", "node_id")

    def __init__(self, blob: str, plan: ChunkPlan, node_id: str, held: Bitmap,
                 config: SwarmConfig = SwarmConfig(), rng: random.Random | None = None,
                 liveness: Callable[[str], tuple[float, float]] | None = None,
                 rack: str | None = None):
        count = plan.count
        if held.size != count:
            raise ValueError(f"bitmap of {held.size} chunks for a plan of {count}")
        self.blob = blob
        self.plan = plan
        self.node_id = node_id
        self.config = config
        self._rng = rng if rng is not None else random.Random(0)
        self._liveness = liveness
        self._count = count
        self._last_length = plan.length(count - 1)
        self._all = (1 << count) - 1
        #: our rack label (None: none); the peers of our rack ("near"), how many; the chunks
        #: they hold, which we ask of them only; the chunks we import into the rack (we
        #: outrank each near peer for them)
        self._rack = rack
        self._near_peers = 0
        self._near = 0
        self._import = self._all
        self._own_weights: list[int] | None = None  # per chunk, once a near peer joins
        self._missing = self._all ^ held.to_int()
        self._rarity = Rarity(count)
        self._rarity.wanted = self._missing  # nobody holds anything yet: all orphans
        #: requests plus origin fetches under way, per chunk
        self._sources = [0] * count
        self._sourced = 0  # missing chunks with a source under way
        self._saturated = 0  # chunks with endgame_duplicates sources under way
        self._book = RequestBook(config.pipeline_depth, config.request_timeout_min,
                                 config.assumed_throughput, config.throughput_smoothing)
        #: peers that have held chunks: at two, the book's pipeline depth goes from
        #: pipeline_depth to shared_pipeline_depth
        self._holders = 0
        self._peers: dict[str, _Peer] = {}
        #: the peers that may be sent a request now are those with ``free`` set; the order
        #: they became free in is counted here (``_Peer.freed_at``)
        self._freed = 0
        #: the free peers that have held some chunk since they joined (``holding``): where a
        #: chunk that needs a peer is offered, usually far fewer than the peers (with full
        #: membership every node joins, but only neighbours send Haves, and a busy answer
        #: backs most holders off)
        self._free_holding: dict[str, _Peer] = {}
        self._members: dict[str, _Peer] = {}
        self._self_key = node_bytes(node_id)
        self._chunk_keys: dict[int, int] = {}
        #: the members among the origin fetchers (all members with origin_fetchers 0), in
        #: the order they became fetchers; whether we are one; and, once the fetchers are
        #: as many as origin_fetchers, the lowest rank among them (a member ranking below
        #: it joins as a non-fetcher at the cost of one comparison)
        self._fetcher_peers: dict[str, _Peer] = {}
        #: the peers whose line our requests wait in, and the chunks moved out of a line
        #: once already (not again: with every sender's slots taken, each request would
        #: move from line to line, a dozen requests and cancels per chunk)
        self._in_line: dict[str, _Peer] = {}
        self._moved = 0
        #: the chunks asked of peers when they put us in line: a superset of those waiting
        #: in lines now (a lined peer gets no new requests; what closed since is dropped
        #: when ``_move_from_line`` meets it), so that a free peer finds one without an OR
        #: over every lined peer's requests
        self._lined = 0
        #: peers with our requests outstanding that have not put us in line: the ones
        #: serving us, or about to (``serving``)
        self._serving = 0
        self._self_fetcher = True
        self._fetch_key = fetcher_key(blob)
        self._self_rank = (xxh3_64_intdigest(self._self_key, self._fetch_key), node_id)
        self._fetch_floor = self._self_rank if config.origin_fetchers == 1 else None
        self._urgent = 0
        self._forced = 0  # chunks to take from the origin only (after BlobCorrupt)
        self._helping = 0  # orphans queued or fetched for the origin as help
        self._origin = 0  # chunks being fetched from the origin
        self._origin_count = 0
        self._queued = 0  # chunks queued for the origin
        self._origin_queue: list[tuple[int, int, int]] = []  # (priority, seq, index)
        # per chunk, None when not set: lists, not dicts, since a Have of a waiting orphan
        # clears all three (at a start, every node's every chunk)
        #: since when we need the orphan
        self._orphan_since: list[float | None] = [None] * count
        #: until when we wait for the node outranking us
        self._orphan_deadline: list[float | None] = [None] * count
        self._deadlines: list[tuple[float, int]] = []
        #: the outranking node we wait for
        self._watched_by: list[str | None] = [None] * count
        self._retries: list[tuple[float, int]] = []  # origin fetches to try again
        self._backoffs: list[tuple[float, int, str]] = []
        self._seq = 0
        #: how long our own origin chunks take (EWMA, from FetchFromOrigin to the piece),
        #: and when our first one was asked for: the pace a responsible node is judged by
        self._origin_chunk_seconds: float | None = None
        self._first_origin_fetch: float | None = None
        #: when our last origin piece came in (None: none yet)
        self._origin_piece_at: float | None = None
        self._origin_asked: dict[int, float] = {}
        self._started = False
        self._endgame = False
        self._completed_sent = False
        self._now = 0.0
        self._acts: list = []

    # -- the entry point --------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Action]:
        """Apply ``event``, which happened at ``now``; return what to do, in order.

        Raises ProtocolError for a peer's event that does not fit the blob (a bitmap of the
        wrong size, a chunk index out of range), ValueError for a bad local event."""
        kind = type(event)
        if kind is PeerHave:  # most events by far: counted here, without a call
            peer = self._peers.get(event.peer)
            index = event.index
            if peer is None or not 0 <= index < self._count:
                self._now = now
                self._acts = acts = []
                self._on_have(event)  # a peer not joined, or a bad index: its errors
            else:
                peer.heard = peer.progressed = now
                bit = 1 << index
                bits = peer.bits
                if bits & bit:
                    return []
                if not bits:
                    self._now_holding(peer)
                peer.bits = bits | bit
                if peer.near:
                    self._near |= bit
                rarity = self._rarity
                if not self._missing & bit:  # held: only the count matters
                    rarity.avail[index] += 1
                    return []
                if rarity.wanted & bit:
                    if not rarity.pickable & bit:
                        self._not_orphan(index)
                    rarity.inc_wanted(index, bit)
                else:
                    rarity.avail[index] += 1  # in flight: not in a bucket
                if not peer.free:
                    # nothing to ask it for now; and a Have changes neither the origin
                    # queue nor the wanted chunks, so the checks below would find nothing
                    return []
                self._now = now
                self._acts = acts = []
                self._fill(peer)
        elif kind is PeerAlive:  # only its liveness changes: no actions
            peer = self._peers.get(event.peer)
            if peer is not None:
                peer.heard = now
                if event.progressed:
                    peer.progressed = now
            return []
        else:
            self._now = now
            self._acts = acts = []
            handler = _HANDLERS.get(kind)
            if handler is None:
                raise TypeError(f"not a swarm event: {event!r}")
            sourced = self._sourced
            handler(self, event)
            if sourced and not self._sourced and self._near_peers and self._missing:
                self._fill_far()
        if self._queued and self._origin_count < self.config.max_origin_in_flight:
            self._pump_origin()
        if self._missing and not self._rarity.wanted:
            if not self._endgame:
                self._endgame = True
                # a free peer holding nothing has nothing to duplicate: skip it, the
                # others in the order of the free peers
                for peer in sorted(self._free_holding.values(), key=_freed_at):
                    self._fill(peer)
        elif self._endgame:
            self._endgame = False
        return acts

    # -- views for the driver ---------------------------------------------------------------

    @property
    def chunk_count(self) -> int:
        return self._count

    @property
    def held(self) -> Bitmap:
        return Bitmap.from_int(self._count, ((1 << self._count) - 1) ^ self._missing)

    def holds(self, index: int) -> bool:
        return not (self._missing >> index) & 1

    @property
    def serving(self) -> int:
        """How many peers are sending us chunks of this blob now, as far as we know: those
        with requests of ours outstanding that have not put us in their line. A node
        tells it with its requests (summed over its blobs) so that a sender with a line
        gives its next free slot to the requester receiving least."""
        return self._serving

    @property
    def missing_count(self) -> int:
        return self._missing.bit_count()

    @property
    def complete(self) -> bool:
        return not self._missing

    @property
    def in_endgame(self) -> bool:
        return self._endgame

    @property
    def origin_in_flight(self) -> int:
        return self._origin_count

    def snapshot(self) -> dict[str, int]:
        """Counts of the swarm's state, for status and for studies of where a pull waits:
        chunks missing, pickable (wanted and held by a peer: a request could go out now),
        requested from peers, fetched from and queued for the origin, and free peers."""
        rarity = self._rarity
        return {"missing": self._missing.bit_count(), "pickable": rarity.pickable.bit_count(),
                "requested": len(self._book), "origin": self._origin_count,
                "origin_queued": self._queued.bit_count(),
                "free_peers": sum(peer.free for peer in self._peers.values())}

    def origin_work(self) -> tuple[int, int]:
        """(chunks this node fetches or has queued for the origin, chunks the origin still
        has to send to the swarm as far as we know: those and every chunk we miss that no
        peer holds)."""
        mine = self._queued | self._origin
        return mine.bit_count(), (mine | self._rarity.orphans).bit_count()

    def origin_needed(self, index: int) -> bool:
        """Whether chunk ``index``, handed to the driver for the origin, is still to be
        fetched there: we miss it, and no peer holds it or it must come from the origin.
        A driver that queues origin chunks asks before each; for a chunk not needed, it
        reports ``OriginDropped``."""
        bit = 1 << index
        return bool(self._missing & bit) and bool(self._forced & bit or
                                                   not self._rarity.avail[index])

    def accepts_piece(self, peer: str, index: int) -> bool:
        """Whether a piece of ``index`` from ``peer`` may be written and then reported
        verified: we still miss it, the peer said it holds it, and it is not a chunk that
        must come from the origin (after BlobCorrupt). A piece whose request expired or
        was cancelled is still taken; a peer cannot push chunks it never announced."""
        if not 0 <= index < self._count:
            return False
        bit = 1 << index
        holder = self._peers.get(peer)
        return bool(self._missing & bit) and not self._forced & bit and \
            holder is not None and bool(holder.bits & bit)

    @property
    def fetching_from_origin(self) -> list[int]:
        """The chunks whose origin fetch is under way."""
        return set_bits(self._origin)

    @property
    def book(self) -> RequestBook:
        """The request book (read it; change it only through events)."""
        return self._book

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(self._peers)

    @property
    def peer_count(self) -> int:
        return len(self._peers)

    def peer_bitmap(self, peer: str) -> Bitmap | None:
        state = self._peers.get(peer)
        return None if state is None else Bitmap.from_int(self._count, state.bits)

    def availability(self, index: int) -> int:
        """How many live peers hold chunk ``index``."""
        return self._rarity.avail[index]

    def next_deadline(self) -> float | None:
        """The earliest time a ``Tick`` has something to do (possibly early), or None."""
        times = [self._book.next_expiry()]
        deadlines = self._deadlines
        while deadlines and self._orphan_deadline[deadlines[0][1]] != deadlines[0][0]:
            heapq.heappop(deadlines)
        if deadlines:
            times.append(deadlines[0][0])
        if self._retries:
            times.append(self._retries[0][0])
        if self._backoffs:
            times.append(self._backoffs[0][0])
        times = [t for t in times if t is not None]
        return min(times) if times else None

    # -- events -----------------------------------------------------------------------------

    def _check_index(self, index: int, error: type[Exception] = ProtocolError) -> None:
        if not 0 <= index < self._count:
            raise error(f"chunk {index} outside 0..{self._count - 1} of {self.blob}")

    def _add_peer(self, name: str, bits: int) -> _Peer:
        now = self._now
        peer = self._peers[name] = _Peer(name, now)
        if bits != self._all:
            peer.member = True
            self._members[name] = peer
            self._place_fetcher(peer)
            if self._queued:
                self._outranked_by(peer)
        if self._book.has_capacity(name):
            self._set_free(peer)
        return peer

    def _on_joined(self, event: PeerJoined) -> None:
        name = event.peer
        if name == self.node_id or self._book.is_banned(name):
            return
        if event.bitmap.size != self._count:
            raise ProtocolError(f"{name} sent a bitmap of {event.bitmap.size} chunks for "
                                f"{self.blob}, which has {self._count}")
        bits = event.bitmap.to_int()
        peer = self._peers.get(name)
        if peer is None:
            peer = self._add_peer(name, bits)
            if self._rack is not None and event.rack == self._rack:
                self._add_near(peer)
            if not bits:
                return  # nothing to count, nothing to ask it for (a start: N^2 of these)
            self._add_bits(peer, bits)
        else:
            peer.heard = self._now
            lost = peer.bits & ~bits
            if lost:
                self._remove_bits(peer, lost)
            gained = bits & ~peer.bits
            if gained:
                self._add_bits(peer, gained)
        self._fill(peer)

    def _on_left(self, event: PeerLeft) -> None:
        peer = self._peers.pop(event.peer, None)
        if peer is not None:
            self._forget(peer)

    def _on_have(self, event: PeerHave) -> None:
        """A Have ``handle`` could not count (it counts all others): a chunk index out of
        range is the peer's error; a peer not joined, or gone, is ignored (a late Have must
        not bring it back)."""
        if not 0 <= event.index < self._count:
            self._check_index(event.index)

    def _on_verified(self, event: PieceVerified) -> None:
        name, index = event.peer, event.index
        self._check_index(index, ValueError)
        bit = 1 << index
        peer = None
        if name is None:
            if self._origin & bit:
                self._origin ^= bit
                self._origin_count -= 1
                self._drop_source(index)
            asked = self._origin_asked.pop(index, None)
            self._origin_piece_at = self._now
            if asked is not None:
                sample = self._now - asked
                previous = self._origin_chunk_seconds
                self._origin_chunk_seconds = sample if previous is None else \
                    previous + ORIGIN_PACE_SMOOTHING * (sample - previous)
        else:
            peer = self._peers.get(name)
            if peer is not None:
                peer.heard = peer.progressed = self._now
                if self._book.complete(name, index, event.nbytes, self._now) is not None and \
                        self._release(peer, index) and self._forced & bit:
                    self._queue_origin(index)
                if not peer.bits & bit:  # it had it without telling us
                    if not peer.bits:
                        self._now_holding(peer)
                    peer.bits |= bit
                    if peer.near:
                        self._near |= bit
                    self._rarity.inc(index)
            if self._forced & bit:  # we want this one from the origin only
                if peer is not None:
                    self._fill(peer)
                return
        if self._missing & bit:
            self._hold(index)
        if peer is not None:
            self._fill(peer)

    def _on_failed(self, event: PieceFailed) -> None:
        name, index, reason = event.peer, event.index, event.reason
        if reason not in FAILURE_REASONS:
            raise ValueError(f"unknown failure reason {reason!r}")
        self._check_index(index, ValueError)
        if reason == "corrupt":
            self._ban(name, "corrupt")
            return
        peer = self._peers.get(name)
        if peer is None:
            return
        peer.heard = self._now
        bit = 1 << index
        if reason == "rejected" and peer.bits & bit:
            peer.bits ^= bit  # it does not serve that chunk: stop counting it as a holder
            if peer.near:
                self._count_near(imports=False)
            if not self._rarity.dec(index) and self._rarity.wanted & bit:
                self._orphaned(index)
        if reason in ("busy", "error"):
            self._back_off(peer)
        if self._book.has(name, index):
            self._book.fail(name, index)
            if self._release(peer, index):
                self._unsourced(index)
        self._fill(peer)

    def _on_origin_failed(self, event: OriginFailed) -> None:
        index = event.index
        self._check_index(index, ValueError)
        bit = 1 << index
        if not self._origin & bit:
            return
        self._origin ^= bit
        self._origin_count -= 1
        self._origin_asked.pop(index, None)
        if not self._drop_source(index):
            return
        if self._forced & bit or not self._rarity.avail[index]:
            if not self._forced & bit:
                self._rarity.want(index)
                if self._orphan_since[index] is None:
                    self._orphan_since[index] = self._now
            heapq.heappush(self._retries, (self._now + self.config.origin_wait_limit, index))
        else:
            self._unsourced(index)

    def _on_tick(self, event: Tick) -> None:
        now = self._now
        if not self._started:
            self._started = True
            self._check_orphans(set_bits(self._rarity.orphans))
        for request in self._book.expired(now):
            self._acts.append(SendCancel(request.peer, request.index))
            peer = self._peers.get(request.peer)
            if peer is not None:
                self._back_off(peer)
                unsourced = self._release(peer, request.index)
            else:
                unsourced = self._drop_source(request.index)
            if unsourced:
                self._unsourced(request.index)
        deadlines = self._deadlines
        stale = 0
        due = []
        while deadlines and deadlines[0][0] <= now:
            when, index = heapq.heappop(deadlines)
            if self._orphan_deadline[index] == when:
                self._orphan_deadline[index] = None
                if self._waiting(index):
                    due.append(index)
            else:
                stale += 1
                if stale * DEADLINE_REBUILD_RATIO >= self._count + len(deadlines):
                    deadlines = self._rebuild_deadlines()
                    stale = 0
        if due:
            # decided together: the nodes' liveness is looked up once for all of them (a
            # node outside the fetchers waits on a fetcher for most of its chunks, and
            # each wait runs out about every origin_wait_limit)
            self._check_orphans(due)
        retries = self._retries
        while retries and retries[0][0] <= now:
            index = heapq.heappop(retries)[1]
            bit = 1 << index
            if self._missing & bit and not (self._sourced | self._queued) & bit and \
                    (self._forced & bit or (self._rarity.orphans & bit)):
                self._queue_origin(index)
        backoffs = self._backoffs
        while backoffs and backoffs[0][0] <= now:
            name = heapq.heappop(backoffs)[2]
            peer = self._peers.get(name)
            if peer is not None and peer.backoff_until is not None and \
                    peer.backoff_until <= now:
                peer.backoff_until = None
                if self._book.has_capacity(name):
                    self._set_free(peer)
                    self._fill(peer)
        if self._started and self.config.origin_help_in_flight:
            self._help_origin()

    def _help_origin(self) -> None:
        """Origin help (``SwarmConfig.origin_help_in_flight``), decided on each Tick: with
        none of our own origin chunks left, take the highest orphans we rank second for,
        each with at least origin_help_margin of its first node's orphans below it. A node
        fetches its share in ascending order, so these are the ones it reaches last, and
        the chunks it has under way are not among them."""
        config = self.config
        if not self._self_fetcher or len(self._members) > config.origin_help_members:
            return
        taken = self._queued | self._origin
        helping = self._helping & taken
        self._helping = helping
        if taken ^ helping:
            return  # our own share first
        free = config.origin_help_in_flight - helping.bit_count()
        if free <= 0:
            return
        stall = self._stall_limit()
        me, self_key = self.node_id, self._self_key
        members = list(self._fetcher_peers.items())
        below: dict[str, int] = {}  # per first node: its orphans seen so far
        chosen = []
        for index in set_bits(self._rarity.orphans):
            key = self._chunk_key(index)
            mine = xxh3_64_intdigest(self_key, key)
            first, top, outranking = None, (mine, me), 0
            for name, peer in members:
                rank = (xxh3_64_intdigest(peer.key, key), name)
                if rank > (mine, me):
                    outranking += 1
                    if rank > top:
                        first, top = peer, rank
            if first is None:
                continue
            ahead = below.get(first.name, 0)
            below[first.name] = ahead + 1
            if outranking == 1 and ahead >= config.origin_help_margin and \
                    not taken >> index & 1 and self._alive_until(first, stall) > self._now:
                chosen.append(index)
        for index in reversed(chosen[-free:]):
            helping |= 1 << index
            self._queue_origin(index)
        self._helping = helping

    def _alive_until(self, peer: _Peer, stall: float) -> float:
        """Until when ``peer`` counts as live: origin_wait_limit after we last heard from it,
        and ``stall`` after it last showed progress (what our events and the driver's
        ``liveness`` say, whichever is later)."""
        heard, progressed = peer.heard, peer.progressed
        if self._liveness is not None:
            known_heard, known_progressed = self._liveness(peer.name)
            if known_heard > heard:
                heard = known_heard
            if known_progressed > progressed:
                progressed = known_progressed
        return min(heard + self.config.origin_wait_limit, progressed + stall)

    def _on_line(self, event: UploadLine) -> None:
        peer = self._peers.get(event.peer)
        if peer is None or peer.in_line == event.waiting:
            return
        peer.in_line = event.waiting
        if peer.requested:
            self._serving += -1 if event.waiting else 1
        if event.waiting:
            self._in_line[peer.name] = peer
            self._lined |= peer.requested
            if peer.free:
                peer.free = False
                self._free_holding.pop(peer.name, None)
        else:
            del self._in_line[peer.name]
            if peer.backoff_until is None and self._book.has_capacity(peer.name):
                self._set_free(peer)
                self._fill(peer)

    def _on_urgent(self, event: Urgent) -> None:
        mask = 0
        for index in event.indexes:
            self._check_index(index, ValueError)
            mask |= 1 << index
        mask &= self._missing
        self._urgent |= mask
        for index in set_bits(mask & self._queued):  # to the front of the origin queue
            self._seq += 1
            heapq.heappush(self._origin_queue, (0, self._seq, index))

    def _on_corrupt(self, event: BlobCorrupt) -> None:
        freed = []
        for index in sorted(event.peer_chunks):
            self._check_index(index, ValueError)
            bit = 1 << index
            self._missing |= bit
            self._forced |= bit
            self._rarity.unwant(index)
            self._not_orphan(index)
            for name in self._book.peers_for(index):  # only if it was not held after all
                self._book.cancel(name, index)
                self._acts.append(SendCancel(name, index))
                peer = self._peers.get(name)
                if peer is not None:
                    self._release(peer, index)
                    freed.append(peer)
            count = self._sources[index]
            if count:  # an origin fetch still under way since we got it elsewhere
                self._sourced |= bit
                if count >= self.config.endgame_duplicates:
                    self._saturated |= bit
            else:
                self._queue_origin(index)
        if event.peer_chunks:
            self._completed_sent = False
        for peer in freed:
            self._fill(peer)

    # -- peers ------------------------------------------------------------------------------

    def _add_bits(self, peer: _Peer, bits: int) -> None:
        if bits and not peer.bits:
            self._now_holding(peer)
        peer.bits |= bits
        if peer.near:
            self._near |= bits
        rarity = self._rarity
        newly = bits & rarity.wanted & ~rarity.pickable
        rarity.add_holder(bits)
        if newly:
            for index in set_bits(newly):
                self._not_orphan(index)

    def _remove_bits(self, peer: _Peer, bits: int) -> None:
        peer.bits &= ~bits
        if peer.near:
            self._count_near(imports=False)
        for index in set_bits(self._rarity.remove_holder(bits)):
            self._orphaned(index)

    def _forget(self, peer: _Peer) -> None:
        """``peer`` is gone (left or banned): its requests go elsewhere, its chunks no longer
        count, and orphans waiting on it are decided again."""
        name = peer.name
        self._free_holding.pop(name, None)
        self._in_line.pop(name, None)
        if peer.requested and not peer.in_line:
            self._serving -= 1
        peer.in_line = False
        if peer.holding:
            self._holders -= 1  # a peer that comes back is not a second one
        peer.free = peer.holding = False
        promoted = False
        if peer.member:
            del self._members[name]
            if peer.fetcher:
                promoted = self._replace_fetcher(peer)
        dropped = self._book.drop_peer(name)
        bits, peer.bits, peer.requested = peer.bits, 0, 0
        if peer.near:
            self._near_peers -= 1
            self._count_near()
        orphaned = self._rarity.remove_holder(bits)
        for request in dropped:
            if self._drop_source(request.index):
                self._unsourced(request.index)
        for index in set_bits(orphaned):
            self._orphaned(index)
        self._decide_again(name)
        if promoted is not False:
            self._promoted(promoted)

    def _add_near(self, peer: _Peer) -> None:
        """``peer``, just joined, is in our rack: the chunks it outranks us for are its to
        import, not ours (O(chunks) hashes, once per near peer)."""
        peer.near = True
        self._near_peers += 1
        self._import &= ~self._imported_by(peer)

    def _imported_by(self, peer: _Peer) -> int:
        """The chunks ``peer`` outranks us for by rendezvous weight (ties: the greater
        name), which it imports into our rack rather than we."""
        chunk_keys = [self._chunk_key(index) for index in range(self._count)]
        ours = self._own_weights
        if ours is None:
            ours = self._own_weights = [xxh3_64_intdigest(self._self_key, chunk)
                                        for chunk in chunk_keys]
        key, later = peer.key, peer.name > self.node_id
        imported = 0
        for index, chunk in enumerate(chunk_keys):
            theirs = xxh3_64_intdigest(key, chunk)
            if theirs > ours[index] or (theirs == ours[index] and later):
                imported |= 1 << index
        return imported

    def _fill_far(self) -> None:
        """Nothing is coming in any more: the free peers of other racks may be asked for
        chunks our rack lacks that are not ours to import (our rack mates may be slow with
        them), as ``_fill`` allows while nothing is sourced."""
        for peer in sorted(self._free_holding.values(), key=_freed_at):
            if not peer.near:
                self._fill(peer)

    def _count_near(self, imports: bool = True) -> None:
        """``_near`` anew, after a near peer lost chunks or left (rare), and ``_import``
        too after one left (O(near peers x chunks) hashes)."""
        near = 0
        imported = self._all
        for peer in self._peers.values():
            if peer.near:
                near |= peer.bits
                if imports:
                    imported &= ~self._imported_by(peer)
        self._near = near
        if imports:
            self._import = imported

    def _decide_again(self, name: str) -> None:
        """The orphans we wait on ``name`` for are decided again (it left or stopped being
        a fetcher). A scan of every chunk, rare, rather than a set per watched node kept up
        to date by every Have of an orphan."""
        watched_by = self._watched_by
        for index in [index for index, watched in enumerate(watched_by) if watched == name]:
            watched_by[index] = None
            if self._waiting(index):
                self._check_orphan(index)

    def _ban(self, name: str, reason: str) -> None:
        if self._book.is_banned(name) or name == self.node_id:
            return
        self._acts.append(BanPeer(name, reason))
        peer = self._peers.pop(name, None)
        if peer is not None:
            self._forget(peer)
        self._book.ban(name, reason)

    def _now_holding(self, peer: _Peer) -> None:
        """``peer`` announced its first chunk since it joined."""
        if not peer.holding:
            self._holders += 1
            if self._holders == 2:
                self._narrow_pipelines()
        peer.holding = True
        if peer.free:
            self._free_holding[peer.name] = peer

    def _narrow_pipelines(self) -> None:
        """A second peer holds chunks: from now on each peer gets shared_pipeline_depth
        requests (the swarm's depth never widens again; a peer leaving is rare)."""
        book = self._book
        depth = min(self.config.pipeline_depth, self.config.shared_pipeline_depth)
        if depth == book.pipeline_depth:
            return
        book.pipeline_depth = depth
        outstanding = book.outstanding
        for name, peer in self._peers.items():
            if peer.free and outstanding(name) >= depth:
                peer.free = False
                self._free_holding.pop(name, None)

    def _set_free(self, peer: _Peer) -> None:
        if not peer.free and not peer.in_line:
            name = peer.name
            peer.free = True
            self._freed += 1
            peer.freed_at = self._freed
            if peer.holding:
                self._free_holding[name] = peer

    def _back_off(self, peer: _Peer) -> None:
        until = self._now + self.config.peer_backoff
        peer.backoff_until = until
        if peer.free:
            peer.free = False
            self._free_holding.pop(peer.name, None)
        self._seq += 1
        heapq.heappush(self._backoffs, (until, self._seq, peer.name))

    # -- requests ---------------------------------------------------------------------------

    def _fill(self, peer: _Peer) -> None:
        """Give ``peer`` requests while it has free pipeline slots and chunks we want."""
        rarity = self._rarity
        # a peer of another rack is asked for nothing our rack holds, in any of the ways
        far = self._near_peers > 0 and not peer.near
        while peer.free:
            candidates = peer.bits & rarity.pickable
            if far:
                lacking = candidates & ~self._near  # not in our rack yet
                ours = lacking & self._import
                candidates = ours if ours or self._sourced else lacking
            if candidates:
                index = pick(candidates, rarity, self._urgent, self._rng)
            elif self._lined and self._move_from_line(peer, far):
                continue
            elif self._missing and not rarity.wanted:  # endgame
                candidates = peer.bits & self._sourced & ~self._saturated & \
                    ~peer.requested & ~self._forced
                if far:
                    candidates &= ~self._near
                if not candidates:
                    return
                index = pick_duplicate(candidates, self._sources, self._urgent, self._rng)
            else:
                return
            self._request(peer, index)

    def _move_from_line(self, peer: _Peer, far: bool) -> bool:
        """Free ``peer`` has nothing we want that is not asked for: if it holds a chunk
        whose requests all wait in lines, ask it instead and cancel those. True if so.
        ``far``: it is in another rack, and may take no chunk our rack holds."""
        candidates = peer.bits & self._lined & ~peer.requested & ~self._forced & ~self._moved
        if far:
            candidates &= ~self._near
        book, peers = self._book, self._peers
        while candidates:
            low = candidates & -candidates
            candidates ^= low
            index = low.bit_length() - 1
            asked = book.peers_for(index)
            if asked and all(peers[name].in_line for name in asked):
                break
            self._lined ^= low  # no longer waiting, or under way elsewhere as well
        else:
            return False
        for name in asked:
            book.cancel(name, index)
            self._acts.append(SendCancel(name, index))
            self._release(peers[name], index)  # stays not free: it is in line
        self._lined ^= low
        self._moved |= low
        self._request(peer, index)
        return True

    def _request(self, peer: _Peer, index: int) -> None:
        name = peer.name
        book = self._book
        book.add(name, index, self._now,
                 self._last_length if index == self._count - 1 else self.plan.chunk_size)
        if not peer.requested and not peer.in_line:
            self._serving += 1
        peer.requested |= 1 << index
        if book.outstanding(name) >= book.pipeline_depth:
            peer.free = False
            self._free_holding.pop(name, None)
        self._add_source(index)
        self._acts.append(SendRequest(name, index))

    def _offer(self, index: int) -> None:
        """Chunk ``index`` needs a peer: ask the best-scoring free peer that holds it (ties:
        the one free the longest, as a scan of the free peers would meet them)."""
        bit = 1 << index
        best, best_score = None, -1.0
        score = self._book.score
        for name, peer in self._free_holding.items():
            if peer.bits & bit:
                value = score(name)
                if value > best_score or (value == best_score and
                                          peer.freed_at < best.freed_at):
                    best, best_score = peer, value
        if best is not None:
            self._request(best, index)

    def _release(self, peer: _Peer, index: int) -> bool:
        """A request to ``peer`` for ``index`` closed; True if the chunk, still missing, has
        no source left."""
        bit = 1 << index
        if peer.requested & bit:
            peer.requested ^= bit
            if not peer.requested and not peer.in_line:
                self._serving -= 1
        book = self._book
        if peer.backoff_until is None and book.outstanding(peer.name) < book.pipeline_depth:
            self._set_free(peer)
        return self._drop_source(index)

    def _add_source(self, index: int) -> None:
        count = self._sources[index] + 1
        self._sources[index] = count
        bit = 1 << index
        if count == 1:
            self._rarity.unwant(index)
            self._sourced |= bit
        if count >= self.config.endgame_duplicates:
            self._saturated |= bit

    def _drop_source(self, index: int) -> bool:
        count = self._sources[index] - 1
        self._sources[index] = count
        bit = 1 << index
        if count < self.config.endgame_duplicates:
            self._saturated &= ~bit
        if count == 0:
            self._sourced &= ~bit
            return bool(self._missing & bit)
        return False

    def _unsourced(self, index: int) -> None:
        """Missing chunk ``index`` lost its last source: find it another."""
        if self._forced & (1 << index):
            self._queue_origin(index)
            return
        self._rarity.want(index)
        if self._rarity.avail[index]:
            self._offer(index)
        else:
            self._orphaned(index)

    def _hold(self, index: int) -> None:
        bit = 1 << index
        self._missing ^= bit
        if self._origin & bit:
            # a peer was faster than the origin: the driver reads past the rest of that
            # range and reports nothing more for this chunk
            self._origin ^= bit
            self._origin_count -= 1
            self._origin_asked.pop(index, None)
            self._drop_source(index)
        self._rarity.unwant(index)
        self._not_orphan(index)
        self._forced &= ~bit
        self._urgent &= ~bit
        self._queued &= ~bit
        self._moved &= ~bit
        self._lined &= ~bit
        acts = self._acts
        acts.append(AnnounceHave(index))
        cancelled = []
        for name in self._book.peers_for(index):
            self._book.cancel(name, index)
            acts.append(SendCancel(name, index))
            peer = self._peers.get(name)
            if peer is not None:
                self._release(peer, index)
                cancelled.append(peer)
        self._sourced &= ~bit
        self._saturated &= ~bit
        if not self._missing and not self._completed_sent:
            self._completed_sent = True
            acts.append(Completed())
        for peer in cancelled:
            self._fill(peer)

    # -- the origin -------------------------------------------------------------------------

    def _chunk_key(self, index: int) -> int:
        key = self._chunk_keys.get(index)
        if key is None:
            key = self._chunk_keys[index] = chunk_key(self.blob, index)
        return key

    def _waiting(self, index: int) -> bool:
        """True if ``index`` is an orphan we are waiting for (not queued for the origin)."""
        bit = 1 << index
        return bool(self._rarity.orphans & bit) and not self._queued & bit

    def _orphaned(self, index: int) -> None:
        """Wanted chunk ``index`` has no holder any more."""
        if self._started:
            if self._orphan_since[index] is None:
                self._orphan_since[index] = self._now
            self._check_orphan(index)

    def _not_orphan(self, index: int) -> None:
        """``index`` is held by a peer, or by us: stop waiting for or queueing it."""
        self._orphan_since[index] = self._orphan_deadline[index] = \
            self._watched_by[index] = None
        bit = 1 << index
        if self._queued & bit:  # rarely: no need to build ~bit
            self._queued ^= bit

    def _check_orphan(self, index: int) -> None:
        """Fetch orphan ``index`` from the origin now, or wait for a live node outranking us
        (rendezvous weight) until it has been silent for ``origin_wait_limit`` or without
        progress for ``origin_stall_limit``."""
        self._check_orphans((index,))

    def _check_orphans(self, indexes: Iterable[int]) -> None:
        """``_check_orphan`` of each of ``indexes`` in turn: the first Tick checks every
        chunk, and what the checks share (the members, how long each stays live) does not
        change between them."""
        now = self._now
        orphan_since = self._orphan_since
        limit = self.config.origin_wait_limit
        stall = self._stall_limit()
        self_key = self._self_key
        me = self.node_id
        self_fetcher = self._self_fetcher
        fetchers = self._fetcher_peers.values()
        members = self._members.values()
        alive_until: dict[str, float] = {}
        for index in indexes:
            since = orphan_since[index]
            if since is None:
                since = orphan_since[index] = now
            key = self._chunk_key(index)
            mine = None
            # the first live member outranking us: a fetcher, only the fetchers, in the
            # order they became fetchers (a few in: each outranks us with probability about
            # 1/2, 1/3, ...); not a fetcher, any fetcher, and only if all are gone the other
            # members by weight (the fetchers met again there are gone: skipped below)
            for peer in (fetchers if self_fetcher else chain(fetchers, members)):
                name = peer.name
                if peer.fetcher is self_fetcher:
                    if mine is None:
                        mine = xxh3_64_intdigest(self_key, key)
                    theirs = xxh3_64_intdigest(peer.key, key)
                    if theirs < mine:
                        continue
                    if theirs == mine and name < me:
                        continue  # a tie of weights goes to the greater name: ours
                alive = alive_until.get(name)
                if alive is None:
                    alive = alive_until[name] = self._alive_until(peer, stall)
                until = since + limit
                if alive > until:
                    until = alive
                if until > now:
                    self._watch(index, name, until)
                    break
            else:
                self._queue_origin(index)

    def _stall_limit(self) -> float:
        """How long a live member may show no progress before its orphans are fetched by
        others, by what we know of the origin's pace.

        Before we fetch from the origin ourselves: origin_silence_limit in a swarm larger
        than its origin fetchers (there a fetcher that stalls is replaced by the other
        fetchers, which have paces of their own), else origin_stall_limit (in a swarm of
        2 a small blob's one chunk is often the other node's).

        Then at least origin_stall_limit and STALL_PACES times our origin chunks' time (or,
        while some are under way or none came yet, the time since the last came in or the
        first was asked for, if longer); and, up to origin_silence_limit, STALL_PACES times
        that per origin fetcher. The fetchers share the origin: each shows progress about
        once per (fetchers x one chunk's time alone on it), and our own chunks may have
        had it alone (16 MiB at 100 Mbit/s: 1.3 s, then 21 s each with 16 fetchers; at
        10 s a fetcher done with its share took the others for stalled and fetched all
        their chunks)."""
        config = self.config
        if self._first_origin_fetch is None:
            if 0 < config.origin_fetchers <= len(self._members):  # not all nodes fetch
                return config.origin_silence_limit  # at least the stall limit (SwarmConfig)
            return config.origin_stall_limit
        pace = self._origin_chunk_seconds
        if self._origin_count or pace is None:
            since = self._origin_piece_at
            if since is None:
                since = self._first_origin_fetch
            if pace is None or self._now - since > pace:
                pace = self._now - since
        fetchers = len(self._fetcher_peers) + self._self_fetcher
        return max(config.origin_stall_limit, STALL_PACES * pace,
                   min(config.origin_silence_limit, STALL_PACES * fetchers * pace))

    def _rebuild_deadlines(self) -> list[tuple[float, int]]:
        """The deadline heap with only its live entries. A Have of an orphan we wait for
        leaves the orphan's entry behind (at a start, one per chunk in every swarm), and
        popping them one by one costs a heap operation each; the live entries pop in the
        same (time, chunk) order from the rebuilt heap."""
        deadlines = self._deadlines = [(until, index) for index, until
                                       in enumerate(self._orphan_deadline) if until is not None]
        heapq.heapify(deadlines)
        return deadlines

    def _watch(self, index: int, name: str, until: float) -> None:
        self._watched_by[index] = name
        self._orphan_deadline[index] = until
        heapq.heappush(self._deadlines, (until, index))

    def _outranks(self, peer: _Peer, key: int) -> bool:
        """Whether ``peer`` ranks above us for the chunk of ``key``: a fetcher above a
        non-fetcher, else the higher weight (a tie: the greater name)."""
        if peer.fetcher is not self._self_fetcher:
            return peer.fetcher
        mine = xxh3_64_intdigest(self._self_key, key)
        theirs = xxh3_64_intdigest(peer.key, key)
        return theirs > mine or (theirs == mine and peer.name > self.node_id)

    def _outranked_by(self, peer: _Peer) -> None:
        """A new member, or a new fetcher: the chunks queued for the origin that it
        outranks us for are its to fetch now."""
        queued = self._queued & ~self._forced
        if not queued or (self._self_fetcher and not peer.fetcher):
            return
        until = self._now + self.config.origin_wait_limit
        for index in set_bits(queued):
            if self._outranks(peer, self._chunk_key(index)):
                self._queued &= ~(1 << index)
                self._watch(index, peer.name, until)

    def _place_fetcher(self, peer: _Peer) -> None:
        """A new member: one of the origin fetchers if they are fewer than origin_fetchers
        (0: all) or it ranks above the lowest, which then stops being one."""
        peer.rank = rank = (xxh3_64_intdigest(peer.key, self._fetch_key), peer.name)
        floor = self._fetch_floor
        if floor is not None and rank < floor:
            return  # in a large swarm, most members
        peer.fetcher = True
        fetchers = self._fetcher_peers
        fetchers[peer.name] = peer
        limit = self.config.origin_fetchers
        if floor is not None:
            if floor == self._self_rank:
                self._self_fetcher = False
                demoted = None
            else:
                demoted = fetchers.pop(floor[1])
                demoted.fetcher = False
            self._fetch_floor = self._lowest_fetcher_rank()
            self._demoted(demoted)
        elif limit and len(fetchers) + 1 == limit:
            self._fetch_floor = self._lowest_fetcher_rank()

    def _replace_fetcher(self, gone: _Peer) -> _Peer | None | bool:
        """Fetcher ``gone`` left: the member ranking highest outside the fetchers (or we)
        takes its place. Returns that member, None for us, or False if every member was a
        fetcher already."""
        fetchers = self._fetcher_peers
        del fetchers[gone.name]
        gone.fetcher = False
        if self._fetch_floor is None:
            return False
        best: _Peer | None = None
        best_rank = None if self._self_fetcher else self._self_rank
        for peer in self._members.values():
            if not peer.fetcher and (best_rank is None or peer.rank > best_rank):
                best, best_rank = peer, peer.rank
        if best_rank is None:
            self._fetch_floor = None
            return False
        if best is None:
            self._self_fetcher = True
        else:
            best.fetcher = True
            fetchers[best.name] = best
        self._fetch_floor = self._lowest_fetcher_rank()
        return best

    def _lowest_fetcher_rank(self) -> tuple[int, str]:
        ranks = [peer.rank for peer in self._fetcher_peers.values()]
        if self._self_fetcher:
            ranks.append(self._self_rank)
        return min(ranks)

    def _demoted(self, peer: _Peer | None) -> None:
        """``peer`` (None: we) stopped being an origin fetcher."""
        if not self._started:
            return  # the first Tick decides every orphan
        if peer is None:
            self._decide_all_again()
        else:
            self._decide_again(peer.name)

    def _promoted(self, peer: _Peer | None) -> None:
        """``peer`` (None: we) became an origin fetcher in place of one that left."""
        if not self._started:
            return
        if peer is None:
            self._decide_all_again()
        elif self._queued:
            self._outranked_by(peer)

    def _decide_all_again(self) -> None:
        """We became or stopped being a fetcher: every orphan waited for or queued (but
        not forced to the origin) is decided again."""
        self._queued &= self._forced
        self._check_orphans(set_bits(self._rarity.orphans & ~self._queued))

    def _queue_origin(self, index: int) -> None:
        bit = 1 << index
        if self._queued & bit:
            return
        self._queued |= bit
        self._orphan_deadline[index] = self._watched_by[index] = None
        self._seq += 1
        heapq.heappush(self._origin_queue, (0 if self._urgent & bit else 1, self._seq, index))

    def _pump_origin(self) -> None:
        queue = self._origin_queue
        limit = self.config.max_origin_in_flight
        rarity = self._rarity
        while self._origin_count < limit and queue:
            index = heapq.heappop(queue)[2]
            bit = 1 << index
            if not self._queued & bit:
                continue
            self._queued ^= bit
            if not self._missing & bit or (self._sourced | self._origin) & bit:
                continue
            if not self._forced & bit and not rarity.orphans & bit:
                continue  # a peer has it now
            self._orphan_since[index] = None
            self._origin |= bit
            self._origin_count += 1
            self._origin_asked[index] = self._now
            if self._first_origin_fetch is None:
                self._first_origin_fetch = self._now
            self._add_source(index)
            self._acts.append(FetchFromOrigin(index))


#: ``BlobSwarm.handle``'s handler of each event kind but the Have and PeerAlive it handles
#: inline. Kept here, not as a table of bound methods per swarm, because such a table makes
#: every swarm a reference cycle: thousands of swarms (the simulator's) then outlive their
#: last reference until a cyclic collection walks everything the process holds
_HANDLERS: dict[type, Callable[[BlobSwarm, Any], None]] = {
    PeerHave: BlobSwarm._on_have, PieceVerified: BlobSwarm._on_verified,
    PeerJoined: BlobSwarm._on_joined, PeerLeft: BlobSwarm._on_left,
    PieceFailed: BlobSwarm._on_failed, OriginFailed: BlobSwarm._on_origin_failed,
    OriginDropped: BlobSwarm._on_origin_failed,
    Tick: BlobSwarm._on_tick, Urgent: BlobSwarm._on_urgent, BlobCorrupt: BlobSwarm._on_corrupt,
    UploadLine: BlobSwarm._on_line,
}

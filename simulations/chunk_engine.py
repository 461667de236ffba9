"""The chunk-level engine: every node runs the daemon's own ``BlobSwarm`` (one per layer), fed
by a discrete-event loop on virtual time; chunk transfers are flows sharing link capacity
(``network.FlowNetwork``, max-min fair).

What is modelled, as the daemon does it (``p2pull/net/node.py``, ``p2pull/net/fetch.py``):
- A request travels to its peer in rtt/2 and joins that connection's FIFO queue. A connection
  sends one chunk at a time; each chunk takes one of the sender's ``upload_slots``
  (``UploadSlots``, the real class), acquired when it starts and released when it ends; a
  request that finds no slot waits in the sender's line until one frees (``nodes.when_busy
  = "queue"``, the daemon's default; a freed slot goes to the requester that receives from
  the fewest peers, as its requests said), and the requester's swarms hear so
  (``UploadLine``, the daemon's Line notice, rtt/2 later; and again when the slot is
  theirs), or with ``"answer"`` is answered ``busy`` (the requester backs off). The piece
  arrives rtt/2 after its last byte left. A cancel removes a request still queued.
- Origin fetches (``FetchFromOrigin``) join the node's origin queue, shared by its blobs, in
  the order the swarms decided them; the node's connections each take the next chunk not
  held meanwhile and stream it from the origin link, one chunk after another, as the
  daemon's pool streams a ranged request chunk by chunk. Each chunk pays the origin's
  round trip (the daemon pays it per range of up to 32 MiB). The node keeps, as the
  daemon's pool does, to its part of the origin work left of ``origin.connections`` (the
  daemon's ``origin_max_connections``), at least one, decided at each tick; the daemon's
  pool also starts at 4 and grows while throughput does, which is not modelled.
- A node starting a get tells its linked peers (interest and bitmap, rtt/2 away); they answer
  with theirs. Its first ``Tick`` (the first origin decision) comes when every linked peer
  answered, or after ``bitmap_wait``; then every ``tick`` seconds, as the daemon's ticker.
- ``AnnounceHave`` reaches, rtt/2 later, every linked peer that told us its interest and does
  not hold the whole blob (a complete swarm does nothing with a Have, so skipping it changes
  no decision and saves a third of the events).
- Links: each node's upload and download, the origin's upload, and with racks an uplink per
  rack each way (capacity = the rack's node links / oversubscription); origin traffic enters
  the receiver's rack through its uplink.
- Departures (churn): the node's flows are cut, its peers get ``PeerLeft`` rtt/2 later.

Not modelled: CPU and disk (the lab's bottleneck on 2 cores), TCP slow start and loss, the
origin's per-request latency beyond the round trip, verification failures.

For large N a node links to a bounded random set of ``neighbours`` peers (the daemon links
to every peer it discovers): with N-1 links every Have would cost N-1 events, N^2 x chunks in
all.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import heapq
import math
import random
import time
from collections import deque
from collections.abc import Callable

from p2pull.core.bitmap import Bitmap
from p2pull.core.chunks import ChunkPlan
from p2pull.core.policy import origin_connection_share
from p2pull.core.ratelimit import UploadSlots
from p2pull.core.responsibility import fetchers
from p2pull.core.swarm import (AnnounceHave, BlobSwarm, Completed, FetchFromOrigin, PeerAlive,
                               PeerHave,
                               PeerJoined, PeerLeft, OriginDropped, PieceFailed,
                               PieceVerified, SendCancel, SendRequest, Tick, UploadLine,
                               receiving_from)
from simulations.bound import bound_of
from simulations.network import FlowNetwork
from simulations.scenario import Scenario

# event kinds, in the heap as (time, seq, kind, a, b, c)
_DELIVER = 0       # a: node, b: blob, c: swarm event
_HAVE = 1          # a: sender, b: blob, c: PeerHave
_REQUEST = 2       # a: sender node (serves), b: requester, c: (blob, index)
_CANCEL = 3        # a: sender node, b: requester, c: (blob, index)
_FLOW_DONE = 4     # a: flow, b: version
_ORIGIN = 5        # a: node, b: blob, c: index
_NET = 6
_TICK = 7
_ARRIVE = 8        # a: node
_FIRST_TICK = 9    # a: node
_INTEREST = 10     # a: node told, b: node starting
_DEPART = 11       # a: node
_SAMPLE = 12
_KEEPALIVE = 13
_ORIGIN_HAVE = 14  # a: sender, b: blob, c: PeerHave of a chunk it fetched from the origin

_ORIGIN_FLOW = -1  # the "sender" of an origin flow in its payload
#: a peer's other swarms hear that it is alive at most this often (the daemon's
#: ALIVE_INTERVAL in p2pull/net/node.py: any message on the link counts)
ALIVE_INTERVAL = 0.25
#: the daemon pings every peer this often at most, whatever origin_wait_limit is
#: (``Node._keepalive``: peer_timeout / 3 with the default peer_timeout of 30 s)
KEEPALIVE_MAX = 10.0
#: membership "fetchers": each blob's nodes ranking highest as origin fetchers beyond its
#: origin_fetchers, known to every node as well, so that as many fetchers may leave as in
#: "all" before the nodes' views of who fetches part
FETCHER_SPARES = 16


def node_name(index: int) -> str:
    return f"node-{index:05d}"


def blob_digest(scenario: Scenario, layer: int) -> str:
    return "sha256:" + hashlib.sha256(f"{scenario.name}/{layer}".encode()).hexdigest()


def neighbour_graph(count: int, degree: int, rng: random.Random,
                    racks: list[int] | None = None,
                    same_rack: float | None = None) -> list[list[int]]:
    """Full mesh when ``degree`` is 0 or reaches count-1; else a random symmetric graph in
    which every node has at least ``degree`` peers (links drawn by others add to that: about
    1.3 x ``degree`` on average). With ``same_rack``, a node first fills that share of its
    ``degree`` within its own rack."""
    if degree <= 0 or degree >= count - 1:
        return [[j for j in range(count) if j != i] for i in range(count)]
    links = [set() for _ in range(count)]
    by_rack: dict[int, list[int]] = {}
    if racks is not None and same_rack is not None:
        for i, rack in enumerate(racks):
            by_rack.setdefault(rack, []).append(i)
    for i in range(count):
        mine = links[i]
        if by_rack:
            mates = by_rack[racks[i]]
            local = min(int(round(degree * same_rack)), len(mates) - 1)
            while sum(1 for j in mine if racks[j] == racks[i]) < local:
                j = mates[rng.randrange(len(mates))]
                if j != i:
                    mine.add(j)
                    links[j].add(i)
        while len(mine) < degree:
            j = rng.randrange(count)
            if j != i:
                mine.add(j)
                links[j].add(i)
    return [sorted(linked) for linked in links]


class _Connection:
    """The requests one node queued from one peer, served in order, one chunk at a time."""

    __slots__ = ("queue", "flow", "waiting", "receiving")

    def __init__(self):
        self.queue: deque = deque()
        self.flow = -1  # the flow sending its current chunk, -1 when idle
        self.waiting = False  # in its sender's line for an upload slot (when_busy "queue")
        #: the peers the requester receives from, as its latest request said
        self.receiving = 0


#: the loop reports its progress every this many events (a power of two, minus one)
PROGRESS_EVERY = (1 << 16) - 1


class ChunkEngine:
    """``progress``, if given, is called every ``PROGRESS_EVERY + 1`` events with the
    virtual time, the expected nodes done, those expected, and the chunk transfers so
    far (a run of the 140 GB study takes over half an hour)."""

    def __init__(self, scenario: Scenario, seed: int | None = None,
                 progress: Callable[[float, int, int, int], None] | None = None):
        self.scenario = scenario
        self.seed = scenario.seed if seed is None else seed
        self.bound = bound_of(scenario)
        self.progress = progress

    # -- set-up ---------------------------------------------------------------------------

    def _setup(self) -> None:
        sc = self.scenario
        rng = random.Random(self.seed)
        self.rng = rng
        n = self.n = sc.node_count
        self.names = [node_name(i) for i in range(n)]
        self.ids = {name: i for i, name in enumerate(self.names)}
        self._progress_events = [PeerAlive(name, progressed=True) for name in self.names]
        self.ups, self.downs = sc.node_links()
        self.group_of = [g for g, group in enumerate(sc.groups) for _ in range(group.count)]
        self.rack = [i % sc.racks for i in range(n)]
        #: what each node tells of its rack (None: nothing)
        self.rack_labels = [f"rack-{r}" if sc.rack_labels else None for r in self.rack]
        if sc.uses_peers:
            self.graph = neighbour_graph(n, sc.neighbours, rng, self.rack,
                                         sc.same_rack_neighbours)
            if sc.rack_labels:
                # a swarm imports into its rack only the chunks it outranks its rack mates
                # for, and waits for the others to appear there: it must see all its mates
                # (the daemon, a full mesh, does)
                mates = [range(rack, n, sc.racks) for rack in range(sc.racks)]  # i % racks
                self.graph = [sorted(set(linked).union(mates[self.rack[i]]) - {i})
                              for i, linked in enumerate(self.graph)]
        else:
            self.graph = [[] for _ in range(n)]
        # links: up 0..n-1, down n..2n-1, origin 2n, padding 2n+1, rack out, rack in
        racks = sc.racks
        capacity = self.ups + self.downs + [sc.origin_up, math.inf]
        self.origin_link, self.pad = 2 * n, 2 * n + 1
        self.rack_out = 2 * n + 2
        self.rack_in = self.rack_out + racks
        self.width = 4 if sc.rack_links else 2
        if sc.rack_links:
            for direction in (self.ups, self.downs):
                total = [0.0] * racks
                for i in range(n):
                    total[self.rack[i]] += direction[i]
                capacity += [t / sc.oversubscription for t in total]
        self.net = FlowNetwork(capacity, self.width, initial=max(1024, 4 * n))
        self.blobs = [blob_digest(sc, layer) for layer in range(len(sc.layers))]
        self.plans = [ChunkPlan.for_blob(size, sc.chunk_size_of(size)) for size in sc.layers]
        self.config = sc.swarm_config()
        #: with membership "fetchers", the nodes every node knows besides its neighbours
        #: (and which know every node)
        self.well_known: list[int] = []
        if sc.membership == "fetchers":
            count = self.config.origin_fetchers + FETCHER_SPARES
            self.well_known = sorted({self.ids[name] for digest in self.blobs
                                      for name in fetchers(digest, self.names, count)})
        self._well_known_set = set(self.well_known)
        # Node._keepalive: a quiet peer's Pong must show it alive before an origin wait
        # runs out
        self.keepalive = min(KEEPALIVE_MAX, max(self.config.origin_wait_limit / 2,
                                                ALIVE_INTERVAL))
        self.half_rtt = sc.rtt / 2
        self.origin_half_rtt = sc.origin_rtt / 2
        self.rate_interval = sc.rate_interval or \
            max(1e-6, max(p.chunk_size for p in self.plans) / sorted(self.ups)[n // 2])
        self.time_limit = sc.time_limit or 20 * self.bound.t_min + 60
        self.sample_interval = sc.sample_interval or self.bound.t_min / 100
        # per node
        self.swarms: list[list[BlobSwarm] | None] = [None] * n
        self.present = [False] * n
        #: the peers each node's swarms know (joined): with full membership every node,
        #: else its neighbours
        self.known: list[dict[int, None]] = [{} for _ in range(n)]
        #: the known peers that exchange Haves and chunks with the node: its neighbours
        self.audience: list[list[int]] = [[] for _ in range(n)]
        #: per blob, per node: the swarms (of that blob) of those of its audience still
        #: missing some of the blob, in audience order; a complete swarm does nothing with a
        #: Have, so the Have loop need not ask each receiver whether it is complete. Swarms,
        #: not node numbers: the loop reaches each without going through its node's list
        self.have_audience: list[list[list[BlobSwarm]]] = [
            [[] for _ in range(n)] for _ in range(len(self.blobs))]
        self.graph_sets = [set(linked) for linked in self.graph]
        self.last_progress = [-math.inf] * n
        self.ticking = [False] * n
        #: bitmaps a starting node still waits for before its first Tick (0: not waiting)
        self.awaiting = [0] * n
        self.blobs_left = [len(self.blobs)] * n
        self.slots = [UploadSlots(sc.upload_slots) for _ in range(n)]
        self.queue_when_busy = sc.when_busy == "queue"
        self.origin_queue: list[deque] = [deque() for _ in range(n)]
        self.origin_active = [0] * n
        #: connections each node streams origin chunks over now: its share of
        #: origin.connections, set at each of its ticks
        self.origin_limit = [1] * n
        self.conns: dict[int, _Connection] = {}
        self.node_flows: list[set[int]] = [set() for _ in range(n)]
        self.arrival = [0.0] * n
        self.finish: list[float | None] = [None] * n
        self.aborted = [False] * n
        self.origin_bytes = [0] * n
        self.peer_bytes = [0] * n
        self.pieces = 0
        self.origin_pieces = 0
        self.requests = 0
        self.busy = 0
        self.events = 0
        #: PeerHave events handed to swarms: a transfer's fan-out, most of a run's work
        self.have_deliveries = 0
        self._alive_at: dict[int, float] = {}
        #: per node and blob, its PeerJoined while its holdings stay the same (None: none)
        self._joined: list[list[PeerJoined | None]] = [[None] * len(self.blobs)
                                                       for _ in range(n)]
        # what the pings tell, per node rather than per swarm and peer (the swarms read it
        # through their ``liveness``): keepalive k happened at _keepalive_times[k]; a node
        # was last seen alive at keepalive _alive_round[i], moving at _moving_round[i]; a
        # node hears the pings from keepalive _ticking_round[i] + 1 on
        self._keepalive_times = [-math.inf]
        self._alive_round = [0] * n
        self._moving_round = [0] * n
        self._ticking_round = [0] * n
        self._heap: list = []
        #: events one peer hop (rtt/2) or origin hop (origin rtt/2) after the event that
        #: caused them, most of all events: scheduled in order of their times (the clock only
        #: moves forward), so first-in first-out queues hold them sorted, and the loop takes
        #: the earliest of these and the heap's, by (time, seq) as one heap would
        self._peer_hops: deque = deque()
        self._origin_hops: deque = deque()
        #: (node, blob, chunk) fetched from the origin and not announced yet
        self._from_origin: set[tuple[int, int, int]] = set()
        self._seq = 0
        self._net_scheduled = False
        self._samples: list[float] = []
        self._sent_samples: list = []
        self._arrivals(rng)

    def _arrivals(self, rng: random.Random) -> None:
        sc = self.scenario
        order = list(range(self.n))
        rng.shuffle(order)  # groups interleave in time
        when = 0.0
        self.expected = set(range(self.n))
        for position, node in enumerate(order):
            if sc.arrivals == "staggered":
                when = position * sc.arrival_interval
            elif sc.arrivals == "churn" and position:
                when += rng.expovariate(1.0 / sc.arrival_interval) if sc.arrival_interval else 0
            self.arrival[node] = when
            self._push(when, _ARRIVE, node)
            if sc.arrivals == "churn" and rng.random() < sc.abort_fraction:
                self.aborted[node] = True
                self.expected.discard(node)
                self._push(when + rng.uniform(0, sc.abort_within), _DEPART, node)

    def _push(self, when: float, kind: int, a=None, b=None, c=None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, a, b, c))

    def _hop(self, now: float, kind: int, a=None, b=None, c=None) -> None:
        """Schedule an event one peer hop (rtt/2) after ``now``."""
        self._seq += 1
        entry = (now + self.half_rtt, self._seq, kind, a, b, c)
        queue = self._peer_hops
        if queue and entry[0] < queue[-1][0]:  # never while the clock only moves forward
            heapq.heappush(self._heap, entry)
        else:
            queue.append(entry)

    def _origin_hop(self, now: float, kind: int, a=None, b=None, c=None) -> None:
        """Schedule an event one origin hop (origin rtt/2) after ``now``."""
        self._seq += 1
        entry = (now + self.origin_half_rtt, self._seq, kind, a, b, c)
        queue = self._origin_hops
        if queue and entry[0] < queue[-1][0]:
            heapq.heappush(self._heap, entry)
        else:
            queue.append(entry)

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> dict:
        with _no_cyclic_collection():
            return self._run()

    def _run(self) -> dict:
        self._setup()
        started = time.perf_counter()
        heap = self._heap
        pop = heapq.heappop
        self._push(0.0, _TICK)
        self._push(0.0, _SAMPLE)
        if self.scenario.uses_peers:
            self._push(self.keepalive, _KEEPALIVE)
        limit = self.time_limit
        now = 0.0
        handlers = {_REQUEST: self._on_request, _CANCEL: self._on_cancel,
                    _ORIGIN: self._on_origin, _NET: self._on_net, _TICK: self._on_tick,
                    _ARRIVE: self._on_arrive, _FIRST_TICK: self._on_first_tick,
                    _INTEREST: self._on_interest, _DEPART: self._on_depart,
                    _SAMPLE: self._on_sample, _KEEPALIVE: self._on_keepalive,
                    _ORIGIN_HAVE: self._on_origin_have}
        swarms = self.swarms
        apply = self._apply
        net = self.net
        events = 0
        deliveries = 0
        multi = len(self.blobs) > 1
        have_audience = self.have_audience
        ids = self.ids
        peer_hops, origin_hops = self._peer_hops, self._origin_hops
        progress, every = self.progress, PROGRESS_EVERY
        expected = len(self.expected)
        while self.expected:
            # the earliest of the two hop queues' heads and the heap's top
            if peer_hops:
                entry = peer_hops[0]
                source = peer_hops
                if origin_hops and origin_hops[0] < entry:
                    entry = origin_hops[0]
                    source = origin_hops
            elif origin_hops:
                entry = origin_hops[0]
                source = origin_hops
            else:
                entry = None
            if heap and (entry is None or heap[0] < entry):
                entry = pop(heap)
            elif entry is None:
                break
            else:
                source.popleft()
            now, _, kind, a, b, c = entry
            if now > limit:
                break
            events += 1
            if not events & every and progress is not None:
                progress(now, expected - len(self.expected), expected,
                         self.pieces + self.origin_pieces)
            if kind == _HAVE:
                # the hot path: one Have to every interested peer that lacks the blob
                if multi:
                    # first the receivers' other swarms hear that the sender progresses (they
                    # return no actions, and the Have's swarm reads nothing of theirs: the
                    # same decisions as telling each receiver both in turn)
                    self._progress_seen_by_audience(a, b, now)
                audience = have_audience[b][a]
                deliveries += len(audience)
                for swarm in audience:
                    acts = swarm.handle(c, now)
                    if acts:
                        apply(ids[swarm.node_id], b, acts, now)
            elif kind == _DELIVER:
                node_swarms = swarms[a]
                if node_swarms is not None and self.present[a]:
                    if multi and type(c) is PieceVerified and c.peer is not None:
                        self._progress_seen(self.ids[c.peer], a, b, now)
                    acts = node_swarms[b].handle(c, now)
                    if acts:
                        apply(a, b, acts, now)
            elif kind == _FLOW_DONE:
                if net.version[a] == b:
                    self._on_flow_done(a, now)
            else:
                handlers[kind](a, b, c, now)
        self.end = min(now, limit)
        self.events = events
        self.have_deliveries += deliveries
        self.wall = time.perf_counter() - started
        self._on_sample(True, None, None, self.end)
        return self._result()

    def _on_origin_have(self, sender: int, blob: int, have: PeerHave, now: float) -> None:
        """A chunk ``sender`` fetched from the origin: its Have reaches every node that
        knows the sender, not only its neighbours, as the daemon's full mesh carries every
        Have to every node. A node that heard only its neighbours' would keep the chunk an
        orphan until one of them had it, waiting for the fetcher, which shows no progress
        while it streams its next chunk (21 s for 16 MiB from a 100 Mbit/s origin that 16
        fetchers share), and fetch the chunk itself once the fetcher looked stalled
        (``BlobSwarm._stall_limit``)."""
        swarms = self.swarms
        multi = len(self.blobs) > 1
        for receiver in self.known[sender]:
            node_swarms = swarms[receiver]
            if node_swarms is None:
                continue
            if multi:
                self._progress_seen(sender, receiver, blob, now)
            swarm = node_swarms[blob]
            if not swarm.complete:
                self.have_deliveries += 1
                acts = swarm.handle(have, now)
                if acts:
                    self._apply(receiver, blob, acts, now)

    def _progress_seen_by_audience(self, sender: int, blob: int, now: float) -> None:
        """``_progress_seen`` for every receiver of ``sender``'s Haves, inline (once per Have
        of a multi-blob scenario)."""
        alive_at = self._alive_at
        base = sender * self.n
        swarms = self.swarms
        alive = self._progress_events[sender]
        for receiver in self.audience[sender]:
            key = base + receiver
            if now - alive_at.get(key, -math.inf) < ALIVE_INTERVAL:
                continue
            alive_at[key] = now
            for b, swarm in enumerate(swarms[receiver]):
                if b != blob and not swarm.complete:
                    swarm.handle(alive, now)

    def _progress_seen(self, sender: int, receiver: int, blob: int, now: float) -> None:
        """A Have or a piece of one blob shows the sender alive and making progress to the
        receiver's other swarms, at most every ALIVE_INTERVAL per link (the daemon's
        ``Node._heard_from``); without it a node busy with one layer looks stalled to the
        swarms of the others, which then fetch its share from the origin too."""
        key = sender * self.n + receiver
        if now - self._alive_at.get(key, -math.inf) < ALIVE_INTERVAL:
            return
        self._alive_at[key] = now
        node_swarms = self.swarms[receiver]
        if node_swarms is None:
            return
        alive = self._progress_events[sender]
        for b, swarm in enumerate(node_swarms):
            if b != blob and not swarm.complete:
                swarm.handle(alive, now)

    def _apply(self, node: int, blob: int, actions: list, now: float) -> None:
        hop = self._hop
        for action in actions:
            kind = type(action)
            if kind is SendRequest:
                self.requests += 1
                # the request tells the peers the node receives from (``Node.send_request``)
                hop(now, _REQUEST, self.ids[action.peer], node,
                    (blob, action.index, receiving_from(self.swarms[node])))
            elif kind is AnnounceHave:
                self.last_progress[node] = now
                self._joined[node][blob] = None
                key = (node, blob, action.index)
                reach = _HAVE
                if key in self._from_origin:
                    self._from_origin.discard(key)
                    reach = _ORIGIN_HAVE
                hop(now, reach, node, blob, PeerHave(self.names[node], action.index))
            elif kind is SendCancel:
                hop(now, _CANCEL, self.ids[action.peer], node, (blob, action.index))
            elif kind is FetchFromOrigin:
                self.origin_queue[node].append((blob, action.index))
                if self.origin_active[node] < self.origin_limit[node]:
                    self._pump_origin(node, now)
            elif kind is Completed:
                self._stop_haves_to(node, blob)
                self.blobs_left[node] -= 1
                if not self.blobs_left[node]:
                    self._node_done(node, now)
            # BanPeer: nobody lies in the simulator

    # -- nodes coming and going ------------------------------------------------------------

    def _on_arrive(self, node: int, _b, _c, now: float) -> None:
        self.present[node] = True
        liveness = self._liveness_of(node)
        rack = self.rack_labels[node]
        self.swarms[node] = [
            BlobSwarm(digest, plan, self.names[node], Bitmap(plan.count), self.config,
                      random.Random(self.rng.getrandbits(64)), liveness, rack)
            for digest, plan in zip(self.blobs, self.plans)]
        linked = self._linked(node)
        for peer in linked:
            if self.present[peer]:
                self._hop(now, _INTEREST, peer, node)
        # the daemon's wait_for_bitmaps: until every linked peer answered (only those with a
        # get of their own do), or bitmap_wait
        # (a peer that starts later sends its bitmap with its own interest)
        if not linked:
            self._push(now, _FIRST_TICK, node)
        else:
            self.awaiting[node] = len(linked)
            self._push(now + self.scenario.bitmap_wait, _FIRST_TICK, node)

    def _linked(self, node: int) -> list[int]:
        """The nodes ``node`` tells of its start (and so knows): see ``membership``."""
        membership = self.scenario.membership
        if not self.scenario.uses_peers:
            return []
        if membership == "all" or (membership == "fetchers" and node in self._well_known_set):
            return [peer for peer in range(self.n) if peer != node]
        if membership == "neighbours":
            return self.graph[node]
        neighbours = self.graph_sets[node]
        return self.graph[node] + [peer for peer in self.well_known
                                   if peer != node and peer not in neighbours]

    def _on_interest(self, told: int, starting: int, reply, now: float) -> None:
        """``told`` hears that ``starting`` began a get (and its bitmap); ``reply`` True: this
        is the answer to our own interest."""
        if not (self.present[told] and self.present[starting]):
            return
        swarms = self.swarms[told]
        for b, swarm in enumerate(swarms):
            acts = swarm.handle(self._joined_event(starting, b), now)
            if acts:
                self._apply(told, b, acts, now)
        self.known[told][starting] = None
        if starting in self.graph_sets[told]:
            self.audience[told].append(starting)
            starting_swarms = self.swarms[starting]
            for b, receivers in enumerate(self.have_audience):
                if not starting_swarms[b].complete:
                    receivers[told].append(starting_swarms[b])
        if reply is None:  # answer with our bitmap
            self._hop(now, _INTEREST, starting, told, True)
        if self.awaiting[told] and not self.ticking[told]:
            self.awaiting[told] -= 1
            if not self.awaiting[told]:
                self._on_first_tick(told, None, None, now)

    def _joined_event(self, node: int, blob: int) -> PeerJoined:
        """``node``'s interest in ``blob`` with its bitmap now: one event shared by every
        peer told while the node's holdings stay the same (a start tells all N-1 peers at
        once with membership "all"); ``_apply`` drops it when the node announces a chunk."""
        joined = self._joined[node]
        event = joined[blob]
        if event is None:
            event = joined[blob] = PeerJoined(self.names[node], self.swarms[node][blob].held,
                                              self.rack_labels[node])
        return event

    def _on_first_tick(self, node: int, _b, _c, now: float) -> None:
        if not self.present[node] or self.ticking[node]:
            return
        self.ticking[node] = True
        self._ticking_round[node] = len(self._keepalive_times) - 1
        self._tick_node(node, now)

    def _on_tick(self, _a, _b, _c, now: float) -> None:
        for node in range(self.n):
            if self.ticking[node]:
                self._tick_node(node, now)
        self._push(now + self.scenario.tick, _TICK)

    def _on_keepalive(self, _a, _b, _c, now: float) -> None:
        """Every linked peer answers the daemon's Ping: each swarm still fetching hears that
        its peers are alive (in the simulator a present peer is always alive), and that
        those that announced a chunk since the last ping made progress. Recorded once per
        node, not sent to every swarm as ``PeerAlive`` about every peer (N^2 events a
        round): the swarms ask ``_liveness_of`` when they decide an orphan."""
        times = self._keepalive_times
        times.append(now)
        round_ = len(times) - 1
        recent = now - self.keepalive
        present = self.present
        last_progress = self.last_progress
        alive_round = self._alive_round
        moving_round = self._moving_round
        for i in range(self.n):
            if present[i]:
                alive_round[i] = round_
                if last_progress[i] >= recent:
                    moving_round[i] = round_
        if self.expected:
            self._push(now + self.keepalive, _KEEPALIVE)

    def _liveness_of(self, node: int):
        """What the pings told ``node``'s swarms about a peer: (last heard, last moving),
        counting only the pings since ``node`` began ticking (before that the daemon's
        swarm is not told either). -inf: nothing yet."""
        ids = self.ids
        times = self._keepalive_times
        alive_round = self._alive_round
        moving_round = self._moving_round
        ticking_round = self._ticking_round

        def liveness(name: str) -> tuple[float, float]:
            peer = ids[name]
            start = ticking_round[node]
            heard = alive_round[peer]
            moved = moving_round[peer]
            return (times[heard] if heard > start else -math.inf,
                    times[moved] if moved > start else -math.inf)
        return liveness

    def _tick_node(self, node: int, now: float) -> None:
        tick = Tick()
        mine = remaining = 0
        for b, swarm in enumerate(self.swarms[node]):
            if not swarm.complete:
                acts = swarm.handle(tick, now)
                if acts:
                    self._apply(node, b, acts, now)
                ours, left = swarm.origin_work()
                mine += ours
                remaining += left
        # the daemon's origin pool after each tick (``_OriginPool.share_work``)
        limit = self.origin_limit[node] = origin_connection_share(
            self.scenario.origin_connections, mine, remaining)
        if self.origin_queue[node] and self.origin_active[node] < limit:
            self._pump_origin(node, now)

    def _stop_haves_to(self, node: int, blob: int) -> None:
        """``node`` holds all of ``blob`` now: its neighbours' Haves of it need not reach it
        (removing keeps the others' order, so deliveries happen in the same order)."""
        have_audience = self.have_audience[blob]
        swarm = self.swarms[node][blob]
        for peer in self.graph[node]:
            receivers = have_audience[peer]
            if swarm in receivers:
                receivers.remove(swarm)

    def _node_done(self, node: int, now: float) -> None:
        self.finish[node] = now
        self.aborted[node] = False  # it finished before its early departure
        self.ticking[node] = False
        self.expected.discard(node)
        if self.scenario.arrivals == "churn" and math.isfinite(self.scenario.linger):
            self._push(now + self.scenario.linger, _DEPART, node)

    def _on_depart(self, node: int, _b, _c, now: float) -> None:
        if not self.present[node]:
            return
        self.present[node] = False
        self.ticking[node] = False
        self.origin_queue[node].clear()
        self.slots[node] = UploadSlots(self.scenario.upload_slots)
        self.expected.discard(node)
        for fid in list(self.node_flows[node]):
            self._cut(fid, now)
        name = self.names[node]
        for peer in self.known[node]:
            if self.present[peer]:
                for b in range(len(self.blobs)):
                    self._hop(now, _DELIVER, peer, b, PeerLeft(name))
            self.known[peer].pop(node, None)
        for peer in self.graph[node]:
            audience = self.audience[peer]
            if node in audience:
                audience.remove(node)
            for swarm, receivers in zip(self.swarms[node], self.have_audience):
                if swarm in receivers[peer]:
                    receivers[peer].remove(swarm)
        self.audience[node] = []
        for receivers in self.have_audience:
            receivers[node] = []
        self.known[node] = {}

    # -- requests and flows ---------------------------------------------------------------

    def _on_request(self, sender: int, requester: int, item, now: float) -> None:
        if not (self.present[sender] and self.present[requester]):
            return
        key = sender * self.n + requester
        conn = self.conns.get(key)
        if conn is None:
            conn = self.conns[key] = _Connection()
        blob, index, receiving = item
        conn.queue.append((blob, index))
        conn.receiving = receiving
        if conn.waiting:
            self.slots[sender].update(self.names[requester], receiving)
        elif conn.flow < 0:
            self._serve(sender, requester, conn, now)

    def _on_cancel(self, sender: int, requester: int, item, now: float) -> None:
        conn = self.conns.get(sender * self.n + requester)
        if conn is not None:
            try:
                conn.queue.remove(item)
            except ValueError:
                pass  # already sent, or never asked

    def _serve(self, sender: int, requester: int, conn: _Connection, now: float) -> None:
        """Send the connection's next chunk, if its requester gets a slot; a slot granted
        to it (``_grant_slots``) and not used is given back, for the caller to grant."""
        swarms = self.swarms[sender]
        queue = conn.queue
        name = self.names[sender]
        slots = self.slots[sender]
        requester_name = self.names[requester]
        if not self.present[requester]:
            queue.clear()
            slots.release(requester_name)
            return
        while queue:
            blob, index = queue.popleft()
            if not swarms[blob].holds(index):
                self._hop(now, _DELIVER, requester, blob, PieceFailed(name, index, "rejected"))
                continue
            if not slots.try_acquire(requester_name, self.queue_when_busy, conn.receiving):
                if self.queue_when_busy:
                    queue.appendleft((blob, index))
                    conn.waiting = True
                    self._tell_line(sender, requester, True, now)
                    return
                self.busy += 1
                self._hop(now, _DELIVER, requester, blob, PieceFailed(name, index, "busy"))
                continue
            nbytes = self.plans[blob].length(index)
            if self.width == 2:
                links = (sender, self.n + requester)
            elif self.rack[sender] == self.rack[requester]:
                links = (sender, self.n + requester, self.pad, self.pad)
            else:
                links = (sender, self.n + requester, self.rack_out + self.rack[sender],
                         self.rack_in + self.rack[requester])
            conn.flow = self._start_flow(links, nbytes, now,
                                         (sender, requester, blob, index, nbytes))
            return
        slots.release(requester_name)  # cancelled or rejected while it waited

    def _pump_origin(self, node: int, now: float) -> None:
        """Free origin connections take the next queued chunks still missing."""
        queue = self.origin_queue[node]
        swarms = self.swarms[node]
        limit = self.origin_limit[node]
        while queue and self.origin_active[node] < limit:
            blob, index = queue.popleft()
            swarm = swarms[blob]
            if swarm.holds(index):
                continue  # a peer delivered it meanwhile
            if not swarm.origin_needed(index):  # a peer holds it now: the swarm asks it
                acts = swarm.handle(OriginDropped(index), now)
                if acts:
                    self._apply(node, blob, acts, now)
                continue
            self.origin_active[node] += 1
            self._origin_hop(now, _ORIGIN, node, blob, index)

    def _on_origin(self, node: int, blob: int, index: int, now: float) -> None:
        if not self.present[node]:
            return
        nbytes = self.plans[blob].length(index)
        if self.width == 2:
            links = (self.origin_link, self.n + node)
        else:
            links = (self.origin_link, self.n + node, self.pad,
                     self.rack_in + self.rack[node])
        self._start_flow(links, nbytes, now, (_ORIGIN_FLOW, node, blob, index, nbytes))

    def _start_flow(self, links: tuple, nbytes: int, now: float, payload) -> int:
        horizon = self._next_net if self._net_scheduled else now + self.rate_interval
        fid, version, finish = self.net.add(links, nbytes, now, payload, horizon)
        if finish is not None:
            self._push(finish, _FLOW_DONE, fid, version)
        sender, requester = payload[0], payload[1]
        if sender >= 0:
            self.node_flows[sender].add(fid)
        self.node_flows[requester].add(fid)
        if not self._net_scheduled:
            self._net_scheduled = True
            self._next_net = now + self.rate_interval
            self._push(self._next_net, _NET)
        return fid

    def _end_flow(self, fid: int, now: float) -> tuple:
        payload = self.net.payload[fid]
        self.net.remove(fid, now)
        sender, requester = payload[0], payload[1]
        if sender >= 0:
            self.node_flows[sender].discard(fid)
            self.slots[sender].release(self.names[requester])
        self.node_flows[requester].discard(fid)
        return payload

    def _on_flow_done(self, fid: int, now: float) -> None:
        sender, requester, blob, index, nbytes = self._end_flow(fid, now)
        if sender < 0:
            self.origin_pieces += 1
            self.origin_bytes[requester] += nbytes
            self._from_origin.add((requester, blob, index))
            self._origin_hop(now, _DELIVER, requester, blob, PieceVerified(None, index, nbytes))
            self.origin_active[requester] -= 1
            self._pump_origin(requester, now)
            return
        self.pieces += 1
        self.peer_bytes[requester] += nbytes
        self._hop(now, _DELIVER, requester, blob,
                  PieceVerified(self.names[sender], index, nbytes))
        conn = self.conns[sender * self.n + requester]
        conn.flow = -1
        slots = self.slots[sender]
        if slots.line_length:
            # others wait for a slot: this connection's next chunk takes a place in line
            # too, and the freed slot goes to whoever there receives least, this requester
            # included (the daemon's _take_upload_slot); told only if it stays in line
            if conn.queue:
                conn.waiting = True
                slots.try_acquire(self.names[requester], True, conn.receiving)
            self._grant_slots(sender, now, requester)
            if conn.waiting:
                self._tell_line(sender, requester, True, now)
        elif conn.queue:
            self._serve(sender, requester, conn, now)

    def _tell_line(self, sender: int, requester: int, waiting: bool, now: float) -> None:
        """The daemon's line notice: the requester's swarms learn, a hop later, that their
        requests wait for one of the sender's upload slots (or no longer do)."""
        event = UploadLine(self.names[sender], waiting)
        swarms = self.swarms[requester]
        if swarms is None:
            return
        for blob, swarm in enumerate(swarms):
            if not swarm.complete:
                self._hop(now, _DELIVER, requester, blob, event)

    def _grant_slots(self, sender: int, now: float, untold: int = -1) -> None:
        """Free upload slots go to the connections waiting for one, in the line's order
        (``UploadSlots.grant``); each is told it no longer waits, but ``untold``, which
        was never told it did."""
        slots = self.slots[sender]
        base = sender * self.n
        ids = self.ids
        while granted := slots.grant():
            for name in granted:
                requester = ids[name]
                conn = self.conns[base + requester]
                conn.waiting = False
                if requester != untold:
                    self._tell_line(sender, requester, False, now)
                self._serve(sender, requester, conn, now)

    def _cut(self, fid: int, now: float) -> None:
        """A flow whose sender or receiver left: no piece arrives."""
        sender, requester = self._end_flow(fid, now)[:2]
        if sender >= 0:
            conn = self.conns[sender * self.n + requester]
            conn.flow = -1
            conn.queue.clear()
            if self.present[sender] and self.slots[sender].line_length:
                self._grant_slots(sender, now)

    def _on_net(self, _a, _b, _c, now: float) -> None:
        if not self.net.active_count:
            self._net_scheduled = False
            return
        self._next_net = now + self.rate_interval
        for finish, fid, version in self.net.rebalance(now, self._next_net):
            self._push(finish, _FLOW_DONE, fid, version)
        self._push(self._next_net, _NET)

    # -- measurements ---------------------------------------------------------------------

    def _on_sample(self, final, _b, _c, now: float) -> None:
        """Keep the bytes each link has sent so far; the series are their differences."""
        self.net.settle(now)
        self._samples.append(now)
        self._sent_samples.append(self.net.sent.copy())
        if final is None and self.expected:
            self._push(now + self.sample_interval, _SAMPLE)

    def _result(self) -> dict:
        sc = self.scenario
        n = self.n
        sent = self._sent_samples
        times = self._samples
        origin_series, utilisation = [], []
        for k in range(1, len(times)):
            span = times[k] - times[k - 1]
            if span <= 0:
                continue
            delta = sent[k] - sent[k - 1]
            origin_series.append((times[k - 1], times[k], float(delta[self.origin_link])))
            util = [float(delta[i]) / (self.ups[i] * span) for i in range(n)]
            utilisation.append((times[k - 1], times[k], util))
        nodes = []
        for i in range(n):
            done = self.finish[i]
            nodes.append({
                "node": self.names[i], "group": self.group_of[i], "rack": self.rack[i],
                "arrival": self.arrival[i], "finish": done,
                "seconds": None if done is None else done - self.arrival[i],
                "aborted": self.aborted[i],
                "origin_bytes": self.origin_bytes[i], "peer_bytes": self.peer_bytes[i],
                "uploaded_bytes": float(sent[-1][i]),
            })
        return {
            "engine": "chunk",
            "scenario": sc.name,
            "seed": self.seed,
            "bound": self.bound.as_dict(),
            "size_bytes": sc.size,
            "layers": list(sc.layers),
            "chunk_sizes": [p.chunk_size for p in self.plans],
            "chunks": sum(p.count for p in self.plans),
            "nodes": nodes,
            "origin_bytes": sum(self.origin_bytes),
            "peer_bytes": sum(self.peer_bytes),
            "end_seconds": self.end,
            "series": {"origin": origin_series, "upload_utilisation": utilisation},
            "stats": {"wall_seconds": self.wall, "events": self.events,
                      "transfers": self.pieces + self.origin_pieces,
                      "peer_pieces": self.pieces, "origin_pieces": self.origin_pieces,
                      "requests": self.requests, "busy": self.busy,
                      "have_deliveries": self.have_deliveries,
                      "rate_interval": self.rate_interval,
                      "neighbours_max": max((len(g) for g in self.graph), default=0)},
        }


@contextlib.contextmanager
def _no_cyclic_collection():
    """The cyclic garbage collector off inside: a run builds millions of long-lived objects
    (swarm state, requests, queued events) and no reference cycles (a run with
    gc.DEBUG_SAVEALL collects nothing), so the collector's passes over them only cost
    time, about a sixth of it. Nested uses leave it to the outermost."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def run(scenario: Scenario, seed: int | None = None,
        progress: Callable[[float, int, int, int], None] | None = None) -> dict:
    with _no_cyclic_collection():
        engine = ChunkEngine(scenario, seed, progress)
        result = engine.run()
        # freed here by reference counting, nothing being a cycle: with the collector back
        # on first, its next pass would walk the whole engine, seconds at 1,000 nodes
        del engine
    return result

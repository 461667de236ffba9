"""A p2pull node: the store, the origin client, peer links and the blob sessions that use
them. The daemon runs one for its lifetime; ``get`` without a daemon runs one for a call.

Ownership: ``Node.run`` owns a nursery with the peer listener, one connector per static
peer, one task per peer link (which owns a reader, a writer and a server task and closes
its stream in ``finally``), and the ticker. Blob sessions belong to the ``fetch`` call that
made them and register here while they run, so links can feed them events.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import random
import secrets
import socket
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import trio

from p2pull.config import Config
from p2pull.core.bitmap import Bitmap
from p2pull.core.chunks import ChunkPlan
from p2pull.core.ratelimit import TokenBucket, UploadSlots
from p2pull.core.refs import Ref
from p2pull.core.swarm import (PeerAlive, PeerHave, PeerJoined, PeerLeft, PieceFailed,
                               SwarmConfig, Tick, UploadLine, receiving_from)
from p2pull.discovery import PeerGone, run_discovery
from p2pull.errors import ProtocolError, UsageError
from p2pull.net.fetch import (INLINE_IO_MAX, MAX_ORIGIN_CHUNKS, PEER_WRITES_IN_FLIGHT,
                              BlobSession, Progress, fetch_blobs, throttle)
from p2pull.origin.client import OriginClient
from p2pull.origin.manifest import Descriptor
from p2pull.store.cas import Store, chunk_checksum
from p2pull.wire import (NEED_DATA, Bitmap as BitmapMessage, Cancel, ConnectionClosed, Goodbye,
                         Have, Interest, Line, PeerConnection, PeerVerified, Piece, Ping, Pong,
                         Preload, Reject, Request, StatusQuery, StatusReply)
from p2pull.wire.messages import MAX_RECEIVING, MAX_REPORT

log = logging.getLogger("p2pull.node")

#: bytes asked of the socket per read: a 16 MiB piece in 16 reads
RECEIVE_SIZE = 1024 * 1024
#: while a payload arrives the socket reports readable only once this much of it is in
#: (SO_RCVLOWAT), or all that is left of it
RECEIVE_LOW_WATER = 256 * 1024
#: ... but a reader that waited this long takes what is there: on a congested link a
#: piece can trickle in at a few hundred kbit/s (one TCP flow among dozens through an
#: oversubscribed rack uplink), and a reader that sees no bytes for origin_wait_limit takes
#: the peer for silent and fetches its orphans from the origin (1.09-1.37 x F in the lab's
#: racks at 25 Mbit/s, 1.000-1.007 once the bytes counted)
RECEIVE_PATIENCE = 0.5
#: a peer that has not completed the handshake by then is dropped
HANDSHAKE_TIMEOUT = 10.0
#: a write that makes no progress for this long means the peer stopped reading
SEND_TIMEOUT = 30.0
#: a link's swarms are told its peer is alive at most this often (Node._heard_from)
ALIVE_INTERVAL = 0.25
#: swarms are ticked this often (request expiry, origin wait limits)
TICK_INTERVAL = 0.2
#: requests queued from one peer beyond this are answered busy
MAX_QUEUED_REQUESTS = 64
RECONNECT_DELAYS = (0.5, 1, 2, 5, 10, 30)
#: how long a new blob session waits for the bitmaps of connected peers (a round trip on
#: a LAN) before the swarm decides who fetches what from the origin
BITMAP_WAIT = 1.0
#: how long ``status --cluster`` waits for the peers' reports
CLUSTER_QUERY_SECONDS = 2.0
DEFAULT_SECRET_PREFIX = b"p2pull default cluster secret: "


def load_node_id(data_dir: Path) -> str:
    """The node's id, made once and kept in the data directory."""
    path = data_dir / "node-id"
    try:
        node_id = path.read_text().strip()
        if len(node_id) == 32 and all(c in "0123456789abcdef" for c in node_id):
            return node_id
    except FileNotFoundError:
        pass
    node_id = secrets.token_hex(16)
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(node_id + "\n")
    return node_id


def load_secret(config: Config) -> bytes:
    """The cluster secret from ``secret_file``; without one, a default derived from the
    cluster name (peers still must agree on the name, but anyone can join: set a secret)."""
    if config.secret_file is None:
        return DEFAULT_SECRET_PREFIX + config.cluster.encode()
    try:
        secret = config.secret_file.read_bytes().strip()
    except OSError as exc:
        raise UsageError(f"cannot read the cluster secret {config.secret_file}: "
                         f"{exc.strerror}") from exc
    if not secret:
        raise UsageError(f"the cluster secret file {config.secret_file} is empty")
    return secret


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"bad address {text!r}: write host:port")
    return host.strip("[]"), int(port)


class PayloadPool:
    """Reusable buffers that Piece payloads are received into: a fresh buffer per chunk
    costs a zero-fill and a page fault per 4 KiB, about as much as the copy from the socket.
    A buffer comes back with ``release`` once its payload was written (or dropped)."""

    def __init__(self, keep: int):
        self._keep = keep
        self._free: dict[int, list[bytearray]] = {}
        self._kept = 0

    def allocate(self, size: int) -> bytearray:
        free = self._free.get(size)
        if free:
            self._kept -= 1
            return free.pop()
        return bytearray(size)

    def release(self, payload) -> None:
        buffer = payload.obj if isinstance(payload, memoryview) else None
        if type(buffer) is bytearray and self._kept < self._keep:
            self._free.setdefault(len(buffer), []).append(buffer)
            self._kept += 1


@dataclass
class NodeCounters:
    bytes_from_peers: int = 0
    bytes_to_peers: int = 0
    chunks_from_peers: int = 0
    chunks_rejected: int = 0
    bans: int = 0


def _burst(rate: int | None, burst: int | None) -> int:
    """A token bucket's burst: as configured, else one second's worth of ``rate`` (at
    least one read's worth, so a piece never waits for tokens it could never get)."""
    return burst if burst is not None else max(rate or 0, RECEIVE_SIZE)


@dataclass(eq=False)
class PeerLink:
    """An established, verified connection to one peer."""

    peer_id: str
    host: str
    listen_port: int
    outbound: bool
    stream: trio.abc.Stream
    conn: PeerConnection
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    #: the rack it said it is in (its Hello), or None
    rack: str | None = None
    #: blobs the peer told us it wants (Interest)
    interested: set[str] = field(default_factory=set)
    #: blobs for which the peer's bitmap joined our session
    joined: set[str] = field(default_factory=set)
    requests: collections.deque = field(default_factory=collections.deque)
    #: pieces read for the peer and not yet sent: its upload slot is kept while any are
    in_service: int = 0
    #: the peers it receives from, as its latest request said: its rank in our line
    receiving: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    #: when the swarms were last told the peer is alive, and making progress
    #: (``Node._heard_from``)
    alive_at: float = -math.inf
    progressed_at: float = -math.inf

    def __post_init__(self):
        self.outbox_send, self.outbox_receive = trio.open_memory_channel(math.inf)
        self.request_ready = trio.Event()
        #: set when the peer, waiting in line (``upload_when_busy = "queue"``), got a slot
        self.slot_granted = trio.Event()

    def send(self, message) -> None:
        """Queue a control message; the link's writer sends it."""
        try:
            self.outbox_send.send_nowait(self.conn.send(message))
        except (trio.ClosedResourceError, ProtocolError):
            pass  # the link is closing

    async def write(self, buffers) -> None:
        async with self.send_lock:
            await self._send_locked(buffers)

    async def _send_locked(self, buffers) -> None:
        """Send ``buffers`` (the send lock held), all within SEND_TIMEOUT, counted."""
        with trio.fail_after(SEND_TIMEOUT):
            for buffer in buffers:
                await self.stream.send_all(buffer)
                self.bytes_out += len(buffer)

    async def write_queued(self, first: bytes) -> None:
        """Send control frame ``first`` and every one queued behind it, also those queued
        while this write waited or ran, in one turn of the send lock. A piece holds the
        lock while its whole payload goes out: at a turn per frame, one Have or Request
        passed per piece, and on a busy link they waited behind each other for seconds
        (p90 2-3 s in the namespace lab)."""
        frames = [first]
        async with self.send_lock:
            while frames:
                await self._send_locked((b"".join(frames),))
                frames = []
                while True:
                    try:
                        frames.append(self.outbox_receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break

    async def write_from_file(self, head: bytes, chunk: "OutgoingChunk") -> None:
        """Send ``head`` and then ``chunk``'s bytes straight from its file by sendfile: no
        copy through this process, which costs a serving daemon more CPU than anything
        else it does for a peer."""
        sock = self.stream.socket
        offset, end = chunk.offset, chunk.offset + chunk.length
        async with self.send_lock:
            with trio.fail_after(SEND_TIMEOUT):
                await self.stream.send_all(head)
                self.bytes_out += len(head)
                while offset < end:
                    try:
                        sent = os.sendfile(sock.fileno(), chunk.fd, offset, end - offset)
                    except BlockingIOError:
                        await sock.wait_writable()
                        continue
                    if not sent:
                        # the peer expects the whole payload: only closing the link is left
                        raise ProtocolError(f"chunk file ended {end - offset} bytes early")
                    offset += sent
                    self.bytes_out += sent
                    await trio.lowlevel.checkpoint()

    def describe(self) -> dict:
        return {"node_id": self.peer_id, "address": f"{self.host}:{self.listen_port}",
                "direction": "out" if self.outbound else "in", "rack": self.rack,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "blobs": sorted(self.interested | self.joined)}


@dataclass(eq=False)
class OutgoingChunk:
    """A chunk to send a peer, with the xxh3 it was committed under: its bytes in memory
    (``data``), or a file of our own, opened for this send, to ``sendfile`` from."""

    checksum: bytes
    length: int
    data: bytes | None = None
    fd: int | None = None
    offset: int = 0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _open_readonly(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class Node:
    def __init__(self, config: Config, store: Store, origin: OriginClient, *,
                 node_id: str | None = None, rng: random.Random | None = None,
                 swarm_config: SwarmConfig | None = None):
        self.config = config
        self.store = store
        self.origin = origin
        self.node_id = node_id or load_node_id(config.data_dir)
        self.secret = load_secret(config)
        self.rng = rng or random.Random()
        self.swarm_config = swarm_config or SwarmConfig(max_origin_in_flight=MAX_ORIGIN_CHUNKS)
        self.listen_port = 0
        self.links: dict[str, PeerLink] = {}
        self.sessions: dict[str, BlobSession] = {}
        #: blob -> {chunk: xxh3} of published blobs (chunks as the protocol's rule and our
        #: chunk_size cut them): a chunk whose xxh3 is known is sent by sendfile, without
        #: reading it (16 bytes a chunk)
        self._published_checksums: dict[str, dict[int, bytes]] = {}
        self._congestion_refused = False
        self.banned: set[str] = set()
        self.counters = NodeCounters()
        self.upload_slots = UploadSlots(config.upload_slots)
        self.queue_when_busy = config.upload_when_busy == "queue"
        self.upload_bucket = TokenBucket(config.upload_rate,
                                         _burst(config.upload_rate, config.upload_burst))
        self.download_bucket = TokenBucket(config.download_rate,
                                           _burst(config.download_rate, None))
        self.write_slots = trio.Semaphore(PEER_WRITES_IN_FLIGHT)
        self.payload_pool = PayloadPool(keep=2 * PEER_WRITES_IN_FLIGHT)
        #: called with a ref a peer (or we) asked the cluster to preload; the daemon sets it
        self.on_preload: Callable[[str], None] = lambda ref: None
        self._status_queries: dict[int, dict[str, dict]] = {}
        self._self_addresses: set[tuple[str, int]] = set()
        self._dialing: set[tuple[str, int]] = set()  # addresses with a _keep_connected task
        self._gone: set[tuple[str, int]] = set()  # addresses discovery reported gone
        self._nursery: trio.Nursery | None = None

    # -- services -----------------------------------------------------------------------------

    async def run(self, *, listen: bool = True, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve peers until cancelled; ``task_status.started()`` once listening."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if listen:
                host, port = parse_address(self.config.listen)
                listeners = await trio.open_tcp_listeners(port, host=host)
                self.listen_port = listeners[0].socket.getsockname()[1]
                nursery.start_soon(trio.serve_listeners, self._accept, listeners)
            found_send, found_receive = trio.open_memory_channel(math.inf)
            # mDNS announces our listening port: a node that does not listen uses the rest
            methods = tuple(m for m in self.config.discovery if listen or m != "mdns")
            await nursery.start(partial(run_discovery, replace(self.config, discovery=methods),
                                        self.node_id, self.listen_port, found_send))
            nursery.start_soon(self._follow_discovery, found_receive)
            nursery.start_soon(self._tick)
            task_status.started()

    async def stop(self) -> None:
        """Say goodbye to every peer; the caller then cancels ``run``."""
        for link in list(self.links.values()):
            link.send(Goodbye("node stopping"))
        with trio.move_on_after(1.0):
            for link in list(self.links.values()):
                with trio.move_on_after(0.2):
                    while link.outbox_receive.statistics().current_buffer_used:
                        await trio.sleep(0.01)

    async def fetch(self, ref: Ref, descriptors: list[Descriptor], progress: Progress) -> None:
        """Bring the blobs into the store: peers first, the origin last."""
        await fetch_blobs(self.store, self.origin, ref, descriptors, progress,
                          self.config.chunk_size, node_id=self.node_id, messenger=self,
                          swarm_config=self.swarm_config, rng=self.rng,
                          download_bucket=self.download_bucket, write_slots=self.write_slots,
                          release_payload=self.payload_pool.release, rack=self.config.rack)

    async def _tick(self) -> None:
        while True:
            await trio.sleep(TICK_INTERVAL)
            for session in list(self.sessions.values()):
                if session.ticking:
                    session.apply(Tick())

    # -- connections ----------------------------------------------------------------------

    async def _accept(self, stream: trio.SocketStream) -> None:
        host = stream.socket.getpeername()[0]
        await self._run_link(stream, host, outbound=False)

    async def _follow_discovery(self, found: trio.MemoryReceiveChannel) -> None:
        """Dial what discovery finds; stop redialing what it reports gone (a link that is
        up stays up: its own keepalive decides)."""
        async for event in found:
            address = (event.host, event.port)
            if isinstance(event, PeerGone):
                self._gone.add(address)
            elif address not in self._dialing:
                self._gone.discard(address)
                self._dialing.add(address)
                self._nursery.start_soon(self._keep_connected, address)
            else:
                self._gone.discard(address)

    async def _keep_connected(self, address: tuple[str, int]) -> None:
        try:
            await self._redial(address)
        finally:
            self._dialing.discard(address)

    async def _redial(self, address: tuple[str, int]) -> None:
        failures = 0
        while address not in self._self_addresses and address not in self._gone:
            if not any((link.host, link.listen_port) == address for link in
                       self.links.values()):
                try:
                    with trio.fail_after(HANDSHAKE_TIMEOUT):
                        stream = await trio.open_tcp_stream(*address)
                except (OSError, trio.TooSlowError) as exc:
                    log.debug("peer %s:%d unreachable: %r", *address, exc)
                else:
                    failures = 0
                    await self._run_link(stream, address[0], outbound=True, dialed=address)
            failures += 1
            await trio.sleep(RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS)) - 1])

    async def _run_link(self, stream, host: str, *, outbound: bool,
                        dialed: tuple[str, int] | None = None) -> None:
        conn = PeerConnection(self.node_id, self.config.cluster, self.secret,
                              os.urandom(32), self.listen_port,
                              allocate=self.payload_pool.allocate, rack=self.config.rack or "")
        link = None
        self._tune_peer_socket(stream)
        try:
            verified, pending = await self._handshake(stream, conn)
            link = PeerLink(verified.node_id, host, verified.listen_port, outbound, stream, conn,
                            rack=verified.rack or None)
            if not self._register(link):
                return
            with link.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_outbox, link)
                    nursery.start_soon(self._serve_requests, link)
                    nursery.start_soon(self._keepalive, link)
                    await self._read(link, pending)
                    nursery.cancel_scope.cancel()
        # except*: errors of the link's own tasks arrive grouped by its nursery; they end
        # this link only, never the node
        except* ProtocolError as group:
            exc = group.exceptions[0]
            if "connected to itself" in str(exc) and dialed:
                self._self_addresses.add(dialed)
            log.warning("peer %s at %s dropped: %s", link.peer_id if link else "?", host, exc)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                 OSError) as group:
            log.info("peer %s at %s disconnected: %r", link.peer_id if link else "?", host,
                     group.exceptions[0])
        finally:
            if link is not None:
                self._unregister(link)
            await stream.aclose()

    def _tune_peer_socket(self, stream) -> None:
        """Apply ``peer_tcp_congestion``. A name the kernel refuses is logged once and the
        system's default kept: a link that works matters more than its tuning."""
        name = self.config.peer_tcp_congestion
        sock = getattr(stream, "socket", None)
        if not name or sock is None or self._congestion_refused:
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
        except OSError as exc:
            self._congestion_refused = True
            log.warning("peer_tcp_congestion %r refused by the kernel (%s); peer links keep "
                        "the system's default: see net.ipv4.tcp_allowed_congestion_control",
                        name, exc.strerror or exc)

    async def _handshake(self, stream, conn: PeerConnection):
        """Both Hellos, both Auths; returns (PeerVerified, events that followed it)."""
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await stream.send_all(conn.start())
            while True:
                data = await stream.receive_some(RECEIVE_SIZE)
                conn.receive_data(data)
                while True:
                    event = conn.next_event()
                    reply = conn.data_to_send()
                    if reply:
                        await stream.send_all(reply)
                    if event is NEED_DATA:
                        break
                    if isinstance(event, PeerVerified):
                        return event, self._drain(conn)
                    if isinstance(event, ConnectionClosed):
                        raise ProtocolError("the peer closed the connection in the handshake")

    @staticmethod
    def _drain(conn: PeerConnection) -> list:
        events = []
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, ConnectionClosed):
                break
        return events

    def _register(self, link: PeerLink) -> bool:
        if link.peer_id in self.banned:
            log.info("refusing banned peer %s", link.peer_id)
            return False
        existing = self.links.get(link.peer_id)
        if existing is not None:
            # both sides keep the connection dialed by the smaller node id
            if link.outbound != (self.node_id < link.peer_id):
                return False
            existing.scope.cancel()
            self._unregister(existing)
        self.links[link.peer_id] = link
        log.info("peer %s connected (%s:%d)", link.peer_id, link.host, link.listen_port)
        for session in list(self.sessions.values()):
            self._announce_session(link, session)
        return True

    def _unregister(self, link: PeerLink) -> None:
        if self.links.get(link.peer_id) is not link:
            return
        del self.links[link.peer_id]
        link.outbox_send.close()
        link.requests.clear()
        self._release_upload_slot(link.peer_id)
        for blob in link.joined:
            session = self.sessions.get(blob)
            if session is not None:
                session.apply(PeerLeft(link.peer_id))

    # -- the link's tasks -------------------------------------------------------------------

    async def _keepalive(self, link: PeerLink) -> None:
        # often enough that the Pong shows a quiet peer alive before origin waits run out
        interval = min(self.config.peer_timeout / 3,
                       max(self.swarm_config.origin_wait_limit / 2, ALIVE_INTERVAL))
        while True:
            await trio.sleep(interval)
            link.send(Ping(self.rng.getrandbits(32)))

    async def _write_outbox(self, link: PeerLink) -> None:
        async for frame in link.outbox_receive:
            await link.write_queued(frame)

    async def _read(self, link: PeerLink, pending: list) -> None:
        for event in pending:
            if not await self._dispatch(link, event):
                return
        conn = link.conn
        # a payload is received straight into its buffer when the stream is a socket
        sock = getattr(link.stream, "socket", None)
        low_water = 1
        while True:
            space = conn.payload_space() if sock is not None else None
            # inside a payload, be woken only once a good part of it is in: a link shaped
            # to 100 Mbit/s otherwise wakes the reader every few packets, and eight daemons
            # on two cores spend their CPU on wake-ups (never more than the payload's rest,
            # so nothing waits for bytes that are not coming)
            wanted = 1 if space is None else min(len(space), RECEIVE_LOW_WATER)
            if wanted != low_water:
                low_water = wanted
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, wanted)
            with trio.move_on_after(self.config.peer_timeout) as idle:
                if space is not None:
                    count = None
                    if low_water > 1:
                        with trio.move_on_after(RECEIVE_PATIENCE):
                            count = await sock.recv_into(space[:RECEIVE_SIZE])
                        if count is None:  # a slow link: what is there will do
                            low_water = 1
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                    if count is None:
                        count = await sock.recv_into(space[:RECEIVE_SIZE])
                else:
                    data = await link.stream.receive_some(RECEIVE_SIZE)
                    count = len(data)
            if idle.cancelled_caught:
                raise ProtocolError(f"silent for {self.config.peer_timeout:.0f} s")
            link.bytes_in += count
            await throttle(self.download_bucket, count)
            if space is None:
                conn.receive_data(data)
            elif count:
                conn.payload_received(count)
            else:
                conn.receive_data(b"")
            self._heard_from(link)
            while (event := link.conn.next_event()) is not NEED_DATA:
                if not await self._dispatch(link, event):
                    return

    def _heard_from(self, link: PeerLink, progressed: bool = False) -> None:
        """The link delivered bytes: tell the swarms it joined that the peer is alive, at
        most every ALIVE_INTERVAL. A swarm hears of a peer only through its blob, and would
        take a live peer busy with another blob for a dead one once origin_wait_limit ran
        out, and fetch the chunks that peer is responsible for from the origin too.
        ``progressed``: it was a Have or a piece; a peer whose Haves are all about another
        blob (its origin queue holds that one first) is making progress for every blob."""
        now = trio.current_time()
        progressed = progressed and now - link.progressed_at >= ALIVE_INTERVAL
        if not progressed and now - link.alive_at < ALIVE_INTERVAL:
            return
        link.alive_at = now
        if progressed:
            link.progressed_at = now
        for blob in link.joined:
            session = self.sessions.get(blob)
            if session is not None:
                session.apply(PeerAlive(link.peer_id, progressed))

    async def _dispatch(self, link: PeerLink, event) -> bool:
        """Act on one event from a peer; False when the link should close."""
        peer = link.peer_id
        if isinstance(event, (Piece, Have)):
            self._heard_from(link, progressed=True)
        if isinstance(event, Piece):
            await self._receive_piece(link, event)
        elif isinstance(event, Request):
            if len(link.requests) >= MAX_QUEUED_REQUESTS:
                link.send(Reject(event.blob, event.index, "busy"))
            else:
                link.requests.append((event.blob, event.index))
                link.receiving = event.receiving
                self.upload_slots.update(link.peer_id, event.receiving)
                link.request_ready.set()
        elif isinstance(event, Cancel):
            try:
                link.requests.remove((event.blob, event.index))
            except ValueError:
                pass  # already sent, or never asked
        elif isinstance(event, Have):
            if event.blob in link.joined and event.blob in self.sessions:
                self.sessions[event.blob].apply(PeerHave(peer, event.index))
        elif isinstance(event, BitmapMessage):
            session = self.sessions.get(event.blob)
            if session is not None and event.blob not in link.joined:
                if event.count != session.plan.count:
                    raise ProtocolError(f"bitmap of {event.count} chunks for {event.blob}, "
                                        f"which has {session.plan.count}")
                link.joined.add(event.blob)
                session.apply(PeerJoined(peer, Bitmap(event.count, event.bits), link.rack))
        elif isinstance(event, Interest):
            link.interested.add(event.blob)
            bitmap = self._bitmap_of(event.blob)
            if bitmap is not None:
                link.send(BitmapMessage(event.blob, bitmap.to_bytes(), bitmap.size))
        elif isinstance(event, Line):
            for blob in link.joined:
                session = self.sessions.get(blob)
                if session is not None:
                    session.apply(UploadLine(peer, event.waiting))
        elif isinstance(event, Reject):
            session = self.sessions.get(event.blob)
            if session is not None:
                reason = "busy" if event.reason == "busy" else "rejected"
                session.apply(PieceFailed(peer, event.index, reason))
        elif isinstance(event, Ping):
            link.send(Pong(event.nonce))
        elif isinstance(event, Preload):
            log.info("peer %s asks us to preload %s", peer, event.ref)
            self.on_preload(event.ref)
        elif isinstance(event, StatusQuery):
            report = json.dumps(self.report()).encode()
            link.send(StatusReply(event.nonce, report[:MAX_REPORT]))
        elif isinstance(event, StatusReply):
            pending = self._status_queries.get(event.nonce)
            if pending is not None:
                try:
                    pending[peer] = json.loads(event.report)
                except ValueError:
                    raise ProtocolError("a status reply that is not JSON") from None
        elif isinstance(event, (Goodbye, ConnectionClosed)):
            return False
        return True

    async def _receive_piece(self, link: PeerLink, piece: Piece) -> None:
        session = self.sessions.get(piece.blob)
        if session is None:
            self.payload_pool.release(piece.payload)
            return  # finished meanwhile: a late duplicate
        size = len(piece.payload)
        self.counters.bytes_from_peers += size
        rejected = session.progress.rejected
        await session.piece_from_peer(link.peer_id, piece.index, piece.checksum, piece.payload)
        if session.progress.rejected > rejected:
            self.counters.chunks_rejected += 1
        else:
            self.counters.chunks_from_peers += 1

    # -- serving ----------------------------------------------------------------------------

    def _bitmap_of(self, blob: str) -> Bitmap | None:
        session = self.sessions.get(blob)
        if session is not None and session.partial is not None:
            return Bitmap(session.plan.count, session.partial.bitmap.to_bytes())
        try:
            size = self.store.blob_path(blob).stat().st_size
        except (OSError, ValueError):
            return None
        return Bitmap.full(ChunkPlan.for_blob(size, self.config.chunk_size).count)

    async def _serve_requests(self, link: PeerLink) -> None:
        """Open (or read) requested chunks and hand them to ``_send_pieces``: the next
        chunk is made ready while the previous one is on the wire."""
        send_pieces, receive_pieces = trio.open_memory_channel(0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_pieces, link, receive_pieces)
            async with send_pieces:
                while True:
                    await link.request_ready.wait()
                    link.request_ready = trio.Event()
                    while link.requests:
                        if not await self._take_upload_slot(link):
                            blob, index = link.requests.popleft()
                            link.send(Reject(blob, index, "busy"))
                            continue
                        if not link.requests:  # cancelled while it waited for the slot
                            if not link.in_service:
                                self._release_upload_slot(link.peer_id)
                            break
                        blob, index = link.requests.popleft()
                        # the slot is released once the piece is sent (by _send_pieces)
                        sending = False
                        chunk = None
                        link.in_service += 1
                        try:
                            chunk = await self._chunk_to_send(link, blob, index)
                            if chunk is None:
                                link.send(Reject(blob, index, "missing"))
                            else:
                                await send_pieces.send((blob, index, chunk))
                                sending = True
                        finally:
                            if not sending:
                                if chunk is not None:  # the link closed: its file too
                                    chunk.close()
                                self._served(link)

    async def _send_pieces(self, link: PeerLink, pieces: trio.MemoryReceiveChannel) -> None:
        async for blob, index, chunk in pieces:
            try:
                await throttle(self.upload_bucket, chunk.length)
                if chunk.data is not None:
                    await link.write(link.conn.send_piece(blob, index, chunk.checksum,
                                                          chunk.data))
                else:
                    head = link.conn.send_piece_head(blob, index, chunk.checksum, chunk.length)
                    await link.write_from_file(head, chunk)
                self.counters.bytes_to_peers += chunk.length
            finally:
                chunk.close()
                self._served(link)

    def _served(self, link: PeerLink) -> None:
        """One piece for ``link`` is sent (or dropped): the peer keeps its upload slot while
        another is read, in service or queued."""
        link.in_service -= 1
        if not link.in_service and not link.requests:
            self._release_upload_slot(link.peer_id)

    async def _take_upload_slot(self, link: PeerLink) -> bool:
        """True once ``link``'s peer holds an upload slot; False if every slot is taken and
        the request is to be answered busy. With ``upload_when_busy = "queue"`` the peer
        waits in line instead, and a peer holding a slot that others wait for gives it up
        before each further piece for a place in line, so slots go round: to whoever in
        line receives from the fewest peers, this peer included (it is told it waits only
        if it does)."""
        slots = self.upload_slots
        peer = link.peer_id
        if self.queue_when_busy and slots.line_length and slots.holds(peer):
            slots.release(peer)
            slots.try_acquire(peer, queue=True, receiving=link.receiving)
            self._grant_upload_slots()
            if slots.holds(peer):  # it receives least: its own slot again, unwaited
                link.slot_granted = trio.Event()
                return True
        if slots.try_acquire(peer, queue=self.queue_when_busy, receiving=link.receiving):
            return True
        if not self.queue_when_busy:
            return False
        # the peer asks a free holder for what waits here meanwhile (swarm.UploadLine)
        link.send(Line(True))
        while not slots.try_acquire(peer, queue=True, receiving=link.receiving):
            await link.slot_granted.wait()
            link.slot_granted = trio.Event()
        link.send(Line(False))
        return True

    def _release_upload_slot(self, peer: str) -> None:
        """Free ``peer``'s upload slot (or its place in line) and give the slots now free
        to the peers in line."""
        self.upload_slots.release(peer)
        self._grant_upload_slots()

    def _grant_upload_slots(self) -> None:
        """Wake the peers in line that the free slots go to (``UploadSlots.grant``)."""
        for granted in self.upload_slots.grant():
            link = self.links.get(granted)
            if link is None:  # gone meanwhile: its slot goes on down the line
                self._release_upload_slot(granted)
            else:
                link.slot_granted.set()

    def _chunk_length(self, blob: str, index: int) -> int:
        """The length of chunk ``index`` of ``blob`` (0 if we do not have the blob)."""
        session = self.sessions.get(blob)
        if session is not None and 0 <= index < session.plan.count:
            return session.plan.length(index)
        try:
            size = self.store.blob_path(blob).stat().st_size
        except (OSError, ValueError):
            return 0
        return ChunkPlan.for_blob(size, self.config.chunk_size).chunk_size

    async def _chunk_to_send(self, link: PeerLink, blob: str, index: int
                             ) -> OutgoingChunk | None:
        """A chunk we hold, for ``link``: opened for sendfile when the link is a socket and
        the chunk's xxh3 is known, otherwise read (and its xxh3 computed and kept). None if
        we do not hold it."""
        if getattr(link.stream, "socket", None) is not None:
            chunk = self._open_chunk(blob, index)
            if chunk is not None:
                return chunk
        if self._chunk_length(blob, index) <= INLINE_IO_MAX:
            return self._read_chunk(blob, index)
        return await trio.to_thread.run_sync(self._read_chunk, blob, index)

    def _open_chunk(self, blob: str, index: int) -> OutgoingChunk | None:
        """Chunk ``index`` of ``blob`` in a file opened for this send, if we hold it and
        know its xxh3; None otherwise. Opening is cheap enough for the event loop."""
        session = self.sessions.get(blob)
        if session is not None and session.holds(index):
            checksum = session.partial.checksums.get(index)
            # our own descriptor: the session's may be closed and its number reused; a
            # rename at publish leaves an open file as it is. (Only a failed sha256 makes
            # the session rewrite held chunks: a peer then gets bytes that fail its xxh3.)
            fd = _open_readonly(session.partial.data_path) if checksum is not None else None
            if fd is not None:
                offset, length = session.plan.span(index)
                return OutgoingChunk(checksum, length, fd=fd, offset=offset)
        checksum = self._published_checksums.get(blob, {}).get(index)
        if checksum is None:
            return None
        fd = _open_readonly(self.store.blob_path(blob))
        if fd is None:
            return None
        offset, length = ChunkPlan.for_blob(os.fstat(fd).st_size,
                                            self.config.chunk_size).span(index)
        return OutgoingChunk(checksum, length, fd=fd, offset=offset)

    def _read_chunk(self, blob: str, index: int) -> OutgoingChunk | None:
        """A chunk we hold read into memory, from the partial file or the store; None if
        we do not hold it. A chunk of a published blob has its xxh3 kept, so the next send
        of it can be a sendfile. Runs in a worker thread."""
        session = self.sessions.get(blob)
        try:
            if session is not None and session.holds(index):
                checksum = session.partial.checksums.get(index)
                data = session.partial.read_chunk(index)
                if checksum is not None and session.holds(index):
                    return OutgoingChunk(checksum, len(data), data=data)
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # published and closed meanwhile: read it from the store
        try:
            with open(self.store.blob_path(blob), "rb") as file:
                size = os.fstat(file.fileno()).st_size
                plan = ChunkPlan.for_blob(size, self.config.chunk_size)
                if not 0 <= index < plan.count:
                    return None
                offset, length = plan.span(index)
                data = os.pread(file.fileno(), length, offset)
        except (OSError, ValueError):
            return None
        checksum = chunk_checksum(data)
        # from a worker thread: each dict operation is atomic, and an entry lost to a race
        # with the event loop only costs one more read of that chunk later
        self._published_checksums.setdefault(blob, {})[index] = checksum
        return OutgoingChunk(checksum, len(data), data=data)

    # -- PeerMessenger: what blob sessions ask of the links -------------------------------

    def send_request(self, peer: str, blob: str, index: int) -> None:
        link = self.links.get(peer)
        if link is not None:
            link.send(Request(blob, index, self._receiving()))

    def _receiving(self) -> int:
        """The peers sending us chunks now, over all our blobs, as our requests tell it."""
        return min(receiving_from(session.swarm for session in self.sessions.values()
                                  if session.swarm is not None), MAX_RECEIVING)

    def send_cancel(self, peer: str, blob: str, index: int) -> None:
        link = self.links.get(peer)
        if link is not None:
            link.send(Cancel(blob, index))

    def announce_have(self, blob: str, index: int) -> None:
        for link in self.links.values():
            if blob in link.interested or blob in link.joined:
                link.send(Have(blob, index))

    def ban(self, peer: str, reason: str) -> None:
        if peer not in self.banned:
            self.banned.add(peer)
            self.counters.bans += 1
        link = self.links.get(peer)
        if link is not None:
            link.scope.cancel()

    def session_started(self, session: BlobSession) -> None:
        self.sessions[session.digest] = session
        for link in list(self.links.values()):
            self._announce_session(link, session)

    async def wait_for_bitmaps(self, session: BlobSession) -> None:
        with trio.move_on_after(BITMAP_WAIT):
            while not all(session.digest in link.joined for link in self.links.values()):
                await trio.sleep(0.01)

    def session_ended(self, session: BlobSession) -> None:
        if self.sessions.get(session.digest) is session:
            del self.sessions[session.digest]
        partial = session.partial
        if partial is not None and partial.complete and self.store.has_blob(session.digest):
            # its chunks' xxh3s, as committed: serving them needs no reading then
            self._published_checksums[session.digest] = dict(partial.checksums)

    def _announce_session(self, link: PeerLink, session: BlobSession) -> None:
        link.send(Interest(session.digest, session.descriptor.size, session.plan.chunk_size))
        bitmap = session.partial.bitmap
        link.send(BitmapMessage(session.digest, bitmap.to_bytes(), bitmap.size))

    # -- observability --------------------------------------------------------------------

    def status(self) -> dict:
        return {"node_id": self.node_id, "cluster": self.config.cluster,
                "listen_port": self.listen_port, "peers": len(self.links),
                "origin_bytes": self.origin.counters.bytes_received,
                **self.counters.__dict__,
                "sessions": [{"blob": digest, "size": s.descriptor.size,
                              "held": s.progress.held, "state": s.progress.state,
                              "from_origin": s.progress.from_origin,
                              "from_peers": s.progress.from_peers,
                              "swarm": s.swarm.snapshot() if s.swarm is not None else None}
                             for digest, s in self.sessions.items()]}

    def peers(self) -> list[dict]:
        return [link.describe() for link in self.links.values()]

    def report(self) -> dict:
        """What this node holds and fetches, for ``status --cluster``."""
        return {"node_id": self.node_id, "refs": [record.ref for record in self.store.refs()],
                "sessions": [{"blob": digest, "size": s.descriptor.size, "held": s.progress.held,
                              "state": s.progress.state} for digest, s in self.sessions.items()]}

    async def cluster_report(self, timeout: float = CLUSTER_QUERY_SECONDS) -> list[dict]:
        """Our report and those of the peers that answer within ``timeout``."""
        nonce = self.rng.getrandbits(32)
        replies: dict[str, dict] = {}
        self._status_queries[nonce] = replies
        try:
            asked = set(self.links)
            for link in list(self.links.values()):
                link.send(StatusQuery(nonce))
            with trio.move_on_after(timeout):
                while not asked <= set(replies) | (asked - set(self.links)):
                    await trio.sleep(0.02)
        finally:
            del self._status_queries[nonce]
        return [self.report(), *replies.values()]

    def preload_cluster(self, ref: str) -> int:
        """Ask every connected peer to fetch ``ref``, and fetch it here; returns the number
        of peers asked."""
        for link in list(self.links.values()):
            link.send(Preload(ref))
        self.on_preload(ref)
        return len(self.links)

"""Userspace proxies that put a "far" or a "faulty" path in front of a loopback origin.

The kernel here has no netem (see LAB-NOTES "A far origin on loopback"), so delay and
per-connection limits are emulated in userspace:

- ``Proxy``: a TCP proxy. Each direction holds its data for ``delay_s`` (a queue of
  ``(due_time, data)``, so delay adds latency without serialising throughput), and the
  downstream (server to client) direction can be capped per connection (``conn_rate``, as a
  TCP window over a long RTT would) and for all connections together (``link_rate``).
- ``FaultyHttpProxy``: an HTTP/1.1 proxy that follows message boundaries on keep-alive
  connections and, by a ``FaultPlan``, answers 503 or 429 instead of forwarding, or cuts the
  connection part-way through a response body.

Both run on an asyncio loop in a daemon thread of the current process (``start()``/``stop()``
or ``with``), or in their own process (``ProxyProcess``, or ``python -m tests.support.proxy``)
so that the proxy's CPU and GIL stay apart from a benchmark client's. To have both delay and
faults, chain two proxies: ``FaultyHttpProxy(target=Proxy(...).host)``.

Command line::

    python -m tests.support.proxy --target 127.0.0.1:5000 [--listen-port N]
        [--delay-ms 20] [--no-handshake] [--conn-rate 4MB] [--link-rate 40MB]
        [--faults '{"path_pattern": "/blobs/", "unavailable": 0.1, "retry_after_s": 1}']
        [--stats-file F]

prints ``listening 127.0.0.1:PORT`` as its first line, rewrites the stats file (JSON
counters) every 0.2 s, and exits 0 after writing the stats once more on SIGTERM or SIGINT.
``--faults`` selects ``FaultyHttpProxy``; it cannot be combined with delay or rates.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import http
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

LOOPBACK = "127.0.0.1"

# Bytes per socket read. asyncio's own selector transport reads 256 KiB at a time
# (selector_events.max_size); large reads keep Python's per-chunk work small next to the
# copying (LAB-NOTES: the proxy, not the client, is the bottleneck on 2 cores).
CHUNK_BYTES = 256 * 1024
# A rate-capped direction reads at most this many seconds' worth of its rate at once, so
# its pacing is smooth at 50 steps per second rather than one burst per 256 KiB ...
RATE_QUANTUM_S = 0.02
# ... but never less than this per read, so a slow cap does not cost a wake-up per packet.
MIN_RATE_CHUNK_BYTES = 16 * 1024
# Bytes a direction may hold for its delay before it stops reading from its source: the
# window of one TCP flow over a long path. Linux's default tcp_rmem maximum is 6 MiB, and a
# flow cannot have more than its receive window in flight; 4 MiB stays below it.
MAX_IN_FLIGHT_BYTES = 4 * 1024 * 1024
# Transport write buffer above which a proxy stops reading the other side. asyncio's
# default (64 KiB) is a quarter of one read.
WRITE_BUFFER_HIGH_BYTES = 1024 * 1024
# StreamReader limit of FaultyHttpProxy: the largest message head it accepts, and (times 2)
# the buffer at which it stops reading a socket. Distribution's heads are under 2 KiB.
HTTP_STREAM_LIMIT_BYTES = 1024 * 1024
# How long a cut waits for the bytes before it to leave the socket (so the client gets
# exactly them) before resetting anyway; a client that stops reading must not stall us.
CUT_FLUSH_TIMEOUT_S = 2.0
CUT_FLUSH_POLL_S = 0.001
# How often the command-line proxy rewrites its stats file (the benchmark harness polls it).
STATS_INTERVAL_S = 0.2
# How long ProxyProcess waits for the child to exit after SIGTERM before it kills it.
STOP_TIMEOUT_S = 5.0
LISTEN_BACKLOG = 128

# Fault kinds, the keys of ``faults_injected``.
FAULT_UNAVAILABLE = "503"
FAULT_THROTTLE = "429"
FAULT_CUT = "cut"
FAULT_KINDS = (FAULT_UNAVAILABLE, FAULT_THROTTLE, FAULT_CUT)

# Status and distribution-spec error code of the two answers the proxy makes up itself.
_FAULT_STATUS = {FAULT_UNAVAILABLE: 503, FAULT_THROTTLE: 429}
_FAULT_CODE = {FAULT_UNAVAILABLE: "UNAVAILABLE", FAULT_THROTTLE: "TOOMANYREQUESTS"}

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmg]i?)?b?(?:/s)?\s*$", re.IGNORECASE)
_RATE_UNITS = {
    "": 1,
    "k": 10**3, "m": 10**6, "g": 10**9,
    "ki": 2**10, "mi": 2**20, "gi": 2**30,
}


def parse_rate(text: str) -> int:
    """Bytes per second from "500KB", "4MB", "100MiB", "1.5GB/s" or "4000000".

    K/M/G are powers of 10 and Ki/Mi/Gi powers of 2; the unit letters are case-insensitive
    and a trailing "B" or "/s" is optional. Raises ValueError for anything else or for 0.
    """
    match = _RATE_RE.match(text)
    if match is None:
        raise ValueError(f"not a rate: {text!r} (expected e.g. 4MB, 100MiB, 500KB)")
    number, unit = match.groups()
    rate = int(float(number) * _RATE_UNITS[(unit or "").lower()])
    if rate <= 0:
        raise ValueError(f"rate must be positive: {text!r}")
    return rate


def _rate_or_none(rate: float | str | None) -> float | None:
    """A rate in bytes/s from a number, a ``parse_rate`` string, or None (no cap)."""
    if rate is None or isinstance(rate, int | float):
        return rate
    return parse_rate(rate)


def _split_target(target: str) -> tuple[str, int]:
    """("host", port) from "host:port"."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"target must be host:port, got {target!r}")
    return host, int(port)


def _reset_on_close(transport: asyncio.BaseTransport) -> None:
    """Make closing ``transport`` send a TCP RST instead of a FIN (SO_LINGER 0)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _LoopThreadServer:
    """A listening socket on 127.0.0.1 served by an asyncio loop in a daemon thread.

    ``start()`` binds before it returns (so ``host`` is valid at once) and raises if the
    server could not start; ``stop()`` closes the listener, aborts live connections and
    joins the thread; both are idempotent and must be called from outside the loop thread.
    Counters are plain ints written by the loop thread; read them from any thread.
    """

    def __init__(self, *, listen_port: int = 0) -> None:
        self._listen_port = listen_port
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self.bytes_down = 0
        self.bytes_up = 0
        self.connections = 0

    @property
    def port(self) -> int:
        """The listening port; only valid after ``start()``."""
        if self._port is None:
            raise RuntimeError("proxy not started")
        return self._port

    @property
    def host(self) -> str:
        """"127.0.0.1:PORT", the address clients use instead of the target's."""
        return f"{LOOPBACK}:{self.port}"

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters, as written to the stats file."""
        return {
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "connections": self.connections,
        }

    def start(self) -> Self:
        """Bind, start serving in a new thread, and return self."""
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        sock = socket.create_server((LOOPBACK, self._listen_port), backlog=LISTEN_BACKLOG)
        self._port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(sock, ready), name=f"{type(self).__name__}-{self._port}",
            daemon=True,
        )
        self._thread.start()
        ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise self._start_error
        return self

    def stop(self) -> None:
        """Stop serving, abort every connection, and join the thread."""
        if self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, sock: socket.socket, ready: threading.Event) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            try:
                server = loop.run_until_complete(self._serve(sock))
            except BaseException as exc:  # reported to start() in the caller's thread
                sock.close()
                self._start_error = exc
                return
            finally:
                ready.set()
            loop.run_forever()
            server.close()
            loop.run_until_complete(self._close_connections())
            loop.run_until_complete(server.wait_closed())
        finally:
            loop.close()

    async def _serve(self, sock: socket.socket) -> asyncio.Server:
        """Start serving on ``sock``."""
        raise NotImplementedError

    async def _close_connections(self) -> None:
        """Abort every live connection (the loop is about to close)."""
        raise NotImplementedError


# --------------------------------------------------------------------------- TCP proxy


class _TokenBucket:
    """A token bucket that lets takers run into debt.

    ``take(n, now)`` always grants ``n`` bytes and returns how long the taker must pause so
    that, over any interval, no more than ``burst + rate * interval`` bytes pass (plus one
    read per taker in flight). Sharing one bucket between flows caps their sum, and because
    a later taker inherits the debt of earlier ones, flows take turns.
    """

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp: float | None = None

    def take(self, n: int, now: float) -> float:
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= n
        return -self._tokens / self.rate if self._tokens < 0 else 0.0


class _Flow:
    """One direction of a proxied connection: read from ``src``, deliver to ``dst``.

    Each read is charged to ``buckets`` (pausing the source while in debt), stamped with
    ``due = max(now, not_before) + delay`` and queued; a single timer delivers the queue in
    order. The source is paused while any reason in ``_paused_by`` holds: rate debt, too
    many bytes held (``MAX_IN_FLIGHT_BYTES``), a full destination buffer, or set-up. The
    source's EOF travels through the queue like data and becomes a half-close of ``dst``.
    """

    def __init__(
        self,
        pipe: _Pipe,
        src: _Endpoint,
        dst: _Endpoint,
        *,
        delay: float,
        not_before: float,
        buckets: tuple[_TokenBucket, ...],
        chunk: int,
        count: Callable[[int], None],
    ) -> None:
        self._pipe = pipe
        self._loop = pipe.loop
        self._src = src
        self._dst = dst
        self._delay = delay
        self._not_before = not_before
        self._buckets = buckets
        self._count = count
        self._buffer = memoryview(bytearray(chunk))
        self._queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self._held = 0
        self._timer: asyncio.TimerHandle | None = None
        self._rate_timer: asyncio.TimerHandle | None = None
        self._paused_by = {"setup"}
        self._source_ended = False
        self.done = False

    @property
    def buffer(self) -> memoryview:
        return self._buffer

    def received(self, nbytes: int) -> None:
        """``nbytes`` were read into ``buffer``."""
        data = bytes(self._buffer[:nbytes])
        now = self._loop.time()
        if self._buckets:
            wait = max(bucket.take(nbytes, now) for bucket in self._buckets)
            if wait > 0:
                self.pause("rate")
                self._rate_timer = self._loop.call_later(wait, self.resume, "rate")
        self._enqueue(data, now)

    def source_ended(self) -> None:
        """The source sent EOF: forward it once the data before it is delivered."""
        self._source_ended = True
        self._enqueue(None, self._loop.time())

    def pause(self, reason: str) -> None:
        self._paused_by.add(reason)
        if not self._source_ended:
            self._src.transport.pause_reading()

    def resume(self, reason: str) -> None:
        self._paused_by.discard(reason)
        # After EOF the transport has dropped its reader; resuming would read EOF again.
        if not self._paused_by and not self._source_ended:
            self._src.transport.resume_reading()

    def cancel(self) -> None:
        """Drop everything queued; the pipe is being torn down."""
        for timer in (self._timer, self._rate_timer):
            if timer is not None:
                timer.cancel()
        self._queue.clear()

    def _enqueue(self, item: bytes | None, now: float) -> None:
        if self._delay == 0 and not self._queue:
            self._deliver(item)
            return
        self._queue.append((max(now, self._not_before) + self._delay, item))
        if item is not None:
            self._held += len(item)
            if self._held > MAX_IN_FLIGHT_BYTES:
                self.pause("window")
        if self._timer is None:
            self._timer = self._loop.call_at(self._queue[0][0], self._flush)

    def _flush(self) -> None:
        self._timer = None
        now = self._loop.time()
        while self._queue and self._queue[0][0] <= now:
            _, item = self._queue.popleft()
            if item is not None:
                self._held -= len(item)
            self._deliver(item)
        if self._held <= MAX_IN_FLIGHT_BYTES:
            self.resume("window")
        if self._queue:
            self._timer = self._loop.call_at(self._queue[0][0], self._flush)

    def _deliver(self, item: bytes | None) -> None:
        transport = self._dst.transport
        if transport.is_closing():
            return
        if item is None:
            transport.write_eof()
            self.done = True
            self._pipe.flow_done()
        else:
            self._count(len(item))  # before the write, so a client never sees more
            transport.write(item)


class _Endpoint(asyncio.BufferedProtocol):
    """One socket of a pipe; reads feed ``outflow``, and ``inflow`` writes to it."""

    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe
        self.transport: asyncio.Transport | None = None
        self.outflow: _Flow | None = None
        self.inflow: _Flow | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.pause_reading()  # until both sides are connected and the flows exist
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH_BYTES)
        self.pipe.endpoint_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.outflow.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.outflow.received(nbytes)

    def eof_received(self) -> bool:
        self.outflow.source_ended()
        return True  # keep the transport open: the other direction may still carry data

    def pause_writing(self) -> None:
        self.inflow.pause("destination")

    def resume_writing(self) -> None:
        self.inflow.resume("destination")

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe.endpoint_lost()


class _Pipe:
    """One proxied connection: a client endpoint, a server endpoint, and a flow each way.

    It closes both sockets once both directions have delivered their EOF; if either socket
    is lost before that (reset, write error, or ``abort()``), both are reset.
    """

    def __init__(self, proxy: Proxy, loop: asyncio.AbstractEventLoop) -> None:
        self.proxy = proxy
        self.loop = loop
        self.client = _Endpoint(self)
        self.server = _Endpoint(self)
        self._accepted_at = loop.time()
        self._flows: tuple[_Flow, ...] = ()
        self.connect_task: asyncio.Task | None = None
        self._closed = False

    def endpoint_made(self, endpoint: _Endpoint) -> None:
        if endpoint is self.client:
            self.proxy.connections += 1
            self.proxy._pipes.add(self)
            self.connect_task = self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        host, port = self.proxy.target
        try:
            await self.loop.create_connection(lambda: self.server, host, port)
        except OSError:
            self.abort()
            return
        if self._closed:  # the client left while we connected
            self.server.transport.abort()
            return
        proxy = self.proxy
        delay = proxy.delay_s
        up = _Flow(
            self, self.client, self.server,
            delay=delay,
            not_before=self._accepted_at + 2 * delay if proxy.handshake else 0.0,
            buckets=(), chunk=CHUNK_BYTES, count=proxy._count_up,
        )
        buckets = proxy._link_buckets
        if proxy.conn_rate is not None:
            buckets += (_TokenBucket(proxy.conn_rate, proxy._down_chunk),)
        down = _Flow(
            self, self.server, self.client,
            delay=delay, not_before=0.0,
            buckets=buckets, chunk=proxy._down_chunk, count=proxy._count_down,
        )
        self.client.outflow = self.server.inflow = up
        self.server.outflow = self.client.inflow = down
        self._flows = (up, down)
        up.resume("setup")
        down.resume("setup")

    def flow_done(self) -> None:
        if all(flow.done for flow in self._flows):
            self._closed = True
            self.proxy._pipes.discard(self)
            self.client.transport.close()
            self.server.transport.close()

    def endpoint_lost(self) -> None:
        if not self._closed:
            self.abort()

    def abort(self) -> None:
        """Reset both sockets now, dropping anything queued."""
        self._closed = True
        self.proxy._pipes.discard(self)
        for flow in self._flows:
            flow.cancel()
        for endpoint in (self.client, self.server):
            transport = endpoint.transport
            if transport is not None and not transport.is_closing():
                _reset_on_close(transport)
                transport.abort()


class Proxy(_LoopThreadServer):
    """A TCP proxy on 127.0.0.1 that makes ``target`` look far away and narrow.

    - ``delay_s``: one-way delay added in each direction (RTT grows by ``2 * delay_s``).
      Data is held until its due time without blocking what follows, up to
      ``MAX_IN_FLIGHT_BYTES`` per direction (so one connection peaks near
      ``MAX_IN_FLIGHT_BYTES / delay_s``, as a TCP window would limit it). Resets and the
      upstream connect are not delayed.
    - ``handshake``: with a delay, a new connection's first client bytes are also held for
      one round trip (``2 * delay_s``) after accept, as a TCP handshake over the long path
      would; so a fresh connection's first response byte comes after 2 RTTs, a reused one's
      after 1.
    - ``conn_rate``: bytes/s cap of each connection's downstream (server to client)
      direction; ``link_rate``: bytes/s cap of all connections' downstream together. Both
      are token buckets; give numbers or ``parse_rate`` strings, or None for no cap.

    Counters: ``bytes_down`` (server to client), ``bytes_up`` (client to server), both
    counted as handed to the destination socket, and ``connections`` (accepted). A
    half-close in one direction is forwarded as a half-close.
    """

    def __init__(
        self,
        target: str,
        *,
        listen_port: int = 0,
        delay_s: float = 0.0,
        handshake: bool = True,
        conn_rate: float | str | None = None,
        link_rate: float | str | None = None,
    ) -> None:
        super().__init__(listen_port=listen_port)
        self.target = _split_target(target)
        self.delay_s = delay_s
        self.handshake = handshake
        self.conn_rate = _rate_or_none(conn_rate)
        self.link_rate = _rate_or_none(link_rate)
        caps = [rate for rate in (self.conn_rate, self.link_rate) if rate is not None]
        self._down_chunk = (
            max(MIN_RATE_CHUNK_BYTES, min(CHUNK_BYTES, int(min(caps) * RATE_QUANTUM_S)))
            if caps else CHUNK_BYTES
        )
        self._link_buckets = (
            (_TokenBucket(self.link_rate, CHUNK_BYTES),) if self.link_rate is not None else ()
        )
        self._pipes: set[_Pipe] = set()

    def _count_down(self, nbytes: int) -> None:
        self.bytes_down += nbytes

    def _count_up(self, nbytes: int) -> None:
        self.bytes_up += nbytes

    async def _serve(self, sock: socket.socket) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _Pipe(self, loop).client, sock=sock)

    async def _close_connections(self) -> None:
        connecting = [pipe.connect_task for pipe in self._pipes if pipe.connect_task]
        for pipe in list(self._pipes):
            pipe.abort()
        for task in connecting:
            task.cancel()
        await asyncio.gather(*connecting, return_exceptions=True)
        await asyncio.sleep(0)  # let the transports run their connection_lost callbacks


# --------------------------------------------------------------------- HTTP fault proxy


@dataclass(frozen=True)
class FaultPlan:
    """Which requests ``FaultyHttpProxy`` fails, and how.

    Only requests whose target matches ``path_pattern`` are eligible; they are numbered
    1, 2, 3, ... in the order the proxy reads them (over all connections). Request ``n``
    gets the fault of the first ``*_at`` set that holds ``n``; otherwise one number ``u``
    from ``random.Random(seed)`` (drawn for every eligible request, so the schedule only
    depends on the order of requests) picks 503 if ``u < unavailable``, else 429 if
    ``u < unavailable + throttle``, else a cut if below the sum of all three fractions.
    """

    # re.search() against the request target (path and query); "" matches every request.
    path_pattern: str = ""
    # Seed of the fraction draws.
    seed: int = 0
    # Fraction / request numbers answered "503 Service Unavailable" without forwarding.
    unavailable: float = 0.0
    unavailable_at: frozenset[int] = frozenset()
    # Retry-After seconds on those 503s; None sends no Retry-After.
    retry_after_s: int | None = None
    # Fraction / request numbers answered "429 Too Many Requests" without forwarding.
    throttle: float = 0.0
    throttle_at: frozenset[int] = frozenset()
    # Retry-After seconds on the 429s (a 429 without one is not useful to a client).
    throttle_retry_after_s: int = 1
    # Fraction / request numbers whose connection is cut after ``cut_after_bytes`` bytes
    # of the response body. A body no longer than that passes whole and counts no fault.
    cut: float = 0.0
    cut_at: frozenset[int] = frozenset()
    cut_after_bytes: int = 0
    # True: the cut resets the client connection (SO_LINGER 0, the client sees ECONNRESET);
    # False: it closes it (FIN, the client sees a body ending early).
    cut_with_reset: bool = True

    def __post_init__(self) -> None:
        for name in ("unavailable_at", "throttle_at", "cut_at"):
            object.__setattr__(self, name, frozenset(getattr(self, name)))
        fractions = (self.unavailable, self.throttle, self.cut)
        if any(f < 0 for f in fractions) or sum(fractions) > 1:
            raise ValueError("fault fractions must be >= 0 and sum to at most 1")
        if self.cut_after_bytes < 0:
            raise ValueError("cut_after_bytes must be >= 0")
        re.compile(self.path_pattern)

    def decide(self, n: int, u: float) -> str | None:
        """The fault kind (``FAULT_*``) for eligible request ``n`` and draw ``u``, or None."""
        for kind, numbers in (
            (FAULT_UNAVAILABLE, self.unavailable_at),
            (FAULT_THROTTLE, self.throttle_at),
            (FAULT_CUT, self.cut_at),
        ):
            if n in numbers:
                return kind
        for kind, fraction in (
            (FAULT_UNAVAILABLE, self.unavailable),
            (FAULT_THROTTLE, self.throttle),
            (FAULT_CUT, self.cut),
        ):
            if u < fraction:
                return kind
            u -= fraction
        return None

    def to_json(self) -> str:
        """This plan as the JSON that ``from_json`` and ``--faults`` accept."""
        fields = dataclasses.asdict(self)
        for name, value in fields.items():
            if isinstance(value, frozenset):
                fields[name] = sorted(value)
        return json.dumps(fields)

    @classmethod
    def from_json(cls, text: str) -> FaultPlan:
        """A plan from a JSON object of field names (lists for the ``*_at`` sets)."""
        return cls(**json.loads(text))


@dataclass
class _Request:
    """What the proxy needs from a request head; ``head`` is forwarded unchanged."""

    head: bytes
    method: str
    target: str
    body: tuple[str, int]  # framing, see _framing()
    keep_alive: bool


@dataclass
class _Response:
    head: bytes
    status: int
    headers: Mapping[str, str]
    keep_alive: bool


# Message body framings (RFC 9112 section 6): ("none", 0), ("length", n), ("chunked", 0),
# and ("close", 0) for a response body that ends when the server closes.
_NO_BODY = ("none", 0)


def _parse_head(head: bytes) -> tuple[list[str], dict[str, str]]:
    """The start line's three parts and the headers (lower-case names, repeats joined)."""
    lines = head.decode("latin-1").split("\r\n")
    start = lines[0].split(" ", 2)
    if len(start) < 2:
        raise ValueError(f"bad start line: {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"bad header line: {line!r}")
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return start, headers


def _framing(headers: Mapping[str, str], default: tuple[str, int]) -> tuple[str, int]:
    """Chunked if the last transfer coding is chunked, else Content-Length, else default."""
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if coding.rsplit(",", 1)[-1].strip().lower() == "chunked":
            return ("chunked", 0)
        return ("close", 0)
    if "content-length" in headers:
        return ("length", int(headers["content-length"]))
    return default


def _keep_alive(version: str, headers: Mapping[str, str]) -> bool:
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


def _parse_request(head: bytes) -> _Request:
    (method, target, version), headers = _parse_head(head)
    body = _framing(headers, _NO_BODY)
    if body == ("close", 0):
        raise ValueError("request with a transfer coding that is not chunked")
    return _Request(head, method, target, body, _keep_alive(version, headers))


def _parse_response(head: bytes) -> _Response:
    start, headers = _parse_head(head)
    return _Response(head, int(start[1]), headers, _keep_alive(start[0], headers))


def _response_framing(request: _Request, response: _Response) -> tuple[str, int]:
    if request.method == "HEAD" or response.status < 200 or response.status in (204, 304):
        return _NO_BODY
    return _framing(response.headers, ("close", 0))


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The next message head, or None if the peer closed cleanly before sending one."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None


class _BodyCopier:
    """Copies one message body between streams, stopping after ``budget`` body bytes.

    ``copy(framing)`` returns True when the whole body went through, False when the budget
    ran out first. ``count`` is told the body bytes (not chunk framing) passed on.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        count: Callable[[int], None],
        budget: int | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._count = count
        self._budget = budget

    async def copy(self, framing: tuple[str, int]) -> bool:
        kind, length = framing
        if kind == "none":
            return True
        if kind == "length":
            return await self._copy(length)
        if kind == "close":
            return await self._copy(None)
        return await self._copy_chunked()

    async def _copy(self, length: int | None) -> bool:
        """Copy ``length`` bytes, or up to EOF if None."""
        while length is None or length > 0:
            want = CHUNK_BYTES if length is None else min(length, CHUNK_BYTES)
            if self._budget is not None:
                if self._budget == 0:
                    return False
                want = min(want, self._budget)
            data = await self._reader.read(want)
            if not data:
                if length is None:
                    return True
                raise asyncio.IncompleteReadError(b"", length)
            self._count(len(data))  # before the write, so a client never sees more
            self._writer.write(data)
            if length is not None:
                length -= len(data)
            if self._budget is not None:
                self._budget -= len(data)
            await self._writer.drain()
        return True

    async def _copy_chunked(self) -> bool:
        while True:
            size_line = await self._reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                self._writer.write(size_line)
                while (trailer := await self._reader.readuntil(b"\r\n")) != b"\r\n":
                    self._writer.write(trailer)
                self._writer.write(b"\r\n")
                await self._writer.drain()
                return True
            if self._budget == 0:
                return False
            self._writer.write(size_line)
            if not await self._copy(size):
                return False
            self._writer.write(await self._reader.readexactly(2))


def _fault_response(kind: str, retry_after_s: int | None, head_only: bool) -> bytes:
    """A complete, keep-alive-safe error response in the distribution spec's format."""
    status = _FAULT_STATUS[kind]
    body = json.dumps(
        {"errors": [{"code": _FAULT_CODE[kind], "message": "fault injected by test proxy"}]}
    ).encode()
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if retry_after_s is not None:
        lines.append(f"Retry-After: {retry_after_s}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


class FaultyHttpProxy(_LoopThreadServer):
    """An HTTP/1.1 reverse proxy to ``target`` that injects faults by a ``FaultPlan``.

    Each client connection gets its own upstream connection, opened at its first forwarded
    request (and again if the server closed it while idle). Requests are handled one at a
    time per connection; heads are forwarded byte for byte, bodies streamed in
    ``CHUNK_BYTES`` pieces with Content-Length, chunked or close-delimited framing, so
    bodies of any size pass without being buffered. A 503 or 429 fault answers the request
    itself (after reading and dropping its body) and keeps the connection open; a cut
    forwards the response head and ``cut_after_bytes`` body bytes, waits for them to leave
    the socket, then closes or resets the client connection and closes the upstream one.
    ``Expect: 100-continue`` and protocol upgrades are not supported.

    Counters: ``bytes_down`` (response body bytes forwarded to clients; not heads, not
    the bodies of injected answers), ``bytes_up`` (request body bytes forwarded),
    ``connections``, ``requests`` (request heads read), ``faults_injected`` (by
    ``FAULT_*`` kind). Bytes are counted just before they are handed to the socket, so a
    counter read after a client got its data includes that data.
    """

    def __init__(
        self, target: str, faults: FaultPlan | None = None, *, listen_port: int = 0
    ) -> None:
        super().__init__(listen_port=listen_port)
        self.target = _split_target(target)
        self.faults = faults if faults is not None else FaultPlan()
        self.requests = 0
        self.faults_injected = dict.fromkeys(FAULT_KINDS, 0)
        self._pattern = re.compile(self.faults.path_pattern)
        self._random = random.Random(self.faults.seed)
        self._eligible = 0
        self._tasks: set[asyncio.Task] = set()

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "requests": self.requests,
            "faults_injected": dict(self.faults_injected),
        }

    async def _serve(self, sock: socket.socket) -> asyncio.Server:
        return await asyncio.start_server(self._handle, sock=sock, limit=HTTP_STREAM_LIMIT_BYTES)

    async def _close_connections(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let the transports run their connection_lost callbacks

    def _count_down(self, nbytes: int) -> None:
        self.bytes_down += nbytes

    def _count_up(self, nbytes: int) -> None:
        self.bytes_up += nbytes

    def _choose_fault(self, target: str) -> str | None:
        if not self._pattern.search(target):
            return None
        self._eligible += 1
        return self.faults.decide(self._eligible, self._random.random())

    async def _handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        """Serve one client connection until either side closes or a fault ends it."""
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections += 1
        client_writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH_BYTES)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        broken = False
        try:
            while True:
                head = await _read_head(client_reader)
                if head is None:
                    return
                request = _parse_request(head)
                self.requests += 1
                fault = self._choose_fault(request.target)
                if fault in _FAULT_STATUS:
                    await self._answer_fault(fault, request, client_reader, client_writer)
                    if not request.keep_alive:
                        return
                    continue
                if upstream is None or upstream[0].at_eof():
                    if upstream is not None:
                        upstream[1].close()
                    upstream = await self._open_upstream()
                if not await self._exchange(request, fault, client_reader, client_writer,
                                            *upstream):
                    return
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            broken = True
        finally:
            if broken:  # the exchange failed part-way: reset, so the client cannot miss it
                _reset_on_close(client_writer.transport)
                client_writer.transport.abort()
            else:
                client_writer.close()
            if upstream is not None:
                upstream[1].close()
            self._tasks.discard(task)

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self.target
        reader, writer = await asyncio.open_connection(host, port, limit=HTTP_STREAM_LIMIT_BYTES)
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH_BYTES)
        return reader, writer

    async def _answer_fault(
        self,
        fault: str,
        request: _Request,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
    ) -> None:
        drop = _BodyCopier(client_reader, _NullWriter(), count=lambda n: None)
        await drop.copy(request.body)
        retry_after = (
            self.faults.retry_after_s if fault == FAULT_UNAVAILABLE
            else self.faults.throttle_retry_after_s
        )
        self.faults_injected[fault] += 1  # before the write, so a client never sees more
        client_writer.write(_fault_response(fault, retry_after, request.method == "HEAD"))
        await client_writer.drain()

    async def _exchange(
        self,
        request: _Request,
        fault: str | None,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        server_reader: asyncio.StreamReader,
        server_writer: asyncio.StreamWriter,
    ) -> bool:
        """Forward one request and its response; True if the connection may carry another."""
        server_writer.write(request.head)
        await _BodyCopier(client_reader, server_writer, self._count_up).copy(request.body)
        while True:
            head = await _read_head(server_reader)
            if head is None:
                raise asyncio.IncompleteReadError(b"", None)
            response = _parse_response(head)
            if response.status == 101:
                raise ValueError("protocol upgrades are not supported")
            client_writer.write(head)
            if response.status >= 200:
                break
        budget = self.faults.cut_after_bytes if fault == FAULT_CUT else None
        body = _response_framing(request, response)
        copier = _BodyCopier(server_reader, client_writer, self._count_down, budget)
        if not await copier.copy(body):
            await self._cut(client_writer)
            return False
        await client_writer.drain()
        return request.keep_alive and response.keep_alive and body[0] != "close"

    async def _cut(self, client_writer: asyncio.StreamWriter) -> None:
        """Close or reset the client connection once the bytes written so far are out."""
        await client_writer.drain()
        sock = client_writer.transport.get_extra_info("socket")
        deadline = time.monotonic() + CUT_FLUSH_TIMEOUT_S
        while time.monotonic() < deadline and _unsent_bytes(sock) > 0:
            await asyncio.sleep(CUT_FLUSH_POLL_S)
        self.faults_injected[FAULT_CUT] += 1
        if self.faults.cut_with_reset:
            _reset_on_close(client_writer.transport)
            client_writer.transport.abort()
        else:
            client_writer.close()


def _unsent_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's send queue not yet acknowledged by the peer (Linux SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


class _NullWriter:
    """A StreamWriter stand-in that drops what it is given (for request bodies of faults)."""

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass


# -------------------------------------------------------------------- separate process


class ProxyProcess:
    """``Proxy`` or ``FaultyHttpProxy`` in a child Python process (its own GIL and CPU).

    Takes ``Proxy``'s settings, or ``faults`` for a ``FaultyHttpProxy`` (not both).
    ``start()`` returns once the child listens; ``stats()`` reads its latest counters
    (at most ``STATS_INTERVAL_S`` old, {} before the first write); ``stop()`` sends SIGTERM,
    waits for a clean exit (killing after ``STOP_TIMEOUT_S``, then raising) and returns the
    final counters.
    """

    def __init__(
        self,
        target: str,
        *,
        listen_port: int = 0,
        delay_s: float = 0.0,
        handshake: bool = True,
        conn_rate: float | str | None = None,
        link_rate: float | str | None = None,
        faults: FaultPlan | None = None,
    ) -> None:
        self._argv = [sys.executable, "-m", "tests.support.proxy",
                      "--target", target, "--listen-port", str(listen_port)]
        if delay_s:
            self._argv += ["--delay-ms", repr(delay_s * 1000)]
        if not handshake:
            self._argv.append("--no-handshake")
        for flag, rate in (("--conn-rate", conn_rate), ("--link-rate", link_rate)):
            if rate is not None:
                self._argv += [flag, str(int(_rate_or_none(rate)))]
        if faults is not None:
            self._argv += ["--faults", faults.to_json()]
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._process: subprocess.Popen | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("proxy process not started")
        return self._port

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        return self._process.pid

    def start(self) -> Self:
        self._tmp = tempfile.TemporaryDirectory(prefix="p2pull-proxy-")
        self._stats_file = Path(self._tmp.name) / "stats.json"
        self._process = subprocess.Popen(
            [*self._argv, "--stats-file", str(self._stats_file)],
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self._process.stdout.readline()
        match = re.fullmatch(rf"listening {re.escape(LOOPBACK)}:(\d+)\n", line)
        if match is None:
            with contextlib.suppress(RuntimeError):
                self.stop()
            raise RuntimeError(f"proxy process did not start: first line {line!r}")
        self._port = int(match.group(1))
        return self

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads(self._stats_file.read_text())
        except FileNotFoundError:
            return {}

    def stop(self) -> dict[str, Any]:
        if self._process is None:
            return {}
        process, self._process = self._process, None
        try:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                    raise RuntimeError("proxy process ignored SIGTERM") from None
            process.stdout.close()
            if process.returncode != 0:
                raise RuntimeError(f"proxy process exited with {process.returncode}")
            return self.stats()
        finally:
            self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _write_stats(path: Path, stats: Mapping[str, Any]) -> None:
    """Replace ``path`` atomically, so a reader never sees half a file."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(stats))
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.proxy",
        description="A delaying, rate-capping TCP proxy or a fault-injecting HTTP proxy.",
    )
    parser.add_argument("--target", required=True, help="host:port to forward to")
    parser.add_argument("--listen-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="one-way delay added in each direction")
    parser.add_argument("--handshake", action=argparse.BooleanOptionalAction, default=True,
                        help="hold a new connection's first bytes for one round trip")
    parser.add_argument("--conn-rate", type=parse_rate, help="downstream cap per connection")
    parser.add_argument("--link-rate", type=parse_rate, help="downstream cap for all")
    parser.add_argument("--faults", type=FaultPlan.from_json,
                        help="a FaultPlan as JSON: run the fault-injecting HTTP proxy")
    parser.add_argument("--stats-file", type=Path, help="JSON counters, rewritten every 0.2 s")
    args = parser.parse_args(argv)

    if args.faults is not None:
        if args.delay_ms or args.conn_rate or args.link_rate:
            parser.error("--faults cannot be combined with delay or rates; chain two proxies")
        proxy = FaultyHttpProxy(args.target, args.faults, listen_port=args.listen_port)
    else:
        proxy = Proxy(
            args.target,
            listen_port=args.listen_port,
            delay_s=args.delay_ms / 1000,
            handshake=args.handshake,
            conn_rate=args.conn_rate,
            link_rate=args.link_rate,
        )

    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    with proxy:
        print(f"listening {proxy.host}", flush=True)
        while not stopping.wait(STATS_INTERVAL_S):
            if args.stats_file is not None:
                _write_stats(args.stats_file, proxy.stats())
    if args.stats_file is not None:
        _write_stats(args.stats_file, proxy.stats())
    return 0


if __name__ == "__main__":
    sys.exit(main())

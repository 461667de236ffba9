"""Hostile peers for swarm tests: plain sockets speaking the peer protocol through
``p2pull.wire.PeerConnection`` (the same sans-IO code the daemon uses), so a test can break
the protocol, or keep it and lie.

    peer = HostilePeer(daemon.port, cluster=CLUSTER, secret=secret)
    peer.handshake()                     # PeerVerified: the daemon accepted us
    peer.serve_in_background("bad-xxh3") # answer every Interest with a full bitmap and
                                         # every Request with a piece that lies
    ...
    assert peer.closed.wait(10)          # the daemon hung up on us
    peer.close()

Every socket operation has a timeout, and the background thread ends when the daemon
closes the connection or ``close`` is called.
"""

from __future__ import annotations

import os
import random
import secrets
import socket
import threading
import time

import xxhash

from p2pull.core.bitmap import Bitmap
from p2pull.core.chunks import ChunkPlan
from p2pull.errors import ProtocolError
from p2pull.wire import (NEED_DATA, Bitmap as BitmapMessage, ConnectionClosed, Interest, Line,
                         PeerConnection, PeerVerified, Piece, Ping, Pong, Reject, Request)

#: a socket read or write that waits longer than this fails the hostile peer
IO_TIMEOUT = 10.0
#: what a serving thread does: lie in answer to each Request, or push chunks unasked
MODES = ("bad-xxh3", "lying", "pushing")


class HostilePeer:
    """One connection to a daemon at 127.0.0.1:``port``, as node ``node_id``."""

    def __init__(self, port: int, *, cluster: str, secret: bytes,
                 node_id: str | None = None, seed: int = 0):
        self.port = port
        self.node_id = node_id or secrets.token_hex(16)
        self.conn = PeerConnection(self.node_id, cluster, secret, os.urandom(32), 0)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.rng = random.Random(seed)
        #: set when the daemon closed (or reset) the connection
        self.closed = threading.Event()
        self.closed_at: float | None = None
        #: the error that ended the serving thread, if any but the daemon's close
        self.error: BaseException | None = None
        self.interests: dict[str, Interest] = {}
        self.requests: list[tuple[str, int]] = []
        #: what each request said of the peers its sender receives from
        self.receiving: list[int] = []
        self.pieces_sent = 0
        #: the daemon's Line notices, in order (True: our requests wait for a slot)
        self.lines: list[bool] = []
        #: when each piece ``answers`` returned was read
        self.piece_times: list[float] = []
        #: blob digest -> its true bytes, for the ``pushing`` mode
        self.contents: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- raw bytes ------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait_closed(self, timeout: float) -> bool:
        """Read (and drop) what the daemon sends until it closes the connection; True if
        it did within ``timeout``."""
        if self._thread is not None:
            return self.closed.wait(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, min(0.5, deadline - time.monotonic())))
            try:
                if not self.sock.recv(65536):
                    self._mark_closed()
                    return True
            except socket.timeout:
                continue
            except OSError:  # reset
                self._mark_closed()
                return True
        return False

    def _mark_closed(self) -> None:
        if not self.closed.is_set():
            self.closed_at = time.monotonic()
            self.closed.set()

    # -- the handshake --------------------------------------------------------------------

    def handshake(self) -> PeerVerified:
        """Hello and Auth both ways; raises ProtocolError if the daemon's proof fails (after
        ours is sent: a peer with a wrong secret still answers), or ConnectionError if the
        daemon hangs up. The daemon's frames are fed one at a time, so that our Auth goes
        out on its Hello before its Auth is checked."""
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.sendall(self.conn.start())
        buffer = bytearray()
        while True:
            data = self.sock.recv(65536)
            if not data:
                self._mark_closed()
                raise ConnectionError("the daemon closed the connection in the handshake")
            buffer += data
            while len(buffer) >= 4:
                end = 4 + int.from_bytes(buffer[:4], "big")
                if len(buffer) < end:
                    break
                self.conn.receive_data(bytes(buffer[:end]))
                del buffer[:end]
                event = self.conn.next_event()
                reply = self.conn.data_to_send()
                if reply:
                    self.sock.sendall(reply)
                if isinstance(event, PeerVerified):
                    if buffer:
                        self.conn.receive_data(bytes(buffer))
                    return event

    # -- asking, as an honest peer would ---------------------------------------------------

    def ask(self, blob: str, size: int, chunk_size: int, indexes, receiving: int = 0) -> None:
        """Say we want ``blob`` and request chunks ``indexes`` of it, all at once, each
        request saying we receive from ``receiving`` peers."""
        self.sock.sendall(self.conn.send(Interest(blob, size, chunk_size)))
        for index in indexes:
            self.sock.sendall(self.conn.send(Request(blob, index, receiving)))

    def answers(self, count: int, timeout: float) -> list[tuple[str, int, object]]:
        """The next ``count`` answers to our requests, in order, or fewer if ``timeout``
        runs out first: ("piece", index, payload bytes) or ("reject", index, reason)."""
        found: list[tuple[str, int, object]] = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            event = self.conn.next_event()
            if event is NEED_DATA:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.sock.settimeout(min(left, 0.5))
                try:
                    data = self.sock.recv(1 << 20)
                except socket.timeout:
                    continue
                self.conn.receive_data(data)
            elif isinstance(event, Piece):
                found.append(("piece", event.index, bytes(event.payload)))
                self.piece_times.append(time.monotonic())
            elif isinstance(event, Reject):
                found.append(("reject", event.index, event.reason))
            elif isinstance(event, Line):
                self.lines.append(event.waiting)
            elif isinstance(event, Ping):
                self.sock.sendall(self.conn.send(Pong(event.nonce)))
            elif isinstance(event, ConnectionClosed):
                self._mark_closed()
                break
        return found

    # -- serving lies ---------------------------------------------------------------------

    def serve_in_background(self, mode: str) -> None:
        """Answer every Interest with a full Bitmap (we hold everything, we say) and every
        Request with a Piece of the right length that lies as ``mode`` says:

        - ``bad-xxh3``: random bytes under a checksum that is not theirs (the per-chunk
          check catches it);
        - ``lying``: random bytes under their own, correct xxh3-128 (only the blob's
          sha256 catches it);
        - ``pushing``: answer an Interest with an empty Bitmap, then send every chunk of
          that blob (true bytes from ``contents``, correct xxh3) though none was asked for.
        """
        assert mode in MODES, mode
        self._thread = threading.Thread(target=self._serve, args=(mode,), daemon=True,
                                        name=f"hostile-{self.node_id[:8]}")
        self._thread.start()

    def _serve(self, mode: str) -> None:
        try:
            while not self._stop.is_set():
                # what is buffered first: frames that came with the handshake's last one
                self.sock.settimeout(IO_TIMEOUT)
                while (event := self.conn.next_event()) is not NEED_DATA:
                    if isinstance(event, ConnectionClosed):
                        self._mark_closed()
                        return
                    self._answer(event, mode)
                self.sock.settimeout(0.2)  # short, to notice close()
                try:
                    data = self.sock.recv(1 << 20)
                except socket.timeout:
                    continue
                self.conn.receive_data(data)  # b"": the daemon closed; next_event says so
        except (ConnectionResetError, BrokenPipeError):
            self._mark_closed()
        except (OSError, ProtocolError) as exc:
            if not self._stop.is_set():
                self.error = exc
            self._mark_closed()

    def _answer(self, event, mode: str) -> None:
        if isinstance(event, Interest):
            self.interests[event.blob] = event
            plan = ChunkPlan(event.size, event.chunk_size)
            claimed = Bitmap(plan.count) if mode == "pushing" else Bitmap.full(plan.count)
            self.sock.sendall(self.conn.send(
                BitmapMessage(event.blob, claimed.to_bytes(), plan.count)))
            content = self.contents.get(event.blob)
            if mode == "pushing" and content is not None:
                for index in range(plan.count):
                    offset, length = plan.span(index)
                    payload = content[offset:offset + length]
                    for buffer in self.conn.send_piece(event.blob, index,
                                                       xxhash.xxh3_128_digest(payload),
                                                       payload):
                        self.sock.sendall(buffer)
                    self.pieces_sent += 1
        elif isinstance(event, Request):
            interest = self.interests.get(event.blob)
            if interest is None or mode == "pushing":
                return
            self.requests.append((event.blob, event.index))
            self.receiving.append(event.receiving)
            length = ChunkPlan(interest.size, interest.chunk_size).length(event.index)
            payload = self.rng.randbytes(length)
            if mode == "lying":
                checksum = xxhash.xxh3_128_digest(payload)
            else:
                checksum = xxhash.xxh3_128_digest(payload + b"!")
            for buffer in self.conn.send_piece(event.blob, event.index, checksum, payload):
                self.sock.sendall(buffer)
            self.pieces_sent += 1
        elif isinstance(event, Ping):
            self.sock.sendall(self.conn.send(Pong(event.nonce)))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "HostilePeer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

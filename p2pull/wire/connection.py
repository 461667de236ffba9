"""One peer connection as a state machine without I/O (h11's model): bytes in, events out;
messages in, bytes out.

    conn = PeerConnection(node_id, cluster, secret, challenge=os.urandom(32), listen_port=port)
    await stream.send_all(conn.start())                  # our Hello
    while True:
        event = conn.next_event()
        if out := conn.data_to_send():                   # our Auth, queued by the handshake
            await stream.send_all(out)
        if event is NEED_DATA:
            conn.receive_data(await stream.receive_some())   # b"" at the end of the stream
        elif isinstance(event, ConnectionClosed):
            break
        else:
            ...                                          # PeerVerified, Interest, Piece, ...

The handshake: both sides send Hello at once. On the peer's Hello the connection checks the
version, the cluster and that the peer is not itself, then queues its own Auth, an
HMAC-SHA256 of the peer's challenge and both node ids under the cluster secret; the caller
drains it with ``data_to_send()`` (like h2's auto-replies: the connection queues what the
protocol itself requires, and nothing else). ``send`` and ``send_piece`` put anything still
queued in front of their own bytes, so the order on the wire is right even if the caller
never drains. The peer's Auth is checked with ``hmac.compare_digest``; then ``next_event``
returns PeerVerified and any message may flow both ways.

Errors: a peer that breaks the protocol raises RemoteProtocolError from ``next_event``; a
caller that breaks it (a message before the handshake, after Goodbye, ...) gets
LocalProtocolError. Either puts the connection in the ERROR state, where every later call
raises: drop the connection.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable

from p2pull.core.chunks import PROTOCOL_VERSION
from p2pull.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from p2pull.wire.codec import (NEED_DATA, FrameDecoder, _NeedData, encode, encode_piece,
                              encode_piece_head)
from p2pull.wire.messages import (
    Auth,
    Bitmap,
    Cancel,
    ConnectionClosed,
    Event,
    Goodbye,
    Have,
    Hello,
    Interest,
    Line,
    Message,
    PeerVerified,
    Piece,
    Ping,
    Pong,
    Preload,
    Reject,
    Request,
    StatusQuery,
    StatusReply,
)

#: the context string of the handshake's HMAC, so a proof means nothing to any other use of
#: the same secret
AUTH_CONTEXT = b"p2pull/1 auth"


class State(enum.Enum):
    IDLE = "idle"        # nothing sent yet
    HELLO = "hello"      # Hello sent
    AUTH = "auth"        # Auth sent (ours), waiting for the peer's proof
    OPEN = "open"        # handshake done: any message may be sent
    CLOSED = "closed"    # Goodbye sent: nothing more
    ERROR = "error"      # the protocol was broken: the connection is unusable


US, THEM = "us", "them"
IDLE, HELLO, AUTH, OPEN, CLOSED, ERROR = State

#: the messages of an established connection
_SESSION = dict.fromkeys((Interest, Bitmap, Have, Request, Piece, Reject, Cancel, Line, Ping,
                          Pong, Preload, StatusQuery, StatusReply), OPEN)

#: The whole protocol: [role][its state][message it sends, or event] -> its next state.
#: A missing entry is a protocol error (Local for US, Remote for THEM).
TRANSITIONS: dict[str, dict[State, dict[type, State]]] = {
    US: {
        IDLE: {Hello: HELLO},                       # start()
        HELLO: {Auth: AUTH},                        # queued when the peer's Hello checks out
        AUTH: {PeerVerified: OPEN},                 # the peer's Auth checked out
        OPEN: {**_SESSION, Goodbye: CLOSED},
        CLOSED: {},
    },
    THEM: {
        IDLE: {Hello: HELLO},
        HELLO: {Auth: OPEN},                        # checked against our challenge
        OPEN: {**_SESSION, Goodbye: CLOSED},
        CLOSED: {},
    },
}


def proof(secret: bytes, challenge: bytes, prover: str, verifier: str) -> bytes:
    """What ``prover`` answers to ``verifier``'s challenge: HMAC-SHA256 under the cluster
    secret of the context, the challenge and both node ids (all of fixed length)."""
    message = AUTH_CONTEXT + challenge + prover.encode("ascii") + verifier.encode("ascii")
    return hmac.new(secret, message, hashlib.sha256).digest()


class PeerConnection:
    """One side of a peer connection; the caller does the I/O.

    ``challenge`` is 32 fresh random bytes from the caller (the connection draws
    no randomness), ``secret`` the cluster secret, ``listen_port`` where this node accepts
    peers. Bad arguments raise LocalProtocolError (they would make a bad Hello) or
    ValueError (an empty secret). ``allocate``: where Piece payloads are received into (see
    FrameDecoder); by default a fresh buffer each."""

    def __init__(self, node_id: str, cluster: str, secret: bytes, challenge: bytes,
                 listen_port: int, *,
                 allocate: Callable[[int], bytearray | memoryview] | None = None,
                 rack: str = ""):
        if not isinstance(secret, (bytes, bytearray)) or not secret:
            raise ValueError("the cluster secret must be non-empty bytes")
        self._secret = bytes(secret)
        self._hello = Hello(PROTOCOL_VERSION, node_id, cluster, challenge, listen_port, rack)
        self._decoder = FrameDecoder(allocate)
        self._outgoing = bytearray()
        self._error: ProtocolError | None = None
        self.our_state = IDLE
        self.their_state = IDLE
        #: the peer's Hello once received; its claims are unproven until PeerVerified
        self.peer: Hello | None = None

    @property
    def established(self) -> bool:
        """True once the peer proved the secret (PeerVerified was returned)."""
        return self.their_state in (OPEN, CLOSED)

    # -- sending -----------------------------------------------------------------------------

    def start(self) -> bytes:
        """Our Hello: send it first, at once, without waiting for the peer's."""
        self._check_usable()
        with self._failing():
            self._transition(US, Hello)
            return encode(self._hello)

    def send(self, message: Message) -> bytes:
        """The bytes of ``message`` (and of anything queued before it). Only after
        PeerVerified; Hello and Auth are the connection's own. A Piece costs a copy of its
        payload here: use ``send_piece``."""
        self._check_usable()
        with self._failing():
            if isinstance(message, (Hello, Auth)):
                raise LocalProtocolError("the connection sends its own Hello (start) and Auth")
            if not isinstance(message, Message):
                raise LocalProtocolError(f"not a message: {type(message).__name__}")
            data = encode(message)
            self._transition(US, type(message))
            return self.data_to_send() + data

    def send_piece(self, blob: str, index: int, checksum: bytes,
                   payload: bytes | bytearray | memoryview
                   ) -> list[bytes | bytearray | memoryview]:
        """The buffers of a Piece frame, to write in order: [queued bytes + length prefix +
        header, ``payload``], the payload object itself, never copied. The caller keeps the
        payload unchanged until it is written."""
        self._check_usable()
        with self._failing():
            piece = Piece(blob, index, checksum, payload)
            buffers = encode_piece(piece)
            self._transition(US, Piece)
            buffers[0] = self.data_to_send() + buffers[0]
            return buffers

    def send_piece_head(self, blob: str, index: int, checksum: bytes, size: int) -> bytes:
        """The start of a Piece frame (queued bytes + length prefix + header) whose payload,
        exactly ``size`` bytes, the caller writes right after it itself (by sendfile)."""
        self._check_usable()
        with self._failing():
            head = encode_piece_head(Piece(blob, index, checksum, b""), size)
            self._transition(US, Piece)
            return self.data_to_send() + head

    def data_to_send(self) -> bytes:
        """Drain what the connection queued by itself (our Auth): b"" when nothing is."""
        self._check_usable()
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    # -- receiving ---------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the peer; b"" means the peer closed its side. The caller may
        reuse a mutable ``data`` at once (bytes may be kept, uncopied, inside a payload).
        Processing happens in ``next_event``."""
        self._check_usable()
        with self._failing():
            self._decoder.receive_data(data)

    def payload_space(self) -> memoryview | None:
        """Where the payload arriving now may be received directly, or None (see
        FrameDecoder.payload_space); then ``payload_received(count)``."""
        self._check_usable()
        return self._decoder.payload_space()

    def payload_received(self, count: int) -> None:
        self._check_usable()
        with self._failing():
            self._decoder.payload_received(count)

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA. Raises RemoteProtocolError when the peer broke the
        protocol. Call ``data_to_send()`` after it: the handshake may have queued our Auth.

        A Piece's payload is a read-only memoryview the caller owns: it stays valid after
        later calls, and the connection keeps no reference to its memory."""
        self._check_usable()
        with self._failing():
            if self.our_state is IDLE:
                raise LocalProtocolError("call start() before next_event()")
            try:
                while True:
                    message = self._decoder.next_message()
                    if message is NEED_DATA or isinstance(message, ConnectionClosed):
                        return message
                    event = self._receive(message)
                    if event is not None:
                        return event
            except LocalProtocolError as exc:  # a message we would not send ourselves
                raise RemoteProtocolError(str(exc)) from exc

    def _receive(self, message: Message) -> Event | None:
        kind = type(message)
        if kind not in TRANSITIONS[THEM][self.their_state]:
            handshake = "" if self.established else " before the handshake completed"
            raise RemoteProtocolError(f"peer sent {kind.TYPE} in state "
                                      f"{self.their_state.value}{handshake}")
        if kind is Hello:
            self._check_hello(message)
            self.peer = message
            self._transition(THEM, Hello)
            ours = Auth(proof(self._secret, message.challenge, self._hello.node_id,
                              message.node_id))
            self._outgoing += encode(ours)
            self._transition(US, Auth)
            return None
        if kind is Auth:
            expected = proof(self._secret, self._hello.challenge, self.peer.node_id,
                             self._hello.node_id)
            if not hmac.compare_digest(message.proof, expected):
                raise RemoteProtocolError(f"peer {self.peer.node_id} failed the handshake: "
                                          f"its cluster secret differs from ours")
            self._transition(THEM, Auth)
            self._transition(US, PeerVerified)
            return PeerVerified(self.peer.node_id, self.peer.cluster, self.peer.listen_port,
                                self.peer.rack)
        self._transition(THEM, kind)
        return message

    def _check_hello(self, hello: Hello) -> None:
        if hello.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"peer speaks protocol version {hello.version}, "
                                      f"not {PROTOCOL_VERSION}")
        if hello.cluster != self._hello.cluster:
            raise RemoteProtocolError(f"peer is in cluster {hello.cluster!r}, "
                                      f"not {self._hello.cluster!r}")
        if hello.node_id == self._hello.node_id:
            raise RemoteProtocolError(f"connected to itself (node {hello.node_id})")

    # -- state -------------------------------------------------------------------------------

    def _transition(self, role: str, kind: type) -> None:
        state = self.our_state if role is US else self.their_state
        new = TRANSITIONS[role][state].get(kind)
        if new is None:
            if role is THEM:
                raise RemoteProtocolError(f"peer sent {kind.__name__} in state {state.value}")
            handshake = ": the handshake is not complete" if state in (IDLE, HELLO, AUTH) else ""
            raise LocalProtocolError(f"cannot send {kind.__name__} in state {state.value}"
                                     f"{handshake}")
        if role is US:
            self.our_state = new
        else:
            self.their_state = new

    def _check_usable(self) -> None:
        if self._error is not None:
            raise type(self._error)(f"connection failed earlier: {self._error}")

    def _failing(self) -> _Failing:
        return _Failing(self)


class _Failing:
    """Puts the connection in the ERROR state when a ProtocolError leaves the block."""

    __slots__ = ("connection",)

    def __init__(self, connection: PeerConnection):
        self.connection = connection

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind, exc, traceback) -> bool:
        if exc is not None and isinstance(exc, ProtocolError):
            connection = self.connection
            connection._error = exc
            connection.our_state = connection.their_state = ERROR
        return False

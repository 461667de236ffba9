"""The sans-IO peer protocol: frames, messages, the handshake and the state table, driven
through an in-memory ConnectionPair; and property tests that feed random and mutated bytes to
the decoder, which may only ever return events or raise ProtocolError."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pull.core.bitmap import Bitmap as ChunkBitmap
from p2pull.core.chunks import PROTOCOL_VERSION
from p2pull.errors import ProtocolError
from p2pull.wire import (
    MAX_CHUNKS_PER_BLOB,
    MAX_FRAME,
    MAX_HEADER,
    MAX_PAYLOAD,
    MAX_RECEIVING,
    NEED_DATA,
    Auth,
    Line,
    Bitmap,
    Cancel,
    ConnectionClosed,
    FrameDecoder,
    Goodbye,
    Preload,
    StatusQuery,
    StatusReply,
    Have,
    Hello,
    Interest,
    LocalProtocolError,
    PeerConnection,
    PeerVerified,
    Piece,
    Ping,
    Pong,
    Reject,
    RemoteProtocolError,
    Request,
    State,
    encode,
    proof,
)
from p2pull.wire.messages import RACK_LABEL, to_header
from tests.wire_pair import (
    CHALLENGE_A,
    CHALLENGE_B,
    CLUSTER,
    NODE_A,
    NODE_B,
    SECRET,
    ConnectionPair,
    bytewise,
    events_of,
)

BLOB = "sha256:" + "ab" * 32
CHECKSUM = bytes(range(16))


def frame(header: dict, payload: bytes = b"") -> bytes:
    """A raw frame, whatever the header holds: for crafting what a peer should not send."""
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">I", len(packed) + len(payload)) + packed + payload


def established() -> ConnectionPair:
    pair = ConnectionPair()
    pair.handshake()
    return pair


def started(node: str = NODE_A, challenge: bytes = CHALLENGE_A) -> PeerConnection:
    conn = PeerConnection(node, CLUSTER, SECRET, challenge, 7001)
    conn.start()
    return conn


def peer_hello(**changes) -> bytes:
    fields = dict(version=PROTOCOL_VERSION, node_id=NODE_B, cluster=CLUSTER,
                  challenge=CHALLENGE_B, listen_port=7002) | changes
    return encode(Hello(**fields))


def peer_auth() -> bytes:
    """B's valid Auth for a connection started by ``started()``."""
    return encode(Auth(proof(SECRET, CHALLENGE_A, NODE_B, NODE_A)))


# -- strategies -------------------------------------------------------------------------------

digests = st.binary(min_size=32, max_size=32).map(lambda raw: "sha256:" + raw.hex())
indexes = st.integers(0, MAX_CHUNKS_PER_BLOB - 1)
nonces = st.integers(0, 2**64 - 1)


@st.composite
def interests(draw):
    chunk_size = draw(st.integers(1, MAX_PAYLOAD))
    size = draw(st.integers(0, MAX_CHUNKS_PER_BLOB * chunk_size))
    return Interest(draw(digests), size, chunk_size)


@st.composite
def bitmaps(draw):
    count = draw(st.one_of(st.integers(0, 3000), st.just(MAX_CHUNKS_PER_BLOB)))
    size = (count + 7) // 8
    # drawing 128 KiB from hypothesis is slow: a random prefix, repeated
    seed = draw(st.binary(min_size=min(size, 64), max_size=min(size, 64))) or b"\0"
    bits = bytearray((seed * (size // len(seed) + 1))[:size])
    if count % 8:
        bits[-1] &= (0xFF << (8 - count % 8)) & 0xFF
    return Bitmap(draw(digests), bytes(bits), count)


SESSION_MESSAGES = {
    "interest": interests(),
    "bitmap": bitmaps(),
    "have": st.builds(Have, digests, indexes),
    "request": st.builds(Request, digests, indexes, st.integers(0, MAX_RECEIVING)),
    "piece": st.builds(Piece, digests, indexes, st.binary(min_size=16, max_size=16),
                       st.binary(max_size=5000)),
    "reject": st.builds(Reject, digests, indexes,
                        st.sampled_from(["busy", "missing", "unknown-blob"])),
    "cancel": st.builds(Cancel, digests, indexes),
    "line": st.builds(Line, st.booleans()),
    "ping": st.builds(Ping, nonces),
    "pong": st.builds(Pong, nonces),
    "goodbye": st.builds(Goodbye, st.text(max_size=200)),
    "preload": st.builds(Preload, st.text(max_size=200)),
    "status-query": st.builds(StatusQuery, nonces),
    "status-reply": st.builds(StatusReply, nonces, st.binary(max_size=3000)),
}
node_ids = st.binary(min_size=16, max_size=16).map(bytes.hex)
ALL_MESSAGES = SESSION_MESSAGES | {
    "hello": st.builds(Hello, st.integers(0, 2**16 - 1), node_ids,
                       st.text(min_size=1, max_size=16), st.binary(min_size=32, max_size=32),
                       st.integers(0, 65535), st.from_regex(RACK_LABEL, fullmatch=True)),
    "auth": st.builds(Auth, st.binary(min_size=32, max_size=32)),
}
#: what may flow in any order (a Goodbye only ends a stream)
flowing_messages = st.one_of(*(strategy for kind, strategy in SESSION_MESSAGES.items()
                               if kind != "goodbye"))


# -- handshake --------------------------------------------------------------------------------


def test_handshake_verifies_both_sides():
    pair = ConnectionPair()
    events = pair.handshake()
    assert events == {"a": [PeerVerified(NODE_B, CLUSTER, 7002)],
                      "b": [PeerVerified(NODE_A, CLUSTER, 7001)]}
    for conn in pair.conn.values():
        assert conn.established
        assert conn.our_state is State.OPEN and conn.their_state is State.OPEN


def test_each_side_learns_the_rack_the_other_said_it_is_in():
    pair = ConnectionPair(racks=("row-1.rack-3", ""))
    events = pair.handshake()
    assert events == {"a": [PeerVerified(NODE_B, CLUSTER, 7002, "")],
                      "b": [PeerVerified(NODE_A, CLUSTER, 7001, "row-1.rack-3")]}


def test_a_hello_without_a_rack_is_a_peer_of_no_rack():
    """An older peer's Hello has no rack field: it is a peer of no rack, not a bad Hello."""
    conn = started()
    header = to_header(Hello(PROTOCOL_VERSION, NODE_B, CLUSTER, CHALLENGE_B, 7002, "r1"))
    del header["rack"]
    conn.receive_data(frame(header) + peer_auth())
    assert conn.next_event() == PeerVerified(NODE_B, CLUSTER, 7002, "")


@pytest.mark.parametrize("rack", ["two words", "x" * 64, 7])
def test_a_hello_with_a_bad_rack_is_refused(rack):
    conn = started()
    header = to_header(Hello(PROTOCOL_VERSION, NODE_B, CLUSTER, CHALLENGE_B, 7002))
    header["rack"] = rack
    conn.receive_data(frame(header))
    with pytest.raises(RemoteProtocolError, match="rack"):
        conn.next_event()


def test_handshake_byte_by_byte():
    pair = ConnectionPair(split=bytewise)
    events = pair.handshake()
    assert [type(e) for e in events["a"] + events["b"]] == [PeerVerified, PeerVerified]


def test_auth_is_queued_for_data_to_send_and_flushed_by_send():
    conn = started()
    conn.receive_data(peer_hello())
    assert conn.next_event() is NEED_DATA
    assert conn.our_state is State.AUTH
    # not drained: the next send puts our Auth first, so the wire order stays right
    conn.receive_data(peer_auth())
    assert conn.next_event() == PeerVerified(NODE_B, CLUSTER, 7002)
    data = conn.send(Ping(7))
    ours = encode(Auth(proof(SECRET, CHALLENGE_B, NODE_A, NODE_B)))
    assert data == ours + encode(Ping(7))
    assert conn.data_to_send() == b""


def test_wrong_secret_is_refused_by_the_side_that_checks():
    pair = ConnectionPair(secrets=(SECRET, b"another secret"))
    with pytest.raises(RemoteProtocolError, match="cluster secret differs"):
        pair.handshake()
    failed = [side for side, conn in pair.conn.items() if conn.our_state is State.ERROR]
    assert failed  # whichever checked first
    for side in failed:
        assert not pair.conn[side].established


def test_wrong_secret_single_side():
    conn = started()
    conn.receive_data(peer_hello())
    conn.receive_data(encode(Auth(proof(b"wrong", CHALLENGE_A, NODE_B, NODE_A))))
    with pytest.raises(RemoteProtocolError, match="secret"):
        conn.next_event()
    assert conn.our_state is State.ERROR and conn.their_state is State.ERROR


def test_proof_for_another_challenge_or_direction_is_refused():
    for bad in (proof(SECRET, CHALLENGE_B, NODE_B, NODE_A),   # replayed from elsewhere
                proof(SECRET, CHALLENGE_A, NODE_A, NODE_B)):  # reflected: our own answer
        conn = started()
        conn.receive_data(peer_hello() + encode(Auth(bad)))
        with pytest.raises(RemoteProtocolError):
            conn.next_event()


def test_wrong_cluster():
    pair = ConnectionPair(clusters=("lab", "prod"))
    with pytest.raises(RemoteProtocolError, match="cluster 'lab', not 'prod'"):
        pair.handshake()


def test_wrong_version():
    conn = started()
    conn.receive_data(peer_hello(version=PROTOCOL_VERSION + 1))
    with pytest.raises(RemoteProtocolError, match=f"version {PROTOCOL_VERSION + 1}, not"):
        conn.next_event()


def test_connected_to_itself():
    conn = started()
    conn.receive_data(peer_hello(node_id=NODE_A))
    with pytest.raises(RemoteProtocolError, match="connected to itself"):
        conn.next_event()


def test_messages_before_verification_are_refused():
    early = encode(Have(BLOB, 1))  # a session frame the codec accepts on its own
    for prefix in (b"", peer_hello()):
        conn = started()
        conn.receive_data(prefix + early)
        with pytest.raises(RemoteProtocolError, match="before the handshake"):
            conn.next_event()


def test_auth_before_hello_and_a_second_hello_are_refused():
    conn = started()
    conn.receive_data(peer_auth())
    with pytest.raises(RemoteProtocolError, match="auth"):
        conn.next_event()
    pair = established()
    pair.write("b", encode(Hello(PROTOCOL_VERSION, NODE_B, CLUSTER, CHALLENGE_B, 1)))
    with pytest.raises(RemoteProtocolError, match="hello"):
        pair.deliver()


def test_sending_before_the_handshake_is_a_local_error():
    conn = PeerConnection(NODE_A, CLUSTER, SECRET, CHALLENGE_A, 0)
    conn.start()
    with pytest.raises(LocalProtocolError, match="handshake is not complete"):
        conn.send(Have(BLOB, 0))
    assert conn.our_state is State.ERROR
    with pytest.raises(LocalProtocolError):
        conn.send_piece(BLOB, 0, CHECKSUM, b"x")


def test_hello_and_auth_are_the_connections_own():
    pair = established()
    with pytest.raises(LocalProtocolError, match="its own"):
        pair.conn["a"].send(Auth(bytes(32)))


def test_start_first_and_once():
    conn = PeerConnection(NODE_A, CLUSTER, SECRET, CHALLENGE_A, 0)
    with pytest.raises(LocalProtocolError, match="start"):
        conn.next_event()
    conn = PeerConnection(NODE_A, CLUSTER, SECRET, CHALLENGE_A, 0)
    conn.start()
    with pytest.raises(LocalProtocolError):
        conn.start()


@pytest.mark.parametrize("kwargs, error", [
    (dict(node_id="A" * 32), LocalProtocolError),
    (dict(cluster=""), LocalProtocolError),
    (dict(cluster="x" * 65), LocalProtocolError),
    (dict(challenge=bytes(31)), LocalProtocolError),
    (dict(listen_port=65536), LocalProtocolError),
    (dict(secret=b""), ValueError),
])
def test_bad_constructor_arguments(kwargs, error):
    args = dict(node_id=NODE_A, cluster=CLUSTER, secret=SECRET, challenge=CHALLENGE_A,
                listen_port=1) | kwargs
    with pytest.raises(error):
        PeerConnection(**args)


# -- messages round-trip ------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SESSION_MESSAGES))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_session_message_round_trips_through_a_pair(kind, data):
    message = data.draw(SESSION_MESSAGES[kind])
    pair = established()
    pair.send("a", message)
    assert pair.deliver() == {"a": [], "b": [message]}


@pytest.mark.parametrize("kind", sorted(ALL_MESSAGES))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_message_round_trips_through_the_codec(kind, data):
    message = data.draw(ALL_MESSAGES[kind])
    decoder = FrameDecoder()
    decoder.receive_data(encode(message))
    assert decoder.next_message() == message
    assert decoder.next_message() is NEED_DATA
    assert decoder.buffered == 0


@settings(max_examples=60, deadline=None)
@given(messages=st.lists(flowing_messages, max_size=8), cuts=st.lists(st.integers(0, 10**5)))
def test_any_split_gives_the_same_events(messages, cuts):
    pair = established()
    handshake = bytes(pair.sent["a"])  # A's Hello and Auth, valid for any fresh B
    pair.send("a", *messages)
    stream = bytes(pair.link["a"])
    assert pair.deliver()["b"] == messages
    receiver = ConnectionPair().conn["b"]
    receiver.start()
    assert [type(e) for e in events_of(receiver, [handshake])] == [PeerVerified]
    assert events_of(receiver, cut(stream, cuts)) == messages


def test_one_byte_at_a_time():
    messages = [Interest(BLOB, 10, 4), Bitmap(BLOB, b"\xa0", 3), Have(BLOB, 2),
                Piece(BLOB, 2, CHECKSUM, bytes(range(256)) * 9), Reject(BLOB, 1, "busy"),
                Ping(5), Goodbye("done")]
    pair = ConnectionPair(split=bytewise)
    pair.handshake()
    pair.send("a", *messages[:3])
    pair.send_piece("a", BLOB, 2, CHECKSUM, messages[3].payload)
    pair.send("a", *messages[4:])
    assert pair.deliver()["b"] == messages


def test_bitmap_event_builds_a_core_bitmap():
    held = ChunkBitmap(11)
    for index in (0, 3, 10):
        held.add(index)
    pair = established()
    pair.send("a", Bitmap(BLOB, held.to_bytes(), held.size))
    (event,) = pair.deliver()["b"]
    assert ChunkBitmap(event.count, event.bits) == held


def test_largest_bitmap_fits_the_header_limit():
    bitmap = Bitmap(BLOB, b"\xff" * (MAX_CHUNKS_PER_BLOB // 8), MAX_CHUNKS_PER_BLOB)
    assert len(encode(bitmap)) < MAX_HEADER
    pair = established()
    pair.send("a", bitmap)
    assert pair.deliver()["b"] == [bitmap]


# -- pieces: copies and ownership ------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"abc" * 1000, bytearray(b"xyz" * 10),
                                     memoryview(b"0123456789")[2:8], b""])
def test_send_piece_returns_the_payload_itself(payload):
    pair = established()
    buffers = pair.conn["a"].send_piece(BLOB, 4, CHECKSUM, payload)
    assert len(buffers) == 2 and buffers[-1] is payload


def test_piece_head_then_payload_sent_apart_is_one_piece():
    """A sender writing the payload itself (sendfile) after ``send_piece_head``: the peer
    receives the same Piece as from ``send_piece``, and frames after it stay in step."""
    payload = bytes(range(256)) * 300
    pair = established()
    pair.write("a", pair.conn["a"].send_piece_head(BLOB, 7, CHECKSUM, len(payload)))
    pair.write("a", payload)
    pair.send("a", Have(BLOB, 8))
    assert pair.deliver()["b"] == [Piece(BLOB, 7, CHECKSUM, payload), Have(BLOB, 8)]


@pytest.mark.parametrize("size", [-1, MAX_PAYLOAD + 1, 1.5])
def test_piece_head_refuses_an_impossible_payload_size(size):
    conn = established().conn["a"]
    with pytest.raises(LocalProtocolError, match="payload"):
        conn.send_piece_head(BLOB, 7, CHECKSUM, size)


def test_received_payload_is_owned_and_read_only():
    payload = bytes(range(256)) * 4096  # 1 MiB, arriving in 64 KiB pieces
    pair = established()
    pair.split = lambda data: [data[i:i + 65536] for i in range(0, len(data), 65536)]
    pair.send_piece("a", BLOB, 9, CHECKSUM, payload)
    pair.send_piece("a", BLOB, 10, CHECKSUM, b"small")
    first, second = pair.deliver()["b"]
    assert first == Piece(BLOB, 9, CHECKSUM, payload)
    assert second.payload == b"small"
    assert memoryview(first.payload).readonly and memoryview(second.payload).readonly
    # later traffic through the same connection leaves them alone
    pair.send_piece("a", BLOB, 11, CHECKSUM, bytes(len(payload)))
    pair.deliver()
    assert first.payload == payload and second.payload == b"small"


@pytest.mark.parametrize("read", [1 << 20, 1000])  # the whole frame at once, or streaming
def test_payloads_land_in_buffers_from_allocate(read):
    pool = []

    def allocate(size):
        pool.append(bytearray(size))
        return pool[-1]

    pair = ConnectionPair(allocate=(None, allocate))
    pair.handshake()
    pair.split = lambda data: [data[i:i + read] for i in range(0, len(data), read)]
    pair.send_piece("a", BLOB, 1, CHECKSUM, b"z" * 5000)
    pair.send_piece("a", BLOB, 2, CHECKSUM, b"")
    first, second = pair.deliver()["b"]
    assert first.payload == b"z" * 5000 and second.payload == b""
    assert first.payload.obj is pool[0] and second.payload.obj is pool[1]
    assert first.payload.readonly


def test_allocate_must_return_the_size_asked():
    pair = ConnectionPair(allocate=(None, lambda size: bytearray(size + 1)))
    pair.handshake()
    pair.send_piece("a", BLOB, 1, CHECKSUM, b"z")
    with pytest.raises(ValueError, match="allocate"):
        pair.deliver()


def test_receive_data_copies_a_reused_buffer():
    conn_pair = established()
    data = bytearray(b"".join(conn_pair.conn["a"].send_piece(BLOB, 1, CHECKSUM, b"x" * 5000)))
    receiver = conn_pair.conn["b"]
    receiver.receive_data(data[:100])
    receiver.next_event()
    rest = data[100:]
    receiver.receive_data(rest)
    rest[:] = bytes(len(rest))  # the caller reuses its buffer
    assert receiver.next_event().payload == b"x" * 5000


def test_payloads_can_be_received_straight_into_their_buffer():
    """What a socket reader does: the header through receive_data, then payload_space()
    for recv_into, in pieces, then payload_received; the piece's payload is that buffer."""
    buffers = []

    def allocate(size):
        buffers.append(bytearray(size))
        return buffers[-1]

    pair = ConnectionPair(allocate=(None, allocate))
    pair.handshake()
    receiver = pair.conn["b"]
    assert receiver.payload_space() is None  # no payload under way
    frame = b"".join(pair.conn["a"].send_piece(BLOB, 3, CHECKSUM, b"0123456789" * 700))
    payload_at = len(frame) - 7000
    receiver.receive_data(frame[:payload_at + 10])  # the header and 10 payload bytes
    assert receiver.next_event() is NEED_DATA
    position = payload_at + 10
    while (space := receiver.payload_space()) is not None:
        count = min(len(space), 999)
        space[:count] = frame[position:position + count]
        receiver.payload_received(count)
        position += count
    assert position == len(frame)
    piece = receiver.next_event()
    assert piece.index == 3 and piece.payload == b"0123456789" * 700
    assert piece.payload.obj is buffers[0]
    assert receiver.payload_space() is None
    with pytest.raises(ProtocolError, match="payload_received"):
        receiver.payload_received(1)


def test_payload_space_is_none_without_allocate():
    pair = ConnectionPair()
    pair.handshake()
    frame = b"".join(pair.conn["a"].send_piece(BLOB, 3, CHECKSUM, b"x" * 5000))
    pair.conn["b"].receive_data(frame[:100])
    assert pair.conn["b"].next_event() is NEED_DATA
    assert pair.conn["b"].payload_space() is None


# -- malformed frames -----------------------------------------------------------------------


def test_oversize_length_prefix_raises_before_the_rest_arrives():
    conn = started()
    conn.receive_data(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        conn.next_event()


def test_header_too_large():
    header = msgpack.packb({"t": "bitmap", "a": bytes(120_000), "b": bytes(120_000),
                            "c": bytes(120_000)}, use_bin_type=True)
    assert len(header) > MAX_HEADER
    conn = started()
    conn.receive_data(struct.pack(">I", len(header)) + header[:MAX_HEADER + 10])
    with pytest.raises(RemoteProtocolError, match=f"header exceeds {MAX_HEADER}"):
        conn.next_event()


def test_frame_ending_inside_its_header():
    header = msgpack.packb({"t": "ping", "nonce": 1})
    conn = started()
    conn.receive_data(struct.pack(">I", len(header) - 2) + header)
    with pytest.raises(RemoteProtocolError, match="inside its header"):
        conn.next_event()


@pytest.mark.parametrize("raw, match", [
    (frame({"t": "nope"}), "unknown message type"),
    (frame({"x": 1}), "unknown message type"),
    (struct.pack(">I", 1) + b"\x05", "not a map"),
    (struct.pack(">I", 0), "empty frame"),
    (struct.pack(">I", 1) + b"\xc1", "malformed"),
    (frame({"t": "have", "blob": BLOB}), "without 'index'"),
    (frame({"t": "have", "blob": BLOB, "index": True}), "must be an int, not bool"),
    (frame({"t": "have", "blob": BLOB, "index": -1}), "outside"),
    (frame({"t": "have", "blob": BLOB, "index": MAX_CHUNKS_PER_BLOB}), "outside"),
    (frame({"t": "have", "blob": BLOB, "index": 1.0}), "not float"),
    (frame({"t": "have", "blob": "sha256:" + "AB" * 32, "index": 1}), "does not match"),
    (frame({"t": "have", "blob": "sha512:" + "ab" * 32, "index": 1}), "does not match"),
    (frame({"t": "have", "blob": BLOB.encode(), "index": 1}), "must be a str"),
    (frame({"t": "have", "blob": BLOB, "index": 1}) + b"", None),  # the good one, control
    (frame({"t": "have", "blob": BLOB, "index": 1}, b"extra"), "header"),
    (frame({"t": "piece", "blob": BLOB, "index": 1, "checksum": bytes(15), "n": 1}, b"x"),
     "must be 16 bytes"),
    (frame({"t": "piece", "blob": BLOB, "index": 1, "checksum": CHECKSUM, "n": 2}, b"x"),
     "payload"),
    (frame({"t": "piece", "blob": BLOB, "index": 1, "checksum": CHECKSUM, "n": False}, b""),
     "payload length"),
    (frame({"t": "piece", "blob": BLOB, "index": 1, "checksum": CHECKSUM,
            "n": MAX_PAYLOAD + 1}), "payload length"),
    (frame({"t": "bitmap", "blob": BLOB, "bits": b"\x01", "count": 3}), "beyond"),
    (frame({"t": "bitmap", "blob": BLOB, "bits": b"\x00\x00", "count": 3}), "must be 1 bytes"),
    (frame({"t": "request", "blob": BLOB, "index": 1}), "without 'receiving'"),
    (frame({"t": "request", "blob": BLOB, "index": 1, "receiving": -1}), "outside"),
    (frame({"t": "reject", "blob": BLOB, "index": 1, "reason": "bored"}), "none of"),
    (frame({"t": "reject", "blob": BLOB, "index": 1, "reason": {"a": 1}}), "none of"),
    (frame({"t": "interest", "blob": BLOB, "size": 10, "chunk_size": 0}), "outside"),
    (frame({"t": "ping", "nonce": -1}), "outside"),
    (frame({"t": "ping", "nonce": [1]}), "malformed"),
    (frame({"t": "ping", 1: 2, "nonce": 1}), "malformed"),
    (frame({"t": "goodbye", "reason": "x" * 2000}), "malformed"),
    (frame({"t": "ping", "nonce": msgpack.ExtType(1, b"ab")}), "malformed"),
])
def test_malformed_frames_after_the_handshake(raw, match):
    pair = established()
    pair.write("a", raw)
    if match is None:
        assert pair.deliver()["b"] == [Have(BLOB, 1)]
        return
    with pytest.raises(RemoteProtocolError, match=match):
        pair.deliver()
    conn = pair.conn["b"]
    assert conn.our_state is State.ERROR
    for call in (conn.next_event, conn.data_to_send, lambda: conn.receive_data(b"x"),
                 lambda: conn.send(Ping(1))):
        with pytest.raises(RemoteProtocolError, match="failed earlier"):
            call()


def test_unknown_header_keys_are_ignored():
    pair = established()
    pair.write("a", frame({"t": "ping", "nonce": 3, "later": "a v1.1 field"}))
    assert pair.deliver()["b"] == [Ping(3)]


@pytest.mark.parametrize("make", [
    lambda: Have(BLOB, True),
    lambda: Have(BLOB, -1),
    lambda: Have("sha256:" + "ab" * 31, 0),
    lambda: Piece(BLOB, 0, bytes(15), b""),
    lambda: Piece(BLOB, 0, CHECKSUM, "text"),
    lambda: Auth(bytes(31)),
    lambda: Bitmap(BLOB, b"\x00", 9),
    lambda: Goodbye("\ud800"),
    lambda: Ping(-1),
    lambda: Line(1),
    lambda: Line("yes"),
    lambda: Request(BLOB, 0, -1),
    lambda: Request(BLOB, 0, MAX_RECEIVING + 1),
    lambda: Request(BLOB, 0, True),
])
def test_invalid_messages_cannot_be_built(make):
    with pytest.raises(LocalProtocolError):
        make()


# -- end of stream and closing ------------------------------------------------------------


def test_clean_end_of_stream():
    pair = established()
    pair.send("a", Goodbye("shutting down"))
    assert pair.deliver()["b"] == [Goodbye("shutting down")]
    assert pair.conn["a"].our_state is State.CLOSED
    assert pair.conn["b"].their_state is State.CLOSED
    assert pair.close("a") == [ConnectionClosed()]
    assert pair.conn["b"].next_event() == ConnectionClosed()
    with pytest.raises(LocalProtocolError, match="after the end"):
        pair.conn["b"].receive_data(b"more")


def test_nothing_after_goodbye():
    pair = established()
    pair.send("a", Goodbye("bye"))
    with pytest.raises(LocalProtocolError, match="closed"):
        pair.conn["a"].send(Ping(1))
    pair = established()
    pair.send("a", Goodbye("bye"))
    pair.deliver()
    pair.conn["b"].send(Ping(2))  # the other side may still talk until it reads the end
    pair.write("a", encode(Ping(3)))
    with pytest.raises(RemoteProtocolError, match="ping in state closed"):
        pair.deliver()


@pytest.mark.parametrize("cut", [1, 3, 4, 10, -1])
def test_truncated_frame_then_end_of_stream_raises(cut):
    pair = established()
    data = b"".join(pair.conn["a"].send_piece(BLOB, 1, CHECKSUM, b"p" * 3000))
    conn = pair.conn["b"]
    conn.receive_data(data[:cut])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        conn.next_event()


def test_end_of_stream_before_the_handshake_is_reported_not_raised():
    conn = started()
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert not conn.established


# -- property tests: the decoder only returns events or raises ProtocolError -------------


def valid_stream_from_b() -> bytes:
    """Everything B sends to A in a session: Hello, Auth, and one of each message."""
    pair = ConnectionPair()
    pair.handshake()
    pair.send("b", Interest(BLOB, 5000, 1024), Bitmap(BLOB, b"\xf0", 5), Have(BLOB, 4),
              Request(BLOB, 0, 3), Reject(BLOB, 1, "missing"), Cancel(BLOB, 0), Line(True),
              Line(False), Ping(9), Pong(9))
    pair.send_piece("b", BLOB, 4, CHECKSUM, b"q" * 2000)
    pair.send("b", Goodbye("done"))
    pair.deliver()
    return bytes(pair.sent["b"])


VALID_STREAM = valid_stream_from_b()


def run_fresh_connection(chunks: list[bytes]) -> list:
    """Feed ``chunks`` and then the end of the stream to a fresh A; return its events. Only
    ProtocolError may escape."""
    conn = started()
    events = []
    try:
        for chunk in [*chunks, b""]:
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not NEED_DATA:
                events.append(event)
                if isinstance(event, ConnectionClosed):
                    return events
    except ProtocolError:
        assert conn.our_state is State.ERROR
    return events


def test_the_valid_stream_is_valid():
    events = run_fresh_connection([VALID_STREAM])
    assert [type(e) for e in events] == [PeerVerified, Interest, Bitmap, Have, Request, Reject,
                                         Cancel, Line, Line, Ping, Pong, Piece, Goodbye,
                                         ConnectionClosed]


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[lo:hi] for lo, hi in zip(bounds, bounds[1:])]


@st.composite
def mutated_streams(draw):
    data = bytearray(VALID_STREAM)
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if action == "flip" and where < len(data):
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and where < len(data):
            data[where] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0xC0, 0xC2, 0xC3,
                                                0xD9, 0xDA, 0xDE, 0xDF, 0xC4]))
        elif action == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[where:where + draw(st.integers(1, 16))]
        elif action == "truncate":
            del data[where:]
    return bytes(data)


FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 4000), max_size=5))
def test_random_bytes_only_raise_protocol_errors(data, cuts):
    run_fresh_connection(cut(data, cuts))


@FUZZ
@given(data=mutated_streams(), cuts=st.lists(st.integers(0, 10**5), max_size=5))
def test_mutated_streams_only_raise_protocol_errors(data, cuts):
    run_fresh_connection(cut(data, cuts))


@FUZZ
@given(message=st.one_of(*ALL_MESSAGES.values()), flips=st.lists(
    st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_frames_only_raise_protocol_errors_in_the_codec(message, flips):
    data = bytearray(encode(message))
    for where, value in flips:
        data[where % len(data)] = value
    decoder = FrameDecoder()
    try:
        decoder.receive_data(bytes(data))
        decoder.receive_data(b"")
        while not isinstance(decoder.next_message(), ConnectionClosed):
            pass
    except ProtocolError:
        pass


def test_status_reply_larger_than_the_limit_is_refused():
    from p2pull.wire.messages import MAX_REPORT
    with pytest.raises(LocalProtocolError, match="exceeds"):
        StatusReply(1, b"x" * (MAX_REPORT + 1))

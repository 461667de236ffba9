"""The peer protocol without I/O (h11's model): ``PeerConnection`` turns bytes from a peer
into events and messages into bytes; the trio edge (``p2pull.net``) moves the bytes.

Layers: ``messages`` (frozen dataclasses that check their fields), ``codec`` (frames and
their limits), ``connection`` (the handshake and the state table). Pure: no trio, no sockets.
"""

from p2pull.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from p2pull.wire.codec import (
    MAX_FRAME,
    MAX_HEADER,
    NEED_DATA,
    FrameDecoder,
    decode_header,
    encode,
    encode_piece,
)
from p2pull.wire.connection import TRANSITIONS, PeerConnection, State, proof
from p2pull.wire.messages import (
    CHALLENGE_SIZE,
    CHECKSUM_SIZE,
    MAX_CHUNKS_PER_BLOB,
    MAX_PAYLOAD,
    MAX_RECEIVING,
    MESSAGE_TYPES,
    REJECT_REASONS,
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

__all__ = [
    "PeerConnection", "State", "TRANSITIONS", "NEED_DATA", "proof",
    "Message", "Hello", "Auth", "Interest", "Bitmap", "Have", "Request", "Piece", "Reject",
    "Cancel", "Line", "Ping", "Pong", "Goodbye", "Preload", "StatusQuery", "StatusReply",
    "MESSAGE_TYPES",
    "Event", "PeerVerified", "ConnectionClosed",
    "FrameDecoder", "encode", "encode_piece", "decode_header",
    "MAX_FRAME", "MAX_HEADER", "MAX_PAYLOAD", "MAX_CHUNKS_PER_BLOB", "CHALLENGE_SIZE",
    "CHECKSUM_SIZE", "MAX_RECEIVING", "REJECT_REASONS",
    "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
]

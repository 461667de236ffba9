"""The messages of the peer protocol (``core.chunks.PROTOCOL_VERSION``), and the events a
connection reports.

Every message is a frozen dataclass that checks its own fields when it is built, so an
invalid message can neither be sent nor received: a bad field raises LocalProtocolError, and
the decoder turns that into RemoteProtocolError at the receive boundary (h11's model).

On the wire a message is a msgpack map of its fields plus ``"t"``, its type name; a Piece
carries ``"n"`` (the payload's length) instead of its payload, which follows the map raw.
Keys a message does not know are ignored, so a later version may add fields; the version in
Hello gates everything else. A field with a default (Hello's ``rack``) may be left out: it
was added without a new version, and a peer that sends none means the default.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

from p2pull.errors import LocalProtocolError

#: the most chunks one blob may have: 2**20 chunks of MIN_CHUNK_SIZE (256 KiB) is a 256 GiB
#: blob, far above any model file; its bitmap is 128 KiB, which sizes codec.MAX_HEADER
MAX_CHUNKS_PER_BLOB = 2**20
#: the largest chunk payload: DESIGN.md lets a cluster-wide chunk_size reach 64 MiB (the
#: protocol's own function stops at core.chunks.MAX_CHUNK_SIZE, 16 MiB)
MAX_PAYLOAD = 64 * 1024 * 1024
#: the longest text field in UTF-8 bytes: a Goodbye reason; a digest is 71, a cluster 64
MAX_TEXT = 1024
#: a status report lists refs and blobs: a node holding hundreds of refs fits; it travels
#: as bin, so the unpacker's bin limit (a Bitmap's 128 KiB) bounds it as well
MAX_REPORT = 128 * 1024
#: a cluster name is a label people type and mDNS carries in a TXT record
MAX_CLUSTER = 64
#: Hello.challenge: 256 random bits, as many as the HMAC-SHA256 proof it is answered with
CHALLENGE_SIZE = 32
#: Auth.proof: an HMAC-SHA256 digest
PROOF_SIZE = 32
#: Piece.checksum: an xxh3-128 digest (DESIGN.md: the integrity check of a chunk)
CHECKSUM_SIZE = 16
#: Request.receiving counts peers: more than a cluster's nodes would ever be
MAX_RECEIVING = 2**16 - 1
#: Ping and Pong nonces fit msgpack's largest unsigned integer
MAX_NONCE = 2**64 - 1
#: Reject.reason: the peer is out of upload slots, lacks that chunk, or knows no such blob
REJECT_REASONS = frozenset({"busy", "missing", "unknown-blob"})

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_NODE_ID = re.compile(r"[0-9a-f]{32}")
#: a rack label (the ``rack`` setting): what people name racks and zones with, or "" for none
RACK_LABEL = re.compile(r"[A-Za-z0-9._-]{0,63}")


# -- field checks: each raises LocalProtocolError naming the message and the field --------


def _fail(message: object, name: str, problem: str) -> LocalProtocolError:
    return LocalProtocolError(f"{type(message).__name__}.{name} {problem}")


def _check_int(message: object, name: str, low: int, high: int) -> None:
    value = getattr(message, name)
    if type(value) is not int:  # bool is an int subclass, and never a count
        raise _fail(message, name, f"must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise _fail(message, name, f"{value} outside {low}..{high}")


def _check_bytes(message: object, name: str, size: int) -> None:
    value = getattr(message, name)
    if not isinstance(value, bytes):
        raise _fail(message, name, f"must be bytes, not {type(value).__name__}")
    if len(value) != size:
        raise _fail(message, name, f"must be {size} bytes, not {len(value)}")


def _check_text(message: object, name: str, limit: int = MAX_TEXT,
                pattern: re.Pattern | None = None) -> None:
    value = getattr(message, name)
    if type(value) is not str:
        raise _fail(message, name, f"must be a str, not {type(value).__name__}")
    if pattern is not None:
        if not pattern.fullmatch(value):
            raise _fail(message, name, f"{value[:80]!r} does not match {pattern.pattern}")
    else:
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise _fail(message, name, "is not valid Unicode") from None
        if size > limit:
            raise _fail(message, name, f"longer than {limit} bytes")


def _check_blob(message: object) -> None:
    _check_text(message, "blob", pattern=_DIGEST)


def _check_index(message: object) -> None:
    _check_int(message, "index", 0, MAX_CHUNKS_PER_BLOB - 1)


# -- messages ---------------------------------------------------------------------------------


class Message:
    """Base of the messages; ``TYPE`` is the name carried in the header's ``"t"``."""

    __slots__ = ()
    TYPE: ClassVar[str]


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """The first message each side sends, both at once."""

    TYPE: ClassVar[str] = "hello"
    #: core.chunks.PROTOCOL_VERSION of the sender; the connection refuses any other
    version: int
    #: the sender's node id: 32 lowercase hex digits
    node_id: str
    #: the sender's cluster name; peers of another cluster are refused
    cluster: str
    #: random bytes the receiver must answer with Auth
    challenge: bytes
    #: where the sender accepts peer connections (0: it accepts none)
    listen_port: int
    #: the sender's rack label ("": none); optional in the header, so that a peer that
    #: sends none (an older one) is a peer of no rack
    rack: str = ""

    def __post_init__(self):
        _check_int(self, "version", 0, 2**16 - 1)
        _check_text(self, "node_id", pattern=_NODE_ID)
        _check_text(self, "cluster", MAX_CLUSTER)
        if not self.cluster:
            raise _fail(self, "cluster", "is empty")
        _check_bytes(self, "challenge", CHALLENGE_SIZE)
        _check_int(self, "listen_port", 0, 65535)
        _check_text(self, "rack", pattern=RACK_LABEL)


@dataclass(frozen=True, slots=True)
class Auth(Message):
    """The answer to the peer's challenge: proof of the cluster secret."""

    TYPE: ClassVar[str] = "auth"
    proof: bytes

    def __post_init__(self):
        _check_bytes(self, "proof", PROOF_SIZE)


@dataclass(frozen=True, slots=True)
class Interest(Message):
    """The sender wants (or offers) ``blob``, cut as ``size`` bytes in ``chunk_size`` chunks."""

    TYPE: ClassVar[str] = "interest"
    blob: str
    size: int
    chunk_size: int

    def __post_init__(self):
        _check_blob(self)
        _check_int(self, "chunk_size", 1, MAX_PAYLOAD)
        _check_int(self, "size", 0, MAX_CHUNKS_PER_BLOB * self.chunk_size)


@dataclass(frozen=True, slots=True)
class Bitmap(Message):
    """The chunks of ``blob`` the sender holds: ``count`` bits, most significant bit first,
    the unused bits of the last byte zero, so ``core.bitmap.Bitmap(count, bits)`` accepts
    it."""

    TYPE: ClassVar[str] = "bitmap"
    blob: str
    bits: bytes
    #: the number of chunks of the blob (bits that count)
    count: int

    def __post_init__(self):
        _check_blob(self)
        _check_int(self, "count", 0, MAX_CHUNKS_PER_BLOB)
        _check_bytes(self, "bits", (self.count + 7) // 8)
        if self.count % 8 and self.bits[-1] & (0xFF >> (self.count % 8)):
            raise _fail(self, "bits", f"has bits set beyond chunk {self.count - 1}")


@dataclass(frozen=True, slots=True)
class Have(Message):
    """The sender now holds chunk ``index`` of ``blob`` (verified)."""

    TYPE: ClassVar[str] = "have"
    blob: str
    index: int

    def __post_init__(self):
        _check_blob(self)
        _check_index(self)


@dataclass(frozen=True, slots=True)
class Request(Message):
    """Send me chunk ``index`` of ``blob``: answered by a Piece or a Reject. ``receiving``:
    how many peers are sending the requester chunks now (``BlobSwarm.serving``, summed
    over its blobs); a sender whose upload slots are all taken gives the next free one to
    the requester in line receiving least (``UploadSlots.grant``)."""

    TYPE: ClassVar[str] = "request"
    blob: str
    index: int
    receiving: int

    def __post_init__(self):
        _check_blob(self)
        _check_index(self)
        _check_int(self, "receiving", 0, MAX_RECEIVING)


@dataclass(frozen=True, slots=True)
class Piece(Message):
    """Chunk ``index`` of ``blob``: ``checksum`` is the sender's xxh3-128 of ``payload``,
    which the receiver must check (the wire does not).

    A Piece from ``next_event`` owns its payload: a read-only memoryview of memory no one
    else holds, valid for as long as the caller keeps it. Sending one with
    ``PeerConnection.send_piece`` never copies the payload."""

    TYPE: ClassVar[str] = "piece"
    blob: str
    index: int
    checksum: bytes
    payload: bytes | bytearray | memoryview

    def __post_init__(self):
        _check_blob(self)
        _check_index(self)
        _check_bytes(self, "checksum", CHECKSUM_SIZE)
        try:
            size = memoryview(self.payload).nbytes
        except TypeError:
            raise _fail(self, "payload", f"must be bytes-like, not "
                                         f"{type(self.payload).__name__}") from None
        if size > MAX_PAYLOAD:
            raise _fail(self, "payload", f"of {size} bytes exceeds {MAX_PAYLOAD}")

    def __repr__(self) -> str:  # never dump megabytes into a log line
        return (f"Piece(blob={self.blob!r}, index={self.index}, "
                f"checksum={self.checksum.hex()}, payload=<{len(self.payload)} bytes>)")


@dataclass(frozen=True, slots=True)
class Reject(Message):
    """The sender will not send chunk ``index`` of ``blob``: ``reason`` is one of
    REJECT_REASONS."""

    TYPE: ClassVar[str] = "reject"
    blob: str
    index: int
    reason: str

    def __post_init__(self):
        _check_blob(self)
        _check_index(self)
        if type(self.reason) is not str or self.reason not in REJECT_REASONS:
            raise _fail(self, "reason", f"{self.reason!r} is none of {sorted(REJECT_REASONS)}")


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """Forget my Request for chunk ``index`` of ``blob`` (another peer sent it first)."""

    TYPE: ClassVar[str] = "cancel"
    blob: str
    index: int

    def __post_init__(self):
        _check_blob(self)
        _check_index(self)


@dataclass(frozen=True, slots=True)
class Line(Message):
    """Every upload slot of the sender is taken: the receiver's requests wait in line for
    one (``waiting``), or they no longer do, a slot is the receiver's (not ``waiting``).
    A receiver asks a waiting sender for nothing more, and asks a free holder for the
    chunks waiting there (cancelling them here)."""

    TYPE: ClassVar[str] = "line"
    waiting: bool

    def __post_init__(self):
        if type(self.waiting) is not bool:
            raise _fail(self, "waiting", f"must be a bool, not {type(self.waiting).__name__}")


@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Are you there? Answer with a Pong of the same nonce."""

    TYPE: ClassVar[str] = "ping"
    nonce: int

    def __post_init__(self):
        _check_int(self, "nonce", 0, MAX_NONCE)


@dataclass(frozen=True, slots=True)
class Pong(Message):
    """The answer to the Ping of the same nonce."""

    TYPE: ClassVar[str] = "pong"
    nonce: int

    def __post_init__(self):
        _check_int(self, "nonce", 0, MAX_NONCE)


@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    """The sender sends nothing more and will close: ``reason`` is for the log."""

    TYPE: ClassVar[str] = "goodbye"
    reason: str

    def __post_init__(self):
        _check_text(self, "reason")


@dataclass(frozen=True, slots=True)
class Preload(Message):
    """Fetch ``ref`` into your store: one node's ``p2pull preload`` warming the cluster."""

    TYPE: ClassVar[str] = "preload"
    ref: str

    def __post_init__(self):
        _check_text(self, "ref")


@dataclass(frozen=True, slots=True)
class StatusQuery(Message):
    """What do you hold and fetch? Answer with a StatusReply of the same nonce."""

    TYPE: ClassVar[str] = "status-query"
    nonce: int

    def __post_init__(self):
        _check_int(self, "nonce", 0, MAX_NONCE)


@dataclass(frozen=True, slots=True)
class StatusReply(Message):
    """``report``: UTF-8 JSON of the refs held and the blobs being fetched, for
    ``p2pull status --cluster``; at most MAX_REPORT bytes."""

    TYPE: ClassVar[str] = "status-reply"
    nonce: int
    report: bytes

    def __post_init__(self):
        _check_int(self, "nonce", 0, MAX_NONCE)
        if not isinstance(self.report, bytes):
            raise _fail(self, "report", f"must be bytes, not {type(self.report).__name__}")
        if len(self.report) > MAX_REPORT:
            raise _fail(self, "report", f"of {len(self.report)} bytes exceeds {MAX_REPORT}")


#: every message type by its wire name
MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, Auth, Interest, Bitmap, Have, Request, Piece, Reject,
                              Cancel, Line, Ping, Pong, Goodbye, Preload, StatusQuery,
                              StatusReply)
}
#: the header keys of each message type, in field order (a Piece's payload travels apart)
HEADER_FIELDS: dict[type[Message], tuple[str, ...]] = {
    cls: tuple(field.name for field in fields(cls) if field.name != "payload")
    for cls in MESSAGE_TYPES.values()
}
#: the fields a header may leave out (they have a default): added to the protocol later
OPTIONAL_FIELDS: dict[type[Message], frozenset[str]] = {
    cls: frozenset(field.name for field in fields(cls) if field.default is not MISSING)
    for cls in MESSAGE_TYPES.values()
}


# -- events a connection reports besides the messages it receives ---------------------------


@dataclass(frozen=True, slots=True)
class PeerVerified:
    """The handshake is complete: the peer proved the cluster secret. From now on both sides
    may send any message."""

    node_id: str
    cluster: str
    listen_port: int
    rack: str = ""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side at a frame boundary (``receive_data(b"")``). Look at
    ``PeerConnection.established`` to tell a closed session from an aborted handshake."""


#: what ``PeerConnection.next_event`` returns, besides NEED_DATA (Hello and Auth are taken
#: by the handshake and show as PeerVerified)
Event = (Interest | Bitmap | Have | Request | Piece | Reject | Cancel | Line | Ping | Pong
         | Goodbye | Preload | StatusQuery | StatusReply | PeerVerified | ConnectionClosed)


def to_header(message: Message) -> dict[str, Any]:
    """The header map of ``message``: its fields and ``"t"``; for a Piece ``"n"`` in place of
    the payload."""
    header: dict[str, Any] = {"t": message.TYPE}
    for name in HEADER_FIELDS[type(message)]:
        header[name] = getattr(message, name)
    if isinstance(message, Piece):
        header["n"] = memoryview(message.payload).nbytes
    return header

"""Frames: bytes to messages and back, with hard limits and no state machine.

A frame is a 4-byte big-endian unsigned length L of what follows, then a msgpack map (the
header), then, for a Piece only, the ``n`` raw payload bytes the header announces; so
L = len(header) + n. The length is checked against MAX_FRAME before anything past the
4 bytes is buffered; the header is parsed incrementally and may not exceed MAX_HEADER.

Copies: on receive, a Piece payload is copied once, from what ``receive_data`` was given
into memory the Piece then owns: ``bytes`` objects given while a payload arrives are kept as
they are and joined once it is complete (trio's ``receive_some`` returns bytes), or, with
``allocate``, every byte is written straight into a buffer the caller supplies. A mutable
buffer given without ``allocate`` costs one more copy, as the caller may reuse it. On send
the payload is not copied at all (``encode_piece``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

import msgpack

from p2pull.errors import LocalProtocolError, RemoteProtocolError
from p2pull.wire.messages import (
    HEADER_FIELDS,
    MAX_CHUNKS_PER_BLOB,
    MAX_CLUSTER,
    MAX_PAYLOAD,
    MAX_TEXT,
    MESSAGE_TYPES,
    OPTIONAL_FIELDS,
    ConnectionClosed,
    Message,
    Piece,
    to_header,
)

#: the largest header: a Bitmap of MAX_CHUNKS_PER_BLOB chunks carries 128 KiB of bits, and
#: twice that leaves room for its other fields and a later version's
MAX_HEADER = 256 * 1024
#: the largest frame: the largest header and the largest payload
MAX_FRAME = MAX_HEADER + MAX_PAYLOAD
#: the bytes of the length prefix
PREFIX = struct.Struct(">I")
#: msgpack limits, so that no object larger than the protocol allows is ever built: the
#: longest bin is a Bitmap's bits, the longest str a Goodbye reason; no message has an
#: array, ext type or nested map, and a header has at most a dozen keys
UNPACK_LIMITS: Final = dict(
    max_bin_len=(MAX_CHUNKS_PER_BLOB + 7) // 8,
    max_str_len=max(MAX_TEXT, MAX_CLUSTER),
    max_array_len=0,
    max_map_len=16,
    max_ext_len=0,
    raw=False,
    strict_map_key=True,
)
#: header bytes handed to msgpack at first: a Piece's header fits, so its payload is not
#: fed to the unpacker; a larger header gets twice as much each time (linear in total)
HEADER_PROBE = 1024
#: the receive buffer drops its consumed prefix once it is this large (and at least half
#: the buffer), so consuming frames is never quadratic
COMPACT_AT = 256 * 1024


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: returned by ``next_event`` and ``next_message`` when a whole frame has not arrived yet
NEED_DATA: Final = _NeedData()


def encode(message: Message) -> bytes:
    """The frame of ``message``, its payload included for a Piece (one copy: prefer
    ``encode_piece``)."""
    if isinstance(message, Piece):
        return b"".join(encode_piece(message))
    header = _pack(message)
    return PREFIX.pack(len(header)) + header


def encode_piece(piece: Piece) -> list[bytes | bytearray | memoryview]:
    """The frame of ``piece`` as [length prefix + header, payload]: the payload object itself,
    never copied, for a vectored or second write."""
    return [encode_piece_head(piece, memoryview(piece.payload).nbytes), piece.payload]


def encode_piece_head(piece: Piece, size: int) -> bytes:
    """The length prefix and header of a Piece frame whose payload is ``size`` bytes that
    the caller sends itself (``piece.payload`` is not used): a sender can then hand the
    payload from a file straight to the socket."""
    if type(size) is not int or not 0 <= size <= MAX_PAYLOAD:
        raise LocalProtocolError(f"piece payload of {size!r} bytes is not in 0..{MAX_PAYLOAD}")
    header = _pack(piece, {**to_header(piece), "n": size})
    return PREFIX.pack(len(header) + size) + header


def _pack(message: Message, fields: dict | None = None) -> bytes:
    header = msgpack.packb(fields or to_header(message), use_bin_type=True)
    if len(header) > MAX_HEADER:  # unreachable with v1's field limits; kept as a guard
        raise LocalProtocolError(f"{message.TYPE} header of {len(header)} bytes exceeds "
                                 f"{MAX_HEADER}")
    return header


def decode_header(header: object) -> tuple[Message, int]:
    """The message a header map describes, and the payload length that follows it (0 but for
    a Piece, whose payload is b"" here). Raises RemoteProtocolError."""
    if type(header) is not dict:
        raise RemoteProtocolError(f"frame header is a {type(header).__name__}, not a map")
    kind = header.get("t")
    cls = MESSAGE_TYPES.get(kind) if type(kind) is str else None
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {kind!r}"[:200])
    values = {}
    for name in HEADER_FIELDS[cls]:
        if name in header:
            values[name] = header[name]
        elif name not in OPTIONAL_FIELDS[cls]:
            raise RemoteProtocolError(f"{kind} header without {name!r}")
    size = 0
    if cls is Piece:
        size = header.get("n")
        if type(size) is not int or not 0 <= size <= MAX_PAYLOAD:
            raise RemoteProtocolError(f"piece payload length {size!r} outside 0..{MAX_PAYLOAD}"
                                      [:200])
        values["payload"] = b""
    try:
        return cls(**values), size
    except LocalProtocolError as exc:  # the peer sent what we would refuse to send
        raise RemoteProtocolError(str(exc)) from None


class FrameDecoder:
    """Bytes in, messages out: ``receive_data`` buffers, ``next_message`` returns a Message,
    NEED_DATA, or ConnectionClosed after a clean end of stream. Raises RemoteProtocolError
    for anything malformed; after that the decoder is unusable (the connection is dropped).

    Memory: at most one frame's header (MAX_HEADER) and one payload (MAX_PAYLOAD) per
    connection, plus what the caller feeds ahead of them.

    ``allocate(n)``, if given, returns a writable buffer of exactly n bytes for each Piece
    payload (say from a pool: a fresh bytearray costs a zero-fill and page faults); the
    Piece's payload is then a read-only view of it, and the caller may reuse it once done
    with that Piece. By default each payload gets a fresh buffer."""

    def __init__(self, allocate: Callable[[int], bytearray | memoryview] | None = None
                 ) -> None:
        self._allocate = allocate
        self._buffer = bytearray()
        self._start = 0  # read offset: bytes before it are consumed
        self._eof = False
        # the frame being read: its length once the prefix is in, its header's unpacker
        self._length: int | None = None
        self._unpacker: msgpack.Unpacker | None = None
        self._fed = 0
        # a Piece whose payload is still arriving: into a buffer from allocate, or else as
        # parts joined once all are in
        self._piece: Piece | None = None
        self._size = 0
        self._filled = 0
        self._into: memoryview | None = None
        self._parts: list[bytes] = []

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as messages."""
        return len(self._buffer) - self._start + self._filled

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer ``data``; b"" marks the end of the stream. A mutable ``data`` is copied (the
        caller may reuse it); bytes that belong to a payload are kept as they are."""
        if self._eof:
            raise LocalProtocolError("receive_data after the end of the stream")
        with memoryview(data) as given, given.cast("B") as view:
            if not view.nbytes:
                self._eof = True
                return
            taken = 0
            if self._piece is not None:
                # the buffer is empty while a payload arrives (next_message took all of it),
                # so the payload's bytes go to their place with no copy in between
                taken = min(view.nbytes, self._size - self._filled)
                if self._into is not None:
                    self._into[self._filled:self._filled + taken] = view[:taken]
                elif type(data) is bytes and taken == view.nbytes:
                    self._parts.append(data)  # immutable: kept as it is, joined later
                else:
                    self._parts.append(bytes(view[:taken]))
                self._filled += taken
            if taken < view.nbytes:
                if self._start >= COMPACT_AT and self._start * 2 >= len(self._buffer):
                    del self._buffer[:self._start]
                    self._start = 0
                self._buffer += view[taken:]

    def payload_space(self) -> memoryview | None:
        """Where the rest of the Piece payload now arriving may be received directly (the
        unfilled part of the buffer from ``allocate``), saving ``receive_data``'s copy; None
        when the next bytes must go through ``receive_data``. Report what was put there
        with ``payload_received``."""
        if self._into is None or self._filled >= self._size:
            return None
        return self._into[self._filled:]

    def payload_received(self, count: int) -> None:
        """``count`` bytes were written at the start of ``payload_space()``."""
        if self._into is None or not 0 < count <= self._size - self._filled:
            raise LocalProtocolError(f"payload_received({count}) with "
                                     f"{self._size - self._filled} payload bytes expected")
        self._filled += count

    def next_message(self) -> Message | ConnectionClosed | _NeedData:
        if self._piece is not None:
            if self._filled < self._size:
                return self._need_data()
            return self._finish_piece()
        available = len(self._buffer) - self._start
        if self._length is None:
            if available < PREFIX.size:
                return self._need_data()
            (length,) = PREFIX.unpack_from(self._buffer, self._start)
            if length > MAX_FRAME:
                raise RemoteProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
            if length == 0:
                raise RemoteProtocolError("empty frame")
            self._start += PREFIX.size
            available -= PREFIX.size
            self._length = length
            self._unpacker = msgpack.Unpacker(max_buffer_size=MAX_HEADER, **UNPACK_LIMITS)
            self._fed = 0
        header = self._read_header(available)
        if header is NEED_DATA:
            return self._need_data()
        header_size = self._unpacker.tell()
        message, size = decode_header(header)
        length = self._length
        if header_size + size != length:
            raise RemoteProtocolError(
                f"{message.TYPE} frame of {length} bytes holds a {header_size}-byte header"
                + (f" and a {size}-byte payload" if isinstance(message, Piece) else ""))
        self._start += header_size
        self._length = self._unpacker = None
        if not isinstance(message, Piece):
            return message
        # the payload: what of it is here now; receive_data puts the rest in place
        self._piece, self._size = message, size
        if self._allocate is not None:
            self._into = memoryview(self._allocate(size)).cast("B")
            if self._into.readonly or self._into.nbytes != size:
                raise ValueError(f"allocate({size}) returned a buffer of {self._into.nbytes} "
                                 f"bytes{', read-only' if self._into.readonly else ''}")
        taken = min(len(self._buffer) - self._start, size)
        if taken:
            with memoryview(self._buffer) as view:  # no view may outlive this block
                if self._into is not None:
                    self._into[:taken] = view[self._start:self._start + taken]
                else:
                    self._parts.append(bytes(view[self._start:self._start + taken]))
            self._start += taken
            self._filled = taken
        return self.next_message()

    def _finish_piece(self) -> Piece:
        """The Piece whose payload is all in: one copy (the join; none when the payload
        came in one bytes object) into memory no one else can change."""
        if self._into is not None:
            payload = self._into.toreadonly()
        else:
            payload = memoryview(b"".join(self._parts))
        piece = self._piece
        self._piece = self._into = None
        self._parts = []
        self._size = self._filled = 0
        return Piece(piece.blob, piece.index, piece.checksum, payload)

    def _read_header(self, available: int) -> object:
        """The header map once all of it is buffered, else NEED_DATA."""
        limit = min(self._length, MAX_HEADER)
        while True:
            try:
                return self._unpacker.unpack()
            except msgpack.OutOfData:
                pass
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                raise RemoteProtocolError(f"malformed frame header: {exc}"[:300]) from None
            if self._fed >= limit:
                if limit == self._length:
                    raise RemoteProtocolError(f"frame of {self._length} bytes ends inside "
                                              f"its header")
                raise RemoteProtocolError(f"frame header exceeds {MAX_HEADER} bytes")
            target = min(available, limit, max(HEADER_PROBE, 2 * self._fed))
            if target <= self._fed:
                return NEED_DATA
            with memoryview(self._buffer) as view:
                self._unpacker.feed(view[self._start + self._fed:self._start + target])
            self._fed = target

    def _need_data(self) -> _NeedData | ConnectionClosed:
        if not self._eof:
            return NEED_DATA
        if self.buffered or self._length is not None or self._piece is not None:
            raise RemoteProtocolError(f"stream ended inside a frame ({self.buffered} bytes "
                                      f"of it received)")
        return ConnectionClosed()

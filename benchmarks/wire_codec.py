"""Wire codec benchmark: Piece frames through two PeerConnections in memory, no sockets.

The sender encodes each piece with ``send_piece`` (the payload is never copied); the
receiver gets the frame in ``--read`` sized ``bytes`` objects, as trio's ``receive_some``
hands them over (cut once before the clock starts: the kernel's copy is not the codec's), and
takes each Piece out of ``next_event`` (its payload copied once, into memory the Piece
owns). The figure is payload bytes per second for encode and decode together, once with a
fresh buffer per payload (the default) and once with payload buffers reused from a pool
(``allocate=``), next to the machine's plain copy rate of the same pieces into a fresh and a
reused buffer (the floor of one copy), so the codec's own cost shows. Minor page faults
per piece are printed too: with fresh buffers, whether glibc hands back recycled heap or
fresh zeroed pages (mmap, or heap trimmed and grown again) varies from run to run and sets
the figure; pooled buffers fault once. Not a test: it prints figures and exits 0.

Usage::

    .venv/bin/python -m benchmarks.wire_codec [--piece 16MiB] [--total 2GiB] [--read 256KiB]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from p2pull.wire import NEED_DATA, PeerConnection, Piece

MB = 10**6
MIB = 2**20
BLOB = "sha256:" + "ab" * 32
CHECKSUM = bytes(16)


def mib_arg(text: str) -> int:
    text = text.strip()
    for suffix, scale in (("GiB", 2**30), ("MiB", MIB), ("KiB", 1024)):
        if text.endswith(suffix):
            return int(float(text[:-len(suffix)]) * scale)
    return int(text)


def connected_pair(allocate=None) -> tuple[PeerConnection, PeerConnection]:
    a = PeerConnection("a" * 32, "bench", b"secret", os.urandom(32), 1)
    b = PeerConnection("b" * 32, "bench", b"secret", os.urandom(32), 2, allocate=allocate)
    b.receive_data(a.start())
    a.receive_data(b.start())
    for _ in range(2):
        for conn, other in ((a, b), (b, a)):
            while conn.next_event() is not NEED_DATA:
                pass
            if auth := conn.data_to_send():  # b"" would tell the other side we closed
                other.receive_data(auth)
    assert a.established and b.established
    return a, b


def run_codec(piece: int, total: int, read: int, pool: bool) -> tuple[float, float]:
    """Seconds to move ``total`` payload bytes as ``piece``-sized Piece frames, and minor
    page faults per piece meanwhile; with ``pool``, payloads are received into two buffers
    used in turn."""
    buffers = [bytearray(piece), bytearray(piece)]
    turn = iter(range(1 << 62))
    sender, receiver = connected_pair(
        (lambda size: buffers[next(turn) % 2]) if pool else None)
    payload = os.urandom(piece)
    reads = [payload[offset:offset + read] for offset in range(0, piece, read)]
    count = max(1, total // piece)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.perf_counter()
    for index in range(count):
        head, body = sender.send_piece(BLOB, index, CHECKSUM, payload)
        assert body is payload
        receiver.receive_data(head)
        received = None
        for data in reads:
            receiver.receive_data(data)
            event = receiver.next_event()
            if event is not NEED_DATA:
                received = event
        assert isinstance(received, Piece) and len(received.payload) == piece
    seconds = time.perf_counter() - started
    return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / count


def run_copy(piece: int, total: int, read: int, pool: bool) -> float:
    """Seconds to copy the same bytes once in ``read`` slices into a fresh (or one reused)
    buffer per piece: the floor of one copy."""
    payload = memoryview(os.urandom(piece))
    count = max(1, total // piece)
    reused = bytearray(piece)
    started = time.perf_counter()
    for _ in range(count):
        copy = reused if pool else bytearray(piece)
        for offset in range(0, piece, read):
            copy[offset:offset + read] = payload[offset:offset + read]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--piece", type=mib_arg, default=16 * MIB)
    parser.add_argument("--total", type=mib_arg, default=2 * 2**30)
    parser.add_argument("--read", type=mib_arg, default=256 * 1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    moved = max(1, args.total // args.piece) * args.piece
    print(f"pieces of {args.piece / MIB:g} MiB, {moved / MIB:g} MiB in total, read slices of "
          f"{args.read / 1024:g} KiB; best of {args.rounds} rounds")
    for pool, name in ((False, "fresh buffers"), (True, "pooled buffers")):
        codec, faults = min(run_codec(args.piece, args.total, args.read, pool)
                            for _ in range(args.rounds))
        copy = min(run_copy(args.piece, args.total, args.read, pool)
                   for _ in range(args.rounds))
        print(f"{name + ':':16} wire encode+decode {moved / codec / MB:6.0f} MB/s "
              f"({faults:5.0f} page faults/piece), "
              f"one plain copy {moved / copy / MB:6.0f} MB/s")


if __name__ == "__main__":
    main()

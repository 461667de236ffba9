"""Peer throughput benchmark: one daemon serving another a large blob over loopback, against
a plain Python socket sender/receiver pair moving the same bytes in the same run.

Set-up: an in-process origin (``p2pull.origin.layout_server.LayoutOrigin``, the demo's; it
counts the bytes it serves) holds a one-layer artifact with a generated blob of ``--size``
bytes. Daemon A (``p2pull daemon``, its own process) pulls it from the origin once, so its
store holds the blob. Then, each round:

- ``raw``: a receiver process (``recv_into`` one reusable 1 MiB buffer) and a sender process
  move the blob's number of bytes over one TCP connection on 127.0.0.1. Time: the
  receiver's, from ``accept`` to the last byte. Nothing is verified or written. The sender
  (``--raw-sender``): ``memory`` (default) ``sendall``s one 1 MiB buffer over and over, the
  baseline of LAB-NOTES; ``file`` reads A's copy of the blob (page cache) by 1 MiB
  ``readinto`` and ``sendall``s it, the work daemon A does; ``sendfile`` uses
  ``socket.sendfile`` on that file.
- ``raw+sha256``: the same, and the receiver feeds every buffer to one sha256, the blob
  digest check no verifying receiver can skip; its digest is checked against the blob's
  when the sender sends the blob (``file``, ``sendfile``). Next to it, the benchmark times
  hashlib's sha256 over 1 MiB buffers in memory: no receiver that checks the digest can be
  faster than that, so ``sha256 / raw`` is the ceiling of the goal's ratio on the machine.
- ``raw+disk``: the same as ``raw``, and the receiver ``os.write``s every buffer to a file;
  timed to the last byte written, and (a second figure) after an ``fsync`` of the file.
- ``p2pull``: a fresh daemon B (empty store, A as its only static peer, connected before
  the timing starts) runs ``p2pull get REF -o DIR --json``. B must resolve the manifest at the
  origin, which stays up; the blob's chunks then come from A, which holds all of them, since
  p2pull takes a chunk from the origin only when no live peer holds it. A run counts only if
  B's JSON says at least 99 % of the bytes came from peers *and* the origin's own counter
  shows it served B less than 1 % of the blob; other runs are printed and excluded. The
  output is checked by sha256 after the timing.

Figures for p2pull: its JSON ``seconds`` (measured inside daemon B: resolve, fetch with
xxh3 per chunk, sha256 of the blob, fsync, publish, link the output; the goal's figure),
the wall clock around the ``p2pull get`` process (adds the CLI's start), and the peer
transfer rate sampled from B's ``/status`` every 50 ms (bytes from peers over the bulk of
the transfer only). Below each p2pull row: the wall-clock seconds before the first peer
bytes were seen (CLI start, manifest, bitmaps), of the bulk transfer and after the last
peer bytes (sha256 still to do, fsync, publish, CLI exit), and the CPU seconds daemons A
and B used during the get. Goal (issue 4): p2pull's rate >= 0.5x the raw rate,
verification on, against the raw pair *without* disk writes; ratios against raw+disk are
printed, labelled. The machine's load average is printed before and after: other work on
a 2-core machine skews every figure.

Usage::

    .venv/bin/python -m benchmarks.peer_throughput [--size 1GiB] [--rounds 3] [--json OUT]
        [--raw-sender memory|file|sendfile] [--profile DIR]

``--profile DIR`` adds one uncounted p2pull round with py-spy (``--py-spy BIN``, default the
one on PATH) recording daemons A and B into DIR (speedscope JSON, ``--nonblocking``).
Everything runs on 127.0.0.1; processes are ended by PID and the temporary directory removed
at the end, on errors, on Ctrl-C and on SIGTERM.

This module also holds the daemon helpers ``benchmarks.daemon_memory`` uses.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.far_origin import (MB, MIB, SEED, BenchmarkError, GeneratedFile,
                                   add_output_arguments, clean_env, fmt_mib, median,
                                   p2pull_command, remove, run_benchmark, sha256_file,
                                   size_arg)
from p2pull.config import Config
from p2pull.core.chunks import ChunkPlan
from p2pull.core.swarm import SwarmConfig
from p2pull.net import node as node_module
from p2pull.origin.layout_server import LayoutOrigin
from tests.support.registry import free_port, make_oci_layout

REPO = "bench/peer"
TAG = "v1"
BLOB_NAME = "blob.bin"
GOAL_RATIO = 0.5
#: a p2pull run counts only if at least this share of its bytes came from peers
MIN_PEER_SHARE = 0.99
#: the raw pair's buffer size (LAB-NOTES "Baselines": 1 MiB sendall/recv_into)
RAW_BUFFER = 1 << 20
RAW_SENDER_MODES = ("memory", "file", "sendfile")
RAW_SENDER_DESCRIPTIONS = {"memory": "sendall of one 1 MiB buffer, repeated",
                           "file": "readinto + sendall of A's blob file, 1 MiB at a time",
                           "sendfile": "socket.sendfile of A's blob file"}
#: how long a daemon may take to answer on its socket, and to connect to its peer
START_TIMEOUT_S = 30.0
STOP_GRACE_S = 10.0
RUN_TIMEOUT_S = 1800.0
#: B's /status is sampled this often for the peer transfer rate
STATUS_INTERVAL_S = 0.05
#: generated content: one random block this large, stamped every STAMP_EVERY bytes with
#: (file, offset) so no two chunks are alike; ~1 GB/s instead of randbytes' ~0.2 GB/s
GEN_BLOCK = 16 * MIB
STAMP_EVERY = 64 * 1024
#: a 1-minute load average above this before a run means other work shares the CPUs
LOAD_WARNING = 0.7


# ------------------------------------------------------------------ generated content


def write_stamped_file(path: Path, size: int, seed: str) -> GeneratedFile:
    """``size`` deterministic bytes: a pseudo-random 16 MiB block repeated, each 64 KiB
    of it stamped with the seed's hash and its offset (so every chunk differs)."""
    block = bytearray(random.Random(seed).randbytes(GEN_BLOCK))
    tag = hashlib.sha256(seed.encode()).digest()[:8]
    digest = hashlib.sha256()
    offset = 0
    with open(path, "wb") as out:
        while offset < size:
            for at in range(0, GEN_BLOCK, STAMP_EVERY):
                struct.pack_into(">8sQ", block, at, tag, offset + at)
            piece = memoryview(block)[:min(GEN_BLOCK, size - offset)]
            digest.update(piece)
            out.write(piece)
            offset += len(piece)
    return GeneratedFile(path.name, path, size, digest.hexdigest())


def serve_layout(stack: contextlib.ExitStack, work: Path,
                 files: list[GeneratedFile]) -> LayoutOrigin:
    """An OCI layout of ``files`` (hard links) served by an in-process origin."""
    make_oci_layout(work / "layout", {f.name: f.path for f in files}, tag=TAG)
    return stack.enter_context(LayoutOrigin(work / "layout"))


# ------------------------------------------------------------------ daemons


@dataclass
class GetRun:
    """One ``p2pull get`` through a daemon."""

    wall_seconds: float
    summary: dict[str, Any]


class Daemon:
    """One ``p2pull -v daemon`` process on 127.0.0.1 with its own store and socket, static
    peers only. Ended by its PID (SIGTERM, then SIGKILL)."""

    def __init__(self, work: Path, name: str, peers: list[str] = ()):
        self.name = name
        self.dir = work / name
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.socket = self.dir / "p2pull.sock"
        self.log_path = work / f"{name}.log"
        self.env = clean_env(P2PULL_DATA_DIR=str(self.dir), P2PULL_SOCKET=str(self.socket),
                             P2PULL_LISTEN=self.address, P2PULL_DISCOVERY="static",
                             P2PULL_PEERS=",".join(peers))
        self.process: subprocess.Popen | None = None
        self._api: httpx.Client | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> "Daemon":
        self.dir.mkdir(parents=True)
        with open(self.log_path, "ab") as log:
            # its own session: a Ctrl-C on the terminal reaches only the benchmark, which
            # then stops the daemon by its PID
            self.process = subprocess.Popen([*p2pull_command(), "-v", "daemon"], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        self._api = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                                 base_url="http://p2pull", timeout=5.0)
        self._wait(lambda: self.status() is not None, "to answer on its socket")
        return self

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if self.process.poll() is not None:
                raise BenchmarkError(f"daemon {self.name} exited with status "
                                     f"{self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise BenchmarkError(f"daemon {self.name} did not manage {what} in "
                                     f"{START_TIMEOUT_S:.0f} s; see {self.log_path}")
            time.sleep(0.05)

    def status(self) -> dict | None:
        try:
            response = self._api.get("/status")
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def wait_for_peers(self, count: int) -> None:
        def connected() -> bool:
            status = self.status()
            return status is not None and status["peers"] >= count
        self._wait(connected, f"to connect to {count} peer(s)")

    def get(self, ref: str, output: Path) -> GetRun:
        """``p2pull get REF -o OUTPUT --json`` through this daemon, timed by the wall clock."""
        command = [*p2pull_command(), "get", ref, "-o", str(output), "--json"]
        started = time.monotonic()
        result = subprocess.run(command, env=self.env, capture_output=True, text=True,
                                timeout=RUN_TIMEOUT_S)
        seconds = time.monotonic() - started
        if result.returncode != 0:
            raise BenchmarkError(f"p2pull get on {self.name} failed with exit status "
                                 f"{result.returncode}:\n{result.stderr[-4000:]}\n"
                                 f"(daemon log: {self.log_path})")
        try:
            summary = json.loads(result.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise BenchmarkError(f"p2pull printed no JSON summary: {result.stdout!r}") from None
        return GetRun(seconds, summary)

    def stop(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_GRACE_S)
        except ProcessLookupError:
            self.process.wait(timeout=STOP_GRACE_S)

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def verify_output(directory: Path, files: list[GeneratedFile]) -> None:
    for f in files:
        target = directory / f.name
        if not target.is_file() or sha256_file(target) != f.sha256:
            raise BenchmarkError(f"{target}: missing or wrong content (sha256 mismatch)")


class StatusSampler:
    """Samples a daemon's ``bytes_from_peers`` every STATUS_INTERVAL_S in a thread."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        api = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.daemon.socket)),
                           base_url="http://p2pull", timeout=5.0)
        with api:
            while not self._stop.wait(STATUS_INTERVAL_S):
                try:
                    status = api.get("/status").json()
                except (httpx.HTTPError, ValueError):
                    continue
                self.samples.append((time.monotonic(), status["bytes_from_peers"]))

    def __enter__(self) -> "StatusSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _bulk(self) -> tuple[tuple[float, int], tuple[float, int]] | None:
        """The first sample that saw peer bytes and the first that saw them all."""
        if not self.samples:
            return None
        final = self.samples[-1][1]
        first = next(((t, b) for t, b in self.samples if b > 0), None)
        last = next(((t, b) for t, b in self.samples if b >= final), None)
        if first is None or last is None or last[0] <= first[0]:
            return None
        return first, last

    def transfer_rate(self) -> float | None:
        """MB/s between the first sample that saw peer bytes and the first that saw them
        all: the bulk of the transfer, without the start and the final hash/publish."""
        bulk = self._bulk()
        if bulk is None:
            return None
        (t0, b0), (t1, b1) = bulk
        return (b1 - b0) / (t1 - t0) / MB

    def phases(self, started: float, ended: float) -> tuple[float, float, float] | None:
        """Seconds (before the first peer bytes were seen, seeing them arrive, after the
        last) of a get that ran from ``started`` to ``ended``; +-STATUS_INTERVAL_S each."""
        bulk = self._bulk()
        if bulk is None:
            return None
        (t0, _), (t1, _) = bulk
        return t0 - started, t1 - t0, ended - t1


def load_average() -> float:
    """The machine's 1-minute load average: other work skews the figures of a 2-core box."""
    with open("/proc/loadavg") as loadavg:
        return float(loadavg.read().split()[0])


def print_load(when: str) -> float:
    load = load_average()
    warning = "  WARNING: other processes are busy; the figures are skewed" \
        if load > LOAD_WARNING else ""
    print(f"machine load {when}: {load:.2f} (1-minute average, {os.cpu_count()} CPUs){warning}")
    return load


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ the raw socket pair

#: the raw receiver: listens on 127.0.0.1, prints its port, receives NBYTES into one
#: reusable buffer (MODE "mem"), also hashes them ("sha256") or writes them to TARGET
#: ("disk"), prints its timings
RAW_RECEIVER = r"""
import hashlib, json, os, socket, sys, time
mode, nbytes, target, bufsize = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
buffer = bytearray(bufsize)
view = memoryview(buffer)
fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if mode == "disk" else -1
digest = hashlib.sha256() if mode == "sha256" else None
got = 0
started = time.monotonic()
while got < nbytes:
    n = conn.recv_into(view, min(bufsize, nbytes - got))
    if not n:
        sys.exit(f"the sender closed after {got} bytes")
    if digest is not None:
        digest.update(view[:n])
    if fd >= 0:
        written = 0
        while written < n:
            written += os.write(fd, view[written:n])
    got += n
received = time.monotonic()
if fd >= 0:
    os.fsync(fd)
    os.close(fd)
synced = time.monotonic()
conn.close()
print(json.dumps({"bytes": got, "seconds": received - started,
                  "seconds_fsync": synced - started,
                  "sha256": digest.hexdigest() if digest is not None else None}), flush=True)
"""

#: the raw sender: connects to PORT and sends NBYTES: MODE "memory" sendall()s one 1 MiB
#: buffer (SOURCE's first MiB) over and over (LAB-NOTES' baseline), "file" reads SOURCE
#: with readinto() into a 1 MiB buffer and sendall()s it (the work daemon A does),
#: "sendfile" uses socket.sendfile (no copy through user space)
RAW_SENDER = r"""
import socket, sys
port, source, nbytes, mode, bufsize = (int(sys.argv[1]), sys.argv[2], int(sys.argv[3]),
                                       sys.argv[4], int(sys.argv[5]))
buffer = bytearray(bufsize)
view = memoryview(buffer)
with open(source, "rb", buffering=0) as file:
    if mode == "memory":
        file.readinto(view)
    sock = socket.create_connection(("127.0.0.1", port))
    if mode == "sendfile":
        sent = sock.sendfile(file, 0, nbytes)
    else:
        sent = 0
        while sent < nbytes:
            n = min(bufsize, nbytes - sent)
            if mode == "file":
                n = file.readinto(view[:n])
                if not n:
                    sys.exit("source file too short")
            sock.sendall(view[:n])
            sent += n
sock.close()
"""


def sha256_seconds(nbytes: int) -> float:
    """Seconds hashlib's sha256 takes over ``nbytes`` fed as 1 MiB buffers from memory: the
    machine's digest rate, which bounds any receiver that checks a blob's sha256."""
    buffer = memoryview(random.Random(SEED).randbytes(RAW_BUFFER))
    digest = hashlib.sha256()
    started = time.perf_counter()
    for offset in range(0, nbytes, RAW_BUFFER):
        digest.update(buffer[:min(RAW_BUFFER, nbytes - offset)])
    return time.perf_counter() - started


def run_raw_pair(source: Path, nbytes: int, mode: str, sender_mode: str,
                 target: Path) -> dict[str, float]:
    """One transfer by the raw pair; the receiver's timings."""
    receiver = subprocess.Popen([sys.executable, "-c", RAW_RECEIVER, mode, str(nbytes),
                                 str(target), str(RAW_BUFFER)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    sender = None
    try:
        port = int(receiver.stdout.readline())
        sender = subprocess.Popen([sys.executable, "-c", RAW_SENDER, str(port), str(source),
                                   str(nbytes), sender_mode, str(RAW_BUFFER)],
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        out, err = receiver.communicate(timeout=RUN_TIMEOUT_S)
        sender_err = sender.communicate(timeout=60)[1]
        if receiver.returncode or sender.returncode:
            raise BenchmarkError(f"raw pair failed: receiver {receiver.returncode} {err!r}, "
                                 f"sender {sender.returncode} {sender_err!r}")
        result = json.loads(out.strip().splitlines()[-1])
    except ValueError:
        receiver.kill()
        raise BenchmarkError(f"raw receiver printed no result: "
                             f"{receiver.communicate()[1]!r}") from None
    finally:
        for process in (sender, receiver):
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
    if result["bytes"] != nbytes:
        raise BenchmarkError(f"raw receiver got {result['bytes']} bytes, not {nbytes}")
    return result


# ------------------------------------------------------------------ the benchmark


@dataclass
class Run:
    round: int
    client: str  # raw, raw+sha256, sha256, raw+disk, p2pull
    seconds: float  # raw: receiver's; sha256: in memory; p2pull: its JSON 'seconds'
    payload_bytes: int
    #: raw+disk: after fsync; p2pull: wall clock around the get process
    seconds_2: float | None = None
    #: p2pull: MB/s of the bulk of the peer transfer, from B's /status
    transfer_rate: float | None = None
    #: p2pull: seconds from the get's start to the first peer bytes seen, of the bulk
    #: transfer, and from the last peer bytes to the get's exit (wall clock)
    phases: tuple[float, float, float] | None = None
    #: p2pull: CPU seconds used during the get by daemon A and daemon B
    cpu_a: float | None = None
    cpu_b: float | None = None
    from_peers: int | None = None
    from_origin: int | None = None
    origin_served: int | None = None
    counted: bool = True
    verified: bool = False
    note: str = ""
    #: p2pull: B's log line on the blob's publish (chunks hashed from receive buffers)
    published: str = ""

    @property
    def rate(self) -> float:
        return self.payload_bytes / self.seconds / MB

    @property
    def rate_2(self) -> float | None:
        return None if self.seconds_2 is None else self.payload_bytes / self.seconds_2 / MB


ROW = "{:>5}  {:10} {:>8} {:>8} {:>12} {:>10} {:>11} {:>11}  {}"


def print_header() -> None:
    print(ROW.format("round", "client", "seconds", "MB/s", "2nd MB/s", "xfer MB/s",
                     "from peers", "from origin", "check"))
    print(ROW.format("", "", "", "", "(fsync|wall)", "(status)", "MiB", "MiB", ""))


def print_run(run: Run) -> None:
    def mib(n):
        return "" if n is None else f"{n / MIB:.1f}"
    check = (("sha256 ok" if run.verified else "size ok")
             if run.client in ("raw+disk", "p2pull") or run.verified else "")
    if not run.counted:
        check = f"EXCLUDED: {run.note}"
    print(ROW.format(run.round, run.client, f"{run.seconds:.3f}", f"{run.rate:.1f}",
                     "" if run.rate_2 is None else f"{run.rate_2:.1f}",
                     "" if run.transfer_rate is None else f"{run.transfer_rate:.1f}",
                     mib(run.from_peers), mib(run.from_origin), check), flush=True)
    if run.cpu_b is not None:
        phases = "" if run.phases is None else (
            "wall: {:.2f} s to the first peer bytes, {:.2f} s of transfer, {:.2f} s after "
            "the last; ".format(*run.phases))
        print(f"{'':15}{phases}CPU: B {run.cpu_b:.2f} s, A {run.cpu_a:.2f} s; origin served "
              f"B {run.origin_served} bytes", flush=True)
    if run.published:
        print(f"{'':15}B: {run.published}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peer_throughput",
        description="One p2pull daemon serving another a blob over loopback, against a "
                    "plain Python socket pair.")
    parser.add_argument("--size", type=size_arg, default="1GiB", help="blob size (1GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each client (3)")
    parser.add_argument("--raw-sender", choices=RAW_SENDER_MODES, default="memory",
                        help="what the raw sender sends: 'memory', one 1 MiB buffer "
                             "sendall()ed over and over (default; LAB-NOTES' baseline); "
                             "'file', A's blob file by 1 MiB readinto + sendall (the "
                             "work A does); 'sendfile', A's blob file by socket.sendfile")
    add_output_arguments(parser)
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="add one uncounted p2pull round profiled by py-spy into DIR")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), metavar="BIN",
                        help="the py-spy binary for --profile (default: on PATH)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.profile and not args.py_spy:
        parser.error("--profile needs py-spy: put it on PATH or give --py-spy BIN")
    return run_benchmark(benchmark, args, lambda r: r["medians"]["goal_ratio"])


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        load_before = print_load("before the benchmark")
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="p2pull-bench-peer-", dir=args.workdir, ignore_cleanup_errors=True)))
        started = time.monotonic()
        (work / "content").mkdir()
        blob = write_stamped_file(work / "content" / BLOB_NAME, args.size, f"{SEED}:peer")
        origin = serve_layout(stack, work, [blob])
        ref = f"{origin.host}/{REPO}:{TAG}"
        generated = time.monotonic() - started

        a = stack.enter_context(Daemon(work, "a"))
        seeded = a.get(ref, work / "a-out")
        verify_output(work / "a-out", [blob])
        if seeded.summary["from_origin"] < blob.size:
            raise BenchmarkError(f"A should have pulled everything from the origin: "
                                 f"{seeded.summary}")
        a_blob = Path(a.dir) / "blobs" / "sha256" / blob.sha256

        plan = ChunkPlan.for_blob(blob.size, Config().chunk_size)
        swarm = SwarmConfig()
        settings = {"size_bytes": blob.size, "rounds": args.rounds,
                    "raw_sender": args.raw_sender, "chunk_size": plan.chunk_size,
                    "chunks": plan.count, "pipeline_depth": swarm.pipeline_depth,
                    "upload_slots": Config().upload_slots,
                    "receive_size": node_module.RECEIVE_SIZE}
        print(f"peer throughput: one blob of {fmt_mib(blob.size)}; origin: in-process "
              f"LayoutOrigin at {origin.host}")
        print(f"generated in {generated:.1f} s; daemon A (pid {a.pid}) pulled it from the "
              f"origin in {seeded.summary['seconds']:.2f} s (sha256 checked)")
        print(f"p2pull: chunks of {fmt_mib(plan.chunk_size)} ({plan.count}), pipeline depth "
              f"{swarm.pipeline_depth} per peer, {settings['upload_slots']} upload slots, "
              f"socket reads of {fmt_mib(node_module.RECEIVE_SIZE)}")
        print(f"raw pair: sender mode '{args.raw_sender}' "
              f"({RAW_SENDER_DESCRIPTIONS[args.raw_sender]}), receiver recv_into a "
              f"{fmt_mib(RAW_BUFFER)} buffer")
        print(f"{args.rounds} rounds of raw, raw+sha256, sha256 (in memory), raw+disk, "
              "p2pull (a fresh daemon B each round, "
              "connected to A before the timing)")
        print()
        print_header()

        runs: list[Run] = []
        for n in range(1, args.rounds + 1):
            result = run_raw_pair(a_blob, blob.size, "mem", args.raw_sender, work / "unused")
            runs.append(Run(n, "raw", result["seconds"], blob.size))
            print_run(runs[-1])

            result = run_raw_pair(a_blob, blob.size, "sha256", args.raw_sender, work / "unused")
            sends_blob = args.raw_sender != "memory"
            if sends_blob and result["sha256"] != blob.sha256:
                raise BenchmarkError("the raw receiver's sha256 is not the blob's")
            runs.append(Run(n, "raw+sha256", result["seconds"], blob.size, verified=sends_blob))
            print_run(runs[-1])
            runs.append(Run(n, "sha256", sha256_seconds(blob.size), blob.size))
            print_run(runs[-1])

            target = work / f"raw-{n}.bin"
            result = run_raw_pair(a_blob, blob.size, "disk", args.raw_sender, target)
            if target.stat().st_size != blob.size:
                raise BenchmarkError(f"the raw receiver wrote {target.stat().st_size} bytes")
            remove(target)
            runs.append(Run(n, "raw+disk", result["seconds"], blob.size,
                            seconds_2=result["seconds_fsync"]))
            print_run(runs[-1])

            runs.append(p2pull_round(work, n, a, origin, ref, blob))
            print_run(runs[-1])

        profile = None
        if args.profile:
            profile = profile_round(args, work, a, origin, ref, blob)

        counted = [r for r in runs if r.client == "p2pull" and r.counted]
        if not counted:
            raise BenchmarkError("no p2pull run took (nearly) all its bytes from the peer; "
                                 "there is no figure")
        medians = summarise(runs, blob.size)
        print_summary(medians, len(counted), args.rounds)
        load_after = print_load("at the end")
        return {
            "benchmark": "peer_throughput",
            "settings": settings,
            "load_average": {"before": load_before, "after": load_after},
            "blob": {"digest": blob.digest, "size": blob.size},
            "seed_pull": seeded.summary,
            "runs": [{**asdict(r), "rate_mb_s": r.rate, "rate_2_mb_s": r.rate_2} for r in runs],
            "medians": medians,
            "goals": {"ratio_min": GOAL_RATIO},
            "profile": profile,
        }


def p2pull_round(work: Path, n: int, a: Daemon, origin: LayoutOrigin, ref: str,
                 blob: GeneratedFile, profiler=None) -> Run:
    """A fresh daemon B with A as its only peer pulls ``ref``; B and its output are removed
    afterwards."""
    name = f"b{n}"
    b = Daemon(work, name, peers=[a.address])
    output = work / f"{name}-out"
    try:
        b.start()
        b.wait_for_peers(1)
        a.wait_for_peers(1)
        with profiler(a, b) if profiler else contextlib.nullcontext():
            served_before = origin.bytes_served
            cpu_before = cpu_seconds(a.pid), cpu_seconds(b.pid)
            with StatusSampler(b) as sampler:
                started = time.monotonic()
                got = b.get(ref, output)
                ended = time.monotonic()
            cpu_a, cpu_b = (cpu_seconds(d.pid) - before for d, before in zip((a, b), cpu_before))
            served = origin.bytes_served - served_before
        summary = got.summary
        run = Run(n, "p2pull", summary["seconds"], blob.size, seconds_2=got.wall_seconds,
                  transfer_rate=sampler.transfer_rate(), phases=sampler.phases(started, ended),
                  cpu_a=cpu_a, cpu_b=cpu_b, from_peers=summary["from_peers"],
                  from_origin=summary["from_origin"], origin_served=served)
        if summary["from_peers"] < MIN_PEER_SHARE * blob.size or \
                served >= (1 - MIN_PEER_SHARE) * blob.size:
            run.counted = False
            run.note = (f"{summary['from_peers']} bytes from peers, the origin served "
                        f"{served}")
        verify_output(output, [blob])
        run.verified = True
        run.published = published_line(b.log_path, blob.digest)
        return run
    finally:
        b.stop()
        remove(output)
        remove(b.dir)


def published_line(log_path: Path, digest: str) -> str:
    """What a daemon's log says about the publish of ``digest`` ("" if nothing)."""
    with contextlib.suppress(OSError):
        for line in reversed(log_path.read_text(errors="replace").splitlines()):
            if f"{digest} published" in line:
                return line.split(" published: ", 1)[-1]
    return ""


@contextlib.contextmanager
def py_spy(binary: str, directory: Path, a: Daemon, b: Daemon):
    """py-spy recording daemons A and B (all threads, native frames off, non-blocking)."""
    directory.mkdir(parents=True, exist_ok=True)
    spies = []
    for daemon in (a, b):
        out = directory / f"peer-throughput-{daemon.name[0]}.speedscope.json"
        spies.append(subprocess.Popen(
            [binary, "record", "--nonblocking", "--threads", "--idle", "--rate", "200",
             "--format", "speedscope", "--output", str(out), "--pid", str(daemon.pid)],
            stdout=subprocess.DEVNULL, stderr=open(directory / f"{daemon.name}.py-spy.log",
                                                   "w")))
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        for spy in spies:
            if spy.poll() is None:
                os.kill(spy.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
        for spy in spies:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(spy.pid, signal.SIGKILL)
                spy.wait()


def profile_round(args, work: Path, a: Daemon, origin: LayoutOrigin, ref: str,
                  blob: GeneratedFile) -> dict[str, Any]:
    print()
    print(f"profile round (not counted): py-spy recording A and B into {args.profile}")
    run = p2pull_round(work, 0, a, origin, ref, blob,
                       profiler=lambda a_, b_: py_spy(args.py_spy, args.profile, a_, b_))
    run.client = "profiled"
    print_run(run)
    return {**asdict(run), "rate_mb_s": run.rate, "directory": str(args.profile)}


def summarise(runs: list[Run], size: int) -> dict[str, Any]:
    p2pull = [r for r in runs if r.client == "p2pull" and r.counted]
    raw = median([r.seconds for r in runs if r.client == "raw"])
    raw_sha = median([r.seconds for r in runs if r.client == "raw+sha256"])
    sha = median([r.seconds for r in runs if r.client == "sha256"])
    disk = [r for r in runs if r.client == "raw+disk"]
    disk_s, disk_fsync_s = median([r.seconds for r in disk]), median([r.seconds_2 for r in disk])
    p_s, p_wall = median([r.seconds for r in p2pull]), median([r.seconds_2 for r in p2pull])
    transfer = [r.transfer_rate for r in p2pull if r.transfer_rate is not None]
    rates = {
        "raw": size / raw / MB,
        "raw_sha256": size / raw_sha / MB,
        "sha256": size / sha / MB,
        "raw_disk": size / disk_s / MB,
        "raw_disk_fsync": size / disk_fsync_s / MB,
        "p2pull": size / p_s / MB,
        "p2pull_wall": size / p_wall / MB,
        "p2pull_transfer": median(transfer) if transfer else None,
    }
    return {
        "raw_seconds": raw, "raw_sha256_seconds": raw_sha, "sha256_seconds": sha,
        "raw_disk_seconds": disk_s,
        "raw_disk_fsync_seconds": disk_fsync_s, "p2pull_seconds": p_s,
        "p2pull_wall_seconds": p_wall,
        **{f"{k}_rate_mb_s": v for k, v in rates.items()},
        "ratio": rates["p2pull"] / rates["raw"],
        "ratio_vs_raw_sha256": rates["p2pull"] / rates["raw_sha256"],
        #: the goal's ratio a receiver could reach if it did nothing but hash
        "ceiling_raw_sha256": rates["raw_sha256"] / rates["raw"],
        "ceiling_sha256": rates["sha256"] / rates["raw"],
        "ratio_vs_raw_disk": rates["p2pull"] / rates["raw_disk"],
        "ratio_vs_raw_disk_fsync": rates["p2pull"] / rates["raw_disk_fsync"],
        "ratio_wall": rates["p2pull_wall"] / rates["raw"],
        "ratio_transfer": (rates["p2pull_transfer"] / rates["raw"]
                           if rates["p2pull_transfer"] else None),
        "goal_ratio": rates["p2pull"] / rates["raw"] >= GOAL_RATIO,
    }


def print_summary(m: dict[str, Any], counted: int, rounds: int) -> None:
    print()
    print(f"medians (MB = 10^6 bytes; p2pull over the {counted} of {rounds} runs that took "
          f">= {MIN_PEER_SHARE:.0%} from the peer):")
    print(f"  raw           {m['raw_seconds']:8.3f} s  {m['raw_rate_mb_s']:8.1f} MB/s   "
          "socket pair, recv_into, no disk")
    print(f"  raw+sha256    {m['raw_sha256_seconds']:8.3f} s  {m['raw_sha256_rate_mb_s']:8.1f} "
          "MB/s   + sha256 of every buffer (the blob digest check)")
    print(f"  sha256        {m['sha256_seconds']:8.3f} s  {m['sha256_rate_mb_s']:8.1f} MB/s"
          "   hashlib over 1 MiB buffers in memory, no socket")
    print(f"  raw+disk      {m['raw_disk_seconds']:8.3f} s  {m['raw_disk_rate_mb_s']:8.1f} MB/s"
          "   + os.write of every buffer")
    print(f"  raw+disk+sync {m['raw_disk_fsync_seconds']:8.3f} s  "
          f"{m['raw_disk_fsync_rate_mb_s']:8.1f} MB/s   + fsync at the end")
    print(f"  p2pull        {m['p2pull_seconds']:8.3f} s  {m['p2pull_rate_mb_s']:8.1f} MB/s"
          "   daemon B's JSON 'seconds' (xxh3 + sha256 + fsync + publish)")
    print(f"  p2pull wall   {m['p2pull_wall_seconds']:8.3f} s  "
          f"{m['p2pull_wall_rate_mb_s']:8.1f} MB/s   around the `p2pull get` process")
    if m["p2pull_transfer_rate_mb_s"]:
        print(f"  p2pull xfer              {m['p2pull_transfer_rate_mb_s']:8.1f} MB/s   "
              "bulk of the peer transfer only (B's /status every 50 ms)")
    print(f"  ratio p2pull / raw              {m['ratio']:6.2f} x   (the goal's figure)")
    print(f"  ratio p2pull / raw+sha256       {m['ratio_vs_raw_sha256']:6.2f} x   "
          "(against a receiver that only checks the digest)")
    print(f"  ceiling raw+sha256 / raw        {m['ceiling_raw_sha256']:6.2f} x   "
          "(the goal's ratio of a receiver that does nothing but hash)")
    print(f"  ceiling sha256 / raw            {m['ceiling_sha256']:6.2f} x   "
          "(no receiver that checks the sha256 can pass this)")
    print(f"  ratio p2pull / raw+disk         {m['ratio_vs_raw_disk']:6.2f} x   "
          "(against a receiver that also writes)")
    print(f"  ratio p2pull / raw+disk+fsync   {m['ratio_vs_raw_disk_fsync']:6.2f} x   "
          "(... and fsyncs, as p2pull's publish does)")
    print(f"  ratio p2pull wall / raw         {m['ratio_wall']:6.2f} x   "
          "(CLI process start included)")
    if m["ratio_transfer"]:
        print(f"  ratio p2pull xfer / raw         {m['ratio_transfer']:6.2f} x   "
              "(peer transfer phase only)")
    verdict = "PASS" if m["goal_ratio"] else "FAIL"
    print(f"goal: >= {GOAL_RATIO:g}x raw socket rate (no disk), verification on: {verdict}")
    if m["ceiling_sha256"] < GOAL_RATIO:
        print(f"      out of reach on this machine: its sha256 runs at "
              f"{m['ceiling_sha256']:.2f}x the raw socket rate")


if __name__ == "__main__":
    sys.exit(main())

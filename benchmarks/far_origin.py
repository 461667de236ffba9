"""Far-origin benchmark: p2pull against skopeo, one node, through a slow, distant link.

CNCF Distribution runs on loopback with a generated model (four files: one large weight
file of about 80 %, two medium ones, a config.json) pushed by skopeo from an OCI layout, so
the registry's content was made by a client that is not p2pull. A userspace proxy in its own
process (``tests.support.proxy``) stands in front of it and makes it "far": a delay of half
the round trip in each direction, a cap per TCP connection (a TCP window over a long RTT)
and a cap for all connections together (the link).

Rounds alternate the two clients, each a fresh process timed by the wall clock around it
(process start included):

- ``p2pull get REF -o DIR --json`` with a fresh, empty store (P2PULL_DATA_DIR);
- ``skopeo copy docker://REF dir:DIR``, which reads each blob over one stream.

After every run the output is checked by sha256 against the generated content: a fast but
wrong result fails the benchmark. Bytes that crossed the proxy are counted per run.

Usage::

    .venv/bin/python -m benchmarks.far_origin [--size 512MiB] [--rounds 3] [--rtt-ms 40]
        [--conn-rate 4MB] [--link-rate 32MB] [--json OUT]

Rates are in MB/s with MB = 10**6 bytes (as ``--conn-rate``/``--link-rate`` are); sizes
given with ``MiB`` are powers of two. Keep the link cap at or below ~40 MB/s on a 2-core
machine, or the proxy is what gets measured (LAB-NOTES "A far origin on loopback").

This module also holds the helpers ``benchmarks.loopback`` uses.
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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2pull.config import parse_size
from p2pull.errors import UsageError
from tests.support.proxy import STATS_INTERVAL_S, ProxyProcess, parse_rate
from tests.support.registry import (MODEL_CONFIG, Registry, make_oci_layout, skopeo_push_layout,
                                    start_registry)

#: rates and byte counts in the report are decimal megabytes, like the proxy's caps
MB = 10**6
MIB = 2**20
#: pieces of generated content: large enough that randbytes runs at its full speed
#: (~250 MB/s here), small enough to keep memory flat
PIECE_BYTES = 16 * MIB
#: the seed of all generated content, so every run of the benchmark pulls the same bytes
SEED = 20261125
#: shares of the model's bytes (after config.json) held by its weight files, largest first
WEIGHT_SHARES = (("model.safetensors", 0.8), ("embeddings.safetensors", 0.1),
                 ("lm_head.safetensors", None))  # None: the rest
REPO_TAG = "bench/model:v1"
PREFLIGHT_REPO_TAG = "bench/preflight:v1"
#: one client run taking longer than this is a hang, not a result
RUN_TIMEOUT_S = 3600.0
#: the proxy rewrites its stats file every STATS_INTERVAL_S; after a client exits, wait for
#: two rewrites so its last bytes are in the counters we read
SETTLE_S = 2 * STATS_INTERVAL_S + 0.1
GOAL_SPEEDUP = 5.0
GOAL_LINK_SHARE = 0.85


class BenchmarkError(Exception):
    """A run failed or produced wrong bytes: the benchmark has no valid figure."""


# ------------------------------------------------------------------ generated content


@dataclass(frozen=True)
class GeneratedFile:
    name: str
    path: Path
    size: int
    sha256: str  # hex

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}"


def write_random_file(path: Path, size: int, seed: str) -> GeneratedFile:
    """Write ``size`` pseudo-random bytes determined by ``seed``; return them described."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        left = size
        while left:
            piece = rng.randbytes(min(PIECE_BYTES, left))
            digest.update(piece)
            out.write(piece)
            left -= len(piece)
    return GeneratedFile(path.name, path, size, digest.hexdigest())


def write_bytes_file(path: Path, content: bytes) -> GeneratedFile:
    path.write_bytes(content)
    return GeneratedFile(path.name, path, len(content), hashlib.sha256(content).hexdigest())


def generate_model(directory: Path, size: int, *, seed: str = SEED,
                   write_weights: Callable[[Path, int, str], GeneratedFile] = write_random_file
                   ) -> list[GeneratedFile]:
    """A model of ``size`` bytes in total: config.json plus three weight files, each
    written by ``write_weights(path, size, f"{seed}:{name}")``."""
    directory.mkdir(parents=True)
    config = json.dumps({"architectures": ["BenchModel"], "hidden_size": 4096,
                         "num_hidden_layers": 32, "seed": SEED}, indent=2).encode()
    rest = size - len(config)
    if rest < len(WEIGHT_SHARES):
        raise BenchmarkError(f"--size {size} is too small for a model of four files")
    files = []
    left = rest
    for name, share in WEIGHT_SHARES:
        nbytes = left if share is None else int(rest * share)
        files.append(write_weights(directory / name, nbytes, f"{seed}:{name}"))
        left -= nbytes
    files.append(write_bytes_file(directory / "config.json", config))
    return files


def push_files(registry: Registry, workdir: Path, repo_tag: str,
               files: list[GeneratedFile]) -> str:
    """Push ``files`` as a ModelPack artifact with skopeo (from an OCI layout); return the
    manifest digest. The layout's blobs are hard links, so it costs no space."""
    layout = workdir / f"layout-{repo_tag.replace('/', '_').replace(':', '_')}"
    tag = repo_tag.rpartition(":")[2]
    make_oci_layout(layout, {f.name: f.path for f in files}, tag=tag)
    digest = skopeo_push_layout(layout, registry, repo_tag)
    shutil.rmtree(layout)
    return digest


def check_skopeo_copies_modelpack(registry: Registry, workdir: Path) -> str:
    """skopeo must be able to copy a ModelPack artifact (a config media type that is not an
    image config) for the comparison to use the same content for both clients. Checked on a
    tiny artifact straight from the registry; returns a line for the report."""
    where = workdir / "preflight"
    where.mkdir()
    files = [write_bytes_file(where / "weights.bin", b"preflight" * 100),
             write_bytes_file(where / "config.json", b"{}")]
    push_files(registry, where, PREFLIGHT_REPO_TAG, files)
    result = subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
         f"docker://{registry.host}/{PREFLIGHT_REPO_TAG}", f"dir:{where / 'out'}"],
        capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise BenchmarkError(
            "skopeo refused to copy a ModelPack artifact (config media type "
            f"{MODEL_CONFIG}); the benchmark would need an OCI image as content:\n"
            f"{result.stderr}")
    shutil.rmtree(where)
    version = subprocess.run(["skopeo", "--version"], capture_output=True, text=True).stdout
    return (f"content: ModelPack artifact (config {MODEL_CONFIG}), the same for both "
            f"clients; {version.strip()} copies it (checked)")


# ------------------------------------------------------------------ running clients


def p2pull_command() -> list[str]:
    """The ``p2pull`` entry point next to this interpreter (the venv's), else ``-m``."""
    script = Path(sys.executable).with_name("p2pull")
    return [str(script)] if script.exists() else [sys.executable, "-m", "p2pull"]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without P2PULL_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PULL_")}
    env.update(extra)
    return env


def run_timed(command: list[str], *, env: Mapping[str, str] | None = None,
              what: str) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``command`` to completion; (wall-clock seconds including process start, result).
    Raises BenchmarkError if it fails. An exception here (Ctrl-C included) kills the child
    (``subprocess.run`` does)."""
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise BenchmarkError(f"{what} failed with exit status {result.returncode}:\n"
                             f"$ {' '.join(command)}\n{result.stderr[-4000:]}")
    return seconds, result


def run_p2pull_get(ref: str, store: Path, output: Path,
                   expected_bytes: int) -> tuple[float, dict[str, Any]]:
    """``p2pull get REF -o OUTPUT --json`` with an empty store; (seconds, its JSON)."""
    if store.exists():
        raise BenchmarkError(f"{store} exists: each p2pull run needs a fresh store")
    seconds, result = run_timed([*p2pull_command(), "get", ref, "-o", str(output), "--json"],
                                env=clean_env(P2PULL_DATA_DIR=str(store)), what="p2pull get")
    try:
        summary = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise BenchmarkError(f"p2pull printed no JSON summary: {result.stdout!r}") from None
    if summary.get("reused") or summary.get("from_peers"):
        raise BenchmarkError(f"a fresh store should take everything from the origin: {summary}")
    if summary.get("bytes", 0) < expected_bytes or summary.get("from_origin") != summary["bytes"]:
        raise BenchmarkError(f"p2pull reports {summary.get('bytes')} bytes, "
                             f"{summary.get('from_origin')} from the origin; expected "
                             f"{expected_bytes} of files")
    return seconds, summary


def sha256_file(path: Path) -> str:
    with open(path, "rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


def verify_tree(directory: Path, files: list[GeneratedFile]) -> None:
    """``directory`` holds exactly ``files`` by name, each with the right sha256."""
    found = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    wanted = sorted(f.name for f in files)
    if found != wanted:
        raise BenchmarkError(f"{directory} holds {found}, expected {wanted}")
    for f in files:
        if sha256_file(directory / f.name) != f.sha256:
            raise BenchmarkError(f"{directory / f.name}: wrong content (sha256 mismatch)")


def verify_skopeo_dir(directory: Path, files: list[GeneratedFile]) -> None:
    """skopeo's ``dir:`` names each blob by its hex digest: each file's blob, right bytes."""
    for f in files:
        blob = directory / f.sha256
        if not blob.is_file() or sha256_file(blob) != f.sha256:
            raise BenchmarkError(f"skopeo output lacks or damaged the blob of {f.name}")


def remove(path: Path) -> None:
    """Delete a run's output (a store's blobs are read-only files: rmtree copes)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def median(values: list[float]) -> float:
    return statistics.median(values)


def interrupt_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt, so the same clean-up runs for both. SIGINT
    is set explicitly because a shell starts background jobs with it ignored."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)


def fmt_mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.1f} MiB"


# ------------------------------------------------------------------ proxy counters


class ProxySampler:
    """Reads the proxy's counters while a client runs: bytes and connections it made, and
    bytes per second over the run (a timeline, from the 0.2 s stats file)."""

    def __init__(self, proxy: ProxyProcess):
        self.proxy = proxy
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base: dict[str, int] = {}
        self._started = 0.0

    def _read(self) -> dict[str, int]:
        stats = self.proxy.stats()
        return {k: int(stats.get(k, 0)) for k in ("bytes_down", "bytes_up", "connections")}

    def __enter__(self) -> "ProxySampler":
        time.sleep(SETTLE_S)  # the previous run's last bytes are in the file by now
        self._base = self._read()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(STATS_INTERVAL_S / 2):
            self.samples.append((time.monotonic() - self._started,
                                 self._read()["bytes_down"] - self._base["bytes_down"]))

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def delta(self) -> dict[str, int]:
        """Counters gained since ``__enter__``; call after ``__exit__``."""
        time.sleep(SETTLE_S)
        now = self._read()
        return {k: now[k] - self._base[k] for k in now}

    def per_second(self) -> list[float]:
        """MB received in each whole second of the run (the last one partial)."""
        rates, previous, second = [], 0, 1
        for t, nbytes in self.samples:
            if t >= second:
                rates.append((nbytes - previous) / MB)
                previous, second = nbytes, second + 1
        if self.samples and self.samples[-1][1] > previous:
            rates.append((self.samples[-1][1] - previous) / MB)
        return rates


# ------------------------------------------------------------------ the benchmark


@dataclass
class Run:
    round: int
    client: str
    seconds: float
    payload_bytes: int
    proxy_bytes_down: int
    proxy_connections: int
    verified: bool = False
    #: p2pull's own JSON summary (its 'seconds' excludes process start)
    summary: dict[str, Any] | None = None
    #: MB per second through the proxy, second by second
    timeline: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.payload_bytes / self.seconds / MB


def run_round(n: int, work: Path, proxy: ProxyProcess, ref: str,
              files: list[GeneratedFile], payload: int) -> list[Run]:
    runs = []
    store, out = work / f"p2pull-store-{n}", work / f"p2pull-out-{n}"
    with ProxySampler(proxy) as sampler:
        seconds, summary = run_p2pull_get(ref, store, out, payload)
    counters = sampler.delta()
    run = Run(n, "p2pull", seconds, payload, counters["bytes_down"], counters["connections"],
              summary=summary, timeline=[round(x, 1) for x in sampler.per_second()])
    verify_tree(out, files)
    run.verified = True
    remove(out)
    remove(store)
    print_run(run)
    runs.append(run)

    out = work / f"skopeo-out-{n}"
    with ProxySampler(proxy) as sampler:
        seconds, _ = run_timed(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
                                f"docker://{ref}", f"dir:{out}"], what="skopeo copy")
    counters = sampler.delta()
    run = Run(n, "skopeo", seconds, payload, counters["bytes_down"], counters["connections"])
    verify_skopeo_dir(out, files)
    run.verified = True
    remove(out)
    print_run(run)
    runs.append(run)
    return runs


ROW = "{:>5}  {:8} {:>9} {:>8} {:>10} {:>6}  {}"


def print_header() -> None:
    print(ROW.format("round", "client", "seconds", "MB/s", "proxy MB", "conns", "check"))


def print_run(run: Run) -> None:
    print(ROW.format(run.round, run.client, f"{run.seconds:.2f}", f"{run.rate:.1f}",
                     f"{run.proxy_bytes_down / MB:.1f}", run.proxy_connections,
                     "sha256 ok" if run.verified else "UNVERIFIED"), flush=True)


def summarise(runs: list[Run], link_rate: int, payload: int) -> dict[str, Any]:
    p2pull = median([r.seconds for r in runs if r.client == "p2pull"])
    skopeo = median([r.seconds for r in runs if r.client == "skopeo"])
    p2pull_inner = median([r.summary["seconds"] for r in runs if r.client == "p2pull"])
    rate = payload / p2pull / MB
    share = rate * MB / link_rate
    return {
        "p2pull_seconds": p2pull,
        "skopeo_seconds": skopeo,
        "speedup": skopeo / p2pull,
        "p2pull_rate_mb_s": rate,
        "skopeo_rate_mb_s": payload / skopeo / MB,
        "p2pull_rate_excl_start_mb_s": payload / p2pull_inner / MB,
        "link_share": share,
        "goal_speedup": skopeo / p2pull >= GOAL_SPEEDUP,
        "goal_link_share": share >= GOAL_LINK_SHARE,
    }


def print_summary(medians: dict[str, Any], link_rate: int) -> None:
    def passed(ok: bool) -> str:
        return "PASS" if ok else "FAIL"
    print()
    print("medians (wall clock around the process, start-up included; MB = 10^6 bytes):")
    print(f"  p2pull          {medians['p2pull_seconds']:8.2f} s")
    print(f"  skopeo          {medians['skopeo_seconds']:8.2f} s")
    print(f"  speedup         {medians['speedup']:8.2f} x   (skopeo s / p2pull s)")
    print(f"  p2pull rate     {medians['p2pull_rate_mb_s']:8.1f} MB/s")
    print(f"  skopeo rate     {medians['skopeo_rate_mb_s']:8.1f} MB/s")
    print(f"  share of link   {medians['link_share'] * 100:8.1f} %   "
          f"(p2pull rate / link cap {link_rate / MB:.1f} MB/s)")
    print(f"  p2pull rate excluding process start (its JSON 'seconds'): "
          f"{medians['p2pull_rate_excl_start_mb_s']:.1f} MB/s")
    print(f"goal: speedup >= {GOAL_SPEEDUP:g}x: {passed(medians['goal_speedup'])}")
    print(f"goal: >= {GOAL_LINK_SHARE:.0%} of link cap: {passed(medians['goal_link_share'])}")


def size_arg(text: str) -> int:
    """argparse type for sizes such as 512MiB or 1GB."""
    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--json, --workdir and --check, the same in every benchmark."""
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    parser.add_argument("--workdir", type=Path,
                        help="parent of the temporary directory (default: $TMPDIR)")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 3 if a goal fails (default: report only)")


def run_benchmark(benchmark, args: argparse.Namespace, goals_met) -> int:
    """Run ``benchmark(args)`` with the signal handling, error reporting and JSON output
    every benchmark shares; exit status 1 on failure, 130 on interrupt, 3 when ``--check``
    and ``goals_met(report)`` is false."""
    interrupt_on_signals()
    try:
        report = benchmark(args)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped and removed", file=sys.stderr)
        return 130
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 3 if args.check and not goals_met(report) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.far_origin",
        description="p2pull vs skopeo pulling a model from a far (delayed, capped) origin.")
    parser.add_argument("--size", type=size_arg, default="512MiB",
                        help="model size in bytes, e.g. 512MiB (default)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both clients (3)")
    parser.add_argument("--rtt-ms", type=float, default=40.0,
                        help="round-trip time added by the proxy, ms (40)")
    parser.add_argument("--conn-rate", type=parse_rate, default="4MB",
                        help="cap per TCP connection (4MB = 4*10^6 bytes/s)")
    parser.add_argument("--link-rate", type=parse_rate, default="32MB",
                        help="cap for all connections together (32MB); keep <= ~40MB")
    add_output_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        build_parser().error("--rounds must be at least 1")
    return run_benchmark(benchmark, args, lambda r: r["medians"]["goal_speedup"]
                         and r["medians"]["goal_link_share"])


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="p2pull-bench-far-", dir=args.workdir, ignore_cleanup_errors=True)))
        registry = stack.enter_context(start_registry(work / "registry"))
        content_note = check_skopeo_copies_modelpack(registry, work)

        started = time.monotonic()
        files = generate_model(work / "model", args.size)
        push_files(registry, work, REPO_TAG, files)
        payload = sum(f.size for f in files)
        prepared = time.monotonic() - started

        proxy = stack.enter_context(ProxyProcess(
            registry.host, delay_s=args.rtt_ms / 2000, conn_rate=args.conn_rate,
            link_rate=args.link_rate))
        ref = f"{proxy.host}/{REPO_TAG}"

        print(f"far origin: {fmt_mib(payload)} model ({len(files)} files: "
              + ", ".join(f"{f.name} {fmt_mib(f.size)}" for f in files) + ")")
        print(f"origin: CNCF Distribution {registry.host} behind proxy {proxy.host} "
              f"(pid {proxy.pid}): RTT {args.rtt_ms:g} ms, {args.conn_rate / MB:g} MB/s per "
              f"connection, {args.link_rate / MB:g} MB/s link")
        print(content_note)
        print(f"generated and pushed with skopeo in {prepared:.1f} s; {args.rounds} rounds, "
              "p2pull then skopeo, each a fresh process (p2pull with an empty store)")
        print()
        print_header()
        runs: list[Run] = []
        for n in range(1, args.rounds + 1):
            runs += run_round(n, work, proxy, ref, files, payload)
        print()
        for run in runs:
            if run.client == "p2pull":
                print(f"p2pull round {run.round}: MB/s through the proxy, second by second: "
                      + " ".join(f"{x:.0f}" for x in run.timeline))
        medians = summarise(runs, args.link_rate, payload)
        print_summary(medians, args.link_rate)
        return {
            "benchmark": "far_origin",
            "settings": {"size_bytes": args.size, "payload_bytes": payload,
                         "rounds": args.rounds, "rtt_ms": args.rtt_ms,
                         "conn_rate_bytes_s": args.conn_rate,
                         "link_rate_bytes_s": args.link_rate},
            "content": content_note,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in files],
            "runs": [{**asdict(r), "rate_mb_s": r.rate} for r in runs],
            "medians": medians,
            "goals": {"speedup_min": GOAL_SPEEDUP, "link_share_min": GOAL_LINK_SHARE},
        }


if __name__ == "__main__":
    sys.exit(main())

"""Loopback benchmark: p2pull against curl for one large blob, no proxy.

CNCF Distribution runs on 127.0.0.1 holding one blob of ``--size`` bytes (a one-layer
ModelPack artifact pushed by skopeo). Rounds alternate, each a fresh process timed by the
wall clock around it (process start included):

- ``p2pull get REF -o DIR --json`` with a fresh, empty store (P2PULL_DATA_DIR); it fetches
  the manifest, the config and the blob, verifies the blob's sha256 and links it into DIR;
- ``curl -s -f -o FILE http://127.0.0.1:PORT/v2/REPO/blobs/DIGEST``: one stream, no check.

Both write the blob to a file, so both pay the page-cache write. Both outputs are checked
by sha256 afterwards, outside the timing. The goal compares rates from the wall clock; p2pull's
rate excluding its process start (the ``seconds`` of its JSON summary, which starts after
the imports and ends after the output directory is made) is reported as a second figure.

Usage::

    .venv/bin/python -m benchmarks.loopback [--size 512MiB] [--rounds 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.far_origin import (MB, SEED, BenchmarkError, add_output_arguments, fmt_mib,
                                   median, run_benchmark, push_files, remove, run_p2pull_get, run_timed,
                                   sha256_file, size_arg, verify_tree, write_random_file)
from tests.support.registry import start_registry

REPO = "bench/blob"
TAG = "v1"
BLOB_NAME = "blob.bin"
GOAL_RATIO = 0.8


@dataclass
class Run:
    round: int
    client: str
    seconds: float
    payload_bytes: int
    #: p2pull only: its JSON summary's 'seconds' (process start excluded)
    inner_seconds: float | None = None
    verified: bool = False

    @property
    def rate(self) -> float:
        return self.payload_bytes / self.seconds / MB


ROW = "{:>5}  {:8} {:>9} {:>8} {:>16}  {}"


def print_run(run: Run) -> None:
    inner = "" if run.inner_seconds is None else \
        f"{run.payload_bytes / run.inner_seconds / MB:.1f}"
    print(ROW.format(run.round, run.client, f"{run.seconds:.3f}", f"{run.rate:.1f}", inner,
                     "sha256 ok" if run.verified else "UNVERIFIED"), flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loopback",
        description="p2pull vs curl fetching one blob from a loopback registry.")
    parser.add_argument("--size", type=size_arg, default="512MiB",
                        help="blob size, e.g. 512MiB (default)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of both clients (5)")
    add_output_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return run_benchmark(benchmark, args, lambda r: r["medians"]["goal_ratio"])


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="p2pull-bench-loop-", dir=args.workdir, ignore_cleanup_errors=True)))
        registry = stack.enter_context(start_registry(work / "registry"))
        started = time.monotonic()
        (work / "content").mkdir()
        blob = write_random_file(work / "content" / BLOB_NAME, args.size, f"{SEED}:blob")
        push_files(registry, work, f"{REPO}:{TAG}", [blob])
        prepared = time.monotonic() - started
        ref = f"{registry.host}/{REPO}:{TAG}"
        url = f"{registry.url}/v2/{REPO}/blobs/{blob.digest}"

        print(f"loopback: one blob of {fmt_mib(blob.size)} in CNCF Distribution "
              f"{registry.host} (pid {registry.pid}), no proxy")
        print(f"generated and pushed with skopeo in {prepared:.1f} s; {args.rounds} rounds, "
              "p2pull then curl, each a fresh process (p2pull with an empty store)")
        print()
        print(ROW.format("round", "client", "seconds", "MB/s", "MB/s excl start", "check"))
        runs: list[Run] = []
        for n in range(1, args.rounds + 1):
            store, out = work / f"p2pull-store-{n}", work / f"p2pull-out-{n}"
            seconds, summary = run_p2pull_get(ref, store, out, blob.size)
            run = Run(n, "p2pull", seconds, blob.size, inner_seconds=summary["seconds"])
            verify_tree(out, [blob])
            run.verified = True
            remove(out)
            remove(store)
            print_run(run)
            runs.append(run)

            target = work / f"curl-{n}.bin"
            seconds, _ = run_timed(["curl", "-s", "-f", "-o", str(target), url], what="curl")
            run = Run(n, "curl", seconds, blob.size)
            if target.stat().st_size != blob.size or sha256_file(target) != blob.sha256:
                raise BenchmarkError(f"curl wrote wrong bytes to {target}")
            run.verified = True
            remove(target)
            print_run(run)
            runs.append(run)

        medians = summarise(runs, blob.size)
        print_summary(medians)
        return {
            "benchmark": "loopback",
            "settings": {"size_bytes": blob.size, "rounds": args.rounds},
            "blob": {"digest": blob.digest, "size": blob.size},
            "runs": [{**asdict(r), "rate_mb_s": r.rate} for r in runs],
            "medians": medians,
            "goals": {"ratio_min": GOAL_RATIO},
        }


def summarise(runs: list[Run], size: int) -> dict[str, Any]:
    p2pull = median([r.seconds for r in runs if r.client == "p2pull"])
    inner = median([r.inner_seconds for r in runs if r.client == "p2pull"])
    curl = median([r.seconds for r in runs if r.client == "curl"])
    p2pull_rate, curl_rate, inner_rate = size / p2pull / MB, size / curl / MB, size / inner / MB
    return {
        "p2pull_seconds": p2pull,
        "curl_seconds": curl,
        "p2pull_rate_mb_s": p2pull_rate,
        "curl_rate_mb_s": curl_rate,
        "ratio": p2pull_rate / curl_rate,
        "p2pull_seconds_excl_start": inner,
        "p2pull_rate_excl_start_mb_s": inner_rate,
        "ratio_excl_start": inner_rate / curl_rate,
        "goal_ratio": p2pull_rate / curl_rate >= GOAL_RATIO,
    }


def print_summary(medians: dict[str, Any]) -> None:
    print()
    print("medians (MB = 10^6 bytes):")
    print("  wall clock around the process, start-up included (the goal's figure):")
    print(f"    p2pull        {medians['p2pull_seconds']:8.3f} s  "
          f"{medians['p2pull_rate_mb_s']:8.1f} MB/s")
    print(f"    curl          {medians['curl_seconds']:8.3f} s  "
          f"{medians['curl_rate_mb_s']:8.1f} MB/s")
    print(f"    ratio         {medians['ratio']:8.2f} x   (p2pull rate / curl rate)")
    print("  p2pull excluding process start (its JSON 'seconds'), against curl's wall clock:")
    print(f"    p2pull        {medians['p2pull_seconds_excl_start']:8.3f} s  "
          f"{medians['p2pull_rate_excl_start_mb_s']:8.1f} MB/s")
    print(f"    ratio         {medians['ratio_excl_start']:8.2f} x")
    verdict = "PASS" if medians["goal_ratio"] else "FAIL"
    print(f"goal: >= {GOAL_RATIO:g}x curl: {verdict}")


if __name__ == "__main__":
    sys.exit(main())

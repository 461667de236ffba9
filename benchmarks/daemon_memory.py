"""Daemon memory benchmark: peak RSS of a ``p2pull daemon`` pulling a large model, from the
origin and from a peer.

Set-up: an in-process origin (``LayoutOrigin``) holds a generated model of ``--size`` bytes
(``config.json`` and three weight files of ~80 %, ~10 % and ~10 %, one layer each). Two
phases, each daemon a fresh process with an empty store:

1. ``origin``: daemon A (no peers) runs ``p2pull get REF -o DIR --json``: every chunk from
   the origin.
2. ``peer``: daemon B (A as its only static peer, connected before the get) pulls the same
   ref: the chunks come from A, which serves them from its store (B's JSON says how many
   bytes came from peers and from the origin).

While a get runs, the benchmark reads ``VmRSS`` and ``VmHWM`` from ``/proc/PID/status`` of
the daemons every 50 ms (in phase 2 of both: B pulling, A serving; A's high-water mark is
reset first by writing 5 to ``/proc/PID/clear_refs`` where the kernel allows it). It prints
per daemon and phase the RSS when idle before the get, the highest sampled VmRSS, VmHWM at
the end (the kernel's own peak, which no sampling interval misses; it is updated lazily, so
the judged peak is the larger of the two), the highest RssAnon (heap) and thread count
sampled, the get's seconds and
the peer/origin split, then the MiB of RSS at each second of the get. Every output is
checked by sha256 after the get.

Goal (issue 4): the peak RSS of a daemon *pulling* a 4 GiB model is at most 150 MiB
(judged for A in phase 1 and B in phase 2); the serving daemon's peak is printed for
reference.

Usage::

    .venv/bin/python -m benchmarks.daemon_memory [--size 4GiB] [--json OUT]

Everything runs on 127.0.0.1; the daemons are ended by PID and the temporary directory
(about 3x ``--size`` of disk: content, A's store, B's store) removed at the end, on errors,
on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.far_origin import (MIB, SEED, BenchmarkError, GeneratedFile,
                                   add_output_arguments, fmt_mib, generate_model,
                                   run_benchmark, size_arg)
from benchmarks.peer_throughput import (TAG, Daemon, print_load, serve_layout,
                                        verify_output, write_stamped_file)
from p2pull.config import Config
from p2pull.core.chunks import ChunkPlan
from p2pull.core.swarm import SwarmConfig

REPO = "bench/model"
GOAL_PEAK_MIB = 150
SAMPLE_INTERVAL_S = 0.05


STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "Threads")


def read_status(pid: int) -> dict[str, int] | None:
    """VmRSS, VmHWM, RssAnon (KiB) and Threads of ``pid``, or None once it is gone."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in STATUS_FIELDS:
                    values[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return values if len(values) == len(STATUS_FIELDS) else None


def reset_peak(pid: int) -> bool:
    """Reset the kernel's VmHWM of ``pid`` (``clear_refs`` 5); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


@dataclass
class Watch:
    """The RSS samples of one daemon during one get."""

    daemon: str
    role: str  # "pulling from the origin", "pulling from a peer", "serving a peer"
    pid: int
    idle_kib: int = 0
    peak_kib: int = 0
    hwm_kib: int = 0
    #: the highest RssAnon sampled (heap: Python objects, malloc arenas) and thread count
    anon_peak_kib: int = 0
    threads_max: int = 0
    hwm_reset: bool = True
    #: (seconds since the get started, VmRSS KiB)
    samples: list[tuple[float, int]] = field(default_factory=list)

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024

    @property
    def hwm_mib(self) -> float:
        return self.hwm_kib / 1024

    @property
    def max_mib(self) -> float:
        """The judged peak: the larger of VmHWM and the highest sample (the kernel updates
        VmHWM lazily, so a sample may exceed it by a little)."""
        return max(self.peak_kib, self.hwm_kib) / 1024

    def per_second_mib(self) -> list[float]:
        """The highest sampled RSS in each second of the get, MiB."""
        seconds: dict[int, int] = {}
        for t, rss in self.samples:
            seconds[int(t)] = max(seconds.get(int(t), 0), rss)
        return [seconds.get(s, 0) / 1024 for s in range(max(seconds, default=-1) + 1)]


class RssSampler:
    """Samples /proc/PID/status of every watched daemon every SAMPLE_INTERVAL_S."""

    def __init__(self, watches: list[Watch]):
        self.watches = watches
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._started = 0.0

    def _sample(self) -> None:
        now = time.monotonic() - self._started
        for watch in self.watches:
            values = read_status(watch.pid)
            if values is None:
                continue
            rss = values["VmRSS"]
            watch.samples.append((now, rss))
            watch.peak_kib = max(watch.peak_kib, rss)
            watch.hwm_kib = values["VmHWM"]
            watch.anon_peak_kib = max(watch.anon_peak_kib, values["RssAnon"])
            watch.threads_max = max(watch.threads_max, values["Threads"])

    def _poll(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._sample()

    def __enter__(self) -> "RssSampler":
        for watch in self.watches:
            values = read_status(watch.pid)
            if values is None:
                raise BenchmarkError(f"daemon {watch.daemon} (pid {watch.pid}) is gone")
            watch.idle_kib = values["VmRSS"]
            watch.hwm_reset = reset_peak(watch.pid)
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # the last word: VmHWM covers anything between samples


@dataclass
class Phase:
    name: str
    seconds: float
    wall_seconds: float
    summary: dict[str, Any]
    watches: list[Watch]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.daemon_memory",
        description="Peak RSS of a p2pull daemon pulling a large model from the origin and "
                    "from a peer.")
    parser.add_argument("--size", type=size_arg, default="4GiB",
                        help="model size, e.g. 4GiB (default)")
    add_output_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_benchmark(benchmark, args, lambda r: r["goal_pass"])


def pull(name: str, puller: Daemon, role: str, others: list[tuple[Daemon, str]], ref: str,
         output: Path, files: list[GeneratedFile]) -> Phase:
    watches = [Watch(puller.name, role, puller.pid)] + \
        [Watch(d.name, r, d.pid) for d, r in others]
    with RssSampler(watches):
        got = puller.get(ref, output)
    verify_output(output, files)
    return Phase(name, got.summary["seconds"], got.wall_seconds, got.summary, watches)


ROW = "{:7} {:7} {:24} {:>8} {:>8} {:>9} {:>8} {:>7} {:>8} {:>9} {:>10}"


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        load_before = print_load("before the benchmark")
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="p2pull-bench-mem-", dir=args.workdir, ignore_cleanup_errors=True)))
        started = time.monotonic()
        files = generate_model(work / "content", args.size, seed=f"{SEED}:memory",
                               write_weights=write_stamped_file)
        origin = serve_layout(stack, work, files)
        ref = f"{origin.host}/{REPO}:{TAG}"
        total = sum(f.size for f in files)
        generated = time.monotonic() - started
        largest = max(files, key=lambda f: f.size)
        plan = ChunkPlan.for_blob(largest.size, Config().chunk_size)

        print(f"daemon memory: a model of {fmt_mib(total)} in {len(files)} files "
              f"({', '.join(f'{f.name} {fmt_mib(f.size)}' for f in files)}), generated in "
              f"{generated:.1f} s; origin: in-process LayoutOrigin at {origin.host}")
        print(f"p2pull: chunks of {fmt_mib(plan.chunk_size)} for the largest file, pipeline "
              f"depth {SwarmConfig().pipeline_depth} per peer and blob, "
              f"{Config().origin_max_connections} origin connections at most")
        print(f"RSS from /proc/PID/status every {SAMPLE_INTERVAL_S * 1000:.0f} ms; VmHWM is "
              "the kernel's peak; goals judge the larger of the two")
        print()

        a = stack.enter_context(Daemon(work, "a"))
        phases = [pull("origin", a, "pulling from the origin", [], ref, work / "a-out", files)]
        b = stack.enter_context(Daemon(work, "b", peers=[a.address]))
        b.wait_for_peers(1)
        a.wait_for_peers(1)
        phases.append(pull("peer", b, "pulling from a peer", [(a, "serving a peer")], ref,
                           work / "b-out", files))

        print(ROW.format("phase", "daemon", "role", "idle", "peak", "VmHWM", "anon",
                         "threads", "seconds", "peers", "origin"))
        print(ROW.format("", "", "", "MiB", "MiB", "MiB", "MiB", "", "", "MiB", "MiB"))
        for phase in phases:
            for n, watch in enumerate(phase.watches):
                pulling = n == 0
                hwm = f"{watch.hwm_mib:.1f}" + ("" if watch.hwm_reset else "*")
                print(ROW.format(phase.name, watch.daemon, watch.role,
                                 f"{watch.idle_kib / 1024:.1f}", f"{watch.peak_mib:.1f}", hwm,
                                 f"{watch.anon_peak_kib / 1024:.1f}", watch.threads_max,
                                 f"{phase.seconds:.2f}" if pulling else "",
                                 f"{phase.summary['from_peers'] / MIB:.1f}" if pulling else "",
                                 f"{phase.summary['from_origin'] / MIB:.1f}" if pulling else ""))
        if not all(w.hwm_reset for p in phases for w in p.watches):
            print("* VmHWM could not be reset: it includes the daemon's earlier peak")
        print()
        print("RSS of each daemon at each second of the get (MiB, highest sample):")
        for phase in phases:
            for watch in phase.watches:
                series = " ".join(f"{m:.0f}" for m in watch.per_second_mib())
                print(f"  {phase.name:6} {watch.daemon}: {series}")
        print()
        verdicts = {}
        for phase in phases:
            watch = phase.watches[0]
            ok = watch.max_mib <= GOAL_PEAK_MIB
            verdicts[phase.name] = ok
            print(f"goal: peak RSS <= {GOAL_PEAK_MIB} MiB, daemon {watch.daemon} "
                  f"{watch.role}: {watch.max_mib:.1f} MiB: {'PASS' if ok else 'FAIL'}")
        serving = phases[1].watches[1]
        print(f"(for reference: daemon {serving.daemon} {serving.role} peaked at "
              f"{serving.max_mib:.1f} MiB)")
        print("every output matches the generated files (sha256)")
        load_after = print_load("at the end")
        return {
            "benchmark": "daemon_memory",
            "settings": {"size_bytes": total, "sample_interval_s": SAMPLE_INTERVAL_S,
                         "chunk_size_largest": plan.chunk_size,
                         "pipeline_depth": SwarmConfig().pipeline_depth},
            "load_average": {"before": load_before, "after": load_after},
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in files],
            "phases": [{"name": p.name, "seconds": p.seconds, "wall_seconds": p.wall_seconds,
                        "summary": p.summary,
                        "daemons": [{**asdict(w), "idle_mib": w.idle_kib / 1024,
                                     "peak_mib": w.peak_mib, "hwm_mib": w.hwm_mib,
                                     "judged_peak_mib": w.max_mib}
                                    for w in p.watches]} for p in phases],
            "goal_peak_mib": GOAL_PEAK_MIB,
            "goal_by_phase": verdicts,
            "goal_pass": all(verdicts.values()),
        }


if __name__ == "__main__":
    sys.exit(main())

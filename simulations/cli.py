"""``python -m simulations run SCENARIO`` and ``python -m simulations sweep SCENARIO``.

    python -m simulations run lab [--engine chunk|fluid] [--out DIR] [--set key=value ...]
    python -m simulations sweep lab --param chunk_size --values 1MiB,4MiB,16MiB [--out DIR]
        [--jobs N]

SCENARIO is a file or a name in simulations/scenarios/. Without ``--out`` nothing is
written; the summary is printed either way. Exit status: 0 done, 1 some expected node did
not finish within the time limit, 2 bad arguments or scenario."""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import sys
import time
from pathlib import Path

from simulations import chunk_engine, fluid_engine, report
from simulations.scenario import Scenario, load

ENGINES = {"chunk": chunk_engine.run, "fluid": fluid_engine.run}


#: seconds of wall time between two progress lines of a chunk-engine run
PROGRESS_INTERVAL = 10.0


class _ProgressLines:
    """A line on stderr every PROGRESS_INTERVAL of wall time: virtual time, nodes done,
    transfers and their rate."""

    def __init__(self):
        self.started = self.last = time.monotonic()

    def __call__(self, virtual: float, done: int, expected: int, transfers: int) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL:
            return
        self.last = now
        wall = now - self.started
        print(f"  {wall:,.0f} s: virtual {virtual:.3f} s, {done:,}/{expected:,} nodes done, "
              f"{transfers:,} chunk transfers ({transfers / wall * 60:,.0f} per minute)",
              file=sys.stderr, flush=True)


def run_scenario(scenario: Scenario, engine: str, seed: int | None = None,
                 progress: bool = True):
    if engine == "chunk":
        return chunk_engine.run(scenario, seed, _ProgressLines() if progress else None)
    return ENGINES[engine](scenario, seed)


def _sweep_results(args, values: list[str]):
    """Each value's result, in the order of ``values``. With ``--jobs`` above 1 the runs go
    to that many processes (each run is one core's work, and its result is the same as in
    one process: a run's randomness comes from its seed alone); their progress lines are
    left out, as they would interleave."""
    # every value is loaded, so checked, before a run starts, not when its turn comes
    scenarios = [load(args.scenario, args.set + [f"{args.param}={value}"]) for value in values]
    if args.jobs <= 1:
        for scenario in scenarios:
            yield run_scenario(scenario, args.engine, args.seed)
        return
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_scenario, scenario, args.engine, args.seed, False)
                   for scenario in scenarios]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _cmd_run(args) -> int:
    result = run_scenario(load(args.scenario, args.set), args.engine, args.seed)
    print(report.format_summary(result))
    if args.out:
        out = Path(args.out)
        paths = report.write(result, out)
        if not args.no_plots:
            from simulations import plots
            paths += plots.plot_run(result, out)
        print("wrote " + ", ".join(str(p) for p in paths))
    s = report.summary(result)
    return 0 if s["completed"] >= s["expected"] else 1


def _cmd_sweep(args) -> int:
    values = [v.strip() for v in args.values.split(",") if v.strip()]
    rows = []
    status = 0
    for value, result in zip(values, _sweep_results(args, values)):
        s = report.summary(result)
        row = {"value": value, **s, "wall_seconds": result["stats"]["wall_seconds"]}
        rows.append(row)
        status |= s["completed"] < s["expected"]
        print(f"{args.param}={value}: " + report.format_summary(result).split("\n", 1)[1])
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(
            {"scenario": args.scenario, "engine": args.engine, "param": args.param,
             "set": args.set, "rows": rows}, indent=1))
        with open(out / "sweep.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        written = [out / "sweep.json", out / "sweep.csv"]
        if not args.no_plots:
            from simulations import plots
            written.append(plots.plot_sweep(args.param, rows, out, args.scenario))
        print("wrote " + ", ".join(str(p) for p in written))
    return 1 if status else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations",
                                     description="p2pull swarm simulations on virtual time")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("run", "run one scenario"),
                           ("sweep", "run a scenario for each value of one parameter")):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("scenario", help="a TOML file, or a name in simulations/scenarios/")
        sub.add_argument("--engine", choices=sorted(ENGINES), default="chunk")
        sub.add_argument("--out", help="directory for JSON, CSV and PNG files")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a scenario key (dotted: swarm.chunk_size=4MiB)")
        sub.add_argument("--seed", type=int, help="override the scenario's seed")
        sub.add_argument("--no-plots", action="store_true", help="JSON and CSV only")
        if name == "sweep":
            sub.add_argument("--param", required=True,
                             help="the key to vary (dotted, or a short name: chunk_size)")
            sub.add_argument("--values", required=True, help="comma-separated values")
            sub.add_argument("--jobs", type=int, default=1,
                             help="runs at once, each in its own process (default 1)")
    args = parser.parse_args(argv)
    if getattr(args, "jobs", 1) < 1:
        parser.error("--jobs must be at least 1")
    try:
        return _cmd_run(args) if args.command == "run" else _cmd_sweep(args)
    except (ValueError, OSError) as exc:  # tomllib's errors are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2

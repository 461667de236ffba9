"""``p2pull`` command line: argument parsing and progress rendering only; the work is done
by ``p2pull.client``, or by the local daemon through ``p2pull.api_client``. Exit codes are listed in ``p2pull.errors.EXIT_CODES``."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from p2pull import api_client
from p2pull.config import load_config, parse_size
from p2pull.errors import EXIT_CODES, P2pullError, UsageError, first_error
from p2pull.progress import BlobProgress, Progress

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as Bars, TaskID

# Only what every command needs is imported above. trio, httpx, rich and the node are
# imported by the commands that use them: `p2pull get` talking to a daemon, run on every
# node of a cluster at once, starts in the time Python itself takes (about 0.1 s, against
# 0.35-0.6 s with them).

#: redraws per second of the progress bars
REFRESH_HZ = 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pull", description="Pull models and images from OCI registries, verified.",
        epilog="exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()))
    parser.add_argument("--config", type=Path, help="TOML config file (default $P2PULL_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    commands = parser.add_subparsers(dest="command", required=True)

    get = commands.add_parser("get", help="fetch a ref into the store and a directory")
    get.add_argument("ref", help="[registry/]repository[:tag][@sha256:...]")
    get.add_argument("-o", "--output", type=Path, help="directory to show the files in")
    get.add_argument("--platform", help="os/arch[/variant] to pick from an index "
                                        "(default: this host's)")
    get.add_argument("--format", choices=api_client.GET_FORMATS, default="files",
                     help="files (default) or an OCI image layout")
    get.add_argument("--force", action="store_true",
                     help="replace an existing output directory that p2pull did not make")
    get.add_argument("--json", action="store_true", help="print the result as JSON")
    get.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    push = commands.add_parser("push", help="pack a directory as a model artifact and push it")
    push.add_argument("directory", type=Path)
    push.add_argument("ref")
    push.add_argument("--mount-from", action="append", default=[], metavar="REPOSITORY",
                      help="another repository of the same registry to mount blobs from")

    ls = commands.add_parser("ls", help="list the refs held in the store")
    ls.add_argument("--json", action="store_true")

    rm = commands.add_parser("rm", help="forget a ref (its blobs go at the next gc)")
    rm.add_argument("ref")

    commands.add_parser("daemon", help="run the node: share chunks with peers, serve the "
                                       "local API")
    status = commands.add_parser("status", help="what the local daemon is doing")
    status.add_argument("--json", action="store_true")
    status.add_argument("--cluster", action="store_true",
                        help="what every node of the cluster holds and fetches")
    preload = commands.add_parser("preload", help="have every node of the cluster fetch a ref")
    preload.add_argument("ref")
    preload.add_argument("--timeout", type=float, default=3600,
                         help="seconds to wait for the whole cluster (default 3600)")
    preload.add_argument("--no-wait", action="store_true", help="ask, and return at once")
    peers = commands.add_parser("peers", help="the local daemon's peers")
    peers.add_argument("--json", action="store_true")

    gc = commands.add_parser("gc", help="delete blobs no ref needs; cap the store's size")
    gc.add_argument("--max-size", help="evict least recently used refs above this, e.g. 50GiB")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        try:
            config = load_config(args.config)
            return _COMMANDS[args.command](args, config)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
    except P2pullError as exc:
        _console().print(f"[red]error:[/red] {exc}", highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        _console().print("interrupted; run the same command again to resume")
        return 130


@functools.cache
def _console() -> Console:
    from rich.console import Console
    return Console(stderr=True, soft_wrap=True)  # a message is one line, for grep


def _get(args, config) -> int:
    bars_wanted = not (args.quiet or args.json) and _console().is_terminal
    if api_client.running(config.socket):
        summary = _get_from_daemon(args, config, bars_wanted)
    else:
        summary = _get_embedded(args, config, bars_wanted)
    if args.json:
        print(json.dumps(summary))
    else:
        rate = (summary["from_origin"] + summary["from_peers"]) / max(summary["seconds"], 1e-9)
        where = f" -> {summary['output']}" if summary["output"] else ""
        _console().print(f"{summary['ref']}{where}: {_mib(summary['bytes'])} in "
                         f"{summary['seconds']:.1f}s ({_mib(rate)}/s); origin "
                         f"{_mib(summary['from_origin'])}, peers {_mib(summary['from_peers'])}"
                         f", already held {_mib(summary['reused'])}", highlight=False)
    return 0


def _get_from_daemon(args, config, bars_wanted: bool) -> dict:
    """The local daemon does the get; this process only shows its progress."""
    request = dict(output=args.output, platform=args.platform, force=args.force,
                   format=args.format)
    if not bars_wanted:
        return api_client.get(config.socket, args.ref, **request)
    progress = Progress()
    with _bars() as bars:
        tasks: dict[str, TaskID] = {}

        def show(blobs: dict) -> None:
            for digest, blob in blobs.items():
                progress.blobs[digest] = BlobProgress(**blob)
            _draw(bars, progress, tasks)

        try:
            return api_client.get(config.socket, args.ref, on_progress=show, **request)
        finally:
            _draw(bars, progress, tasks)


def _get_embedded(args, config, bars_wanted: bool) -> dict:
    """No daemon runs: an embedded node does the get in this process."""
    import trio

    from p2pull import client
    progress = Progress()
    result = trio.run(_get_with_bars, args, config, progress, bars_wanted)
    return client.result_summary(result)


def _bars() -> Bars:
    from rich.progress import (BarColumn, DownloadColumn, Progress as Bars, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    return Bars(*columns, console=_console(), transient=False)


async def _get_with_bars(args, config, progress: Progress, bars_wanted: bool):
    import trio

    from p2pull import client
    kwargs = dict(output=args.output, platform=args.platform, force=args.force,
                  format=args.format, config=config, progress=progress, use_daemon=False)
    if not bars_wanted:
        return await client.get(args.ref, **kwargs)
    with _bars() as bars:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_render, bars, progress)
            try:
                return await client.get(args.ref, **kwargs)
            finally:
                nursery.cancel_scope.cancel()
                _draw(bars, progress, {})


async def _render(bars: Bars, progress: Progress) -> None:
    import trio
    tasks: dict[str, TaskID] = {}
    while True:
        _draw(bars, progress, tasks)
        await trio.sleep(1 / REFRESH_HZ)


def _draw(bars: Bars, progress: Progress, tasks: dict[str, TaskID]) -> None:
    if "total" not in tasks and progress.blobs:
        tasks["total"] = bars.add_task("total", total=progress.total)
    for digest, blob in progress.blobs.items():
        if digest not in tasks:
            tasks[digest] = bars.add_task(blob.title, total=blob.size)
        bars.update(tasks[digest], completed=blob.held,
                    description=f"{blob.title[:28]:28} {blob.state:9}")
    if "total" in tasks:
        bars.update(tasks["total"], completed=progress.held, total=progress.total,
                    description=f"{'total':28} origin {_mib(progress.from_origin)} "
                                f"peers {_mib(progress.from_peers)}")


def _push(args, config) -> int:
    import trio

    from p2pull.origin.push import PushProgress, push_directory
    progress = PushProgress()
    started = time.monotonic()
    digest = trio.run(lambda: push_directory(args.directory, args.ref, config,
                                             progress=progress, mount_from=args.mount_from))
    seconds = time.monotonic() - started
    _console().print(f"{args.ref}: {_mib(progress.total)} in {seconds:.1f}s; uploaded "
                  f"{_mib(progress.uploaded)}, already there {_mib(progress.skipped)}",
                  highlight=False)
    print(digest)
    return 0


def _daemon(args, config) -> int:
    from p2pull import daemon
    return daemon.main(config)


def _status(args, config) -> int:
    if args.cluster:
        reports = api_client.request(config.socket, "/cluster")
        if args.json:
            print(json.dumps(reports))
        else:
            _print_cluster(reports)
        return 0
    status = api_client.request(config.socket, "/status")
    if args.json:
        print(json.dumps(status))
        return 0
    print(f"node {status['node_id']}  cluster {status['cluster']}  port "
          f"{status['listen_port']}  peers {status['peers']}")
    print(f"from origin {_mib(status['origin_bytes'])}  from peers "
          f"{_mib(status['bytes_from_peers'])}  to peers {_mib(status['bytes_to_peers'])}  "
          f"rejected chunks {status['chunks_rejected']}  bans {status['bans']}")
    for session in status["sessions"]:
        print(f"  {session['blob'][:19]}  {session['state']:9} "
              f"{_mib(session['held']):>12} / {_mib(session['size'])}")
    return 0


def _print_cluster(reports: list[dict], ref: str | None = None) -> None:
    for report in reports:
        fetching = sum(s["held"] for s in report["sessions"])
        total = sum(s["size"] for s in report["sessions"])
        state = f"fetching {_mib(fetching)} / {_mib(total)}" if report["sessions"] else "idle"
        if ref is not None:
            state = "holds it" if _holds(report, ref) else state
        print(f"{report['node_id']}  {state:32} refs: {len(report['refs'])}")
        if ref is None:
            for held in report["refs"]:
                print(f"    {held}")


def _holds(report: dict, ref: str) -> bool:
    return any(held == ref or held.endswith("/" + ref) for held in report["refs"])


def _preload(args, config) -> int:
    from p2pull.core.refs import parse_ref
    ref = str(parse_ref(args.ref, config.default_registry))
    asked = api_client.request(config.socket, "/preload", {"ref": ref})
    _console().print(f"asked {asked['peers_asked']} peers and this node to fetch {ref}")
    if args.no_wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while True:
        reports = api_client.request(config.socket, "/cluster")
        done = sum(_holds(report, ref) for report in reports)
        _console().print(f"{done}/{len(reports)} nodes hold {ref}", highlight=False)
        if done == len(reports):
            _print_cluster(reports, ref)
            return 0
        if time.monotonic() > deadline:
            _print_cluster(reports, ref)
            raise P2pullError(f"only {done} of {len(reports)} nodes hold {ref} after "
                              f"{args.timeout:.0f} s; see `p2pull status --cluster`")
        time.sleep(1.0)


def _peers(args, config) -> int:
    peers = api_client.request(config.socket, "/peers")
    if args.json:
        print(json.dumps(peers))
        return 0
    print(f"{'node':34}{'address':24}{'dir':5}{'rack':12}{'in':>12}{'out':>12}")
    for peer in peers:
        print(f"{peer['node_id']:34}{peer['address']:24}{peer['direction']:5}"
              f"{peer.get('rack') or '-':12}{_mib(peer['bytes_in']):>12}"
              f"{_mib(peer['bytes_out']):>12}")
    return 0


def _ls(args, config) -> int:
    from p2pull import client
    records = client.ls(config)
    if args.json:
        print(json.dumps([record.__dict__ for record in records]))
        return 0
    for record in records:
        print(f"{record.ref:60} {record.manifest[:19]}  {_mib(record.size):>10}")
    return 0


def _rm(args, config) -> int:
    from p2pull import client
    if not client.rm(args.ref, config):
        raise UsageError(f"{args.ref} is not held; `p2pull ls` lists what is")
    return 0


def _gc(args, config) -> int:
    from p2pull import client
    deleted, freed = client.gc(parse_size(args.max_size) if args.max_size else None, config)
    _console().print(f"deleted {deleted} blobs, freed {_mib(freed)}")
    return 0


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


_COMMANDS = {"get": _get, "push": _push, "ls": _ls, "rm": _rm, "gc": _gc,
             "daemon": _daemon, "status": _status, "peers": _peers, "preload": _preload}

if __name__ == "__main__":
    sys.exit(main())

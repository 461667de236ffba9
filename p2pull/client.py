"""The Python API: ``get``, ``ls``, ``rm``, ``gc``, and the daemon's status. The CLI is a
thin layer on these. ``get`` asks the local daemon when one runs, and otherwise runs an
embedded node for the duration of the call: one way to fetch either way."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from p2pull import api_client
from p2pull.config import Config, load_config
from p2pull.core.refs import Ref, parse_ref
from p2pull.errors import OriginUnavailable, UsageError, first_error
from p2pull.origin.manifest import (INDEX_MEDIA_TYPES, Manifest, Platform, load_document,
                                    parse_manifest)
from p2pull.store.cas import RefRecord, Store
from p2pull.progress import BlobProgress, Progress
from p2pull.store.materialise import build_tree, publish_link, write_oci_layout

if TYPE_CHECKING:
    from p2pull.net.node import Node
    from p2pull.origin.client import OriginCounters

log = logging.getLogger("p2pull")

FORMATS = api_client.GET_FORMATS


@dataclass(frozen=True)
class GetResult:
    ref: Ref
    manifest_digest: str
    #: the output directory, or None when only the store was filled
    output: Path | None
    total_bytes: int
    from_origin: int
    from_peers: int
    #: bytes the store held already (earlier pulls, or resumed partial downloads)
    reused: int
    seconds: float
    offline: bool = False


def _config(config: Config | None) -> Config:
    return config if config is not None else load_config()


async def get(ref: str | Ref, *, output: Path | str | None = None,
              platform: str | None = None, force: bool = False, format: str = "files",
              config: Config | None = None, progress: Progress | None = None,
              origin_counters: OriginCounters | None = None,
              use_daemon: bool = True) -> GetResult:
    """Fetch ``ref`` into the store, verified, and materialise it into ``output``.

    The local daemon does it when one answers on ``config.socket`` (and ``use_daemon``);
    otherwise an embedded node runs for this call, with the static peers of the config.
    ``format="files"`` makes ``output`` a link to the artifact's files (an atomic swap when
    it pointed at another version); ``"oci-layout"`` writes an OCI image layout there.
    With the registry unreachable, a ref recorded earlier is served from the store."""
    config = _config(config)
    progress = progress if progress is not None else Progress()
    if use_daemon and origin_counters is None and await daemon_running(config):
        return await _get_via_daemon(config, str(ref), output, platform, force, format,
                                     progress)
    # the embedded node's modules (the swarm, zeroconf, the origin client) are imported
    # only here: a CLI that talks to the daemon starts ~0.2 s sooner without them, which
    # matters when every node of a cluster runs `p2pull get` at once
    from p2pull.net.node import Node
    from p2pull.origin.client import OriginClient

    store = Store(config.data_dir)
    async with OriginClient(config) as origin:
        node = Node(config, store, origin)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(node.run, listen=False))
                result = await get_with_node(node, ref, output=output, platform=platform,
                                             force=force, format=format, progress=progress)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        if origin_counters is not None:
            origin_counters.bytes_received += origin.counters.bytes_received
            origin_counters.requests += origin.counters.requests
            origin_counters.retries += origin.counters.retries
    return result


async def get_with_node(node: Node, ref: str | Ref, *, output: Path | str | None = None,
                        platform: str | None = None, force: bool = False,
                        format: str = "files", progress: Progress | None = None) -> GetResult:
    """``get`` on a running node: the daemon's, or an embedded one."""
    config = node.config
    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    ref = parse_ref(ref, config.default_registry) if isinstance(ref, str) else ref
    wanted = Platform.parse(platform) if platform else None
    progress = progress if progress is not None else Progress()
    store = node.store
    started = time.monotonic()
    offline = False
    with store.in_use():
        try:
            manifest = await node.origin.resolve(ref, wanted)
        except OriginUnavailable:
            manifest = _recorded_manifest(store, ref)
            if manifest is None:
                raise
            log.warning("%s unreachable; using the manifest recorded for %s", ref.registry, ref)
            offline = True
        await node.fetch(ref, list(manifest.blobs), progress)
        store.save_manifest(manifest.digest, manifest.raw)
        store.record_ref(ref, manifest.digest, manifest.media_type, manifest.total_size)
    out = Path(output).absolute() if output is not None else None
    if out is not None:
        await trio.to_thread.run_sync(_materialise, store, manifest, ref, out, format, force)
    return GetResult(ref, manifest.digest, out, progress.total, progress.from_origin,
                     progress.from_peers, progress.reused, time.monotonic() - started, offline)


def result_summary(result: GetResult) -> dict:
    """A GetResult as JSON-ready values (the CLI's --json, the daemon's answer)."""
    return {"ref": str(result.ref), "manifest": result.manifest_digest,
            "output": str(result.output) if result.output else None,
            "bytes": result.total_bytes, "from_origin": result.from_origin,
            "from_peers": result.from_peers, "reused": result.reused,
            "seconds": round(result.seconds, 3), "offline": result.offline}


# -- the daemon's local API ---------------------------------------------------------------

async def daemon_running(config: Config) -> bool:
    return await trio.to_thread.run_sync(api_client.running, config.socket)


async def daemon_request(config: Config, path: str, body: dict | None = None):
    """GET ``path`` of the daemon's API (POST ``body`` if given); UsageError when no daemon
    answers, the daemon's error as its own class."""
    return await trio.to_thread.run_sync(api_client.request, config.socket, path, body)


async def _get_via_daemon(config: Config, ref: str, output, platform, force, format,
                          progress: Progress) -> GetResult:
    def show(blobs: dict) -> None:
        for digest, blob in blobs.items():
            progress.blobs[digest] = BlobProgress(**blob)

    summary = await trio.to_thread.run_sync(
        partial(api_client.get, config.socket, ref, output=output, platform=platform,
                force=force, format=format, on_progress=show), abandon_on_cancel=True)
    return result_from_summary(summary)


def result_from_summary(summary: dict) -> GetResult:
    """The GetResult of ``result_summary``'s dict (the daemon's answer)."""
    return GetResult(parse_ref(summary["ref"]), summary["manifest"],
                     Path(summary["output"]) if summary["output"] else None,
                     summary["bytes"], summary["from_origin"], summary["from_peers"],
                     summary["reused"], summary["seconds"], summary["offline"])


def _materialise(store: Store, manifest: Manifest, ref: Ref, out: Path, format: str,
                 force: bool) -> None:
    if format == "oci-layout":
        write_oci_layout(store.blob_path, manifest.raw, manifest.digest, manifest.media_type,
                         out, ref.tag)
        return
    tree = store.tree_dir(manifest.digest)
    build_tree(store.blob_path, dict(manifest.data), tree)
    publish_link(tree, out, force=force)


def _recorded_manifest(store: Store, ref: Ref) -> Manifest | None:
    for record in store.refs():
        if record.parsed == Ref(ref.registry, ref.repository, ref.tag,
                                None if ref.tag else ref.digest):
            raw = store.load_manifest(record.manifest)
            media_type, data = load_document(raw, record.media_type, str(ref))
            if media_type in INDEX_MEDIA_TYPES:
                return None
            return parse_manifest(raw, record.manifest, media_type, data, str(ref))
    return None


def ls(config: Config | None = None) -> list[RefRecord]:
    """Refs held in the store, with the manifest each resolved to."""
    return Store(_config(config).data_dir).refs()


def rm(ref: str, config: Config | None = None) -> bool:
    """Forget a ref; its blobs go at the next ``gc`` unless another ref needs them."""
    config = _config(config)
    return Store(config.data_dir).remove_ref(parse_ref(ref, config.default_registry))


def gc(max_size: int | None = None, config: Config | None = None) -> tuple[int, int]:
    """(blobs deleted, bytes freed); see ``Store.gc``."""
    return Store(_config(config).data_dir).gc(max_size)


def get_sync(ref: str, **kwargs) -> GetResult:
    """``get`` for callers without an event loop."""
    return trio.run(lambda: get(ref, **kwargs))

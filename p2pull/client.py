"""The Python API: ``get``, ``ls``, ``rm``, ``gc`` and ``push``. The CLI is a thin layer on
these. ``get`` runs an embedded node for the duration of the call (the daemon, when one
runs, is used instead once the swarm lands)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from p2pull.config import Config, load_config
from p2pull.core.refs import Ref, parse_ref
from p2pull.errors import OriginUnavailable, UsageError
from p2pull.net.fetch import Progress, fetch_blobs
from p2pull.origin.client import OriginClient, OriginCounters
from p2pull.origin.manifest import (INDEX_MEDIA_TYPES, Manifest, Platform, load_document,
                                    parse_manifest)
from p2pull.store.cas import RefRecord, Store
from p2pull.store.materialise import build_tree, publish_link, write_oci_layout

log = logging.getLogger("p2pull")

FORMATS = ("files", "oci-layout")


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
              origin_counters: OriginCounters | None = None) -> GetResult:
    """Fetch ``ref`` into the store, verified, and materialise it into ``output``.

    ``format="files"`` makes ``output`` a link to the artifact's files (an atomic swap when
    it pointed at another version); ``"oci-layout"`` writes an OCI image layout there.
    With the registry unreachable, a ref recorded earlier is served from the store."""
    config = _config(config)
    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    ref = parse_ref(ref, config.default_registry) if isinstance(ref, str) else ref
    wanted = Platform.parse(platform) if platform else None
    store = Store(config.data_dir)
    progress = progress if progress is not None else Progress()
    with store.in_use():
        return await _get(store, ref, wanted, output, format, force, config, progress,
                          origin_counters)


async def _get(store: Store, ref: Ref, wanted: Platform | None, output, format: str,
               force: bool, config: Config, progress: Progress,
               origin_counters: OriginCounters | None) -> GetResult:
    started = time.monotonic()
    offline = False
    async with OriginClient(config) as origin:
        try:
            manifest = await origin.resolve(ref, wanted)
        except OriginUnavailable:
            manifest = _recorded_manifest(store, ref)
            if manifest is None:
                raise
            log.warning("%s unreachable; using the manifest recorded for %s", ref.registry, ref)
            offline = True
        await fetch_blobs(store, origin, ref, list(manifest.blobs), progress,
                          config.chunk_size)
        if origin_counters is not None:
            origin_counters.bytes_received += origin.counters.bytes_received
            origin_counters.requests += origin.counters.requests
            origin_counters.retries += origin.counters.retries
    store.save_manifest(manifest.digest, manifest.raw)
    store.record_ref(ref, manifest.digest, manifest.media_type, manifest.total_size)
    out = Path(output).absolute() if output is not None else None
    if out is not None:
        await trio.to_thread.run_sync(_materialise, store, manifest, ref, out, format, force)
    return GetResult(ref, manifest.digest, out, progress.total, progress.from_origin,
                     progress.from_peers, progress.reused, time.monotonic() - started, offline)


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

"""Push a directory as a CNCF ModelPack model artifact with the OCI distribution upload API.

The artifact is an OCI image manifest with ``artifactType``
``application/vnd.cncf.model.manifest.v1+json``, a ModelPack model config, and one raw layer
per file, sorted by relative path. Each layer names its file twice: ModelPack's
``org.cncf.model.filepath`` and ORAS's ``org.opencontainers.image.title`` (a relative POSIX
path such as ``tokenizer/vocab.txt``; ``oras pull`` 0.2.43 recreates the subdirectories).

The artifact is reproducible: its creation time is the newest modification time of its
files, so pushing the same unchanged directory again yields the same manifest digest and
uploads nothing.

Requests all go through ``OriginClient.send`` (auth, retries, redirects). Per blob: HEAD in
the target repository (present: done); else a cross-repository mount from the first
repository of ``mount_from`` that holds it; else an upload, monolithic below ``CHUNK_SIZE``
and in ``CHUNK_SIZE`` PATCHes above. Files are read one piece at a time in worker threads,
never whole, and the registry checks every blob against its digest when it is committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlencode, urljoin, urlsplit

import httpx
import trio

from p2pull.config import Config
from p2pull.core.refs import Ref, parse_ref
from p2pull.errors import NotFoundError, OriginError, UsageError
from p2pull.origin.client import OriginClient
from p2pull.origin.manifest import (MAX_MANIFEST_BYTES, MODEL_ARTIFACT_TYPE, MODEL_CONFIG_TYPE,
                                    OCI_MANIFEST, Descriptor, sha256_digest)

log = logging.getLogger("p2pull.push")

# Layer media types of the ModelPack model-spec (docs/spec.md of modelpack/model-spec).
WEIGHT_MEDIA_TYPE = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG_MEDIA_TYPE = "application/vnd.cncf.model.weight.config.v1.raw"
DOC_MEDIA_TYPE = "application/vnd.cncf.model.doc.v1.raw"
CODE_MEDIA_TYPE = "application/vnd.cncf.model.code.v1.raw"

ANNOTATION_FILEPATH = "org.cncf.model.filepath"
ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_CREATED = "org.opencontainers.image.created"

#: weight formats, after modctl's list (pkg/modelfile/constants.go); checked first, so a
#: weight file is never mistaken for a document or config by its name
WEIGHT_SUFFIXES = frozenset({
    ".safetensors", ".bin", ".pt", ".pth", ".pt2", ".gguf", ".ggml", ".onnx", ".h5", ".hdf5",
    ".ckpt", ".msgpack", ".npy", ".npz", ".tflite", ".pb", ".pkl", ".keras", ".engine"})
#: documentation: file names starting with these (case-insensitive), and these suffixes
DOC_PREFIXES = ("readme", "license", "licence", "notice", "copying")
DOC_SUFFIXES = frozenset({".md", ".rst"})
CODE_SUFFIXES = frozenset({".py", ".ipynb", ".sh"})
#: configuration: tokenizer files of any format, and these suffixes (vocab.txt, merges.txt)
CONFIG_PREFIXES = ("tokenizer",)
CONFIG_SUFFIXES = frozenset({".json", ".jsonl", ".yaml", ".yml", ".toml", ".txt", ".jinja"})

#: directories left out of the artifact wherever they are: version-control metadata
SKIPPED_DIRECTORIES = frozenset({".git"})

#: blobs smaller than this go up in one PUT; larger ones in PATCH chunks of this size, each
#: read into memory on its own. 16 MiB bounds memory and the cost of a retried chunk, and is
#: far above the 5 MiB minimum chunk that S3-backed registries require
CHUNK_SIZE = 16 * 1024 * 1024
#: read size while hashing: per-read overhead is negligible next to sha256 (~1.45 GB/s on
#: the lab machines, LAB-NOTES.md), and hashlib releases the GIL for buffers this large
HASH_READ = 1024 * 1024

OCTET_STREAM = "application/octet-stream"


@dataclass
class PushProgress:
    """Counters of one push, updated by ``push_directory`` and read by whoever renders them.
    Byte counts cover the files' layers; the config and manifest are too small to show."""

    #: bytes of all files
    total: int = 0
    #: bytes hashed so far
    hashed: int = 0
    #: bytes sent to the registry so far
    uploaded: int = 0
    #: bytes the registry held already, or mounted from another repository
    skipped: int = 0


@dataclass(frozen=True)
class SourceFile:
    """A regular file to push: ``name`` is its relative POSIX path, ``path`` where its bytes
    are read (the target of a symlink inside the directory)."""

    name: str
    path: Path
    mtime: float


def layer_media_type(name: str) -> str:
    """The ModelPack media type of the file at relative path ``name``: weights by suffix,
    then documents (README*, LICENSE*, *.md ...), code (*.py ...), configs (*.json, *.yaml,
    *.txt, tokenizer* ...); anything else is a weight."""
    base = name.rsplit("/", 1)[-1].lower()
    suffix = os.path.splitext(base)[1]
    if suffix in WEIGHT_SUFFIXES:
        return WEIGHT_MEDIA_TYPE
    if base.startswith(DOC_PREFIXES) or suffix in DOC_SUFFIXES:
        return DOC_MEDIA_TYPE
    if suffix in CODE_SUFFIXES:
        return CODE_MEDIA_TYPE
    if base.startswith(CONFIG_PREFIXES) or suffix in CONFIG_SUFFIXES:
        return WEIGHT_CONFIG_MEDIA_TYPE
    return WEIGHT_MEDIA_TYPE


def list_files(directory: Path) -> list[SourceFile]:
    """Every file under ``directory``, sorted by relative path. Blocking: run it in a thread.

    Left out: directories named ``.git`` (at any depth) and empty directories (a layer is a
    file). A symlink to a file inside ``directory`` is pushed as a copy of its target.
    Refused with UsageError: ``directory`` missing or not a directory, no files at all,
    symlinks that are broken, lead outside ``directory`` or name a directory, special files
    (FIFOs, sockets, devices), names that are not UTF-8, and unreadable directories."""
    if not directory.exists():
        raise UsageError(f"{directory} does not exist")
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory; push takes a directory of model "
                         "files")
    root = directory.resolve()

    def refuse_unreadable(exc: OSError) -> None:
        raise UsageError(f"cannot read {exc.filename}: {exc.strerror}") from exc

    files = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=refuse_unreadable):
        for name in list(dirnames):
            if name in SKIPPED_DIRECTORIES:
                dirnames.remove(name)
            elif os.path.islink(os.path.join(dirpath, name)):
                raise UsageError(f"{os.path.join(dirpath, name)} is a symlink to a directory; "
                                 "replace it with a copy of the files")
        for name in filenames:
            files.append(_source_file(root, Path(dirpath) / name))
    if not files:
        raise UsageError(f"{directory} holds no files to push")
    return sorted(files, key=lambda file: file.name)


def _source_file(root: Path, path: Path) -> SourceFile:
    name = path.relative_to(root).as_posix()
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{path!s} has a name that is not UTF-8; rename it") from None
    target = path
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise UsageError(f"{name} is a broken symlink ({exc})") from exc
        if not target.is_relative_to(root):
            raise UsageError(f"{name} is a symlink to {target}, outside {root}; copy the "
                             "file in to push it")
    try:
        info = target.stat()
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{name} is not a regular file (a FIFO, socket or device)")
    return SourceFile(name, target, info.st_mtime)


def hash_file(path: Path) -> tuple[str, int]:
    """(sha256 digest, size) of the file at ``path``, read in ``HASH_READ`` pieces.
    Blocking: run it in a thread."""
    sha = hashlib.sha256()
    size = 0
    buffer = bytearray(HASH_READ)
    view = memoryview(buffer)
    try:
        with open(path, "rb") as file:
            while count := file.readinto(buffer):
                sha.update(view[:count])
                size += count
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    return "sha256:" + sha.hexdigest(), size


def model_config(name: str, created: str, layers: Iterable[Descriptor]) -> bytes:
    """The ModelPack model config blob (``application/vnd.cncf.model.config.v1+json``).
    Raw layers are not compressed, so their diff IDs are their digests."""
    document = {"descriptor": {"createdAt": created, "name": name},
                "config": {},
                "modelfs": {"type": "layers", "diffIds": [layer.digest for layer in layers]}}
    return _json(document)


def image_manifest(config: Descriptor, layers: Iterable[Descriptor], created: str) -> bytes:
    """The OCI image manifest of a model artifact, as the bytes that are pushed."""
    document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "artifactType": MODEL_ARTIFACT_TYPE, "config": config.to_dict(),
                "layers": [layer.to_dict() for layer in layers],
                "annotations": {ANNOTATION_CREATED: created}}
    return _json(document)


@dataclass(frozen=True)
class PackedArtifact:
    """A directory packed as a model artifact: what is pushed, or written as a layout."""

    files: list[SourceFile]
    layers: list[Descriptor]
    config_blob: bytes
    config: Descriptor
    manifest: bytes
    digest: str

    def blob_paths(self) -> dict[str, Path]:
        """Layer digest -> a file holding its bytes."""
        return {layer.digest: file.path for file, layer in zip(self.files, self.layers)}


def pack_directory(directory: Path, name: str,
                   on_hashed: Callable[[int], None] | None = None) -> PackedArtifact:
    """Pack the files under ``directory`` (see ``list_files``) as a ModelPack artifact
    named ``name``; ``on_hashed(size)`` after each file. Blocking: run it in a thread.
    Raises UsageError for a bad directory or one with too many files."""
    files = list_files(directory)
    layers = []
    for file in files:
        digest, size = hash_file(file.path)
        if on_hashed:
            on_hashed(size)
        layers.append(Descriptor(layer_media_type(file.name), digest, size,
                                 {ANNOTATION_TITLE: file.name, ANNOTATION_FILEPATH: file.name}))
    created = _rfc3339(max(file.mtime for file in files))
    config_blob = model_config(name, created, layers)
    config = Descriptor(MODEL_CONFIG_TYPE, sha256_digest(config_blob), len(config_blob))
    manifest = image_manifest(config, layers, created)
    if len(manifest) > MAX_MANIFEST_BYTES:
        raise UsageError(f"{directory} has too many files: the manifest would take "
                         f"{len(manifest)} bytes, above the {MAX_MANIFEST_BYTES} registries "
                         "accept")
    return PackedArtifact(files, layers, config_blob, config, manifest,
                          sha256_digest(manifest))


async def push_directory(directory: Path, ref: str | Ref, config: Config, *,
                         progress: PushProgress | None = None,
                         mount_from: Iterable[str] = (),
                         origin: OriginClient | None = None) -> str:
    """Push the files under ``directory`` (see ``list_files`` for what is left out or
    refused) as a model artifact to ``ref`` and return the manifest digest.

    ``ref`` names the target; its tag (default ``latest``) is set, or with only a digest the
    manifest is pushed by digest, which must then equal the artifact's. The model config
    names the model after the last component of the repository. ``mount_from`` lists other
    repositories of the same registry to mount blobs from instead of uploading them (pull
    access to them is needed). ``origin`` is a client to reuse; by default one is opened and
    closed here.

    Raises UsageError (bad directory, or a pinned digest that differs), AuthError,
    OriginError when the registry refuses a blob or the manifest, OriginUnavailable."""
    ref = parse_ref(ref, config.default_registry) if isinstance(ref, str) else ref
    progress = progress if progress is not None else PushProgress()

    def hashed(size: int) -> None:
        progress.total += size
        progress.hashed += size

    packed = await trio.to_thread.run_sync(pack_directory, Path(directory),
                                           ref.repository.rsplit("/", 1)[-1], hashed)
    if ref.digest and ref.digest != packed.digest:
        raise UsageError(f"{ref} pins {ref.digest}, but {directory} packs to {packed.digest}")
    async with contextlib.AsyncExitStack() as stack:
        if origin is None:
            origin = await stack.enter_async_context(OriginClient(config))
        uploader = _Uploader(origin, ref, mount_from, progress)
        await uploader.push(packed)
    return packed.digest


class _Uploader:
    """Uploads the blobs and the manifest of one push to ``ref``'s registry."""

    def __init__(self, origin: OriginClient, ref: Ref, mount_from: Iterable[str],
                 progress: PushProgress):
        self.origin = origin
        self.ref = ref
        self.host = ref.endpoint
        self.mount_from = tuple(repo for repo in mount_from if repo != ref.repository)
        self.progress = progress
        self.scope = f"repository:{ref.repository}:pull,push"

    async def push(self, packed: PackedArtifact) -> None:
        done: set[str] = set()  # two files with the same bytes are one blob
        for file, layer in zip(packed.files, packed.layers):
            session = None if layer.digest in done else await self._session_for(layer.digest)
            done.add(layer.digest)
            if session is None:
                self.progress.skipped += layer.size
                continue
            started = trio.current_time()
            await self._upload_file(session, file, layer)
            seconds = trio.current_time() - started
            log.info("%s: %d bytes uploaded in %.2f s (%.0f MB/s)", file.name, layer.size,
                     seconds, layer.size / max(seconds, 1e-9) / 1e6)
        session = await self._session_for(packed.config.digest)
        if session is not None:
            await self._commit(session, packed.config.digest, packed.config_blob)
        await self._put_manifest(packed.manifest, packed.digest)

    # -- one blob --------------------------------------------------------------------------

    async def _session_for(self, digest: str) -> str | None:
        """None when the target repository holds ``digest`` already or it was mounted from
        one of ``mount_from`` (the first that holds it); else the path and query of an
        upload session to send it to."""
        if await self._has_blob(self.ref.repository, digest, self.scope):
            return None
        uploads = f"/v2/{self.ref.repository}/blobs/uploads/"
        for source in self.mount_from:
            if not await self._has_blob(source, digest, f"repository:{source}:pull"):
                continue
            response = await self.origin.send(
                self.host, "POST", uploads, params={"mount": digest, "from": source},
                scope=f"{self.scope} repository:{source}:pull", ok=(201, 202))
            if response.status_code == 201:
                return None
            # the registry declined the mount and opened an upload session instead
            return self._location(response)
        response = await self.origin.send(self.host, "POST", uploads, scope=self.scope,
                                          ok=(202,))
        return self._location(response)

    async def _has_blob(self, repository: str, digest: str, scope: str) -> bool:
        try:
            await self.origin.send(self.host, "HEAD", f"/v2/{repository}/blobs/{digest}",
                                   scope=scope)
        except NotFoundError:
            return False
        return True

    async def _upload_file(self, session: str, file: SourceFile, layer: Descriptor) -> None:
        """Send ``file`` to the upload ``session``: monolithic below CHUNK_SIZE, else
        chunked; one piece of the file in memory at a time."""
        try:
            async with await trio.open_file(file.path, "rb") as source:
                if layer.size < CHUNK_SIZE:
                    data = await _read(source, file, layer.size)
                    await self._commit(session, layer.digest, data)
                    self.progress.uploaded += len(data)
                    return
                for offset in range(0, layer.size, CHUNK_SIZE):
                    data = await _read(source, file, min(CHUNK_SIZE, layer.size - offset))
                    response = await self.origin.send(
                        self.host, "PATCH", session, scope=self.scope, content=data,
                        headers={"Content-Range": f"{offset}-{offset + len(data) - 1}",
                                 "Content-Type": OCTET_STREAM}, ok=(202,))
                    session = self._location(response)
                    self.progress.uploaded += len(data)
        except OSError as exc:
            raise UsageError(f"cannot read {file.name}: {exc.strerror}") from exc
        await self._commit(session, layer.digest, None)

    async def _commit(self, session: str, digest: str, data: bytes | None) -> None:
        """Close the upload ``session`` as blob ``digest``, sending ``data`` if given."""
        separator = "&" if "?" in session else "?"
        headers = {"Content-Type": OCTET_STREAM} if data is not None else {}
        response = await self.origin.send(
            self.host, "PUT", session + separator + urlencode({"digest": digest}),
            scope=self.scope, headers=headers, content=data, ok=(201, 400))
        if response.status_code == 400:
            raise OriginError(f"{self.host} refused blob {digest}: {_registry_errors(response)}"
                              "; if a file changed while it was pushed, push again")
        _check_digest(response, digest, f"{self.host}: blob")

    def _location(self, response: httpx.Response) -> str:
        """The path and query of an upload session from the Location header; it must stay
        on the registry's host, which is the one the credentials are for."""
        location = response.headers.get("location")
        if not location:
            raise OriginError(f"{self.host} opened an upload without a Location header")
        url = urlsplit(urljoin(str(response.request.url), location))
        if url.netloc != self.host:
            raise OriginError(f"{self.host} moved the upload to another host, {url.netloc}, "
                              "which p2pull does not support")
        return url.path + (f"?{url.query}" if url.query else "")

    # -- the manifest -----------------------------------------------------------------------

    async def _put_manifest(self, manifest: bytes, digest: str) -> None:
        reference = self.ref.tag or self.ref.reference
        response = await self.origin.send(
            self.host, "PUT", f"/v2/{self.ref.repository}/manifests/{reference}",
            scope=self.scope, headers={"Content-Type": OCI_MANIFEST}, content=manifest,
            ok=(201, 400))
        if response.status_code == 400:
            raise OriginError(f"{self.host} refused the manifest of {self.ref}: "
                              f"{_registry_errors(response)}")
        _check_digest(response, digest, f"{self.ref}: manifest")


async def _read(source, file: SourceFile, length: int) -> bytes:
    data = await source.read(length)
    if len(data) != length:
        raise UsageError(f"{file.name} shrank while it was pushed; push again")
    return data


def _check_digest(response: httpx.Response, digest: str, what: str) -> None:
    """The registry's Docker-Content-Digest, when it sends one, must be ours."""
    reported = response.headers.get("docker-content-digest")
    if reported and reported != digest:
        raise OriginError(f"{what} stored as {reported}, but p2pull computed {digest}")


def _registry_errors(response: httpx.Response) -> str:
    """The codes and messages of a distribution-spec error body, or its raw text."""
    try:
        errors = response.json()["errors"]
        return "; ".join(f"{error.get('code')}: {error.get('message')}" for error in errors)
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.text[:200] or f"HTTP {response.status_code}"


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(int(timestamp), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json(document: dict) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()

"""The content-addressed store under the data directory (layout in DESIGN.md).

    blobs/sha256/<hex>        complete, verified, read-only
    partial/<hex>             a download in progress, at its full size
    partial/<hex>.chunks      its chunk log: a header, then (index, xxh3-128) per held chunk
    partial/<hex>.lock        flock'd by the one process writing that blob
    manifests/sha256/<hex>    manifests of recorded refs, as served
    refs/<registry>/<repo>/<tag>.json   what a ref resolved to, for ls, rm and gc
    trees/<hex>               files of a manifest, materialised (hard links into blobs/)

A chunk is in the log only after its bytes were written, so a killed process resumes with
exactly the chunks it held. Nothing enters ``blobs/`` before its sha256 matched.
Synchronous file I/O: callers under trio run the slow parts in a worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import os
import shutil
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import xxhash

from p2pull.core.bitmap import Bitmap
from p2pull.core.chunks import ChunkPlan
from p2pull.core.refs import Ref, parse_ref, validate_digest
from p2pull.errors import DiskFullError, IntegrityError, StoreError

_LOG_MAGIC = b"P2PCHNK1"
_LOG_HEADER = struct.Struct(">8sQQ")  # magic, blob size, chunk size
_LOG_RECORD = struct.Struct(">I16s")  # chunk index, xxh3-128 of its bytes
#: bytes read per call while hashing a held prefix; large reads keep hashlib off the GIL
HASH_READ_SIZE = 4 * 1024 * 1024
#: start the disk write of the hashed prefix in steps of this size, so the fsync before
#: publishing finds little left to write (512 MiB: fsync 1.0 s -> ~0.1 s, measured here)
WRITEBACK_STEP = 32 * 1024 * 1024


def _hex(digest: str) -> str:
    return validate_digest(digest).split(":", 1)[1]


def _store_error(exc: OSError, what: str) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"disk full while {what}; free space under the data directory "
                             "and run the same command again: it resumes")
    return StoreError(f"{what} failed: {exc}")


def chunk_checksum(data) -> bytes:
    return xxhash.xxh3_128_digest(data)


@dataclass(frozen=True)
class RefRecord:
    ref: str
    manifest: str
    media_type: str
    size: int
    updated: float

    @property
    def parsed(self) -> Ref:
        return parse_ref(self.ref)


class Store:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        try:
            for sub in ("blobs/sha256", "partial", "manifests/sha256", "refs", "trees"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _store_error(exc, f"creating the store at {self.root}") from exc

    # -- blobs ----------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / _hex(digest)

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        try:
            held = self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return False
        return size is None or held == size

    def touch(self, digest: str) -> None:
        """Mark a blob used now, for least-recently-used eviction."""
        try:
            os.utime(self.blob_path(digest))
        except OSError:
            pass

    def try_open_partial(self, digest: str, size: int, chunk_size: int) -> "PartialBlob | None":
        """The partial download of ``digest``, locked for this process; None while another
        process holds the lock (wait, then check ``has_blob`` again)."""
        plan = ChunkPlan(size, chunk_size)
        lock_path = self.root / "partial" / f"{_hex(digest)}.lock"
        while True:
            lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock_fd)
                return None
            # The holder before us unlinks the lock file when it publishes: a lock on an
            # unlinked inode protects nothing, so take the one now at the path.
            try:
                if os.stat(lock_path).st_ino == os.fstat(lock_fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(lock_fd)
        return PartialBlob(self, digest, plan, lock_fd)  # closes lock_fd if it fails

    # -- manifests and refs -----------------------------------------------------------------

    def save_manifest(self, digest: str, raw: bytes) -> None:
        self._write_atomic(self.root / "manifests" / "sha256" / _hex(digest), raw)

    def load_manifest(self, digest: str) -> bytes:
        return (self.root / "manifests" / "sha256" / _hex(digest)).read_bytes()

    def _ref_path(self, ref: Ref) -> Path:
        name = ref.tag or (ref.digest or "").replace(":", "-") or "latest"
        return self.root / "refs" / ref.registry / ref.repository / f"{name}.json"

    def record_ref(self, ref: Ref, manifest_digest: str, media_type: str, size: int) -> None:
        """Point ``ref`` at a manifest; replaces the previous target atomically."""
        record = {"ref": str(Ref(ref.registry, ref.repository, ref.tag,
                                 None if ref.tag else ref.digest)),
                  "manifest": manifest_digest, "media_type": media_type, "size": size,
                  "updated": time.time()}
        path = self._ref_path(ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_atomic(path, json.dumps(record, indent=1).encode())

    def refs(self) -> list[RefRecord]:
        records = []
        for path in sorted((self.root / "refs").rglob("*.json")):
            try:
                records.append(RefRecord(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue  # a record being replaced, or not ours
        return records

    def remove_ref(self, ref: Ref) -> bool:
        try:
            self._ref_path(ref).unlink()
            return True
        except FileNotFoundError:
            return False

    def tree_dir(self, manifest_digest: str) -> Path:
        return self.root / "trees" / _hex(manifest_digest)

    # -- size and eviction ----------------------------------------------------------------

    def referenced_digests(self, records: list[RefRecord]) -> set[str]:
        """Manifests of ``records`` and every blob they name."""
        digests = set()
        for record in records:
            digests.add(record.manifest)
            try:
                manifest = json.loads(self.load_manifest(record.manifest))
            except (OSError, ValueError):
                continue
            for descriptor in [manifest.get("config") or {}, *manifest.get("layers", [])]:
                if isinstance(descriptor, dict) and "digest" in descriptor:
                    digests.add(descriptor["digest"])
        return digests

    def blobs(self) -> list[tuple[str, int, float]]:
        """(digest, size, last used) of every complete blob."""
        found = []
        for path in (self.root / "blobs" / "sha256").iterdir():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            found.append((f"sha256:{path.name}", st.st_size, st.st_mtime))
        return found

    @contextlib.contextmanager
    def in_use(self):
        """Held by every ``get`` while it runs, so that ``gc`` never deletes a blob that a
        get has published but not yet recorded under its ref."""
        fd = self._open_usage_lock()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _open_usage_lock(self) -> int:
        return os.open(self.root / "usage.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def gc(self, max_size: int | None = None) -> tuple[int, int]:
        """Delete blobs, manifests and trees no ref needs; then, while the blobs exceed
        ``max_size``, drop the least recently updated refs and what only they needed.
        Returns (blobs deleted, bytes freed). Partial downloads are kept (they resume).
        Raises StoreError while a ``get`` runs on this store."""
        fd = self._open_usage_lock()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError("a p2pull get is running on this store; run gc when it "
                                 "has finished") from None
            return self._collect(max_size)
        finally:
            os.close(fd)

    def _collect(self, max_size: int | None) -> tuple[int, int]:
        records = sorted(self.refs(), key=lambda r: r.updated)
        deleted = freed = 0
        while True:
            keep = self.referenced_digests(records)
            for digest, size, _ in self.blobs():
                if digest not in keep:
                    self.blob_path(digest).unlink(missing_ok=True)
                    deleted, freed = deleted + 1, freed + size
            for folder in ("manifests/sha256", "trees"):
                for path in (self.root / folder).iterdir():
                    if f"sha256:{path.name}" not in keep:
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
            total = sum(size for _, size, _ in self.blobs())
            if max_size is None or total <= max_size or not records:
                return deleted, freed
            oldest = records.pop(0)
            self.remove_ref(oldest.parsed)

    # -- helpers --------------------------------------------------------------------------

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _store_error(exc, f"writing {path}") from exc


class PartialBlob:
    """A blob being downloaded by this process, which holds its lock until ``close()``.

    ``write`` puts bytes at their place; ``commit`` records a whole chunk as held (after its
    bytes were written and checked). ``advance_hash`` feeds the held prefix to the blob's
    sha256 as chunks arrive, so ``publish`` at the end has little left to hash;
    ``hash_next_chunk`` feeds it a chunk that continues the prefix from the caller's buffer
    instead of reading it back.

    Callers keep one rule that both hashing paths rely on: a chunk's bytes are written by
    one writer at a time and never again once committed, until ``forget`` starts over."""

    def __init__(self, store: Store, digest: str, plan: ChunkPlan, lock_fd: int):
        self.store = store
        self.digest = digest
        self.plan = plan
        self._lock_fd = lock_fd
        hex_part = _hex(digest)
        self.data_path = store.root / "partial" / hex_part
        self.log_path = store.root / "partial" / f"{hex_part}.chunks"
        self.lock_path = store.root / "partial" / f"{hex_part}.lock"
        self.bitmap = Bitmap(plan.count)
        self.checksums: dict[int, bytes] = {}
        self._hasher = hashlib.sha256()
        self._hashed_chunks = 0
        self._written_back = 0  # bytes of the hashed prefix whose writeback was started
        # one buffer for all hashing reads: a fresh multi-MiB bytes per read, freed in
        # whichever worker thread, grew the heap of a 4 GiB pull to 213 MiB (127 reused)
        self._hash_view = memoryview(bytearray(HASH_READ_SIZE))
        # the hashing thread and writers hashing from their buffers take turns on the sha256
        self._hash_lock = threading.Lock()
        #: chunks fed to the sha256 from a writer's buffer rather than read back
        self.hashed_from_buffers = 0
        try:
            self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
            self._load_log()
            if os.fstat(self._fd).st_size != plan.blob_size:
                os.posix_fallocate(self._fd, 0, max(1, plan.blob_size))
                os.ftruncate(self._fd, plan.blob_size)
        except OSError as exc:
            self.close()
            raise _store_error(exc, f"preparing {plan.blob_size} bytes for {digest}") from exc

    def _load_log(self) -> None:
        """Resume from the chunk log when it describes this same plan; otherwise start over."""
        header = _LOG_HEADER.pack(_LOG_MAGIC, self.plan.blob_size, self.plan.chunk_size)
        try:
            log = self.log_path.read_bytes()
        except FileNotFoundError:
            log = b""
        if log[:_LOG_HEADER.size] == header:
            body = log[_LOG_HEADER.size:]
            usable = len(body) - len(body) % _LOG_RECORD.size  # a torn last record is dropped
            for index, checksum in _LOG_RECORD.iter_unpack(body[:usable]):
                if index < self.plan.count:
                    self.bitmap.add(index)
                    self.checksums[index] = checksum
            self._log = open(self.log_path, "r+b")
            self._log.truncate(_LOG_HEADER.size + usable)
            self._log.seek(0, os.SEEK_END)
        else:
            self._log = open(self.log_path, "wb")
            self._log.write(header)
            self._log.flush()

    @property
    def complete(self) -> bool:
        return self.bitmap.complete

    @property
    def hashed_chunks(self) -> int:
        """The chunks of the prefix the sha256 has been fed so far."""
        return self._hashed_chunks

    def write(self, index: int, offset_in_chunk: int, data) -> None:
        """Put ``data`` at ``offset_in_chunk`` of chunk ``index`` (not yet held)."""
        offset, length = self.plan.span(index)
        if offset_in_chunk + len(data) > length:
            raise StoreError(f"write past the end of chunk {index} of {self.digest}")
        try:
            written = os.pwrite(self._fd, data, offset + offset_in_chunk)
            while written < len(data):
                written += os.pwrite(self._fd, data[written:], offset + offset_in_chunk + written)
        except OSError as exc:
            raise _store_error(exc, f"writing {self.digest}") from exc
        if offset_in_chunk + len(data) == length:
            # chunks from peers come in any order, long before the hashed prefix reaches
            # them: start their writeback now, so the fsync at publish finds little to do
            start_writeback(self._fd, offset, length)

    def write_many(self, index: int, offset_in_chunk: int, buffers: list) -> None:
        """``write`` of consecutive buffers in one system call."""
        offset, length = self.plan.span(index)
        total = sum(len(buffer) for buffer in buffers)
        if offset_in_chunk + total > length:
            raise StoreError(f"write past the end of chunk {index} of {self.digest}")
        try:
            written = os.pwritev(self._fd, buffers, offset + offset_in_chunk)
        except OSError as exc:
            raise _store_error(exc, f"writing {self.digest}") from exc
        if written < total:  # short writes are rare; finish the rest one buffer at a time
            self.write(index, offset_in_chunk + written,
                       b"".join(bytes(b) for b in buffers)[written:])

    def commit(self, index: int, checksum: bytes) -> bool:
        """Record chunk ``index`` as held, its bytes hashing to ``checksum``. False if it was
        held already (a duplicate from endgame or a slow peer)."""
        if not self.bitmap.add(index):
            return False
        self.checksums[index] = checksum
        try:
            self._log.write(_LOG_RECORD.pack(index, checksum))
            self._log.flush()
        except OSError as exc:
            self.bitmap.discard(index)
            raise _store_error(exc, f"recording chunk {index} of {self.digest}") from exc
        return True

    def read_chunk(self, index: int) -> bytes:
        offset, length = self.plan.span(index)
        return os.pread(self._fd, length, offset)

    def advance_hash(self) -> bool:
        """Hash held chunks that continue the hashed prefix, reading them from the file;
        True once every chunk is hashed and held. Runs in a worker thread; only one call at
        a time."""
        while True:
            with self._hash_lock:
                index = self._hashed_chunks
                if index == self.plan.count or index not in self.bitmap:
                    return index == self.plan.count and self.bitmap.complete
                offset, length = self.plan.span(index)
                end = offset + length
                while offset < end:
                    view = self._hash_view[:min(HASH_READ_SIZE, end - offset)]
                    count = os.preadv(self._fd, [view], offset)
                    if not count:
                        raise StoreError(f"{self.data_path} is shorter than expected")
                    self._hasher.update(view[:count])
                    offset += count
                self._prefix_hashed(end)

    def hash_next_chunk(self, index: int, data) -> bool:
        """Feed chunk ``index`` to the sha256 from ``data``, the bytes just written for it
        (checked, not yet committed), if it continues the hashed prefix: reading it back
        later would cost as much as the hash. False, and nothing done, if it does not.
        May run in a worker thread."""
        with self._hash_lock:
            if index != self._hashed_chunks or index in self.bitmap:
                return False
            self._hasher.update(data)
            self._prefix_hashed(self.plan.offset(index) + len(data))
            self.hashed_from_buffers += 1
            return True

    def _prefix_hashed(self, end: int) -> None:
        self._hashed_chunks += 1
        if end - self._written_back >= WRITEBACK_STEP:
            start_writeback(self._fd, self._written_back, end - self._written_back)
            self._written_back = end

    def find_damaged_chunks(self) -> list[int]:
        """Chunks whose bytes on disk no longer match their recorded xxh3 (a torn write
        before a crash); they are dropped from the bitmap so they are fetched again."""
        damaged = [index for index in self.bitmap.held()
                   if chunk_checksum(self.read_chunk(index)) != self.checksums.get(index)]
        if damaged:
            for index in damaged:
                self.bitmap.discard(index)
                self.checksums.pop(index, None)
            self._rewrite_log()
        self._hasher, self._hashed_chunks = hashlib.sha256(), 0
        return damaged

    def discard_all(self) -> None:
        """Forget every chunk: the next attempt fetches the blob from scratch."""
        self.forget(list(self.bitmap.held()))

    def forget(self, indexes) -> None:
        """Drop chunks from the held set (their bytes stay until overwritten)."""
        for index in indexes:
            self.bitmap.discard(index)
            self.checksums.pop(index, None)
        self._rewrite_log()
        self._hasher, self._hashed_chunks, self._written_back = hashlib.sha256(), 0, 0

    def _rewrite_log(self) -> None:
        self._log.seek(_LOG_HEADER.size)
        self._log.truncate()
        for index in self.bitmap.held():
            self._log.write(_LOG_RECORD.pack(index, self.checksums[index]))
        self._log.flush()

    def publish(self) -> Path:
        """Check the sha256 and move the blob into ``blobs/``. Raises IntegrityError on a
        mismatch (the caller decides whether to refetch) and publishes nothing then."""
        if not self.advance_hash():
            raise StoreError(f"publish of {self.digest} before all chunks are held and hashed")
        actual = "sha256:" + self._hasher.hexdigest()
        if actual != self.digest:
            raise IntegrityError(f"blob {self.digest} hashed to {actual}; nothing was "
                                 "published")
        target = self.store.blob_path(self.digest)
        try:
            os.fsync(self._fd)
            os.fchmod(self._fd, 0o444)
            os.replace(self.data_path, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            raise _store_error(exc, f"publishing {self.digest}") from exc
        self.log_path.unlink(missing_ok=True)
        self.lock_path.unlink(missing_ok=True)  # still locked by us: waiters re-check
        return target

    def close(self) -> None:
        """Release the files, the lock last. A second call does nothing: descriptor numbers
        are reused at once, so closing one twice could close another blob's file."""
        for name in ("_log", "_fd", "_lock_fd"):
            handle = getattr(self, name, None)
            setattr(self, name, None)
            try:
                if name == "_log" and handle is not None:
                    handle.close()
                elif handle is not None:
                    os.close(handle)
            except OSError:
                pass


def _load_sync_file_range():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback, do not wait for it


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk without waiting (Linux's
    sync_file_range; a no-op elsewhere). Durability still comes from the fsync."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

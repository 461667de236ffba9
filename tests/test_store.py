"""The content-addressed store: resumable partial blobs, verified publishing, locks, refs, gc.

Crashes are real where it matters: a child process is killed with SIGKILL mid-download and
a new Store resumes what it left; locks are checked across processes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest

from p2pull.core.chunks import ChunkPlan
from p2pull.core.refs import parse_ref
from p2pull.errors import DiskFullError, IntegrityError, RefError, StoreError
from p2pull.store import cas
from p2pull.store.cas import PartialBlob, Store, chunk_checksum

REPO = Path(__file__).resolve().parent.parent
CHUNK = 4096
SIZE = 10 * CHUNK + 1234  # 11 chunks, the last one short


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_data(size: int = SIZE, seed: int = 1) -> bytes:
    out, block, counter = bytearray(), b"", 0
    while len(out) < size:
        block = hashlib.sha256(block + bytes([seed]) + counter.to_bytes(8, "big")).digest()
        out += block
        counter += 1
    return bytes(out[:size])


DATA = make_data()
DIGEST = sha256(DATA)
PLAN = ChunkPlan(SIZE, CHUNK)


def chunk_bytes(data: bytes, index: int, chunk_size: int = CHUNK) -> bytes:
    return data[index * chunk_size:(index + 1) * chunk_size]


def put_chunks(partial: PartialBlob, data: bytes, indexes) -> None:
    for index in indexes:
        piece = chunk_bytes(data, index, partial.plan.chunk_size)
        partial.write(index, 0, piece)
        assert partial.commit(index, chunk_checksum(piece))


def open_partial(store: Store, digest: str = DIGEST, size: int = SIZE,
                 chunk_size: int = CHUNK) -> PartialBlob:
    partial = store.try_open_partial(digest, size, chunk_size)
    assert partial is not None
    return partial


def put_blob(store: Store, data: bytes) -> str:
    digest = sha256(data)
    partial = open_partial(store, digest, len(data), CHUNK)
    try:
        put_chunks(partial, data, range(partial.plan.count))
        partial.publish()
    finally:
        partial.close()
    return digest


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(root: Path) -> Store:
    return Store(root)


def partial_files(root: Path) -> list[str]:
    return sorted(path.name for path in (root / "partial").iterdir())


def run_child(script: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            **kwargs)


# -- layout -------------------------------------------------------------------------------


def test_store_creates_its_layout(root):
    Store(root)
    for sub in ("blobs/sha256", "partial", "manifests/sha256", "refs", "trees"):
        assert (root / sub).is_dir()
    Store(root)  # twice is fine


def test_bad_digests_are_refused(store):
    for digest in ("sha256:abc", "md5:" + "a" * 32, "sha256:../../etc/passwd"):
        with pytest.raises(RefError):
            store.blob_path(digest)
        with pytest.raises(RefError):
            store.try_open_partial(digest, 10, CHUNK)
    assert partial_files(store.root) == []


# -- partial blobs: write, commit, resume -------------------------------------------------


def test_new_partial_has_the_full_size_and_no_chunks(store):
    partial = open_partial(store)
    try:
        assert len(partial.bitmap) == 0
        assert partial.bitmap.size == PLAN.count == 11
        assert not partial.complete
        assert partial.data_path.stat().st_size == SIZE
        assert partial_files(store.root) == sorted(
            [DIGEST[7:], DIGEST[7:] + ".chunks", DIGEST[7:] + ".lock"])
    finally:
        partial.close()


def test_write_and_read_back(store):
    partial = open_partial(store)
    try:
        put_chunks(partial, DATA, [3, 10])
        assert partial.read_chunk(3) == chunk_bytes(DATA, 3)
        assert partial.read_chunk(10) == DATA[10 * CHUNK:]
        assert len(partial.read_chunk(10)) == 1234
        assert list(partial.bitmap.held()) == [3, 10]
        assert partial.checksums[3] == chunk_checksum(chunk_bytes(DATA, 3))
    finally:
        partial.close()


def test_write_in_pieces_and_write_many(store):
    partial = open_partial(store)
    try:
        piece = chunk_bytes(DATA, 2)
        partial.write(2, 0, piece[:100])
        partial.write(2, 100, memoryview(piece)[100:])
        piece5 = chunk_bytes(DATA, 5)
        partial.write_many(5, 0, [piece5[:1], memoryview(piece5)[1:3000], piece5[3000:]])
        assert partial.read_chunk(2) == piece
        assert partial.read_chunk(5) == piece5
    finally:
        partial.close()


def test_write_many_finishes_a_short_write(store):
    partial = open_partial(store)
    real_pwritev = os.pwritev

    def short_pwritev(fd, buffers, offset):
        return real_pwritev(fd, [bytes(buffers[0])[:7]], offset)

    try:
        piece = chunk_bytes(DATA, 4)
        with mock.patch("os.pwritev", side_effect=short_pwritev):
            partial.write_many(4, 0, [piece[:2000], piece[2000:]])
        assert partial.read_chunk(4) == piece
    finally:
        partial.close()


def test_write_past_the_end_of_a_chunk(store):
    partial = open_partial(store)
    try:
        with pytest.raises(StoreError, match="past the end"):
            partial.write(0, 1, bytes(CHUNK))
        with pytest.raises(StoreError, match="past the end"):
            partial.write(10, 0, bytes(1235))
        with pytest.raises(StoreError, match="past the end"):
            partial.write_many(10, 1000, [bytes(200), bytes(35)])
        with pytest.raises(IndexError):
            partial.write(11, 0, b"x")
    finally:
        partial.close()


def test_commit_twice_is_a_duplicate(store):
    partial = open_partial(store)
    try:
        put_chunks(partial, DATA, [1])
        assert partial.commit(1, chunk_checksum(chunk_bytes(DATA, 1))) is False
        assert len(partial.bitmap) == 1
    finally:
        partial.close()
    reopened = open_partial(Store(store.root))
    try:
        assert list(reopened.bitmap.held()) == [1]
        assert (reopened.log_path.stat().st_size
                == cas._LOG_HEADER.size + cas._LOG_RECORD.size)
    finally:
        reopened.close()


def test_reopen_resumes_with_exactly_the_committed_chunks(store):
    partial = open_partial(store)
    put_chunks(partial, DATA, [0, 4, 7, 10])
    partial.write(5, 0, chunk_bytes(DATA, 5))  # written, never committed
    partial.close()

    resumed = open_partial(Store(store.root))
    try:
        assert list(resumed.bitmap.held()) == [0, 4, 7, 10]
        for index in (0, 4, 7, 10):
            assert resumed.read_chunk(index) == chunk_bytes(DATA, index)
            assert resumed.checksums[index] == chunk_checksum(chunk_bytes(DATA, index))
        assert resumed.find_damaged_chunks() == []
        put_chunks(resumed, DATA, [1, 2, 3, 5, 6, 8, 9])
        assert resumed.complete
        resumed.publish()
    finally:
        resumed.close()
    assert store.blob_path(DIGEST).read_bytes() == DATA


KILLED_WRITER = """
    import sys, time
    from p2pull.store.cas import Store, chunk_checksum
    root, digest, size, chunk, data_file = sys.argv[1:6]
    size, chunk = int(size), int(chunk)
    data = open(data_file, "rb").read()
    partial = Store(root).try_open_partial(digest, size, chunk)
    for index in (1, 2, 6, 10):
        piece = data[index * chunk:(index + 1) * chunk]
        partial.write(index, 0, piece)
        partial.commit(index, chunk_checksum(piece))
    piece = data[3 * chunk:4 * chunk]
    partial.write(3, 0, piece[:1000])  # mid-chunk when killed: never committed
    print("ready", flush=True)
    time.sleep(60)
"""


def test_resume_after_kill_9(store, tmp_path):
    data_file = tmp_path / "blob"
    data_file.write_bytes(DATA)
    child = run_child(KILLED_WRITER, str(store.root), DIGEST, str(SIZE), str(CHUNK),
                      str(data_file))
    try:
        assert child.stdout.readline().strip() == "ready"
        # while it lives, it holds the lock
        assert Store(store.root).try_open_partial(DIGEST, SIZE, CHUNK) is None
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    resumed = open_partial(Store(store.root))  # the dead process's lock is gone
    try:
        assert list(resumed.bitmap.held()) == [1, 2, 6, 10]
        for index in (1, 2, 6, 10):
            assert resumed.read_chunk(index) == chunk_bytes(DATA, index)
        put_chunks(resumed, DATA, [0, 3, 4, 5, 7, 8, 9])
        resumed.publish()
    finally:
        resumed.close()
    assert store.blob_path(DIGEST).read_bytes() == DATA


@pytest.mark.parametrize("torn", [1, 7, cas._LOG_RECORD.size - 1])
def test_torn_last_log_record_is_ignored(store, torn):
    partial = open_partial(store)
    put_chunks(partial, DATA, [2, 5])
    partial.close()
    log_path = partial.log_path
    record = cas._LOG_RECORD.pack(8, chunk_checksum(chunk_bytes(DATA, 8)))
    with open(log_path, "ab") as log:
        log.write(record[:torn])

    resumed = open_partial(Store(store.root))
    try:
        assert list(resumed.bitmap.held()) == [2, 5]
        # the torn bytes are dropped, so the next record lands where a reader expects it
        put_chunks(resumed, DATA, [9])
    finally:
        resumed.close()
    again = open_partial(Store(store.root))
    try:
        assert list(again.bitmap.held()) == [2, 5, 9]
        assert again.checksums[9] == chunk_checksum(chunk_bytes(DATA, 9))
    finally:
        again.close()


@pytest.mark.parametrize("size, chunk_size", [(SIZE, CHUNK * 2), (SIZE + 1, CHUNK),
                                              (SIZE - 1, CHUNK)])
def test_log_of_another_plan_restarts_from_zero(store, size, chunk_size):
    partial = open_partial(store)
    put_chunks(partial, DATA, [0, 1, 2])
    partial.close()

    other = open_partial(Store(store.root), DIGEST, size, chunk_size)
    try:
        assert len(other.bitmap) == 0
        assert other.data_path.stat().st_size == size
        assert other.plan == ChunkPlan(size, chunk_size)
    finally:
        other.close()
    # and the log now describes the new plan: the old chunks are gone for good
    back = open_partial(Store(store.root))
    try:
        assert len(back.bitmap) == 0
    finally:
        back.close()


def test_log_with_garbage_header_restarts_from_zero(store):
    partial = open_partial(store)
    put_chunks(partial, DATA, [0])
    partial.close()
    partial.log_path.write_bytes(b"NOTALOG!" + partial.log_path.read_bytes()[8:])
    again = open_partial(Store(store.root))
    try:
        assert len(again.bitmap) == 0
    finally:
        again.close()


# -- hashing and publishing ---------------------------------------------------------------


def test_advance_hash_follows_the_held_prefix(store):
    partial = open_partial(store)
    try:
        put_chunks(partial, DATA, [1, 2])
        assert partial.advance_hash() is False
        assert partial._hashed_chunks == 0
        put_chunks(partial, DATA, [0])
        assert partial.advance_hash() is False
        assert partial._hashed_chunks == 3
        put_chunks(partial, DATA, range(3, 11))
        assert partial.advance_hash() is True
        assert partial.advance_hash() is True  # idempotent at the end
    finally:
        partial.close()


def test_chunks_continuing_the_prefix_are_hashed_from_the_callers_buffer(store):
    partial = open_partial(store)
    try:
        for index in [0, 1, 3]:  # 3 is past the prefix: it must be read back later
            piece = chunk_bytes(DATA, index)
            partial.write(index, 0, piece)
            assert partial.hash_next_chunk(index, piece) is (index != 3)
            partial.commit(index, chunk_checksum(piece))
        assert partial.hashed_chunks == 2
        assert partial.hash_next_chunk(0, chunk_bytes(DATA, 0)) is False  # hashed already
        put_chunks(partial, DATA, [2])
        # the frontier is committed: that is the hashing thread's work, not a writer's
        assert partial.hash_next_chunk(2, chunk_bytes(DATA, 2)) is False
        assert partial.advance_hash() is False
        assert partial.hashed_chunks == 4
        put_chunks(partial, DATA, range(4, 11))
        partial.publish()
    finally:
        partial.close()
    assert store.blob_path(DIGEST).read_bytes() == DATA


def test_prefix_hashed_from_buffers_is_what_publish_checks(store):
    """The sha256 is fed the buffer, not the file: a buffer unlike the bytes written (a
    broken caller) makes the publish fail rather than pass unchecked."""
    partial = open_partial(store)
    try:
        partial.write(0, 0, chunk_bytes(DATA, 0))
        partial.hash_next_chunk(0, bytes(CHUNK))
        partial.commit(0, chunk_checksum(chunk_bytes(DATA, 0)))
        put_chunks(partial, DATA, range(1, 11))
        with pytest.raises(IntegrityError):
            partial.publish()
    finally:
        partial.close()
    assert not store.has_blob(DIGEST)


def test_publish_waits_for_the_last_chunk_hashed_but_not_committed(store):
    partial = open_partial(store)
    try:
        put_chunks(partial, DATA, range(10))
        assert partial.advance_hash() is False
        last = chunk_bytes(DATA, 10)
        partial.write(10, 0, last)
        assert partial.hash_next_chunk(10, last)
        assert partial.hashed_chunks == 11
        assert partial.advance_hash() is False  # hashed, but not held yet
        with pytest.raises(StoreError, match="before all chunks"):
            partial.publish()
        partial.commit(10, chunk_checksum(last))
        assert partial.advance_hash() is True
        partial.publish()
    finally:
        partial.close()
    assert store.blob_path(DIGEST).read_bytes() == DATA


def test_publish_moves_a_verified_blob_read_only(store):
    partial = open_partial(store)
    try:
        put_chunks(partial, DATA, reversed(range(11)))
        partial.advance_hash()
        target = partial.publish()
    finally:
        partial.close()
    assert target == store.blob_path(DIGEST)
    assert target.read_bytes() == DATA
    assert stat.S_IMODE(target.stat().st_mode) == 0o444
    assert partial_files(store.root) == []  # no data, log or lock left behind
    assert store.has_blob(DIGEST)
    assert store.has_blob(DIGEST, SIZE)
    assert not store.has_blob(DIGEST, SIZE + 1)
    assert store.blobs()[0][:2] == (DIGEST, SIZE)


def test_publish_with_small_hash_reads(store, monkeypatch):
    monkeypatch.setattr(cas, "HASH_READ_SIZE", 1000)
    put_blob(store, DATA)
    assert store.blob_path(DIGEST).read_bytes() == DATA


def test_publish_empty_blob(store):
    empty = sha256(b"")
    partial = open_partial(store, empty, 0, CHUNK)
    try:
        assert partial.plan.count == 1
        partial.write(0, 0, b"")
        partial.commit(0, chunk_checksum(b""))
        partial.publish()
    finally:
        partial.close()
    assert store.blob_path(empty).read_bytes() == b""
    assert store.has_blob(empty, 0)


def test_publish_before_complete_is_refused(store):
    partial = open_partial(store)
    try:
        put_chunks(partial, DATA, range(10))
        with pytest.raises(StoreError, match="before all chunks"):
            partial.publish()
    finally:
        partial.close()
    assert list((store.root / "blobs" / "sha256").iterdir()) == []


def test_wrong_digest_publishes_nothing(store):
    wrong = sha256(b"something else")
    partial = open_partial(store, wrong, SIZE, CHUNK)
    try:
        put_chunks(partial, DATA, range(11))
        with pytest.raises(IntegrityError, match="nothing was published"):
            partial.publish()
        assert list((store.root / "blobs" / "sha256").iterdir()) == []
        assert not store.has_blob(wrong)
        assert partial.data_path.exists()  # kept for the caller to repair
        # every chunk matches its own checksum: only a refetch can help
        assert partial.find_damaged_chunks() == []
        partial.discard_all()
        assert len(partial.bitmap) == 0
        with pytest.raises(StoreError):
            partial.publish()
    finally:
        partial.close()
    assert list((store.root / "blobs" / "sha256").iterdir()) == []
    again = open_partial(Store(store.root), wrong, SIZE, CHUNK)
    try:
        assert len(again.bitmap) == 0  # discard_all reached the log
    finally:
        again.close()


def test_find_damaged_chunks_and_recover(store):
    partial = open_partial(store)
    try:
        put_chunks(partial, DATA, range(11))
        with open(partial.data_path, "r+b") as behind_our_back:
            behind_our_back.seek(6 * CHUNK + 77)
            behind_our_back.write(b"\x00" if DATA[6 * CHUNK + 77] else b"\x01")
        with pytest.raises(IntegrityError):
            partial.publish()
        assert list((store.root / "blobs" / "sha256").iterdir()) == []
        assert partial.find_damaged_chunks() == [6]
        assert 6 not in partial.bitmap
        assert len(partial.bitmap) == 10
        # the log forgot it too: a restart would fetch it again
        log = partial.log_path.read_bytes()[cas._LOG_HEADER.size:]
        assert sorted(i for i, _ in cas._LOG_RECORD.iter_unpack(log)) == \
            [0, 1, 2, 3, 4, 5, 7, 8, 9, 10]
        put_chunks(partial, DATA, [6])
        partial.publish()  # the hash starts over after damage was found
    finally:
        partial.close()
    assert store.blob_path(DIGEST).read_bytes() == DATA


def test_damage_found_after_a_restart(store):
    partial = open_partial(store)
    put_chunks(partial, DATA, [0, 1, 9])
    partial.close()
    with open(partial.data_path, "r+b") as behind_our_back:
        behind_our_back.seek(CHUNK * 9)
        behind_our_back.write(b"garbage!")
    resumed = open_partial(Store(store.root))
    try:
        assert resumed.find_damaged_chunks() == [9]
        assert list(resumed.bitmap.held()) == [0, 1]
    finally:
        resumed.close()


def test_discard_all(store):
    partial = open_partial(store)
    try:
        put_chunks(partial, DATA, [0, 1, 2])
        partial.advance_hash()
        partial.discard_all()
        assert len(partial.bitmap) == 0
        assert partial.checksums == {}
        put_chunks(partial, DATA, range(11))
        partial.publish()  # hashing restarted from the first byte
    finally:
        partial.close()
    assert store.has_blob(DIGEST, SIZE)


# -- the per-blob lock ----------------------------------------------------------------------


def test_lock_within_one_process(store):
    first = open_partial(store)
    try:
        assert Store(store.root).try_open_partial(DIGEST, SIZE, CHUNK) is None
        assert store.try_open_partial(DIGEST, SIZE, CHUNK) is None
        # another blob is not locked
        other_data = make_data(100, seed=2)
        other = open_partial(Store(store.root), sha256(other_data), 100, CHUNK)
        other.close()
    finally:
        first.close()
    second = open_partial(Store(store.root))
    second.close()


LOCK_PROBE = """
    import sys
    from p2pull.store.cas import Store
    root, digest, size, chunk = sys.argv[1:5]
    partial = Store(root).try_open_partial(digest, int(size), int(chunk))
    print("none" if partial is None else "locked", flush=True)
    if partial is not None and sys.argv[5:] == ["hold"]:
        sys.stdin.readline()
        partial.close()
        print("closed", flush=True)
"""


def probe(root: Path) -> str:
    child = run_child(LOCK_PROBE, str(root), DIGEST, str(SIZE), str(CHUNK))
    out, _ = child.communicate(timeout=30)
    return out.strip()


def test_lock_across_processes(store):
    partial = open_partial(store)
    try:
        assert probe(store.root) == "none"
    finally:
        partial.close()
    assert probe(store.root) == "locked"


def test_lock_held_by_another_process(store):
    child = run_child(LOCK_PROBE, str(store.root), DIGEST, str(SIZE), str(CHUNK), "hold")
    try:
        assert child.stdout.readline().strip() == "locked"
        assert Store(store.root).try_open_partial(DIGEST, SIZE, CHUNK) is None
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "closed"
        partial = open_partial(Store(store.root))
        partial.close()
    finally:
        child.kill()
        child.wait()


def test_waiter_after_publish_gets_a_live_lock(store):
    """The publisher unlinks the lock file while holding it; a process that opened the old
    file must not believe it holds the lock of the (new) path."""
    holder = open_partial(store)
    put_chunks(holder, DATA, range(11))
    real_flock = fcntl.flock
    calls = []

    def flock_after_publish(fd, operation):
        calls.append(fd)
        if len(calls) == 1:
            # between our open() and our flock(), the holder publishes and lets go
            holder.publish()
            holder.close()
        return real_flock(fd, operation)

    with mock.patch.object(cas.fcntl, "flock", side_effect=flock_after_publish):
        waiter = Store(store.root).try_open_partial(DIGEST, SIZE, CHUNK)
    assert waiter is not None
    try:
        assert len(calls) == 2  # the stale lock was dropped and the path's one taken
        assert os.fstat(waiter._lock_fd).st_ino == os.stat(waiter.lock_path).st_ino
        # a third party is shut out by that live lock
        assert Store(store.root).try_open_partial(DIGEST, SIZE, CHUNK) is None
    finally:
        waiter.close()
    assert store.has_blob(DIGEST, SIZE)


def test_close_is_idempotent(store, tmp_path):
    partial = open_partial(store)
    partial.close()
    # the numbers of the closed descriptors get reused; a second close must not touch them
    reused = [os.open(tmp_path / f"f{n}", os.O_CREAT | os.O_RDWR) for n in range(3)]
    try:
        partial.close()
        for fd in reused:
            os.fstat(fd)
    finally:
        for fd in reused:
            os.close(fd)


# -- disk full ------------------------------------------------------------------------------


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing(store):
    partial = open_partial(store)
    try:
        with mock.patch("os.pwritev", side_effect=enospc):
            with pytest.raises(DiskFullError, match="free space") as info:
                partial.write_many(0, 0, [chunk_bytes(DATA, 0)])
        assert info.value.exit_code == 9
        assert isinstance(info.value.__cause__, OSError)
        with mock.patch("os.pwrite", side_effect=enospc):
            with pytest.raises(DiskFullError, match="free space"):
                partial.write(0, 0, chunk_bytes(DATA, 0))
        assert len(partial.bitmap) == 0
    finally:
        partial.close()


def test_disk_quota_is_disk_full(store):
    partial = open_partial(store)
    try:
        with mock.patch("os.pwritev", side_effect=OSError(errno.EDQUOT, "Disk quota exceeded")):
            with pytest.raises(DiskFullError, match="free space"):
                partial.write_many(0, 0, [b"x"])
    finally:
        partial.close()


def test_other_write_errors_are_store_errors(store):
    partial = open_partial(store)
    try:
        with mock.patch("os.pwritev", side_effect=OSError(errno.EIO, "I/O error")):
            with pytest.raises(StoreError) as info:
                partial.write_many(0, 0, [b"x"])
        assert not isinstance(info.value, DiskFullError)
    finally:
        partial.close()


def test_disk_full_while_preparing_the_partial(store):
    with mock.patch("os.posix_fallocate", side_effect=enospc):
        with pytest.raises(DiskFullError, match="free space"):
            store.try_open_partial(DIGEST, SIZE, CHUNK)
    # the lock was released: a later attempt (after freeing space) can go on
    partial = open_partial(Store(store.root))
    partial.close()


def test_disk_full_while_recording_a_chunk(store):
    partial = open_partial(store)
    try:
        piece = chunk_bytes(DATA, 0)
        partial.write(0, 0, piece)
        with mock.patch.object(partial, "_log") as log:
            log.write.side_effect = enospc
            with pytest.raises(DiskFullError, match="free space"):
                partial.commit(0, chunk_checksum(piece))
        assert 0 not in partial.bitmap
    finally:
        partial.close()


# -- manifests and refs ---------------------------------------------------------------------


def manifest_for(*blobs: tuple[str, int]) -> bytes:
    config, *layers = blobs
    return json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": "application/octet-stream", "digest": d, "size": s}
                   for d, s in layers]}).encode()


def test_manifests(store):
    raw = manifest_for((DIGEST, SIZE))
    store.save_manifest(sha256(raw), raw)
    assert store.load_manifest(sha256(raw)) == raw


def test_record_list_and_remove_refs(store):
    tagged = parse_ref("registry.example.com/ns/model:v1")
    pinned = parse_ref(f"localhost:5000/m@{DIGEST}")
    both = parse_ref(f"docker.io/library/ubuntu:22.04@{DIGEST}")
    latest = parse_ref("ubuntu")
    m1, m2 = sha256(b"m1"), sha256(b"m2")
    store.record_ref(tagged, m1, "application/vnd.oci.image.manifest.v1+json", 123)
    store.record_ref(pinned, m2, "application/vnd.oci.image.manifest.v1+json", 5)
    store.record_ref(both, m2, "application/vnd.oci.image.manifest.v1+json", 5)
    store.record_ref(latest, m1, "application/vnd.oci.image.manifest.v1+json", 123)
    records = {record.ref: record for record in store.refs()}
    assert set(records) == {"registry.example.com/ns/model:v1", f"localhost:5000/m@{DIGEST}",
                            "docker.io/library/ubuntu:22.04", "docker.io/library/ubuntu"}
    assert records["registry.example.com/ns/model:v1"].manifest == m1
    assert records["registry.example.com/ns/model:v1"].size == 123
    assert records["registry.example.com/ns/model:v1"].parsed == tagged
    assert records[f"localhost:5000/m@{DIGEST}"].parsed == pinned
    # a new target replaces the old one
    store.record_ref(tagged, m2, "application/vnd.oci.image.manifest.v1+json", 5)
    assert [r.manifest for r in store.refs() if r.parsed == tagged] == [m2]
    # removal, by the parsed ref of the record
    for record in store.refs():
        assert store.remove_ref(record.parsed)
    assert store.refs() == []
    assert store.remove_ref(tagged) is False


def test_refs_skip_records_that_are_not_ours(store):
    store.record_ref(parse_ref("example.com/a:1"), sha256(b"m"), "t", 1)
    junk = store.root / "refs" / "example.com" / "junk.json"
    junk.write_text("{not json")
    (store.root / "refs" / "example.com" / "other.json").write_text('{"x": 1}')
    assert [r.ref for r in store.refs()] == ["example.com/a:1"]


# -- gc -------------------------------------------------------------------------------------


def publish_image(store: Store, name: str, *blobs: bytes, when: float) -> str:
    digests = [(put_blob(store, data), len(data)) for data in blobs]
    raw = manifest_for(*digests)
    manifest = sha256(raw)
    store.save_manifest(manifest, raw)
    (store.tree_dir(manifest) / "file").parent.mkdir(parents=True, exist_ok=True)
    (store.tree_dir(manifest) / "file").write_text("x")
    with mock.patch("time.time", return_value=when):
        store.record_ref(parse_ref(name), manifest, "application/vnd.oci.image.manifest.v1+json",
                         sum(size for _, size in digests))
    return manifest


def blob_names(store: Store) -> set[str]:
    return {digest for digest, _, _ in store.blobs()}


def test_gc_deletes_unreferenced_and_keeps_referenced(store):
    shared = make_data(10, seed=9)
    kept = make_data(100, seed=3)
    manifest = publish_image(store, "example.com/keep:1", shared, kept, when=1000)
    orphan = put_blob(store, make_data(300, seed=4))
    stray_manifest = sha256(b"stray")
    store.save_manifest(stray_manifest, b"stray")
    store.tree_dir(stray_manifest).mkdir()
    partial = open_partial(store)
    put_chunks(partial, DATA, [0])
    partial.close()

    assert store.gc() == (1, 300)
    assert blob_names(store) == {sha256(shared), sha256(kept)}
    assert not store.has_blob(orphan)
    assert store.load_manifest(manifest)
    assert store.tree_dir(manifest).is_dir()
    assert not (store.root / "manifests" / "sha256" / stray_manifest[7:]).exists()
    assert not store.tree_dir(stray_manifest).exists()
    assert partial_files(store.root) == sorted(
        [DIGEST[7:], DIGEST[7:] + ".chunks", DIGEST[7:] + ".lock"])  # downloads resume
    assert store.gc() == (0, 0)
    assert len(store.refs()) == 1


def test_gc_with_max_size_evicts_least_recently_updated_refs_first(store):
    shared = make_data(10, seed=9)
    a, b, c = (make_data(100, seed=s) for s in (11, 12, 13))
    # names sort the other way round from their age
    oldest = publish_image(store, "example.com/z:1", shared, a, when=1000)
    middle = publish_image(store, "example.com/m:1", shared, b, when=2000)
    newest = publish_image(store, "example.com/a:1", shared, c, when=3000)
    assert sum(size for _, size, _ in store.blobs()) == 310

    assert store.gc(max_size=310) == (0, 0)
    assert store.gc(max_size=250) == (1, 100)
    assert blob_names(store) == {sha256(shared), sha256(b), sha256(c)}
    assert sorted(r.ref for r in store.refs()) == ["example.com/a:1", "example.com/m:1"]
    assert not (store.root / "manifests" / "sha256" / oldest[7:]).exists()
    assert not store.tree_dir(oldest).exists()
    assert store.tree_dir(middle).exists() and store.tree_dir(newest).exists()

    # updating a ref makes it the newest
    with mock.patch("time.time", return_value=4000):
        store.record_ref(parse_ref("example.com/m:1"), middle, "t", 110)
    assert store.gc(max_size=150) == (1, 100)
    assert blob_names(store) == {sha256(shared), sha256(b)}
    assert [r.ref for r in store.refs()] == ["example.com/m:1"]

    assert store.gc(max_size=0) == (2, 110)
    assert store.blobs() == [] and store.refs() == []


def test_gc_refuses_to_run_while_a_get_holds_the_store(tmp_path):
    store = Store(tmp_path / "store")
    with store.in_use():
        with pytest.raises(StoreError, match="get is running"):
            Store(tmp_path / "store").gc()
    assert Store(tmp_path / "store").gc() == (0, 0)

"""Tests of p2pull.store.materialise against a fake store of real sha256-named blobs."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import zstandard
from hypothesis import given, strategies as st

from p2pull.errors import IntegrityError, StoreError, UnsafePathError
from p2pull.store import materialise
from p2pull.store.materialise import (
    build_tree,
    classify_layer,
    layer_file_path,
    publish_link,
    safe_join,
    safe_relative_path,
    write_oci_layout,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_TAR = "application/vnd.cncf.model.weight.v1.tar"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
CNCF_PATH, CNAI_PATH, TITLE = materialise.FILEPATH_ANNOTATIONS

SKOPEO = shutil.which("skopeo")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not on PATH: it is the "
                                  "independent reader that checks our OCI layouts")


class FakeStore:
    """Blobs under ``blobs/sha256/<hex>``, read-only, named by their real digest."""

    def __init__(self, data_dir: Path) -> None:
        self.blobs = data_dir / "blobs" / "sha256"
        self.blobs.mkdir(parents=True)

    def add(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if not path.exists():
            path.write_bytes(data)
            path.chmod(0o444)
        return digest

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest.partition(":")[2]

    def descriptor(self, data: bytes, media_type: str, **annotations: str) -> dict:
        descriptor = {"mediaType": media_type, "digest": self.add(data), "size": len(data)}
        if annotations:
            descriptor["annotations"] = annotations
        return descriptor

    def file(self, name: str, data: bytes, media_type: str = WEIGHT_RAW) -> dict:
        return self.descriptor(data, media_type, **{CNCF_PATH: name})


@pytest.fixture
def store(tmp_path: Path) -> FakeStore:
    return FakeStore(tmp_path / "data")


@pytest.fixture
def trees(tmp_path: Path) -> Path:
    path = tmp_path / "trees"
    path.mkdir()
    return path


def manifest_of(*layers: dict, config: dict | None = None) -> dict:
    return {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": config or {"mediaType": MODEL_CONFIG, "digest": "sha256:" + "0" * 64,
                                 "size": 0},
            "layers": list(layers)}


@dataclass(frozen=True)
class Entry:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""


def file(name: str, data: bytes = b"data") -> Entry:
    return Entry(name, data)


def directory(name: str) -> Entry:
    return Entry(name, type=tarfile.DIRTYPE)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, type=tarfile.SYMTYPE, linkname=target)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name, type=tarfile.LNKTYPE, linkname=target)


def make_tar(*entries: Entry, compression: str = "tar") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = entry.type
            info.linkname = entry.linkname
            info.size = len(entry.data)
            info.mode = 0o755 if entry.type == tarfile.DIRTYPE else 0o644
            tar.addfile(info, io.BytesIO(entry.data) if entry.data else None)
    raw = buffer.getvalue()
    if compression == "gzip":
        return gzip.compress(raw)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


def leftovers(parent: Path) -> list[str]:
    return sorted(os.listdir(parent))


# ---------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize(("annotations", "expected"), [
    ({CNCF_PATH: "a", CNAI_PATH: "b", TITLE: "c"}, "a"),
    ({CNAI_PATH: "b", TITLE: "c"}, "b"),
    ({TITLE: "c"}, "c"),
    ({"other": "d"}, None),
])
def test_layer_file_path_precedence(annotations: dict, expected: str | None) -> None:
    assert layer_file_path({"annotations": annotations}) == expected


def test_each_annotation_key_places_the_file(store: FakeStore, trees: Path) -> None:
    layers = [store.descriptor(b"1", WEIGHT_RAW, **{CNCF_PATH: "cncf.bin", TITLE: "ignored"}),
              store.descriptor(b"2", WEIGHT_RAW, **{CNAI_PATH: "cnai.bin", TITLE: "ignored"}),
              store.descriptor(b"3", "application/octet-stream", **{TITLE: "title.bin"})]
    files = build_tree(store.blob_path, manifest_of(*layers), trees / "t")
    assert files == [PurePosixPath("cnai.bin"), PurePosixPath("cncf.bin"),
                     PurePosixPath("title.bin")]


@pytest.mark.parametrize(("name", "expected"), [
    ("a", "a"), ("./a//b/", "a/b"), ("a/./b", "a/b"), (".hidden", ".hidden")])
def test_safe_relative_path_normalises(name: str, expected: str) -> None:
    assert safe_relative_path(name) == PurePosixPath(expected)


@pytest.mark.parametrize("name", [
    "../x", "/etc/passwd", "a/../../x", "a/..", "", ".", "./", "a\0b", "..\\x", "a\\b"])
def test_safe_relative_path_refuses(name: str) -> None:
    with pytest.raises(UnsafePathError, match="unsafe path"):
        safe_relative_path(name)


#: pieces of tricky names: separators, dots, a Windows separator, NUL, non-ASCII
NAME_PIECES = ["a", "b", ".", "..", "/", "\\", "\0", "é", " ", "link", "x"]
names = st.lists(st.sampled_from(NAME_PIECES), max_size=15).map("".join)


@given(names)
def test_accepted_paths_stay_under_the_root(name: str) -> None:
    root = Path("/srv/root")
    try:
        relative = safe_relative_path(name)
    except UnsafePathError:
        return
    joined = os.path.normpath(root / relative)
    assert os.path.commonpath([joined, str(root)]) == str(root)
    assert joined != str(root)


@given(name=names)
def test_safe_join_never_leaves_a_root_with_symlinks(tmp_path_factory: pytest.TempPathFactory,
                                                      name: str) -> None:
    base = tmp_path_factory.getbasetemp() / "safe_join"
    root = base / "root"
    if not root.exists():
        (root / "x").mkdir(parents=True)
        (base / "outside").mkdir()
        (root / "link").symlink_to("../outside")
        (root / "x" / "link").symlink_to("..")
    try:
        joined = safe_join(root, name)
    except UnsafePathError:
        return
    real_root = os.path.realpath(root)
    real_parent = os.path.realpath(joined.parent)
    assert os.path.commonpath([real_root, real_parent]) == real_root


def test_safe_join_refuses_an_escaping_symlink(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "inner").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "out").symlink_to(tmp_path / "outside")
    (root / "in").symlink_to("inner")
    assert safe_join(root, "in/x") == root / "in" / "x"
    with pytest.raises(UnsafePathError, match="out/x"):
        safe_join(root, "out/x")


# ---------------------------------------------------------------------------------------------
# raw files


def test_raw_layers_are_hard_links_at_their_paths(store: FakeStore, trees: Path) -> None:
    weights = store.file("model.safetensors", b"weights")
    nested = store.file("a/b/c.bin", b"nested", "application/vnd.cncf.model.doc.v1.raw")
    tree = trees / "t"
    files = build_tree(store.blob_path, manifest_of(weights, nested), tree)
    assert files == [PurePosixPath("a/b/c.bin"), PurePosixPath("model.safetensors")]
    for descriptor, name in ((weights, "model.safetensors"), (nested, "a/b/c.bin")):
        placed = os.stat(tree / name)
        assert placed.st_ino == os.stat(store.blob_path(descriptor["digest"])).st_ino
        assert stat.S_IMODE(placed.st_mode) == 0o444
    assert leftovers(trees) == ["t"]


def test_copy_when_the_file_system_will_not_link(store: FakeStore, trees: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse_link(source: Path, target: Path) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(materialise.os, "link", refuse_link)
    layer = store.file("w.bin", b"copied")
    build_tree(store.blob_path, manifest_of(layer), trees / "t")
    copy = trees / "t" / "w.bin"
    assert copy.read_bytes() == b"copied"
    assert os.stat(copy).st_ino != os.stat(store.blob_path(layer["digest"])).st_ino
    assert stat.S_IMODE(os.stat(copy).st_mode) == materialise.READ_ONLY
    assert leftovers(trees / "t") == ["w.bin"]


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "", "a\\..\\..\\x"])
def test_unsafe_file_path_publishes_nothing(store: FakeStore, trees: Path, name: str) -> None:
    layers = [store.file("good.bin", b"good"), store.file(name, b"evil")]
    with pytest.raises(UnsafePathError, match=layers[1]["digest"]):
        build_tree(store.blob_path, manifest_of(*layers), trees / "t")
    assert leftovers(trees) == []


def test_two_layers_with_one_path_are_refused(store: FakeStore, trees: Path) -> None:
    layers = [store.file("w.bin", b"one"), store.file("./w.bin", b"two")]
    with pytest.raises(StoreError, match="w.bin"):
        build_tree(store.blob_path, manifest_of(*layers), trees / "t")
    assert leftovers(trees) == []


def test_layer_saying_nowhere_is_refused(store: FakeStore, trees: Path) -> None:
    layer = store.descriptor(b"who knows", "application/octet-stream")
    with pytest.raises(StoreError, match=layer["digest"]):
        build_tree(store.blob_path, manifest_of(layer), trees / "t")
    assert leftovers(trees) == []


def test_an_index_is_refused(store: FakeStore, trees: Path) -> None:
    index = {"schemaVersion": 2, "manifests": []}
    with pytest.raises(StoreError, match="index"):
        build_tree(store.blob_path, index, trees / "t")


def test_an_existing_tree_is_returned_as_is(store: FakeStore, trees: Path) -> None:
    manifest = manifest_of(store.file("w.bin", b"w"))
    first = build_tree(store.blob_path, manifest, trees / "t")

    def no_blobs(digest: str) -> Path:
        raise AssertionError("an existing tree must not be rebuilt")

    assert build_tree(no_blobs, manifest, trees / "t") == first


# ---------------------------------------------------------------------------------------------
# archives


@pytest.mark.parametrize(("media_type", "compression"), [
    (WEIGHT_TAR, "tar"), (WEIGHT_TAR + "+gzip", "gzip"), (WEIGHT_TAR + "+zstd", "zstd")])
def test_modelpack_archives_unpack(store: FakeStore, trees: Path, media_type: str,
                                   compression: str) -> None:
    archive = make_tar(directory("weights"), file("weights/w.bin", b"w"), file("top.txt", b"t"),
                       compression=compression)
    layer = store.descriptor(archive, media_type, **{CNCF_PATH: "weights"})
    files = build_tree(store.blob_path, manifest_of(layer), trees / "t")
    assert files == [PurePosixPath("top.txt"), PurePosixPath("weights/w.bin")]
    assert (trees / "t" / "weights" / "w.bin").read_bytes() == b"w"


def test_zstd_archive_of_several_frames_unpacks(store: FakeStore, trees: Path) -> None:
    raw = make_tar(file("a", b"A" * 5000), file("b", b"B" * 5000))
    half = len(raw) // 2
    compressor = zstandard.ZstdCompressor()
    archive = compressor.compress(raw[:half]) + compressor.compress(raw[half:])
    layer = store.descriptor(archive, OCI_LAYER + "+zstd")
    build_tree(store.blob_path, manifest_of(layer), trees / "t")
    assert (trees / "t" / "b").read_bytes() == b"B" * 5000


def test_oras_file_with_tar_media_type_stays_a_file(store: FakeStore, trees: Path) -> None:
    layer = store.descriptor(b"not a tar", OCI_LAYER, **{TITLE: "model.gguf"})
    build_tree(store.blob_path, manifest_of(layer), trees / "t")
    assert (trees / "t" / "model.gguf").read_bytes() == b"not a tar"


@pytest.mark.parametrize("annotations", [
    {TITLE: "dir"},
    {TITLE: "dir", materialise.ORAS_UNPACK_ANNOTATION: "true"},
])
def test_oras_directory_unpacks(store: FakeStore, trees: Path, annotations: dict) -> None:
    archive = make_tar(directory("dir"), file("dir/f.txt", b"f"), compression="gzip")
    layer = store.descriptor(archive, materialise.ORAS_DIRECTORY_MEDIA_TYPE, **annotations)
    assert build_tree(store.blob_path, manifest_of(layer), trees / "t") == [
        PurePosixPath("dir/f.txt")]


def test_unpack_annotation_false_keeps_the_file(store: FakeStore, trees: Path) -> None:
    archive = make_tar(file("f.txt"), compression="gzip")
    layer = store.descriptor(archive, materialise.ORAS_DIRECTORY_MEDIA_TYPE,
                             **{TITLE: "f.tgz", materialise.ORAS_UNPACK_ANNOTATION: "false"})
    assert build_tree(store.blob_path, manifest_of(layer), trees / "t") == [
        PurePosixPath("f.tgz")]


def test_classify_layer() -> None:
    digest = "sha256:" + "a" * 64
    assert classify_layer({"digest": digest, "mediaType": DOCKER_LAYER}).kind is \
        materialise.LayerKind.ROOTFS
    assert classify_layer({"digest": digest, "mediaType": WEIGHT_TAR + "+zstd"}).compression is \
        materialise.Compression.ZSTD
    with pytest.raises(UnsafePathError, match="digest"):
        classify_layer({"digest": "sha256:../../etc", "mediaType": DOCKER_LAYER})


UNSAFE_ARCHIVES = {
    "dot-dot": (OCI_LAYER, [file("../evil")], "../evil"),
    "absolute": (OCI_LAYER, [file("/tmp/evil")], "/tmp/evil"),
    "symlink-out-then-write": (WEIGHT_TAR, [symlink("link", "../../outside"),
                                            file("link/evil")], "link"),
    "image-symlink-out-then-write": (OCI_LAYER, [symlink("link", "../../outside"),
                                                 file("link/evil")], "link"),
    "absolute-symlink-in-model": (WEIGHT_TAR, [symlink("link", "/tmp"), file("link/evil")], "link"),
    "hard-link-to-passwd": (OCI_LAYER, [hardlink("passwd", "/etc/passwd")], "passwd"),
    "hard-link-up": (WEIGHT_TAR, [hardlink("passwd", "../../../etc/passwd")], "passwd"),
    "hard-link-to-unwritten": (WEIGHT_TAR, [hardlink("h", "missing")], "h"),
    "char-device": (OCI_LAYER, [Entry("dev/null", type=tarfile.CHRTYPE)], "dev/null"),
    "fifo": (OCI_LAYER, [Entry("pipe", type=tarfile.FIFOTYPE)], "pipe"),
}


@pytest.mark.parametrize("case", UNSAFE_ARCHIVES)
def test_unsafe_archive_members_are_refused(store: FakeStore, tmp_path: Path, trees: Path,
                                            case: str) -> None:
    media_type, entries, member = UNSAFE_ARCHIVES[case]
    outside = tmp_path / "outside"
    outside.mkdir()
    layer = store.descriptor(make_tar(file("fine.txt"), *entries), media_type)
    with pytest.raises(UnsafePathError, match=member.replace(".", r"\.")) as raised:
        build_tree(store.blob_path, manifest_of(layer), trees / "t")
    assert layer["digest"] in str(raised.value)
    assert leftovers(trees) == []
    assert leftovers(outside) == []


def test_image_absolute_symlink_points_into_the_tree(store: FakeStore, trees: Path) -> None:
    archive = make_tar(file("usr/bin/tool", b"#!"), symlink("etc/alt/tool", "/usr/bin/tool"),
                       symlink("bin", "usr/bin"), file("bin/more", b"m"))
    build_tree(store.blob_path, manifest_of(store.descriptor(archive, OCI_LAYER)), trees / "t")
    tree = trees / "t"
    assert os.readlink(tree / "etc" / "alt" / "tool") == "../../usr/bin/tool"
    assert (tree / "etc" / "alt" / "tool").read_bytes() == b"#!"
    assert (tree / "usr" / "bin" / "more").read_bytes() == b"m"


def test_hard_links_within_an_archive(store: FakeStore, trees: Path) -> None:
    archive = make_tar(file("a", b"same"), hardlink("b", "a"))
    build_tree(store.blob_path, manifest_of(store.descriptor(archive, OCI_LAYER)), trees / "t")
    assert os.stat(trees / "t" / "a").st_ino == os.stat(trees / "t" / "b").st_ino


def test_image_layers_apply_in_order_with_whiteouts(store: FakeStore, trees: Path) -> None:
    lower = make_tar(file("a/x", b"x"), file("a/y", b"y"), file("b/old", b"o"),
                     file("b/sub/deep", b"d"), file("c/keep", b"k"), file("over", b"lower"),
                     compression="gzip")
    upper = make_tar(file("a/.wh.x"), file("b/new", b"n"), file("b/sub/fresh", b"f"),
                     file("b/.wh..wh..opq"), file(".wh.c"), file("over", b"upper"),
                     compression="gzip")
    layers = [store.descriptor(lower, DOCKER_LAYER), store.descriptor(upper, DOCKER_LAYER)]
    files = build_tree(store.blob_path, manifest_of(*layers), trees / "t")
    assert files == [PurePosixPath(name) for name in ("a/y", "b/new", "b/sub/fresh", "over")]
    assert (trees / "t" / "over").read_bytes() == b"upper"


def test_image_layer_replaces_a_store_linked_file_without_writing_to_it(
        store: FakeStore, trees: Path) -> None:
    raw = store.file("shared.bin", b"store bytes")
    upper = store.descriptor(make_tar(file("shared.bin", b"new")), OCI_LAYER)
    build_tree(store.blob_path, manifest_of(raw, upper), trees / "t")
    assert (trees / "t" / "shared.bin").read_bytes() == b"new"
    assert store.blob_path(raw["digest"]).read_bytes() == b"store bytes"


def test_model_archive_may_not_overwrite_another_layer(store: FakeStore, trees: Path) -> None:
    raw = store.file("w.bin", b"raw")
    archive = store.descriptor(make_tar(file("w.bin", b"tar")), WEIGHT_TAR, **{CNCF_PATH: "w"})
    with pytest.raises(StoreError, match="w.bin"):
        build_tree(store.blob_path, manifest_of(raw, archive), trees / "t")
    assert store.blob_path(raw["digest"]).read_bytes() == b"raw"
    assert leftovers(trees) == []


def test_corrupt_archive_is_a_store_error(store: FakeStore, trees: Path) -> None:
    layer = store.descriptor(b"not gzip at all", DOCKER_LAYER)
    with pytest.raises(StoreError, match="not a valid gzip tar archive"):
        build_tree(store.blob_path, manifest_of(layer), trees / "t")
    assert leftovers(trees) == []


# ---------------------------------------------------------------------------------------------
# publishing


def two_trees(store: FakeStore, trees: Path) -> tuple[Path, Path]:
    v1, v2 = trees / "v1", trees / "v2"
    build_tree(store.blob_path, manifest_of(store.file("w.bin", b"one")), v1)
    build_tree(store.blob_path, manifest_of(store.file("w.bin", b"two")), v2)
    return v1, v2


def test_publish_link_swaps_versions_atomically(store: FakeStore, trees: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    v1, v2 = two_trees(store, trees)
    out = tmp_path / "out" / "model"
    publish_link(v1, out, force=False)
    assert (out / "w.bin").read_bytes() == b"one"

    seen_at_swap = []
    real_replace = os.replace

    def observing_replace(source: Path, target: Path) -> None:
        seen_at_swap.append((out / "w.bin").read_bytes())
        real_replace(source, target)

    monkeypatch.setattr(materialise.os, "replace", observing_replace)
    publish_link(v2, out, force=False)
    assert seen_at_swap == [b"one"]  # the old version stays visible until the one rename
    assert os.readlink(out) == str(v2.absolute())
    assert (out / "w.bin").read_bytes() == b"two"
    assert (v1 / "w.bin").read_bytes() == b"one"
    assert leftovers(out.parent) == ["model"]


def test_publish_link_over_an_empty_directory(store: FakeStore, trees: Path,
                                              tmp_path: Path) -> None:
    v1, _ = two_trees(store, trees)
    out = tmp_path / "out"
    out.mkdir()
    publish_link(v1, out, force=False)
    assert out.is_symlink()


def test_publish_link_refuses_a_directory_unless_forced(store: FakeStore, trees: Path,
                                                       tmp_path: Path) -> None:
    v1, _ = two_trees(store, trees)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(StoreError, match="--force"):
        publish_link(v1, out, force=False)
    assert (out / "mine.txt").read_text() == "user data"
    publish_link(v1, out, force=True)
    assert os.readlink(out) == str(v1.absolute())
    assert leftovers(tmp_path) == ["data", "out", "trees"]


def test_publish_link_refuses_a_file(store: FakeStore, trees: Path, tmp_path: Path) -> None:
    v1, _ = two_trees(store, trees)
    out = tmp_path / "out"
    out.write_text("a file")
    for force in (False, True):
        with pytest.raises(StoreError, match="not a directory"):
            publish_link(v1, out, force=force)
    assert out.read_text() == "a file"


# ---------------------------------------------------------------------------------------------
# OCI image layout


@dataclass(frozen=True)
class Image:
    manifest_bytes: bytes
    digest: str
    media_type: str
    blobs: list[str]


def make_image(store: FakeStore, content: bytes, *, docker: bool = False) -> Image:
    layer_tar = make_tar(file("etc/hello", content))
    layer = gzip.compress(layer_tar, mtime=0)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]},
    }).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": store.descriptor(config, DOCKER_CONFIG if docker else OCI_CONFIG),
        "layers": [store.descriptor(layer, DOCKER_LAYER if docker else OCI_LAYER + "+gzip")],
    }
    manifest_bytes = json.dumps(manifest, indent=3).encode()
    return Image(manifest_bytes, "sha256:" + hashlib.sha256(manifest_bytes).hexdigest(),
                 manifest["mediaType"],
                 [manifest["config"]["digest"], manifest["layers"][0]["digest"]])


def write(store: FakeStore, image: Image, out: Path, tag: str | None) -> None:
    write_oci_layout(store.blob_path, image.manifest_bytes, image.digest, image.media_type,
                     out, tag)


def skopeo_copy(layout: Path, tag: str, destination: Path) -> None:
    subprocess.run([SKOPEO, "--insecure-policy", "copy", "--quiet", f"oci:{layout}:{tag}",
                    f"dir:{destination}"], check=True, capture_output=True, timeout=60)


def assert_copied(store: FakeStore, image: Image, copied: Path) -> None:
    assert (copied / "manifest.json").read_bytes() == image.manifest_bytes
    for digest in image.blobs:
        hex_part = digest.partition(":")[2]
        assert (copied / hex_part).read_bytes() == store.blob_path(digest).read_bytes()


def make_model(store: FakeStore, content: bytes) -> Image:
    config = json.dumps({"descriptor": {"name": "m"},
                         "modelfs": {"type": "layers", "diffIds": []}}).encode()
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.cncf.model.manifest.v1+json",
        "config": store.descriptor(config, MODEL_CONFIG),
        "layers": [store.file("w.bin", content)],
    }
    manifest_bytes = json.dumps(manifest).encode()
    return Image(manifest_bytes, "sha256:" + hashlib.sha256(manifest_bytes).hexdigest(),
                 OCI_MANIFEST, [manifest["config"]["digest"], manifest["layers"][0]["digest"]])


@needs_skopeo
@pytest.mark.parametrize("make", [make_image, make_model], ids=["image", "modelpack"])
def test_oci_layout_is_read_by_skopeo(store: FakeStore, tmp_path: Path, make) -> None:
    image = make(store, b"hello")
    layout = tmp_path / "layout"
    write(store, image, layout, "v1")
    assert json.loads((layout / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    layer = image.blobs[1]
    assert os.stat(layout / "blobs" / "sha256" / layer.partition(":")[2]).st_ino == \
        os.stat(store.blob_path(layer)).st_ino
    skopeo_copy(layout, "v1", tmp_path / "copied")
    assert_copied(store, image, tmp_path / "copied")


def test_docker_manifest_is_written_as_it_is(store: FakeStore, tmp_path: Path) -> None:
    # skopeo 1.9 looks tags up only on OCI media types, so this one is checked by hand
    image = make_image(store, b"hello", docker=True)
    layout = tmp_path / "layout"
    write(store, image, layout, "v1")
    index = json.loads((layout / "index.json").read_bytes())
    assert index["manifests"] == [{
        "mediaType": DOCKER_MANIFEST, "digest": image.digest, "size": len(image.manifest_bytes),
        "annotations": {materialise.REF_NAME_ANNOTATION: "v1"}}]
    blobs = layout / "blobs" / "sha256"
    assert (blobs / image.digest.partition(":")[2]).read_bytes() == image.manifest_bytes
    for digest in image.blobs:
        assert (blobs / digest.partition(":")[2]).read_bytes() == \
            store.blob_path(digest).read_bytes()


@needs_skopeo
def test_oci_layout_gets_a_second_tag(store: FakeStore, tmp_path: Path) -> None:
    first, second, third = (make_image(store, content) for content in (b"1", b"2", b"3"))
    layout = tmp_path / "layout"
    write(store, first, layout, "v1")
    write(store, second, layout, "v2")
    write(store, third, layout, "v1")  # moves the tag
    index = json.loads((layout / "index.json").read_bytes())
    tags = {entry["annotations"][materialise.REF_NAME_ANNOTATION]: entry["digest"]
            for entry in index["manifests"]}
    assert tags == {"v1": third.digest, "v2": second.digest}
    skopeo_copy(layout, "v1", tmp_path / "v1")
    skopeo_copy(layout, "v2", tmp_path / "v2")
    assert_copied(store, third, tmp_path / "v1")
    assert_copied(store, second, tmp_path / "v2")


def test_oci_layout_untagged_entry_is_not_duplicated(store: FakeStore, tmp_path: Path) -> None:
    image = make_image(store, b"x")
    write(store, image, tmp_path / "layout", None)
    write(store, image, tmp_path / "layout", None)
    index = json.loads((tmp_path / "layout" / "index.json").read_bytes())
    assert [entry["digest"] for entry in index["manifests"]] == [image.digest]


def test_oci_layout_refuses_mismatched_manifest_bytes(store: FakeStore, tmp_path: Path) -> None:
    image = make_image(store, b"x")
    with pytest.raises(IntegrityError):
        write_oci_layout(store.blob_path, image.manifest_bytes + b" ", image.digest,
                         image.media_type, tmp_path / "layout", "v1")
    assert not (tmp_path / "layout").exists()


def test_oci_layout_refuses_another_directory(store: FakeStore, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(StoreError, match="not an OCI layout"):
        write(store, make_image(store, b"x"), out, "v1")
    assert leftovers(out) == ["mine.txt"]

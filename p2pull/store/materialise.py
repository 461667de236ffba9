"""Materialise a manifest's verified blobs as files the user can open.

Three products, all made from blobs the store has already verified (``blob_path(digest)``
names a complete, read-only file):

- ``build_tree`` lays out the files of a manifest in a new directory, built under a temporary
  sibling name and renamed into place, so a half-built tree never shows under its final name.
- ``publish_link`` points the user's output directory at a tree by an atomic symlink swap, so
  switching versions is one ``rename(2)``.
- ``write_oci_layout`` writes (or adds to) an OCI image layout, for ``skopeo copy oci:DIR:TAG``
  and other layout readers.

Every name that comes from an artifact (path annotation, tar member, link target, digest) is
checked before it touches the disk; a name that would escape its directory raises
UnsafePathError naming it. OSError is mapped to StoreError (DiskFullError when the disk is
full) at each public function.

How a layer becomes files (``classify_layer``):

- A layer with a file path annotation (``FILEPATH_ANNOTATIONS``) is one file at that path,
  hard-linked from the store, except: a ModelPack layer whose media type names a tar
  (``application/vnd.cncf.model.weight.v1.tar+zstd``) is unpacked, and so is an ORAS directory
  (annotation ``io.deis.oras.content.unpack: "true"``, or oras-py's directory media type
  without it). Media type alone does not decide for ORAS: ``oras push`` labels plain files
  ``application/vnd.oci.image.layer.v1.tar``, and ``oras pull`` writes them as they are.
- A layer without one is unpacked when its media type names a tar (``.tar``, ``+gzip``,
  ``.gzip``, ``+zstd``); image layers (OCI or Docker rootfs media types) are applied in order
  over the earlier ones, with OCI whiteouts. Any other layer is an error naming its digest:
  a model artifact must say where each file goes.

Synchronous file I/O only: the caller runs these functions in a worker thread.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import json
import os
import posixpath
import secrets
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import zstandard

from p2pull.core.refs import validate_digest
from p2pull.errors import DiskFullError, IntegrityError, RefError, StoreError, UnsafePathError

#: maps a digest ``sha256:<hex>`` to its complete, verified, read-only file in the store
BlobPath = Callable[[str], Path]

#: where a layer's file goes, most authoritative first: ModelPack, older ModelPack, ORAS
FILEPATH_ANNOTATIONS = (
    "org.cncf.model.filepath",
    "org.cnai.model.filepath",
    "org.opencontainers.image.title",
)
#: oras-go marks a layer holding a tarred directory with this annotation set to "true"
ORAS_UNPACK_ANNOTATION = "io.deis.oras.content.unpack"
#: the media type ORAS gives a pushed directory; oras-py unpacks it without the annotation
ORAS_DIRECTORY_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
#: ModelPack media types say by their suffix whether a layer is a raw file or a tar
MODELPACK_MEDIA_TYPE_PREFIXES = ("application/vnd.cncf.model.", "application/vnd.cnai.model.")
#: container image filesystem layers: applied over the earlier ones, whiteouts honoured
ROOTFS_MEDIA_TYPE_PREFIXES = (
    "application/vnd.oci.image.layer.",
    "application/vnd.docker.image.rootfs.",
)

#: OCI image layout, image-spec ``image-layout.md``
OCI_LAYOUT_FILE = "oci-layout"
OCI_LAYOUT_VERSION = "1.0.0"
OCI_INDEX_FILE = "index.json"
OCI_INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

#: OCI whiteouts, image-spec ``layer.md``: ``.wh.NAME`` hides NAME of the layers below
WHITEOUT_PREFIX = ".wh."
#: hides everything the layers below put in its directory
OPAQUE_WHITEOUT = ".wh..wh..opq"
#: other ``.wh..wh.`` names are reserved (aufs bookkeeping) and skipped
RESERVED_WHITEOUT_PREFIX = ".wh..wh."

#: the mode of blob copies, like the store's own files
READ_ONLY = 0o444
#: os.link errors that mean "this file system will not link here": copy instead.
#: EXDEV: another file system; EPERM: no hard links (FAT, some FUSE) or protected_hardlinks;
#: EMLINK: the inode has reached its link limit (65000 on ext4)
LINK_FALLBACK_ERRNOS = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK})
#: errors that mean the disk is full, reported as DiskFullError
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: random bytes in temporary names, so concurrent writers never collide
TEMPORARY_TOKEN_BYTES = 8


class Compression(enum.Enum):
    """How a tar layer is compressed, read from its media type."""

    NONE = "tar"
    GZIP = "gzip"
    ZSTD = "zstd"


#: media type suffix -> compression of a tar layer; anything else is not an archive
ARCHIVE_SUFFIXES = (
    (".tar", Compression.NONE),
    ("+gzip", Compression.GZIP),
    (".gzip", Compression.GZIP),
    ("+zstd", Compression.ZSTD),
)
#: tarfile stream modes: layers are read once, front to back, however large
_TAR_STREAM_MODES = {Compression.NONE: "r|", Compression.GZIP: "r|gz", Compression.ZSTD: "r|"}
#: read and copy size when unpacking; tarfile's defaults (10 and 16 KiB) unpack a 512 MiB tar
#: at about 260 MiB/s here, 1 MiB at about 590 MiB/s
TAR_BUFFER_SIZE = 1 << 20
#: tarfile error level 2: ExtractError (such as an unresolvable link) raises, not just logs
_TAR_ERRORLEVEL = 2


class LayerKind(enum.Enum):
    FILE = "file"        # one file, linked from the store at its annotated path
    ARCHIVE = "archive"  # a tar unpacked into the tree; may not overwrite other layers' files
    ROOTFS = "rootfs"    # an image layer: overwrites earlier layers, honours whiteouts


@dataclass(frozen=True)
class Layer:
    """What one layer descriptor turns into."""

    digest: str
    kind: LayerKind
    path: PurePosixPath | None = None      # FILE: where it goes, already checked safe
    compression: Compression | None = None  # ARCHIVE and ROOTFS: how to read the tar


# ---------------------------------------------------------------------------------------------
# names


def layer_file_path(descriptor: dict) -> str | None:
    """The file path a layer descriptor annotates, by ``FILEPATH_ANNOTATIONS`` precedence;
    None when it has none. The name is not checked here: see ``safe_relative_path``."""
    annotations = descriptor.get("annotations") or {}
    for key in FILEPATH_ANNOTATIONS:
        if key in annotations:
            value = annotations[key]
            if not isinstance(value, str):
                raise StoreError(f"layer {descriptor.get('digest')}: annotation {key} is not a "
                                 f"string: {value!r}")
            return value
    return None


def safe_relative_path(name: str) -> PurePosixPath:
    """``name`` as a normalised relative path (``./a//b`` -> ``a/b``); raise UnsafePathError
    naming it when it is empty, absolute, has a ``..`` component, a NUL byte, or a backslash
    (a Windows client means a separator by it). Joined under any root, the result stays under
    that root as long as no symlink inside the root leads out (``safe_join`` checks that)."""
    if "\\" in name:
        raise UnsafePathError(f"unsafe path {name!r}: contains a backslash")
    return _relative_path(name)


def safe_join(root: Path, name: str) -> Path:
    """``root / safe_relative_path(name)``, refusing with UnsafePathError when a symlink that
    already exists under ``root`` would lead the result's parent outside ``root``. The last
    component is not followed: callers replace what stands there, never write through it."""
    return _join_inside(root, safe_relative_path(name), name)


def _relative_path(name: str) -> PurePosixPath:
    """The checks every artifact name gets. Tar member names skip only the backslash rule of
    ``safe_relative_path``: in a POSIX tar a backslash is an ordinary character."""
    path = PurePosixPath(name)
    if "\0" in name:
        reason = "contains a NUL byte"
    elif path.is_absolute():
        reason = "is absolute"
    elif ".." in path.parts:
        reason = "has a '..' component"
    elif path == PurePosixPath("."):
        reason = "names no file"
    else:
        return path
    raise UnsafePathError(f"unsafe path {name!r}: {reason}")


def _join_inside(root: Path, relative: PurePosixPath, name: str) -> Path:
    target = root / relative
    real_root = os.path.realpath(root)
    real_parent = os.path.realpath(target.parent)
    if os.path.commonpath([real_root, real_parent]) != real_root:
        raise UnsafePathError(f"unsafe path {name!r}: a symlink leads it to {real_parent}, "
                              f"outside {root}")
    return target


def _digest_hex(digest: object) -> str:
    """The hex part of a sha256 digest from a manifest, which becomes a file name."""
    if not isinstance(digest, str):
        raise UnsafePathError(f"descriptor digest {digest!r} is not a string")
    try:
        validate_digest(digest)
    except RefError as exc:
        raise UnsafePathError(f"descriptor digest: {exc}") from exc
    return digest.partition(":")[2]


# ---------------------------------------------------------------------------------------------
# layer kinds


def archive_compression(media_type: str) -> Compression | None:
    """The compression of a tar layer by its media type suffix; None if not a tar."""
    for suffix, compression in ARCHIVE_SUFFIXES:
        if media_type.endswith(suffix):
            return compression
    return None


def classify_layer(descriptor: dict) -> Layer:
    """Decide what a layer descriptor becomes (module docstring has the rules). Raises
    UnsafePathError for a bad digest or file path, StoreError for a layer that says neither
    where its file goes nor that it is an archive."""
    digest = descriptor.get("digest")
    _digest_hex(digest)
    media_type = descriptor.get("mediaType", "")
    if not isinstance(media_type, str):
        raise StoreError(f"layer {digest}: mediaType is not a string: {media_type!r}")
    compression = archive_compression(media_type)
    name = layer_file_path(descriptor)
    if name is not None:
        if media_type.startswith(MODELPACK_MEDIA_TYPE_PREFIXES):
            unpack = compression is not None
        else:
            annotations = descriptor.get("annotations") or {}
            default = "true" if media_type == ORAS_DIRECTORY_MEDIA_TYPE else "false"
            unpack = annotations.get(ORAS_UNPACK_ANNOTATION, default) == "true"
        if not unpack:
            try:
                path = safe_relative_path(name)
            except UnsafePathError as exc:
                raise UnsafePathError(f"layer {digest}: {exc}") from exc
            return Layer(digest, LayerKind.FILE, path=path)
        if compression is None:
            raise StoreError(f"layer {digest} is marked for unpacking but its media type "
                             f"{media_type!r} is not a tar")
        return Layer(digest, LayerKind.ARCHIVE, compression=compression)
    if compression is None:
        raise StoreError(f"layer {digest} ({media_type or 'no media type'}) has no file path "
                         f"annotation ({', '.join(FILEPATH_ANNOTATIONS)}) and is not a tar "
                         "archive, so there is no telling where its file goes")
    if media_type.startswith(ROOTFS_MEDIA_TYPE_PREFIXES):
        return Layer(digest, LayerKind.ROOTFS, compression=compression)
    return Layer(digest, LayerKind.ARCHIVE, compression=compression)


def _manifest_layers(manifest: dict) -> list[dict]:
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
        raise StoreError("manifest has no list of layers (an index must be resolved to one "
                         "platform's manifest first)")
    return layers


# ---------------------------------------------------------------------------------------------
# the tree


def build_tree(blob_path: BlobPath, manifest: dict, tree_dir: Path) -> list[PurePosixPath]:
    """Lay out the files of ``manifest`` (an OCI image manifest or Docker schema 2 manifest)
    in the new directory ``tree_dir``, layers in manifest order, and return the relative paths
    of the files and symlinks in it, sorted.

    The tree is built as ``<tree_dir>.tmp-<random>`` and renamed into place, so nothing shows
    under ``tree_dir`` unless the whole tree was built; on any error the temporary directory
    is deleted. An existing ``tree_dir`` is taken as already built and only listed. Files of
    FILE layers are hard links of the store's read-only blobs (copies where the file system
    will not link): never write to them. Two layers writing one path raise StoreError, except
    that image layers overwrite the layers below them."""
    if tree_dir.is_dir():
        return _list_files(tree_dir)
    layers = [classify_layer(descriptor) for descriptor in _manifest_layers(manifest)]
    building = tree_dir.with_name(f"{tree_dir.name}.tmp-{_token()}")
    try:
        tree_dir.parent.mkdir(parents=True, exist_ok=True)
        building.mkdir()
        for layer in layers:
            try:
                if layer.kind is LayerKind.FILE:
                    _place_file(blob_path, layer, building)
                else:
                    _Unpacker(building, layer).unpack(blob_path(layer.digest))
            except UnsafePathError as exc:
                raise UnsafePathError(f"layer {layer.digest}: {exc}") from exc
        _rename_tree(building, tree_dir)
    except OSError as exc:
        raise _store_error(f"could not build {tree_dir}", exc) from exc
    finally:
        if os.path.lexists(building):
            shutil.rmtree(building)
    return _list_files(tree_dir)


def _rename_tree(building: Path, tree_dir: Path) -> None:
    try:
        os.rename(building, tree_dir)
    except OSError:
        if not tree_dir.is_dir():
            raise
        # another builder of the same manifest finished first; its tree has the same files


def _place_file(blob_path: BlobPath, layer: Layer, root: Path) -> None:
    assert layer.path is not None  # classify_layer sets it for every FILE layer
    target = _join_inside(root, layer.path, str(layer.path))
    if os.path.lexists(target):
        raise StoreError(f"layer {layer.digest} writes {layer.path}, which an earlier layer "
                         "already wrote")
    target.parent.mkdir(parents=True, exist_ok=True)
    _link_or_copy(blob_path(layer.digest), target)


def _list_files(tree: Path) -> list[PurePosixPath]:
    files = []
    for directory, subdirectories, names in os.walk(tree):
        base = PurePosixPath(os.path.relpath(directory, tree))
        linked = [name for name in subdirectories if os.path.islink(os.path.join(directory, name))]
        files.extend(base / name for name in names + linked)
    return sorted(files)


class _Unpacker:
    """Unpacks one tar layer into a tree, member by member, as the stream goes by.

    Each member is checked before it is written: its name (``_relative_path``), its type (no
    devices, FIFOs or unknown types), its parent (``_join_inside``), a symlink's target (must
    stay in the tree; an image layer's absolute target is made relative, since it means the
    image's own root), a hard link's target (must be a regular file written earlier by this
    same archive, so tar's chmod of it can never reach a store blob), and then tarfile's
    ``data`` filter. What stands at a member's path is removed first, never written through.
    As that filter does, ownership and directory modes are dropped and file modes limited to
    0755 (owner-writable): the tree holds data, not a root file system to run."""

    def __init__(self, root: Path, layer: Layer) -> None:
        self.root = root
        self.layer = layer
        #: paths this archive wrote, with their parents: whiteouts never hide them
        self.created: set[PurePosixPath] = set()
        #: paths where this archive last wrote a regular file: the only hard link targets
        self.regular: set[PurePosixPath] = set()

    def unpack(self, source: Path) -> None:
        compression = self.layer.compression
        assert compression is not None  # classify_layer sets it for every archive
        try:
            with _open_tar(source, compression) as tar:
                for member in tar:
                    self._apply(tar, member)
        except (tarfile.TarError, zstandard.ZstdError) as exc:
            raise StoreError(f"layer {self.layer.digest} is not a valid {compression.value} "
                             f"tar archive: {exc}") from exc

    def _apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        if member.isdir() and PurePosixPath(member.name) == PurePosixPath("."):
            return  # the archive's own root: the tree root is ours
        relative = _relative_path(member.name)
        if self.layer.kind is LayerKind.ROOTFS and relative.name.startswith(WHITEOUT_PREFIX):
            self._whiteout(member.name, relative)
            return
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise UnsafePathError(f"unsafe member {member.name!r}: a device, FIFO or file of "
                                  "unknown type")
        target = _join_inside(self.root, relative, member.name)
        if member.issym():
            member = self._checked_symlink(member, relative)
        elif member.islnk():
            self._check_hard_link(member, relative)
        try:
            member = tarfile.data_filter(member, str(self.root))
        except tarfile.FilterError as exc:
            raise UnsafePathError(f"unsafe member: {exc}") from exc
        self._make_room(target, relative, member)
        tar.extract(member, self.root, filter="fully_trusted")
        self.created.add(relative)
        self.created.update(parent for parent in relative.parents if parent.parts)
        if member.isreg():
            self.regular.add(relative)
        else:
            self.regular.discard(relative)

    def _checked_symlink(self, member: tarfile.TarInfo,
                         relative: PurePosixPath) -> tarfile.TarInfo:
        link = member.linkname
        if "\0" in link:
            raise UnsafePathError(f"unsafe member {member.name!r}: link target has a NUL byte")
        if self.layer.kind is LayerKind.ROOTFS and link.startswith("/"):
            # an image's absolute link means the image's own root: point it there
            link = posixpath.relpath(posixpath.normpath("/" + link.lstrip("/")),
                                     posixpath.join("/", str(relative.parent)))
            member = member.replace(linkname=link, deep=False)
        if link.startswith("/"):
            raise UnsafePathError(f"unsafe member {member.name!r}: a symlink to the absolute "
                                  f"path {link!r}")
        resolved = posixpath.normpath(posixpath.join(str(relative.parent), link))
        if resolved == ".." or resolved.startswith("../"):
            raise UnsafePathError(f"unsafe member {member.name!r}: a symlink to {link!r}, "
                                  "outside the tree")
        return member

    def _check_hard_link(self, member: tarfile.TarInfo, relative: PurePosixPath) -> None:
        link = _relative_path(member.linkname)
        target = self.root / link
        if (link == relative or link not in self.regular
                or not stat.S_ISREG(os.lstat(target).st_mode)):
            raise UnsafePathError(f"unsafe member {member.name!r}: a hard link to "
                                  f"{member.linkname!r}, which is not a file written earlier "
                                  "by this archive")

    def _make_room(self, target: Path, relative: PurePosixPath, member: tarfile.TarInfo) -> None:
        """Clear the member's path; a directory merges into a directory already there."""
        if not os.path.lexists(target):
            return
        if member.isdir() and target.is_dir() and not target.is_symlink():
            return
        if self.layer.kind is not LayerKind.ROOTFS and relative not in self.created:
            raise StoreError(f"layer {self.layer.digest} writes {relative}, which an earlier "
                             "layer already wrote")
        _remove(target)

    def _whiteout(self, name: str, relative: PurePosixPath) -> None:
        """Apply a whiteout: it hides what the layers below wrote, never this layer's files."""
        if relative.name == OPAQUE_WHITEOUT:
            directory = self.root / relative.parent
            real_root = os.path.realpath(self.root)
            if os.path.commonpath([real_root, os.path.realpath(directory)]) != real_root:
                raise UnsafePathError(f"unsafe member {name!r}: a symlink leads it outside "
                                      "the tree")
            self._clear_lower(directory, relative.parent)
            return
        if relative.name.startswith(RESERVED_WHITEOUT_PREFIX):
            return
        hidden = relative.name[len(WHITEOUT_PREFIX):]
        if hidden in ("", ".", ".."):
            raise UnsafePathError(f"unsafe member {name!r}: a whiteout of no file")
        victim = relative.parent / hidden
        target = _join_inside(self.root, victim, name)
        if victim not in self.created and os.path.lexists(target):
            _remove(target)

    def _clear_lower(self, directory: Path, relative: PurePosixPath) -> None:
        if directory.is_symlink() or not directory.is_dir():
            return
        for entry in os.scandir(directory):
            child = relative / entry.name
            if child not in self.created:
                _remove(Path(entry.path))
            elif entry.is_dir(follow_symlinks=False):
                self._clear_lower(Path(entry.path), child)


@contextlib.contextmanager
def _open_tar(source: Path, compression: Compression) -> Iterator[tarfile.TarFile]:
    with source.open("rb") as raw:
        stream = raw
        if compression is Compression.ZSTD:
            # multi-frame streams (zstd:chunked) are one archive: read across frames
            stream = zstandard.ZstdDecompressor().stream_reader(
                raw, read_across_frames=True, closefd=False)
        with tarfile.open(fileobj=stream, mode=_TAR_STREAM_MODES[compression],
                          bufsize=TAR_BUFFER_SIZE, copybufsize=TAR_BUFFER_SIZE,
                          errorlevel=_TAR_ERRORLEVEL) as tar:
            yield tar


def _remove(path: Path) -> None:
    """Delete a file, symlink or directory tree, never following a symlink."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# ---------------------------------------------------------------------------------------------
# publishing


def publish_link(tree_dir: Path, out_dir: Path, *, force: bool) -> None:
    """Make ``out_dir`` a symlink to ``tree_dir`` (absolute), swapped in atomically: a link
    made under a temporary sibling name is renamed over ``out_dir``, so a reader sees the old
    version or the new one, never neither. The tree a previous link pointed to is left alone.

    ``out_dir`` may be missing, a symlink (a previous version, or any link: only the link is
    replaced), or an empty directory (removed first). A non-empty directory raises StoreError
    unless ``force``: then it is renamed aside, the link is made, and the old directory and
    everything in it is deleted (renamed back if the link cannot be made). Anything else at
    ``out_dir`` raises StoreError."""
    if not tree_dir.is_dir():
        raise StoreError(f"cannot publish {tree_dir}: it is not a built tree")
    target = tree_dir.absolute()
    try:
        if out_dir.is_symlink() or not os.path.lexists(out_dir):
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            _swap_symlink(target, out_dir)
        elif not out_dir.is_dir():
            raise StoreError(f"{out_dir} exists and is not a directory; choose another -o")
        elif not any(out_dir.iterdir()):
            out_dir.rmdir()
            _swap_symlink(target, out_dir)
        elif not force:
            raise StoreError(f"{out_dir} exists, is not empty and is not a p2pull link; use "
                             "--force to replace it or choose another -o")
        else:
            _replace_directory(target, out_dir)
    except OSError as exc:
        raise _store_error(f"could not publish {tree_dir} at {out_dir}", exc) from exc


def _replace_directory(target: Path, out_dir: Path) -> None:
    aside = out_dir.with_name(f".{out_dir.name}.replaced-{_token()}")
    os.rename(out_dir, aside)
    try:
        _swap_symlink(target, out_dir)
    except Exception:
        os.rename(aside, out_dir)
        raise
    try:
        shutil.rmtree(aside)
    except OSError as exc:
        raise _store_error(f"published {out_dir}, but could not delete the directory it "
                           f"replaced, now at {aside}", exc) from exc


def _swap_symlink(target: Path, link: Path) -> None:
    temporary = link.with_name(f".{link.name}.link-{_token()}")
    os.symlink(target, temporary)
    try:
        os.replace(temporary, link)
    finally:
        if os.path.lexists(temporary):
            temporary.unlink()


# ---------------------------------------------------------------------------------------------
# OCI image layout


def write_oci_layout(blob_path: BlobPath, manifest_bytes: bytes, manifest_digest: str,
                     media_type: str, out_dir: Path, tag: str | None) -> None:
    """Write the manifest, its config and its layers as an OCI image layout in ``out_dir``,
    listed in ``index.json`` under ``tag`` (annotation ``org.opencontainers.image.ref.name``)
    when one is given. ``media_type`` is the manifest's own, copied to the index as is: a
    Docker schema 2 manifest keeps its bytes and digest, but skopeo (1.9) finds entries by tag
    only when they have OCI media types, so it cannot read one back from the layout.

    ``out_dir`` may be missing, empty or already a layout: the manifest is then added to its
    index, replacing the entry of the same tag (or, untagged, an identical untagged entry).
    Blobs are hard links of the store's (copies where the file system will not link) and
    appear under their names only when complete; ``index.json`` is replaced atomically and
    written last, so it never lists a missing blob. Not safe against concurrent writers of
    one layout. Raises IntegrityError if ``manifest_bytes`` do not match
    ``manifest_digest``, StoreError if ``out_dir`` is something else."""
    manifest_hex = _digest_hex(manifest_digest)
    if hashlib.sha256(manifest_bytes).hexdigest() != manifest_hex:
        raise IntegrityError(f"manifest bytes do not match {manifest_digest}; not written")
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as exc:
        raise StoreError(f"manifest {manifest_digest} is not JSON: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise StoreError(f"manifest {manifest_digest} has no config descriptor")
    digests = [manifest["config"].get("digest")]
    digests += [layer.get("digest") for layer in _manifest_layers(manifest)]
    blob_names = {digest: _digest_hex(digest) for digest in digests}
    try:
        _prepare_layout(out_dir)
        blobs = out_dir / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)
        for digest, hex_part in blob_names.items():
            if not os.path.lexists(blobs / hex_part):
                _link_or_copy(blob_path(digest), blobs / hex_part)
        if not os.path.lexists(blobs / manifest_hex):
            _write_atomically(blobs / manifest_hex, manifest_bytes, mode=READ_ONLY)
        descriptor: dict = {"mediaType": media_type, "digest": manifest_digest,
                            "size": len(manifest_bytes)}
        if tag is not None:
            descriptor["annotations"] = {REF_NAME_ANNOTATION: tag}
        index = _read_index(out_dir)
        index["manifests"] = [entry for entry in index["manifests"]
                              if not _same_index_entry(entry, descriptor, tag)] + [descriptor]
        _write_atomically(out_dir / OCI_INDEX_FILE, json.dumps(index, indent=2).encode() + b"\n")
    except OSError as exc:
        raise _store_error(f"could not write the OCI layout {out_dir}", exc) from exc


def _prepare_layout(out_dir: Path) -> None:
    """Make ``out_dir`` an OCI layout, unless it is one; refuse anything else."""
    layout_file = out_dir / OCI_LAYOUT_FILE
    if layout_file.is_file():
        return
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise StoreError(f"{out_dir} exists and is not a directory; choose another -o")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise StoreError(f"{out_dir} exists, is not empty and is not an OCI layout; choose "
                         "another -o")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(layout_file, json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}).encode())


def _read_index(out_dir: Path) -> dict:
    path = out_dir / OCI_INDEX_FILE
    if not path.exists():
        return {"schemaVersion": 2, "mediaType": OCI_INDEX_MEDIA_TYPE, "manifests": []}
    try:
        index = json.loads(path.read_bytes())
    except ValueError as exc:
        raise StoreError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise StoreError(f"{path} has no list of manifests")
    return index


def _same_index_entry(entry: object, descriptor: dict, tag: str | None) -> bool:
    """Whether an index entry is the one ``descriptor`` supersedes: same tag, or untagged
    and the same manifest."""
    if not isinstance(entry, dict):
        return False
    ref_name = (entry.get("annotations") or {}).get(REF_NAME_ANNOTATION)
    if tag is not None:
        return ref_name == tag
    return ref_name is None and entry.get("digest") == descriptor["digest"]


# ---------------------------------------------------------------------------------------------
# file helpers


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` at ``target`` (which must not exist), or, where the file system
    will not link, copy it: the copy is made read-only and shows under ``target`` only when
    complete."""
    try:
        os.link(source, target)
        return
    except OSError as exc:
        if exc.errno not in LINK_FALLBACK_ERRNOS:
            raise
    temporary = target.with_name(f".{target.name}.tmp-{_token()}")
    try:
        shutil.copyfile(source, temporary)
        os.chmod(temporary, READ_ONLY)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _write_atomically(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` (synced) by a rename: readers see old or new bytes."""
    temporary = path.with_name(f".{path.name}.tmp-{_token()}")
    try:
        with open(temporary, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _store_error(what: str, exc: OSError) -> StoreError:
    if exc.errno in DISK_FULL_ERRNOS:
        return DiskFullError(f"{what}: the disk is full ({exc})")
    return StoreError(f"{what}: {exc}")


def _token() -> str:
    return secrets.token_hex(TEMPORARY_TOKEN_BYTES)

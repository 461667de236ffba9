"""Manifests and indexes of the OCI and Docker formats: parsing, validation and platform
choice. No I/O: bytes in, values out, so a hostile registry's document is checked here."""

from __future__ import annotations

import hashlib
import json
import platform as host_platform
from dataclasses import dataclass, field
from typing import Mapping

from p2pull.core.refs import validate_digest
from p2pull.errors import IntegrityError, OriginError, PlatformError, RefError, UsageError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
#: sent as Accept: without the OCI types CNCF Distribution answers 404 for OCI manifests
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
INDEX_MEDIA_TYPES = (OCI_INDEX, DOCKER_LIST)
#: the distribution spec lets registries refuse manifests above 4 MiB; we refuse to read them
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

MODEL_ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG_TYPE = "application/vnd.cncf.model.config.v1+json"
#: the platform fields that platform choice reads
_PLATFORM_KEYS = ("os", "architecture", "variant")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Mapping[str, str] | None = None

    @classmethod
    def parse(cls, data, where: str) -> "Descriptor":
        if not isinstance(data, dict):
            raise OriginError(f"{where}: a descriptor must be an object")
        digest, size = data.get("digest"), data.get("size")
        try:
            validate_digest(digest if isinstance(digest, str) else "", context=where)
        except RefError as exc:
            raise OriginError(f"{where}: {exc}") from None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OriginError(f"{where}: descriptor {digest} has no valid size")
        annotations = data.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise OriginError(f"{where}: annotations of {digest} must be an object")
        platform = data.get("platform")
        if platform is not None and not (isinstance(platform, dict) and all(
                isinstance(platform.get(key, ""), str) for key in _PLATFORM_KEYS)):
            raise OriginError(f"{where}: platform of {digest} must be an object of strings")
        return cls(str(data.get("mediaType", "")), digest, size,
                   {str(k): str(v) for k, v in annotations.items()}, platform)

    def to_dict(self) -> dict:
        data = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            data["annotations"] = dict(self.annotations)
        return data


@dataclass(frozen=True)
class Manifest:
    """An image or artifact manifest (not an index), with the exact bytes it was served as."""

    digest: str
    media_type: str
    raw: bytes
    data: Mapping
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Config and layers, each digest once (configs of models can equal an empty layer)."""
        seen, unique = set(), []
        for descriptor in (self.config, *self.layers):
            if descriptor.digest not in seen:
                seen.add(descriptor.digest)
                unique.append(descriptor)
        return tuple(unique)

    @property
    def artifact_type(self) -> str | None:
        return self.data.get("artifactType") or None

    @property
    def total_size(self) -> int:
        return sum(descriptor.size for descriptor in self.blobs)


def check_manifest_bytes(raw: bytes, expected_digest: str | None, where: str) -> str:
    """The digest of ``raw``; IntegrityError if it differs from the one asked for."""
    digest = sha256_digest(raw)
    if expected_digest and digest != expected_digest:
        raise IntegrityError(f"{where}: manifest bytes hash to {digest}, not {expected_digest}; "
                             "the registry or a proxy altered it")
    return digest


def load_document(raw: bytes, content_type: str, where: str) -> tuple[str, dict]:
    """(media type, parsed JSON) of a manifest or index."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise OriginError(f"{where}: manifest is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise OriginError(f"{where}: manifest is not a JSON object")
    media_type = data.get("mediaType") or content_type.split(";")[0].strip()
    if media_type not in MANIFEST_MEDIA_TYPES:
        if "manifests" in data:
            media_type = OCI_INDEX
        elif "layers" in data:
            media_type = OCI_MANIFEST
        else:
            raise OriginError(f"{where}: unsupported manifest type {media_type!r}")
    return media_type, data


def parse_manifest(raw: bytes, digest: str, media_type: str, data: dict, where: str) -> Manifest:
    if data.get("schemaVersion") != 2:
        raise OriginError(f"{where}: only schemaVersion 2 manifests are supported")
    layers = data.get("layers")
    if not isinstance(layers, list):
        raise OriginError(f"{where}: manifest has no layer list")
    return Manifest(digest, media_type, raw, data,
                    Descriptor.parse(data.get("config"), f"{where} config"),
                    tuple(Descriptor.parse(layer, f"{where} layer {n}")
                          for n, layer in enumerate(layers)))


_ARCH_ALIASES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
                 "armv7l": "arm", "armv6l": "arm", "i686": "386", "i386": "386",
                 "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"bad platform {text!r}: write os/arch[/variant], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> "Platform":
        machine = host_platform.machine().lower()
        arch = _ARCH_ALIASES.get(machine, machine)
        variant = {"armv7l": "v7", "armv6l": "v6"}.get(machine)
        return cls(host_platform.system().lower(), arch, variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def select_from_index(data: dict, wanted: Platform, where: str) -> Descriptor:
    """The manifest of ``wanted`` in an index. An entry without a platform (artifacts) is
    taken only when it is the index's single entry."""
    entries = data.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise OriginError(f"{where}: index lists no manifests")
    descriptors = [Descriptor.parse(entry, f"{where} entry {n}") for n, entry in
                   enumerate(entries)]
    if len(descriptors) == 1 and not descriptors[0].platform:
        return descriptors[0]
    best, best_score = None, 0
    for descriptor in descriptors:
        plat = descriptor.platform or {}
        if plat.get("os") != wanted.os or plat.get("architecture") != wanted.architecture:
            continue
        variant = plat.get("variant")
        # an exact variant beats none, which beats another (arm64 is v8 when unsaid)
        score = 3 if variant == wanted.variant else 2 if not variant or not wanted.variant else 0
        if score > best_score:
            best, best_score = descriptor, score
    if best is None:
        offered = sorted({_platform_text(d.platform) for d in descriptors if d.platform})
        raise PlatformError(f"{where} has no manifest for {wanted}; it offers "
                            f"{', '.join(offered) or 'none'}: choose one with --platform")
    return best


def _platform_text(platform: Mapping[str, str]) -> str:
    parts = (platform.get(key) for key in _PLATFORM_KEYS)
    return "/".join(part for part in parts if part)

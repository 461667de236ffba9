"""Manifests and indexes: parsing, validation of hostile documents, platform choice."""

from __future__ import annotations

import json

import pytest

from p2pull.errors import IntegrityError, OriginError, PlatformError, UsageError
from p2pull.origin.manifest import (DOCKER_LIST, DOCKER_MANIFEST, MANIFEST_MEDIA_TYPES,
                                    OCI_INDEX, OCI_MANIFEST, Descriptor, Platform,
                                    check_manifest_bytes, load_document, parse_manifest,
                                    select_from_index, sha256_digest)


def digest_of(text: str) -> str:
    return sha256_digest(text.encode())


CONFIG = digest_of("config")
LAYER_A = digest_of("a")
LAYER_B = digest_of("b")


def descriptor(digest: str, size: int = 10, media_type: str = "application/octet-stream",
               **extra) -> dict:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def manifest_doc(media_type: str | None = OCI_MANIFEST, **extra) -> dict:
    data = {"schemaVersion": 2,
            "config": descriptor(CONFIG, 2, "application/vnd.oci.image.config.v1+json"),
            "layers": [descriptor(LAYER_A, 100, annotations={
                           "org.opencontainers.image.title": "a.bin"}),
                       descriptor(LAYER_B, 200)],
            **extra}
    if media_type:
        data["mediaType"] = media_type
    return data


def parse(data: dict, content_type: str = "") -> "tuple":
    raw = json.dumps(data).encode()
    digest = check_manifest_bytes(raw, None, "test")
    media_type, parsed = load_document(raw, content_type, "test")
    return raw, digest, media_type, parsed


# -- documents ----------------------------------------------------------------------------


def test_parse_oci_manifest():
    raw, digest, media_type, data = parse(manifest_doc())
    assert media_type == OCI_MANIFEST
    manifest = parse_manifest(raw, digest, media_type, data, "test")
    assert manifest.digest == digest == sha256_digest(raw)
    assert manifest.raw == raw
    assert manifest.config.digest == CONFIG
    assert [layer.digest for layer in manifest.layers] == [LAYER_A, LAYER_B]
    assert manifest.layers[0].annotations == {"org.opencontainers.image.title": "a.bin"}
    assert manifest.layers[1].size == 200
    assert manifest.total_size == 302
    assert [d.digest for d in manifest.blobs] == [CONFIG, LAYER_A, LAYER_B]
    assert manifest.artifact_type is None


def test_model_artifact_type_and_shared_blobs():
    doc = manifest_doc(artifactType="application/vnd.cncf.model.manifest.v1+json")
    doc["layers"].append(descriptor(CONFIG, 2))  # a layer equal to the config
    doc["layers"].append(descriptor(LAYER_A, 100))  # and a repeated layer
    raw, digest, media_type, data = parse(doc)
    manifest = parse_manifest(raw, digest, media_type, data, "test")
    assert manifest.artifact_type == "application/vnd.cncf.model.manifest.v1+json"
    assert len(manifest.layers) == 4
    assert [d.digest for d in manifest.blobs] == [CONFIG, LAYER_A, LAYER_B]
    assert manifest.total_size == 302  # each blob counted once


def test_parse_docker_manifest():
    doc = manifest_doc(DOCKER_MANIFEST)
    raw, digest, media_type, data = parse(doc)
    assert media_type == DOCKER_MANIFEST
    assert len(parse_manifest(raw, digest, media_type, data, "t").layers) == 2


def test_media_type_from_content_type_when_the_document_has_none():
    _, _, media_type, _ = parse(manifest_doc(None), f"{DOCKER_MANIFEST}; charset=utf-8")
    assert media_type == DOCKER_MANIFEST
    _, _, media_type, _ = parse({"schemaVersion": 2, "manifests": []}, DOCKER_LIST)
    assert media_type == DOCKER_LIST


def test_media_type_guessed_from_shape():
    assert parse(manifest_doc(None), "application/json")[2] == OCI_MANIFEST
    assert parse({"schemaVersion": 2, "manifests": []}, "")[2] == OCI_INDEX


@pytest.mark.parametrize("raw, match", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"schemaVersion": 1, "fsLayers": []}', "unsupported"),
    (b"\xff\xfe", "not JSON"),
])
def test_bad_documents(raw, match):
    with pytest.raises(OriginError, match=match):
        load_document(raw, "application/octet-stream", "test")


def test_media_types_offered():
    assert set(MANIFEST_MEDIA_TYPES) == {OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST}


@pytest.mark.parametrize("change, match", [
    ({"schemaVersion": 1}, "schemaVersion"),
    ({"layers": None}, "layer list"),
    ({"layers": {"a": 1}}, "layer list"),
    ({"config": None}, "config"),
])
def test_bad_manifests(change, match):
    doc = manifest_doc()
    doc.update(change)
    raw, digest, media_type, data = parse(doc)
    with pytest.raises(OriginError, match=match):
        parse_manifest(raw, digest, media_type, data, "test")


def test_check_manifest_bytes_detects_a_changed_byte():
    raw = json.dumps(manifest_doc()).encode()
    digest = sha256_digest(raw)
    assert check_manifest_bytes(raw, digest, "test") == digest
    assert check_manifest_bytes(raw, None, "test") == digest
    for position in (0, len(raw) // 2, len(raw) - 1):
        changed = bytearray(raw)
        changed[position] ^= 0x01
        with pytest.raises(IntegrityError, match=digest):
            check_manifest_bytes(bytes(changed), digest, "test")
    with pytest.raises(IntegrityError):
        check_manifest_bytes(raw + b" ", digest, "test")


# -- descriptors --------------------------------------------------------------------------


def test_descriptor_round_trip():
    data = descriptor(LAYER_A, 5, annotations={"k": "v"})
    parsed = Descriptor.parse(data, "here")
    assert parsed == Descriptor("application/octet-stream", LAYER_A, 5, {"k": "v"})
    assert parsed.to_dict() == data
    assert Descriptor.parse(descriptor(LAYER_A, 0), "here").to_dict() == descriptor(LAYER_A, 0)


@pytest.mark.parametrize("digest", [
    None, 5, "", "sha256:abc", "sha256:" + "A" * 64, "sha512:" + "a" * 128,
    "sha256:" + "a" * 63 + "g", "sha256:../../../../etc/passwd", LAYER_A + "\n",
])
def test_descriptor_bad_digest(digest):
    with pytest.raises(OriginError, match="layer 3"):
        Descriptor.parse(descriptor(digest, 10), "layer 3")


@pytest.mark.parametrize("size", [-1, True, False, 1.5, "10", None, 10.0])
def test_descriptor_bad_size(size):
    with pytest.raises(OriginError, match="size"):
        Descriptor.parse(descriptor(LAYER_A, size), "layer 0")


@pytest.mark.parametrize("data", [None, [], "sha256:x", 5])
def test_descriptor_not_an_object(data):
    with pytest.raises(OriginError, match="object"):
        Descriptor.parse(data, "x")


def test_descriptor_bad_annotations():
    with pytest.raises(OriginError, match="annotations"):
        Descriptor.parse(descriptor(LAYER_A, 1, annotations=["x"]), "x")


@pytest.mark.parametrize("platform", ["linux/amd64", ["linux", "amd64"], 5,
                                      {"os": "linux", "architecture": 64},
                                      {"os": None, "architecture": "amd64"},
                                      {"os": "linux", "architecture": "arm", "variant": 7}])
def test_descriptor_bad_platform(platform):
    with pytest.raises(OriginError, match="platform"):
        Descriptor.parse(descriptor(LAYER_A, 1, platform=platform), "x")


def test_hostile_platform_in_an_index_is_an_origin_error():
    index = {"manifests": [entry("linux", "amd64"), descriptor(LAYER_A, 1, platform="linux")]}
    with pytest.raises(OriginError, match="entry 1"):
        pick(index, "linux/arm64")


def test_bad_layer_in_manifest_names_it():
    doc = manifest_doc()
    doc["layers"][1]["size"] = -5
    raw, digest, media_type, data = parse(doc)
    with pytest.raises(OriginError, match="layer 1"):
        parse_manifest(raw, digest, media_type, data, "test")


# -- platforms ----------------------------------------------------------------------------


def entry(os: str | None, arch: str | None = None, variant: str | None = None,
          seed: str = "") -> dict:
    data = descriptor(digest_of(f"{os}/{arch}/{variant}{seed}"), 500, OCI_MANIFEST)
    if os:
        data["platform"] = {"os": os, "architecture": arch}
        if variant:
            data["platform"]["variant"] = variant
    return data


INDEX = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
    entry("linux", "amd64"),
    entry("linux", "arm64", "v8"),
    entry("linux", "arm", "v6"),
    entry("linux", "arm", "v7"),
    entry("windows", "amd64"),
    entry("unknown", "unknown"),
]}


def pick(index: dict, wanted: str) -> Descriptor:
    return select_from_index(index, Platform.parse(wanted), "idx")


def test_exact_os_and_arch():
    assert pick(INDEX, "linux/amd64").digest == INDEX["manifests"][0]["digest"]
    assert pick(INDEX, "windows/amd64").digest == INDEX["manifests"][4]["digest"]


def test_variant_preference():
    assert pick(INDEX, "linux/arm/v7").digest == INDEX["manifests"][3]["digest"]
    assert pick(INDEX, "linux/arm/v6").digest == INDEX["manifests"][2]["digest"]
    # no variant asked: the first of the architecture is fine
    assert pick(INDEX, "linux/arm").platform["architecture"] == "arm"
    # arm64 with no variant asked takes v8
    assert pick(INDEX, "linux/arm64").digest == INDEX["manifests"][1]["digest"]


def test_exact_variant_beats_unsaid_and_unsaid_beats_other():
    index = {"manifests": [entry("linux", "arm64", "v9"), entry("linux", "arm64"),
                           entry("linux", "arm64", "v8")]}
    assert pick(index, "linux/arm64/v8").digest == index["manifests"][2]["digest"]
    index = {"manifests": [entry("linux", "arm64", "v9"), entry("linux", "arm64")]}
    assert pick(index, "linux/arm64/v8").digest == index["manifests"][1]["digest"]
    index = {"manifests": [entry("linux", "arm64", "v8"), entry("linux", "arm64")]}
    assert pick(index, "linux/arm64").digest == index["manifests"][1]["digest"]


def test_other_variant_is_not_taken():
    index = {"manifests": [entry("linux", "arm", "v6")]}
    with pytest.raises(PlatformError, match="linux/arm/v6"):
        pick(index, "linux/arm/v7")


def test_single_unplatformed_entry_is_taken():
    index = {"manifests": [entry(None)]}
    assert select_from_index(index, Platform("linux", "riscv64"), "idx").digest == \
        index["manifests"][0]["digest"]


def test_several_unplatformed_entries_are_not_guessed():
    index = {"manifests": [entry(None, seed="1"), entry(None, seed="2")]}
    with pytest.raises(PlatformError, match="none"):
        pick(index, "linux/amd64")


def test_missing_platform_lists_what_is_offered():
    with pytest.raises(PlatformError) as info:
        pick(INDEX, "linux/s390x")
    message = str(info.value)
    for offered in ("linux/amd64", "linux/arm64/v8", "linux/arm/v6", "linux/arm/v7",
                    "windows/amd64"):
        assert offered in message
    assert "linux/s390x" in message
    assert "--platform" in message


@pytest.mark.parametrize("index", [{}, {"manifests": []}, {"manifests": "x"}])
def test_index_without_manifests(index):
    with pytest.raises(OriginError, match="no manifests"):
        pick(index, "linux/amd64")


def test_index_with_a_bad_entry():
    index = {"manifests": [entry("linux", "amd64"), {"digest": "sha256:x", "size": 1}]}
    with pytest.raises(OriginError, match="entry 1"):
        pick(index, "linux/amd64")


def test_platform_parse_and_str():
    assert Platform.parse("linux/amd64") == Platform("linux", "amd64", None)
    assert Platform.parse("linux/arm/v7") == Platform("linux", "arm", "v7")
    assert str(Platform("linux", "arm", "v7")) == "linux/arm/v7"
    assert str(Platform("linux", "amd64")) == "linux/amd64"


@pytest.mark.parametrize("text", ["", "linux", "linux/", "/amd64", "linux//v7",
                                  "linux/arm/v7/x", "linux/arm/"])
def test_platform_parse_errors(text):
    with pytest.raises(UsageError, match="platform"):
        Platform.parse(text)


def test_host_platform_is_a_normalised_value():
    host = Platform.host()
    assert host.os and host.architecture
    assert host.architecture not in ("x86_64", "aarch64")
    assert host.os == host.os.lower()

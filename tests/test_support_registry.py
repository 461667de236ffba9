"""The integration-test support works against the real registry, skopeo and oras."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from pathlib import Path

import httpx
import pytest

from tests.support.registry import (
    ANNOTATION_MODEL_FILEPATH,
    ANNOTATION_REF_NAME,
    ANNOTATION_TITLE,
    MANIFEST_ACCEPT,
    MODEL_ARTIFACT_TYPE,
    MODEL_CONFIG,
    MODEL_WEIGHT_RAW,
    OCI_MANIFEST,
    free_port,
    make_oci_layout,
    oras_push,
    skopeo_push_layout,
)
from tests.support.tokenserver import fetch_token


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def get_manifest(registry, repo: str, reference: str, **request_options) -> httpx.Response:
    return httpx.get(
        f"{registry.url}/v2/{repo}/manifests/{reference}",
        headers={"Accept": MANIFEST_ACCEPT, **request_options.pop("headers", {})},
        **request_options,
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_oras_push_serves_an_oci_manifest_with_the_files(registry, tmp_path):
    files = {"weights.bin": os.urandom(70_000), "README.md": b"# tiny model\n"}

    digest = oras_push(
        registry, "models/tiny:v1", files, tmp_path, artifact_type="application/vnd.test.artifact"
    )

    response = get_manifest(registry, "models/tiny", "v1")
    assert response.status_code == 200
    assert response.headers["Docker-Content-Digest"] == digest
    assert sha256_digest(response.content) == digest
    manifest = response.json()
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["artifactType"] == "application/vnd.test.artifact"
    titles = [layer["annotations"][ANNOTATION_TITLE] for layer in manifest["layers"]]
    assert titles == list(files)
    for layer, content in zip(manifest["layers"], files.values()):
        blob = httpx.get(f"{registry.url}/v2/models/tiny/blobs/{layer['digest']}")
        assert blob.status_code == 200
        assert blob.content == content
    by_digest = get_manifest(registry, "models/tiny", digest)
    assert by_digest.content == response.content


def test_make_oci_layout_writes_a_model_artifact(tmp_path):
    big_file = tmp_path / "model.safetensors"
    big_file.write_bytes(os.urandom(1 << 20))
    layout = tmp_path / "layout"

    digest = make_oci_layout(
        layout,
        {"config.json": b'{"arch": "tiny"}', "model.safetensors": big_file},
        tag="v1",
        annotations={"org.opencontainers.image.version": "1"},
    )

    def blob(blob_digest: str) -> Path:
        return layout / "blobs" / "sha256" / blob_digest.removeprefix("sha256:")

    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert [(m["digest"], m["annotations"][ANNOTATION_REF_NAME]) for m in index["manifests"]] == [
        (digest, "v1")
    ]
    manifest_bytes = blob(digest).read_bytes()
    assert sha256_digest(manifest_bytes) == digest
    assert index["manifests"][0]["size"] == len(manifest_bytes)
    manifest = json.loads(manifest_bytes)
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["artifactType"] == MODEL_ARTIFACT_TYPE
    assert manifest["annotations"] == {"org.opencontainers.image.version": "1"}
    assert manifest["config"]["mediaType"] == MODEL_CONFIG
    config = json.loads(blob(manifest["config"]["digest"]).read_bytes())
    assert config["modelfs"]["diffIds"] == [layer["digest"] for layer in manifest["layers"]]
    for layer, name in zip(manifest["layers"], ["config.json", "model.safetensors"]):
        assert layer["mediaType"] == MODEL_WEIGHT_RAW
        assert layer["annotations"] == {ANNOTATION_TITLE: name, ANNOTATION_MODEL_FILEPATH: name}
        content = blob(layer["digest"]).read_bytes()
        assert sha256_digest(content) == layer["digest"]
        assert len(content) == layer["size"]
    assert blob(manifest["layers"][1]["digest"]).stat().st_ino == big_file.stat().st_ino

    second = make_oci_layout(layout, {"other.bin": b"x"}, tag="v2", artifact_type=None)
    retagged = make_oci_layout(layout, {"other.bin": b"y"}, tag="v1")
    index = json.loads((layout / "index.json").read_text())
    refs = {m["annotations"][ANNOTATION_REF_NAME]: m["digest"] for m in index["manifests"]}
    assert refs == {"v2": second, "v1": retagged}
    assert "artifactType" not in json.loads(blob(second).read_bytes())


def test_skopeo_pushes_a_layout_with_its_manifest_digest(registry, tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(3 << 20))
    layout = tmp_path / "layout"
    layout_digest = make_oci_layout(
        layout, {"config.json": b"{}", "model.safetensors": weights}, tag="v1"
    )

    pushed_digest = skopeo_push_layout(layout, registry, "models/big:v1")

    assert pushed_digest == layout_digest
    response = get_manifest(registry, "models/big", "v1")
    assert response.status_code == 200
    assert response.headers["Docker-Content-Digest"] == layout_digest
    weights_layer = response.json()["layers"][1]
    blob = httpx.get(f"{registry.url}/v2/models/big/blobs/{weights_layer['digest']}")
    assert blob.content == weights.read_bytes()


def test_htpasswd_registry_requires_its_credentials(registry_factory, tmp_path):
    registry = registry_factory(htpasswd=("bob", "hunter2"))

    anonymous = httpx.get(f"{registry.url}/v2/")
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic ")
    assert httpx.get(f"{registry.url}/v2/", auth=("bob", "wrong")).status_code == 401
    assert httpx.get(f"{registry.url}/v2/", auth=("bob", "hunter2")).status_code == 200

    oras_digest = oras_push(registry, "models/a:v1", {"a.bin": b"aaa"}, tmp_path)
    layout = tmp_path / "layout"
    layout_digest = make_oci_layout(layout, {"b.bin": b"bbb"}, tag="v1")
    assert skopeo_push_layout(layout, registry, "models/b:v1") == layout_digest

    for repo, digest in [("models/a", oras_digest), ("models/b", layout_digest)]:
        assert get_manifest(registry, repo, "v1").status_code == 401
        response = get_manifest(registry, repo, "v1", auth=("bob", "hunter2"))
        assert response.headers["Docker-Content-Digest"] == digest


def test_token_flow_grants_pull_and_push_to_the_registry(registry_factory, token_server_factory):
    tokens = token_server_factory(users={"alice": "s3cret"})
    registry = registry_factory(token=tokens)

    challenge = httpx.get(f"{registry.url}/v2/")
    assert challenge.status_code == 401
    assert challenge.headers["WWW-Authenticate"] == (
        f'Bearer realm="{tokens.realm}",service="{tokens.service}"'
    )
    login = httpx.get(tokens.realm, params={"service": tokens.service}, auth=("alice", "s3cret"))
    assert login.status_code == 200
    body = login.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == tokens.token_lifetime
    assert body["issued_at"].endswith("Z")
    assert httpx.get(f"{registry.url}/v2/", headers=bearer(body["token"])).status_code == 200

    uploads = f"{registry.url}/v2/models/pushed/blobs/uploads/"
    alice = ("alice", "s3cret")
    pull_token = fetch_token(tokens, "repository:models/pushed:pull", credentials=alice)
    refused = httpx.post(uploads, headers=bearer(pull_token))
    assert refused.status_code == 401
    # Distribution lists the actions in Go map order, which varies from run to run
    asked = re.search(r'scope="repository:models/pushed:([a-z,]+)"',
                      refused.headers["WWW-Authenticate"])
    assert asked and set(asked.group(1).split(",")) == {"pull", "push"}

    push_token = fetch_token(
        tokens,
        "repository:models/pushed:pull",
        "repository:models/pushed:push",
        credentials=alice,
    )
    assert tokens.request_log[-1].access == (
        {"type": "repository", "name": "models/pushed", "actions": ["pull", "push"]},
    )
    started = httpx.post(uploads, headers=bearer(push_token))
    assert started.status_code == 202
    content = os.urandom(10_000)
    digest = sha256_digest(content)
    finished = httpx.put(
        httpx.URL(registry.url)
        .join(started.headers["Location"])
        .copy_merge_params({"digest": digest}),
        content=content,
        headers={**bearer(push_token), "Content-Type": "application/octet-stream"},
    )
    assert finished.status_code == 201
    blob_url = f"{registry.url}/v2/models/pushed/blobs/{digest}"
    assert httpx.get(blob_url).status_code == 401
    assert httpx.get(blob_url, headers=bearer(pull_token)).content == content
    assert tokens.requests == 3


def test_token_server_refuses_bad_and_missing_credentials(token_server_factory):
    tokens = token_server_factory(users={"alice": "s3cret"})
    scope = "repository:models/x:pull"

    with pytest.raises(httpx.HTTPStatusError) as wrong_password:
        fetch_token(tokens, scope, credentials=("alice", "nope"))
    assert wrong_password.value.response.status_code == 401
    with pytest.raises(httpx.HTTPStatusError) as anonymous:
        fetch_token(tokens, scope)
    assert anonymous.value.response.status_code == 401
    assert [(r.user, r.status) for r in tokens.request_log] == [(None, 401), (None, 401)]


def test_anonymous_tokens_pull_but_cannot_push(registry_factory, token_server_factory, tmp_path):
    tokens = token_server_factory(users={"alice": "s3cret"}, anonymous_pull=True)
    registry = registry_factory(token=tokens)
    digest = oras_push(
        registry,
        "models/public:v1",
        {"w.bin": b"weights"},
        tmp_path,
        credentials=("alice", "s3cret"),
    )

    anonymous_token = fetch_token(tokens, "repository:models/public:pull,push")
    assert tokens.request_log[-1].user is None
    assert tokens.request_log[-1].access == (
        {"type": "repository", "name": "models/public", "actions": ["pull"]},
    )
    response = get_manifest(registry, "models/public", "v1", headers=bearer(anonymous_token))
    assert response.headers["Docker-Content-Digest"] == digest
    upload = httpx.post(
        f"{registry.url}/v2/models/public/blobs/uploads/", headers=bearer(anonymous_token)
    )
    assert upload.status_code == 401


def test_registry_refuses_an_expired_token(registry_factory, token_server_factory):
    # Distribution allows 60 s of clock skew past exp.
    tokens = token_server_factory(users={"alice": "s3cret"}, token_lifetime=-120)
    registry = registry_factory(token=tokens)
    token = fetch_token(tokens, credentials=("alice", "s3cret"))
    assert httpx.get(f"{registry.url}/v2/", headers=bearer(token)).status_code == 401


def test_registry_stop_ends_the_process_and_frees_the_port(registry):
    registry.stop()

    assert registry.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(registry.pid, 0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{registry.url}/v2/")
    registry.stop()


def test_a_failed_registry_start_raises_with_the_log(registry_factory, token_server_factory):
    tokens = token_server_factory()
    tokens.cert_path.unlink()

    with pytest.raises(RuntimeError, match="(?s)exited with status .*no such file"):
        registry_factory(token=tokens)

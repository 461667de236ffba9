"""`p2pull push` against a real registry (CNCF Distribution): what it packs, how it uploads,
and that a client that is not ours (PyPI ``oras``) pulls the files back byte-identical."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from oras.client import OrasClient

from p2pull.config import RegistryConfig, load_config
from p2pull.errors import AuthError, OriginError, UsageError
from p2pull.origin import push
from p2pull.origin.client import OriginClient
from p2pull.origin.manifest import sha256_digest
from p2pull.origin.push import (CHUNK_SIZE, CODE_MEDIA_TYPE, DOC_MEDIA_TYPE,
                                WEIGHT_CONFIG_MEDIA_TYPE, WEIGHT_MEDIA_TYPE, PushProgress,
                                layer_media_type, list_files, push_directory)
from tests.support.registry import (ANNOTATION_MODEL_FILEPATH, ANNOTATION_TITLE,
                                    MANIFEST_ACCEPT, MODEL_ARTIFACT_TYPE, MODEL_CONFIG,
                                    OCI_MANIFEST)

#: above CHUNK_SIZE, so the big file goes up in PATCH chunks (16 + 16 + 8 MiB)
LARGE = 40 * 1024 * 1024


def model_files(seed: int = 1) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {"model.safetensors": rng.randbytes(LARGE),
            "config.json": json.dumps({"hidden_size": 64}).encode(),
            "README.md": b"# a test model\n",
            "tokenizer/vocab.txt": b"hello\nworld\n",
            "tokenizer/tokenizer.json": b'{"model": "bpe"}',
            "modeling.py": b"print('hi')\n",
            "empty.bin": b""}


def write_tree(directory: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return directory


def config_for(tmp_path: Path, **overrides):
    return load_config(env={}, data_dir=tmp_path / "store", **overrides)


def tree_of(directory: Path) -> dict[str, bytes]:
    return {path.relative_to(directory).as_posix(): path.read_bytes()
            for path in directory.rglob("*") if path.is_file()}


@pytest.fixture(autouse=True)
def no_ambient_credentials(monkeypatch, tmp_path):
    """Credentials come only from each test's config, not from the machine running it."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    monkeypatch.delenv("P2PULL_REGISTRY_USERNAME", raising=False)
    monkeypatch.delenv("P2PULL_REGISTRY_PASSWORD", raising=False)


class RecordingTransport(httpx.AsyncHTTPTransport):
    """Records (method, path, query, status) of every request the OriginClient sends."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str, str, int]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        self.log.append((request.method, request.url.path, request.url.query.decode(),
                         response.status_code))
        return response

    def methods(self) -> list[str]:
        return [method for method, *_ in self.log]


async def push_recorded(directory: Path, ref: str, config, **kwargs):
    """Push with a recording client: (digest, transport, counters)."""
    transport = RecordingTransport()
    async with OriginClient(config, transport=transport) as origin:
        digest = await push_directory(directory, ref, config, origin=origin, **kwargs)
    return digest, transport, origin.counters


def registry_manifest(registry, repository: str, reference: str, auth=None) -> httpx.Response:
    response = httpx.get(f"{registry.url}/v2/{repository}/manifests/{reference}",
                         headers={"Accept": MANIFEST_ACCEPT}, auth=auth)
    assert response.status_code == 200, response.text
    return response


def has_blob(registry, repository: str, digest: str) -> bool:
    return httpx.head(f"{registry.url}/v2/{repository}/blobs/{digest}").status_code == 200


# -- packing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, media_type", [
    ("model.safetensors", WEIGHT_MEDIA_TYPE), ("shards/model-00001.bin", WEIGHT_MEDIA_TYPE),
    ("model.gguf", WEIGHT_MEDIA_TYPE), ("weights.unknown", WEIGHT_MEDIA_TYPE),
    ("config.json", WEIGHT_CONFIG_MEDIA_TYPE), ("generation_config.json",
                                                WEIGHT_CONFIG_MEDIA_TYPE),
    ("tokenizer.model", WEIGHT_CONFIG_MEDIA_TYPE), ("merges.txt", WEIGHT_CONFIG_MEDIA_TYPE),
    ("params.yaml", WEIGHT_CONFIG_MEDIA_TYPE),
    ("README.md", DOC_MEDIA_TYPE), ("README", DOC_MEDIA_TYPE), ("LICENSE.txt", DOC_MEDIA_TYPE),
    ("docs/usage.md", DOC_MEDIA_TYPE), ("modeling_llama.py", CODE_MEDIA_TYPE),
])
def test_media_type_by_file_name(name, media_type):
    assert layer_media_type(name) == media_type


def test_list_files_is_sorted_recursive_and_leaves_out_git(tmp_path):
    write_tree(tmp_path, {"b.bin": b"b", "a/z.json": b"{}", ".hidden": b"h",
                          ".git/HEAD": b"ref", "sub/.git/config": b"x"})
    (tmp_path / "empty-dir").mkdir()
    names = [file.name for file in list_files(tmp_path)]
    assert names == [".hidden", "a/z.json", "b.bin"]


def test_symlink_inside_is_pushed_as_its_target_and_outside_is_refused(tmp_path):
    root = write_tree(tmp_path / "model", {"weights.bin": b"w"})
    (root / "alias.bin").symlink_to("weights.bin")
    files = list_files(root)
    assert [(f.name, f.path) for f in files] == [("alias.bin", root.resolve() / "weights.bin"),
                                                ("weights.bin", root.resolve() / "weights.bin")]
    (tmp_path / "secret").write_bytes(b"s")
    (root / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(UsageError, match="outside"):
        list_files(root)


@pytest.mark.parametrize("make, message", [
    (lambda root: (root / "dir-link").symlink_to(root / "d", target_is_directory=True),
     "symlink to a directory"),
    (lambda root: (root / "dangling").symlink_to(root / "missing"), "broken symlink"),
    (lambda root: os.mkfifo(root / "pipe"), "not a regular file"),
])
def test_what_cannot_be_a_layer_is_refused(tmp_path, make, message):
    root = write_tree(tmp_path / "model", {"weights.bin": b"w", "d/x.bin": b"x"})
    make(root)
    with pytest.raises(UsageError, match=message):
        list_files(root)


async def test_bad_directories_are_usage_errors(tmp_path):
    config = config_for(tmp_path)
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    for path, message in [(tmp_path / "missing", "does not exist"),
                          (tmp_path / "file", "not a directory"),
                          (tmp_path / "empty", "no files")]:
        with pytest.raises(UsageError, match=message):
            await push_directory(path, "127.0.0.1:1/models/x:v1", config)


# -- against a registry ----------------------------------------------------------------------

async def test_push_round_trips_through_oras_pull(registry, tmp_path):
    files = model_files()
    source = write_tree(tmp_path / "model", files)
    progress = PushProgress()
    digest, transport, _ = await push_recorded(source, f"{registry.host}/models/tiny:v1",
                                               config_for(tmp_path), progress=progress)

    response = registry_manifest(registry, "models/tiny", "v1")
    assert response.headers["Docker-Content-Digest"] == digest
    manifest = response.json()
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["artifactType"] == MODEL_ARTIFACT_TYPE
    assert manifest["config"]["mediaType"] == MODEL_CONFIG
    assert "org.opencontainers.image.created" in manifest["annotations"]
    names = sorted(files)
    assert [layer["annotations"][ANNOTATION_TITLE] for layer in manifest["layers"]] == names
    assert [layer["annotations"][ANNOTATION_MODEL_FILEPATH]
            for layer in manifest["layers"]] == names
    assert [layer["mediaType"] for layer in manifest["layers"]] == [
        layer_media_type(name) for name in names]
    assert [layer["size"] for layer in manifest["layers"]] == [len(files[n]) for n in names]
    model_config = httpx.get(f"{registry.url}/v2/models/tiny/blobs/"
                             f"{manifest['config']['digest']}").json()
    assert model_config["descriptor"]["name"] == "tiny"
    assert model_config["descriptor"]["createdAt"] == \
        manifest["annotations"]["org.opencontainers.image.created"]
    assert model_config["modelfs"] == {"type": "layers", "diffIds": [
        layer["digest"] for layer in manifest["layers"]]}

    # the big file went up in chunks of CHUNK_SIZE, the others in one PUT each
    assert transport.methods().count("PATCH") == -(-LARGE // CHUNK_SIZE)
    total = sum(map(len, files.values()))
    assert (progress.total, progress.hashed, progress.uploaded, progress.skipped) == (
        total, total, total, 0)

    out = tmp_path / "pulled"
    OrasClient(insecure=True).pull(target=f"{registry.host}/models/tiny:v1", outdir=str(out))
    assert tree_of(out) == files


async def test_second_push_uploads_nothing(registry, tmp_path):
    source = write_tree(tmp_path / "model", model_files())
    ref = f"{registry.host}/models/tiny:v1"
    first, _, _ = await push_recorded(source, ref, config_for(tmp_path))
    progress = PushProgress()
    second, transport, counters = await push_recorded(source, ref, config_for(tmp_path),
                                                      progress=progress)
    assert second == first
    # one HEAD per distinct blob (layers and config), then the manifest
    distinct_blobs = len(set(model_files().values())) + 1
    assert transport.methods() == ["HEAD"] * distinct_blobs + ["PUT"]
    assert transport.log[-1][1] == "/v2/models/tiny/manifests/v1"
    assert progress.uploaded == 0 and progress.skipped == progress.total
    assert counters.bytes_sent < 4096  # the manifest only


async def test_blobs_are_mounted_from_another_repository(registry, tmp_path):
    source = write_tree(tmp_path / "model", model_files())
    await push_recorded(source, f"{registry.host}/models/first:v1", config_for(tmp_path))
    digest, transport, counters = await push_recorded(
        source, f"{registry.host}/models/second:v1", config_for(tmp_path),
        mount_from=["models/first"])

    manifest = registry_manifest(registry, "models/second", "v1").json()
    mounts = [entry for entry in transport.log if "mount=" in entry[2]]
    distinct_layers = len({layer["digest"] for layer in manifest["layers"]})
    assert len(mounts) == distinct_layers
    assert all(status == 201 for *_, status in mounts)
    assert "PATCH" not in transport.methods()
    # the only blob sent is the config, which names the repository and so differs
    uploads = [entry for entry in transport.log if entry[0] == "PUT" and "/uploads/" in entry[1]]
    assert len(uploads) == 1 and manifest["config"]["digest"] in uploads[0][2].replace("%3A", ":")
    assert counters.bytes_sent < 8192
    for layer in manifest["layers"]:
        assert has_blob(registry, "models/second", layer["digest"])
    assert httpx.get(f"{registry.url}/v2/models/second/manifests/{digest}",
                     headers={"Accept": MANIFEST_ACCEPT}).status_code == 200


async def test_pinned_digest_must_match(registry, tmp_path):
    source = write_tree(tmp_path / "model", {"w.bin": b"weights"})
    config = config_for(tmp_path)
    digest = await push_directory(source, f"{registry.host}/models/pin:v1", config)
    assert await push_directory(source, f"{registry.host}/models/pin@{digest}", config) == digest
    with pytest.raises(UsageError, match="packs to"):
        await push_directory(source, f"{registry.host}/models/pin:v1@sha256:{'0' * 64}", config)


async def test_push_with_basic_auth(registry_factory, tmp_path):
    registry = registry_factory(htpasswd=("pusher", "s3cret"))
    source = write_tree(tmp_path / "model", {"w.bin": b"weights", "README.md": b"# hi\n"})
    ref = f"{registry.host}/private/model:v1"
    right = config_for(tmp_path, registries={
        registry.host: RegistryConfig(username="pusher", password="s3cret")})
    digest = await push_directory(source, ref, right)
    response = registry_manifest(registry, "private/model", "v1", auth=("pusher", "s3cret"))
    assert response.headers["Docker-Content-Digest"] == digest
    wrong = config_for(tmp_path, registries={
        registry.host: RegistryConfig(username="pusher", password="nope")})
    with pytest.raises(AuthError, match="refused"):
        await push_directory(source, ref, wrong)
    with pytest.raises(AuthError, match="requires a user name"):
        await push_directory(source, ref, config_for(tmp_path))


async def test_push_with_bearer_tokens_and_a_mount(registry_factory, token_server_factory,
                                                   tmp_path):
    tokens = token_server_factory(users={"alice": "wonder"}, anonymous_pull=True)
    registry = registry_factory(token=tokens)
    source = write_tree(tmp_path / "model", {"w.bin": os.urandom(1000), "config.json": b"{}"})
    config = config_for(tmp_path, registries={
        registry.host: RegistryConfig(username="alice", password="wonder")})
    await push_directory(source, f"{registry.host}/team/first:v1", config)
    digest, transport, _ = await push_recorded(source, f"{registry.host}/team/second:v1",
                                               config, mount_from=["team/first"])
    assert [status for _, _, query, status in transport.log if "mount=" in query] == [201, 201]
    # the mount asked for one token covering both repositories
    assert ("repository:team/second:pull,push", "repository:team/first:pull") in [
        request.scopes for request in tokens.request_log]
    token = httpx.get(tokens.realm, auth=("alice", "wonder"),
                      params={"service": tokens.service,
                              "scope": "repository:team/second:pull"}).json()["token"]
    response = httpx.get(f"{registry.url}/v2/team/second/manifests/v1",
                         headers={"Accept": MANIFEST_ACCEPT, "Authorization": f"Bearer {token}"})
    assert response.headers["Docker-Content-Digest"] == digest

    with pytest.raises(AuthError, match="refused"):
        await push_directory(source, f"{registry.host}/team/x:v1", config_for(
            tmp_path, registries={registry.host: RegistryConfig(username="alice",
                                                                password="wrong")}))
    # anonymous users may pull but not push: the registry refuses the token it gets
    with pytest.raises(AuthError, match="lack access"):
        await push_directory(source, f"{registry.host}/team/x:v1", config_for(tmp_path))


def run_cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PULL_")}
    env.update(P2PULL_DATA_DIR=str(tmp_path / "store"),
               DOCKER_CONFIG=str(tmp_path / "no-docker-config"))
    p2pull = Path(sys.executable).parent / "p2pull"
    return subprocess.run([str(p2pull), *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_push_prints_the_digest(registry, tmp_path):
    source = write_tree(tmp_path / "model", {"w.bin": b"weights", "sub/notes.md": b"n"})
    done = run_cli("push", str(source), f"{registry.host}/models/cli:v1", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    digest = done.stdout.strip()
    assert registry_manifest(registry, "models/cli", "v1").headers[
        "Docker-Content-Digest"] == digest

    not_a_directory = run_cli("push", str(source / "w.bin"), f"{registry.host}/models/cli:v2",
                              tmp_path=tmp_path)
    assert not_a_directory.returncode == UsageError.exit_code
    assert "is not a directory" in not_a_directory.stderr
    assert not_a_directory.stdout == ""


async def test_a_blob_the_registry_refuses_is_an_origin_error(registry, tmp_path, monkeypatch):
    source = write_tree(tmp_path / "model", {"w.bin": b"weights"})

    def wrong_digest(path):  # as if the file changed between hashing and upload
        return sha256_digest(b"WEIGHTS"), len(b"weights")

    monkeypatch.setattr(push, "hash_file", wrong_digest)
    with pytest.raises(OriginError, match="refused blob .*DIGEST_INVALID"):
        await push_directory(source, f"{registry.host}/models/bad:v1", config_for(tmp_path))

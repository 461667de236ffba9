"""`p2pull get` against a real registry (CNCF Distribution), through the Python API and the
command line: content pushed by clients that are not ours comes back byte-identical."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from p2pull import client
from p2pull.config import RegistryConfig, load_config
from p2pull.errors import AuthError, NotFoundError
from p2pull.net.fetch import Progress
from p2pull.origin.client import OriginCounters
from tests.support.registry import oras_push

#: big enough for many chunks (chunk sizes start at 256 KiB) and several origin requests
LARGE = 24 * 1024 * 1024


def model_files(seed: int = 1) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {"model.safetensors": rng.randbytes(LARGE),
            "tokenizer.json": json.dumps({"vocab": list(range(100))}).encode(),
            "README.md": b"# a test model\n"}


def config_for(tmp_path: Path, **overrides):
    return load_config(env={}, data_dir=tmp_path / "store", **overrides)


def run_cli(*args: str, data_dir: Path, env: dict | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("P2PULL_")}
    full_env.update({"P2PULL_DATA_DIR": str(data_dir), **(env or {})})
    return subprocess.run([sys.executable, "-m", "p2pull", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout)


def assert_same_files(directory: Path, files: dict[str, bytes]) -> None:
    found = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}
    assert found == set(files)
    for name, content in files.items():
        assert (directory / name).read_bytes() == content, name


async def test_get_of_an_oras_artifact_is_byte_identical(registry, tmp_path):
    files = model_files()
    digest = oras_push(registry, "models/tiny:v1", files, tmp_path)
    config = config_for(tmp_path)
    progress = Progress()
    result = await client.get(f"{registry.host}/models/tiny:v1", output=tmp_path / "out",
                              config=config, progress=progress)
    assert result.manifest_digest == digest
    assert_same_files(tmp_path / "out", files)
    total = sum(map(len, files.values()))
    assert result.from_origin == result.total_bytes >= total
    assert all(blob.state == "done" for blob in progress.blobs.values())
    # files are hard links of the verified blobs in the store: no second copy on disk
    store_inodes = {p.stat().st_ino for p in (config.data_dir / "blobs/sha256").iterdir()}
    assert (tmp_path / "out/model.safetensors").stat().st_ino in store_inodes

    again = await client.get(f"{registry.host}/models/tiny:v1", output=tmp_path / "out",
                             config=config)
    assert again.from_origin == 0
    assert again.reused == result.total_bytes


async def test_version_switch_is_a_link_swap_and_ls_lists_both(registry, tmp_path):
    first, second = model_files(1), model_files(2)
    oras_push(registry, "models/tiny:v1", first, tmp_path)
    oras_push(registry, "models/tiny:v2", second, tmp_path)
    config = config_for(tmp_path)
    out = tmp_path / "model"
    await client.get(f"{registry.host}/models/tiny:v1", output=out, config=config)
    v1_target = os.readlink(out)
    await client.get(f"{registry.host}/models/tiny:v2", output=out, config=config)
    assert os.readlink(out) != v1_target
    assert_same_files(out, second)
    assert_same_files(Path(v1_target), first)  # the old version is intact until gc
    refs = sorted(record.ref for record in client.ls(config))
    assert refs == [f"{registry.host}/models/tiny:v1", f"{registry.host}/models/tiny:v2"]


def test_cli_get_ls_rm_gc(registry, tmp_path):
    files = model_files()
    oras_push(registry, "models/cli:v1", files, tmp_path)
    data_dir = tmp_path / "store"
    ref = f"{registry.host}/models/cli:v1"
    got = run_cli("get", ref, "-o", str(tmp_path / "out"), "--json", data_dir=data_dir)
    assert got.returncode == 0, got.stderr
    summary = json.loads(got.stdout)
    assert summary["ref"] == ref and summary["from_origin"] == summary["bytes"]
    assert_same_files(tmp_path / "out", files)

    listed = run_cli("ls", "--json", data_dir=data_dir)
    assert [entry["ref"] for entry in json.loads(listed.stdout)] == [ref]
    assert run_cli("rm", ref, data_dir=data_dir).returncode == 0
    assert json.loads(run_cli("ls", "--json", data_dir=data_dir).stdout) == []
    collected = run_cli("gc", data_dir=data_dir)
    assert collected.returncode == 0
    assert "deleted 4 blobs" in collected.stderr  # 3 layers and oras' empty config
    assert not any((data_dir / "blobs/sha256").iterdir())


def test_cli_exit_codes_name_the_problem(registry, tmp_path):
    bad_ref = run_cli("get", "127.0.0.1:5000/Bad/Repo:v1", data_dir=tmp_path)
    assert bad_ref.returncode == 2
    assert "'Bad'" in bad_ref.stderr
    missing = run_cli("get", f"{registry.host}/no/such:v1", data_dir=tmp_path)
    assert missing.returncode == 5
    assert "not found" in missing.stderr
    dead = run_cli("get", "127.0.0.1:9/x/y:v1", data_dir=tmp_path,
                   env={"P2PULL_ORIGIN_ATTEMPTS": "2"})
    assert dead.returncode == 6
    assert "127.0.0.1:9 failed 2 times" in dead.stderr


async def test_basic_auth_with_htpasswd(registry_factory, tmp_path):
    registry = registry_factory(htpasswd=("puller", "s3cret"))
    files = model_files()
    oras_push(registry, "private/model:v1", files, tmp_path)
    ref = f"{registry.host}/private/model:v1"
    with pytest.raises(AuthError, match="requires a user name and password"):
        await client.get(ref, config=config_for(tmp_path))
    wrong = config_for(tmp_path, registries={
        registry.host: RegistryConfig(username="puller", password="nope")})
    with pytest.raises(AuthError, match="refused"):
        await client.get(ref, config=wrong)
    right = config_for(tmp_path, registries={
        registry.host: RegistryConfig(username="puller", password="s3cret")})
    await client.get(ref, output=tmp_path / "out", config=right)
    assert_same_files(tmp_path / "out", files)


def test_credentials_from_docker_config_json(registry_factory, tmp_path):
    registry = registry_factory(htpasswd=("puller", "s3cret"))
    files = model_files()
    oras_push(registry, "private/model:v1", files, tmp_path)
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    import base64
    auth = base64.b64encode(b"puller:s3cret").decode()
    (docker_dir / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": auth}}}))
    got = run_cli("get", f"{registry.host}/private/model:v1", "-o", str(tmp_path / "out"),
                  data_dir=tmp_path / "store", env={"DOCKER_CONFIG": str(docker_dir)})
    assert got.returncode == 0, got.stderr
    assert_same_files(tmp_path / "out", files)


async def test_bearer_token_flow(registry_factory, token_server_factory, tmp_path):
    tokens = token_server_factory(users={"alice": "wonder"})
    registry = registry_factory(token=tokens)
    files = model_files()
    oras_push(registry, "team/model:v1", files, tmp_path, credentials=("alice", "wonder"))
    before = tokens.requests
    config = config_for(tmp_path, registries={
        registry.host: RegistryConfig(username="alice", password="wonder")})
    await client.get(f"{registry.host}/team/model:v1", output=tmp_path / "out", config=config)
    assert_same_files(tmp_path / "out", files)
    # one token for the repository, reused by every manifest and blob request
    assert tokens.requests - before == 1
    anonymous = config_for(tmp_path / "anon")
    with pytest.raises(AuthError, match="refused anonymous"):
        await client.get(f"{registry.host}/team/model:v1", config=anonymous)


async def test_missing_tag_is_not_found(registry, tmp_path):
    oras_push(registry, "models/tiny:v1", model_files(), tmp_path)
    with pytest.raises(NotFoundError):
        await client.get(f"{registry.host}/models/tiny:v9", config=config_for(tmp_path))


async def test_ranged_requests_reuse_their_connections(registry, tmp_path):
    from tests.support.proxy import Proxy
    oras_push(registry, "models/tiny:v1", model_files(), tmp_path)
    config = config_for(tmp_path, origin_max_connections=4)
    counters = OriginCounters()
    with Proxy(registry.host) as proxy:
        await client.get(f"{proxy.host}/models/tiny:v1", config=config,
                         origin_counters=counters)
        connections = proxy.connections
    assert counters.requests > 12  # many ranges: the blob is cut into shrinking requests
    # at most the 4 workers, plus the manifest and the 3 blobs' HEADs alongside them
    assert connections <= 4 + 4
    assert counters.requests >= 2 * connections  # each connection served several

"""`get` against the small in-process origin (an OCI layout served over HTTP): platform
choice, corrupt origins, full disks, concurrent pulls of the same blob."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from p2pull import client
from p2pull.config import load_config
from p2pull.errors import DiskFullError, IntegrityError, PlatformError
from p2pull.origin.layout_server import LayoutOrigin
from p2pull.origin.manifest import OCI_INDEX, OCI_MANIFEST
from tests.support.registry import make_oci_layout


def config_for(data_dir: Path, **overrides):
    return load_config(env={}, data_dir=data_dir, **overrides)


def add_blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


@pytest.fixture
def layout(tmp_path):
    files = {"weights.bin": os.urandom(3 * 1024 * 1024 + 17), "config.json": b'{"a": 1}'}
    make_oci_layout(tmp_path / "layout", files, tag="v1")
    return tmp_path / "layout", files


async def test_index_picks_the_requested_platform(tmp_path):
    layout = tmp_path / "layout"
    make_oci_layout(layout, {"f": b"placeholder"}, tag="unused")
    entries = []
    for arch in ("amd64", "arm64"):
        config = add_blob(layout, json.dumps({"architecture": arch}).encode())
        layer = add_blob(layout, f"layer for {arch}".encode())
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
            "layers": [{"mediaType": "application/vnd.custom.raw", **layer,
                        "annotations": {"org.opencontainers.image.title": "arch.txt"}}]})
        entries.append({"mediaType": OCI_MANIFEST, **add_blob(layout, manifest.encode()),
                        "platform": {"os": "linux", "architecture": arch}})
    index = add_blob(layout, json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                         "manifests": entries}).encode())
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_INDEX, **index,
         "annotations": {"org.opencontainers.image.ref.name": "multi"}}]}))
    with LayoutOrigin(layout) as origin:
        for arch in ("arm64", "amd64"):
            out = tmp_path / f"out-{arch}"
            await client.get(f"{origin.host}/any/repo:multi", output=out,
                             platform=f"linux/{arch}", config=config_for(tmp_path / "store"))
            assert (out / "arch.txt").read_text() == f"layer for {arch}"
        with pytest.raises(PlatformError, match="offers linux/amd64, linux/arm64"):
            await client.get(f"{origin.host}/any/repo:multi", platform="linux/s390x",
                             config=config_for(tmp_path / "store"))


async def test_corrupt_origin_publishes_nothing(layout, tmp_path):
    layout_dir, files = layout
    blob = next(p for p in (layout_dir / "blobs/sha256").iterdir()
                if p.stat().st_size == len(files["weights.bin"]))
    data = bytearray(blob.read_bytes())
    data[1_000_000] ^= 0xFF  # same size, one bit pattern changed: only the digest can tell
    blob.write_bytes(bytes(data))
    store = tmp_path / "store"
    with LayoutOrigin(layout_dir) as origin:
        with pytest.raises(IntegrityError, match="nothing was published"):
            await client.get(f"{origin.host}/m:v1", output=tmp_path / "out",
                             config=config_for(store))
    assert not (store / "blobs/sha256" / blob.name).exists()
    assert not (tmp_path / "out").exists()
    assert client.ls(config_for(store)) == []


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"),
                    reason="mounting a small tmpfs to fill needs root")
async def test_full_disk_is_a_clear_error_and_resumes_after_space_is_freed(layout, tmp_path):
    layout_dir, files = layout
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        with LayoutOrigin(layout_dir) as origin:
            ref = f"{origin.host}/m:v1"
            with pytest.raises(DiskFullError, match="free space"):
                await client.get(ref, config=config_for(small / "store"))
            assert not any((small / "store/blobs/sha256").iterdir()) or all(
                p.stat().st_size < 100 for p in (small / "store/blobs/sha256").iterdir())
            subprocess.run(["mount", "-o", "remount,size=16m", str(small)], check=True)
            result = await client.get(ref, output=tmp_path / "out",
                                      config=config_for(small / "store"))
            assert (tmp_path / "out/weights.bin").read_bytes() == files["weights.bin"]
            assert result.from_origin <= result.total_bytes
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_two_processes_pulling_the_same_blob_both_succeed(layout, tmp_path):
    layout_dir, files = layout
    store = tmp_path / "store"
    with LayoutOrigin(layout_dir) as origin:
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PULL_")}
        env["P2PULL_DATA_DIR"] = str(store)
        pulls = [subprocess.Popen([sys.executable, "-m", "p2pull", "get", f"{origin.host}/m:v1",
                                   "-o", str(tmp_path / f"out{n}"), "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                  text=True) for n in range(2)]
        results = [pull.communicate(timeout=60) for pull in pulls]
        served = origin.bytes_served
    for pull, (out, err) in zip(pulls, results):
        assert pull.returncode == 0, err
    for n in range(2):
        assert (tmp_path / f"out{n}/weights.bin").read_bytes() == files["weights.bin"]
    origin_bytes = sum(json.loads(out)["from_origin"] for out, _ in results)
    total = json.loads(results[0][0])["bytes"]
    # one process fetched, the other waited on the blob lock and reused: about one copy
    assert origin_bytes <= total * 1.05
    assert served <= total * 1.05 + 64 * 1024  # plus manifests


async def test_offline_get_serves_a_recorded_ref(layout, tmp_path):
    layout_dir, files = layout
    store = tmp_path / "store"
    with LayoutOrigin(layout_dir) as origin:
        ref = f"{origin.host}/m:v1"
        await client.get(ref, config=config_for(store))
    # the origin is gone now
    result = await client.get(ref, output=tmp_path / "out",
                              config=config_for(store, origin_attempts=1))
    assert result.offline and result.from_origin == 0
    assert (tmp_path / "out/weights.bin").read_bytes() == files["weights.bin"]


async def test_oci_layout_output_is_accepted_by_skopeo(layout, tmp_path):
    if not shutil.which("skopeo"):
        pytest.skip("skopeo not installed: run `make test`, which installs it")
    layout_dir, files = layout
    with LayoutOrigin(layout_dir) as origin:
        await client.get(f"{origin.host}/m:v1", output=tmp_path / "oci", format="oci-layout",
                         config=config_for(tmp_path / "store"))
    copied = tmp_path / "copied"
    done = await trio.run_process(["skopeo", "--insecure-policy", "copy",
                                   f"oci:{tmp_path / 'oci'}:v1", f"dir:{copied}"],
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr
    weights = hashlib.sha256(files["weights.bin"]).hexdigest()
    assert (copied / weights).read_bytes() == files["weights.bin"]


async def test_download_rate_limit_is_honoured(layout, tmp_path):
    layout_dir, files = layout
    rate = 1_000_000
    with LayoutOrigin(layout_dir) as origin:
        result = await client.get(f"{origin.host}/m:v1",
                                  config=config_for(tmp_path / "store", download_rate=rate))
    # the first second's worth is a burst; the rest moves at the rate
    assert result.seconds >= (result.total_bytes - rate) / rate * 0.9

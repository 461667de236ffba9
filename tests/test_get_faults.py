"""`get` through an unreliable origin: CNCF Distribution behind a proxy that answers 503 and
429, cuts connections mid-body, or is killed mid-pull; the result must still be correct and
a resumed pull must fetch only what was missing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from p2pull import client
from p2pull.config import load_config
from p2pull.origin.client import OriginCounters
from tests.support.proxy import FaultPlan, FaultyHttpProxy, Proxy
from tests.support.registry import oras_push
from tests.test_get import assert_same_files, model_files

#: the partial download must hold at least this share before the test kills the puller
KILL_AFTER_SHARE = 0.3
KILL_DEADLINE_SECONDS = 60


async def test_503_429_and_cut_connections_still_give_a_correct_result(registry, tmp_path):
    files = model_files()
    oras_push(registry, "models/flaky:v1", files, tmp_path)
    plan = FaultPlan(path_pattern="/blobs/", seed=3, unavailable=0.15, retry_after_s=1,
                     throttle=0.1, cut=0.25, cut_after_bytes=300_000)
    counters = OriginCounters()
    with FaultyHttpProxy(registry.host, plan) as proxy:
        config = load_config(env={}, data_dir=tmp_path / "store")
        result = await client.get(f"{proxy.host}/models/flaky:v1", output=tmp_path / "out",
                                  config=config, origin_counters=counters)
        faults = dict(proxy.faults_injected)
    assert_same_files(tmp_path / "out", files)
    assert faults.get("503") and faults.get("429") and faults.get("cut"), faults
    assert counters.retries >= sum(faults.values())
    # a cut resumes from the next byte: only the lost tail of a cut body is fetched twice
    assert result.from_origin == result.total_bytes


def test_kill_9_mid_pull_then_get_fetches_only_what_was_missing(registry, tmp_path):
    files = model_files()
    total = sum(map(len, files.values()))
    oras_push(registry, "models/big:v1", files, tmp_path)
    data_dir = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PULL_")}
    env["P2PULL_DATA_DIR"] = str(data_dir)
    # a slow origin, so the kill lands mid-pull; the proxy counts the bytes it delivers
    with Proxy(registry.host, conn_rate="3MB", link_rate="6MB") as proxy:
        ref = f"{proxy.host}/models/big:v1"
        puller = subprocess.Popen([sys.executable, "-m", "p2pull", "get", ref, "-q"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + KILL_DEADLINE_SECONDS
            while partial_bytes(data_dir) < KILL_AFTER_SHARE * total:
                assert puller.poll() is None, puller.stderr.read()
                assert time.monotonic() < deadline, "the pull made no progress"
                time.sleep(0.05)
        finally:
            puller.send_signal(signal.SIGKILL)
            puller.wait()
        held_at_kill = partial_bytes(data_dir)
        first_run = proxy.bytes_down
        assert held_at_kill < total  # it really died mid-pull

    with Proxy(registry.host) as proxy:
        resumed = subprocess.run([sys.executable, "-m", "p2pull", "get",
                                  f"{proxy.host}/models/big:v1", "-o", str(tmp_path / "out"),
                                  "--json"], env=env, capture_output=True, text=True,
                                 timeout=120)
        second_run = proxy.bytes_down
    assert resumed.returncode == 0, resumed.stderr
    assert_same_files(tmp_path / "out", files)
    summary = json.loads(resumed.stdout)
    assert summary["reused"] >= held_at_kill
    assert summary["from_origin"] == summary["bytes"] - summary["reused"]
    # on the wire: what was missing, plus manifests and HTTP heads
    assert second_run <= total - held_at_kill + 64 * 1024
    assert first_run + second_run < 1.5 * total


def partial_bytes(data_dir: Path) -> int:
    """Bytes of chunks recorded as held in the partial downloads' chunk logs."""
    held = 0
    for log in (data_dir / "partial").glob("*.chunks"):
        raw = log.read_bytes()
        if len(raw) < 24:
            continue
        size, chunk_size = int.from_bytes(raw[8:16], "big"), int.from_bytes(raw[16:24], "big")
        records = (len(raw) - 24) // 20
        held += min(records * chunk_size, size)
    return held


def test_partial_download_is_never_visible_as_a_blob(registry, tmp_path):
    """While a pull runs, every file in blobs/ already hashes to its name."""
    files = model_files(5)
    oras_push(registry, "models/watch:v1", files, tmp_path)
    data_dir = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PULL_")}
    env["P2PULL_DATA_DIR"] = str(data_dir)
    with Proxy(registry.host, link_rate="20MB") as proxy:
        puller = subprocess.Popen([sys.executable, "-m", "p2pull", "get",
                                   f"{proxy.host}/models/watch:v1", "-q"], env=env)
        checked = set()
        while puller.poll() is None or len(checked) < 4:
            for blob in (data_dir / "blobs/sha256").glob("*") if data_dir.exists() else []:
                if blob.name not in checked:
                    assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
                    checked.add(blob.name)
            if puller.poll() is not None and len(checked) < 4:
                break
            time.sleep(0.02)
    assert puller.returncode == 0
    assert len(checked) == 4  # three layers and the config

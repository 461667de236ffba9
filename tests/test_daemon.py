"""One daemon as a real process: the local API, get through it, status, metrics, stop."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from p2pull.origin.layout_server import LayoutOrigin
from tests.support.registry import free_port, make_oci_layout

STARTUP_SECONDS = 20


def cli(*args, env, timeout=60):
    return subprocess.run([sys.executable, "-m", "p2pull", *args], env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture
def daemon(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PULL_")}
    metrics_port = free_port()
    env.update(P2PULL_DATA_DIR=str(tmp_path / "store"), P2PULL_LISTEN=f"127.0.0.1:{free_port()}",
               P2PULL_DISCOVERY="static", P2PULL_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")
    process = subprocess.Popen([sys.executable, "-m", "p2pull", "daemon"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while cli("status", "--json", env=env).returncode != 0:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.1)
        yield process, env, metrics_port
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_get_through_the_daemon_reports_status_and_metrics(daemon, tmp_path):
    process, env, metrics_port = daemon
    files = {"w.bin": os.urandom(5 * 1024 * 1024), "config.json": b"{}"}
    make_oci_layout(tmp_path / "layout", files, tag="v1")
    socket_path = tmp_path / "store/p2pull.sock"
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o660
    with LayoutOrigin(tmp_path / "layout") as origin:
        got = cli("get", f"{origin.host}/m:v1", "-o", str(tmp_path / "out"), "--json", env=env)
        served = origin.bytes_served
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "out/w.bin").read_bytes() == files["w.bin"]
    summary = json.loads(got.stdout)
    assert summary["from_origin"] == summary["bytes"] > 5 * 1024 * 1024

    status = json.loads(cli("status", "--json", env=env).stdout)
    assert status["origin_bytes"] == summary["bytes"]  # the daemon did the fetch
    assert status["peers"] == 0 and status["sessions"] == []
    assert served >= summary["bytes"]
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples}
    assert samples[("p2pull_origin_bytes_total", ())] == summary["bytes"]
    assert samples[("p2pull_peers", (("state", "connected"),))] == 0
    assert json.loads(cli("peers", "--json", env=env).stdout) == []
    assert [entry["ref"] for entry in json.loads(cli("ls", "--json", env=env).stdout)] == \
        [f"{origin.host}/m:v1"]

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    assert not socket_path.exists()


def test_errors_come_back_through_the_daemon_with_their_exit_code(daemon, tmp_path):
    _process, env, _ = daemon
    make_oci_layout(tmp_path / "layout", {"a": b"a"}, tag="v1")
    with LayoutOrigin(tmp_path / "layout") as origin:
        missing = cli("get", f"{origin.host}/m:nope", env=env)
    assert missing.returncode == 5
    assert "not found" in missing.stderr


def test_status_without_a_daemon_says_how_to_start_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PULL_")}
    env["P2PULL_DATA_DIR"] = str(tmp_path)
    answer = cli("status", env=env)
    assert answer.returncode == 2
    assert "start one with `p2pull daemon`" in answer.stderr

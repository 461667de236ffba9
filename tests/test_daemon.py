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


def cli(*args, env, timeout=60, python_args=False):
    """``p2pull ARGS``; with ``python_args``, ARGS go to Python itself (``-X ... -m ...``)."""
    command = [sys.executable, *args] if python_args else [sys.executable, "-m", "p2pull", *args]
    return subprocess.run(command, env=env, text=True, capture_output=True, timeout=timeout)


def start_daemon(data_dir, **settings):
    """A daemon process on loopback; returns (process, env). The caller kills it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PULL_")}
    env.update({"P2PULL_DATA_DIR": str(data_dir), "P2PULL_LISTEN": f"127.0.0.1:{free_port()}",
                "P2PULL_DISCOVERY": "static", **settings})
    process = subprocess.Popen([sys.executable, "-m", "p2pull", "daemon"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + STARTUP_SECONDS
    while cli("status", "--json", env=env).returncode != 0:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the daemon did not start: {process.communicate()[1]}")
        time.sleep(0.1)
    return process, env


def stop(process):
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture
def daemon(tmp_path):
    metrics_port = free_port()
    process, env = start_daemon(tmp_path / "store",
                                P2PULL_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")
    try:
        yield process, env, metrics_port
    finally:
        stop(process)


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


#: what a CLI talking to its daemon must not import: each costs CPU at the start of every
#: node's `p2pull get` (trio and httpx together ~0.25 s), when the cluster is busiest
HEAVY_MODULES = ("trio", "httpx", "rich", "zeroconf", "p2pull.net", "p2pull.core.swarm",
                 # http.client brings the email package and ssl: 50 ms of a 120 ms start
                 "http.client", "email", "ssl")


def test_get_status_and_peers_through_the_daemon_import_no_event_loop(daemon, tmp_path):
    _process, env, _ = daemon
    make_oci_layout(tmp_path / "layout", {"w.bin": os.urandom(300_000)}, tag="v1")
    with LayoutOrigin(tmp_path / "layout") as origin:
        runs = [cli("-X", "importtime", "-m", "p2pull", *args, env=env, python_args=True)
                for args in (("get", f"{origin.host}/m:v1", "--json"), ("status",),
                             ("peers", "--json"))]
    for run in runs:
        assert run.returncode == 0, run.stderr
        imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines()
                    if line.startswith("import time:")}
        heavy = sorted(m for m in imported
                       if any(m == h or m.startswith(h + ".") for h in HEAVY_MODULES))
        assert heavy == [], run.args
    assert json.loads(runs[0].stdout)["bytes"] >= 300_000


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


def test_daemons_find_each_other_by_mdns_and_share_a_pull(tmp_path):
    cluster = f"mdns-test-{os.getpid()}-{time.monotonic_ns()}"
    daemons = []
    try:
        for n in range(2):
            daemons.append(start_daemon(tmp_path / f"node{n}", P2PULL_DISCOVERY="mdns",
                                        P2PULL_CLUSTER=cluster))
        deadline = time.monotonic() + 10
        for _, env in daemons:
            while len(json.loads(cli("peers", "--json", env=env).stdout)) != 1:
                assert time.monotonic() < deadline, "mDNS did not find the other daemon"
                time.sleep(0.2)
        files = {"w.bin": os.urandom(8 * 1024 * 1024)}
        make_oci_layout(tmp_path / "layout", files, tag="v1")
        with LayoutOrigin(tmp_path / "layout") as origin:
            pulls = [subprocess.Popen([sys.executable, "-m", "p2pull", "get",
                                       f"{origin.host}/m:v1", "-o", str(tmp_path / f"out{n}"),
                                       "--json"], env=env, stdout=subprocess.PIPE, text=True)
                     for n, (_, env) in enumerate(daemons)]
            results = [json.loads(pull.communicate(timeout=60)[0]) for pull in pulls]
            served = origin.bytes_served
        for n in range(2):
            assert (tmp_path / f"out{n}/w.bin").read_bytes() == files["w.bin"]
        assert served <= 1.1 * results[0]["bytes"] + 64 * 1024
        assert sum(result["from_peers"] for result in results) > 0
    finally:
        for process, _ in daemons:
            stop(process)


def test_preload_warms_every_node_and_status_cluster_shows_it(tmp_path):
    ports = [free_port() for _ in range(3)]
    daemons = []
    try:
        for n, port in enumerate(ports):
            peers = ",".join(f"127.0.0.1:{p}" for p in ports if p != port)
            daemons.append(start_daemon(tmp_path / f"node{n}", P2PULL_PEERS=peers,
                                        P2PULL_LISTEN=f"127.0.0.1:{port}"))
        deadline = time.monotonic() + 15
        for _, env in daemons:
            while len(json.loads(cli("peers", "--json", env=env).stdout)) != 2:
                assert time.monotonic() < deadline, "the daemons did not connect"
                time.sleep(0.2)
        files = {"w.bin": os.urandom(6 * 1024 * 1024)}
        make_oci_layout(tmp_path / "layout", files, tag="v1")
        with LayoutOrigin(tmp_path / "layout") as origin:
            ref = f"{origin.host}/m:v1"
            preload = cli("preload", ref, "--timeout", "60", env=daemons[0][1], timeout=90)
            served = origin.bytes_served
        assert preload.returncode == 0, preload.stderr
        assert "3/3 nodes hold" in preload.stderr
        assert served <= 1.1 * len(files["w.bin"]) + 64 * 1024  # once for the cluster
        reports = json.loads(cli("status", "--cluster", "--json", env=daemons[2][1]).stdout)
        assert len(reports) == 3
        assert all(report["refs"] == [ref] for report in reports)
        bad = cli("preload", "Not A Ref", env=daemons[0][1])
        assert bad.returncode == 2
    finally:
        for process, _ in daemons:
            stop(process)

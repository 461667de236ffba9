"""End to end in the namespace lab (benchmarks/lab): four daemons in four network
namespaces on a shaped bridge find each other by mDNS alone, pull a model from CNCF
Distribution running in a fifth namespace, and the origin serves it about once; then the
same four in two racks behind oversubscribed uplinks, told their racks, bring the model
into each rack about once.

The gets are started as the harness's ``--start api`` does: the request ``p2pull get``
sends is posted to every daemon's API at the same moment. Started as ``p2pull get``
processes instead, a busy 2-core machine spreads their starts over seconds, and a node that
starts late can fetch from the origin chunks an earlier node is still fetching (up to 1.33x
F measured under load), which is a property of the swarm worth its own test, not noise to
let into this one. ``python -m benchmarks.lab.run`` runs the CLI way by default.

Needs root, ``ip netns`` and ``tc`` (iproute2), ``docker-registry``, ``skopeo`` and
``curl``: ``make test`` installs them and CI runs as root, so CI runs this test; elsewhere
it skips with the reason. Traffic stays inside the namespaces the lab makes, and the lab
is taken down (processes by PID, then namespaces) whatever happens.
"""

from __future__ import annotations

import shutil

import pytest

from benchmarks.lab import netns
from benchmarks.lab.run import Options, run_lab

NODES = 4
SIZE = 32 * 2**20
RATE = 400 * 10**6  # bit/s: modest shaping, so the test stays short
DISCOVERY_LIMIT = 5.0
ORIGIN_LIMIT = 1.1
#: bounds each phase of the lab; the whole test takes ~15-25 s
PHASE_TIMEOUT = 30.0


def _unavailable() -> str | None:
    why = netns.available()
    if why:
        return why
    for tool in ("docker-registry", "skopeo", "curl"):
        if shutil.which(tool) is None:
            return f"needs {tool}: `make test` installs it"
    return None


pytestmark = pytest.mark.skipif(bool(_unavailable()), reason=_unavailable() or "")


def run_small_lab(workdir, **options) -> dict:
    """The p2pull phase of a 4-node lab, gets posted to the daemons at once."""
    lines: list[str] = []
    try:
        result = run_lab(Options(nodes=NODES, up=RATE, down=RATE, origin_up=RATE, size=SIZE,
                                 baselines=(), rounds=1, workdir=workdir,
                                 phase_timeout=PHASE_TIMEOUT, start="api", log=lines.append,
                                 **options))
    except Exception as exc:
        raise AssertionError(f"the lab failed: {exc}\n" + "\n".join(lines)) from exc
    result["log"] = lines
    return result


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return run_small_lab(tmp_path_factory.mktemp("lab"))


def test_every_node_gets_byte_identical_files(report):
    phase = report["rounds"][0]["p2pull"]
    failed = [(n["node"], n["error"]) for n in phase["nodes"] if not n["ok"]]
    assert not failed, failed  # ok means exit 0, a JSON result, and every sha256 matches
    assert len(phase["nodes"]) == NODES
    assert all(n["from_origin"] + n["from_peers"] >= report["params"]["size_bytes"]
               for n in phase["nodes"]), phase["nodes"]


def test_mdns_finds_every_peer_within_5_s(report):
    discovery = report["rounds"][0]["p2pull"]["discovery"]
    assert discovery["discovery_seconds"] <= DISCOVERY_LIMIT, discovery


def test_origin_sends_the_model_about_once(report):
    phase = report["rounds"][0]["p2pull"]
    assert phase["origin_bytes_over_F"] <= ORIGIN_LIMIT, (
        phase["origin_bytes_over_F"], [(n["node"], n["from_origin"]) for n in phase["nodes"]])
    # the peers carried the rest: no node took the whole model from the origin
    assert all(n["from_peers"] > 0 for n in phase["nodes"]), phase["nodes"]


def test_the_lab_is_taken_down(report):
    left = [ns for ns in netns.list_namespaces() if ns in report["params"]["namespaces"]]
    assert not left, f"namespaces left behind: {left}"


# -- two racks behind oversubscribed uplinks, the daemons told their racks -------------------

#: each rack's uplink, each way: 2 nodes x 400 Mbit/s over 50 Mbit/s is 16:1
UPLINK = 50 * 10**6
#: what may enter a rack, over F: the model once, plus TCP's retransmissions through the
#: uplinks' queues (this lab measured 1.09-1.12 with labels, 1.29-1.40 without)
INTO_RACK_LIMIT = 1.2


@pytest.fixture(scope="module")
def rack_report(tmp_path_factory) -> dict:
    return run_small_lab(tmp_path_factory.mktemp("racks"), racks=2, uplink=UPLINK,
                         rack_labels=True)


def test_across_racks_mdns_finds_every_peer_and_every_node_gets_the_model(rack_report):
    phase = rack_report["rounds"][0]["p2pull"]
    assert [(n["node"], n["error"]) for n in phase["nodes"] if not n["ok"]] == []
    assert phase["discovery"]["discovery_seconds"] <= DISCOVERY_LIMIT, phase["discovery"]


def test_with_rack_labels_the_model_enters_each_rack_about_once(rack_report):
    uplinks = rack_report["rounds"][0]["p2pull"]["rack_uplinks_out_in_over_F"]
    assert len(uplinks) == 2
    assert all(1.0 <= into <= INTO_RACK_LIMIT for _, into in uplinks), uplinks
    left = [ns for ns in netns.list_namespaces() if ns in rack_report["params"]["namespaces"]]
    assert not left, f"namespaces left behind: {left}"

"""The namespace lab: a cluster pull measured on real network stacks, against the
Kumar–Ross lower bound, the origin alone and libtorrent, all in the same lab and run.

    .venv/bin/python -m benchmarks.lab.run --nodes 8 --rate 100mbit --origin-rate 100mbit \
        --size 512MiB [--baselines origin,libtorrent] [--rounds 1] [--json OUT]

As root. ``benchmarks.lab.netns`` builds N node namespaces and an origin namespace on a
bridge, shaped by tbf. CNCF Distribution runs in the origin namespace with a generated
model pushed by skopeo (from inside that namespace, to its own address). Then, per round:

1. **p2pull**: one ``p2pull daemon`` per node namespace, discovery by mDNS only, fresh
   stores; the harness waits until every daemon has a link to all N-1 others (the
   discovery time), runs ``p2pull get REF -o DIR --json`` in every namespace at once and
   times each to its exit (wall clock from the common start) and by its JSON ``seconds``.
2. **origin** (baseline): the same ``p2pull get`` with no daemon and no peers
   (``P2PULL_DISCOVERY=static``, no ``P2PULL_PEERS``): every node pulls from the origin
   alone.
3. **libtorrent** (baseline): a seed in the origin namespace (so at the origin's cap), a
   leecher in each node namespace, no tracker, peers added by hand, DHT/LSD/UPnP/NAT-PMP/uTP
   off (``benchmarks/lab/lt_node.py``); each leecher is timed from the common "go" to the
   moment it holds every piece.

Every phase's output is checked by sha256 against the generated files, and the origin's
egress bytes are read from its veth's interface counters. The table goes to stdout, the
report (schema in benchmarks/lab/README.md) to ``--json``. Traffic stays inside the lab's
namespaces (they have no route anywhere else); everything is cleaned up at the end, on an
error, on Ctrl-C and on SIGTERM. Exit status: 0 (goals missed print FAIL), 1 when a phase
failed or delivered wrong bytes, 2 for bad arguments or a machine that cannot build the
lab, 3 with ``--check`` when a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.far_origin import (GeneratedFile, clean_env, generate_model, p2pull_command,
                                   sha256_file)
from benchmarks.lab.netns import Host, Lab, LabError, available, format_rate, parse_rate
from p2pull.config import parse_size
from tests.support.registry import make_oci_layout

SCHEMA = "p2pull-lab/1"
MIB = 2**20
REGISTRY_PORT = 5000
PEER_PORT = 7420
LT_PORT = 6881
REPO_TAG = "lab/model:v1"
#: all daemons must be linked to all others within this long after the launch
MESH_TIMEOUT = 30.0
#: the registry must answer within this long
REGISTRY_TIMEOUT = 15.0
#: libtorrent nodes must listen within this long
LT_START_TIMEOUT = 30.0
#: interface counters and CPU are sampled this often during a phase
SAMPLE_INTERVAL = 1.0
LT_NODE = Path(__file__).with_name("lt_node.py")
PHASES = ("p2pull", "origin", "libtorrent")
GOALS = {"p2pull_max_over_bound": 1.2, "p2pull_median_over_bound": 1.1,
         "origin_bytes_over_F": 1.05, "origin_only_over_p2pull": 6.0,
         "p2pull_over_libtorrent": 1.0}


class PhaseError(RuntimeError):
    """A phase failed or delivered wrong bytes: it has no valid figure."""


@dataclass
class Options:
    nodes: int = 8
    #: bit/s per node; None: unshaped
    up: int | None = 100 * 10**6
    down: int | None = 100 * 10**6
    origin_up: int | None = 100 * 10**6
    origin_down: int | None = None
    size: int = 512 * MIB
    baselines: tuple[str, ...] = ("origin", "libtorrent")
    rounds: int = 1
    mtu: int = 1500
    workdir: Path | None = None
    keep: bool = False
    #: seconds a phase may take; None: derived from the bound
    phase_timeout: float | None = None
    #: how p2pull's gets are started: "cli" runs ``p2pull get`` in every namespace;
    #: "api" posts the same request to every daemon's API from the harness at once (no
    #: process start-up, so no start skew from a busy CPU)
    start: str = "cli"
    #: p2pull's chunk size (P2PULL_CHUNK_SIZE); None: the protocol's rule for each blob
    chunk_size: str | None = None
    #: more p2pull settings for every daemon, as P2PULL_* variables (name -> value)
    settings: dict[str, str] = field(default_factory=dict)
    #: racks the nodes are dealt into (round robin; 1: none), their uplinks' rate each way
    #: (bit/s), and whether each daemon is told its rack (P2PULL_RACK)
    racks: int = 1
    uplink: int | None = None
    rack_labels: bool = False
    log: Callable[[str], None] = field(default=lambda line: print(line, flush=True))


# ------------------------------------------------------------------ the bound


def kumar_ross(size: int, nodes: int, up: list[int | None], down: list[int | None],
               origin_up: int | None) -> dict:
    """T_min = max(F/u_origin, F/d_min, N·F/(u_origin + Σ u_i)), rates in bit/s (None:
    unlimited, so its term is 0). Also the same bound at TCP's payload share of a shaped
    link (tbf counts Ethernet, IP and TCP headers: MTU-52 payload bytes per MTU+14)."""
    def per_second(bits):
        return None if bits is None else bits / 8
    u0 = per_second(origin_up)
    downs = [per_second(d) for d in down]
    ups = [per_second(u) for u in up]
    terms = {
        "origin": size / u0 if u0 else 0.0,
        "download": size / min(d for d in downs if d) if any(downs) and all(downs) else 0.0,
        "aggregate": nodes * size / (u0 + sum(ups)) if u0 and all(ups) else 0.0,
    }
    t_min = max(terms.values()) or None
    return {"t_min_seconds": t_min, "terms_seconds": terms}


def tcp_efficiency(mtu: int) -> float:
    return (mtu - 52) / (mtu + 14)


# ------------------------------------------------------------------ sampling


class Sampler:
    """Every SAMPLE_INTERVAL: each host's bytes sent and received (bridge-side counters),
    the machine's CPU busy share and, given the daemons' APIs, each daemon's bytes from the
    origin and to peers (which the interface counters cannot tell apart from peer bytes) and
    its swarms' state summed over its sessions (``BlobSwarm.snapshot``: chunks pickable,
    requested, fetched from the origin, ...), which shows whether a node waits for chunks
    to exist or for the peers holding them."""

    def __init__(self, lab: Lab, apis: dict[str, httpx.Client] | None = None):
        self.lab = lab
        self.apis = apis or {}
        self.samples: list[tuple[float, dict, float]] = []
        self.daemon_samples: list[dict[str, tuple[int, int, dict] | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self.started = time.monotonic()
        self._cpu = _cpu_times()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self._sample()

    def _sample(self) -> None:
        try:
            counters = self.lab.bridge_counters()
        except (LabError, subprocess.TimeoutExpired):
            return
        busy, total = _cpu_times()
        share = (busy - self._cpu[0]) / max(1, total - self._cpu[1])
        self._cpu = (busy, total)
        self.samples.append((time.monotonic() - self.started, counters, share))
        if self.apis:
            self.daemon_samples.append({name: _daemon_sample(api)
                                        for name, api in self.apis.items()})

    def timeline(self) -> dict:
        """Cumulative bytes since the start per host, and CPU busy share per interval."""
        if not self.samples:
            return {}
        first = self.samples[0][1]
        names = list(first)
        return {
            "t": [round(t, 2) for t, _, _ in self.samples],
            "sent": {n: [c[n][0] - first[n][0] for _, c, _ in self.samples] for n in names},
            "received": {n: [c[n][1] - first[n][1] for _, c, _ in self.samples]
                         for n in names},
            "cpu_busy": [round(s, 3) for _, _, s in self.samples],
            **self._daemon_timeline(),
        }

    def _daemon_timeline(self) -> dict:
        if not self.daemon_samples:
            return {}
        series = {"origin_bytes": {}, "to_peers": {}, "swarm": {}}
        for name in self.apis:
            for column, key in enumerate(series):
                series[key][name] = [None if sample[name] is None else sample[name][column]
                                     for sample in self.daemon_samples]
        return series

    def cpu_busy(self) -> float | None:
        shares = [s for _, _, s in self.samples[1:]]
        return round(statistics.mean(shares), 3) if shares else None


def _daemon_sample(api: httpx.Client) -> tuple[int, int, dict] | None:
    """(bytes from the origin, bytes to peers, its swarms' snapshot summed over sessions) a
    daemon counted so far; None if it did not answer."""
    try:
        status = api.get("/status").json()
        swarm: dict[str, int] = {}
        for session in status["sessions"]:
            for key, value in (session.get("swarm") or {}).items():
                swarm[key] = swarm.get(key, 0) + value
        return status["origin_bytes"], status["bytes_to_peers"], swarm
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


# ------------------------------------------------------------------ the origin


def start_registry(lab: Lab, work: Path) -> subprocess.Popen:
    """CNCF Distribution inside the origin namespace on its lab address."""
    root = work / "registry"
    (root / "storage").mkdir(parents=True)
    config = {"version": "0.1", "log": {"level": "info"},
              "storage": {"filesystem": {"rootdirectory": str(root / "storage")},
                          "delete": {"enabled": True}},
              "http": {"addr": f"{lab.origin.address}:{REGISTRY_PORT}",
                       "secret": os.urandom(16).hex()}}
    (root / "config.yml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    log = open(root / "registry.log", "wb")
    process = lab.popen(lab.origin.ns, ["docker-registry", "serve", str(root / "config.yml")],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    log.close()
    url = f"http://{lab.origin.address}:{REGISTRY_PORT}/v2/"
    deadline = time.monotonic() + REGISTRY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        probe = lab.run(lab.origin.ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                        "--max-time", "1", url])
        if probe.stdout.strip() in ("200", "401"):
            return process
        time.sleep(0.05)
    tail = (root / "registry.log").read_text(errors="replace")[-2000:]
    raise PhaseError(f"the registry did not start in {lab.origin.ns}:\n{tail}")


def push_model(lab: Lab, work: Path, files: list[GeneratedFile]) -> str:
    """skopeo, inside the origin namespace, copies an OCI layout of the model to the
    registry at the origin's own address; returns the manifest digest."""
    layout = work / "layout"
    tag = REPO_TAG.rpartition(":")[2]
    make_oci_layout(layout, {f.name: f.path for f in files}, tag=tag)
    digest_file = work / "pushed-digest"
    result = lab.run(lab.origin.ns, [
        "skopeo", "--insecure-policy", "copy", "--preserve-digests", "--dest-tls-verify=false",
        "--digestfile", str(digest_file), f"oci:{layout}:{tag}",
        f"docker://{lab.origin.address}:{REGISTRY_PORT}/{REPO_TAG}"], timeout=600)
    if result.returncode != 0:
        raise PhaseError(f"skopeo push failed:\n{result.stderr[-3000:]}")
    shutil.rmtree(layout)
    return digest_file.read_text().strip()


# ------------------------------------------------------------------ one phase's pieces


def verify_dir(directory: Path, files: list[GeneratedFile]) -> list[str]:
    """Problems with ``directory`` against the generated files (empty: byte-identical)."""
    problems = []
    for f in files:
        path = directory / f.name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != f.size or sha256_file(path) != f.sha256:
            problems.append(f"{path}: wrong content")
    return problems


def verify_all(dirs: list[Path], files: list[GeneratedFile]) -> list[list[str]]:
    with ThreadPoolExecutor(max_workers=2) as pool:  # hashlib releases the GIL
        return list(pool.map(lambda d: verify_dir(d, files), dirs))


def run_everywhere(lab: Lab, hosts: list[Host], argvs: list[list[str]], envs: list[dict],
                   timeout: float) -> tuple[float, list[dict]]:
    """Start ``argvs[i]`` in ``hosts[i]``'s namespace, all at once; wait for all (at most
    ``timeout`` s, then kill the rest by PID). Returns (start time, per host: wall seconds
    from the common start to its exit or None, exit status, stdout, stderr)."""
    outcomes: list[dict] = [{} for _ in hosts]
    started = time.monotonic()
    processes = [lab.popen(host.ns, argv, env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for host, argv, env in zip(hosts, argvs, envs)]

    def wait(i: int) -> None:
        out, err = processes[i].communicate()
        outcomes[i].update(wall=time.monotonic() - started, status=processes[i].returncode,
                           out=out, err=err)

    threads = [threading.Thread(target=wait, args=(i,), daemon=True) for i in range(len(hosts))]
    for thread in threads:
        thread.start()
    deadline = started + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    for i, thread in enumerate(threads):
        if thread.is_alive():
            lab.stop(processes[i], grace=2)
            thread.join(5)
            outcomes[i]["wall"] = None
            outcomes[i]["timed_out"] = True
    return started, outcomes


def summarize_nodes(nodes: list[dict], key: str) -> dict:
    values = [n[key] for n in nodes]
    if not values or any(v is None for v in values):
        return {"max": None, "median": None}
    return {"max": round(max(values), 3), "median": round(statistics.median(values), 3)}


def phase_result(name: str, nodes: list[dict], origin_bytes: int, size: int,
                 sampler: Sampler, **extra) -> dict:
    wall = summarize_nodes(nodes, "seconds")
    reported = summarize_nodes(nodes, "seconds_reported")
    complete = all(n["ok"] for n in nodes)
    return {"phase": name, "complete": complete,
            "max_seconds": wall["max"], "median_seconds": wall["median"],
            "max_seconds_reported": reported["max"],
            "median_seconds_reported": reported["median"],
            "origin_bytes": origin_bytes, "origin_bytes_over_F": round(origin_bytes / size, 4),
            "cpu_busy": sampler.cpu_busy(), **extra, "nodes": nodes,
            "timeline": sampler.timeline()}


# ------------------------------------------------------------------ the phases


@dataclass
class Context:
    lab: Lab
    work: Path
    files: list[GeneratedFile]
    size: int
    ref: str
    options: Options
    t_min: float | None

    @property
    def registry_host(self) -> str:
        return f"{self.lab.origin.address}:{REGISTRY_PORT}"

    def env(self, **extra: str) -> dict:
        if self.options.chunk_size:
            extra.setdefault("P2PULL_CHUNK_SIZE", self.options.chunk_size)
        for name, value in self.options.settings.items():
            extra.setdefault(f"P2PULL_{name.upper()}", value)
        return clean_env(P2PULL_INSECURE_REGISTRIES=self.registry_host,
                         P2PULL_CLUSTER=f"lab-{self.lab.tag}", **extra)

    def timeout(self, phase: str) -> float:
        if self.options.phase_timeout:
            return self.options.phase_timeout
        origin_rate = self.options.origin_up
        if phase == "origin":
            alone = self.options.nodes * self.size / (origin_rate / 8) if origin_rate else 0
            return max(120.0, 2.5 * alone + 60)
        return max(120.0, 8 * (self.t_min or 0) + 60)


def phase_p2pull(ctx: Context, round_no: int) -> dict:
    lab, hosts = ctx.lab, ctx.lab.hosts
    base = ctx.work / f"p2pull-r{round_no}"
    envs, daemons, logs = [], [], []
    addresses = {h.address for h in hosts}
    for host in hosts:
        data = base / host.name
        data.mkdir(parents=True)
        rack = lab.rack_of(host)
        labels = {"P2PULL_RACK": f"r{rack}"} if ctx.options.rack_labels and rack is not None \
            else {}
        envs.append(ctx.env(P2PULL_DATA_DIR=str(data), P2PULL_DISCOVERY="mdns",
                            P2PULL_LISTEN=f"{host.address}:{PEER_PORT}", **labels))
        logs.append(ctx.work / "logs" / f"p2pull-r{round_no}-{host.name}.log")
    logs[0].parent.mkdir(exist_ok=True)
    launched = time.monotonic()
    for host, env, log_path in zip(hosts, envs, logs):
        with open(log_path, "wb") as log:
            daemons.append(lab.popen(host.ns, [*p2pull_command(), "-v", "daemon"], env=env,
                                     stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT))
    apis = [httpx.Client(transport=httpx.HTTPTransport(uds=str(base / h.name / "p2pull.sock")),
                         base_url="http://p2pull", timeout=2.0) for h in hosts]
    try:
        discovery = wait_for_mesh(hosts, daemons, apis, logs, addresses, launched)
        ctx.options.log(f"  mesh: every daemon linked to the {len(hosts) - 1} others "
                        f"{discovery['discovery_seconds']:.2f} s after the last one was up "
                        f"({discovery['launch_to_mesh_seconds']:.2f} s after launch)")
        outs = [ctx.work / f"out-p2pull-r{round_no}" / h.name for h in hosts]
        argvs = [[*p2pull_command(), "get", ctx.ref, "-o", str(out), "--json"] for out in outs]
        before = lab.tx_bytes(lab.origin)
        uplinks_before = lab.uplink_counters()
        cpu_before = [process_cpu_seconds(d.pid) for d in daemons]
        with Sampler(lab, {h.name: api for h, api in zip(hosts, apis)}) as sampler:
            if ctx.options.start == "api":
                outcomes = get_via_apis(apis, ctx.ref, outs, ctx.timeout("p2pull"))
            else:
                _, outcomes = run_everywhere(lab, hosts, argvs, envs, ctx.timeout("p2pull"))
        origin_bytes = lab.tx_bytes(lab.origin) - before
        # what crossed each rack's uplink, out of it and into it, over F
        uplinks = [[round((out - out0) / ctx.size, 3), round((into - into0) / ctx.size, 3)]
                   for (out, into), (out0, into0) in zip(lab.uplink_counters(), uplinks_before)]
        cpu_used = [_round(process_cpu_seconds(d.pid) - b) if b is not None else None
                    for d, b in zip(daemons, cpu_before)]
        statuses = []
        for api in apis:
            try:
                statuses.append(api.get("/status").json())
            except httpx.HTTPError:
                statuses.append({})
    finally:
        for api in apis:
            api.close()
        for daemon in daemons:
            lab.stop(daemon)
    problems = verify_all(outs, ctx.files)
    nodes = []
    for host, outcome, status, trouble, cpu in zip(hosts, outcomes, statuses, problems,
                                                    cpu_used):
        result = _json_or_none(outcome.get("out"))
        ok = outcome.get("status") == 0 and result is not None and not trouble
        wall = outcome.get("wall")
        nodes.append({"node": host.name, "address": host.address,
                      "seconds": _round(wall),
                      "seconds_reported": result["seconds"] if result else None,
                      # when the daemon began the get, from the common start (wall clock
                      # minus the daemon's own figure): process start-up and skew
                      "began_seconds": _round(wall - result["seconds"])
                      if result and wall is not None else None,
                      "from_origin": result["from_origin"] if result else None,
                      "from_peers": result["from_peers"] if result else None,
                      "to_peers": status.get("bytes_to_peers"),
                      # pieces that arrived and were not kept (endgame duplicates, pieces
                      # of chunks held or cancelled meanwhile): download capacity lost
                      "peer_bytes_dropped": status["bytes_from_peers"] - result["from_peers"]
                      if result and "bytes_from_peers" in status else None,
                      "chunks_rejected": status.get("chunks_rejected"),
                      # the daemon's CPU seconds (user + system) over the phase
                      "cpu_seconds": cpu,
                      "ok": ok, "error": _error(outcome, trouble)})
    payload = sum(n["from_origin"] or 0 for n in nodes)
    result = phase_result("p2pull", nodes, origin_bytes, ctx.size, sampler,
                          start=ctx.options.start,
                          origin_payload_over_F=round(payload / ctx.size, 4),
                          discovery=discovery, logs=[str(p) for p in logs],
                          **({"rack_uplinks_out_in_over_F": uplinks} if uplinks else {}))
    _remove(base, *outs)
    return result


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process ``pid`` has used so far (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get_via_apis(apis: list[httpx.Client], ref: str, outs: list[Path],
                 timeout: float) -> list[dict]:
    """POST /get (what ``p2pull get`` sends) to every daemon at the same moment; each
    outcome as ``run_everywhere`` gives it, the result line as ``out``."""
    outcomes: list[dict] = [{} for _ in apis]
    ready = threading.Barrier(len(apis) + 1)
    started = [0.0]

    def get(i: int) -> None:
        body = {"ref": ref, "output": str(outs[i]), "platform": None, "force": False,
                "format": "files"}
        ready.wait()
        try:
            with apis[i].stream("POST", "/get", json=body,
                                timeout=httpx.Timeout(timeout, connect=5.0)) as response:
                for line in response.iter_lines():
                    message = _json_or_none(line.strip())
                    if message and "result" in message:
                        outcomes[i].update(status=0, out=json.dumps(message["result"]))
                    elif message and "error" in message:
                        outcomes[i].update(status=message["error"].get("exit_code", 1),
                                           err=message["error"].get("message", ""))
        except httpx.HTTPError as exc:
            outcomes[i].update(status=1, err=repr(exc))
        outcomes[i]["wall"] = time.monotonic() - started[0]
        outcomes[i].setdefault("status", 1)

    threads = [threading.Thread(target=get, args=(i,), daemon=True) for i in range(len(apis))]
    for thread in threads:
        thread.start()
    started[0] = time.monotonic()
    ready.wait()
    for thread in threads:
        thread.join(max(0.0, started[0] + timeout + 5 - time.monotonic()))
    for outcome, thread in zip(outcomes, threads):
        if thread.is_alive():
            outcome.update(wall=None, timed_out=True)
    return outcomes


def wait_for_mesh(hosts, daemons, apis, logs, addresses, launched) -> dict:
    """Poll each daemon's API until it lists links to all the others."""
    n = len(hosts)
    up: list[float | None] = [None] * n
    mesh: list[float | None] = [None] * n
    deadline = launched + MESH_TIMEOUT
    while not all(mesh):
        if time.monotonic() > deadline:
            missing = [h.name for h, m in zip(hosts, mesh) if m is None]
            raise PhaseError(f"daemons {missing} not linked to every other node within "
                             f"{MESH_TIMEOUT:.0f} s of launch; logs: {logs[0].parent}")
        for i in range(n):
            if mesh[i] is not None:
                continue
            if daemons[i].poll() is not None:
                tail = logs[i].read_text(errors="replace")[-2000:]
                raise PhaseError(f"daemon {hosts[i].name} exited "
                                 f"({daemons[i].returncode}):\n{tail}")
            try:
                peers = apis[i].get("/peers").json()
            except (httpx.HTTPError, ValueError):
                continue
            now = time.monotonic()
            if up[i] is None:
                up[i] = now
            linked = {p["address"].rpartition(":")[0] for p in peers}
            if linked >= addresses - {hosts[i].address}:
                mesh[i] = now
        time.sleep(0.02)
    last_up = max(up)
    return {"discovery_seconds": round(max(mesh) - last_up, 3),
            "launch_to_mesh_seconds": round(max(mesh) - launched, 3),
            "per_node": [{"node": h.name, "up_seconds": round(u - launched, 3),
                          "linked_seconds": round(m - launched, 3)}
                         for h, u, m in zip(hosts, up, mesh)]}


def phase_origin(ctx: Context, round_no: int) -> dict:
    """Every node pulls from the origin alone: p2pull with no daemon and no peers."""
    lab, hosts = ctx.lab, ctx.lab.hosts
    base = ctx.work / f"origin-r{round_no}"
    envs = [ctx.env(P2PULL_DATA_DIR=str(base / h.name), P2PULL_DISCOVERY="static")
            for h in hosts]
    outs = [ctx.work / f"out-origin-r{round_no}" / h.name for h in hosts]
    argvs = [[*p2pull_command(), "get", ctx.ref, "-o", str(out), "--json"] for out in outs]
    before = lab.tx_bytes(lab.origin)
    with Sampler(lab) as sampler:
        _, outcomes = run_everywhere(lab, hosts, argvs, envs, ctx.timeout("origin"))
    origin_bytes = lab.tx_bytes(lab.origin) - before
    problems = verify_all(outs, ctx.files)
    nodes = []
    for host, outcome, trouble in zip(hosts, outcomes, problems):
        result = _json_or_none(outcome.get("out"))
        nodes.append({"node": host.name, "address": host.address,
                      "seconds": _round(outcome.get("wall")),
                      "seconds_reported": result["seconds"] if result else None,
                      "from_origin": result["from_origin"] if result else None,
                      "from_peers": result["from_peers"] if result else None,
                      "ok": outcome.get("status") == 0 and result is not None and not trouble,
                      "error": _error(outcome, trouble)})
    result = phase_result("origin", nodes, origin_bytes, ctx.size, sampler)
    _remove(base, *outs)
    return result


def make_torrent(model_dir: Path, target: Path, size: int) -> int:
    """A v1 .torrent of the model directory (no tracker); returns the piece size."""
    import libtorrent as lt

    piece = 256 * 1024
    while piece < 4 * MIB and size / piece > 512:
        piece *= 2
    with warnings.catch_warnings():  # the file_storage API is deprecated in 2.x, not gone
        warnings.simplefilter("ignore", DeprecationWarning)
        storage = lt.file_storage()
        lt.add_files(storage, str(model_dir))
        torrent = lt.create_torrent(storage, piece, flags=lt.create_torrent.v1_only)
    torrent.set_creator("p2pull lab")
    lt.set_piece_hashes(torrent, str(model_dir.parent))
    target.write_bytes(lt.bencode(torrent.generate()))
    return piece


def phase_libtorrent(ctx: Context, round_no: int, torrent: Path, piece: int) -> dict:
    lab, hosts = ctx.lab, ctx.lab.hosts
    base = ctx.work / f"libtorrent-r{round_no}"
    base.mkdir()
    logs = ctx.work / "logs"
    logs.mkdir(exist_ok=True)
    seed_address = f"{lab.origin.address}:{LT_PORT}"
    everyone = [seed_address] + [f"{h.address}:{LT_PORT}" for h in hosts]
    model_dir = ctx.files[0].path.parent

    def start(host: Host, role: str, save: Path, peers: list[str]) -> subprocess.Popen:
        log = open(logs / f"libtorrent-r{round_no}-{host.name}.log", "w")
        process = lab.popen(host.ns, [sys.executable, str(LT_NODE), "--role", role,
                                      "--torrent", str(torrent), "--save", str(save),
                                      "--listen", f"{host.address}:{LT_PORT}",
                                      "--peers", ",".join(peers)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                            text=True, bufsize=1)
        log.close()
        return process

    seed = start(lab.origin, "seed", model_dir.parent, [])
    saves = [base / h.name for h in hosts]
    leechers = [start(h, "leech", save, [p for p in everyone if p != f"{h.address}:{LT_PORT}"])
                for h, save in zip(hosts, saves)]
    processes = [seed, *leechers]
    events: list[dict] = [{} for _ in processes]
    arrived = threading.Condition()

    def read(i: int) -> None:
        for line in processes[i].stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with arrived:
                events[i][event["event"]] = {**event, "at": time.monotonic()}
                arrived.notify_all()
        with arrived:
            events[i].setdefault("exit", {"at": time.monotonic()})
            arrived.notify_all()

    for i in range(len(processes)):
        threading.Thread(target=read, args=(i,), daemon=True).start()
    try:
        with arrived:
            if not arrived.wait_for(lambda: all("listening" in e or "exit" in e
                                                for e in events), LT_START_TIMEOUT):
                raise PhaseError("libtorrent nodes did not start listening")
        if any("exit" in e for e in events):
            raise PhaseError(f"a libtorrent node exited at start; logs in {logs}")
        before = lab.tx_bytes(lab.origin)
        with Sampler(lab) as sampler:
            started = time.monotonic()
            for process in processes:
                process.stdin.write("go\n")
                process.stdin.flush()
            with arrived:
                arrived.wait_for(lambda: all("done" in e or "exit" in e for e in events[1:]),
                                 ctx.timeout("libtorrent"))
        origin_bytes = lab.tx_bytes(lab.origin) - before
    finally:
        for process in processes:
            try:
                process.stdin.write("stop\n")
                process.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
        for process in processes:
            lab.stop(process, grace=5)
    problems = verify_all([save / model_dir.name for save in saves], ctx.files)
    nodes = []
    for host, event, trouble in zip(hosts, events[1:], problems):
        done = event.get("done")
        nodes.append({"node": host.name, "address": host.address,
                      "seconds": round(done["at"] - started, 3) if done else None,
                      "seconds_reported": done["seconds"] if done else None,
                      "ok": done is not None and not trouble,
                      "error": "; ".join(trouble) or (None if done else "did not finish")})
    result = phase_result("libtorrent", nodes, origin_bytes, ctx.size, sampler,
                          piece_size=piece)
    _remove(base)
    return result


def _json_or_none(text: str | None) -> dict | None:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _error(outcome: dict, trouble: list[str]) -> str | None:
    if outcome.get("timed_out"):
        return "timed out"
    if outcome.get("status") not in (0, None):
        return f"exit {outcome['status']}: {outcome.get('err', '').strip()[-500:]}"
    return "; ".join(trouble) or None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _remove(*paths: Path) -> None:
    for path in paths:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ the run


def run_lab(options: Options) -> dict:
    """Build the lab, run every round's phases, tear it all down; the report (a dict as
    written by ``--json``). Raises PhaseError when a phase cannot run at all."""
    say = options.log
    unknown = set(options.baselines) - {"origin", "libtorrent"}
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}: choose origin, libtorrent")
    ups = [options.up] * options.nodes
    downs = [options.down] * options.nodes
    bound = None
    started_at = time.time()
    with tempfile.TemporaryDirectory(prefix="p2pull-lab-", dir=options.workdir) as tmp, \
            Lab(options.nodes, up=options.up, down=options.down, origin_up=options.origin_up,
                origin_down=options.origin_down, mtu=options.mtu, racks=options.racks,
                uplink=options.uplink) as lab:
        work = Path(tmp)
        if options.keep:
            work = Path(tempfile.mkdtemp(prefix="p2pull-lab-kept-", dir=options.workdir))
        say(f"lab {lab.tag}: {options.nodes} nodes on {lab.network}, namespaces "
            f"{lab.namespaces[0]} ... ; work in {work}")
        files = generate_model(work / "model", options.size)
        size = sum(f.size for f in files)
        bound = kumar_ross(size, options.nodes, ups, downs, options.origin_up)
        start_registry(lab, work)
        digest = push_model(lab, work, files)
        ref = f"{lab.origin.address}:{REGISTRY_PORT}/{REPO_TAG}"
        say(f"origin: CNCF Distribution at {ref} holds {size / MIB:.1f} MiB in "
            f"{len(files)} files ({digest[:19]}); T_min = "
            f"{_fmt(bound['t_min_seconds'])} s")
        ctx = Context(lab, work, files, size, ref, options, bound["t_min_seconds"])
        torrent = piece = None
        if "libtorrent" in options.baselines:
            torrent = work / "model.torrent"
            piece = make_torrent(work / "model", torrent, size)
        rounds = []
        for round_no in range(options.rounds):
            results = {}
            say(f"round {round_no + 1}/{options.rounds}: p2pull (mDNS discovery)")
            results["p2pull"] = phase_p2pull(ctx, round_no)
            say(_phase_line(results["p2pull"]))
            uplinks = results["p2pull"].get("rack_uplinks_out_in_over_F")
            if uplinks:
                say("  rack uplinks, out / in over F: " + ", ".join(
                    f"r{rack} {out:.2f} / {into:.2f}" for rack, (out, into) in enumerate(uplinks)))
            if "origin" in options.baselines:
                say(f"round {round_no + 1}/{options.rounds}: origin alone "
                    f"(timeout {ctx.timeout('origin'):.0f} s)")
                results["origin"] = phase_origin(ctx, round_no)
                say(_phase_line(results["origin"]))
            if "libtorrent" in options.baselines:
                say(f"round {round_no + 1}/{options.rounds}: libtorrent")
                results["libtorrent"] = phase_libtorrent(ctx, round_no, torrent, piece)
                say(_phase_line(results["libtorrent"]))
            rounds.append(results)
        namespaces = lab.namespaces
    report = {
        "schema": SCHEMA,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
        "duration_seconds": round(time.time() - started_at, 1),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version(), "revision": _revision()},
        "params": {"nodes": options.nodes, "up_bits": options.up, "down_bits": options.down,
                   "origin_up_bits": options.origin_up,
                   "origin_down_bits": options.origin_down, "size_bytes": size,
                   "files": [{"name": f.name, "size": f.size, "sha256": f.sha256}
                             for f in files],
                   "rounds": options.rounds, "baselines": list(options.baselines),
                   "start": options.start, "chunk_size": options.chunk_size,
                   "settings": options.settings,
                   "mtu": options.mtu, "subnet": str(lab.network), "tag": lab.tag,
                   "namespaces": namespaces},
        "bound": {**bound, "tcp_efficiency": round(tcp_efficiency(options.mtu), 4),
                  "t_min_goodput_seconds": (bound["t_min_seconds"] / tcp_efficiency(
                      options.mtu)) if bound["t_min_seconds"] else None},
        "rounds": rounds,
    }
    report["summary"] = summarize(report)
    return report


def summarize(report: dict) -> dict:
    """Medians over rounds per phase; ratios to the bound and between phases; goals."""
    t_min = report["bound"]["t_min_seconds"]
    summary: dict = {}
    for phase in PHASES:
        runs = [r[phase] for r in report["rounds"] if phase in r]
        if not runs:
            continue

        def med(key):
            values = [r[key] for r in runs]
            return None if any(v is None for v in values) else round(
                statistics.median(values), 3)
        entry = {"max_seconds": med("max_seconds"), "median_seconds": med("median_seconds"),
                 "max_seconds_reported": med("max_seconds_reported"),
                 "median_seconds_reported": med("median_seconds_reported"),
                 "origin_bytes_over_F": med("origin_bytes_over_F"),
                 "complete": all(r["complete"] for r in runs)}
        if phase == "p2pull":
            entry["origin_payload_over_F"] = med("origin_payload_over_F")
            entry["discovery_seconds"] = round(statistics.median(
                r["discovery"]["discovery_seconds"] for r in runs), 3)
            entry["launch_to_mesh_seconds"] = round(statistics.median(
                r["discovery"]["launch_to_mesh_seconds"] for r in runs), 3)
        for key in ("max", "median"):
            value = entry[f"{key}_seconds"]
            entry[f"{key}_over_bound"] = _ratio(value, t_min)
        summary[phase] = entry
    p2p = summary.get("p2pull", {})
    ratios = {}
    for phase in ("origin", "libtorrent"):
        other = summary.get(phase)
        if other is None:
            continue
        for key in ("max", "median"):
            ratios[f"p2pull_{key}_over_{phase}_{key}"] = _ratio(p2p.get(f"{key}_seconds"),
                                                                 other[f"{key}_seconds"])
            ratios[f"{phase}_{key}_over_p2pull_{key}"] = _ratio(other[f"{key}_seconds"],
                                                                 p2p.get(f"{key}_seconds"))
    summary["ratios"] = ratios
    goals = {}

    def goal(name, value, limit, at_least=False):
        passed = None if value is None else (value >= limit if at_least else value <= limit)
        goals[name] = {"value": value, "limit": limit, "at_least": at_least,
                       "passed": passed}
    goal("p2pull_max_over_bound", p2p.get("max_over_bound"), GOALS["p2pull_max_over_bound"])
    goal("p2pull_median_over_bound", p2p.get("median_over_bound"),
         GOALS["p2pull_median_over_bound"])
    goal("origin_bytes_over_F", p2p.get("origin_bytes_over_F"), GOALS["origin_bytes_over_F"])
    if "origin" in summary:
        goal("origin_only_over_p2pull", ratios.get("origin_max_over_p2pull_max"),
             GOALS["origin_only_over_p2pull"], at_least=True)
    if "libtorrent" in summary:
        goal("p2pull_over_libtorrent", ratios.get("p2pull_max_over_libtorrent_max"),
             GOALS["p2pull_over_libtorrent"])
    summary["goals"] = goals
    return summary


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def _revision() -> str | None:
    """The p2pull under test: ``git describe --dirty`` of its checkout, or the REVISION
    file of an exported tree (``git archive`` has no .git), with its location."""
    import p2pull

    tree = Path(p2pull.__file__).resolve().parent.parent
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10, cwd=tree)
        described = done.stdout.strip() if done.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        described = ""
    if not described and (tree / "REVISION").is_file():
        described = (tree / "REVISION").read_text().strip()
    return f"{described or 'unknown'} ({tree})"


# ------------------------------------------------------------------ printing


def _fmt(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def _phase_line(phase: dict) -> str:
    state = "ok" if phase["complete"] else "INCOMPLETE"
    return (f"  {phase['phase']}: {state}, slowest {_fmt(phase['max_seconds'])} s, median "
            f"{_fmt(phase['median_seconds'])} s, origin sent "
            f"{phase['origin_bytes_over_F']:.3f} x F, CPU busy {_fmt(phase['cpu_busy'], '.0%')}"
            + (f", daemons' CPU {sum(cpus):.1f} s" if (cpus := [
                n["cpu_seconds"] for n in phase["nodes"] if n.get("cpu_seconds")]) else ""))


def print_report(report: dict, out=sys.stdout) -> None:
    p = report["params"]
    bound = report["bound"]
    w = out.write
    w(f"\n{p['nodes']} nodes, links up {format_rate(p['up_bits'])} / down "
      f"{format_rate(p['down_bits'])}, origin {format_rate(p['origin_up_bits'])}, model "
      f"{p['size_bytes'] / MIB:.1f} MiB (F), {report['machine']['cpus']} CPUs\n")
    terms = bound["terms_seconds"]
    w(f"T_min = {_fmt(bound['t_min_seconds'], '.2f')} s = max(F/u_origin "
      f"{terms['origin']:.2f}, F/d_min {terms['download']:.2f}, N.F/(u_origin+sum u_i) "
      f"{terms['aggregate']:.2f}); at TCP's payload share "
      f"({bound['tcp_efficiency']:.3f}) {_fmt(bound['t_min_goodput_seconds'], '.2f')} s\n")
    for number, results in enumerate(report["rounds"], 1):
        w(f"\nround {number}: seconds per node (wall clock from the common start; "
          "p2pull's own JSON figure in brackets)\n")
        phases = [ph for ph in PHASES if ph in results]
        w(f"{'node':6}" + "".join(f"{ph:>22}" for ph in phases) +
          f"{'p2pull origin MiB':>19}{'peers MiB':>11}{'to peers MiB':>14}"
          f"{'dropped MiB':>13}{'began s':>9}\n")
        for i, node in enumerate(results["p2pull"]["nodes"]):
            w(f"{node['node']:6}")
            for ph in phases:
                n = results[ph]["nodes"][i]
                cell = _fmt(n["seconds"], ".2f")
                if n.get("seconds_reported") is not None and ph != "libtorrent":
                    cell += f" [{n['seconds_reported']:.2f}]"
                if not n["ok"]:
                    cell += " !"
                w(f"{cell:>22}")
            w(f"{_mib(node['from_origin']):>19}{_mib(node['from_peers']):>11}"
              f"{_mib(node.get('to_peers')):>14}{_mib(node.get('peer_bytes_dropped')):>13}"
              f"{_fmt(node.get('began_seconds'), '.2f'):>9}\n")
        for node in (n for ph in phases for n in results[ph]["nodes"] if not n["ok"]):
            w(f"  ! {node['node']}: {node['error']}\n")
    s = report["summary"]
    w(f"\n{'summary (median of rounds)':28}{'slowest s':>10}{'median s':>10}"
      f"{'slowest/T':>11}{'median/T':>10}{'origin B/F':>12}\n")
    for ph in PHASES:
        if ph not in s:
            continue
        e = s[ph]
        w(f"{ph + ('' if e['complete'] else ' (INCOMPLETE)'):28}{_fmt(e['max_seconds'], '.2f'):>10}"
          f"{_fmt(e['median_seconds'], '.2f'):>10}{_fmt(e['max_over_bound'], '.3f'):>11}"
          f"{_fmt(e['median_over_bound'], '.3f'):>10}"
          f"{_fmt(e['origin_bytes_over_F'], '.3f'):>12}\n")
    if "p2pull" in s:
        e = s["p2pull"]
        w(f"p2pull: discovery {e['discovery_seconds']:.2f} s (last daemon up -> full mesh; "
          f"{e['launch_to_mesh_seconds']:.2f} s from launch); origin payload "
          f"{_fmt(e['origin_payload_over_F'], '.3f')} x F\n")
    for name, value in s["ratios"].items():
        w(f"{name}: {_fmt(value, '.3f')}\n")
    for name, g in s["goals"].items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[g["passed"]]
        w(f"goal {name} {'>=' if g['at_least'] else '<='} {g['limit']}: "
          f"{_fmt(g['value'], '.3f')} {verdict}\n")


# ------------------------------------------------------------------ command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lab.run",
        description="p2pull in a network-namespace lab, against the Kumar-Ross bound, the "
                    "origin alone and libtorrent (as root)")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rate", default="100mbit",
                        help="each node's upload and download (tc syntax; none: unshaped)")
    parser.add_argument("--up-rate", help="each node's upload (default --rate)")
    parser.add_argument("--down-rate", help="each node's download (default --rate)")
    parser.add_argument("--origin-rate", default="100mbit", help="the origin's upload cap")
    parser.add_argument("--origin-down-rate", default="none",
                        help="the origin's download (default unshaped)")
    parser.add_argument("--size", default="512MiB", help="the model's size (default 512MiB)")
    parser.add_argument("--baselines", default="origin,libtorrent",
                        help="comma-separated: origin, libtorrent, or none")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--start", choices=("cli", "api"), default="cli",
                        help="start p2pull's gets as `p2pull get` processes in the "
                             "namespaces (cli, default) or by posting the same request to "
                             "every daemon's API at once (api: no start-up skew)")
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--chunk-size", help="p2pull's chunk size, e.g. 1MiB (default: the "
                                             "protocol's rule for each blob's size)")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a p2pull setting for every daemon, as its P2PULL_ variable "
                             "(e.g. origin_max_connections=8); repeatable")
    parser.add_argument("--phase-timeout", type=float,
                        help="seconds one phase may take (default: from the bound)")
    parser.add_argument("--racks", type=int, default=1,
                        help="deal the nodes round robin into this many racks, each a bridge "
                             "joined to the origin's by an uplink (default 1: no racks)")
    parser.add_argument("--uplink", default="none",
                        help="each rack uplink's rate, each way (default none: unshaped)")
    parser.add_argument("--rack-labels", action="store_true",
                        help="tell each daemon its rack (P2PULL_RACK)")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--keep", action="store_true",
                        help="keep daemon logs, model and registry in a kept directory")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--check", action="store_true",
                        help="exit 3 when a goal is missed")
    return parser.parse_args(argv)


def interrupt_on_signals() -> None:
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)


def _setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name.strip():
        raise ValueError(f"--setting {text!r}: write NAME=VALUE, e.g. origin_max_connections=8")
    return name.strip(), value.strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        baselines = tuple(b.strip() for b in args.baselines.split(",")
                          if b.strip() and b.strip() != "none")
        options = Options(
            nodes=args.nodes, up=parse_rate(args.up_rate or args.rate),
            down=parse_rate(args.down_rate or args.rate),
            origin_up=parse_rate(args.origin_rate),
            origin_down=parse_rate(args.origin_down_rate), size=parse_size(args.size),
            baselines=baselines, rounds=args.rounds, mtu=args.mtu, workdir=args.workdir,
            keep=args.keep, phase_timeout=args.phase_timeout, start=args.start,
            chunk_size=args.chunk_size, settings=dict(_setting(text) for text in args.setting),
            racks=args.racks, uplink=parse_rate(args.uplink), rack_labels=args.rack_labels)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    why = available()
    if why:
        print(f"cannot build the lab: {why}", file=sys.stderr)
        return 2
    if "libtorrent" in baselines:
        try:
            import libtorrent  # noqa: F401
        except ImportError:
            print("error: the libtorrent baseline needs `pip install libtorrent` "
                  "(the project's `lab` extra)", file=sys.stderr)
            return 2
    interrupt_on_signals()
    try:
        report = run_lab(options)
    except KeyboardInterrupt:
        print("interrupted; the lab was taken down", file=sys.stderr)
        return 130
    except (PhaseError, LabError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report["command"] = ["python", "-m", "benchmarks.lab.run", *(argv or sys.argv[1:])]
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"report written to {args.json}")
    complete = all(e.get("complete", True) for k, e in report["summary"].items()
                   if k in PHASES)
    if not complete:
        return 1
    if args.check and any(g["passed"] is False for g in report["summary"]["goals"].values()):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

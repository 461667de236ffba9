"""The swarm with real processes and real sockets: ``p2pull daemon`` processes on loopback
pull one model from CNCF Distribution behind a byte-counting proxy, share its chunks, survive
a SIGKILL, and refuse, ban or drop peers that lie or break the protocol (hostile clients
written here, speaking the protocol through p2pull.wire)."""

from __future__ import annotations

import hashlib
import random
import struct
import threading
import time
from pathlib import Path

import pytest

from p2pull.config import parse_size
from p2pull.core.chunks import ChunkPlan
from p2pull.errors import ProtocolError
from p2pull.net.node import MAX_QUEUED_REQUESTS
from p2pull.wire import MAX_FRAME
from tests.support.daemons import CHUNK_SIZE, CLUSTER, DaemonCluster, end_process
from tests.support.hostile import HostilePeer
from tests.support.proxy import Proxy
from tests.support.registry import oras_push, registry_available, start_registry
from tests.test_get import assert_same_files

pytestmark = pytest.mark.skipif(not registry_available(),
                                reason="docker-registry not installed: run `make test`")

LAYER = 24 * 1024 * 1024
REPOSITORY = "models/swarm:v1"


def swarm_model() -> dict[str, bytes]:
    """Three weight shards of 24 MiB (72 chunks of 1 MiB each) and two small files."""
    rng = random.Random(2026)
    return {"model-00001-of-00003.safetensors": rng.randbytes(LAYER),
            "model-00002-of-00003.safetensors": rng.randbytes(LAYER),
            "model-00003-of-00003.safetensors": rng.randbytes(LAYER - 12345),
            "config.json": b'{"architectures": ["SwarmTest"], "hidden_size": 64}',
            "README.md": b"# a swarm test model\n"}


MODEL = swarm_model()
MODEL_SIZE = sum(map(len, MODEL.values()))


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """CNCF Distribution holding the model, for the whole module (pushed once)."""
    workdir = tmp_path_factory.mktemp("origin")
    registry = start_registry(workdir / "registry")
    try:
        oras_push(registry, REPOSITORY, MODEL, workdir)
        yield registry
    finally:
        registry.stop()


@pytest.fixture
def cluster(tmp_path):
    with DaemonCluster(tmp_path / "cluster") as cluster:
        yield cluster


#: pulls go through an origin this slow (bytes/s, all connections together; about 5 s
#: for the model), so that the origin is the bottleneck, as it is in a cluster, and a kill
#: or an attack lands while chunks are moving
SLOW_ORIGIN = "15MB"
#: ... and slower where the attacks take a few seconds (one waits out a 2 s peer timeout)
SLOWER_ORIGIN = "10MB"
#: a hostile connection must be closed within this; below the daemon's 10 s handshake
#: timeout, so a peer refused for what it sent is not mistaken for one that timed out
DROP_TIMEOUT = 6.0
#: a pull may take this long (the slow ones need about 5 s)
GET_TIMEOUT = 60.0


def test_four_daemons_pull_one_model_at_once(origin, cluster, tmp_path):
    """All outputs byte-identical; the origin serves the model about once; peers share.
    The origin is slower than loopback, as origins are: each node then waits seconds for
    its share of orphan chunks, and the others must keep waiting for it, not fetch them
    again (a live node is one whose link delivers, whatever blob it is busy with)."""
    daemons = cluster.add(4)
    cluster.start_all()
    cluster.wait_for_mesh()
    with Proxy(origin.host, link_rate=SLOW_ORIGIN) as proxy:
        ref = f"{proxy.host}/{REPOSITORY}"
        gets = [daemon.start_get(ref, tmp_path / f"out{i}") for i, daemon in enumerate(daemons)]
        summaries = [daemon.finish_get(get, GET_TIMEOUT) for daemon, get in zip(daemons, gets)]
        origin_bytes = proxy.bytes_down
    for i, summary in enumerate(summaries):
        assert_same_files(tmp_path / f"out{i}", MODEL)
        assert summary["bytes"] >= MODEL_SIZE
        assert summary["from_origin"] + summary["from_peers"] >= summary["bytes"]
    # manifests, HTTP heads and the config blob ride on top of the model's bytes
    assert origin_bytes <= 1.1 * MODEL_SIZE, (origin_bytes, summaries)
    assert sum(s["from_peers"] for s in summaries) > 0
    # the daemons did the work (not an embedded node of the get command), and say so
    statuses = [daemon.cli_json("status") for daemon in daemons]
    assert sum(s["origin_bytes"] for s in statuses) <= 1.1 * MODEL_SIZE
    assert sum(s["bytes_from_peers"] for s in statuses) >= sum(
        s["from_peers"] for s in summaries)
    assert all(s["bans"] == 0 and s["chunks_rejected"] == 0 for s in statuses)
    peers = daemons[0].cli_json("peers")
    assert {p["node_id"] for p in peers} == {d.node_id for d in daemons[1:]}


@pytest.mark.parametrize("labelled", [True, False], ids=["racks", "no-racks"])
def test_rack_mates_split_what_crosses_into_their_rack(origin, cluster, tmp_path, labelled):
    """Two daemons of rack r2 pull from a seeder in rack r1 (the handshake tells each its
    peers' racks): each asks the seeder only for the chunks it outranks its mate for, about
    half, and takes the rest from the mate; without labels each takes nearly all of it
    from the seeder."""
    # the seeder's upload is capped, as a rack's uplink would be, so that both mates are in
    # the swarm before much has moved
    seeder, = cluster.add(1, env={"P2PULL_UPLOAD_RATE": "20MB",
                                  **({"P2PULL_RACK": "r1"} if labelled else {})})
    mates = cluster.add(2, env={"P2PULL_RACK": "r2"} if labelled else None)
    cluster.start_all()
    cluster.wait_for_mesh()
    ref = f"{origin.host}/{REPOSITORY}"
    seeder.finish_get(seeder.start_get(ref, tmp_path / "seed"), GET_TIMEOUT)
    gets = [mate.start_get(ref, tmp_path / f"mate{i}") for i, mate in enumerate(mates)]
    for i, (mate, get) in enumerate(zip(mates, gets)):
        mate.finish_get(get, GET_TIMEOUT)
        assert_same_files(tmp_path / f"mate{i}", MODEL)
    seen = [{p["node_id"]: p for p in mate.cli_json("peers")} for mate in mates]
    from_seeder = [peers[seeder.node_id]["bytes_in"] for peers in seen]
    if labelled:  # each mate knows the racks its peers told
        assert [peers[seeder.node_id]["rack"] for peers in seen] == ["r1", "r1"]
        assert seen[0][mates[1].node_id]["rack"] == "r2"
    shares = [received / MODEL_SIZE for received in from_seeder]
    if labelled:  # measured: 0.51-0.67 each, 1.15-1.24 together (a mate starts alone)
        assert max(shares) < 0.8 and sum(shares) < 1.4, shares
    else:  # measured: 0.96-1.0 each
        assert sum(shares) > 1.6, shares


def test_a_daemon_killed_mid_pull_resumes_and_the_others_finish(origin, cluster, tmp_path):
    """SIGKILL one of four daemons once it holds a fifth of the model: the other three
    finish correctly; restarted on the same data dir, it resumes from what it held and
    takes the rest from its peers, not the origin."""
    daemons = cluster.add(4)
    cluster.start_all()
    cluster.wait_for_mesh()
    victim, others = daemons[-1], daemons[:-1]
    with Proxy(origin.host, link_rate=SLOW_ORIGIN) as proxy:
        ref = f"{proxy.host}/{REPOSITORY}"
        gets = [daemon.start_get(ref, tmp_path / f"out{i}") for i, daemon in enumerate(daemons)]
        deadline = time.monotonic() + 30
        while held_bytes(victim.data_dir) < 0.2 * MODEL_SIZE:
            assert gets[-1].poll() is None, victim.log_tail()
            assert time.monotonic() < deadline, "the victim made no progress"
            time.sleep(0.02)
        victim.kill()
        held_at_kill = held_bytes(victim.data_dir)
        assert held_at_kill < MODEL_SIZE, "the pull was over before the kill"
        end_process(gets[-1])  # its daemon is gone: the get fails
        assert gets[-1].returncode != 0

        for i, (daemon, get) in enumerate(zip(others, gets)):
            daemon.finish_get(get, GET_TIMEOUT)
            assert_same_files(tmp_path / f"out{i}", MODEL)

        victim.start()  # same data dir, same port
        cluster.wait_for_mesh()
        before = proxy.bytes_down
        summary = victim.get(ref, tmp_path / "out-victim", GET_TIMEOUT)
        added = proxy.bytes_down - before
    assert_same_files(tmp_path / "out-victim", MODEL)
    # it resumed: what it held at the kill is reused, the rest comes from its peers
    assert summary["reused"] >= held_at_kill > 0, (summary, held_at_kill)
    assert summary["from_peers"] > 0, summary
    assert added < MODEL_SIZE, (added, summary)


def test_a_held_model_is_served_from_its_files_before_and_after_a_restart(origin, cluster,
                                                                          tmp_path):
    """Later pulls take a held model from peers, each way a chunk can be served: from a
    blob published in this run (sent from its file with the xxh3s kept at publish), from one
    published before a restart (read once, its xxh3 kept, then sent from the file), and from
    a partial file while it downloads. Every output byte-identical, nothing rejected."""
    first, second, third = cluster.add(3)
    first.start()
    with Proxy(origin.host) as proxy:
        ref = f"{proxy.host}/{REPOSITORY}"
        first.get(ref, tmp_path / "out0", GET_TIMEOUT)
        first.stop()
        first.start()  # it keeps no xxh3s across a restart: serving reads them first
        second.start()
        cluster.wait_for_mesh([first, second])
        before = proxy.bytes_down
        summaries = [second.get(ref, tmp_path / "out1", GET_TIMEOUT)]
        third.start()
        cluster.wait_for_mesh()
        summaries.append(third.get(ref, tmp_path / "out2", GET_TIMEOUT))
        from_origin = proxy.bytes_down - before
    for i in range(3):
        assert_same_files(tmp_path / f"out{i}", MODEL)
    for summary in summaries:
        assert summary["from_peers"] >= 3 * LAYER - 12345, summary
    assert from_origin < 0.1 * MODEL_SIZE, from_origin  # manifests and small files at most
    for daemon in (second, third):
        status = daemon.cli_json("status")
        assert status["chunks_rejected"] == 0 and status["bans"] == 0, daemon.log_tail()
    assert first.status()["bytes_to_peers"] >= 2 * LAYER  # served both, read and from file


def held_bytes(data_dir: Path) -> int:
    """Bytes of the chunks the partial downloads' chunk logs record as held (the store's
    format: a header of magic, blob size and chunk size, then (index, xxh3) records)."""
    held = 0
    for log in (data_dir / "partial").glob("*.chunks"):
        try:
            raw = log.read_bytes()
        except FileNotFoundError:
            continue  # its blob was published meanwhile
        if len(raw) < 24:
            continue
        size, chunk_size = struct.unpack(">QQ", raw[8:24])
        plan = ChunkPlan(size, chunk_size)
        records = raw[24:24 + (len(raw) - 24) // 20 * 20]  # a torn last record is not held
        indexes = {index for index, _ in struct.iter_unpack(">I16s", records)}
        held += sum(plan.length(index) for index in indexes if index < plan.count)
    return held


def lone_daemon_with_a_hostile_peer(cluster, mode: str) -> tuple:
    """One daemon with no static peers, and a hostile peer connected to it that claims
    every chunk of every blob: the only peer, so every chunk is asked of it."""
    (daemon,) = cluster.add(peers=[])
    daemon.start()
    hostile = HostilePeer(daemon.port, cluster=CLUSTER, secret=cluster.secret)
    try:
        hostile.handshake()
        wait_until(lambda: daemon.peer_ids() == {hostile.node_id}, 10,
                   "the daemon did not list the hostile peer")
        hostile.serve_in_background(mode)
    except BaseException:
        hostile.close()
        raise
    return daemon, hostile


def wait_until(condition, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def test_a_peer_serving_chunks_that_fail_xxh3_is_banned(origin, cluster, tmp_path):
    """Pieces whose checksum is not their bytes' xxh3: rejected, the peer banned (its
    connection closed, a reconnection refused), every chunk taken from the origin."""
    daemon, hostile = lone_daemon_with_a_hostile_peer(cluster, "bad-xxh3")
    with hostile, Proxy(origin.host) as proxy:
        summary = daemon.get(f"{proxy.host}/{REPOSITORY}", tmp_path / "out", GET_TIMEOUT)
        assert hostile.requests, "the daemon never asked the hostile peer"
        # each request counts the peer it asks among those sending to the daemon: this
        # one, once for each blob asked of it at the time
        assert min(hostile.receiving) >= 1, hostile.receiving
        assert hostile.closed.wait(10), "the daemon kept the connection of a banned peer"
        status = daemon.cli_json("status")
        # banned once it is caught: it cannot come back under the same node id
        with HostilePeer(daemon.port, cluster=CLUSTER, secret=cluster.secret,
                         node_id=hostile.node_id) as again:
            try:
                again.handshake()
            except ConnectionError:
                pass
            assert again.wait_closed(DROP_TIMEOUT), "a banned peer was let back in"
    assert_same_files(tmp_path / "out", MODEL)
    assert status["chunks_rejected"] >= 1 and status["bans"] >= 1, status
    assert summary["from_peers"] == 0 and summary["from_origin"] >= MODEL_SIZE, summary
    assert daemon.cli_json("peers") == []
    assert "refusing banned peer" in daemon.log_text()


def test_a_peer_whose_lies_pass_xxh3_is_found_by_sha256_and_banned(origin, cluster,
                                                                  tmp_path):
    """Random bytes under their own, correct xxh3: every chunk passes, the blobs' sha256
    fails, the liar's chunks are fetched again from the origin, whose bytes differ, so
    the liar is banned; nothing unverified is ever in blobs/."""
    daemon, hostile = lone_daemon_with_a_hostile_peer(cluster, "lying")
    blobs = daemon.data_dir / "blobs" / "sha256"
    checked: dict[str, bool] = {}
    stop = threading.Event()

    def watch_blobs() -> None:
        """Every file that ever shows in blobs/ hashes to its name."""
        while not stop.is_set():
            for path in blobs.glob("*") if blobs.exists() else ():
                if path.name not in checked:
                    data = path.read_bytes()
                    checked[path.name] = hashlib.sha256(data).hexdigest() == path.name
            time.sleep(0.01)

    watcher = threading.Thread(target=watch_blobs, daemon=True)
    watcher.start()
    try:
        with hostile, Proxy(origin.host) as proxy:
            summary = daemon.get(f"{proxy.host}/{REPOSITORY}", tmp_path / "out", GET_TIMEOUT)
            origin_bytes = proxy.bytes_down
            assert hostile.closed.wait(10), "the daemon kept the connection of a liar"
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert_same_files(tmp_path / "out", MODEL)
    status = daemon.cli_json("status")
    assert status["bans"] >= 1, status
    assert hostile.pieces_sent > 0, "the daemon never took the liar's pieces"
    # the liar's chunks passed xxh3 (none rejected) and were fetched again from the origin
    assert status["chunks_rejected"] == 0 and status["chunks_from_peers"] > 0, status
    assert origin_bytes >= MODEL_SIZE and summary["from_origin"] >= MODEL_SIZE, summary
    # the liar's bytes were all replaced: none is counted as having come from a peer
    assert summary["from_peers"] == 0, summary
    assert len(checked) >= 4 and all(checked.values()), checked
    assert "failed its sha256" in daemon.log_text()
    assert daemon.peer_ids() == set()


def test_chunks_pushed_without_a_request_are_not_taken(origin, cluster, tmp_path):
    """A peer that holds nothing (empty bitmap) yet sends every chunk of every blob, with
    true bytes and correct xxh3: none is written, so no peer can fill a node's disk or
    slip in chunks the swarm did not choose; the origin serves the model."""
    (daemon,) = cluster.add(peers=[])
    daemon.start()
    with HostilePeer(daemon.port, cluster=CLUSTER, secret=cluster.secret) as pusher, \
            Proxy(origin.host) as proxy:
        pusher.contents = {"sha256:" + hashlib.sha256(data).hexdigest(): data
                           for data in MODEL.values()}
        pusher.handshake()
        wait_until(lambda: daemon.peer_ids() == {pusher.node_id}, 10,
                   "the daemon did not list the pushing peer")
        pusher.serve_in_background("pushing")
        summary = daemon.get(f"{proxy.host}/{REPOSITORY}", tmp_path / "out", GET_TIMEOUT)
        origin_bytes = proxy.bytes_down
    assert pusher.pieces_sent >= 3 * LAYER // (1024 * 1024), "the peer pushed nothing"
    assert pusher.error is None, pusher.error
    assert_same_files(tmp_path / "out", MODEL)
    assert summary["from_peers"] == 0, summary
    assert summary["from_origin"] >= MODEL_SIZE and origin_bytes >= MODEL_SIZE, summary


@pytest.mark.parametrize("when_busy", ["answer", "queue"])
def test_a_daemon_out_of_upload_slots_answers_busy_or_queues(origin, cluster, tmp_path,
                                                              when_busy):
    """One upload slot, taken by a peer that asked for a whole layer and does not read yet
    (the daemon's sends to it block): a second peer's requests are answered busy at once,
    or, queueing, wait for the slot (the daemon says so: a Line notice) and are all
    served, with the right bytes, once the first peer reads."""
    (server,) = cluster.add(peers=[], env={"P2PULL_UPLOAD_SLOTS": "1",
                                           "P2PULL_UPLOAD_WHEN_BUSY": when_busy})
    server.start()
    server.get(f"{origin.host}/{REPOSITORY}", tmp_path / "out", GET_TIMEOUT)
    content = MODEL["model-00001-of-00003.safetensors"]
    blob = "sha256:" + hashlib.sha256(content).hexdigest()
    plan = ChunkPlan.for_blob(len(content), parse_size(CHUNK_SIZE))  # the daemons' size
    with HostilePeer(server.port, cluster=CLUSTER, secret=cluster.secret) as first, \
            HostilePeer(server.port, cluster=CLUSTER, secret=cluster.secret) as second:
        for peer in (first, second):
            peer.handshake()
        wait_until(lambda: server.peer_ids() == {first.node_id, second.node_id}, 10,
                   "the daemon did not list both peers")
        wanted = min(plan.count, MAX_QUEUED_REQUESTS)  # far more than socket buffers hold
        first.ask(blob, plan.blob_size, plan.chunk_size, range(wanted))
        time.sleep(0.5)  # the first peer's requests are in, its slot taken
        second.ask(blob, plan.blob_size, plan.chunk_size, range(4))
        if when_busy == "answer":
            assert second.answers(4, timeout=10) == [("reject", i, "busy") for i in range(4)]
        else:
            assert second.answers(1, timeout=1.5) == []  # in line, not refused
            assert second.lines == [True]
        # both read at once: the slot goes round, and a peer that did not read would hold it
        readers = [("first", first, wanted)]
        if when_busy == "queue":
            readers.append(("second", second, 4))
        got: dict[str, list] = {}
        threads = [threading.Thread(target=lambda n=n, p=p, k=k: got.__setitem__(
            n, p.answers(k, timeout=30))) for n, p, k in readers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=40)
    assert set(got) == {name for name, _, _ in readers}
    if when_busy == "queue":
        # it waited, and was told when it waited no more (a control frame goes out after
        # the piece being written, so the last notice may still be on its way)
        assert second.lines[0] is True and False in second.lines
    else:
        assert not second.lines
    for name, answers in got.items():
        assert [kind for kind, _, _ in answers] == ["piece"] * len(answers), \
            (name, [a for a in answers if a[0] != "piece"][:3])
        assert len(answers) == (wanted if name == "first" else 4), name
        for _, index, payload in answers:
            offset, length = plan.span(index)
            assert payload == content[offset:offset + length], (name, index)


def test_a_freed_upload_slot_goes_to_the_peer_in_line_receiving_least(origin, cluster,
                                                                      tmp_path):
    """One upload slot and 2 MiB/s of upload: each 1 MiB piece holds the slot for half a
    second. A peer asks for six chunks and says it receives from 9 peers; while its first
    pieces go out, one peer joins the line saying 5, then another saying 0. The slot goes
    to the last to come, for both of its chunks, then to the one saying 5, then back to
    the first."""
    (server,) = cluster.add(peers=[], env={"P2PULL_UPLOAD_SLOTS": "1",
                                           "P2PULL_UPLOAD_RATE": "2MiB",
                                           "P2PULL_UPLOAD_BURST": "1"})
    server.start()
    server.get(f"{origin.host}/{REPOSITORY}", tmp_path / "out", GET_TIMEOUT)
    content = MODEL["model-00001-of-00003.safetensors"]
    blob = "sha256:" + hashlib.sha256(content).hexdigest()
    plan = ChunkPlan.for_blob(len(content), parse_size(CHUNK_SIZE))
    peers = [HostilePeer(server.port, cluster=CLUSTER, secret=cluster.secret)
             for _ in range(3)]
    holder, served_well, starved = peers
    asks = [(holder, 6, 9), (served_well, 2, 5), (starved, 2, 0)]
    got: dict[int, list] = {}
    try:
        for peer in peers:
            peer.handshake()
        wait_until(lambda: server.peer_ids() == {p.node_id for p in peers}, 10,
                   "the daemon did not list the three peers")
        threads = []
        for number, (peer, count, receiving) in enumerate(asks):
            peer.ask(blob, plan.blob_size, plan.chunk_size, range(count), receiving)
            threads.append(threading.Thread(target=lambda n=number, p=peer, k=count: (
                got.__setitem__(n, p.answers(k, timeout=30)))))
            threads[-1].start()
            time.sleep(0.1)
        for thread in threads:
            thread.join(timeout=40)
    finally:
        for peer in peers:
            peer.close()
    assert [len(got.get(n, ())) for n in range(3)] == [6, 2, 2], got.keys()
    assert all(kind == "piece" for answers in got.values() for kind, _, _ in answers)
    # the holder's second piece is read and queued while its first goes out, before the
    # others ask: its slot goes round from the third on
    assert max(holder.piece_times[:2]) < min(starved.piece_times)
    assert max(starved.piece_times) < min(served_well.piece_times)
    assert max(served_well.piece_times) < min(holder.piece_times[2:])


def test_wrong_secret_garbage_oversize_and_stalled_peers_are_dropped(origin, cluster,
                                                                     tmp_path):
    """Hostile connections to a daemon while it pulls with an honest peer: each is refused
    or dropped, and the pull and the honest link carry on."""
    honest, target = cluster.add(2)
    target.extra_env["P2PULL_PEER_TIMEOUT"] = "2"
    cluster.start_all()
    cluster.wait_for_mesh()
    seen: set[str] = set()
    stop = threading.Event()

    def watch_peers() -> None:
        while not stop.is_set():
            seen.update(target.peer_ids())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch_peers, daemon=True)
    watcher.start()
    dropped: dict[str, float] = {}
    try:
        with Proxy(origin.host, link_rate=SLOWER_ORIGIN) as proxy:
            ref = f"{proxy.host}/{REPOSITORY}"
            gets = [daemon.start_get(ref, tmp_path / f"out{i}")
                    for i, daemon in enumerate((honest, target))]
            wait_until(lambda: target.status()["sessions"], 15, "the pull did not start")
            dropped = attack(target, cluster.secret)
            assert gets[1].poll() is None, "the pull was over before the attacks ended"
            summaries = [daemon.finish_get(get, GET_TIMEOUT)
                         for daemon, get in zip((honest, target), gets)]
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert_same_files(tmp_path / "out0", MODEL)
    assert_same_files(tmp_path / "out1", MODEL)
    assert sum(s["from_peers"] for s in summaries) > 0, summaries
    assert dropped["wrong-secret"] not in seen
    # the stalled peer went when its peer_timeout (2 s) ran out, not at the first ping
    assert 1.5 <= dropped["stall-seconds"] <= DROP_TIMEOUT, dropped
    wait_until(lambda: target.peer_ids() == {honest.node_id}, 10,
               "the daemon's peers did not recover to the honest one")
    assert honest.peer_ids() == {target.node_id}
    assert target.status()["bans"] == 0  # broken connections are dropped, not banned
    # each for what it did (the daemon logs why it drops a peer)
    log = target.log_text()
    for reason in ("failed the handshake", "frame of 1195725856 bytes exceeds",
                   "malformed frame header", f"frame of {MAX_FRAME + 1} bytes exceeds",
                   "silent for 2 s"):
        assert reason in log, reason


def attack(target, secret: bytes) -> dict:
    """Each hostile connection in turn; each must be closed by the daemon. Returns the
    wrong-secret peer's node id and how long the stalled one lasted."""
    result = {}
    # a wrong cluster secret: the daemon's proof fails for us, ours for it
    with HostilePeer(target.port, cluster=CLUSTER, secret=b"not the cluster secret") as peer:
        result["wrong-secret"] = peer.node_id
        with pytest.raises((ProtocolError, ConnectionError)):
            peer.handshake()
        assert peer.wait_closed(DROP_TIMEOUT), "a peer with a wrong secret was not dropped"
    # not our protocol at all: HTTP to the peer port (a length far above the frame limit)
    with HostilePeer(target.port, cluster=CLUSTER, secret=secret) as peer:
        peer.send_raw(b"GET / HTTP/1.1\r\nHost: p2pull\r\n\r\n")
        assert peer.wait_closed(DROP_TIMEOUT), "a peer that sent HTTP was not dropped"

    def verified_peer() -> HostilePeer:
        """A peer the daemon accepted and lists, before it misbehaves."""
        peer = HostilePeer(target.port, cluster=CLUSTER, secret=secret)
        try:
            peer.handshake()
            wait_until(lambda: peer.node_id in target.peer_ids(), 10,
                       "the daemon did not list a verified peer")
        except BaseException:
            peer.close()
            raise
        return peer

    # garbage inside a well-formed length: a header that is not msgpack
    with verified_peer() as peer:
        peer.send_raw(struct.pack(">I", 16) + b"\xc1" * 16)
        assert peer.wait_closed(DROP_TIMEOUT), "a peer that sent a garbage frame was not dropped"
    # a frame length one over the limit: refused before any byte of it is buffered
    with verified_peer() as peer:
        peer.send_raw(struct.pack(">I", MAX_FRAME + 1))
        assert peer.wait_closed(DROP_TIMEOUT), "a peer that sent an oversize frame was not dropped"
    # the start of a frame, then silence
    with verified_peer() as peer:
        peer.send_raw(struct.pack(">I", 1000) + b"\x85\xa1t\xa5piece")
        started = time.monotonic()
        assert peer.wait_closed(DROP_TIMEOUT), "a peer that stalled mid-frame was not dropped"
        result["stall-seconds"] = peer.closed_at - started
    return result

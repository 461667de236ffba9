"""Node settings that act on its peer sockets, on real sockets."""

from __future__ import annotations

import logging
import socket
from types import SimpleNamespace

import pytest

from p2pull.config import load_config
from p2pull.core.swarm import SwarmConfig, UploadLine
from p2pull.net.node import Node
from p2pull.wire import Line
from p2pull.store.cas import Store


def node_with(tmp_path, **settings) -> Node:
    config = load_config(env={}, data_dir=tmp_path, **settings)
    return Node(config, Store(tmp_path / "store"), origin=None, node_id="test-node")


def congestion_of(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()


@pytest.fixture
def tcp_socket():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        yield sock


def test_peer_links_use_the_configured_congestion_control(tmp_path, tcp_socket):
    default = congestion_of(tcp_socket)
    wanted = "cubic" if default != "cubic" else "reno"  # reno is always allowed
    node_with(tmp_path, peer_tcp_congestion=wanted)._tune_peer_socket(
        SimpleNamespace(socket=tcp_socket))
    assert congestion_of(tcp_socket) == wanted


def test_without_the_setting_a_peer_socket_keeps_the_systems_default(tmp_path, tcp_socket):
    default = congestion_of(tcp_socket)
    node_with(tmp_path)._tune_peer_socket(SimpleNamespace(socket=tcp_socket))
    assert congestion_of(tcp_socket) == default


def test_a_name_the_kernel_refuses_is_logged_once_and_links_still_work(tmp_path, caplog):
    node = node_with(tmp_path, peer_tcp_congestion="no-such-algorithm")
    with caplog.at_level(logging.WARNING, logger="p2pull.node"):
        for _ in range(3):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                default = congestion_of(sock)
                node._tune_peer_socket(SimpleNamespace(socket=sock))
                assert congestion_of(sock) == default
    warnings = [r for r in caplog.records if "peer_tcp_congestion" in r.getMessage()]
    assert len(warnings) == 1
    assert "no-such-algorithm" in warnings[0].getMessage()


def test_the_setting_comes_from_its_environment_variable(tmp_path):
    config = load_config(env={"P2PULL_PEER_TCP_CONGESTION": "reno"}, data_dir=tmp_path)
    assert config.peer_tcp_congestion == "reno"
    assert load_config(env={}, data_dir=tmp_path).peer_tcp_congestion is None


async def test_control_frames_queued_behind_a_piece_all_go_out_at_the_next_turn():
    """A piece holds the link's send lock for its whole payload. Every control frame queued
    meanwhile (Haves, Requests) is sent at the next turn, before the next piece: at a turn
    per frame, one would pass per piece and the rest would wait for seconds."""
    import trio
    import trio.testing

    from p2pull.net.node import PeerLink
    from p2pull.wire import Have

    ours, theirs = trio.testing.memory_stream_pair()
    sent: list[bytes] = []
    conn = SimpleNamespace(send=lambda message: repr(message).encode() + b";")
    link = PeerLink("peer", "127.0.0.1", 7420, True, ours, conn)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Node._write_outbox, None, link)  # the link's writer task
        async with link.send_lock:  # a piece is going out
            for index in range(5):
                link.send(Have("sha256:" + "ab" * 32, index))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(link.write, [b"next-piece;"])
            await trio.testing.wait_all_tasks_blocked()
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            while b"next-piece;" not in b"".join(sent):
                sent.append(await theirs.receive_some())
        nursery.cancel_scope.cancel()
    frames = b"".join(sent).split(b";")[:-1]
    assert [b"index=" + str(i).encode() in frame for i, frame in enumerate(frames[:5])] == \
        [True] * 5
    assert frames[5] == b"next-piece"
    assert link.bytes_out == len(b"".join(sent))


def test_an_upload_rate_bursts_one_seconds_worth_unless_told_otherwise(tmp_path):
    """With the old fixed 64 MiB burst, a node capped at 11.4 MB/s could send at line
    rate for seconds at a time: a cap below the link's rate never acted."""
    rate = 11_400_000
    capped = node_with(tmp_path, upload_rate=rate)
    assert capped.upload_bucket.burst == rate
    # the second second's worth waits: 1 s at the rate after the first, taken at once
    assert capped.upload_bucket.reserve(rate, now=0.0) == 0.0
    assert capped.upload_bucket.reserve(rate, now=0.0) == pytest.approx(1.0)
    assert node_with(tmp_path, upload_rate=rate, upload_burst=2**20).upload_bucket.burst == 2**20
    assert node_with(tmp_path).upload_bucket.rate is None


async def test_a_line_notice_reaches_the_swarms_of_the_blobs_the_peer_shares(tmp_path):
    """A Line notice is about the connection, not one blob: every swarm the peer has
    joined hears it, and no other."""
    node = node_with(tmp_path)
    heard: dict[str, list] = {blob: [] for blob in ("a", "b", "c")}
    node.sessions = {blob: SimpleNamespace(apply=events.append)
                     for blob, events in heard.items()}
    link = SimpleNamespace(peer_id="peer", joined={"a", "b", "gone"})
    assert await node._dispatch(link, Line(True))
    assert await node._dispatch(link, Line(False))
    expected = [UploadLine("peer", True), UploadLine("peer", False)]
    assert heard == {"a": expected, "b": expected, "c": []}


async def test_a_piece_trickling_in_still_shows_its_sender_alive(tmp_path):
    """The reader asks the socket to wake it only once 256 KiB of a payload are in
    (SO_RCVLOWAT); through a congested rack uplink a piece can take seconds to get that
    far, and a peer heard nothing from for origin_wait_limit counts as silent (its orphans
    go to the origin again). After RECEIVE_PATIENCE the reader takes what is there."""
    import trio

    from p2pull.net.node import RECEIVE_PATIENCE, PeerLink
    from p2pull.wire import Piece
    from p2pull.wire.codec import encode_piece_head
    from tests.wire_pair import ConnectionPair

    node = node_with(tmp_path)
    pair = ConnectionPair(allocate=(node.payload_pool.allocate, None))  # as the node's links
    pair.handshake()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        sender = await trio.open_tcp_stream("127.0.0.1", port)
        ours = await listeners[0].accept()
        link = PeerLink("peer", "127.0.0.1", port, False, ours, pair.conn["a"])
        nursery.start_soon(node._read, link, [])
        blob = "sha256:" + "ab" * 32
        head = encode_piece_head(Piece(blob, 0, bytes(16), b""), 1024 * 1024)
        await sender.send_all(head + bytes(64 * 1024))  # a megabyte piece's first 64 KiB
        with trio.fail_after(5):  # read at once, with the header
            while link.bytes_in < len(head) + 64 * 1024:
                await trio.sleep(0.01)
        await sender.send_all(bytes(8 * 1024))  # the next 8 KiB, then nothing for a while
        with trio.fail_after(SwarmConfig().origin_wait_limit):
            while link.bytes_in < len(head) + 72 * 1024:
                await trio.sleep(0.01)
        assert link.alive_at >= trio.current_time() - RECEIVE_PATIENCE - 0.5
        nursery.cancel_scope.cancel()
    await sender.aclose()
    await listeners[0].aclose()

"""Discovery: mDNS between instances on 127.0.0.1 (multicast on loopback, UDP 5353 shared
through SO_REUSEPORT), static peers, a DNS name followed over time, and run_discovery.

Every mDNS test uses a fresh cluster name, so services of other test runs on the same host
are ignored, and binds to 127.0.0.1 only: no packet leaves loopback.
"""

from __future__ import annotations

import ipaddress
import math
import secrets
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
from zeroconf import IPVersion, ServiceInfo, ServiceStateChange, Zeroconf

import p2pull.discovery.dns as dns_module
from p2pull.config import Config
from p2pull.core.chunks import PROTOCOL_VERSION
from p2pull.discovery import (SERVICE_TYPE, MdnsDiscovery, PeerFound, PeerGone,
                              default_interfaces, parse_peer, run_discovery, run_dns,
                              run_static)
from p2pull.discovery.mdns import _pick_address
from p2pull.errors import UsageError

LOOPBACK = "127.0.0.1"
#: the brief's bound on finding each other; measured ~1.2–1.8 s here
FIND_WITHIN = 5.0


def new_id() -> str:
    return secrets.token_hex(16)


def new_cluster() -> str:
    return "test-" + secrets.token_hex(4)


@dataclass
class Running:
    """One discovery task under test and every event it reported."""

    discovery: MdnsDiscovery
    scope: trio.CancelScope
    events: list = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    def found(self) -> dict[str, PeerFound]:
        """node id -> the latest PeerFound not followed by a PeerGone."""
        live: dict[str, PeerFound] = {}
        for event in self.events:
            if isinstance(event, PeerFound):
                live[event.node_id] = event
            elif live.get(event.node_id) == PeerFound(event.node_id, event.host, event.port,
                                                      event.source):
                del live[event.node_id]
        return live

    async def wait_for(self, predicate) -> None:
        while not predicate(self):
            self.changed = trio.Event()
            await self.changed.wait()


async def _collect(running: Running, receive: trio.MemoryReceiveChannel) -> None:
    async for event in receive:
        running.events.append(event)
        running.changed.set()


async def start_mdns(nursery: trio.Nursery, discovery: MdnsDiscovery) -> Running:
    send, receive = trio.open_memory_channel(math.inf)
    running = Running(discovery, trio.CancelScope())

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with running.scope:
            await discovery.run(send, task_status=task_status)

    nursery.start_soon(_collect, running, receive)
    await nursery.start(run)
    return running


def zeroconf_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate()
            if t.name.startswith(("zeroconf", "p2pull-mdns")) or "_run_loop" in t.name}


async def wait_closed(before: set[threading.Thread]) -> None:
    """Everything mDNS started is gone (threads end a moment after close returns)."""
    with trio.fail_after(3):
        while zeroconf_threads() - before:
            await trio.sleep(0.05)


# -- mDNS -----------------------------------------------------------------------------------


async def test_mdns_nodes_of_a_cluster_find_each_other_and_see_departures():
    before = zeroconf_threads()
    cluster = new_cluster()
    ours = [MdnsDiscovery(new_id(), cluster, 17401 + i, interfaces=[LOOPBACK]) for i in range(3)]
    # controls that must be ignored by ours, and that find each other (so their
    # announcements were on the wire while ours listened)
    other_cluster = [MdnsDiscovery(new_id(), new_cluster() + "-x", 17411, interfaces=[LOOPBACK])]
    other_cluster.append(MdnsDiscovery(other_cluster[0].node_id[::-1], other_cluster[0].cluster,
                                       17412, interfaces=[LOOPBACK]))
    other_version = [MdnsDiscovery(new_id(), cluster, 17421 + i, interfaces=[LOOPBACK],
                                   protocol_version=PROTOCOL_VERSION + 1) for i in range(2)]
    async with trio.open_nursery() as nursery:
        with trio.fail_after(FIND_WITHIN + 10):
            start = time.monotonic()
            running = [await start_mdns(nursery, d) for d in ours + other_cluster + other_version]
            mine, controls = running[:3], running[3:]

            with trio.fail_after(FIND_WITHIN):
                for node in running:
                    expected = len(mine) - 1 if node in mine else 1
                    await node.wait_for(lambda n: len(n.found()) == expected)
            found_after = time.monotonic() - start
            for node in mine:
                others = {d.node_id: d.port for d in ours if d is not node.discovery}
                assert node.found() == {node_id: PeerFound(node_id, LOOPBACK, port, "mdns")
                                        for node_id, port in others.items()}
            for pair in (controls[:2], controls[2:]):
                assert pair[0].found().keys() == {pair[1].discovery.node_id}

            # one node stops: the two others see it go
            leaving, staying = mine[2], mine[:2]
            stop = time.monotonic()
            leaving.scope.cancel()
            with trio.fail_after(FIND_WITHIN):
                for node in staying:
                    await node.wait_for(lambda n: leaving.discovery.node_id not in n.found())
            gone_after = time.monotonic() - stop
            for node in staying:
                assert node.events[-1] == PeerGone(leaving.discovery.node_id, LOOPBACK,
                                                   leaving.discovery.port, "mdns")
            nursery.cancel_scope.cancel()

    ids_of = {d.node_id for d in other_cluster + other_version}
    for node in mine:
        seen = {event.node_id for event in node.events}
        assert node.discovery.node_id not in seen  # never our own service
        assert not seen & ids_of  # never another cluster or protocol version
    await wait_closed(before)
    print(f"\nmDNS: 7 instances found each other in {found_after:.2f} s; "
          f"departure seen in {gone_after:.2f} s")


def raw_info(node_id: str, cluster: str, port: int, *, version=PROTOCOL_VERSION,
             instance: str | None = None) -> ServiceInfo:
    return ServiceInfo(SERVICE_TYPE, f"{instance or node_id}.{SERVICE_TYPE}", port=port,
                       properties={"id": node_id, "cluster": cluster, "v": str(version)},
                       server=f"raw-{secrets.token_hex(4)}.local.", parsed_addresses=[LOOPBACK])


@asynccontextmanager
async def raw_services(*infos: ServiceInfo):
    """Peers announced by zeroconf itself (so the test can change their records),
    registered in parallel; closing sends their goodbyes."""
    zc = await trio.to_thread.run_sync(
        lambda: Zeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only))
    try:
        async with trio.open_nursery() as nursery:
            for info in infos:
                nursery.start_soon(trio.to_thread.run_sync, zc.register_service, info)
        yield zc
    finally:
        with trio.move_on_after(5, shield=True):
            await trio.to_thread.run_sync(zc.close, abandon_on_cancel=True)


async def test_mdns_follows_a_port_change_and_a_goodbye():
    before = zeroconf_threads()
    cluster = new_cluster()
    me = MdnsDiscovery(new_id(), cluster, 17431, interfaces=[LOOPBACK])
    peer_id = new_id()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            node = await start_mdns(nursery, me)
            info = raw_info(peer_id, cluster, 17432)
            async with raw_services(info) as zc:
                with trio.fail_after(FIND_WITHIN):
                    await node.wait_for(lambda n: peer_id in n.found())
                assert node.events == [PeerFound(peer_id, LOOPBACK, 17432, "mdns")]

                info.port = 17433
                changed = time.monotonic()
                await trio.to_thread.run_sync(zc.update_service, info)
                with trio.fail_after(FIND_WITHIN):
                    await node.wait_for(lambda n: n.found().get(peer_id, info).port == 17433)
                print(f"\nmDNS: port change seen in {time.monotonic() - changed:.2f} s")
                assert node.events[1:] == [PeerGone(peer_id, LOOPBACK, 17432, "mdns"),
                                           PeerFound(peer_id, LOOPBACK, 17433, "mdns")]
            # closing the peer's zeroconf sends goodbyes
            with trio.fail_after(FIND_WITHIN):
                await node.wait_for(lambda n: peer_id not in n.found())
            assert node.events[-1] == PeerGone(peer_id, LOOPBACK, 17433, "mdns")
            nursery.cancel_scope.cancel()
    await wait_closed(before)


async def test_mdns_ignores_services_claiming_our_id_or_lacking_fields():
    before = zeroconf_threads()
    cluster = new_cluster()
    me = MdnsDiscovery(new_id(), cluster, 17441, interfaces=[LOOPBACK])
    good = new_id()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            node = await start_mdns(nursery, me)
            async with raw_services(raw_info(me.node_id, cluster, 17442,
                                             instance="impostor-" + new_id()[:8]),
                                    raw_info("", cluster, 17443,
                                             instance="anonymous-" + new_id()[:8]),
                                    raw_info(new_id(), cluster, 17444, version="x"),
                                    raw_info(good, cluster, 17445)):
                # all four were announced together: once the good one is in, so were the rest
                with trio.fail_after(FIND_WITHIN):
                    await node.wait_for(lambda n: good in n.found())
                await trio.sleep(0.5)
                assert node.events == [PeerFound(good, LOOPBACK, 17445, "mdns")]
                nursery.cancel_scope.cancel()
    await wait_closed(before)


async def test_mdns_resolves_over_the_network_what_its_cache_lacks():
    """The resolver thread's path: a state change for a service our cache knows nothing of
    (a fresh zeroconf with no browser) is resolved by asking, off the browser thread."""
    before = zeroconf_threads()
    cluster, peer_id = new_cluster(), new_id()
    me = MdnsDiscovery(new_id(), cluster, 17471, interfaces=[LOOPBACK])
    me._networks = [ipaddress.IPv4Network("127.0.0.0/8")]
    events: list = []
    me._deliver = events.append
    with trio.fail_after(15):
        async with raw_services(raw_info(peer_id, cluster, 17472)):
            zc = await trio.to_thread.run_sync(
                lambda: Zeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only))
            resolver = threading.Thread(target=me._resolve_queued, args=(zc,), daemon=True)
            resolver.start()
            try:
                name = f"{peer_id}.{SERVICE_TYPE}"
                me._on_change(zc, SERVICE_TYPE, name, ServiceStateChange.Added)
                assert events == [] and name in me._pending  # queued, not resolved here
                with trio.fail_after(FIND_WITHIN):
                    while not events:
                        await trio.sleep(0.02)
                assert events == [PeerFound(peer_id, LOOPBACK, 17472, "mdns")]
            finally:
                me._to_resolve.put(None)
                await trio.to_thread.run_sync(resolver.join, 5)
                await trio.to_thread.run_sync(zc.close)
    await wait_closed(before)


def test_mdns_drops_a_resolution_that_a_newer_change_overtook():
    me = MdnsDiscovery(new_id(), "c", 1, interfaces=[LOOPBACK])
    events: list = []
    me._deliver = events.append
    name, peer = f"x.{SERVICE_TYPE}", PeerFound("x", LOOPBACK, 2, "mdns")
    me._generation[name] = 1
    me._settle(name, 1, peer)
    me._generation[name] = 3  # a Removed (2) and a new change (3) came meanwhile
    me._settle(name, 2, None)
    me._settle(name, 1, PeerFound("x", LOOPBACK, 9, "mdns"))
    assert events == [peer]
    me._settle(name, 3, None)
    assert events == [peer, PeerGone("x", LOOPBACK, 2, "mdns")]


async def test_mdns_stops_promptly_even_while_registering():
    before = zeroconf_threads()
    me = MdnsDiscovery(new_id(), new_cluster(), 17451, interfaces=[LOOPBACK])
    async with trio.open_nursery() as nursery:
        node = await start_mdns(nursery, me)
        stop = time.monotonic()
        node.scope.cancel()
        nursery.cancel_scope.cancel()
    took = time.monotonic() - stop
    assert took < 5.0
    print(f"\nmDNS: stopped during its registration probe in {took:.2f} s")
    await wait_closed(before)


def test_default_interfaces_follow_the_listen_address():
    assert default_interfaces("0.0.0.0:7420") is None
    assert default_interfaces(":7420") is None
    assert default_interfaces("[::]:7420") is None
    assert default_interfaces("10.1.2.3:7420") == ["10.1.2.3"]


def test_pick_address_prefers_our_networks_then_routed_ones():
    lan = [ipaddress.IPv4Network("10.0.0.0/24")]
    assert _pick_address(["192.168.1.5", "10.0.0.7"], lan) == "10.0.0.7"
    assert _pick_address(["127.0.0.1", "192.168.1.5"], lan) == "192.168.1.5"
    assert _pick_address(["127.0.0.1"], lan) is None
    assert _pick_address(["127.0.0.1"], [ipaddress.IPv4Network("127.0.0.0/8")]) == "127.0.0.1"


# -- static ---------------------------------------------------------------------------------


async def drain(receive: trio.MemoryReceiveChannel) -> list:
    events = []
    while True:
        try:
            events.append(receive.receive_nowait())
        except trio.WouldBlock:
            return events


async def test_static_reports_each_peer_once():
    send, receive = trio.open_memory_channel(math.inf)
    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_static, ["10.0.0.1:7420", "[::1]:7421", "10.0.0.1:7420",
                                             "node-b:7422"], send)
    assert await drain(receive) == [PeerFound(None, "10.0.0.1", 7420, "static"),
                                    PeerFound(None, "::1", 7421, "static"),
                                    PeerFound(None, "node-b", 7422, "static")]


async def test_static_rejects_a_bad_address_before_starting():
    send, _ = trio.open_memory_channel(math.inf)
    async with trio.open_nursery() as nursery:
        with pytest.raises(UsageError, match="host:port"):
            await nursery.start(run_static, ["no-port"], send)


def test_parse_peer():
    assert parse_peer("a:1") == ("a", 1)
    assert parse_peer("a", 7420) == ("a", 7420)
    assert parse_peer("::1", 7420) == ("::1", 7420)
    assert parse_peer("[fd00::1]:9") == ("fd00::1", 9)
    for bad in ("a", "a:0", "a:70000", ":1", "a:b"):
        with pytest.raises(UsageError):
            parse_peer(bad)


# -- DNS ------------------------------------------------------------------------------------


async def test_dns_resolves_a_name_with_its_port():
    send, receive = trio.open_memory_channel(math.inf)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_dns, "localhost:7420", 9999, send)
            event = await receive.receive()
            nursery.cancel_scope.cancel()
    assert event == PeerFound(None, "127.0.0.1", 7420, "dns:localhost:7420")


async def test_dns_follows_the_set_of_addresses(monkeypatch):
    answers = [{"10.0.0.1", "10.0.0.2"}, {"10.0.0.2", "10.0.0.3"},
               socket.gaierror(socket.EAI_AGAIN, "temporary"),  # keeps the last answer
               {"10.0.0.3"}, socket.gaierror(socket.EAI_NONAME, "no such name"),
               {"10.0.0.4"}]
    asked = []

    async def fake_resolve(name):
        asked.append(name)
        answer = answers[min(len(asked), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(dns_module, "resolve_ipv4", fake_resolve)
    send, receive = trio.open_memory_channel(math.inf)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_dns(
                "peers.p2pull.svc", 7420, send, interval=0.01, task_status=task_status))
            while len(asked) < len(answers) + 1:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    source = "dns:peers.p2pull.svc"
    assert set(asked) == {"peers.p2pull.svc"}
    assert await drain(receive) == [
        PeerFound(None, "10.0.0.1", 7420, source), PeerFound(None, "10.0.0.2", 7420, source),
        PeerGone(None, "10.0.0.1", 7420, source), PeerFound(None, "10.0.0.3", 7420, source),
        PeerGone(None, "10.0.0.2", 7420, source),
        PeerGone(None, "10.0.0.3", 7420, source),
        PeerFound(None, "10.0.0.4", 7420, source)]


# -- run_discovery --------------------------------------------------------------------------


async def test_run_discovery_runs_every_configured_method():
    before = zeroconf_threads()
    cluster = new_cluster()
    configs = [Config(listen=f"{LOOPBACK}:0", cluster=cluster, peers=("10.9.9.9:7420",),
                      discovery=("mdns", "static", "dns:localhost")) for _ in range(2)]
    ids = [new_id(), new_id()]
    channels = [trio.open_memory_channel(math.inf) for _ in configs]
    with trio.fail_after(FIND_WITHIN + 5):
        async with trio.open_nursery() as nursery:
            for i, (config, (send, _)) in enumerate(zip(configs, channels)):
                await nursery.start(run_discovery, config, ids[i], 17461 + i, send)
            for i, (_, receive) in enumerate(channels):
                seen = []
                while not any(e.source == "mdns" for e in seen):
                    seen.append(await receive.receive())
                assert set(seen) == {PeerFound(None, "10.9.9.9", 7420, "static"),
                                     PeerFound(None, "127.0.0.1", 17461 + i, "dns:localhost"),
                                     PeerFound(ids[1 - i], LOOPBACK, 17461 + (1 - i), "mdns")}
            nursery.cancel_scope.cancel()
    await wait_closed(before)


async def test_run_discovery_rejects_unknown_methods():
    send, _ = trio.open_memory_channel(math.inf)
    for methods in (("mdns", "carrier-pigeon"), ("dns:",), ("dns:name:port",)):
        async with trio.open_nursery() as nursery:
            with pytest.raises(UsageError):
                await nursery.start(run_discovery, Config(discovery=methods), new_id(), 7420,
                                    send)

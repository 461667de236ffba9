"""mDNS / DNS-SD: announce this node as ``<node id>._p2pull._tcp.local.`` and report the
other nodes of its cluster.

Threads: python-zeroconf runs its own asyncio loop in a thread; its synchronous API is
called from our threads only (opening, registering, resolving, closing), never from the trio
thread. Its ServiceBrowser calls ``_on_change`` in the browser's own thread, which reads the
service from zeroconf's cache (announcements carry all its records, so this is the usual
case); a service the cache cannot complete goes to one resolver thread, which asks the
network (up to RESOLVE_TIMEOUT_MS), so a departed or silent service never holds up the
others. Both hand PeerFound/PeerGone to trio with ``trio.from_thread.run_sync`` into an
unbounded internal channel; a trio task forwards them to the caller's channel, so the
zeroconf side never blocks on a slow consumer and nothing is dropped.

The TXT record carries ``id`` (node id), ``cluster`` and ``v`` (protocol version). Services
of another cluster, another protocol version or our own node id are ignored. A goodbye or
an expired record gives PeerGone; a changed address or port gives PeerGone for the old one
then PeerFound for the new one.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import queue
import socket
import threading
from collections.abc import Sequence

import ifaddr
import trio
from zeroconf import (InterfaceChoice, IPVersion, NonUniqueNameException, ServiceBrowser,
                      ServiceInfo, ServiceStateChange, Zeroconf)

from p2pull.core.chunks import PROTOCOL_VERSION
from p2pull.discovery.events import PeerFound, PeerGone

log = logging.getLogger("p2pull.discovery.mdns")

SERVICE_TYPE = "_p2pull._tcp.local."
SOURCE = "mdns"
#: how long the resolver thread asks for a service the cache cannot complete (milliseconds)
RESOLVE_TIMEOUT_MS = 3000
#: bound on stopping: the rest of a registration probe (~1.6 s), goodbyes, closing sockets
CLOSE_TIMEOUT = 5.0
#: bound on waiting for a registration still probing when we stop
REGISTER_WAIT = 3.0


def default_interfaces(listen: str) -> list[str] | None:
    """The interfaces to announce on for a ``listen`` address: its host, or None (all
    IPv4 interfaces) when it listens on every address."""
    host = listen.strip().rpartition(":")[0].strip("[]")
    return None if host in ("", "0.0.0.0", "::") else [host]


class MdnsDiscovery:
    """Announce one node and report the other nodes of its cluster. One ``run`` per
    instance.

    ``interfaces``: IPv4 addresses (or host names) to announce and browse on; None for
    every IPv4 interface, in which case loopback addresses are not announced."""

    def __init__(self, node_id: str, cluster: str, port: int, *,
                 interfaces: Sequence[str] | None = None,
                 protocol_version: int = PROTOCOL_VERSION):
        self.node_id = node_id
        self.cluster = cluster
        self.port = port
        self.interfaces = list(interfaces) if interfaces is not None else None
        self.protocol_version = protocol_version
        self.instance_name = f"{node_id}.{SERVICE_TYPE}"
        #: guards the three fields below (browser and resolver threads)
        self._lock = threading.Lock()
        #: instance name -> what we reported for it
        self._known: dict[str, PeerFound] = {}
        #: instance name -> count of state changes seen, so a slow resolution that a newer
        #: change overtook is dropped
        self._generation: dict[str, int] = {}
        #: names queued for the resolver thread
        self._pending: set[str] = set()
        self._to_resolve: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._networks: list[ipaddress.IPv4Network] = []
        self._deliver = None

    async def run(self, send_channel: trio.MemorySendChannel, *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Browse and announce until cancelled. ``task_status.started()`` once zeroconf is
        bound and browsing (registration goes on in its thread for ~1.6 s); OSError if it
        cannot bind. On cancellation the service is unregistered (goodbye packets) and
        zeroconf closed, within CLOSE_TIMEOUT. Does not close ``send_channel``."""
        token = trio.lowlevel.current_trio_token()
        internal_send, internal_receive = trio.open_memory_channel(math.inf)

        def deliver(event) -> None:  # browser or resolver thread
            try:
                trio.from_thread.run_sync(internal_send.send_nowait, event, trio_token=token)
            except (trio.RunFinishedError, trio.BrokenResourceError, trio.ClosedResourceError):
                log.debug("mDNS event after stop dropped: %s", event)

        self._deliver = deliver
        zc, browser = await trio.to_thread.run_sync(self._open)
        registering = threading.Thread(target=self._register, args=(zc,), daemon=True,
                                       name=f"p2pull-mdns-register-{self.node_id[:8]}")
        resolver = threading.Thread(target=self._resolve_queued, args=(zc,), daemon=True,
                                    name=f"p2pull-mdns-resolve-{self.node_id[:8]}")
        try:
            registering.start()
            resolver.start()
            task_status.started()
            async with internal_receive:
                async for event in internal_receive:
                    await send_channel.send(event)
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True) as scope:
                await trio.to_thread.run_sync(self._close, zc, browser, registering, resolver,
                                              abandon_on_cancel=True)
            if scope.cancelled_caught:
                log.warning("mDNS did not close within %.1f s; left to its threads",
                            CLOSE_TIMEOUT)
            internal_send.close()

    # -- worker threads ---------------------------------------------------------------------

    def _open(self) -> tuple[Zeroconf, ServiceBrowser]:
        if self.interfaces is None:
            zc = Zeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
        else:
            self.interfaces = [socket.gethostbyname(name) for name in self.interfaces]
            zc = Zeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
        try:
            self._networks = _local_networks(self.interfaces)
            browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[self._on_change])
        except BaseException:
            zc.close()
            raise
        return zc, browser

    def _register(self, zc: Zeroconf) -> None:
        addresses = self.interfaces or _announced_addresses(self._networks)
        info = ServiceInfo(SERVICE_TYPE, self.instance_name, port=self.port,
                           properties={"id": self.node_id, "cluster": self.cluster,
                                       "v": str(self.protocol_version)},
                           server=f"p2pull-{self.node_id}.local.",
                           parsed_addresses=addresses)
        try:
            zc.register_service(info)
        except NonUniqueNameException:
            log.error("another host announces node id %s on mDNS: not announcing this node "
                      "(copied data directory?)", self.node_id)
        except Exception as exc:  # closing while probing, sockets gone, …
            log.warning("mDNS registration of %s failed: %r", self.instance_name, exc)
        else:
            log.debug("mDNS: announced %s on %s port %d", self.instance_name, addresses,
                      self.port)

    def _close(self, zc: Zeroconf, browser: ServiceBrowser, registering: threading.Thread,
               resolver: threading.Thread) -> None:
        self._closing.set()
        browser.cancel()  # joins the browser thread: no more _on_change after this
        self._to_resolve.put(None)
        if registering.is_alive():
            registering.join(REGISTER_WAIT)
        zc.close()  # unregisters (goodbyes), then closes the sockets and the loop
        if resolver.is_alive():
            resolver.join(RESOLVE_TIMEOUT_MS / 1000)

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        """Browser thread: turn a state change into PeerGone/PeerFound. An error is
        logged, never raised (it would end the browser thread)."""
        try:
            self._follow(zeroconf, service_type, name, state_change)
        except Exception:
            log.exception("mDNS: ignoring %s of %s", state_change.name, name)

    def _follow(self, zeroconf: Zeroconf, service_type: str, name: str,
                state_change: ServiceStateChange) -> None:
        if name == self.instance_name or service_type != SERVICE_TYPE:
            return
        with self._lock:
            generation = self._generation[name] = self._generation.get(name, 0) + 1
        if state_change is ServiceStateChange.Removed:
            self._settle(name, generation, None)
            return
        info = ServiceInfo(SERVICE_TYPE, name)
        if info.load_from_cache(zeroconf):
            self._settle(name, generation, self._peer_of(info))
            return
        with self._lock:  # incomplete in the cache: ask the network, off this thread
            if name not in self._pending:
                self._pending.add(name)
                self._to_resolve.put(name)

    def _resolve_queued(self, zc: Zeroconf) -> None:
        """Resolver thread: ask the network for each queued service in turn."""
        while (name := self._to_resolve.get()) is not None:
            with self._lock:
                self._pending.discard(name)
                generation = self._generation.get(name)
            try:
                info = ServiceInfo(SERVICE_TYPE, name)
                if info.request(zc, RESOLVE_TIMEOUT_MS):
                    self._settle(name, generation, self._peer_of(info))
            except Exception as exc:  # EventLoopBlocked when zeroconf closes under us
                log.log(logging.DEBUG if self._closing.is_set() else logging.WARNING,
                        "mDNS: resolving %s failed: %r", name, exc)

    def _settle(self, name: str, generation: int | None, found: PeerFound | None) -> None:
        """Report what changed for ``name``, unless a newer state change overtook us."""
        with self._lock:
            if generation != self._generation.get(name):
                return
            old = self._known.get(name)
            if found == old:
                return
            if old is not None:
                del self._known[name]
                self._deliver(PeerGone(old.node_id, old.host, old.port, old.source))
            if found is not None:
                self._known[name] = found
                self._deliver(found)

    def _peer_of(self, info: ServiceInfo) -> PeerFound | None:
        """The peer a resolved service stands for, or None if we ignore it."""
        props = info.decoded_properties
        node_id = props.get("id")
        if (not node_id or node_id == self.node_id or props.get("cluster") != self.cluster
                or props.get("v") != str(self.protocol_version) or not info.port):
            return None
        host = _pick_address(info.parsed_addresses(IPVersion.V4Only), self._networks)
        return None if host is None else PeerFound(node_id, host, info.port, SOURCE)


def _local_networks(interfaces: list[str] | None) -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of ``interfaces`` (all non-loopback ones for None, or loopback
    if that is all there is)."""
    networks = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                networks.append(ipaddress.IPv4Interface(f"{ip.ip}/{ip.network_prefix}"))
    if interfaces is not None:
        chosen = [n.network for n in networks if str(n.ip) in interfaces]
        known = {str(n.ip) for n in networks}
        chosen += [ipaddress.IPv4Network(ip) for ip in interfaces if ip not in known]
        return chosen
    outside = [n.network for n in networks if not n.ip.is_loopback]
    return outside or [n.network for n in networks]


def _announced_addresses(networks: list[ipaddress.IPv4Network]) -> list[str]:
    """Our addresses on ``networks`` (used when announcing on every interface)."""
    addresses = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and any(ipaddress.IPv4Address(ip.ip) in net
                                              for net in networks):
                addresses.append(ip.ip)
    return addresses


def _pick_address(addresses: list[str], networks: list[ipaddress.IPv4Network]) -> str | None:
    """The peer's address to dial: the newest one (zeroconf lists them newest first) on one
    of our networks, else the newest that is not loopback (routed), else None."""
    parsed = [ipaddress.IPv4Address(a) for a in addresses]
    for address in parsed:
        if any(address in net for net in networks):
            return str(address)
    for address in parsed:
        if not address.is_loopback:
            return str(address)
    return None

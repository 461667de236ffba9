"""Discovery: find the addresses of other nodes (mDNS, static peers, a DNS name) and report
them as PeerFound/PeerGone on a trio memory channel.

    send, receive = trio.open_memory_channel(math.inf)
    await nursery.start(run_discovery, config, node_id, listen_port, send)
    async for event in receive: ...   # PeerFound -> dial (host, port); PeerGone -> a hint

Discovery only finds addresses; the peer handshake decides who is a member.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from p2pull.config import Config
from p2pull.discovery.dns import DNS_INTERVAL, resolve_ipv4, run_dns
from p2pull.discovery.events import PeerFound, PeerGone
from p2pull.discovery.mdns import SERVICE_TYPE, MdnsDiscovery, default_interfaces
from p2pull.discovery.static import parse_peer, run_static
from p2pull.errors import UsageError

__all__ = ["PeerFound", "PeerGone", "MdnsDiscovery", "SERVICE_TYPE", "default_interfaces",
           "run_static", "run_dns", "resolve_ipv4", "DNS_INTERVAL", "parse_peer",
           "run_discovery", "check_methods"]

log = logging.getLogger("p2pull.discovery")


def check_methods(methods: Sequence[str]) -> None:
    """Raise UsageError for a discovery method that is not ``mdns``, ``static`` or
    ``dns:NAME[:port]``."""
    for method in methods:
        if method in ("mdns", "static"):
            continue
        if method.startswith("dns:") and method[4:].strip():
            parse_peer(method[4:], 1)
            continue
        raise UsageError(f"unknown discovery method {method!r}: use mdns, static or dns:NAME")


async def run_discovery(config: Config, node_id: str, listen_port: int,
                        send_channel: trio.MemorySendChannel, *,
                        interfaces: Sequence[str] | None = None,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run every method of ``config.discovery`` until cancelled, all sending to
    ``send_channel`` (not closed here; give it room or a reader).

    ``listen_port`` is announced by mDNS and is the default port of ``dns:NAME``.
    ``interfaces`` are mDNS's IPv4 addresses, by default the host of ``config.listen`` or
    every interface when that is 0.0.0.0. UsageError for an unknown method before
    ``started()``; an mDNS that cannot bind (OSError) is logged and left out."""
    check_methods(config.discovery)
    if interfaces is None:
        interfaces = default_interfaces(config.listen)
    async with trio.open_nursery() as nursery:
        for method in config.discovery:
            if method == "mdns":
                mdns = MdnsDiscovery(node_id, config.cluster, listen_port,
                                     interfaces=interfaces)
                try:
                    await nursery.start(mdns.run, send_channel)
                except OSError as exc:
                    log.warning("mDNS discovery is off: cannot bind on %s: %s",
                                interfaces or "all interfaces", exc)
            elif method == "static":
                await nursery.start(run_static, config.peers, send_channel)
            else:
                await nursery.start(run_dns, method[4:].strip(), listen_port, send_channel)
        task_status.started()

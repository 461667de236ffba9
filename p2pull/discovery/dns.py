"""``dns:NAME``: a DNS name whose A records are the peers (a Kubernetes headless service).

NAME is resolved every ``interval`` seconds; each address with the port (from ``NAME:port``
or the node's own listen port) is a peer. A name that does not exist (NXDOMAIN, no A
records) means no peers; other resolver errors keep the last answer.
"""

from __future__ import annotations

import logging
import socket

import trio

from p2pull.discovery.events import PeerFound, PeerGone
from p2pull.discovery.static import parse_peer

log = logging.getLogger("p2pull.discovery.dns")

#: seconds between two resolutions of the name
DNS_INTERVAL = 10.0
#: getaddrinfo errors that mean "no such name / no addresses" rather than "try later"
_NO_ADDRESSES = {getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA")
                 if hasattr(socket, name)}


async def resolve_ipv4(name: str) -> set[str]:
    """The IPv4 addresses of ``name`` (the system resolver, off the trio thread).
    Tests replace this function with ``monkeypatch.setattr``."""
    infos = await trio.socket.getaddrinfo(name, None, family=trio.socket.AF_INET,
                                          type=trio.socket.SOCK_STREAM)
    return {info[4][0] for info in infos}


async def run_dns(target: str, default_port: int, send_channel: trio.MemorySendChannel, *,
                  interval: float = DNS_INTERVAL, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Follow ``target`` (``NAME`` or ``NAME:port``) until cancelled: PeerFound for each new
    address, PeerGone for each address that left, with ``source`` ``dns:TARGET``. A bad
    target raises UsageError before ``task_status.started()``."""
    name, port = parse_peer(target, default_port)
    source = f"dns:{target}"
    known: set[str] = set()
    task_status.started()
    while True:
        try:
            current = await resolve_ipv4(name)
        except socket.gaierror as exc:
            if exc.errno in _NO_ADDRESSES:
                current = set()
            else:
                log.warning("resolving %s failed, keeping %d peers: %s", name, len(known), exc)
                current = known
        for host in sorted(known - current):
            await send_channel.send(PeerGone(None, host, port, source))
        for host in sorted(current - known):
            await send_channel.send(PeerFound(None, host, port, source))
        known = current
        await trio.sleep(interval)

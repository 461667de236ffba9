"""Static peers from the config: each ``host:port`` reported once."""

from __future__ import annotations

import trio

from p2pull.discovery.events import PeerFound
from p2pull.errors import UsageError

SOURCE = "static"


def parse_peer(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) -> (host, port); ``"host"`` alone takes
    ``default_port`` when one is given. Raises UsageError otherwise."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep or (host.count(":") and not host.endswith("]")):  # bare name or bare IPv6
        host, port = text, ""
    host = host.strip("[]")
    if not port and default_port is not None:
        port = str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"bad peer address {text!r}: write host:port")
    return host, int(port)


async def run_static(peers: tuple[str, ...] | list[str], send_channel: trio.MemorySendChannel,
                     *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Send one PeerFound per distinct peer, then return. Bad addresses raise UsageError
    before ``task_status.started()``."""
    addresses = list(dict.fromkeys(parse_peer(peer) for peer in peers))
    task_status.started()
    for host, port in addresses:
        await send_channel.send(PeerFound(None, host, port, SOURCE))

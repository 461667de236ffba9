"""What discovery reports: an address where a peer may listen, and the end of one.

Discovery only finds addresses. The peer handshake verifies node id, cluster and secret, so
an event is a hint to dial, never a proof of who is there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PeerFound:
    """A peer may be listening at ``host:port``."""

    #: the peer's node id when the method tells it (mDNS), else None (static, DNS)
    node_id: str | None
    #: IPv4 address to dial
    host: str
    #: TCP port of the peer protocol
    port: int
    #: the discovery method as configured: ``mdns``, ``static`` or ``dns:NAME``
    source: str


@dataclass(frozen=True)
class PeerGone:
    """An address reported earlier by the same ``source`` is no longer announced.

    The fields are those of the PeerFound it ends. A peer that crashed may never be
    reported gone (mDNS records outlive it by their TTL): links still need their own
    liveness checks."""

    #: the peer's node id when the method tells it (mDNS), else None
    node_id: str | None
    #: IPv4 address that was reported
    host: str
    #: TCP port that was reported
    port: int
    #: the discovery method as configured: ``mdns``, ``static`` or ``dns:NAME``
    source: str

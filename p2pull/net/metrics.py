"""Prometheus ``/metrics`` for a node, read from its counters at scrape time.

prometheus-client serves them from its own thread (a WSGI server): scrapes never wait on
the trio loop, and reading a few integers the loop writes needs no lock under the GIL.
"""

from __future__ import annotations

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily

from p2pull.net.node import Node, parse_address


class NodeCollector:
    """Turns ``Node.status()`` into metric families on every scrape."""

    def __init__(self, node: Node):
        self.node = node

    def collect(self):
        status = self.node.status()
        counters = [
            ("p2pull_origin_bytes", "Bytes received from origin registries",
             status["origin_bytes"]),
            ("p2pull_peer_received_bytes", "Chunk bytes received from peers",
             status["bytes_from_peers"]),
            ("p2pull_peer_sent_bytes", "Chunk bytes served to peers", status["bytes_to_peers"]),
            ("p2pull_chunks_verified", "Chunks from peers that passed their xxh3",
             status["chunks_from_peers"]),
            ("p2pull_chunks_rejected", "Chunks from peers that failed their xxh3",
             status["chunks_rejected"]),
            ("p2pull_peer_bans", "Peers banned for sending bad chunks", status["bans"]),
        ]
        for name, help_text, value in counters:
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], value)
            yield family
        peers = GaugeMetricFamily("p2pull_peers", "Peers by state", labels=["state"])
        peers.add_metric(["connected"], status["peers"])
        peers.add_metric(["banned"], len(self.node.banned))
        yield peers
        blobs = GaugeMetricFamily("p2pull_active_blobs", "Blobs being fetched")
        blobs.add_metric([], len(status["sessions"]))
        yield blobs


def serve_metrics(node: Node, address: str):
    """Start serving ``/metrics`` on ``address`` (host:port); returns the server, whose
    ``shutdown()`` stops it."""
    host, port = parse_address(address)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(NodeCollector(node))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server

"""The Kumar–Ross fluid lower bound on the time to get F bytes from one server to N nodes:

    T_min = max(F / u_origin, F / d_min, N·F / (u_origin + Σ u_i))

(R. Kumar and K. W. Ross, "Peer-assisted file distribution: the minimum distribution time",
2006). No schedule beats it; a fluid schedule reaches it exactly when every node starts at
once and stays. Every result of the simulator is reported beside it."""

from __future__ import annotations

from dataclasses import dataclass

from simulations.scenario import Scenario


@dataclass(frozen=True)
class Bound:
    t_min: float
    #: F/u_origin: the origin must send every byte at least once
    origin: float
    #: F/d_min: the slowest download link must carry every byte
    download: float
    #: N·F/(u_origin + Σu_i): every node's bytes must be uploaded by someone
    aggregate: float

    def as_dict(self) -> dict:
        return {"t_min_seconds": self.t_min, "terms_seconds": {
            "origin": self.origin, "download": self.download, "aggregate": self.aggregate}}


def kumar_ross(size: float, nodes: int, origin_up: float, ups: list[float],
               downs: list[float]) -> Bound:
    origin = size / origin_up
    download = size / min(downs)
    aggregate = nodes * size / (origin_up + sum(ups))
    return Bound(max(origin, download, aggregate), origin, download, aggregate)


def bound_of(scenario: Scenario) -> Bound:
    """The bound for the scenario's nodes and artifact, whatever its strategy (origin-only
    cannot reach it: it is the physical limit, not the strategy's)."""
    ups, downs = scenario.node_links()
    return kumar_ross(scenario.size, scenario.node_count, scenario.origin_up, ups, downs)

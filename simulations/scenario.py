"""Scenarios: what a simulation run is about, read from a TOML file (``scenarios/*.toml``).

A scenario is plain data: the nodes and their links, racks, the origin, when nodes arrive and
leave, the artifact, and the swarm strategy. Both engines read the same ``Scenario``; what an
engine does not model (the fluid engine has no racks and no round trips) it ignores, and
says so in its docstring.

Units in the files: sizes ``512MiB`` (2^20) or ``3GB`` (10^9); rates ``100Mbit`` (bits per
second, 10^6), ``300MB/s`` (bytes per second, 10^6) or ``1GiB/s``; times ``2ms``, ``0.5s``.
Inside the code every size is bytes, every rate bytes per second and every time seconds.

``--set a.b=value`` overrides a key before the file is interpreted; the value is read as a
TOML value when it parses as one (``4``, ``0.5``, ``true``), as a string otherwise.
"""

from __future__ import annotations

import contextlib
import math
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from p2pull.core.chunks import chunk_size_for
from p2pull.core.swarm import SwarmConfig

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

#: what each strategy changes in the swarm (``SwarmConfig``) and in the graph of peers
STRATEGIES = ("origin-only", "peers-no-dedup", "p2pull")
ARRIVAL_MODES = ("all", "staggered", "churn")
WHEN_BUSY = ("answer", "queue")
MEMBERSHIPS = ("all", "fetchers", "neighbours")

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BIT_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "min": 60.0}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z/]*)\s*$")


def _split(text: str | int | float, what: str) -> tuple[float, str]:
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text), ""
    match = _NUMBER.match(str(text))
    if not match:
        raise ValueError(f"not a {what}: {text!r}")
    return float(match.group(1)), match.group(2).lower()


def parse_size(text: str | int) -> int:
    """``512MiB`` -> 536870912; a bare number is bytes."""
    value, unit = _split(text, "size")
    if unit not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit in {text!r}")
    return int(round(value * _SIZE_UNITS[unit]))


def parse_rate(text: str | int | float) -> float:
    """Bytes per second from ``100Mbit`` (bits/s), ``300MB/s``, ``1GiB/s`` or a bare number
    (bytes/s)."""
    value, unit = _split(text, "rate")
    if unit in _BIT_UNITS:
        return value * _BIT_UNITS[unit] / 8
    if unit.endswith("/s") and unit[:-2] in _SIZE_UNITS:
        return value * _SIZE_UNITS[unit[:-2]]
    if unit == "":
        return value
    raise ValueError(f"unknown rate unit in {text!r} (use bit, Mbit, Gbit, MB/s, MiB/s)")


def parse_time(text: str | int | float) -> float:
    value, unit = _split(text, "time")
    if unit not in _TIME_UNITS:
        raise ValueError(f"unknown time unit in {text!r}")
    return value * _TIME_UNITS[unit]


@dataclass(frozen=True)
class NodeGroup:
    """``count`` nodes with the same links."""

    count: int
    #: upload and download link of each node, bytes/s
    up: float
    down: float


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    groups: tuple[NodeGroup, ...]
    #: round trip between two peers, paid by every request (request out, last byte back)
    rtt: float
    #: peers each node links to (a random symmetric graph); 0 or >= nodes-1: full mesh
    neighbours: int
    #: chunks a node sends at once (``UploadSlots``; the daemon's ``upload_slots``)
    upload_slots: int
    #: a request finding no free upload slot: ``answer`` busy (the daemon today; the
    #: requester backs the peer off), or ``queue`` it until a slot frees (slots then go
    #: round robin, one chunk at a time, among the connections waiting)
    when_busy: str
    #: ``all``: every node's swarm knows every other node (joins, liveness and progress:
    #: what the daemon's full mesh gives, so origin duty is shared over the whole cluster)
    #: while Haves, requests and chunks go between neighbours only; ``fetchers``: a node
    #: knows its neighbours and each blob's origin fetchers (with FETCHER_SPARES more), the
    #: part of "all" that decides who fetches from the origin, at N x (neighbours + 32)
    #: joins instead of N²; ``neighbours``: a node knows its neighbours only (a partial view:
    #: rendezvous hashing over different member sets, so chunks are fetched from the origin
    #: more than once)
    membership: str
    #: racks the nodes are dealt into (round robin); 1: no rack model
    racks: int
    #: a rack's uplink carries (sum of its nodes' link rates) / this, each direction;
    #: 1 or less: the uplink is no constraint
    oversubscription: float
    #: share of each node's neighbours taken in its own rack (None: racks are ignored when
    #: neighbours are drawn): what a discovery that connects by rack would give
    same_rack_neighbours: float | None
    #: every node knows its rack and tells it (the daemon's ``rack`` setting): its swarms
    #: ask the peers of their rack for the chunks those hold, and other racks only for the
    #: chunks they import (``BlobSwarm``); every rack mate is then a neighbour
    rack_labels: bool
    origin_up: float
    origin_rtt: float
    #: the daemon's origin_max_connections: a node streams origin chunks over its part of
    #: the origin work left of these, at least one, one chunk after another on each
    origin_connections: int
    arrivals: str
    #: staggered: seconds between two nodes' starts; churn: mean of the exponential gaps
    arrival_interval: float
    #: churn: a finished node keeps serving this long, then leaves (inf: stays)
    linger: float
    #: churn: share of nodes that leave before finishing, at a uniform time in
    #: [start, start + abort_within]
    abort_fraction: float
    abort_within: float
    #: blob sizes in bytes (one per layer)
    layers: tuple[int, ...]
    #: bytes; None: the protocol's function of each blob's size (``chunk_size_for``)
    chunk_size: int | None
    strategy: str
    #: fields of ``SwarmConfig`` set by the scenario (on top of what the strategy sets)
    swarm_overrides: dict = field(default_factory=dict)
    #: how often every node's swarm is ticked (the daemon's TICK_INTERVAL)
    tick: float = 0.2
    #: how long a new blob session waits for its peers' bitmaps before its first Tick, at
    #: most (the daemon's BITMAP_WAIT); it ticks earlier once every linked peer answered
    bitmap_wait: float = 1.0
    #: seconds between two exact max-min recomputations of all flow rates (None: the time
    #: one chunk takes at the median node's upload rate); in between, new flows take what
    #: their links have left
    rate_interval: float | None = None
    #: width of one sample of the time series (None: about 1/200 of the run)
    sample_interval: float | None = None
    #: stop after this much virtual time (None: 20 x the bound + 60 s)
    time_limit: float | None = None
    seed: int = 1

    # -- derived values ---------------------------------------------------------------------

    @property
    def node_count(self) -> int:
        return sum(group.count for group in self.groups)

    @property
    def size(self) -> int:
        """F: the bytes every node needs."""
        return sum(self.layers)

    def node_links(self) -> tuple[list[float], list[float]]:
        """(upload, download) of every node, in node order."""
        ups, downs = [], []
        for group in self.groups:
            ups += [group.up] * group.count
            downs += [group.down] * group.count
        return ups, downs

    def chunk_size_of(self, blob_size: int) -> int:
        return self.chunk_size or chunk_size_for(blob_size)

    def swarm_config(self) -> SwarmConfig:
        # the daemon's fetch.MAX_ORIGIN_CHUNKS: the swarm queues every chunk it decides to
        # take from the origin, the origin pool's connections are what limit the transfers
        settings = {"max_origin_in_flight": 1 << 20}
        if self.strategy == "peers-no-dedup":
            settings["origin_wait_limit"] = 0.0
        settings.update(self.swarm_overrides)
        return SwarmConfig(**settings)

    @property
    def uses_peers(self) -> bool:
        return self.strategy != "origin-only"

    @property
    def rack_links(self) -> bool:
        return self.racks > 1 and self.oversubscription > 1.0


_SWARM_FIELDS = {f.name: f for f in fields(SwarmConfig)}
_SWARM_TIMES = {"request_timeout_min", "origin_wait_limit", "peer_backoff"}
_SWARM_RATES = {"assumed_throughput"}


def _table(data: dict, key: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"[{key}] must be a table")
    return value


def _unknown(table: dict, known: set[str], where: str) -> None:
    extra = set(table) - known
    if extra:
        raise ValueError(f"unknown keys in [{where}]: {', '.join(sorted(extra))}")


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, not {value!r}")
    return value


def from_dict(data: dict[str, Any], name: str = "scenario") -> Scenario:
    """Build a Scenario from the parsed TOML (simulations/README.md, "Scenarios", lists every
    key). Raises ValueError on unknown keys or bad values."""
    _unknown(data, {"name", "description", "seed", "nodes", "racks", "origin", "arrivals",
                    "artifact", "swarm", "sim"}, "top level")
    nodes = _table(data, "nodes")
    _unknown(nodes, {"count", "up", "down", "rate", "rtt", "neighbours", "upload_slots",
                     "when_busy", "membership", "groups"}, "nodes")
    default_rate = nodes.get("rate", "1Gbit")
    if "groups" in nodes:
        groups = tuple(
            NodeGroup(_whole(g.get("count"), "nodes.groups.count"),
                      parse_rate(g.get("up", g.get("rate", default_rate))),
                      parse_rate(g.get("down", g.get("rate", default_rate))))
            for g in nodes["groups"])
    else:
        groups = (NodeGroup(_whole(nodes.get("count", 8), "nodes.count"),
                            parse_rate(nodes.get("up", default_rate)),
                            parse_rate(nodes.get("down", default_rate))),)
    if sum(g.count for g in groups) < 1 or any(g.count < 0 or g.up <= 0 or g.down <= 0
                                               for g in groups):
        raise ValueError("nodes need a positive count and positive link rates")
    racks = _table(data, "racks")
    _unknown(racks, {"count", "oversubscription", "same_rack_neighbours", "labels"}, "racks")
    origin = _table(data, "origin")
    _unknown(origin, {"up", "rtt", "connections"}, "origin")
    arrivals = _table(data, "arrivals")
    _unknown(arrivals, {"mode", "interval", "linger", "abort_fraction", "abort_within"},
             "arrivals")
    artifact = _table(data, "artifact")
    _unknown(artifact, {"size", "layers"}, "artifact")
    swarm = dict(_table(data, "swarm"))
    sim = _table(data, "sim")
    _unknown(sim, {"tick", "bitmap_wait", "rate_interval", "sample_interval", "time_limit"},
             "sim")

    if "layers" in artifact:
        layers = tuple(parse_size(size) for size in artifact["layers"])
    else:
        layers = (parse_size(artifact.get("size", "512MiB")),)
    if not layers or min(layers) <= 0:
        raise ValueError("every layer needs a positive size")

    strategy = swarm.pop("strategy", "p2pull")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    chunk = swarm.pop("chunk_size", "auto")
    chunk_size = None if chunk == "auto" else parse_size(chunk)
    overrides = {}
    for key, value in swarm.items():
        if key not in _SWARM_FIELDS:
            raise ValueError(f"unknown key in [swarm]: {key}")
        if key in _SWARM_TIMES:
            value = parse_time(value)
        elif key in _SWARM_RATES:
            value = parse_rate(value)
        overrides[key] = value
    mode = arrivals.get("mode", "all")
    if mode not in ARRIVAL_MODES:
        raise ValueError(f"arrivals.mode {mode!r}: one of {', '.join(ARRIVAL_MODES)}")

    def optional_time(table: dict, key: str) -> float | None:
        value = table.get(key, "auto")
        return None if value == "auto" else parse_time(value)

    linger = arrivals.get("linger", "inf")
    scenario = Scenario(
        name=str(data.get("name", name)),
        description=str(data.get("description", "")),
        groups=groups,
        rtt=parse_time(nodes.get("rtt", "0.5ms")),
        neighbours=_whole(nodes.get("neighbours", 40), "nodes.neighbours"),
        upload_slots=_whole(nodes.get("upload_slots", 16), "nodes.upload_slots"),
        when_busy=str(nodes.get("when_busy", "queue")),
        membership=str(nodes.get("membership", "all")),
        racks=_whole(racks.get("count", 1), "racks.count"),
        oversubscription=_number(racks.get("oversubscription", 1.0), "racks.oversubscription"),
        same_rack_neighbours=_number(racks.get("same_rack_neighbours"),
                                     "racks.same_rack_neighbours"),
        rack_labels=_flag(racks.get("labels", False), "racks.labels"),
        origin_up=parse_rate(origin.get("up", default_rate)),
        origin_rtt=parse_time(origin.get("rtt", nodes.get("rtt", "0.5ms"))),
        origin_connections=_whole(origin.get("connections", 16), "origin.connections"),
        arrivals=mode,
        arrival_interval=parse_time(arrivals.get("interval", 0)),
        linger=math.inf if linger in ("inf", math.inf) else parse_time(linger),
        abort_fraction=_number(arrivals.get("abort_fraction", 0.0), "arrivals.abort_fraction"),
        abort_within=parse_time(arrivals.get("abort_within", 10)),
        layers=layers,
        chunk_size=chunk_size,
        strategy=strategy,
        swarm_overrides=overrides,
        tick=parse_time(sim.get("tick", 0.2)),
        bitmap_wait=parse_time(sim.get("bitmap_wait", 1.0)),
        rate_interval=optional_time(sim, "rate_interval"),
        sample_interval=optional_time(sim, "sample_interval"),
        time_limit=optional_time(sim, "time_limit"),
        seed=_whole(data.get("seed", 1), "seed"),
    )
    _check(scenario)
    return scenario


def _whole(value: Any, where: str) -> int:
    """``value`` as an int (a whole float or a numeral too); ``where`` names its key."""
    if not (isinstance(value, float) and not value.is_integer()):
        with contextlib.suppress(TypeError, ValueError):
            return int(value)
    raise ValueError(f"{where} {value!r}: give a whole number")


def _number(value: Any, where: str) -> float | None:
    """``value`` as a float; None stays None (not set)."""
    if value is None:
        return None
    with contextlib.suppress(TypeError, ValueError):
        return float(value)
    raise ValueError(f"{where} {value!r}: give a number")


def _check(scenario: Scenario) -> None:
    if scenario.membership not in MEMBERSHIPS:
        raise ValueError(f"nodes.membership {scenario.membership!r}: one of "
                         f"{', '.join(MEMBERSHIPS)}")
    if scenario.membership == "fetchers" and not scenario.swarm_config().origin_fetchers:
        raise ValueError("nodes.membership fetchers needs swarm.origin_fetchers above 0 "
                         "(with 0 every node fetches: use all)")
    if scenario.when_busy not in WHEN_BUSY:
        raise ValueError(f"nodes.when_busy {scenario.when_busy!r}: one of "
                         f"{', '.join(WHEN_BUSY)}")
    if scenario.upload_slots < 1 or scenario.origin_connections < 1:
        raise ValueError("upload_slots and origin.connections must be at least 1")
    if scenario.racks < 1 or scenario.racks > scenario.node_count:
        raise ValueError("racks.count must be between 1 and the number of nodes")
    if not 0 <= scenario.abort_fraction <= 1:
        raise ValueError("arrivals.abort_fraction must be within [0, 1]")
    if scenario.origin_up <= 0 or min(scenario.rtt, scenario.origin_rtt, scenario.tick) < 0:
        raise ValueError("origin.up must be positive, times not negative")
    if scenario.tick <= 0:
        raise ValueError("sim.tick must be positive")
    scenario.swarm_config()  # SwarmConfig checks its own fields


def _value(text: str) -> Any:
    """A ``--set`` value: TOML when it parses as one, else the string itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


#: short names accepted by ``--set`` and ``sweep --param``
ALIASES = {
    "chunk_size": "swarm.chunk_size", "strategy": "swarm.strategy", "nodes": "nodes.count",
    "count": "nodes.count", "rate": "nodes.rate", "origin_up": "origin.up",
    "oversubscription": "racks.oversubscription", "racks": "racks.count",
    "neighbours": "nodes.neighbours", "membership": "nodes.membership",
    "when_busy": "nodes.when_busy",
    "size": "artifact.size", "rtt": "nodes.rtt", "seed": "seed",
}


def apply_overrides(data: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """A copy of ``data`` with ``key=value`` strings (or a key -> value dict) applied."""
    data = _deep_copy(data)
    items = overrides.items() if isinstance(overrides, dict) else \
        (_split_override(text) for text in overrides)
    for key, value in items:
        key = ALIASES.get(key, key)
        *path, last = key.split(".")
        table = data
        for part in path:
            table = table.setdefault(part, {})
        table[last] = value
        if key in ("nodes.rate", "nodes.up", "nodes.down") and "groups" in data.get("nodes", {}):
            raise ValueError(f"{key} cannot override a scenario with node groups")
    return data


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set wants key=value, got {text!r}")
    return key.strip(), _value(value.strip())


def _deep_copy(data):
    if isinstance(data, dict):
        return {key: _deep_copy(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_deep_copy(value) for value in data]
    return data


def find(name: str | Path) -> Path:
    """A scenario file by path, or by name in ``scenarios/`` (``lab`` -> scenarios/lab.toml)."""
    path = Path(name)
    if path.exists():
        return path
    candidate = SCENARIO_DIR / f"{name}.toml"
    if candidate.exists():
        return candidate
    raise FileNotFoundError(f"no scenario {name!r} (looked for {path} and {candidate})")


def read(name: str | Path) -> dict:
    path = find(name)
    with open(path, "rb") as file:
        data = tomllib.load(file)
    data.setdefault("name", path.stem)
    return data


def load(name: str | Path, overrides: list[str] | dict | None = None) -> Scenario:
    data = read(name)
    if overrides:
        data = apply_overrides(data, overrides)
    return from_dict(data, Path(name).stem)


def with_changes(scenario: Scenario, **changes) -> Scenario:
    scenario = replace(scenario, **changes)
    _check(scenario)
    return scenario

"""Configuration: one frozen value, read from a TOML file and then P2PULL_* variables.

The contract is the table in DESIGN.md: every key of ``configs/p2pull.toml`` and the
environment variable that overrides it. Reading the config is the only place that looks at
the environment, so the rest of the code takes a ``Config`` and is easy to test.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from p2pull.errors import UsageError
from p2pull.wire.messages import RACK_LABEL


@dataclass(frozen=True)
class RegistryConfig:
    """Settings for one registry host, from a ``[registries."host"]`` table."""

    #: user name for HTTP basic auth or for the token endpoint
    username: str | None = None
    #: password or token paired with ``username``
    password: str | None = None
    #: hosts tried, in order, before this one; each serves the same repositories
    mirrors: tuple[str, ...] = ()
    #: reach this registry over plain HTTP (loopback registries always are)
    insecure: bool = False


@dataclass(frozen=True)
class Config:
    #: the store: blobs, partial downloads, manifests, refs
    data_dir: Path = field(default_factory=lambda: default_data_dir())
    #: the daemon's local API (Unix socket)
    socket: Path = field(default_factory=lambda: default_data_dir() / "p2pull.sock")
    #: host:port of the peer protocol
    listen: str = "0.0.0.0:7420"
    #: cluster name; peers of another cluster are ignored
    cluster: str = "default"
    #: file holding the cluster secret for the peer handshake
    secret_file: Path | None = None
    #: static peers as host:port
    peers: tuple[str, ...] = ()
    #: discovery methods: mdns, static, dns:NAME
    discovery: tuple[str, ...] = ("mdns", "static")
    #: chunk size in bytes, or None for the protocol's function of the blob size
    chunk_size: int | None = None
    #: host:port of the registry mirror endpoint, or None for off
    mirror_listen: str | None = None
    #: host:port of the Prometheus endpoint, or None for off
    metrics_listen: str | None = None
    #: registry hosts reached over plain HTTP
    insecure_registries: tuple[str, ...] = ()
    #: registry used when a ref names none (Docker's rule)
    default_registry: str = "docker.io"
    #: upper bound on parallel ranged requests to the origin for one blob
    origin_max_connections: int = 16
    #: attempts per request before the origin is declared unavailable
    origin_attempts: int = 8
    #: seconds without progress on one origin request before it is retried
    origin_timeout: float = 30.0
    #: peers served at once; a request beyond them waits until a slot frees (a freed slot
    #: goes to the waiting peer receiving from the fewest peers, and a waiting peer is
    #: told so: a Line notice) ... 16, not 8:
    #: a sender's flows are held back by receivers that are full themselves, and with 8
    #: ~11 % of the uploads went unused in the simulated 1,000-node study, ~5 % with 16
    upload_slots: int = 16
    #: ... or, with "answer", is answered busy, and the peer asks another holder after a
    #: back-off. Answered, the peers that hold slots keep them (they ask again at once) and
    #: the others starve: in the simulated Kraken benchmark (260 hosts) the slowest host
    #: took 21.7 s answered and 14.3 s queued, the median 11.1 and 12.6 s
    upload_when_busy: str = "queue"
    #: upload rate limit in bytes per second, or None for none
    upload_rate: int | None = None
    #: bytes that may be sent at once above the upload rate; None: one second's worth. A
    #: fixed 64 MiB (the old default) let a node send at line rate for 5-6 s at a time
    #: under a rate of ~12 MB/s, so a cap below a link's rate hardly ever acted
    upload_burst: int | None = None
    #: download rate limit (peers and origin together) in bytes per second, or None for
    #: none; bursts of one second's worth
    download_rate: int | None = None
    #: seconds a peer may stay silent (no data, no ping) before it is dropped
    peer_timeout: float = 30.0
    #: TCP congestion control of peer links (e.g. "cubic", "reno"), or None for the
    #: system's default
    peer_tcp_congestion: str | None = None
    #: this node's rack (or zone) label, or None: a node asks the peers of other racks only
    #: for chunks no peer of its rack holds, and of those only its share, so that each
    #: chunk crosses a rack's uplink about once (peers tell their labels in the handshake)
    rack: str | None = None
    #: per-registry credentials and mirrors
    registries: Mapping[str, RegistryConfig] = field(default_factory=dict)

    def registry(self, host: str) -> RegistryConfig:
        return self.registries.get(host, RegistryConfig())

    def is_insecure(self, host: str) -> bool:
        """Plain HTTP for listed hosts and, as Docker does, for loopback registries."""
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name == "localhost" or _is_loopback_address(name.removeprefix("[").removesuffix("]")):
            return True
        return host in self.insecure_registries or self.registry(host).insecure


def _is_loopback_address(name: str) -> bool:
    """127.0.0.0/8 and ::1 as IP addresses; a host name such as ``127.example.com`` is not."""
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "p2pull"


#: what a daemon does with a request when every upload slot is taken
WHEN_BUSY = ("answer", "queue")

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
               "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
               "tib": 2**40}


def parse_size(text: str | int) -> int:
    """``"16MiB"`` -> 16777216. Decimal units are powers of ten, binary ones of two."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise UsageError(f"not a size: {text!r}; write a number with a unit such as 16MiB or 2GB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _split_list(value: str | list | tuple) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(str(part) for part in value)


def _when_busy(value: str) -> str:
    if value not in WHEN_BUSY:
        raise UsageError(f"it must be one of {', '.join(WHEN_BUSY)}")
    return value


def _rack(value: str) -> str | None:
    if not RACK_LABEL.fullmatch(str(value)):
        raise UsageError("a rack label is up to 63 letters, digits, '.', '_' or '-'")
    return str(value) or None


def _chunk_size(value: str | int) -> int | None:
    if value in ("auto", "", None):
        return None
    size = parse_size(value)
    if size < 64 * 1024:
        raise UsageError("it is below the 64KiB minimum")
    return size


# key -> (environment variable, converter from TOML or env text)
_KEYS = {
    "data_dir": ("P2PULL_DATA_DIR", Path),
    "socket": ("P2PULL_SOCKET", Path),
    "listen": ("P2PULL_LISTEN", str),
    "cluster": ("P2PULL_CLUSTER", str),
    "secret_file": ("P2PULL_SECRET_FILE", Path),
    "peers": ("P2PULL_PEERS", _split_list),
    "discovery": ("P2PULL_DISCOVERY", _split_list),
    "chunk_size": ("P2PULL_CHUNK_SIZE", _chunk_size),
    "mirror_listen": ("P2PULL_MIRROR_LISTEN", str),
    "metrics_listen": ("P2PULL_METRICS_LISTEN", str),
    "insecure_registries": ("P2PULL_INSECURE_REGISTRIES", _split_list),
    "default_registry": ("P2PULL_DEFAULT_REGISTRY", str),
    "origin_max_connections": ("P2PULL_ORIGIN_MAX_CONNECTIONS", int),
    "origin_attempts": ("P2PULL_ORIGIN_ATTEMPTS", int),
    "origin_timeout": ("P2PULL_ORIGIN_TIMEOUT", float),
    "upload_slots": ("P2PULL_UPLOAD_SLOTS", int),
    "upload_when_busy": ("P2PULL_UPLOAD_WHEN_BUSY", _when_busy),
    "upload_rate": ("P2PULL_UPLOAD_RATE", lambda value: parse_size(value) or None),
    "upload_burst": ("P2PULL_UPLOAD_BURST", lambda value: parse_size(value) or None),
    "download_rate": ("P2PULL_DOWNLOAD_RATE", lambda value: parse_size(value) or None),
    "peer_timeout": ("P2PULL_PEER_TIMEOUT", float),
    "peer_tcp_congestion": ("P2PULL_PEER_TCP_CONGESTION", lambda value: str(value) or None),
    "rack": ("P2PULL_RACK", _rack),
}


def load_config(path: Path | str | None = None, env: Mapping[str, str] | None = None,
                **overrides) -> Config:
    """Read ``path`` (or ``$P2PULL_CONFIG``; no file is fine), then the P2PULL_* variables,
    then keyword ``overrides``. Unknown keys and bad values raise UsageError."""
    env = os.environ if env is None else env
    path = path or env.get("P2PULL_CONFIG")
    raw: dict = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UsageError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config file {path} is not valid TOML: {exc}") from exc
    values: dict = {}
    for key, value in raw.items():
        if key == "registries":
            values["registries"] = _registries(value)
        elif key in _KEYS:
            values[key] = _convert(key, value)
        else:
            raise UsageError(f"unknown key {key!r} in {path}; see configs/p2pull.toml")
    for key, (var, _) in _KEYS.items():
        if env.get(var, "").strip():  # an empty variable is unset, not "the current dir"
            values[key] = _convert(key, env[var])
    values.update(overrides)
    if "data_dir" in values and "socket" not in values:
        values["socket"] = Path(values["data_dir"]) / "p2pull.sock"
    return Config(**values)


def _convert(key: str, value):
    convert = _KEYS[key][1]
    try:
        return convert(value)
    except (UsageError, TypeError, ValueError) as exc:
        raise UsageError(f"bad value {value!r} for {key}: {exc}") from exc


def _registries(table: Mapping) -> dict[str, RegistryConfig]:
    known = {f.name for f in dataclasses.fields(RegistryConfig)}
    registries = {}
    for host, settings in table.items():
        unknown = set(settings) - known
        if unknown:
            raise UsageError(f"unknown keys {sorted(unknown)} in [registries.{host!r}]")
        settings = dict(settings)
        if "mirrors" in settings:
            settings["mirrors"] = _split_list(settings["mirrors"])
        registries[host] = RegistryConfig(**settings)
    return registries

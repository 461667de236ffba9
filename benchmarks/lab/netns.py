"""Network namespaces for the lab: N node namespaces and one origin namespace, each linked
by a veth pair to a Linux bridge that lives in a namespace of its own, shaped by ``tc tbf``.

    with Lab(nodes=4, up=rate("100mbit"), down=rate("100mbit"),
             origin_up=rate("100mbit")) as lab:
        lab.popen(lab.origin.ns, ["docker-registry", "serve", "cfg.yml"])
        lab.tx_bytes(lab.origin)            # the origin's egress counter

Topology (names carry the run's tag, so parallel runs never clash; every interface is
created straight into its namespace, so nothing ever appears in the root namespace)::

    p2l<tag>-o   [p2l<tag>o  10.X.0.1]  --veth--  [p2l<tag>bo]  \
    p2l<tag>-n0  [p2l<tag>n0 10.X.0.10] --veth--  [p2l<tag>b0]   } bridge p2l<tag>br
    ...                                                          /  in namespace p2l<tag>-br

Shaping (LAB-NOTES: tbf shapes egress only; there is no netem, so no delay or loss):
- a node's upload: tbf on its own end of the veth (egress of the node);
- a node's download: tbf on the bridge-side end (egress of the bridge towards the node);
- the origin's upload: tbf on its own end; its download: on the bridge-side end, if given.

With ``racks`` > 1 the nodes are dealt round robin into racks, each a bridge of its own
(``p2l<tag>r<k>``) joined to the main bridge, where the origin stays, by a veth pair
(``p2l<tag>u<k>`` on the rack's side, ``p2l<tag>c<k>`` on the main bridge's): the rack's
uplink, shaped at ``uplink`` on both ends (out of the rack, into it). It is all one
Ethernet segment, so mDNS reaches every node.

A rate of None leaves that direction unshaped. ``Lab.__exit__`` (also on an exception or
Ctrl-C) stops every process started through ``popen`` (SIGTERM, then SIGKILL, by PID),
then any process still inside one of the lab's namespaces (``ip netns pids``; they can only
be ours), then deletes the namespaces, which deletes their interfaces and the bridge.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

#: tc's tbf: the bucket holds at least this many bytes (LAB-NOTES: 256kb at 100mbit)
MIN_BURST_BYTES = 256 * 1024
#: packets wait at most this long in a tbf queue before they are dropped
TBF_LATENCY = "50ms"
#: a process that ignores SIGTERM this long is killed
STOP_GRACE_SECONDS = 10.0
#: one ``ip``/``tc`` command taking longer than this is a hang
COMMAND_TIMEOUT = 30.0
#: names of namespaces made by the lab start with this, then the run's tag
PREFIX = "p2l"

_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
               "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}


class LabError(RuntimeError):
    """The lab could not be built or used (a command failed, a name is taken, ...)."""


def parse_rate(text: str | int | None) -> int | None:
    """tc's rate syntax -> bits per second; ``none``/``0``/empty -> None (unshaped).

    ``100mbit`` is 10**8 bit/s; ``mbps`` is megabytes per second, as in tc."""
    if text is None or isinstance(text, int):
        return text or None
    value = text.strip().lower()
    if value in ("", "0", "none", "off"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    if not match or match.group(2) not in _RATE_UNITS:
        raise ValueError(f"not a rate: {text!r}; write e.g. 100mbit, 1gbit or 12mbps")
    return int(float(match.group(1)) * _RATE_UNITS[match.group(2)])


def format_rate(bits: int | None) -> str:
    if bits is None:
        return "unshaped"
    for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits >= scale and bits % scale == 0:
            return f"{bits // scale}{unit}"
    return f"{bits}bit"


def run_tag(pid: int | None = None) -> str:
    """A short tag from the process id (base 36), unique among running processes."""
    pid = os.getpid() if pid is None else pid
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    tag = ""
    while True:
        pid, rest = divmod(pid, 36)
        tag = digits[rest] + tag
        if not pid:
            return tag


def tag_pid(tag: str) -> int:
    return int(tag, 36)


@dataclass
class Host:
    """One namespace on the bridge: a node or the origin."""

    name: str  # "n0", "n1", ..., "origin"
    ns: str  # the namespace's name
    ifname: str  # its end of the veth, inside ``ns``
    peer_ifname: str  # the bridge-side end, inside the bridge namespace
    address: str  # IPv4, on the lab's /24
    up: int | None  # egress rate, bit/s (None: unshaped)
    down: int | None  # ingress rate, bit/s (None: unshaped)


@dataclass
class Lab:
    """A bridge, ``nodes`` node namespaces and an origin namespace; see the module doc.

    ``up``/``down`` are one rate for every node or a list with one per node (bit/s, None
    for unshaped). ``subnet_octet`` X picks 10.X.0.0/24 (default: chosen per run so that it
    does not overlap a network of the root namespace)."""

    nodes: int
    up: int | None | list[int | None] = None
    down: int | None | list[int | None] = None
    origin_up: int | None = None
    origin_down: int | None = None
    tag: str = field(default_factory=run_tag)
    subnet_octet: int | None = None
    mtu: int = 1500
    #: racks the nodes are dealt into (1: every node on the main bridge), and the rate of
    #: each rack's uplink, each way (bit/s; None: unshaped)
    racks: int = 1
    uplink: int | None = None
    hosts: list[Host] = field(default_factory=list, init=False)
    origin: Host | None = field(default=None, init=False)
    bridge_ns: str = field(default="", init=False)
    bridge: str = field(default="", init=False)
    processes: list[subprocess.Popen] = field(default_factory=list, init=False)
    _made: list[str] = field(default_factory=list, init=False)

    def __post_init__(self):
        if not 1 <= self.nodes <= 200:
            raise ValueError("a lab has 1 to 200 nodes")
        if not 1 <= self.racks <= min(self.nodes, 9):
            raise ValueError("a lab has 1 to 9 racks (one digit in interface names), and no "
                             "more racks than nodes")
        ups = self.up if isinstance(self.up, list) else [self.up] * self.nodes
        downs = self.down if isinstance(self.down, list) else [self.down] * self.nodes
        if len(ups) != self.nodes or len(downs) != self.nodes:
            raise ValueError("one up and one down rate per node")
        prefix = f"{PREFIX}{self.tag}"
        if len(prefix) + 4 > 15:  # "<prefix>b199": interface names have 15 characters
            raise ValueError(f"tag {self.tag!r} is too long for interface names")
        if self.subnet_octet is None:
            self.subnet_octet = pick_subnet_octet(self.tag)
        net = f"10.{self.subnet_octet}.0"
        self.network = ipaddress.IPv4Network(f"{net}.0/24")
        self.bridge_ns = f"{prefix}-br"
        self.bridge = f"{prefix}br"
        self.origin = Host("origin", f"{prefix}-o", f"{prefix}o", f"{prefix}bo", f"{net}.1",
                           self.origin_up, self.origin_down)
        self.hosts = [Host(f"n{i}", f"{prefix}-n{i}", f"{prefix}n{i}", f"{prefix}b{i}",
                           f"{net}.{10 + i}", ups[i], downs[i]) for i in range(self.nodes)]

    # -- building and tearing down ------------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        return [self.bridge_ns, self.origin.ns] + [h.ns for h in self.hosts]

    def __enter__(self) -> "Lab":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        existing = set(list_namespaces())
        taken = [ns for ns in self.namespaces if ns in existing]
        if taken:
            raise LabError(f"namespaces {taken} exist already: another run with tag "
                           f"{self.tag!r}? (`python -m benchmarks.lab.netns --stale` lists "
                           "those of runs that are gone)")
        for ns in self.namespaces:
            ip("netns", "add", ns)
            self._made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            # IPv4 only: no IPv6 neighbour discovery or MLD chatter in the counters
            run_checked(["ip", "netns", "exec", ns, "sh", "-c",
                         "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
                         "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"])
        ip("-n", self.bridge_ns, "link", "add", self.bridge, "type", "bridge")
        ip("-n", self.bridge_ns, "link", "set", self.bridge, "mtu", str(self.mtu))
        if self.racks > 1:
            for rack in range(self.racks):
                bridge, inside, outside = self.rack_links(rack)
                ip("-n", self.bridge_ns, "link", "add", bridge, "type", "bridge")
                ip("-n", self.bridge_ns, "link", "set", bridge, "mtu", str(self.mtu))
                ip("-n", self.bridge_ns, "link", "add", inside, "mtu", str(self.mtu), "type",
                   "veth", "peer", "name", outside)
                ip("-n", self.bridge_ns, "link", "set", inside, "master", bridge)
                ip("-n", self.bridge_ns, "link", "set", outside, "master", self.bridge)
                shape(self.bridge_ns, inside, self.uplink)  # out of the rack
                shape(self.bridge_ns, outside, self.uplink)  # into it
                for name in (inside, outside, bridge):
                    ip("-n", self.bridge_ns, "link", "set", name, "up")
        for host in [self.origin, *self.hosts]:
            ip("link", "add", host.ifname, "netns", host.ns, "mtu", str(self.mtu), "type",
               "veth", "peer", "name", host.peer_ifname, "netns", self.bridge_ns)
            ip("-n", self.bridge_ns, "link", "set", host.peer_ifname, "master",
               self.bridge_of(host))
            ip("-n", host.ns, "addr", "add", f"{host.address}/{self.network.prefixlen}",
               "dev", host.ifname)
            shape(host.ns, host.ifname, host.up)
            shape(self.bridge_ns, host.peer_ifname, host.down)
            ip("-n", self.bridge_ns, "link", "set", host.peer_ifname, "up")
            ip("-n", host.ns, "link", "set", host.ifname, "up")
        ip("-n", self.bridge_ns, "link", "set", self.bridge, "up")

    def rack_of(self, host: Host) -> int | None:
        """The rack of a node (round robin), None for the origin or without racks."""
        if self.racks == 1 or host is self.origin:
            return None
        return self.hosts.index(host) % self.racks

    def rack_links(self, rack: int) -> tuple[str, str, str]:
        """Rack ``rack``'s bridge, and its uplink's ends on the rack's and the main side."""
        prefix = f"{PREFIX}{self.tag}"
        return f"{prefix}r{rack}", f"{prefix}u{rack}", f"{prefix}c{rack}"

    def bridge_of(self, host: Host) -> str:
        rack = self.rack_of(host)
        return self.bridge if rack is None else self.rack_links(rack)[0]

    def close(self) -> None:
        """Stop our processes, then whatever still runs in our namespaces, then delete
        the namespaces. Safe to call twice; never raises for what is already gone."""
        for process in self.processes:
            if process.poll() is None:
                try:
                    process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for ns in self._made:
            kill_namespace_processes(ns)
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True,
                           timeout=COMMAND_TIMEOUT)
        self._made.clear()

    # -- running things inside ------------------------------------------------------------

    @staticmethod
    def command(ns: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``ns`` (``ip netns exec`` execs it: the PID is the
        program's own)."""
        return ["ip", "netns", "exec", ns, *argv]

    def popen(self, ns: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` in ``ns``; it is stopped by ``close`` if still running."""
        process = subprocess.Popen(self.command(ns, argv), **kwargs)
        self.processes.append(process)
        return process

    def run(self, ns: str, argv: list[str], *, timeout: float = COMMAND_TIMEOUT,
            **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(ns, argv), timeout=timeout, **kwargs)

    def stop(self, process: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> int:
        """SIGTERM one process we started, SIGKILL after ``grace``; its exit status."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    # -- counters -------------------------------------------------------------------------

    def counters(self, host: Host) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of the host's own end of its veth."""
        return link_counters(host.ns, host.ifname)

    def tx_bytes(self, host: Host) -> int:
        return self.counters(host)[1]

    def _bridge_side_stats(self) -> dict[str, dict]:
        """Interface name -> its stats64, for every interface of the bridge namespace, read
        in one command."""
        out = run_checked(["ip", "-j", "-s", "-n", self.bridge_ns, "link", "show"])
        return {link["ifname"]: link["stats64"] for link in json.loads(out)}

    def uplink_counters(self) -> list[tuple[int, int]]:
        """Per rack, (bytes out of it, bytes into it) through its uplink so far."""
        by_ifname = self._bridge_side_stats()
        result = []
        for rack in range(self.racks if self.racks > 1 else 0):
            _, inside, outside = self.rack_links(rack)
            result.append((by_ifname[inside]["tx"]["bytes"], by_ifname[outside]["tx"]["bytes"]))
        return result

    def bridge_counters(self) -> dict[str, tuple[int, int]]:
        """host name -> (bytes the host sent, bytes it received), read from the bridge-side
        ends in one command (rx there is what the host sent)."""
        by_ifname = self._bridge_side_stats()
        result = {}
        for host in [self.origin, *self.hosts]:
            stats = by_ifname.get(host.peer_ifname)
            if stats is not None:
                result[host.name] = (stats["rx"]["bytes"], stats["tx"]["bytes"])
        return result


def run_checked(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    if result.returncode != 0:
        raise LabError(f"$ {' '.join(argv)}\n{result.stderr.strip()}")
    return result.stdout


def ip(*args: str) -> str:
    return run_checked(["ip", *args])


def shape(ns: str, ifname: str, rate: int | None) -> None:
    """tbf on the egress of ``ifname`` in ``ns`` at ``rate`` bit/s (None: leave it)."""
    if rate is None:
        return
    burst = max(MIN_BURST_BYTES, rate // 8 // 50)
    run_checked(["tc", "-n", ns, "qdisc", "add", "dev", ifname, "root", "tbf", "rate",
                 f"{rate}bit", "burst", str(burst), "latency", TBF_LATENCY])


def link_counters(ns: str, ifname: str) -> tuple[int, int]:
    out = run_checked(["ip", "-j", "-s", "-n", ns, "link", "show", "dev", ifname])
    stats = json.loads(out)[0]["stats64"]
    return stats["rx"]["bytes"], stats["tx"]["bytes"]


def list_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=COMMAND_TIMEOUT).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def kill_namespace_processes(ns: str) -> None:
    """SIGKILL, by PID, every process still inside ``ns`` (a namespace the lab made)."""
    result = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                            timeout=COMMAND_TIMEOUT)
    for pid in result.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def pick_subnet_octet(tag: str) -> int:
    """X of 10.X.0.0/24 for this run: derived from the tag, moved on while it overlaps a
    network of the root namespace (the lab's namespaces are isolated, but a clash would
    make addresses in logs ambiguous)."""
    used = root_networks()
    start = tag_pid(tag) % 150
    for step in range(150):
        octet = 100 + (start + step) % 150
        candidate = ipaddress.IPv4Network(f"10.{octet}.0.0/24")
        if not any(candidate.overlaps(net) for net in used):
            return octet
    raise LabError("no free 10.X.0.0/24 for the lab")


def root_networks() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True,
                         timeout=COMMAND_TIMEOUT).stdout
    networks = []
    for link in json.loads(out or "[]"):
        for info in link.get("addr_info", []):
            networks.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}",
                                                  strict=False))
    return networks


def stale_namespaces() -> list[str]:
    """Lab namespaces whose run (the PID in their tag) is no longer alive."""
    stale = []
    for ns in list_namespaces():
        match = re.fullmatch(rf"{PREFIX}([0-9a-z]+)-(br|o|n\d+)", ns)
        if match and not Path(f"/proc/{tag_pid(match.group(1))}").exists():
            stale.append(ns)
    return stale


def available() -> str | None:
    """None when a lab can be built here, else why not."""
    if os.geteuid() != 0:
        return "needs root and ip netns: CI runs as root"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"needs root and ip netns: `{tool}` is not installed (iproute2)"
    probe = f"{PREFIX}{run_tag()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"needs root and ip netns: `ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="List or delete the namespaces of lab runs "
                                                 "that are gone (killed with SIGKILL).")
    parser.add_argument("--stale", action="store_true", help="list them")
    parser.add_argument("--delete-stale", action="store_true", help="delete them")
    args = parser.parse_args(argv)
    stale = stale_namespaces()
    for ns in stale:
        print(ns)
        if args.delete_stale:
            kill_namespace_processes(ns)
            subprocess.run(["ip", "netns", "del", ns], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

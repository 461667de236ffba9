"""One libtorrent node of the lab's BitTorrent baseline, run inside a node's (or the
origin's) namespace by ``benchmarks.lab.run``; needs only the PyPI ``libtorrent`` package.

    python lt_node.py --role seed|leech --torrent T --save DIR --listen IP:PORT
                      [--peers IP:PORT,...]

Everything stays inside the lab (LAB-NOTES): DHT, local service discovery, UPnP and NAT-PMP
are off from the session's creation (no bootstrap, no multicast, no gateway probing),
there is no tracker, uTP is off (TCP only), and listening and outgoing connections are
bound to ``--listen``'s address. Peers are added by hand with ``connect_peer``.

Protocol with the harness, one JSON object per line on stdout:
- ``{"event": "listening"}`` once the session listens;
- then it waits for a line ``go`` on stdin, connects to ``--peers`` and starts its clock;
- a leecher prints ``{"event": "done", "seconds": S, "downloaded": B}`` when every piece is
  held and hash-checked, then keeps seeding;
- it exits on ``stop``, on end of stdin, or on SIGTERM.
Progress lines go to stderr every PROGRESS_INTERVAL seconds.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

import libtorrent as lt

#: how often peers that are not connected are dialled again (libtorrent's own retry of a
#: failed connect_peer waits far longer)
REDIAL_INTERVAL = 2.0
PROGRESS_INTERVAL = 5.0
LISTEN_TIMEOUT = 20.0


def settings(host: str, port: int) -> dict:
    return {
        "listen_interfaces": f"{host}:{port}",
        "outgoing_interfaces": host,
        "listen_system_port_fallback": False,
        "enable_dht": False,
        "dht_bootstrap_nodes": "",
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_ip_notifier": False,
        "enable_outgoing_utp": False,
        "enable_incoming_utp": False,
        "enable_outgoing_tcp": True,
        "enable_incoming_tcp": True,
        "user_agent": "p2pull-lab",
        "alert_mask": lt.alert_category.status | lt.alert_category.error,
    }


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=("seed", "leech"), required=True)
    parser.add_argument("--torrent", required=True)
    parser.add_argument("--save", required=True)
    parser.add_argument("--listen", required=True, help="IP:PORT")
    parser.add_argument("--peers", default="", help="IP:PORT,... to connect to")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    peers = [(p.rpartition(":")[0], int(p.rpartition(":")[2]))
             for p in args.peers.split(",") if p.strip()]

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    go = threading.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "go":
                go.set()
            elif line.strip() == "stop":
                break
        stop.set()
        go.set()

    threading.Thread(target=read_stdin, daemon=True).start()

    session = lt.session(settings(host, int(port)))
    deadline = time.monotonic() + LISTEN_TIMEOUT
    listening = False
    while not listening:
        if time.monotonic() > deadline:
            print(f"libtorrent did not listen on {args.listen}", file=sys.stderr)
            return 1
        session.wait_for_alert(200)
        for alert in session.pop_alerts():
            if isinstance(alert, lt.listen_succeeded_alert):
                listening = True
            elif isinstance(alert, lt.listen_failed_alert):
                print(f"listen failed: {alert.message()}", file=sys.stderr)
                return 1

    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(args.torrent)
    params.save_path = args.save
    flags = params.flags & ~lt.torrent_flags.auto_managed & ~lt.torrent_flags.paused
    if args.role == "seed":
        flags |= lt.torrent_flags.seed_mode
    params.flags = flags
    handle = session.add_torrent(params)
    emit(event="listening")

    go.wait()
    if stop.is_set():
        return 0
    started = time.monotonic()
    done = args.role == "seed"
    last_dial = last_progress = 0.0
    while not stop.is_set():
        now = time.monotonic()
        if now - last_dial >= REDIAL_INTERVAL:
            # one node per address: an inbound peer shows its ephemeral port, not its
            # listening one
            connected = {p.ip[0] for p in handle.get_peer_info()}
            for peer in peers:
                if peer[0] not in connected:
                    handle.connect_peer(peer)
            last_dial = now
        status = handle.status()
        if not done and (status.is_finished or status.is_seeding):
            done = True
            emit(event="done", seconds=round(now - started, 3),
                 downloaded=status.total_payload_download)
        if now - last_progress >= PROGRESS_INTERVAL:
            print(f"{now - started:7.1f}s {status.state} {status.progress * 100:5.1f}% "
                  f"down {status.download_payload_rate / 1e6:5.1f} MB/s "
                  f"up {status.upload_payload_rate / 1e6:5.1f} MB/s "
                  f"peers {status.num_peers}", file=sys.stderr, flush=True)
            last_progress = now
        session.pop_alerts()
        stop.wait(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``p2pull daemon``: the long-lived node and its services.

The daemon's nursery owns the node (peer listener, connectors, links, ticker), the local
API on the Unix socket, and the get tasks the API starts. SIGTERM or SIGINT stops it
gracefully: peers get a Goodbye, in-flight pieces are dropped (each committed chunk is in
its partial file's log already, so the next start resumes), connections close.
"""

from __future__ import annotations

import logging
import signal
from functools import partial

import trio

from p2pull import client
from p2pull.config import Config
from p2pull.core.refs import parse_ref
from p2pull.errors import P2pullError, first_error
from p2pull.net.api import ApiError, open_unix_listener, serve_api
from p2pull.progress import Progress
from p2pull.net.metrics import serve_metrics
from p2pull.net.node import Node
from p2pull.origin.client import OriginClient
from p2pull.store.cas import Store

log = logging.getLogger("p2pull.daemon")

#: progress lines of a streamed get are sent this often
PROGRESS_INTERVAL = 0.25


async def run_daemon(config: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    store = Store(config.data_dir)
    async with OriginClient(config) as origin:
        node = Node(config, store, origin)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            api = _Api(node, nursery)
            node.on_preload = api.start_preload
            listener = await open_unix_listener(config.socket)
            await nursery.start(serve_api, listener, api.json_routes(), api.stream_routes())
            metrics = serve_metrics(node, config.metrics_listen) if config.metrics_listen \
                else None
            log.info("node %s of cluster %r: peers on port %d, API on %s", node.node_id,
                     config.cluster, node.listen_port, config.socket)
            task_status.started(node)
            try:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("stopping on %s", signal.Signals(signum).name)
                        await node.stop()
                        nursery.cancel_scope.cancel()
                        break
            finally:
                if metrics is not None:
                    metrics.shutdown()
    try:
        config.socket.unlink()
    except FileNotFoundError:
        pass


class _Api:
    """The local API's handlers, bound to one node."""

    def __init__(self, node: Node, nursery: trio.Nursery):
        self.node = node
        self.nursery = nursery
        self._preloading: set[str] = set()

    def json_routes(self):
        return {("GET", "/status"): self.status, ("GET", "/peers"): self.peers,
                ("GET", "/ls"): self.ls, ("GET", "/cluster"): self.cluster,
                ("POST", "/preload"): self.preload}

    def stream_routes(self):
        return {("POST", "/get"): self.get}

    async def status(self, _payload) -> dict:
        return self.node.status()

    async def peers(self, _payload) -> list:
        return self.node.peers()

    async def ls(self, _payload) -> list:
        return [record.__dict__ for record in self.node.store.refs()]

    async def cluster(self, _payload) -> list:
        return await self.node.cluster_report()

    async def preload(self, payload: dict) -> dict:
        ref = payload.get("ref")
        if not isinstance(ref, str):
            raise ApiError(400, "a preload needs a ref")
        parse_ref(ref, self.node.config.default_registry)  # a bad ref fails here, not later
        return {"peers_asked": self.node.preload_cluster(ref)}

    def start_preload(self, ref: str) -> None:
        """Fetch ``ref`` in the background, once at a time per ref; errors are logged."""
        if ref in self._preloading:
            return
        self._preloading.add(ref)

        async def work() -> None:
            try:
                await client.get_with_node(self.node, ref)
                log.info("preloaded %s", ref)
            except P2pullError as exc:
                log.warning("preload of %s failed: %s", ref, exc)
            finally:
                self._preloading.discard(ref)

        self.nursery.start_soon(work)

    async def get(self, payload: dict):
        """Run a get in the daemon's nursery (it finishes even if the caller goes away)
        and stream its progress, then its result or error."""
        progress = Progress()
        outcome: dict = {}
        done = trio.Event()

        async def work() -> None:
            try:
                result = await client.get_with_node(
                    self.node, payload["ref"], output=payload.get("output"),
                    platform=payload.get("platform"), force=bool(payload.get("force")),
                    format=payload.get("format", "files"), progress=progress)
                outcome["result"] = client.result_summary(result)
            except BaseException as exc:  # reported to the caller, then re-raised if fatal
                error = first_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
                if not isinstance(error, P2pullError):
                    outcome["error"] = {"message": f"internal error: {error!r}",
                                        "exit_code": 1}
                    if not isinstance(error, Exception):
                        raise
                    log.exception("get %s failed", payload.get("ref"))
                else:
                    outcome["error"] = {"message": str(error), "exit_code": error.exit_code,
                                        "type": type(error).__name__}
            finally:
                done.set()

        if not isinstance(payload.get("ref"), str):
            yield {"error": {"message": "a get needs a ref", "exit_code": 2}}
            return
        self.nursery.start_soon(work)
        while not done.is_set():
            with trio.move_on_after(PROGRESS_INTERVAL):
                await done.wait()
            yield {"progress": progress_snapshot(progress)}
        yield outcome


def progress_snapshot(progress: Progress) -> dict:
    return {digest: blob.__dict__ for digest, blob in progress.blobs.items()}


def main(config: Config) -> int:
    trio.run(partial(run_daemon, config))
    return 0

"""The daemon's local API: HTTP/1.1 on a Unix socket (mode 0660), spoken with h11.

Routes (JSON bodies; a streamed answer is newline-delimited JSON, one object per line):

    GET  /status          the node: id, cluster, peers, active blobs, byte counters
    GET  /peers           connected peers
    GET  /ls              refs held in the store
    POST /get             {"ref", "output", "platform", "force", "format"}: a stream of
                          {"progress": {...}} lines, then {"result": {...}} or
                          {"error": {"message", "exit_code"}}

Handlers are plain async functions given by the daemon; this module knows HTTP, not p2pull.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Mapping

import h11
import trio

from p2pull.errors import P2pullError

log = logging.getLogger("p2pull.api")

#: a request body larger than this is refused: the API takes small JSON documents
MAX_BODY_BYTES = 1024 * 1024
#: a client that sends nothing for this long is disconnected
REQUEST_TIMEOUT_SECONDS = 30.0
READ_SIZE = 64 * 1024

JsonHandler = Callable[[dict], Awaitable[dict | list]]
StreamHandler = Callable[[dict], AsyncIterator[dict]]


class ApiError(Exception):
    """Raised by a handler to answer with an HTTP error status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def open_unix_listener(path: Path) -> trio.SocketListener:
    """Listen on ``path``, replacing a stale socket file; owner and group may connect."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    await sock.bind(str(path))
    os.chmod(path, 0o660)
    sock.listen(64)
    return trio.SocketListener(sock)


async def serve_api(listener: trio.SocketListener, json_routes: Mapping[tuple[str, str], JsonHandler],
                    stream_routes: Mapping[tuple[str, str], StreamHandler],
                    *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; one task per connection, each closing its own stream."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await _serve_connection(stream, json_routes, stream_routes)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
            log.debug("API connection ended: %r", exc)
        finally:
            await stream.aclose()

    task_status.started()
    await trio.serve_listeners(handle, [listener])


async def _serve_connection(stream, json_routes, stream_routes) -> None:
    conn = h11.Connection(h11.SERVER)
    while True:
        request, body = await _read_request(stream, conn)
        if request is None:
            return
        key = (request.method.decode(), request.target.decode().split("?", 1)[0])
        try:
            payload = json.loads(body) if body else {}
            if not isinstance(payload, dict):
                raise ApiError(400, "the request body must be a JSON object")
            if key in stream_routes:
                await _send_stream(stream, conn, stream_routes[key](payload))
            elif key in json_routes:
                await _send_json(stream, conn, 200, await json_routes[key](payload))
            else:
                raise ApiError(404, f"no route {key[0]} {key[1]}")
        except ApiError as exc:
            await _send_json(stream, conn, exc.status, {"error": {"message": str(exc)}})
        except P2pullError as exc:
            await _send_json(stream, conn, 400, {"error": {
                "message": str(exc), "exit_code": exc.exit_code, "type": type(exc).__name__}})
        except ValueError as exc:
            await _send_json(stream, conn, 400, {"error": {"message": f"bad JSON: {exc}"}})
        except Exception as exc:  # a bug in a handler must not take the daemon down
            log.exception("API handler for %s %s failed", *key)
            await _send_json(stream, conn, 500, {"error": {"message": f"internal error: {exc!r}"}})
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return
        conn.start_next_cycle()


async def _read_request(stream, conn: h11.Connection):
    request, body = None, bytearray()
    with trio.move_on_after(REQUEST_TIMEOUT_SECONDS):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(READ_SIZE))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    raise h11.RemoteProtocolError("request body too large")
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            else:  # ConnectionClosed
                return None, b""
    return None, b""


def _headers(extra: list | None = None) -> list:
    return [("Content-Type", "application/json"), *(extra or [])]


async def _send_json(stream, conn: h11.Connection, status: int, document) -> None:
    data = json.dumps(document).encode()
    response = h11.Response(status_code=status,
                            headers=_headers([("Content-Length", str(len(data)))]))
    await stream.send_all(conn.send(response) + conn.send(h11.Data(data=data))
                          + conn.send(h11.EndOfMessage()))


async def _send_stream(stream, conn: h11.Connection, lines: AsyncIterator[dict]) -> None:
    response = h11.Response(status_code=200,
                            headers=_headers([("Transfer-Encoding", "chunked")]))
    await stream.send_all(conn.send(response))
    async for line in lines:
        await stream.send_all(conn.send(h11.Data(data=json.dumps(line).encode() + b"\n")))
    await stream.send_all(conn.send(h11.EndOfMessage()))

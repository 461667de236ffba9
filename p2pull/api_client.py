"""A client of the local daemon's API (``p2pull.net.api``: HTTP/1.1 on a Unix socket) with
the standard library only, and synchronous.

Every node of a cluster runs ``p2pull get`` at once when a deployment starts, on machines
busy with it. A CLI that imported trio and httpx to ask its daemon spent 0.3-0.6 s of CPU
before the first byte moved, and on 2 cores eight of them started up to 3 s apart. Through
this module a CLI talking to its daemon starts in the time Python itself takes. Async
callers run these functions in a worker thread.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Callable, Iterator

from p2pull import errors
from p2pull.errors import P2pullError, UsageError

#: what ``get`` can write to its output: a tree of the artifact's files, or an OCI layout
GET_FORMATS = ("files", "oci-layout")
#: seconds to wait for an answer to a plain request, and to learn whether a daemon runs
REQUEST_TIMEOUT = 5.0
PROBE_TIMEOUT = 2.0


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: Path, timeout: float | None):
        super().__init__("p2pull", timeout=timeout)
        self._socket_path = str(socket_path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _no_daemon(socket_path: Path) -> UsageError:
    return UsageError(f"no p2pull daemon answers on {socket_path}: start one with "
                      "`p2pull daemon`")


def _open(socket_path: Path, path: str, body: dict | None,
          timeout: float | None) -> tuple[_UnixConnection, http.client.HTTPResponse]:
    connection = _UnixConnection(socket_path, timeout)
    try:
        if body is None:
            connection.request("GET", path)
        else:
            connection.request("POST", path, body=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
        return connection, connection.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        connection.close()
        raise _no_daemon(socket_path) from exc


def running(socket_path: Path, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a daemon answers on ``socket_path``."""
    if not Path(socket_path).exists():
        return False
    try:
        connection, response = _open(socket_path, "/status", None, timeout)
    except UsageError:
        return False
    connection.close()
    return response.status == 200


def request(socket_path: Path, path: str, body: dict | None = None,
            timeout: float | None = REQUEST_TIMEOUT):
    """GET ``path`` (POST ``body`` if given) and return the JSON answer. UsageError when no
    daemon answers; the daemon's error as its own class."""
    connection, response = _open(socket_path, path, body, timeout)
    try:
        answer = json.loads(response.read())
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise P2pullError(f"the daemon's answer to {path} broke off: {exc}; see its "
                          "log") from exc
    finally:
        connection.close()
    if response.status != 200:
        raise error_from_daemon(answer.get("error", {}) if isinstance(answer, dict) else {})
    return answer


def stream(socket_path: Path, path: str, body: dict) -> Iterator[dict]:
    """POST ``body`` to a streamed route and yield its lines as they come. No timeout: a
    get takes as long as its bytes do, and the daemon sends progress while it works."""
    connection, response = _open(socket_path, path, body, None)
    try:
        if response.status != 200:
            answer = json.loads(response.read() or b"{}")
            raise error_from_daemon(answer.get("error", {}))
        while True:
            try:
                line = response.readline()
            except (OSError, http.client.HTTPException) as exc:
                raise P2pullError(f"the daemon's stream of {path} broke off: {exc}; see its "
                                  "log") from exc
            if not line:
                return
            if line.strip():
                yield json.loads(line)
    finally:
        connection.close()


def get(socket_path: Path, ref: str, *, output: Path | str | None = None,
        platform: str | None = None, force: bool = False, format: str = "files",
        on_progress: Callable[[dict], None] | None = None) -> dict:
    """Have the daemon get ``ref``: its result summary (``client.result_summary``'s
    fields). ``on_progress`` is given each progress snapshot, {blob digest: BlobProgress
    fields}, about four times a second."""
    body = {"ref": ref, "output": str(Path(output).absolute()) if output else None,
            "platform": platform, "force": force, "format": format}
    for message in stream(socket_path, "/get", body):
        if "progress" in message:
            if on_progress is not None:
                on_progress(message["progress"])
        elif "error" in message:
            raise error_from_daemon(message["error"])
        elif "result" in message:
            return message["result"]
    raise P2pullError("the daemon ended the get without a result; see its log")


def error_from_daemon(error: dict) -> P2pullError:
    """The daemon's error as the same class here, so the exit code is the same."""
    kind = getattr(errors, error.get("type", ""), P2pullError)
    if not (isinstance(kind, type) and issubclass(kind, P2pullError)):
        kind = P2pullError
    return kind(error.get("message", "the daemon reported an error"))

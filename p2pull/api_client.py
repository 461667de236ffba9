"""A client of the local daemon's API (``p2pull.net.api``: HTTP/1.1 on a Unix socket) with
the standard library only, and synchronous.

Every node of a cluster runs ``p2pull get`` at once when a deployment starts, on machines
busy with it. A CLI that imported trio and httpx to ask its daemon spent 0.3-0.6 s of CPU
before the first byte moved, and on 2 cores eight of them started up to 3 s apart. Through
this module a CLI talking to its daemon starts in the time Python itself takes. Async
callers run these functions in a worker thread.
"""

from __future__ import annotations

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
#: the longest status or header line, and the most header lines, taken from the daemon
MAX_LINE = 64 * 1024
MAX_HEADERS = 100


class _BrokenAnswer(Exception):
    """The daemon's answer is not the HTTP/1.1 it should be, or broke off."""


class _Answer:
    """One HTTP/1.1 answer read from the daemon's socket: the status, the headers and a
    body of Content-Length bytes, chunked, or up to the end. ``http.client`` would do, but
    it imports the email package and ssl, 50 ms of the CLI's start-up, which eight gets
    starting at once on two cores pay four times over."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._file = sock.makefile("rb")
        status_line = self._line()
        try:
            version, code = status_line.split(None, 2)[:2]
            self.status = int(code)
        except ValueError:
            raise _BrokenAnswer(f"not an HTTP status line: {status_line[:80]!r}") from None
        if not version.startswith(b"HTTP/1."):
            raise _BrokenAnswer(f"not an HTTP/1 answer: {status_line[:80]!r}")
        self.headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS):
            line = self._line()
            if line in (b"\r\n", b"\n"):
                break
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise _BrokenAnswer(f"not a header line: {line[:80]!r}")
            self.headers[name.strip().lower()] = value.strip()
        else:
            raise _BrokenAnswer("too many header lines")

    def _line(self) -> bytes:
        line = self._file.readline(MAX_LINE + 1)
        if not line.endswith(b"\n"):
            raise _BrokenAnswer("the answer broke off" if len(line) <= MAX_LINE
                                else "a line too long")
        return line

    def pieces(self) -> Iterator[bytes]:
        """The body, as it comes."""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = self._line().split(b";", 1)[0].strip()
                try:
                    size = int(size_line, 16)
                except ValueError:
                    raise _BrokenAnswer(f"bad chunk size {size_line[:20]!r}") from None
                if size == 0:
                    return
                data = self._file.read(size)
                if len(data) < size or self._line().strip():
                    raise _BrokenAnswer("a chunk broke off")
                yield data
        elif "content-length" in self.headers:
            try:
                length = int(self.headers["content-length"])
            except ValueError:
                raise _BrokenAnswer("bad Content-Length") from None
            data = self._file.read(length)
            if len(data) < length:
                raise _BrokenAnswer("the body broke off")
            yield data
        else:
            yield self._file.read()

    def read(self) -> bytes:
        return b"".join(self.pieces())

    def lines(self) -> Iterator[bytes]:
        """The body's lines, each as soon as it is whole."""
        pending = b""
        for piece in self.pieces():
            pending += piece
            *whole, pending = pending.split(b"\n")
            yield from whole
        if pending:
            yield pending

    def close(self) -> None:
        self._file.close()
        self._sock.close()


def _no_daemon(socket_path: Path) -> UsageError:
    return UsageError(f"no p2pull daemon answers on {socket_path}: start one with "
                      "`p2pull daemon`")


def _open(socket_path: Path, path: str, body: dict | None, timeout: float | None) -> _Answer:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        if body is None:
            head, data = f"GET {path} HTTP/1.1\r\n", b""
        else:
            data = json.dumps(body).encode()
            head = (f"POST {path} HTTP/1.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n")
        sock.sendall(f"{head}Host: p2pull\r\nConnection: close\r\n\r\n".encode() + data)
        return _Answer(sock)
    except (OSError, _BrokenAnswer) as exc:
        sock.close()
        raise _no_daemon(socket_path) from exc


def running(socket_path: Path, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a daemon answers on ``socket_path``."""
    if not Path(socket_path).exists():
        return False
    try:
        answer = _open(socket_path, "/status", None, timeout)
    except UsageError:
        return False
    answer.close()
    return answer.status == 200


def request(socket_path: Path, path: str, body: dict | None = None,
            timeout: float | None = REQUEST_TIMEOUT):
    """GET ``path`` (POST ``body`` if given) and return the JSON answer. UsageError when no
    daemon answers; the daemon's error as its own class."""
    response = _open(socket_path, path, body, timeout)
    try:
        answer = json.loads(response.read())
    except (OSError, _BrokenAnswer, ValueError) as exc:
        raise P2pullError(f"the daemon's answer to {path} broke off: {exc}; see its "
                          "log") from exc
    finally:
        response.close()
    if response.status != 200:
        raise error_from_daemon(answer.get("error", {}) if isinstance(answer, dict) else {})
    return answer


def stream(socket_path: Path, path: str, body: dict) -> Iterator[dict]:
    """POST ``body`` to a streamed route and yield its lines as they come. No timeout: a
    get takes as long as its bytes do, and the daemon sends progress while it works."""
    response = _open(socket_path, path, body, None)
    try:
        if response.status != 200:
            try:
                answer = json.loads(response.read() or b"{}")
            except (OSError, _BrokenAnswer, ValueError):
                answer = {}
            raise error_from_daemon(answer.get("error", {}) if isinstance(answer, dict)
                                    else {})
        try:
            for line in response.lines():
                if line.strip():
                    yield json.loads(line)
        except (OSError, _BrokenAnswer) as exc:
            raise P2pullError(f"the daemon's stream of {path} broke off: {exc}; see its "
                              "log") from exc
    finally:
        response.close()


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

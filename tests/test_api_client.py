"""The CLI's HTTP/1.1 reader of the daemon's answers, against raw bytes on a socket pair:
what h11 sends (Content-Length, chunked) and what a broken daemon might."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from p2pull import api_client
from p2pull.errors import NotFoundError, P2pullError, UsageError


def serve_once(tmp_path, raw: bytes) -> tuple:
    """A Unix socket at tmp_path that answers one request with ``raw`` and closes; the
    request it got is in the returned list once the answer is read."""
    path = tmp_path / "api.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    got: list[bytes] = []

    def answer():
        connection, _ = server.accept()
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:
                body += connection.recv(65536)
            got.append(head + b"\r\n\r\n" + body)
            connection.sendall(raw)
        server.close()

    threading.Thread(target=answer, daemon=True).start()
    return path, got


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


def test_a_streamed_get_yields_each_line_across_chunk_boundaries(tmp_path):
    lines = [{"progress": {"sha256:a": {"held": 1}}}, {"result": {"bytes": 3}}]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    raw = (b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
           b"transfer-encoding: chunked\r\n\r\n" + chunked(body[:7], body[7:30], body[30:]))
    path, got = serve_once(tmp_path, raw)
    seen = []
    result = api_client.get(path, "reg.test/m:v1", output="/tmp/x", on_progress=seen.append)
    assert result == {"bytes": 3}
    assert seen == [{"sha256:a": {"held": 1}}]
    request = got[0].decode()
    assert request.startswith("POST /get HTTP/1.1\r\n")
    assert json.loads(request.partition("\r\n\r\n")[2])["ref"] == "reg.test/m:v1"


def another_dir(tmp_path):
    fresh = tmp_path / "second"
    fresh.mkdir()
    return fresh


def test_a_plain_answer_and_the_daemons_error_class(tmp_path):
    document = json.dumps({"peers": 3}).encode()
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(document), document)
    path, got = serve_once(tmp_path, raw)
    assert api_client.request(path, "/status") == {"peers": 3}
    assert got[0].startswith(b"GET /status HTTP/1.1\r\n")

    error = json.dumps({"error": {"type": "NotFoundError", "message": "no such tag"}}).encode()
    raw = b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(error), error)
    path, _ = serve_once(another_dir(tmp_path), raw)
    with pytest.raises(NotFoundError, match="no such tag"):
        api_client.request(path, "/get")


@pytest.mark.parametrize("raw, error", [
    (b"SSH-2.0-OpenSSH_9.2\r\n", UsageError),  # not HTTP at all: no daemon there
    (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"peers\"", P2pullError),  # cut off
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", P2pullError),
])
def test_a_broken_answer_is_a_clear_error(tmp_path, raw, error):
    path, _ = serve_once(tmp_path, raw)
    with pytest.raises(error):
        api_client.request(path, "/status")

"""A small in-process origin: the read side of the OCI distribution API, served from an OCI
image layout directory. For ``make demo`` and unit tests; integration tests use CNCF
Distribution itself.

Serves ``GET/HEAD /v2/``, ``/v2/<any repository>/manifests/<tag|digest>`` (tags from the
``org.opencontainers.image.ref.name`` annotations of ``index.json``) and
``/v2/<any repository>/blobs/<digest>`` with single Range requests (206), counting body
bytes sent. Runs in its own threads: start() and stop() from any thread or event loop.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from p2pull.origin.manifest import OCI_MANIFEST

_ROUTE = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class LayoutOrigin:
    """Serve ``layout_dir`` on ``host:port`` (port 0 picks a free one)."""

    def __init__(self, layout_dir: Path | str, host: str = "127.0.0.1", port: int = 0):
        self.layout_dir = Path(layout_dir)
        self.bytes_served = 0
        self.requests = 0
        self._lock = threading.Lock()
        origin = self

        class Handler(_Handler):
            server_origin = origin

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> "LayoutOrigin":
        self._thread = threading.Thread(target=self._server.serve_forever, name="layout-origin",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join()

    def __enter__(self) -> "LayoutOrigin":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_served += nbytes

    def manifest_for(self, reference: str) -> tuple[str, str] | None:
        """(digest, media type) of a tag or digest in the layout's index."""
        index = json.loads((self.layout_dir / "index.json").read_text())
        for entry in index.get("manifests", []):
            tag = (entry.get("annotations") or {}).get("org.opencontainers.image.ref.name")
            if reference in (tag, entry["digest"]):
                return entry["digest"], entry.get("mediaType", OCI_MANIFEST)
        if _DIGEST.match(reference) and self.blob_path(reference).exists():
            return reference, OCI_MANIFEST
        return None

    def blob_path(self, digest: str) -> Path:
        return self.layout_dir / "blobs" / "sha256" / digest.split(":", 1)[1]


class _Handler(BaseHTTPRequestHandler):
    server_origin: LayoutOrigin
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # the demo prints its own summary
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        origin = self.server_origin
        with origin._lock:
            origin.requests += 1
        if self.path in ("/v2/", "/v2"):
            return self._reply(200, b"{}", "application/json", body)
        route = _ROUTE.match(self.path.split("?", 1)[0])
        if not route:
            return self._error(404, "NAME_UNKNOWN", body)
        reference = route.group("reference")
        if route.group("kind") == "manifests":
            found = origin.manifest_for(reference)
            if not found:
                return self._error(404, "MANIFEST_UNKNOWN", body)
            digest, media_type = found
            data = origin.blob_path(digest).read_bytes()
            return self._reply(200, data, media_type, body, {"Docker-Content-Digest": digest})
        if not _DIGEST.match(reference) or not origin.blob_path(reference).is_file():
            return self._error(404, "BLOB_UNKNOWN", body)
        self._send_blob(origin.blob_path(reference), reference, body)

    def _send_blob(self, path: Path, digest: str, body: bool) -> None:
        size = path.stat().st_size
        first, last, status = 0, size - 1, 200
        wanted = _RANGE.match(self.headers.get("Range", ""))
        if wanted:
            first = int(wanted.group(1))
            last = min(int(wanted.group(2)) if wanted.group(2) else size - 1, size - 1)
            if first > last:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Docker-Content-Digest", digest)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        if body:
            with open(path, "rb") as blob:
                sent = self.connection.sendfile(blob, first, last - first + 1)
            self.server_origin._count(sent)

    def _reply(self, status: int, data: bytes, content_type: str, body: bool,
               headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(data)
            self.server_origin._count(len(data))

    def _error(self, status: int, code: str, body: bool) -> None:
        data = json.dumps({"errors": [{"code": code, "message": code.lower()}]}).encode()
        self._reply(status, data, "application/json", body)


"""Tests of tests/support/proxy.py against a small threaded HTTP origin on 127.0.0.1.

Timing bounds are loose (the machine is shared), but each one fails if its feature is
missing: a cap that does nothing, a delay that is not added, or a delay that serialises.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.proxy import (
    FAULT_CUT,
    FAULT_THROTTLE,
    FAULT_UNAVAILABLE,
    FaultPlan,
    FaultyHttpProxy,
    Proxy,
    ProxyProcess,
    main,
    parse_rate,
)

LOOPBACK = "127.0.0.1"
BODY = random.Random(7).randbytes(4 * 2**20)
MANIFEST = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}'
BLOB_PATH = "/v2/repo/blobs/sha256:" + hashlib.sha256(BODY).hexdigest()
MANIFEST_PATH = "/v2/repo/manifests/latest"
CHUNKED_PATH = "/chunked/body"
UPLOAD_PATH = "/upload"
# Responses of the origin's chunked endpoint are cut into chunks of this size.
ORIGIN_CHUNK_BYTES = 100_000
# Idle keep-alive connections to the origin end after this long, so its threads end.
ORIGIN_IDLE_TIMEOUT_S = 5
# A socket operation in a test that takes longer than this is a hang, not slowness.
CLIENT_TIMEOUT_S = 20


class _OriginHandler(BaseHTTPRequestHandler):
    """A registry-like origin: a blob with Range support, a manifest, a chunked body,
    ``/stream/N`` (N bytes: BODY repeated), and ``PUT /upload`` answering the body's
    length and sha256 (Content-Length or chunked)."""

    protocol_version = "HTTP/1.1"
    timeout = ORIGIN_IDLE_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        # Like Distribution (Go sets TCP_NODELAY): without it, the body written after the
        # head waits for a delayed ACK, 40 ms per small response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(head_only=False)

    def do_HEAD(self) -> None:
        self._serve(head_only=True)

    def do_PUT(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        answer = json.dumps({"length": len(body), "sha256": hashlib.sha256(body).hexdigest()})
        self._send(201, answer.encode(), "application/json", head_only=False)

    def _read_chunked(self) -> bytes:
        parts = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() != b"\r\n":
            pass
        return b"".join(parts)

    def _serve(self, head_only: bool) -> None:
        if self.path == MANIFEST_PATH:
            self._send(200, MANIFEST, "application/json", head_only)
        elif self.path == BLOB_PATH:
            self._serve_blob(head_only)
        elif self.path == CHUNKED_PATH:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if not head_only:
                view = memoryview(BODY)
                for start in range(0, len(BODY), ORIGIN_CHUNK_BYTES):
                    piece = view[start:start + ORIGIN_CHUNK_BYTES]
                    self.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
        elif self.path.startswith("/stream/"):
            size = int(self.path.removeprefix("/stream/"))
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if not head_only:
                for piece in _repeated_body(size):
                    self.wfile.write(piece)
        else:
            self._send(404, b"", "text/plain", head_only)

    def _serve_blob(self, head_only: bool) -> None:
        start, end = 0, len(BODY) - 1
        status = 200
        if (spec := self.headers.get("Range")) is not None:
            first, _, last = spec.removeprefix("bytes=").partition("-")
            start, end = int(first), min(int(last), end) if last else end
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(BODY)}")
        self.end_headers()
        if not head_only:
            self.wfile.write(memoryview(BODY)[start:end + 1])

    def _send(self, status: int, body: bytes, content_type: str, head_only: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)


def _repeated_body(size: int):
    """``size`` bytes of BODY repeated, as memoryview pieces."""
    view = memoryview(BODY)
    while size > 0:
        piece = view[:size]
        size -= len(piece)
        yield piece


class _Origin(ThreadingHTTPServer):
    daemon_threads = False  # so server_close() joins the handler threads

    def handle_error(self, request: object, client_address: object) -> None:
        """Stay quiet about connections the proxies cut on purpose."""
        if not isinstance(sys.exception(), ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def origin():
    """host:port of the origin; it joins all its threads at teardown."""
    server = _Origin((LOOPBACK, 0), _OriginHandler)
    thread = threading.Thread(target=server.serve_forever, name="origin")
    thread.start()
    yield f"{LOOPBACK}:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


def _connect(host: str) -> http.client.HTTPConnection:
    address, port = host.split(":")
    return http.client.HTTPConnection(address, int(port), timeout=CLIENT_TIMEOUT_S)


def _get(conn: http.client.HTTPConnection, path: str, **headers: str):
    """(status, headers, body) of one GET on a keep-alive connection."""
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    return response.status, response.headers, response.read()


def _timed_fetch(host: str, path: str = BLOB_PATH) -> float:
    """Seconds to fetch ``path`` over a new connection; asserts the body is BODY."""
    start = time.monotonic()
    conn = _connect(host)
    try:
        status, _, body = _get(conn, path)
    finally:
        conn.close()
    assert status == 200 and body == BODY
    return time.monotonic() - start


def _parallel_fetches(host: str, count: int) -> tuple[list[float], float]:
    """Each fetch's seconds, and the seconds until all ``count`` parallel fetches ended."""
    start = time.monotonic()
    with ThreadPoolExecutor(count) as pool:
        times = list(pool.map(lambda _: _timed_fetch(host), range(count)))
    return times, time.monotonic() - start


def _raw_get(host: str, path: str) -> tuple[bytes, bytes, BaseException | None]:
    """(head, body bytes received, the error that ended the body or None at EOF) of a
    GET with ``Connection: close``, read up to the end of the connection."""
    address, port = host.split(":")
    with socket.create_connection((address, int(port)), timeout=CLIENT_TIMEOUT_S) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        received = bytearray()
        error = None
        try:
            while chunk := sock.recv(1 << 20):
                received += chunk
        except ConnectionResetError as exc:
            error = exc
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    return head, body, error


def test_parse_rate() -> None:
    assert parse_rate("4MB") == 4_000_000
    assert parse_rate("40MB") == 40_000_000
    assert parse_rate("100MiB") == 100 * 2**20
    assert parse_rate("500KB") == 500_000
    assert parse_rate("1.5MB/s") == 1_500_000
    assert parse_rate("2GiB") == 2 * 2**30
    assert parse_rate("123456") == 123456
    for bad in ("fast", "4XB", "0MB", "-1MB", ""):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_proxy_passes_bytes_unchanged_both_ways(origin: str) -> None:
    upload = random.Random(3).randbytes(3 * 2**20 + 5)
    with Proxy(origin) as proxy:
        conn = _connect(proxy.host)
        assert _get(conn, BLOB_PATH)[::2] == (200, BODY)
        status, headers, body = _get(conn, BLOB_PATH, Range="bytes=1000-1999")
        assert (status, body) == (206, BODY[1000:2000])
        assert headers["Content-Range"] == f"bytes 1000-1999/{len(BODY)}"
        conn.request("PUT", UPLOAD_PATH, body=upload)
        answer = json.loads(conn.getresponse().read())
        assert answer == {"length": len(upload), "sha256": hashlib.sha256(upload).hexdigest()}
        conn.close()
        # Connection: close: the origin closes, and the proxy must pass that EOF on.
        head, body, error = _raw_get(proxy.host, MANIFEST_PATH)
        assert (head.split(b"\r\n")[0], body, error) == (b"HTTP/1.1 200 OK", MANIFEST, None)
        assert proxy.connections == 2
        assert proxy.bytes_down >= len(BODY) + 1000 + len(MANIFEST)
        assert proxy.bytes_up >= len(upload)


def test_conn_rate_caps_each_connection_separately(origin: str) -> None:
    rate = 2_000_000
    ideal = len(BODY) / rate  # 2.1 s
    with Proxy(origin, conn_rate="2MB") as proxy:
        assert _timed_fetch(proxy.host) >= 0.8 * ideal
        times, together = _parallel_fetches(proxy.host, 2)
    assert min(times) >= 0.8 * ideal
    # One shared 2 MB/s would need 2 * ideal; separate caps finish both in about ideal.
    assert together <= 1.5 * ideal


def test_link_rate_caps_all_connections_together(origin: str) -> None:
    rate = 4_000_000
    ideal = 2 * len(BODY) / rate  # 2.1 s for both
    with Proxy(origin, link_rate=rate) as proxy:
        times, together = _parallel_fetches(proxy.host, 2)
        assert proxy.bytes_down >= 2 * len(BODY)  # bodies plus response heads
    assert together >= 0.8 * ideal
    assert min(times) >= 0.6 * max(times), "the two connections should share the link"


def test_delay_adds_round_trips_without_serialising(origin: str) -> None:
    delay = 0.1
    with Proxy(origin, delay_s=delay) as proxy:
        conn = _connect(proxy.host)
        start = time.monotonic()
        conn.request("GET", MANIFEST_PATH)
        response = conn.getresponse()
        fresh = time.monotonic() - start
        assert response.read() == MANIFEST
        start = time.monotonic()
        conn.request("GET", MANIFEST_PATH)
        response = conn.getresponse()
        reused = time.monotonic() - start
        assert response.read() == MANIFEST
        # Held for the delay, a 4 MiB body still flows in one go: reading 256 KiB and
        # then sleeping for the delay would take 16 * delay.
        start = time.monotonic()
        assert _get(conn, BLOB_PATH)[::2] == (200, BODY)
        bulk = time.monotonic() - start
        conn.close()
    assert 0.9 * 4 * delay <= fresh <= 4 * delay + 0.25, "handshake RTT + request RTT"
    assert 0.9 * 2 * delay <= reused <= 2 * delay + 0.15, "one round trip"
    assert bulk <= 2 * delay + 0.6

    with Proxy(origin, delay_s=delay, handshake=False) as proxy:
        conn = _connect(proxy.host)
        start = time.monotonic()
        conn.request("GET", MANIFEST_PATH)
        conn.getresponse().read()
        fresh = time.monotonic() - start
        conn.close()
    assert 0.9 * 2 * delay <= fresh <= 2 * delay + 0.15


def test_fault_503_on_scheduled_request_keeps_the_connection(origin: str) -> None:
    plan = FaultPlan(path_pattern="/blobs/", unavailable_at={2}, retry_after_s=3)
    with FaultyHttpProxy(origin, plan) as proxy:
        conn = _connect(proxy.host)
        assert _get(conn, MANIFEST_PATH)[::2] == (200, MANIFEST)
        assert _get(conn, BLOB_PATH)[::2] == (200, BODY)  # eligible request 1
        status, headers, body = _get(conn, BLOB_PATH)  # eligible request 2
        assert (status, headers["Retry-After"]) == (503, "3")
        assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
        assert _get(conn, MANIFEST_PATH)[::2] == (200, MANIFEST)
        status, _, body = _get(conn, BLOB_PATH, Range="bytes=10-19")  # eligible request 3
        assert (status, body) == (206, BODY[10:20])
        conn.request("HEAD", BLOB_PATH)
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"")
        conn.close()
        assert proxy.connections == 1
        assert proxy.requests == 6
        assert proxy.faults_injected == {FAULT_UNAVAILABLE: 1, FAULT_THROTTLE: 0, FAULT_CUT: 0}
        assert proxy.bytes_down == 2 * len(MANIFEST) + len(BODY) + 10


def test_fault_429_fraction_follows_the_seed_and_the_path(origin: str) -> None:
    plan = FaultPlan(path_pattern="/blobs/", seed=11, throttle=0.5, throttle_retry_after_s=2)
    draws = random.Random(plan.seed)
    expected = [plan.decide(n, draws.random()) == FAULT_THROTTLE for n in range(1, 21)]
    assert 4 <= sum(expected) <= 16
    with FaultyHttpProxy(origin, plan) as proxy:
        conn = _connect(proxy.host)
        throttled = []
        for _ in range(20):
            assert _get(conn, MANIFEST_PATH)[::2] == (200, MANIFEST)
            status, headers, body = _get(conn, BLOB_PATH, Range="bytes=0-99")
            throttled.append(status == 429)
            if status == 429:
                assert headers["Retry-After"] == "2"
                assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
            else:
                assert (status, body) == (206, BODY[:100])
        conn.close()
        assert proxy.faults_injected[FAULT_THROTTLE] == sum(expected)
        assert proxy.connections == 1
    assert throttled == expected


@pytest.mark.parametrize("with_reset", [True, False])
def test_fault_cut_delivers_exactly_k_body_bytes(origin: str, with_reset: bool) -> None:
    cut_after = 2**20 + 7
    plan = FaultPlan(path_pattern="/blobs/", cut_at={1}, cut_after_bytes=cut_after,
                     cut_with_reset=with_reset)
    with FaultyHttpProxy(origin, plan) as proxy:
        head, body, error = _raw_get(proxy.host, BLOB_PATH)
        assert head.startswith(b"HTTP/1.1 200")
        assert f"Content-Length: {len(BODY)}".encode() in head
        assert body == BODY[:cut_after]
        assert isinstance(error, ConnectionResetError) if with_reset else error is None
        _timed_fetch(proxy.host)  # request 2 is not cut: checks the whole body
        assert proxy.faults_injected[FAULT_CUT] == 1
        assert proxy.bytes_down == cut_after + len(BODY)


def test_faulty_proxy_passes_chunked_bodies_and_uploads(origin: str) -> None:
    upload = random.Random(5).randbytes(2**20 + 3)
    digest = {"length": len(upload), "sha256": hashlib.sha256(upload).hexdigest()}
    with FaultyHttpProxy(origin, FaultPlan(path_pattern="/blobs/", unavailable=1.0)) as proxy:
        conn = _connect(proxy.host)
        assert _get(conn, CHUNKED_PATH)[::2] == (200, BODY)
        # A faulted request's body is read and dropped; the connection stays in step.
        conn.request("PUT", "/v2/repo/blobs/uploads/1", body=upload)
        assert conn.getresponse().read() and proxy.faults_injected[FAULT_UNAVAILABLE] == 1
        conn.request("PUT", UPLOAD_PATH, body=upload)
        assert json.loads(conn.getresponse().read()) == digest
        conn.request("PUT", UPLOAD_PATH, body=iter([upload[:1000], upload[1000:]]),
                     encode_chunked=True)
        assert json.loads(conn.getresponse().read()) == digest
        assert _get(conn, CHUNKED_PATH)[::2] == (200, BODY)
        conn.close()
        assert proxy.connections == 1
        assert proxy.bytes_up == 2 * len(upload)
        assert proxy.bytes_down == 2 * len(BODY) + 2 * len(json.dumps(digest))


def test_process_mode_prints_port_writes_stats_and_stops_on_sigterm(origin: str) -> None:
    with ProxyProcess(origin, delay_s=0.005, conn_rate="1GB", link_rate="2GB") as proxy:
        _timed_fetch(proxy.host)
        deadline = time.monotonic() + 2
        while proxy.stats().get("bytes_down", 0) < len(BODY) and time.monotonic() < deadline:
            time.sleep(0.05)
        running = proxy.stats()
        final = proxy.stop()  # raises unless the child exits 0 after SIGTERM
    assert running["bytes_down"] >= len(BODY)  # the body plus the response head
    assert final == running
    assert final["connections"] == 1 and final["bytes_up"] > 0


def test_process_mode_streams_hundreds_of_mib_and_cuts_exactly(origin: str) -> None:
    size = 256 * 2**20
    cut_after = 200 * 2**20 + 1
    plan = FaultPlan(path_pattern="/stream/", cut_at={1}, cut_after_bytes=cut_after)
    expected = hashlib.sha256()
    for piece in _repeated_body(size):
        expected.update(piece)
    prefix = hashlib.sha256()
    for piece in _repeated_body(cut_after):
        prefix.update(piece)
    with ProxyProcess(origin, faults=plan) as proxy:
        path = f"/stream/{size}"
        conn = _connect(proxy.host)
        conn.request("GET", path)
        response = conn.getresponse()
        got = hashlib.sha256()
        received = 0
        with pytest.raises(ConnectionResetError):
            while chunk := response.read1(1 << 20):
                got.update(chunk)
                received += len(chunk)
        conn.close()
        assert (received, got.hexdigest()) == (cut_after, prefix.hexdigest())
        conn = _connect(proxy.host)
        conn.request("GET", path)
        response = conn.getresponse()
        got = hashlib.sha256()
        while chunk := response.read1(1 << 20):
            got.update(chunk)
        conn.close()
        assert got.hexdigest() == expected.hexdigest()
        final = proxy.stop()
    assert final["faults_injected"][FAULT_CUT] == 1
    assert final["bytes_down"] == size + cut_after


def test_command_line_rejects_faults_with_delay(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--target", "127.0.0.1:1", "--delay-ms", "5", "--faults", "{}"])
    assert exit_info.value.code == 2
    assert "chain two proxies" in capsys.readouterr().err

"""OCI distribution client over httpx: resolve refs to manifests and read blob ranges.

Every request goes through ``_send``: auth (anonymous, basic, bearer tokens), redirects
followed by hand so the registry's Authorization header never reaches another host, retries
with jittered backoff on 5xx, 429 (honouring Retry-After), timeouts and resets. httpx errors
are mapped to the tree in ``p2pull.errors`` here and nowhere else. Mirrors of a registry are
tried in order before the registry itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx
import trio

from p2pull.config import Config
from p2pull.core.policy import backoff_delay
from p2pull.core.refs import Ref
from p2pull.errors import AuthError, NotFoundError, OriginError, OriginUnavailable
from p2pull.origin.auth import RegistryAuth, find_credentials
from p2pull.origin.manifest import (INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES, MAX_MANIFEST_BYTES,
                                    Manifest, Platform, check_manifest_bytes, load_document,
                                    parse_manifest, select_from_index)

#: statuses worth another try: the registry or something in front of it is overloaded
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
PUSHBACK_STATUSES = frozenset({429, 503})
#: redirects to blob storage are one hop in practice; more is a loop
MAX_REDIRECTS = 5
#: one read buffer from the socket; larger pieces mean fewer Python-level iterations
READ_PIECE = 1024 * 1024
CONNECT_TIMEOUT = 10.0
USER_AGENT = "p2pull/0.1"

# httpcore reads 64 KiB per socket call, and at that size its per-read Python work is the
# bottleneck: 1 MiB reads took one stream on loopback from 300 to 930 MB/s (measured here).
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = max(
    httpcore.AsyncHTTP11Connection.READ_NUM_BYTES, READ_PIECE)

Sink = Callable[[memoryview], Awaitable[None]]


@dataclass
class OriginCounters:
    """Bytes moved to and from origins by this client, for metrics and the demo."""

    bytes_received: int = 0
    bytes_sent: int = 0
    requests: int = 0
    retries: int = 0


class OriginClient:
    """One client per process (or test); owns an httpx.AsyncClient and per-host auth.

    Use as ``async with OriginClient(config) as origin:``."""

    def __init__(self, config: Config, *, rng: random.Random | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.config = config
        self.counters = OriginCounters()
        self._rng = rng or random.Random()
        self._http = httpx.AsyncClient(
            transport=transport, follow_redirects=False, headers={"User-Agent": USER_AGENT},
            timeout=httpx.Timeout(config.origin_timeout, connect=CONNECT_TIMEOUT),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._auths: dict[str, RegistryAuth] = {}

    async def __aenter__(self) -> "OriginClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- endpoints and auth ---------------------------------------------------------------

    def endpoints(self, ref: Ref) -> list[str]:
        """Hosts to try for ``ref``: its registry's mirrors, then its registry."""
        return [*self.config.registry(ref.registry).mirrors, ref.endpoint]

    def base_url(self, host: str) -> str:
        scheme = "http" if self.config.is_insecure(host) else "https"
        return f"{scheme}://{host}"

    def _auth(self, host: str) -> RegistryAuth:
        if host not in self._auths:
            self._auths[host] = RegistryAuth(host, find_credentials(self.config, host),
                                             self._http)
        return self._auths[host]

    # -- the one request path ---------------------------------------------------------------

    async def send(self, host: str, method: str, path: str, *, scope: str,
                   headers: dict | None = None, params: dict | None = None,
                   content: bytes | None = None, stream: bool = False,
                   ok: tuple[int, ...] = (200,),
                   on_pushback: Callable[[], None] | None = None) -> httpx.Response:
        """Send a request to ``host`` and return a response with a status in ``ok``.

        With ``stream=True`` the body is unread and the caller must ``aclose()`` it. Raises
        NotFoundError (404), AuthError, OriginError (other 4xx) or OriginUnavailable once
        ``config.origin_attempts`` attempts failed."""
        auth = self._auth(host)
        url = self.base_url(host) + path
        last_problem = "no attempt made"
        attempt = 0
        while attempt < self.config.origin_attempts:
            attempt += 1
            await auth.ensure(scope)
            sent_auth = auth.header(scope)
            request_headers = dict(headers or {})
            if sent_auth:
                request_headers["Authorization"] = sent_auth
            retry_after = None
            try:
                response = await self._follow(method, url, request_headers, params, content,
                                              stream)
            except httpx.TransportError as exc:
                last_problem = f"{type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if status in ok:
                    return response
                await response.aclose()
                if status == 401:
                    await auth.on_unauthorized(response, scope, sent_auth)
                    attempt -= 1 if sent_auth is None else 0  # the anonymous probe is free
                    continue
                if status == 404:
                    raise NotFoundError(f"{host}{path}: not found (404); check the "
                                        "repository name and tag")
                if status == 403:
                    raise AuthError(f"{host}{path}: access denied (403)")
                if status not in RETRY_STATUSES:
                    raise OriginError(f"{host}{path}: unexpected answer {status} "
                                      f"{response.reason_phrase}")
                if status in PUSHBACK_STATUSES and on_pushback:
                    on_pushback()
                retry_after = _retry_after(response)
                last_problem = f"HTTP {status}"
            self.counters.retries += 1
            if attempt < self.config.origin_attempts:
                await trio.sleep(backoff_delay(attempt, self._rng, retry_after))
        raise OriginUnavailable(f"{host} failed {attempt} times ({last_problem}); check that "
                                "the registry is up, or raise origin_attempts")

    async def _follow(self, method: str, url: str, headers: dict, params, content,
                      stream: bool) -> httpx.Response:
        """Send, following redirects by hand; Authorization goes only to the first host."""
        origin_host = urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            request = self._http.build_request(method, url, headers=headers, params=params,
                                               content=content)
            self.counters.requests += 1
            if content:
                self.counters.bytes_sent += len(content)
            response = await self._http.send(request, stream=True)
            location = response.headers.get("location")
            if response.status_code not in (301, 302, 303, 307, 308) or not location:
                if not stream:
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
                return response
            await response.aclose()
            url = urljoin(str(request.url), location)
            params = None  # the Location carries its own query (signed storage URLs)
            if urlsplit(url).netloc != origin_host:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            if response.status_code == 303:
                method, content = "GET", None
        raise OriginError(f"more than {MAX_REDIRECTS} redirects from {origin_host}")

    # -- manifests ----------------------------------------------------------------------------

    async def resolve(self, ref: Ref, platform: Platform | None = None) -> Manifest:
        """The manifest ``ref`` names; an index is followed to ``platform`` (default: the
        host's). Checks the bytes against the pinned digest and Docker-Content-Digest."""
        raw, media_type, digest, data = await self._fetch_manifest(ref, ref.reference)
        if media_type in INDEX_MEDIA_TYPES:
            chosen = select_from_index(data, platform or Platform.host(), str(ref))
            raw, media_type, digest, data = await self._fetch_manifest(ref, chosen.digest)
        return parse_manifest(raw, digest, media_type, data, str(ref))

    async def _fetch_manifest(self, ref: Ref, reference: str):
        pinned = reference if reference.startswith("sha256:") else None
        response = await self._from_any_endpoint(
            ref, "GET", f"/v2/{ref.repository}/manifests/{reference}",
            headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)})
        raw = response.content
        if len(raw) > MAX_MANIFEST_BYTES:
            raise OriginError(f"{ref}: manifest of {len(raw)} bytes exceeds the "
                              f"{MAX_MANIFEST_BYTES} byte limit")
        digest = check_manifest_bytes(raw, pinned, str(ref))
        check_manifest_bytes(raw, response.headers.get("docker-content-digest") or None,
                             str(ref))
        media_type, data = load_document(raw, response.headers.get("content-type", ""), str(ref))
        return raw, media_type, digest, data

    async def _from_any_endpoint(self, ref: Ref, method: str, path: str, **kwargs):
        """Try each endpoint of ``ref`` in turn; the last one's error is the answer."""
        hosts = self.endpoints(ref)
        for n, host in enumerate(hosts):
            try:
                return await self.send(host, method, path, scope=pull_scope(ref), **kwargs)
            except (NotFoundError, OriginUnavailable, AuthError):
                if n == len(hosts) - 1:
                    raise

    # -- blobs ----------------------------------------------------------------------------------

    async def read_blob_range(self, ref: Ref, digest: str, start: int, length: int,
                              sink: Sink, *, on_pushback: Callable[[], None] | None = None,
                              host: str | None = None) -> None:
        """Deliver bytes [start, start+length) of blob ``digest`` to ``sink`` in order, each
        byte exactly once. A connection that breaks mid-body is resumed from the next
        missing byte; only ``origin_attempts`` attempts in a row without progress fail."""
        host = host or self.endpoints(ref)[-1]
        path = f"/v2/{ref.repository}/blobs/{digest}"
        done = 0
        failures = 0
        while done < length:
            first = start + done
            # identity: a compressed body would not be the blob's bytes at these offsets
            range_header = {"Range": f"bytes={first}-{start + length - 1}",
                            "Accept-Encoding": "identity"}
            response = await self.send(host, "GET", path, scope=pull_scope(ref),
                                       headers=range_header, stream=True, ok=(200, 206),
                                       on_pushback=on_pushback)
            try:
                skip = _range_skip(response, first, host, path)
                async for piece in response.aiter_raw():
                    if skip:
                        cut = min(skip, len(piece))
                        piece, skip = piece[cut:], skip - cut
                    # read to the end even past ``length``: a response left unfinished
                    # costs its connection, and a new one a round trip or two
                    piece = memoryview(piece)[:length - done]
                    if piece:
                        self.counters.bytes_received += len(piece)
                        await sink(piece)
                        done += len(piece)
                        failures = 0
            except (httpx.TransportError, httpx.StreamError) as exc:
                failures += 1
                self.counters.retries += 1
                if failures >= self.config.origin_attempts:
                    raise OriginUnavailable(f"{host}: blob {digest} kept breaking off "
                                            f"({exc!r}); the registry may be failing") from exc
                await trio.sleep(backoff_delay(failures, self._rng))
            finally:
                await response.aclose()
            if done < length and failures == 0:
                failures += 1  # the body ended early without an error: count it too

    async def blob_host(self, ref: Ref, digest: str) -> tuple[str, int]:
        """(host, size) of the first endpoint (mirror or registry) that holds ``digest``."""
        response = await self._from_any_endpoint(ref, "HEAD",
                                                 f"/v2/{ref.repository}/blobs/{digest}")
        host = urlsplit(str(response.request.url)).netloc
        if host not in self.endpoints(ref):
            # HEAD was redirected to storage: ranges are still asked of the registry
            host = self.endpoints(ref)[-1]
        return host, int(response.headers.get("content-length", -1))

    async def ping(self, host: str) -> None:
        """GET /v2/: raises unless the host speaks the distribution API."""
        await self.send(host, "GET", "/v2/", scope="", ok=(200,))


def pull_scope(ref: Ref) -> str:
    return f"repository:{ref.repository}:pull"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: the jittered backoff serves as well


def _range_skip(response: httpx.Response, first: int, host: str, path: str) -> int:
    """How many leading body bytes to drop: none for a 206 that starts where asked, ``first``
    for a 200 that ignored the Range header."""
    if response.status_code == 200:
        return first
    content_range = response.headers.get("content-range", "")
    try:
        served_first = int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        raise OriginError(f"{host}{path}: 206 without a valid Content-Range") from None
    if served_first != first:
        raise OriginError(f"{host}{path}: asked for byte {first}, served from {served_first}")
    return 0


"""The origin client against httpx.MockTransport: auth flows, redirects, retries, mirrors.
No sockets; the registry's behaviour is scripted per test."""

from __future__ import annotations

import base64
import hashlib
import json
import random

import httpx
import pytest
import trio

from p2pull.config import RegistryConfig, load_config
from p2pull.core.refs import parse_ref
from p2pull.errors import AuthError, IntegrityError, NotFoundError, OriginUnavailable
from p2pull.origin.client import OriginClient
from p2pull.origin.manifest import OCI_MANIFEST

BLOB = bytes(range(256)) * 64
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
MANIFEST = json.dumps({
    "schemaVersion": 2, "mediaType": OCI_MANIFEST,
    "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2,
               "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest()},
    "layers": [{"mediaType": "application/octet-stream", "size": len(BLOB),
                "digest": BLOB_DIGEST}]}).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()


def make_client(handler, **config) -> OriginClient:
    config.setdefault("origin_attempts", 4)
    return OriginClient(load_config(env={}, **config), rng=random.Random(7),
                        transport=httpx.MockTransport(handler))


class Body(httpx.AsyncByteStream):
    """A streamed body, as a socket gives it (httpx reads ``content=`` bodies eagerly)."""

    def __init__(self, data: bytes):
        self.data = data

    async def __aiter__(self):
        yield self.data


def blob_response(request: httpx.Request) -> httpx.Response:
    assert request.headers["accept-encoding"] == "identity"
    first, last = request.headers["range"].removeprefix("bytes=").split("-")
    first, last = int(first), int(last)
    return httpx.Response(206, stream=Body(BLOB[first:last + 1]),
                          headers={"Content-Range": f"bytes {first}-{last}/{len(BLOB)}"})


async def read_all(client: OriginClient, ref, host=None) -> bytes:
    received = bytearray()

    async def sink(piece):
        received.extend(piece)

    await client.read_blob_range(ref, BLOB_DIGEST, 0, len(BLOB), sink, host=host)
    return bytes(received)


async def test_bearer_token_is_fetched_once_and_reused(autojump_clock):
    token_requests = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            token_requests.append(request)
            assert request.url.params["scope"] == "repository:team/model:pull"
            assert request.url.params["service"] == "reg"
            assert request.headers["authorization"] == "Basic " + base64.b64encode(
                b"alice:secret").decode()
            return httpx.Response(200, json={"token": "T1", "expires_in": 300})
        if request.headers.get("authorization") != "Bearer T1":
            return httpx.Response(401, headers={"WWW-Authenticate": (
                'Bearer realm="https://auth.test/token",service="reg",'
                'scope="repository:team/model:pull"')})
        if "/manifests/" in request.url.path:
            return httpx.Response(200, content=MANIFEST,
                                  headers={"Content-Type": OCI_MANIFEST})
        return blob_response(request)

    ref = parse_ref("reg.test/team/model:v1")
    client = make_client(handler, registries={
        "reg.test": RegistryConfig(username="alice", password="secret")})
    async with client:
        manifest = await client.resolve(ref)
        assert manifest.digest == MANIFEST_DIGEST
        assert await read_all(client, ref) == BLOB
        assert await read_all(client, ref) == BLOB
    assert len(token_requests) == 1


async def test_expired_token_is_refreshed_on_401(autojump_clock):
    issued = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            issued.append(f"T{len(issued) + 1}")
            return httpx.Response(200, json={"token": issued[-1], "expires_in": 300})
        # the registry has revoked every token but the newest
        if not issued or request.headers.get("authorization") != f"Bearer {issued[-1]}" \
                or len(issued) < 2:
            return httpx.Response(401, headers={"WWW-Authenticate":
                                                'Bearer realm="https://auth.test/t"'})
        return blob_response(request)

    ref = parse_ref("reg.test/model:v1")
    async with make_client(handler) as client:
        # the first token is refused at once, which is "no access" for a fresh token ...
        with pytest.raises(AuthError, match="fresh token"):
            await read_all(client, ref)
        # ... but a token that is old by then is simply fetched again
        await trio.sleep(60)
        assert await read_all(client, ref) == BLOB
    assert issued == ["T1", "T2"]


async def test_basic_auth_refused_credentials_are_an_auth_error():
    def handler(request):
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})

    ref = parse_ref("reg.test/model:v1")
    async with make_client(handler, registries={
            "reg.test": RegistryConfig(username="bob", password="wrong")}) as client:
        with pytest.raises(AuthError, match="refused the user name and password for 'bob'"):
            await client.resolve(ref)
    async with make_client(handler) as client:
        with pytest.raises(AuthError, match="requires a user name and password"):
            await client.resolve(ref)


async def test_redirect_to_storage_drops_the_authorization_header():
    seen = {}

    def handler(request):
        seen[request.url.host] = request.headers.get("authorization")
        if request.url.host == "reg.test":
            if "authorization" not in request.headers:
                return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
            return httpx.Response(307, headers={
                "Location": "https://storage.test/blob?signature=abc"})
        assert request.url.params["signature"] == "abc"
        assert request.headers["range"].startswith("bytes=0-")
        return blob_response(request)

    ref = parse_ref("reg.test/model:v1")
    async with make_client(handler, registries={
            "reg.test": RegistryConfig(username="u", password="p")}) as client:
        assert await read_all(client, ref) == BLOB
    assert seen["reg.test"].startswith("Basic ")
    assert seen["storage.test"] is None


async def test_retries_5xx_and_honours_retry_after(autojump_clock):
    calls = []

    def handler(request):
        calls.append(trio.current_time())
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "7"})
        if len(calls) == 2:
            return httpx.Response(503)
        return blob_response(request)

    ref = parse_ref("reg.test/model:v1")
    async with make_client(handler) as client:
        assert await read_all(client, ref) == BLOB
        assert client.counters.retries == 2
    assert calls[1] - calls[0] >= 7


async def test_connection_reset_mid_body_resumes_from_next_byte(autojump_clock):
    ranges = []

    class BreakingStream(httpx.AsyncByteStream):
        def __init__(self, data):
            self.data = data

        async def __aiter__(self):
            yield self.data[:1000]
            raise httpx.ReadError("connection reset by peer")

    def handler(request):
        ranges.append(request.headers["range"])
        if len(ranges) == 1:
            return httpx.Response(206, stream=BreakingStream(BLOB), headers={
                "Content-Range": f"bytes 0-{len(BLOB) - 1}/{len(BLOB)}"})
        return blob_response(request)

    ref = parse_ref("reg.test/model:v1")
    async with make_client(handler) as client:
        assert await read_all(client, ref) == BLOB
    assert ranges == [f"bytes=0-{len(BLOB) - 1}", f"bytes=1000-{len(BLOB) - 1}"]


async def test_dead_origin_is_unavailable_after_the_configured_attempts(autojump_clock):
    calls = []

    def handler(request):
        calls.append(request)
        raise httpx.ConnectError("connection refused")

    async with make_client(handler, origin_attempts=3) as client:
        with pytest.raises(OriginUnavailable, match="failed 3 times"):
            await client.resolve(parse_ref("reg.test/model:v1"))
    assert len(calls) == 3


async def test_mirror_is_tried_first_and_upstream_after_it_fails(autojump_clock):
    hosts = []

    def handler(request):
        hosts.append(request.url.host)
        if request.url.host == "mirror.test":
            return httpx.Response(404)
        return httpx.Response(200, content=MANIFEST, headers={"Content-Type": OCI_MANIFEST})

    async with make_client(handler, registries={
            "reg.test": RegistryConfig(mirrors=("mirror.test",))}) as client:
        manifest = await client.resolve(parse_ref("reg.test/model:v1"))
    assert manifest.digest == MANIFEST_DIGEST
    assert hosts == ["mirror.test", "reg.test"]


async def test_manifest_not_matching_pinned_digest_is_refused():
    def handler(request):
        return httpx.Response(200, content=MANIFEST + b" ", headers={"Content-Type": OCI_MANIFEST})

    async with make_client(handler) as client:
        with pytest.raises(IntegrityError, match="altered"):
            await client.resolve(parse_ref(f"reg.test/model@{MANIFEST_DIGEST}"))


async def test_missing_repository_is_not_found():
    async with make_client(lambda request: httpx.Response(404)) as client:
        with pytest.raises(NotFoundError, match="check the repository name"):
            await client.resolve(parse_ref("reg.test/nothing:v1"))

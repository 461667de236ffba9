"""Registry credentials and the token flow of the distribution spec.

Credentials come, first found wins, from ``P2PULL_REGISTRY_USERNAME`` /
``P2PULL_REGISTRY_PASSWORD``, the ``[registries."host"]`` table of the config file, then
Docker's ``config.json`` (``$DOCKER_CONFIG`` or ``~/.docker``). Tokens are cached per
(realm, service, scope), reused until shortly before they expire, and fetched again when the
registry answers 401 to a token it no longer accepts.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import httpx
import trio

from p2pull.config import Config
from p2pull.errors import AuthError, OriginUnavailable

#: the spec's default when a token response has no expires_in
DEFAULT_TOKEN_LIFETIME = 60.0
#: fetch a new token this long before the old one expires, so no request races its expiry
TOKEN_EXPIRY_MARGIN = 10.0
#: a 401 to a token younger than this means no access, not expiry: fetching again won't help
FRESH_TOKEN_SECONDS = 5.0


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic_header(self) -> str:
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()


def find_credentials(config: Config, host: str,
                     env: Mapping[str, str] | None = None) -> Credentials | None:
    env = os.environ if env is None else env
    if env.get("P2PULL_REGISTRY_USERNAME"):
        return Credentials(env["P2PULL_REGISTRY_USERNAME"],
                           env.get("P2PULL_REGISTRY_PASSWORD", ""))
    settings = config.registry(host)
    if settings.username:
        return Credentials(settings.username, settings.password or "")
    return _docker_config_credentials(host, env)


def _docker_config_credentials(host: str, env: Mapping[str, str]) -> Credentials | None:
    folder = Path(env.get("DOCKER_CONFIG") or Path.home() / ".docker")
    try:
        auths = json.loads((folder / "config.json").read_text()).get("auths", {})
    except (OSError, ValueError):
        return None
    names = {host, f"https://{host}", f"http://{host}"}
    if host in ("docker.io", "registry-1.docker.io"):
        names.add("https://index.docker.io/v1/")
    for name, entry in auths.items():
        if name.rstrip("/") in names or name in names:
            if entry.get("auth"):
                try:
                    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except ValueError:
                    continue
                return Credentials(user, password)
            if entry.get("username"):
                return Credentials(entry["username"], entry.get("password", ""))
    return None


_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" or "basic"
    params: Mapping[str, str]


def parse_challenge(header: str) -> Challenge:
    """``Bearer realm="https://auth/token",service="reg",scope="repository:a:pull"``."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _CHALLENGE_PARAM.finditer(rest)}
    return Challenge(scheme.lower(), params)


class RegistryAuth:
    """The Authorization header for one registry host, shared by all requests to it.

    Owned by one OriginClient; safe to use from many trio tasks: one token fetch at a time
    per scope, the others wait for it and reuse the result."""

    def __init__(self, host: str, credentials: Credentials | None, http: httpx.AsyncClient):
        self.host = host
        self.credentials = credentials
        self._http = http
        self._challenge: Challenge | None = None
        # scope -> (token, expires at, fetched at)
        self._tokens: dict[str, tuple[str, float, float]] = {}
        self._lock = trio.Lock()

    def header(self, scope: str) -> str | None:
        """The header to send now, or None before any challenge (anonymous first try)."""
        if self._challenge is None:
            return None
        if self._challenge.scheme == "basic":
            return self.credentials.basic_header() if self.credentials else None
        token = self._tokens.get(scope)
        if token and token[1] > trio.current_time():
            return f"Bearer {token[0]}"
        return None

    def needs_refresh(self, scope: str) -> bool:
        return (self._challenge is not None and self._challenge.scheme == "bearer"
                and self.header(scope) is None)

    async def on_unauthorized(self, response: httpx.Response, scope: str,
                              sent_header: str | None) -> None:
        """Handle a 401: learn the challenge and fetch a token; raise AuthError when there
        is nothing new to try (the header just sent is the one we would send again)."""
        header = response.headers.get("www-authenticate")
        if not header:
            raise AuthError(f"{self.host} refused the request (401) without saying how to "
                            "authenticate")
        self._challenge = parse_challenge(header)
        if self._challenge.scheme == "basic":
            if not self.credentials:
                raise AuthError(f"{self.host} requires a user name and password: set them in "
                                f'[registries."{self.host}"] of the config, in '
                                "P2PULL_REGISTRY_USERNAME/PASSWORD, or `docker login`")
            if sent_header == self.credentials.basic_header():
                raise AuthError(f"{self.host} refused the user name and password for "
                                f"{self.credentials.username!r}")
            return
        if self._challenge.scheme != "bearer":
            raise AuthError(f"{self.host} asks for unsupported auth scheme "
                            f"{self._challenge.scheme!r}")
        async with self._lock:
            current = self.header(scope)
            if current is not None and current != sent_header:
                return  # another task refreshed it while we waited
            refused = self._tokens.pop(scope, None)
            if (refused and sent_header == f"Bearer {refused[0]}"
                    and trio.current_time() - refused[2] < FRESH_TOKEN_SECONDS):
                raise AuthError(f"{self.host} refused a fresh token for {scope}: the "
                                "credentials lack access to this repository")
            await self._fetch_token(scope)

    async def ensure(self, scope: str) -> None:
        """Fetch a token ahead of a request when the old one has expired."""
        if self.needs_refresh(scope):
            async with self._lock:
                if self.needs_refresh(scope):
                    await self._fetch_token(scope)

    async def _fetch_token(self, scope: str) -> None:
        realm = self._challenge.params.get("realm")
        if not realm:
            raise AuthError(f"{self.host} sent a Bearer challenge without a realm")
        # a scope naming several resources (a cross-repository mount) is space-separated, as
        # in challenges; the token spec asks for one scope parameter per resource
        params = {"scope": scope.split()}
        if self._challenge.params.get("service"):
            params["service"] = self._challenge.params["service"]
        headers = {}
        if self.credentials:
            headers["Authorization"] = self.credentials.basic_header()
        try:
            response = await self._http.get(realm, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise OriginUnavailable(f"token endpoint {realm} of {self.host} unreachable: "
                                    f"{exc!r}") from exc
        if response.status_code in (401, 403):
            who = f"user {self.credentials.username!r}" if self.credentials else "anonymous"
            raise AuthError(f"token endpoint {realm} refused {who} for {scope} "
                            f"({response.status_code}); check the credentials")
        if response.status_code != 200:
            raise AuthError(f"token endpoint {realm} answered {response.status_code}")
        try:
            body = response.json()
            token = body.get("token") or body["access_token"]
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, KeyError, TypeError) as exc:
            raise AuthError(f"token endpoint {realm} sent no usable token") from exc
        now = trio.current_time()
        expires = now + max(1.0, lifetime - TOKEN_EXPIRY_MARGIN
                                            if lifetime > 2 * TOKEN_EXPIRY_MARGIN
                                            else lifetime / 2)
        self._tokens[scope] = (token, expires, now)

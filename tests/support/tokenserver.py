"""A Docker-style bearer token server for tests, trusted by CNCF Distribution 2.8.

Flow (https://distribution.github.io/distribution/spec/auth/token/): the registry answers 401
with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``; the client sends
``GET <realm>?service=S&scope=repository:NAME:pull,push`` (``scope`` may repeat), with HTTP
basic credentials or anonymously, and retries with ``Authorization: Bearer <token>``.

Tokens are RS256 JWTs signed by an RSA key made at ``start()``. The JOSE header carries the
key's self-signed certificate in ``x5c``; the registry trusts it because its
``auth.token.rootcertbundle`` points at the same certificate (``TokenServer.cert_path``).

Grants: a user whose basic credentials match ``users`` gets every action it asks for; an
anonymous request gets ``pull`` only, and only if ``anonymous_pull`` is true. Wrong
credentials, or no credentials without ``anonymous_pull``, answer 401.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import http.server
import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

ANONYMOUS_ACTIONS = frozenset({"pull"})


@dataclass(frozen=True)
class TokenRequest:
    """One request to the token endpoint, as the server saw and answered it.

    ``user`` is None for an anonymous request; ``scopes`` are the raw ``scope`` parameters;
    ``access`` is the granted ``access`` claim (empty when no token was issued); ``status``
    is the HTTP status returned.
    """

    user: str | None
    service: str | None
    scopes: tuple[str, ...]
    access: tuple[dict, ...]
    status: int


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_segment(value: dict) -> str:
    return _b64url(json.dumps(value, separators=(",", ":")).encode())


def parse_scopes(scopes: list[str]) -> dict[tuple[str, str], set[str]]:
    """Map ``type:name:action,action`` scope strings to {(type, name): actions}.

    Repeated scopes for the same resource are merged. Raises ValueError on a malformed scope.
    """
    requested: dict[tuple[str, str], set[str]] = {}
    for scope in scopes:
        resource_type, sep, rest = scope.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not (sep and sep2 and resource_type and name):
            raise ValueError(f"malformed scope {scope!r}")
        requested.setdefault((resource_type, name), set()).update(
            action for action in actions.split(",") if action
        )
    return requested


class TokenServer:
    """Threaded HTTP token endpoint on 127.0.0.1 issuing RS256 JWTs (see module docstring).

    ``realm``, ``port`` are known after ``start()``; ``cert_path`` (PEM, for the registry's
    ``rootcertbundle``) is written by ``start()``. ``token_lifetime`` (seconds) sets ``exp``;
    note that Distribution accepts tokens up to 60 s past ``exp`` (clock-skew leeway).
    ``requests`` counts requests to ``/token``; ``request_log`` records each one.
    """

    def __init__(
        self,
        cert_dir: Path,
        *,
        users: dict[str, str] | None = None,
        anonymous_pull: bool = False,
        token_lifetime: int = 300,
        service: str = "p2pull-test-registry",
        issuer: str = "p2pull-test-token-issuer",
    ) -> None:
        self.cert_path = Path(cert_dir) / "token-issuer.pem"
        self.users = dict(users or {})
        self.anonymous_pull = anonymous_pull
        self.token_lifetime = token_lifetime
        self.service = service
        self.issuer = issuer
        self.request_log: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._key: rsa.RSAPrivateKey | None = None
        self._cert_der_b64 = ""

    @property
    def requests(self) -> int:
        """Number of requests received on ``/token`` (granted or not)."""
        with self._lock:
            return len(self.request_log)

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("token server not started")
        return self._httpd.server_address[1]

    @property
    def realm(self) -> str:
        """Token endpoint URL, as the registry announces it in ``WWW-Authenticate``."""
        return f"http://127.0.0.1:{self.port}/token"

    def start(self) -> TokenServer:
        """Generate the signing key and certificate, write ``cert_path``, start serving."""
        if self._httpd is not None:
            raise RuntimeError("token server already started")
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = self._self_signed_cert(self._key)
        self.cert_path.parent.mkdir(parents=True, exist_ok=True)
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._cert_der_b64 = base64.b64encode(
            cert.public_bytes(serialization.Encoding.DER)
        ).decode("ascii")
        self._httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), _make_handler(self)
        )
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="token-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port. Idempotent."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        assert self._thread is not None
        self._thread.join()
        self._httpd = None
        self._thread = None

    def __enter__(self) -> TokenServer:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def issue_token(self, subject: str, access: list[dict]) -> tuple[str, int]:
        """Sign a JWT for ``subject`` with the given ``access`` claim; return (token, iat)."""
        if self._key is None:
            raise RuntimeError("token server not started")
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._cert_der_b64]}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.token_lifetime,
            "nbf": now,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        signing_input = f"{_json_segment(header)}.{_json_segment(claims)}"
        signature = self._key.sign(
            signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
        )
        return f"{signing_input}.{_b64url(signature)}", now

    def grant(
        self, user: str | None, requested: dict[tuple[str, str], set[str]]
    ) -> list[dict]:
        """The ``access`` claim for ``user`` (None: anonymous) asking for ``requested``.

        Resources left with no granted action are omitted.
        """
        access = []
        for (resource_type, name), actions in requested.items():
            granted = actions if user is not None else actions & ANONYMOUS_ACTIONS
            if granted:
                access.append(
                    {"type": resource_type, "name": name, "actions": sorted(granted)}
                )
        return access

    def _record(self, entry: TokenRequest) -> None:
        with self._lock:
            self.request_log.append(entry)

    @staticmethod
    def _self_signed_cert(key: rsa.RSAPrivateKey) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pull test token issuer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )


def fetch_token(
    server: TokenServer, *scopes: str, credentials: tuple[str, str] | None = None
) -> str:
    """Ask ``server`` for a token covering ``scopes`` (anonymously if no ``credentials``).

    Raises httpx.HTTPStatusError if the server refuses.
    """
    response = httpx.get(
        server.realm,
        params={"service": server.service, "scope": list(scopes)},
        auth=credentials,
        timeout=10.0,
    )
    response.raise_for_status()
    return response.json()["token"]


def _make_handler(server: TokenServer) -> type[http.server.BaseHTTPRequestHandler]:
    class TokenHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/token":
                self._send_json(404, {"error": "not found"})
                return
            query = urllib.parse.parse_qs(url.query)
            service = query.get("service", [None])[0]
            scopes = tuple(query.get("scope", []))
            try:
                user = self._authenticated_user()
            except PermissionError as exc:
                self._refuse(None, service, scopes, 401, str(exc))
                return
            if user is None and not server.anonymous_pull:
                self._refuse(None, service, scopes, 401, "credentials required")
                return
            if service is not None and service != server.service:
                self._refuse(user, service, scopes, 400, f"unknown service {service!r}")
                return
            try:
                requested = parse_scopes(list(scopes))
            except ValueError as exc:
                self._refuse(user, service, scopes, 400, str(exc))
                return
            access = server.grant(user, requested)
            token, issued_at = server.issue_token(user or "", access)
            server._record(TokenRequest(user, service, scopes, tuple(access), 200))
            self._send_json(
                200,
                {
                    "token": token,
                    "access_token": token,
                    "expires_in": server.token_lifetime,
                    "issued_at": datetime.datetime.fromtimestamp(
                        issued_at, datetime.timezone.utc
                    ).strftime("%Y-%m-%dT%H:%M:%SZ"),
                },
            )

        def _authenticated_user(self) -> str | None:
            """The user named by valid basic credentials, None if there are none.

            Raises PermissionError on malformed or wrong credentials.
            """
            header = self.headers.get("Authorization")
            if header is None:
                return None
            scheme, _, encoded = header.partition(" ")
            if scheme.lower() != "basic":
                raise PermissionError("only basic credentials are accepted")
            try:
                decoded = base64.b64decode(encoded, validate=True).decode()
                user, sep, password = decoded.partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise PermissionError("malformed basic credentials") from None
            if not sep or server.users.get(user) != password:
                raise PermissionError("invalid username or password")
            return user

        def _refuse(
            self,
            user: str | None,
            service: str | None,
            scopes: tuple[str, ...],
            status: int,
            message: str,
        ) -> None:
            server._record(TokenRequest(user, service, scopes, (), status))
            extra = {"WWW-Authenticate": 'Basic realm="p2pull-test"'} if status == 401 else {}
            self._send_json(status, {"errors": [{"message": message}]}, extra)

        def _send_json(self, status: int, body: dict, headers: dict | None = None) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            """Silence the per-request stderr log; ``request_log`` records requests."""

    return TokenHandler

"""A real origin registry for integration tests, and ways to put artifacts into it.

The registry is CNCF Distribution 2.8 (Debian package ``docker-registry``), started as a
subprocess on 127.0.0.1 with its storage in a test's temporary directory. Content goes in
through two independent clients: the PyPI ``oras`` package (``oras_push``) and skopeo, which
copies an OCI image layout written by ``make_oci_layout`` (``skopeo_push_layout``).

Distribution answers 404 for an OCI manifest unless the request accepts the OCI media
types: send ``MANIFEST_ACCEPT``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from oras.client import OrasClient

from tests.support.tokenserver import TokenServer, fetch_token

REGISTRY_BINARY = "docker-registry"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])

MODEL_ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODEL_WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_MODEL_FILEPATH = "org.cncf.model.filepath"

_STOP_GRACE_SECONDS = 5.0
_PORT_ATTEMPTS = 3


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def registry_available() -> bool:
    """True if the ``docker-registry`` binary is on PATH."""
    return shutil.which(REGISTRY_BINARY) is not None


@dataclass
class Registry:
    """A running Distribution process serving ``url``, storing under ``root``.

    ``credentials`` are the basic-auth user and password of an htpasswd registry (None
    otherwise); ``token_server`` is the token issuer a token-auth registry trusts. ``log_path``
    receives the registry's stderr and stdout (warnings and the access log).
    """

    host: str
    root: Path
    workdir: Path
    log_path: Path
    process: subprocess.Popen = field(repr=False)
    credentials: tuple[str, str] | None = None
    token_server: TokenServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the registry's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after 5 s) and reap it. Idempotent."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=_STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _registry_config(
    port: int,
    storage: Path,
    htpasswd_path: Path | None,
    token: TokenServer | None,
) -> dict:
    config: dict = {
        "version": "0.1",
        "log": {"level": "warn"},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
    }
    if htpasswd_path is not None:
        config["auth"] = {"htpasswd": {"realm": "p2pull-test", "path": str(htpasswd_path)}}
    elif token is not None:
        config["auth"] = {
            "token": {
                "realm": token.realm,
                "service": token.service,
                "issuer": token.issuer,
                "rootcertbundle": str(token.cert_path),
            }
        }
    return config


def _write_htpasswd(path: Path, user: str, password: str) -> None:
    entry = subprocess.run(
        ["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True
    ).stdout
    path.write_text(entry)


def _wait_until_serving(registry: Registry, deadline: float) -> bool:
    """Poll GET /v2/ until it answers 200 or 401 (True) or the process exits (False).

    Raises TimeoutError at ``deadline`` (a ``time.monotonic()`` value).
    """
    while time.monotonic() < deadline:
        if registry.process.poll() is not None:
            return False
        try:
            response = httpx.get(f"{registry.url}/v2/", timeout=1.0)
        except httpx.TransportError:
            pass
        else:
            if response.status_code in (200, 401):
                return True
        time.sleep(0.02)
    raise TimeoutError


def start_registry(
    workdir: Path,
    *,
    htpasswd: tuple[str, str] | None = None,
    token: TokenServer | None = None,
    timeout: float = 10.0,
) -> Registry:
    """Start Distribution on a free 127.0.0.1 port, files under ``workdir``; return when it serves.

    ``htpasswd=(user, password)`` turns on basic auth (bcrypt htpasswd file); ``token`` (a
    started TokenServer) turns on bearer-token auth trusting that server. Deletes are enabled.
    Ready means GET /v2/ answered 200 or 401. Raises RuntimeError, with the log tail, if the
    process exits or is not ready within ``timeout`` seconds (it is stopped first).
    """
    if htpasswd is not None and token is not None:
        raise ValueError("choose htpasswd or token auth, not both")
    workdir = Path(workdir)
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    htpasswd_path = None
    if htpasswd is not None:
        htpasswd_path = workdir / "htpasswd"
        _write_htpasswd(htpasswd_path, *htpasswd)
    config_path = workdir / "config.yml"
    log_path = workdir / "registry.log"
    deadline = time.monotonic() + timeout
    for _ in range(_PORT_ATTEMPTS):
        port = free_port()
        # JSON is valid YAML, and needs no YAML library.
        config = _registry_config(port, storage, htpasswd_path, token)
        config_path.write_text(json.dumps(config, indent=2))
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        registry = Registry(
            host=f"127.0.0.1:{port}",
            root=storage,
            workdir=workdir,
            log_path=log_path,
            process=process,
            credentials=htpasswd,
            token_server=token,
        )
        try:
            if _wait_until_serving(registry, deadline):
                return registry
        except BaseException as exc:
            registry.stop()
            if isinstance(exc, TimeoutError):
                raise RuntimeError(
                    f"registry not ready within {timeout} s; log tail:\n{registry.log_tail()}"
                ) from None
            raise
        if "address already in use" not in registry.log_tail():
            break
    raise RuntimeError(
        f"registry exited with status {registry.process.returncode}; "
        f"log tail:\n{registry.log_tail()}"
    )


class _OrasClientWithArtifactType(OrasClient):
    """OrasClient whose pushed manifests carry ``artifactType`` (oras 0.2.43 push cannot)."""

    def __init__(self, artifact_type: str | None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.artifact_type = artifact_type

    def upload_manifest(self, manifest: dict, container):  # type: ignore[override]
        if self.artifact_type is not None:
            manifest = {**manifest, "artifactType": self.artifact_type}
        return super().upload_manifest(manifest, container)


def oras_push(
    registry: Registry,
    repo_tag: str,
    files: Mapping[str, bytes],
    workdir: Path,
    *,
    artifact_type: str | None = None,
    credentials: tuple[str, str] | None = None,
) -> str:
    """Push ``files`` ({file name: content}) as one artifact to ``registry``/``repo_tag``.

    Uses the PyPI ``oras`` client: one layer per file, in order, with
    ``org.opencontainers.image.title`` = file name and oras' default layer media type; an
    empty config. The files are first written to a fresh directory under ``workdir``.
    ``credentials`` default to the registry's htpasswd credentials; against a token-auth
    registry they go to the token server (None: anonymous token). Returns the manifest
    digest the registry reports.

    oras 0.2.43 keeps the first token it gets (pull-only, from its blob HEAD) and sends it
    with the upload too, which the registry refuses; so for a token-auth registry the client
    starts with a ``pull,push`` token for the repository.
    """
    staging = Path(workdir) / f"oras-push-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    paths = []
    for name, content in files.items():
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"oras_push takes plain file names, got {name!r}")
        path = staging / name
        path.write_bytes(content)
        paths.append(str(path))
    client = _OrasClientWithArtifactType(
        artifact_type,
        hostname=registry.host,
        insecure=True,
        auth_backend="token" if registry.token_server is not None else "basic",
    )
    credentials = credentials or registry.credentials
    if registry.token_server is not None:
        repo = client.get_container(f"{registry.host}/{repo_tag}").api_prefix
        client.auth.set_token_auth(
            fetch_token(
                registry.token_server, f"repository:{repo}:pull,push", credentials=credentials
            )
        )
    elif credentials is not None:
        client.auth.set_basic_auth(*credentials)
    response = client.push(
        target=f"{registry.host}/{repo_tag}",
        files=paths,
        disable_path_validation=True,
        quiet=True,
    )
    return response.headers["Docker-Content-Digest"]


def skopeo_push_layout(
    layout_dir: Path,
    registry: Registry,
    repo_tag: str,
    *,
    credentials: tuple[str, str] | None = None,
) -> str:
    """Copy the image tagged TAG in the OCI layout to ``registry``/REPO:TAG with skopeo.

    ``repo_tag`` is ``REPO:TAG``; the layout must hold TAG (``org.opencontainers.image.ref.name``).
    Digests are preserved (skopeo fails rather than rewrite the manifest). ``credentials``
    default to the registry's htpasswd credentials. Returns the pushed manifest digest.
    Raises RuntimeError with skopeo's stderr on failure.
    """
    repo, sep, tag = repo_tag.rpartition(":")
    if not sep or not repo or "/" in tag:
        raise ValueError(f"expected REPO:TAG, got {repo_tag!r}")
    with tempfile.TemporaryDirectory(prefix="skopeo-digest-") as digest_dir:
        digest_file = Path(digest_dir) / "digest"
        result = subprocess.run(
            _skopeo_copy_command(layout_dir, registry, repo, tag, digest_file, credentials),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"skopeo copy failed ({result.returncode}):\n{result.stderr}")
        return digest_file.read_text().strip()


def _skopeo_copy_command(
    layout_dir: Path,
    registry: Registry,
    repo: str,
    tag: str,
    digest_file: Path,
    credentials: tuple[str, str] | None,
) -> list[str]:
    command = [
        "skopeo",
        "--insecure-policy",
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        "--digestfile",
        str(digest_file),
    ]
    credentials = credentials or registry.credentials
    if credentials is not None:
        command += ["--dest-creds", ":".join(credentials)]
    command += [f"oci:{layout_dir}:{tag}", f"docker://{registry.host}/{repo}:{tag}"]
    return command


def _write_blob(blobs: Path, content: bytes | Path) -> tuple[str, int]:
    """Store ``content`` as blobs/sha256/<hex>; return (digest, size).

    A Path is hashed by streaming and hard-linked into the layout (copied if it is on
    another file system), so it must not change afterwards.
    """
    if isinstance(content, Path):
        with open(content, "rb") as source:
            hex_digest = hashlib.file_digest(source, "sha256").hexdigest()
        size = content.stat().st_size
    else:
        hex_digest = hashlib.sha256(content).hexdigest()
        size = len(content)
    target = blobs / hex_digest
    if not target.exists():
        partial = blobs / f".{hex_digest}.{secrets.token_hex(4)}.partial"
        if isinstance(content, Path):
            try:
                os.link(content, partial)
            except OSError:
                shutil.copyfile(content, partial)
        else:
            partial.write_bytes(content)
        partial.replace(target)
    return f"sha256:{hex_digest}", size


def _canonical_json(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def make_oci_layout(
    layout_dir: Path,
    files: Mapping[str, bytes | Path],
    *,
    tag: str = "latest",
    annotations: Mapping[str, str] | None = None,
    artifact_type: str | None = MODEL_ARTIFACT_TYPE,
) -> str:
    """Write a CNCF model artifact into the OCI image layout ``layout_dir``; return its digest.

    ``files`` maps a file path inside the model to its content (bytes, or a Path to an
    existing file, streamed and hard-linked rather than read into memory). The manifest has
    a small ``application/vnd.cncf.model.config.v1+json`` config and one
    ``application/vnd.cncf.model.weight.v1.raw`` layer per file, in order, annotated with
    ``org.opencontainers.image.title`` and ``org.cncf.model.filepath`` = the name.
    ``annotations`` become manifest annotations; ``artifact_type`` (None: omitted) the
    manifest's ``artifactType``. ``index.json`` refers to the manifest as ``tag``, replacing
    an earlier entry of that tag and keeping the others, so one layout can hold several tags.
    """
    layout_dir = Path(layout_dir)
    blobs = layout_dir / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    layers = []
    for name, content in files.items():
        if not name:
            raise ValueError("file names must not be empty")
        digest, size = _write_blob(blobs, content)
        layers.append(
            {
                "mediaType": MODEL_WEIGHT_RAW,
                "digest": digest,
                "size": size,
                "annotations": {ANNOTATION_TITLE: name, ANNOTATION_MODEL_FILEPATH: name},
            }
        )
    model_config = {
        "descriptor": {"name": tag},
        "config": {},
        "modelfs": {"type": "layers", "diffIds": [layer["digest"] for layer in layers]},
    }
    config_digest, config_size = _write_blob(blobs, _canonical_json(model_config))
    manifest: dict = {"schemaVersion": 2, "mediaType": OCI_MANIFEST}
    if artifact_type is not None:
        manifest["artifactType"] = artifact_type
    manifest["config"] = {"mediaType": MODEL_CONFIG, "digest": config_digest, "size": config_size}
    manifest["layers"] = layers
    if annotations:
        manifest["annotations"] = dict(annotations)
    manifest_digest, manifest_size = _write_blob(blobs, _canonical_json(manifest))

    (layout_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index_path = layout_dir / "index.json"
    index = (
        json.loads(index_path.read_text())
        if index_path.exists()
        else {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    )
    index["manifests"] = [
        entry
        for entry in index["manifests"]
        if entry.get("annotations", {}).get(ANNOTATION_REF_NAME) != tag
    ] + [
        {
            "mediaType": OCI_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {ANNOTATION_REF_NAME: tag},
        }
    ]
    index_path.write_text(json.dumps(index, indent=2))
    return manifest_digest

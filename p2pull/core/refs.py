"""Docker/OCI references: ``[registry[:port]/]repository[:tag][@algorithm:hex]``.

Parsed the way Docker parses them: the first path component is a registry when it holds a
``.`` or a ``:`` or is ``localhost``; otherwise the configured default registry applies, and
only on Docker Hub does a one-component repository get the ``library/`` prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from p2pull.errors import RefError

DOCKER_HUB = "docker.io"
#: Docker Hub's API lives on another host than its name
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?")
#: Docker's tag grammar; its \w is ASCII-only, so ours must be too
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
#: the distribution spec's limit on a repository name
MAX_NAME_LENGTH = 255


@dataclass(frozen=True)
class Ref:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def endpoint(self) -> str:
        """The host:port the distribution API is served on."""
        return DOCKER_HUB_ENDPOINT if self.registry == DOCKER_HUB else self.registry

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def with_digest(self, digest: str) -> "Ref":
        return Ref(self.registry, self.repository, self.tag, digest)


def parse_ref(text: str, default_registry: str = DOCKER_HUB) -> Ref:
    """Parse ``text``; raise RefError naming the part that is wrong."""
    original = text
    if not text or text != text.strip():
        raise RefError(f"empty or padded reference {original!r}")
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise RefError(f"bad digest {digest!r} in {original!r}: expected algorithm:hex, "
                           "such as sha256:<64 hex digits>")
        validate_digest(digest, context=original)
    tag = None
    last_slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > last_slash:
        text, tag = text[:colon], text[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise RefError(f"bad tag {tag!r} in {original!r}: a tag is up to 128 letters, "
                           "digits, '_', '.' or '-', not starting with '.' or '-'")
    parts = text.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"
                           or parts[0].startswith("[")):
        registry, path = parts[0], parts[1:]
        if not _DOMAIN.fullmatch(registry):
            raise RefError(f"bad registry {registry!r} in {original!r}")
        if ":" in registry and not registry.endswith("]"):
            port = int(registry.rsplit(":", 1)[1])
            if not 0 < port < 65536:
                raise RefError(f"bad port {port} in registry {registry!r}")
    else:
        registry, path = default_registry, parts
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    for component in path:
        if not _PATH_COMPONENT.fullmatch(component):
            raise RefError(f"bad repository component {component!r} in {original!r}: use "
                           "lowercase letters and digits separated by '.', '_', '__' or '-'")
    if registry == DOCKER_HUB and len(path) == 1:
        path = ["library", *path]
    repository = "/".join(path)
    if len(repository) > MAX_NAME_LENGTH:
        raise RefError(f"repository name in {original!r} is longer than {MAX_NAME_LENGTH}")
    return Ref(registry, repository, tag, digest)


def validate_digest(digest: str, context: str = "") -> str:
    """Only sha256 is accepted: it is what registries use and what we verify against."""
    algorithm, _, hex_part = digest.partition(":")
    where = f" in {context!r}" if context else ""
    if algorithm != "sha256":
        raise RefError(f"unsupported digest algorithm {algorithm!r}{where}; only sha256 is")
    if not _SHA256_HEX.fullmatch(hex_part):
        raise RefError(f"bad sha256 digest {digest!r}{where}: expected 64 lowercase hex digits")
    return digest

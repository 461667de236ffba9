"""Shared fixtures: real registries (CNCF Distribution) and bearer-token servers.

Fixtures that need the ``docker-registry`` binary skip the test when it is missing; the
rest of the suite runs without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.registry import Registry, registry_available, start_registry
from tests.support.tokenserver import TokenServer

REGISTRY_MISSING = "docker-registry not installed: run `make test`, which installs it"


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    """Call with ``start_registry`` keyword arguments to get a started Registry.

    Each registry gets its own directory under ``tmp_path``; all are stopped at teardown.
    Skips the test if ``docker-registry`` is not installed.
    """
    if not registry_available():
        pytest.skip(REGISTRY_MISSING)
    started: list[Registry] = []

    def start(**kwargs: object) -> Registry:
        registry = start_registry(tmp_path / f"registry-{len(started)}", **kwargs)
        started.append(registry)
        return registry

    yield start
    for registry in started:
        registry.stop()


@pytest.fixture
def registry(registry_factory: Callable[..., Registry]) -> Registry:
    """A started registry with no authentication."""
    return registry_factory()


@pytest.fixture
def token_server_factory(tmp_path: Path) -> Iterator[Callable[..., TokenServer]]:
    """Call with ``TokenServer`` keyword arguments to get a started TokenServer.

    Each server writes its certificate to its own directory under ``tmp_path``; all are
    stopped at teardown.
    """
    started: list[TokenServer] = []

    def start(**kwargs: object) -> TokenServer:
        server = TokenServer(tmp_path / f"token-server-{len(started)}", **kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()

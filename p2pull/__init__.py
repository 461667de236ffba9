"""p2pull: pull models and images from OCI registries onto every node of a cluster, each
byte verified, the origin serving each byte about once.

    import p2pull
    result = p2pull.get("registry.example.com/models/llama:v1", output="models/llama")

``get`` runs its own event loop; under trio, ``await p2pull.aget(...)`` instead.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from p2pull.errors import P2pullError

if TYPE_CHECKING:
    from p2pull.client import GetResult, gc, ls, rm
    from p2pull.client import get as aget
    from p2pull.client import get_sync as get

__all__ = ["get", "aget", "ls", "rm", "gc", "GetResult", "P2pullError"]

#: the public API's names in p2pull.client, imported on first use: ``import p2pull.core``
#: (the simulator, the pure layers) must not load trio, httpx and the I/O edges
_CLIENT_NAMES = {"get": "get_sync", "aget": "get", "ls": "ls", "rm": "rm", "gc": "gc",
                 "GetResult": "GetResult"}


def __getattr__(name: str):
    if name not in _CLIENT_NAMES:
        raise AttributeError(f"module 'p2pull' has no attribute {name!r}")
    value = getattr(importlib.import_module("p2pull.client"), _CLIENT_NAMES[name])
    globals()[name] = value
    return value

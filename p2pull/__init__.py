"""p2pull: pull models and images from OCI registries onto every node of a cluster, each
byte verified, the origin serving each byte about once.

    import p2pull
    result = p2pull.get("registry.example.com/models/llama:v1", output="models/llama")

``get`` runs its own event loop; under trio, ``await p2pull.aget(...)`` instead.
"""

from p2pull.client import GetResult, gc, ls, rm
from p2pull.client import get as aget
from p2pull.client import get_sync as get
from p2pull.errors import P2pullError

__all__ = ["get", "aget", "ls", "rm", "gc", "GetResult", "P2pullError"]

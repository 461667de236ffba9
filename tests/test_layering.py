"""DESIGN.md's layering rule: ``p2pull/core`` and ``p2pull/wire`` are pure (no I/O, no trio)
and import no sibling package except the floors below them."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "p2pull"

#: libraries that do I/O or concurrency: the pure layers must not touch them
FORBIDDEN_TOP_LEVEL = {"trio", "httpx", "httpcore", "socket", "asyncio", "zeroconf",
                       "subprocess", "threading"}
#: the p2pull packages each pure layer may import
ALLOWED_P2PULL = {
    "core": {"p2pull.core", "p2pull.errors"},
    "wire": {"p2pull.core", "p2pull.errors", "p2pull.wire"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, including the names a
    ``from X import name`` may bring in as submodules, and literal dynamic imports."""
    names: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                if node.level - 1 > len(package) - 1:
                    names.append((node.lineno, "<relative import beyond the top package>"))
                    continue
                base_parts = package[:len(package) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base != "p2pull":  # ``from p2pull import errors`` names p2pull.errors
                names.append((node.lineno, base))
            names.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names
                         if alias.name != "*")
        elif isinstance(node, ast.Call):
            func = node.func
            called = (func.id if isinstance(func, ast.Name) else
                      func.attr if isinstance(func, ast.Attribute) else None)
            if called in ("__import__", "import_module") and node.args and \
                    isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.append((node.lineno, node.args[0].value))
    return names


def violations(source: str, module: str, layer: str, is_package: bool = False) -> list[str]:
    found = []
    allowed = ALLOWED_P2PULL[layer]
    for line, name in imported_names(source, module, is_package):
        top = name.split(".")[0]
        if name.startswith("<"):
            found.append(f"{module}:{line} {name}")
        elif top in FORBIDDEN_TOP_LEVEL:
            found.append(f"{module}:{line} imports {name}")
        elif top == "p2pull":
            parts = name.split(".")
            package = ".".join(parts[:2])
            # bare ``import p2pull`` would reach the package's re-exports, from any floor
            if len(parts) == 1 or package not in allowed:
                found.append(f"{module}:{line} imports {name}")
    return found


def layer_files(layer: str) -> list[Path]:
    folder = PACKAGE / layer
    return sorted(folder.rglob("*.py")) if folder.is_dir() else []


def test_core_exists_and_has_modules():
    names = {path.stem for path in layer_files("core")}
    assert {"refs", "chunks", "bitmap", "policy"} <= names


@pytest.mark.parametrize("layer", sorted(ALLOWED_P2PULL))
def test_pure_layers_import_no_io(layer):
    files = layer_files(layer)
    if not files:
        pytest.skip(f"p2pull/{layer} does not exist yet")
    found = []
    for path in files:
        found += violations(path.read_text(), module_name(path), layer,
                            is_package=path.name == "__init__.py")
    assert found == [], "DESIGN.md: core and wire are pure; move I/O to an edge:\n" + \
        "\n".join(found)


RUNTIME_PROBE = """
import importlib, json, sys
before = set(sys.modules)
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_importing_the_pure_layers_loads_no_io():
    """What the source says is not all: importing ``p2pull.core.x`` runs ``p2pull/__init__``
    first, so the package itself must not pull in the I/O edges (the simulator imports
    p2pull.core only)."""
    modules = [module_name(path) for layer in ALLOWED_P2PULL for path in layer_files(layer)]
    out = subprocess.run([sys.executable, "-c", RUNTIME_PROBE, *modules], check=True,
                         capture_output=True, text=True, cwd=PACKAGE.parent,
                         env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)}).stdout
    loaded = json.loads(out)
    allowed = set().union(*ALLOWED_P2PULL.values())
    bad = [name for name in loaded
           if name.split(".")[0] in FORBIDDEN_TOP_LEVEL
           or (name.startswith("p2pull.") and ".".join(name.split(".")[:2]) not in allowed)]
    assert bad == []


# -- the checker itself ---------------------------------------------------------------------


@pytest.mark.parametrize("source", [
    "import trio",
    "import trio.lowlevel",
    "from trio import sleep",
    "import httpx as h",
    "import httpcore",
    "import socket",
    "from asyncio import run",
    "import zeroconf",
    "import subprocess",
    "from threading import Thread",
    "import p2pull.store.cas",
    "from p2pull.origin import client",
    "from p2pull import store",
    "from p2pull import get",
    "import p2pull",
    "from p2pull.net.fetch import BlobSession",
    "from ..store import cas",
    "from .. import origin",
    "from ...x import y",
    "import importlib\nimportlib.import_module('trio')",
    "__import__('socket')",
    "def f():\n    import trio",
])
def test_checker_finds_violations(source):
    assert violations(source, "p2pull.core.thing", "core")


@pytest.mark.parametrize("source", [
    "import random, hashlib, dataclasses, re",
    "from p2pull.errors import RefError",
    "from p2pull import errors",
    "from p2pull.core.chunks import ChunkPlan",
    "from p2pull.core import bitmap",
    "from . import chunks",
    "from .bitmap import Bitmap",
    "from ..errors import ProtocolError",
    "import p2pull.core.refs",
])
def test_checker_allows_pure_imports(source):
    assert violations(source, "p2pull.core.thing", "core") == []


def test_wire_may_import_itself_and_core_but_core_not_wire():
    assert violations("from p2pull.wire import frames", "p2pull.wire.codec", "wire") == []
    assert violations("from .frames import Frame", "p2pull.wire.codec", "wire") == []
    assert violations("from p2pull.core.bitmap import Bitmap", "p2pull.wire.codec",
                      "wire") == []
    assert violations("from p2pull.wire import frames", "p2pull.core.swarm", "core")
    assert violations("from ..net import peer", "p2pull.wire.codec", "wire")


def test_relative_imports_in_a_package_init():
    assert violations("from . import refs", "p2pull.core", "core", is_package=True) == []
    assert violations("from .. import store", "p2pull.core", "core", is_package=True)

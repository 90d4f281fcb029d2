"""The shape of the code (issue 15, STYLE.md), checked on the source with ``ast``: each test
guards one class of violation, so reintroducing it fails here with the offending line.

- packages of the coordinator import each other in one direction only (the table below);
- no module imports another package's private ``_module``;
- the service builds no infrastructure and is composed, not inherited (no ``super()``, no
  results smuggled out of callbacks through ``nonlocal``), and checks no capability at run
  time (``isinstance`` against a protocol);
- the store composes repositories (no mixins) and decides nothing about notifications;
- grpc/ only converts: proto conversion lives in ``coordinator/grpc/convert/``;
- no module is over 800 lines; no test module imports another test module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What each package of the coordinator may import of the others (besides itself). Anything
# not listed is a layering break: e.g. service -> dispatch (the service building
# DispatchControl) or store -> grpc.
ALLOWED: dict[str, set[str]] = {
    "model": set(),
    "errors": set(),
    "config": {"errors"},
    "cron": {"errors"},
    "schemas": {"errors"},
    "signing": set(),
    "sealing": set(),
    "oidc": {"errors"},
    "logs": set(),
    "breakers": {"model"},
    "engine": {"model", "errors"},
    "notify": {"model", "errors", "engine", "breakers", "signing"},
    "service": {"model", "errors", "engine", "cron", "schemas", "signing", "notify"},
    "dispatch": {"model", "errors", "engine", "breakers", "service"},
    "store": {"model", "errors", "service", "sealing"},
    "grpc": {
        "model",
        "errors",
        "engine",
        "config",
        "signing",
        "service",
        "dispatch",
        "notify",
        "store",
        "oidc",
    },
}


def _sources(folder: str) -> Iterator[tuple[str, ast.Module]]:
    for path in sorted((ROOT / folder).rglob("*.py")):
        if "migrations" in path.parts or path.parts[-3:-1] == ("trellis", "v1"):
            continue
        yield str(path.relative_to(ROOT)), ast.parse(path.read_text())


def _package(path: str) -> str:
    parts = Path(path).with_suffix("").parts  # coordinator/<package>[/...]
    return parts[1]


def _imports(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Every module an import names (``from a import b`` also yields ``a.b``: b may be a
    module), with its line."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def _coordinator_imports() -> Iterator[tuple[str, int, str]]:
    for path, tree in _sources("coordinator"):
        for line, name in _imports(tree):
            if name.startswith("coordinator."):
                yield path, line, name


def test_packages_import_each_other_in_one_direction() -> None:
    bad = []
    for path, line, name in _coordinator_imports():
        own, other = _package(path), name.split(".")[1]
        if other == own or other in ALLOWED.get(own, set()):
            continue
        bad.append(f"{path}:{line}: {name} ({own} may not import {other})")
    assert bad == []


def test_the_allowed_imports_have_no_cycle() -> None:
    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in ALLOWED.get(start, set()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    assert [p for p in ALLOWED if reaches(p, p, {p})] == []


def test_no_module_imports_another_packages_private_module() -> None:
    bad = []
    for path, line, name in _coordinator_imports():
        parts = name.split(".")
        own_prefix = list(Path(path).with_suffix("").parts[:2])
        private = [i for i, p in enumerate(parts) if p.startswith("_") and not p.startswith("__")]
        if private and parts[:2] != own_prefix:
            bad.append(f"{path}:{line}: {name}")
    assert bad == []


def test_the_service_never_constructs_infrastructure() -> None:
    # No dispatch, store, grpc or Redis client is named (let alone built) in the service;
    # the composition root gets them passed in.
    forbidden = {"DispatchControl", "RedisLink", "SqlStore", "MemoryStore", "open_store"}
    bad = [
        f"{path}:{node.lineno}: {node.id}"
        for path, tree in _sources("coordinator/service")
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and node.id in forbidden
    ]
    assert bad == []


def test_use_cases_are_composed_not_inherited() -> None:
    """No service class extends another service class, calls ``super()``, or passes results
    out of a callback through ``nonlocal``."""
    classes = {
        node.name
        for _, tree in _sources("coordinator/service")
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
    }
    bad = []
    for path, tree in _sources("coordinator/service"):
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
                if bases & classes:
                    bad.append(f"{path}:{node.lineno}: {node.name}({', '.join(bases)})")
            elif isinstance(node, ast.Nonlocal):
                bad.append(f"{path}:{node.lineno}: nonlocal {', '.join(node.names)}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "super"
            ):
                bad.append(f"{path}:{node.lineno}: super()")
    assert bad == []


def test_no_capability_is_checked_at_run_time() -> None:
    # Use cases depend on the narrow protocol they need; nothing asks a store what it is.
    bad = []
    for path, tree in _sources("coordinator"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "runtime_checkable":
                bad.append(f"{path}:{node.lineno}: runtime_checkable")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in {"isinstance", "getattr", "hasattr"}
                and len(node.args) >= 2
                and isinstance(node.args[0], ast.Name)
                and node.args[0].id == "store"
            ):
                bad.append(f"{path}:{node.lineno}: {node.func.id}(store, ...)")
    assert bad == []


def test_the_store_composes_repositories() -> None:
    """No store class extends a class of another store module (no mixins), and no module
    re-declares another's methods for the type checker."""
    defined: dict[str, str] = {}
    trees = list(_sources("coordinator/store"))
    for path, tree in trees:
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                defined[node.name] = path
    bad = []
    for path, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for base in node.bases:
                    name = base.id if isinstance(base, ast.Name) else None
                    if name in defined and defined[name] != path:
                        bad.append(f"{path}:{node.lineno}: {node.name}({name})")
                if node.name.endswith("Mixin"):
                    bad.append(f"{path}:{node.lineno}: {node.name}")
            if (
                isinstance(node, ast.If)
                and isinstance(node.test, ast.Name)
                and node.test.id == "TYPE_CHECKING"
            ):
                bad.extend(
                    f"{path}:{inner.lineno}: def {inner.name} under TYPE_CHECKING"
                    for inner in ast.walk(node)
                    if isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef)
                )
    assert bad == []


def test_the_store_decides_no_notifications() -> None:
    # Which deliveries an ending execution queues is decided above the store and carried
    # in Transition.deliveries; the store only inserts them.
    decisions = {"deliveries_for", "with_deliveries", "notification_document", "RuleBook"}
    bad = [
        f"{path}:{node.lineno}: {node.id}"
        for folder in ("coordinator/store",)
        for path, tree in _sources(folder)
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and node.id in decisions
    ]
    bad += [
        f"{path}:{line}: {name}"
        for path, line, name in _coordinator_imports()
        if path.startswith("coordinator/store/") and name.split(".")[-1] in decisions
    ]
    assert bad == []


def test_grpc_conversion_lives_in_the_convert_package() -> None:
    bad = []
    for path, tree in _sources("coordinator/grpc"):
        if path.startswith("coordinator/grpc/convert/"):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (
                node.name.endswith(("_to_proto", "_from_proto"))
            ):
                bad.append(f"{path}:{node.lineno}: {node.name}")
    assert bad == []


def test_servicers_reach_no_store_and_no_dispatch_internals() -> None:
    # Servicers decode, call the service, encode; wiring lives in server.py only.
    bad = [
        f"{path}:{line}: {name}"
        for path, line, name in _coordinator_imports()
        if path.startswith("coordinator/grpc/")
        and path != "coordinator/grpc/server.py"
        and name.split(".")[1] in {"store", "dispatch"}
    ]
    assert bad == []


@pytest.mark.parametrize("folder", ["coordinator", "worker_sdk", "gateway", "trellis"])
def test_no_module_is_over_800_lines(folder: str) -> None:
    long = [
        f"{path}: {len((ROOT / path).read_text().splitlines())} lines"
        for path, _ in _sources(folder)
        if len((ROOT / path).read_text().splitlines()) > 800
    ]
    assert long == []


def test_no_test_module_imports_another_test_module() -> None:
    bad = []
    for path, tree in _sources("tests"):
        for line, name in _imports(tree):
            if name.startswith("tests.") and any(
                part.startswith("test_") for part in name.split(".")[1:]
            ):
                bad.append(f"{path}:{line}: {name}")
    assert bad == []

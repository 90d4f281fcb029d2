"""Imports point one way (STYLE.md): checked on the source, so a stray import fails here."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

from tests.support.imports import imported_modules

ROOT = Path(__file__).resolve().parents[2]
STDLIB = sys.stdlib_module_names


def offenders(package: str, allowed: tuple[str, ...], stdlib: bool = True) -> list[str]:
    bad = []
    for path, names in imported_modules(package).items():
        for name in names:
            top = name.split(".")[0]
            if stdlib and top in STDLIB:
                continue
            if not any(name == a or name.startswith(a + ".") for a in allowed):
                bad.append(f"{path}: {name}")
    return bad


def test_engine_model_errors_import_only_the_standard_library() -> None:
    # ... and the CEL library, for expressions (STYLE.md).
    allowed = ("coordinator.model", "coordinator.errors", "coordinator.engine", "cel_expr_python")
    assert offenders("coordinator/engine", allowed) == []
    assert offenders("coordinator/model", ("coordinator.model",)) == []
    names = imported_modules("coordinator")["coordinator/errors.py"]
    assert {n for n in names if n.split(".")[0] not in STDLIB} == set()


def test_dispatch_and_notify_share_breakers_without_importing_each_other() -> None:
    # The breaker primitive is coordinator.breakers; neither reaches into another
    # package's private modules.
    for package, other in (("dispatch", "notify"), ("notify", "dispatch")):
        for path, names in imported_modules(f"coordinator/{package}").items():
            for name in names:
                parts = name.split(".")
                assert parts[:2] != ["coordinator", other], f"{path}: {name}"
                private = any(p.startswith("_") for p in parts[2:])
                assert not (private and parts[:2] != ["coordinator", package]), f"{path}: {name}"


def test_service_imports_neither_grpc_nor_sqlalchemy() -> None:
    allowed = ("coordinator",)
    assert offenders("coordinator/service", allowed) == []


def test_only_the_store_imports_sqlalchemy() -> None:
    for path, names in imported_modules("coordinator").items():
        if path.startswith("coordinator/store/"):
            continue
        assert not {n for n in names if n.split(".")[0] in {"sqlalchemy", "alembic"}}, path


# ``from <package> import <module>``: the modules the memory store may take that way.
_FROM_PACKAGES = {"coordinator": {"errors"}, "coordinator.store": {"_rows"}}


def test_the_memory_store_shares_only_the_pure_row_conversion_of_the_sql_store() -> None:
    # It converts rows through coordinator.store._rows (which imports no SQLAlchemy), and
    # takes nothing else of the SQL store: the two meet at the service's ports only.
    own = ("coordinator.model", "coordinator.errors", "coordinator.service.ports")
    own += ("coordinator.store._memory",)
    for path, names in imported_modules("coordinator/store/_memory").items():
        for name in names - set(_FROM_PACKAGES):
            top = name.split(".")[0]
            assert top in STDLIB or any(name == a or name.startswith(a + ".") for a in own), (
                f"{path}: {name}"
            )
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in _FROM_PACKAGES:
                names_taken = {alias.name for alias in node.names}
                assert names_taken <= _FROM_PACKAGES[node.module], f"{path}: {names_taken}"
    rows = imported_modules("coordinator/store")["coordinator/store/_rows.py"]
    assert {n for n in rows if n.split(".")[0] not in STDLIB} == {"coordinator.model"}


def test_worker_sdk_never_imports_the_coordinator() -> None:
    allowed = ("grpc", "google.protobuf", "trellis.v1", "worker_sdk", "yaml")
    assert offenders("worker_sdk", allowed) == []


def test_base_install_is_grpcio_and_protobuf_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = sorted(d.split(">")[0].split("=")[0].split("<")[0] for d in project["dependencies"])
    assert names == ["grpcio", "protobuf"]
    assert project["scripts"]["trellis"] == "trellis.cli:main"


def test_gateway_talks_to_the_coordinator_over_grpc_only() -> None:
    # worker_sdk: the SDK's channel (TLS and the gateway's credential), gRPC too. h11:
    # uvicorn's HTTP/1.1 parser, whose connection states the slow-client guard reads.
    allowed = (
        "grpc",
        "grpc_health",
        "h11",
        "starlette",
        "uvicorn",
        "gateway",
        "trellis.v1",
        "worker_sdk",
    )
    assert offenders("gateway", allowed) == []

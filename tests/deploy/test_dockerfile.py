"""The Dockerfile, checked as text.

There is no Docker engine where the tests run, so the image cannot be built here: these tests
read the Dockerfile (and .dockerignore) and pin what the chart and the operators rely on — a
multi-stage build whose final stage carries no build tools, a fixed non-root user, ``trellis``
as the entry point, the ports and the listen address.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from coordinator.config import CoordinatorConfig
from gateway.config import GatewayConfig
from tests.deploy import _dockerfile

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|build-essential|python3?-dev|libpq-dev|hatchling|"
    r"pip\s+wheel|python\s+-m\s+build|apt-get|apk\s+add)\b"
)


def test_build_is_multi_stage_and_copies_only_the_virtualenv() -> None:
    stages = _dockerfile.stages()
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    for stage in (build, final):
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", _dockerfile.resolved_base(stage))
    # The first stage builds the wheel and installs it with the server extras into a venv.
    build_steps = " ".join(build.args("RUN"))
    assert re.search(r"pip wheel|python -m build", build_steps), build_steps
    assert "[coordinator,gateway]" in build_steps
    assert "venv" in build_steps
    # The final stage takes the installed venv from it, nothing else.
    copies = final.args("COPY")
    assert copies
    assert all(c.startswith(f"--from={build.name} ") for c in copies), copies


def test_final_stage_has_no_build_tools() -> None:
    final = _dockerfile.stages()[-1]
    for keyword, rest in final.instructions:
        assert not BUILD_TOOLS.search(rest), f"{keyword} {rest}"


def test_runs_as_a_fixed_non_root_user() -> None:
    final = _dockerfile.stages()[-1]
    (user,) = final.args("USER")
    uid, _, gid = user.partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, user
    assert gid.isdigit() and int(gid) != 0, user
    # The chart's defaults match the image's user.
    values = yaml.safe_load((ROOT / "deploy/helm/trellis/values.yaml").read_text())
    assert values["securityContext"]["runAsUser"] == int(uid)
    assert values["securityContext"]["fsGroup"] == int(gid)
    # USER must come after every RUN, or a later step would run as root in the image.
    keywords = [kw for kw, _ in final.instructions]
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")


def test_trellis_is_the_entry_point_and_serves_the_coordinator_by_default() -> None:
    final = _dockerfile.stages()[-1]
    assert final.exec_form("ENTRYPOINT") == ["trellis"]
    assert final.exec_form("CMD") == ["coordinator", "serve"]
    exposed = {p for rest in final.args("EXPOSE") for p in rest.split()}
    assert {"7400", "8080"} <= exposed
    env = final.env()
    assert env["TRELLIS_LISTEN"] == "0.0.0.0:7400"
    assert env["TRELLIS_GATEWAY_LISTEN"] == "0.0.0.0:8080"
    # Every process of the image starts with these: each must accept the other's.
    trellis_env = {k: v for k, v in env.items() if k.startswith("TRELLIS_")}
    CoordinatorConfig.from_env(trellis_env)
    GatewayConfig.from_env(trellis_env)


def test_dockerignore_admits_exactly_what_the_wheel_is_built_from() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # An allowlist: everything is excluded first, so .git, .venv and local files never leak in.
    assert lines[0] == "*"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    packages = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert {"pyproject.toml", PYPROJECT["project"]["readme"], *packages} <= admitted


def test_the_extras_the_image_installs_exist() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    build_steps = " ".join(_dockerfile.stages()[0].args("RUN"))
    (requested,) = re.findall(r"\[([a-z,]+)\]", build_steps)
    assert set(requested.split(",")) <= extras.keys()

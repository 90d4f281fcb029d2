"""A small reader for the repository's Dockerfile: its stages and their instructions.

The image cannot be built in the test environment (no Docker engine), so tests read the
Dockerfile as text: line continuations joined, comments dropped, one list of
``(INSTRUCTION, arguments)`` per ``FROM``.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]]

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        """ENV KEY=VALUE pairs, later ones winning (the KEY VALUE form is not used)."""
        found: dict[str, str] = {}
        for rest in self.args("ENV"):
            for word in shlex.split(rest):
                key, sep, value = word.partition("=")
                assert sep, f"ENV {rest!r}: use the KEY=VALUE form"
                found[key] = value
        return found

    def exec_form(self, keyword: str) -> list[str]:
        """The JSON (exec) form of the last ENTRYPOINT or CMD."""
        raw = self.args(keyword)[-1]
        parsed = json.loads(raw)
        assert isinstance(parsed, list), f"{keyword} {raw} is not in exec (JSON) form"
        return [str(p) for p in parsed]


def instructions(text: str) -> list[tuple[str, str]]:
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].strip() + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    if pending:
        logical.append(pending.strip())
    result = []
    for item in logical:
        keyword, _, rest = item.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def stages(path: Path = DOCKERFILE) -> list[Stage]:
    found: list[Stage] = []
    for keyword, rest in instructions(path.read_text()):
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            found.append(Stage(base=words[0], name=name, instructions=[]))
        elif found:
            found[-1].instructions.append((keyword, rest))
    return found


def global_args(path: Path = DOCKERFILE) -> dict[str, str]:
    """ARG defaults declared before the first FROM (they parameterize FROM lines)."""
    found: dict[str, str] = {}
    for keyword, rest in instructions(path.read_text()):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            key, _, value = rest.partition("=")
            found[key] = value
    return found


def resolved_base(stage: Stage, path: Path = DOCKERFILE) -> str:
    base = stage.base
    for key, value in global_args(path).items():
        base = base.replace("${" + key + "}", value).replace("$" + key, value)
    return base

"""Templates of notification texts: ``{placeholder}`` fields filled from the notification.

Only plain field names from a fixed set are allowed (no attribute access, indexing, format
specs or conversions), so a template can neither fail at delivery time nor reach anything
but the notification's values. ``{{`` and ``}}`` stand for literal braces.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Collection, Mapping
from typing import Any

from coordinator.errors import InvalidArgument

# Every placeholder a template may use, and what it stands for.
PLACEHOLDERS: Mapping[str, str] = {
    "execution_id": "the execution's id",
    "workflow_name": "the workflow's name",
    "workflow_version": "the workflow's version",
    "status": "the execution's final status (SUCCEEDED, FAILED, TIMED_OUT, CANCELLED)",
    "error_type": "the error's type (empty when it succeeded)",
    "error_message": "the error's message (empty when it succeeded)",
    "error_node": "the node the error came from (empty when none)",
    "output_size": "the output's size in bytes",
    "created_at": "when the execution was created (ISO 8601)",
    "ended_at": "when the execution ended (ISO 8601)",
    "to": "the recipient (SMS templates only)",
}
ALL_FIELDS = frozenset(PLACEHOLDERS)
WITHOUT_RECIPIENT = ALL_FIELDS - {"to"}

_FORMATTER = string.Formatter()


def placeholders_in(field: str, template: str) -> list[str]:
    """The placeholder names of ``template``; ``InvalidArgument`` naming ``field`` when it is
    malformed or uses anything but a plain name."""
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise InvalidArgument(
            f"{field}: malformed template ({exc}); write placeholders as {{name}} and "
            "literal braces as {{{{ and }}}}"
        ) from exc
    names = []
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion or not name.isidentifier():
            raise InvalidArgument(
                f"{field}: placeholder {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} is not allowed; use a plain {{name}}"
            )
        names.append(name)
    return names


def check_template(field: str, template: str, allowed: Collection[str] = ALL_FIELDS) -> None:
    """Refuse a template with an unknown placeholder, naming the field and the known ones."""
    for name in placeholders_in(field, template):
        if name not in allowed:
            known = ", ".join(f"{{{n}}}" for n in sorted(allowed))
            raise InvalidArgument(f"{field}: unknown placeholder {{{name}}}; known: {known}")


def render(
    template: str, values: Mapping[str, str], escape: Callable[[str], str] = lambda s: s
) -> str:
    """``template`` with each placeholder replaced by ``escape(values[name])``.

    The template must have passed ``check_template``; a name missing from ``values``
    renders as an empty string.
    """
    out = []
    for literal, name, _spec, _conversion in _FORMATTER.parse(template):
        out.append(literal)
        if name is not None:
            out.append(escape(values.get(name, "")))
    return "".join(out)


def template_values(notification: Mapping[str, Any], **extra: str) -> dict[str, str]:
    """The placeholder values of a notification document (see ``notification_document``)."""
    error = notification.get("error") or {}
    values = {
        "execution_id": str(notification.get("execution_id", "")),
        "workflow_name": str(notification.get("workflow_name", "")),
        "workflow_version": str(notification.get("workflow_version", "")),
        "status": str(notification.get("status", "")),
        "error_type": str(error.get("type") or ""),
        "error_message": str(error.get("message") or ""),
        "error_node": str(error.get("node_id") or ""),
        "output_size": str(notification.get("output_size", 0)),
        "created_at": str(notification.get("created_at") or ""),
        "ended_at": str(notification.get("ended_at") or ""),
    }
    values.update(extra)
    return values

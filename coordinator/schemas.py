"""JSON Schemas of execution inputs and node outputs (the one importer of jsonschema,
referencing and regex).

A workflow may carry an ``input_schema`` and each task or map node an ``output_schema``:
JSON Schema documents, draft 2020-12 unless their ``$schema`` names another supported draft
(``DRAFTS``). ``check_schema`` vets one at registration; ``violation`` checks a document
against one and says, with the JSON Pointer of the failing place, why it does not match.

Hostile schemas and documents are bounded:

- a schema is at most ``MAX_SCHEMA_BYTES`` (its canonical JSON text);
- ``$ref`` resolves only inside the schema itself (or to the meta-schemas that ship with
  the library): the registry refuses to retrieve anything, so a remote reference is refused
  at registration and never fetched;
- one check runs within ``CHECK_BUDGET`` seconds (the checks of one batch of starts share
  a budget too, ``shared_budget``): ``pattern`` and ``patternProperties`` are
  matched with the ``regex`` module under a timeout (Python's ``re`` cannot be stopped once
  it backtracks catastrophically), every keyword looks at the clock before it runs, and
  ``uniqueItems`` is linear (the library's is quadratic on objects). A check over the
  budget refuses the document, saying so;
- formats are asserted (``"format": "email"`` fails a value without "@").

Validators are compiled once per schema text (definitions are immutable) and cached.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from itertools import islice
from typing import Any

import regex
from jsonschema import (
    Draft4Validator,
    Draft6Validator,
    Draft7Validator,
    Draft201909Validator,
    Draft202012Validator,
    validators,
)
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from jsonschema.protocols import Validator
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource, Unresolvable

from coordinator.errors import InvalidArgument

MAX_SCHEMA_BYTES = 64 * 1024
# Longest one document is checked against one schema, in seconds (the service runs checks
# in worker threads, so the event loop goes on meanwhile).
CHECK_BUDGET = 0.25
# Longest part of a validator's message quoted back (it may repeat the whole value).
MAX_MESSAGE = 300
# Errors looked at to choose the one reported.
_ERRORS_CONSIDERED = 16

_BASES: tuple[type[Validator], ...] = (
    Draft202012Validator,
    Draft201909Validator,
    Draft7Validator,
    Draft6Validator,
    Draft4Validator,
)


def _dialect(uri: str) -> str:
    return uri.rstrip("#").replace("https://", "http://", 1)


class SchemaTooSlow(TimeoutError):
    """A check went over its budget (raised by ``violation`` only when asked to)."""


_deadline: ContextVar[float] = ContextVar("schema_deadline", default=math.inf)


def _on_time() -> float:
    """Seconds left of the running check's budget (raises when none are)."""
    left = _deadline.get() - time.monotonic()
    if left <= 0:
        raise SchemaTooSlow
    return left


@lru_cache(maxsize=1024)
def _pattern(text: str) -> Any:
    return regex.compile(text)


def _search(pattern: str, text: str) -> bool:
    try:
        compiled = _pattern(pattern)
    except regex.error as exc:
        raise ValidationError(f"pattern {pattern!r} cannot be compiled: {exc}") from None
    try:
        # concurrent: the match lets go of the GIL (checks run in worker threads).
        return compiled.search(text, timeout=_on_time(), concurrent=True) is not None
    except TimeoutError:
        raise SchemaTooSlow from None


def _pattern_keyword(
    validator: Any, pattern: str, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{_short(instance)} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _hashable(value: Any) -> Any:
    """A key equal for JSON-equal values (1 == 1.0, True != 1, objects by content)."""
    kind = type(value)
    if kind is str:
        return value  # strings stand for themselves; every other kind is a tuple
    if kind is bool or value is None:
        return ("b", value)
    if kind is int:
        return ("n", value)
    if kind is float:
        return ("n", int(value) if math.isfinite(value) and value.is_integer() else value)
    if kind is list:
        return ("a", *map(_hashable, value))
    if kind is dict:
        return ("o", frozenset([(k, _hashable(v)) for k, v in value.items()]))
    return ("?", repr(value))


def _unique_items(
    validator: Any, unique: bool, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[Any] = set()
    for index, item in enumerate(instance):
        if index % 1024 == 0:
            _on_time()
        key = _hashable(item)
        if key in seen:
            yield ValidationError(f"has non-unique elements (item {index} repeats an earlier one)")
            return
        seen.add(key)


Keyword = Callable[[Any, Any, Any, Any], Any]


def _timed(keyword: Keyword) -> Keyword:
    def timed(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        _on_time()
        return keyword(validator, value, instance, schema)

    return timed


def _bounded(base: type[Validator]) -> type[Validator]:
    """``base`` with every keyword on the clock and the hostile ones replaced."""
    keywords: dict[str, Keyword] = {k: _timed(v) for k, v in base.VALIDATORS.items()}
    if "pattern" in keywords:
        keywords["pattern"] = _timed(_pattern_keyword)
    if "patternProperties" in keywords:
        keywords["patternProperties"] = _timed(_pattern_properties)
    if "uniqueItems" in keywords:
        keywords["uniqueItems"] = _timed(_unique_items)
    cls: type[Validator] = validators.extend(base, keywords)  # type: ignore[no-untyped-call]
    return cls


# The supported drafts, by the URI of their meta-schema (http or https, with or without "#").
DRAFTS: dict[str, tuple[type[Validator], type[Validator]]] = {
    _dialect(base.META_SCHEMA.get("$id") or base.META_SCHEMA["id"]): (base, _bounded(base))
    for base in _BASES
}


def _refuse(uri: str) -> Resource[Any]:
    """The registry's retrieval: nothing outside the schema is ever fetched."""
    raise NoSuchResource(ref=uri)  # type: ignore[call-arg]


# The meta-schemas are added by the validators (the library's own copies, no network).
_REGISTRY: Registry[Any] = Registry(retrieve=_refuse)  # type: ignore[call-arg]


def canonical(doc: dict[str, Any]) -> bytes:
    """A schema's stored form: compact JSON with sorted keys."""
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _parse(schema: bytes, where: str) -> dict[str, Any]:
    if len(schema) > MAX_SCHEMA_BYTES:
        raise InvalidArgument(
            f"{where} is {len(schema)} bytes, over the {MAX_SCHEMA_BYTES}-byte limit; "
            "move shared parts into $defs and reference them"
        )
    try:
        doc = json.loads(schema)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{where} must be a JSON object (a JSON Schema)")
    return doc


def _classes(doc: dict[str, Any], where: str) -> tuple[type[Validator], type[Validator]]:
    dialect = doc.get("$schema")
    if dialect is None:
        return DRAFTS[_dialect(Draft202012Validator.META_SCHEMA["$id"])]
    found = DRAFTS.get(_dialect(dialect)) if isinstance(dialect, str) else None
    if found is None:
        known = ", ".join(sorted({b.META_SCHEMA.get("$id") or b.META_SCHEMA["id"] for b in _BASES}))
        raise InvalidArgument(
            f"{where}: $schema {dialect!r} is not a supported draft; use one of {known} "
            "(or leave it out for draft 2020-12)"
        )
    return found


def _refs(doc: Any) -> Iterator[str]:
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("$ref", "$dynamicRef", "$recursiveRef") and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from _refs(value)


def check_schema(schema: bytes, where: str) -> None:
    """Raise ``InvalidArgument`` naming ``where`` (e.g. "workflow 'orders': input_schema")
    unless ``schema`` is a JSON Schema of a supported draft, within the size limit, whose
    references all resolve inside it."""
    doc = _parse(schema, where)
    base, _ = _classes(doc, where)
    try:
        base.check_schema(doc)
    except SchemaError as exc:
        at = "/".join(str(p) for p in exc.path)
        raise InvalidArgument(
            f"{where} is not a valid JSON Schema at /{at}: {_short_text(exc.message)}"
        ) from None
    validator = base(doc, registry=_REGISTRY)
    resolver = validator._resolver  # type: ignore[attr-defined]
    for ref in _refs(doc):
        try:
            resolver.lookup(ref)
        except Unresolvable:
            raise InvalidArgument(
                f"{where}: $ref {ref!r} does not resolve inside the schema; references may "
                "only point into the schema itself (e.g. '#/$defs/name'): nothing is fetched "
                "from elsewhere"
            ) from None


@lru_cache(maxsize=512)
def _compiled(schema: bytes) -> Validator:
    doc = json.loads(schema)
    _, cls = _classes(doc, "schema")
    return cls(doc, registry=_REGISTRY, format_checker=cls.FORMAT_CHECKER)


@contextmanager
def shared_budget(seconds: float) -> Iterator[None]:
    """Every check inside (in this context, and in threads and tasks started from it)
    also ends within ``seconds`` from now, all together: a batch's checks share it."""
    token = _deadline.set(min(_deadline.get(), time.monotonic() + seconds))
    try:
        yield
    finally:
        _deadline.reset(token)


@lru_cache(maxsize=512)
def has_patterns(schema: bytes) -> bool:
    """Whether ``schema`` may match regular expressions (``pattern``, ``patternProperties``;
    a property of that name counts too: this only chooses where a check runs)."""
    return b'"pattern' in schema


def pointer(path: Iterator[Any] | Any) -> str:
    """The RFC 6901 JSON Pointer of a path of keys and indexes ('' is the whole document)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def violation(
    schema: bytes, document: bytes, *, budget: float = CHECK_BUDGET, slow_raises: bool = False
) -> str | None:
    """None when ``document`` (JSON) matches ``schema`` (checked by ``check_schema``), else
    why not, to follow "<what> does not match <which schema>": ``" at /customer/email: 'x'
    is not a 'email'"``. The check takes at most about ``budget`` seconds; a longer one
    refuses the document (``slow_raises``: raises ``SchemaTooSlow`` instead)."""
    validator = _compiled(schema)
    instance = json.loads(document)
    token = _deadline.set(min(_deadline.get(), time.monotonic() + budget))
    try:
        errors = list(islice(validator.iter_errors(instance), _ERRORS_CONSIDERED))
    except SchemaTooSlow:
        if slow_raises:
            raise
        return (
            f": checking it took over {budget * 1000:.0f} ms (or a batch's shared budget), "
            "so it was refused (a backtracking pattern, or a very large document?); simplify "
            "the schema's patterns or send a smaller document"
        )
    except Unresolvable as exc:
        return f": the schema's reference {exc} does not resolve"
    except RecursionError:
        return ": it is nested too deeply to check"
    finally:
        _deadline.reset(token)
    if not errors:
        return None
    error = best_match(errors)
    at = pointer(error.absolute_path)
    return f" at {at or '/ (the whole document)'}: {_short_text(error.message)}"


def _short(value: Any) -> str:
    return _short_text(repr(value))


def _short_text(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 12] + " …(clipped)"

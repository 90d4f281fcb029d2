"""Hypothesis strategies for protobuf messages, built from their descriptors: any request
message of any service, with hostile values mixed in (unicode and huge strings, repeated
fields past their limits, random and oversized payloads, out-of-range numbers).

    messages(PollTasksRequest.DESCRIPTOR)  # a strategy of PollTasksRequest
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

F = FieldDescriptor

# Names that get past a first validation (identifiers), and the usual suspects.
_IDENTIFIER = st.from_regex(r"[a-z][a-z0-9_.-]{0,15}", fullmatch=True)
_NASTY = st.sampled_from(
    ["", " ", "\x00", "a\x00b", "../../etc/passwd", "*", "default", "admin", "é", "🙂", "\u202e"]
)
_HUGE = st.integers(1025, 70_000).map(lambda n: "x" * n)
STRINGS = st.one_of(
    _IDENTIFIER, _NASTY, st.text(max_size=40), st.text(min_size=200, max_size=600), _HUGE
)

_JSON = st.sampled_from(
    [b"null", b"{}", b"[]", b'{"a": 1}', b"1", b'"s"', b"{", b"\xff\xfe", b"NaN", b"1e999"]
)
BYTES = st.one_of(
    _JSON,
    st.binary(max_size=64),
    st.integers(1, 3).map(lambda n: b'{"k": "' + b"x" * (n * 700_000) + b'"}'),
)

_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}


def _integers(kind: int) -> st.SearchStrategy[int]:
    low, high = _RANGES[kind]
    edges = [v for v in (0, 1, -1, 2, 100, 1001, low, high) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _scalar(fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    if fd.type == F.TYPE_STRING:
        return STRINGS
    if fd.type == F.TYPE_BYTES:
        return BYTES
    if fd.type == F.TYPE_BOOL:
        return st.booleans()
    if fd.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64)
    if fd.type == F.TYPE_ENUM:
        numbers = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-3, 1000))  # open enums
    return _integers(fd.type)


def _is_map(fd: FieldDescriptor) -> bool:
    return bool(
        fd.type == F.TYPE_MESSAGE and fd.is_repeated and fd.message_type.GetOptions().map_entry
    )


def _many(element: st.SearchStrategy[Any], blank: Any) -> st.SearchStrategy[list[Any]]:
    """A few values, or (rarely) a list past any limit of blank values."""
    return st.one_of(
        st.lists(element, max_size=4),
        st.integers(1001, 5000).map(lambda n: [blank] * n),
    )


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type with any subset of their fields set."""
    cls = GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    setters: dict[str, st.SearchStrategy[Any]] = {}
    for fd in descriptor.fields:
        setters[fd.name] = st.deferred(lambda fd=fd: _field(fd, depth))

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, setter in values.items():
            setter(message, name)
        return message

    return st.fixed_dictionaries({}, optional=setters).map(build)


def _field(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """A strategy of setters: ``setter(message, name)`` puts a generated value in place."""
    if _is_map(fd):
        key_fd = fd.message_type.fields_by_name["key"]
        value_fd = fd.message_type.fields_by_name["value"]
        keys = _scalar(key_fd)
        if value_fd.type == F.TYPE_MESSAGE:
            values: st.SearchStrategy[Any] = messages(value_fd.message_type, depth + 1)
        else:
            values = _scalar(value_fd)
        entries = st.one_of(
            st.dictionaries(keys, values, max_size=4),
            st.integers(101, 3000).map(lambda n: {f"k{i}": None for i in range(n)}),
        )

        def put_map(entries: dict[Any, Any]) -> Any:
            def setter(message: Message, name: str) -> None:
                target = getattr(message, name)
                for key, value in entries.items():
                    if value_fd.type == F.TYPE_MESSAGE:
                        if value is None:
                            target[key].SetInParent()
                        else:
                            target[key].CopyFrom(value)
                    elif value is not None:
                        target[key] = value
                    else:
                        target[key] = {F.TYPE_STRING: "", F.TYPE_BYTES: b""}.get(value_fd.type, 0)

            return setter

        return entries.map(put_map)
    if fd.type == F.TYPE_MESSAGE:
        sub = messages(fd.message_type, depth + 1)
        if fd.is_repeated:
            blank = GetMessageClass(fd.message_type)()

            def put_messages(items: list[Message]) -> Any:
                def setter(message: Message, name: str) -> None:
                    getattr(message, name).extend(items)

                return setter

            return _many(sub, blank).map(put_messages)

        def put_message(item: Message) -> Any:
            def setter(message: Message, name: str) -> None:
                getattr(message, name).CopyFrom(item)

            return setter

        return sub.map(put_message)
    scalar = _scalar(fd)
    if fd.is_repeated:
        blank: Any = {F.TYPE_STRING: "", F.TYPE_BYTES: b"", F.TYPE_BOOL: False}.get(fd.type, 0)
        if fd.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            blank = 0.0

        def put_values(values: list[Any]) -> Any:
            def setter(message: Message, name: str) -> None:
                getattr(message, name).extend(values)

            return setter

        return _many(scalar, blank).map(put_values)

    def put_value(value: Any) -> Any:
        def setter(message: Message, name: str) -> None:
            setattr(message, name, value)

        return setter

    return scalar.map(put_value)

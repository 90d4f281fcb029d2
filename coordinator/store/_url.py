"""Database URLs: the user-facing forms and the SQLAlchemy async-driver forms they map to."""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from coordinator import errors

ACCEPTED_FORMS = (
    "sqlite:///path/to/trellis.db (a file; four slashes for an absolute path), "
    "sqlite:// (in memory, for tests) or postgresql://user:password@host:5432/dbname"
)

_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
}


def parse_database_url(url: str) -> URL:
    """The SQLAlchemy URL for ``url``, with the async driver Trellis uses for its scheme."""
    try:
        parsed = make_url(url.strip())
    except (ArgumentError, ValueError, TypeError, AttributeError) as exc:
        scheme = url.partition("://")[0] if "://" in url else ""
        shown = f" (scheme {scheme!r})" if scheme else ""
        raise errors.InvalidArgument(
            f"cannot parse the database URL{shown}: expected {ACCEPTED_FORMS}"
        ) from exc
    driver = _DRIVERS.get(parsed.drivername)
    if driver is not None:
        parsed = parsed.set(drivername=driver)
    return parsed


def normalize_database_url(url: str) -> str:
    """``sqlite:///p`` → ``sqlite+aiosqlite:///p``, ``sqlite://`` stays in memory,
    ``postgres(ql)://`` → ``postgresql+psycopg://``; other URLs pass through unchanged.

    Raises ``InvalidArgument`` naming the accepted forms when ``url`` cannot be parsed.
    """
    parse_database_url(url)  # validates
    text = url.strip()
    scheme, _, rest = text.partition("://")
    driver = _DRIVERS.get(scheme)
    if driver is None:
        return text
    # Only the scheme changes: rendering the parsed URL would re-quote the rest.
    return f"{driver}://{rest}"


def is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and (
        url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"
    )


def display_url(url: URL) -> str:
    """``url`` without its password, for messages and logs."""
    return url.render_as_string(hide_password=True)

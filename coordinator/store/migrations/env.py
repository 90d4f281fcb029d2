"""Alembic environment: runs on the connection that ``coordinator.store`` hands over.

``open_store``/``migrate`` put an open SQLAlchemy connection, already inside a transaction,
in ``config.attributes["connection"]``. For developer use of the ``alembic`` command
(e.g. ``revision --autogenerate`` against a scratch database), ``sqlalchemy.url`` in the
config is used instead, with the same URL forms as TRELLIS_DATABASE_URL.
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from alembic import context

from coordinator.store._tables import metadata

config = context.config


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_from_url(url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from coordinator.store._url import normalize_database_url

    engine = create_async_engine(normalize_database_url(url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    given = config.attributes.get("connection")
    if given is not None:
        _run(given)
    else:
        asyncio.run(_run_from_url(config.get_main_option("sqlalchemy.url") or "sqlite://"))

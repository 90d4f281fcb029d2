"""An in-process coordinator on a real socket, over the store fixture (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from coordinator.service import Store
from tests.support.grpc_api import Api, serve_api


@pytest.fixture
async def api(store: Store) -> AsyncIterator[Api]:
    async with serve_api(store) as served:
        yield served

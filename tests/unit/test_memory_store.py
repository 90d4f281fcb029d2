"""What the memory store adds to the store contract (tests/integration runs that on it):
``open_store("memory://")``, and rows no caller can change behind its back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from coordinator.model import Channel, ChannelKind, WorkerInfo
from coordinator.store import MemoryStore, open_store

NOW = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


async def test_open_store_memory_url_is_an_empty_memory_store() -> None:
    store = await open_store("memory://", priority_aging=timedelta(seconds=2))
    try:
        assert isinstance(store, MemoryStore)
        assert store.priority_aging_ms == 2000
        assert store.group_commit is False
        assert await store.workflows.list_workflows("default", 10, None) == []
    finally:
        await store.close()


async def test_callers_cannot_change_stored_rows() -> None:
    store = MemoryStore()
    worker = WorkerInfo("w", ("t",), 1, NOW, labels={"zone": "eu"})
    await store.workers.upsert_worker(worker)
    worker.labels["zone"] = "us"  # the caller's object, after the write
    read = await store.workers.get_worker("default", "w")
    read.labels["zone"] = "ap"  # the object a read returned
    again = await store.workers.get_worker("default", "w")
    assert again.labels == {"zone": "eu"}
    assert again.last_seen == NOW.replace(microsecond=678000)  # kept to the millisecond

    config = {"url": "https://example.test/hook", "headers": {"a": "1"}}
    created = await store.notifications.create_channel(
        Channel("c1", "ops", ChannelKind.WEBHOOK, config, NOW, "default")
    )
    config["headers"]["a"] = "2"
    created.config["url"] = "changed"  # type: ignore[index]
    stored = await store.notifications.get_channel("default", "ops")
    assert stored.config == {"url": "https://example.test/hook", "headers": {"a": "1"}}

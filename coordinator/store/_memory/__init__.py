"""The ``Store`` port in memory: ``MemoryStore``, for tests and embedding.

It passes the store contract tests that the SQL store passes on SQLite and PostgreSQL, and
backs the service-level unit tests. One shared state (``_state``) guarded by an asyncio
lock, with a repository per aggregate over it:

- ``_executions``: executions, node runs, events and transitions (``_aggregate`` holds the
  writes that several repositories share: inserts, transitions, dead letters);
- ``_leases``: the claim with its dispatch limits, heartbeats, lease sweeps;
- ``_records``: definitions, workers, task-type limits, dead letters;
- ``_queue``: capped starts and the overflow queue;
- ``_triggers``: webhook and event triggers, schedules and their fires;
- ``_notifications``: channels, rules and the delivery outbox;
- ``_identity``: tenants, credentials, custom roles, the server secret and the audit trail
  (whose chain ``_state`` appends to, also for the served call's pending entry).
"""

from coordinator.store._memory._store import MemoryStore, MemoryWakeups

__all__ = ["MemoryStore", "MemoryWakeups"]

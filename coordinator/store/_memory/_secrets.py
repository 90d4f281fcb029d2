"""The memory store's secret store. Nothing is at rest here, so nothing is sealed; a key
rotation re-encrypts nothing and counts the values it would have."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from coordinator import errors
from coordinator.model import MAX_SECRETS_PER_TENANT, SecretEntry
from coordinator.store._memory import _copies
from coordinator.store._memory._state import State

MEMORY_KID = "memory"


class MemorySecrets:
    """The ``SecretRepository`` port."""

    def __init__(self, state: State) -> None:
        self._state = state

    @property
    def key_configured(self) -> bool:
        return True  # nothing is at rest

    async def put_secret(self, entry: SecretEntry) -> bool:
        state = self._state
        async with state.write():
            key = (entry.tenant_id, entry.name)
            known = state.secrets.get(key)
            if known is None:
                count = sum(1 for (t, _), _s in state.secrets.items() if t == entry.tenant_id)
                if count >= MAX_SECRETS_PER_TENANT:
                    raise errors.ResourceExhausted(
                        f"tenant {entry.tenant_id!r} has {count} secrets, the most it may "
                        "have; delete one it no longer needs"
                    )
            else:
                entry = dataclasses.replace(entry, created_at=known.created_at)
            state.secrets.put(key, _copies.truncated(entry))
            return known is None

    async def list_secrets(self, tenant_id: str) -> list[SecretEntry]:
        async with self._state.read():
            found = [s for (t, _), s in self._state.secrets.items() if t == tenant_id]
        return sorted(found, key=lambda s: s.name)

    async def get_secrets(self, tenant_id: str, names: Sequence[str]) -> dict[str, str]:
        async with self._state.read():
            out = {}
            for name in names:
                entry = self._state.secrets.get((tenant_id, name))
                if entry is not None:
                    out[name] = entry.value
            return out

    async def delete_secret(self, tenant_id: str, name: str) -> None:
        async with self._state.write():
            if self._state.secrets.get((tenant_id, name)) is None:
                raise errors.NotFound(
                    f"secret {name!r} not found in tenant {tenant_id!r}; "
                    "`trellis secrets list` shows its secrets"
                )
            self._state.secrets.delete((tenant_id, name))

    async def rotate_key(self, batch_size: int) -> tuple[str, dict[str, int]]:
        async with self._state.read():
            counts = {
                "secrets": len(self._state.secrets.values()),
                "webhook_triggers": len(self._state.webhooks.values()),
                "notification_channels": len(self._state.channels.values()),
            }
        return MEMORY_KID, counts

"""The tenant's secret store: set, list (names only), delete, rotate the encryption key;
and ``SecretVault``, which resolves ``${secret:NAME}`` references into the config of a task
handed to a worker and redacts resolved values from what workers send back.

Values are write-only: no use case returns one, except ``SecretVault.values`` to the
lease handout. The vault caches values per (tenant, name) for ``cache_ttl`` seconds; a
set or delete on this replica drops the tenant's entries at once, another replica sees
the change within ``cache_ttl`` (docs/security.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from coordinator.errors import InvalidArgument
from coordinator.model import (
    MAX_SECRET_BYTES,
    MIN_SECRET_CHARS,
    SECRET_NAME,
    SecretEntry,
)
from coordinator.service._common import Clock
from coordinator.service.ports import SecretRepository

DEFAULT_CACHE_TTL = 5.0
ROTATE_BATCH = 500
_CACHE_LIMIT = 100_000


def check_secret_name(name: str) -> None:
    if not SECRET_NAME.fullmatch(name):
        raise InvalidArgument(
            f"name {name[:80]!r} is not a valid secret name: 1 to 63 letters, digits, '_', "
            "'.' or '-', starting with a letter or digit"
        )


@dataclass(frozen=True)
class SecretInfo:
    """A secret as shown: never its value."""

    name: str
    created_at: datetime
    updated_at: datetime
    size: int


def _info(entry: SecretEntry) -> SecretInfo:
    return SecretInfo(entry.name, entry.created_at, entry.updated_at, len(entry.value.encode()))


class SecretVault:
    """Secret values for the lease handout, cached briefly per tenant."""

    def __init__(
        self,
        repo: SecretRepository,
        *,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._repo = repo
        self._ttl = cache_ttl
        self._now = monotonic
        self._cache: dict[tuple[str, str], tuple[float, str]] = {}

    async def values(self, tenant_id: str, names: Sequence[str]) -> dict[str, str]:
        """The values of those of ``names`` that exist (a missing one is not cached)."""
        now = self._now()
        found: dict[str, str] = {}
        wanted = []
        for name in names:
            hit = self._cache.get((tenant_id, name))
            if hit is not None and now - hit[0] < self._ttl:
                found[name] = hit[1]
            else:
                wanted.append(name)
        if wanted:
            fresh = await self._repo.get_secrets(tenant_id, wanted)
            if len(self._cache) + len(fresh) > _CACHE_LIMIT:
                self._cache.clear()
            for name, value in fresh.items():
                self._cache[(tenant_id, name)] = (now, value)
            found.update(fresh)
        return found

    def clear(self) -> None:
        self._cache.clear()

    def forget(self, tenant_id: str) -> None:
        for key in [k for k in self._cache if k[0] == tenant_id]:
            del self._cache[key]


class SecretsAdmin:
    """The SecretService use cases (permissions are checked by the gRPC layer's rules)."""

    def __init__(self, repo: SecretRepository, vault: SecretVault, clock: Clock) -> None:
        self._repo = repo
        self._vault = vault
        self._clock = clock

    async def set_secret(self, tenant_id: str, name: str, value: str) -> tuple[SecretInfo, bool]:
        check_secret_name(name)
        size = len(value.encode())
        if size > MAX_SECRET_BYTES:
            raise InvalidArgument(
                f"value of secret {name!r} is {size} bytes; at most {MAX_SECRET_BYTES} "
                "(64 KiB) — keep large files elsewhere and store their credentials here"
            )
        if len(value) < MIN_SECRET_CHARS:
            raise InvalidArgument(
                f"value of secret {name!r} is {len(value)} characters; at least "
                f"{MIN_SECRET_CHARS}: shorter values cannot be told apart from ordinary text "
                "when results are redacted"
            )
        now = self._clock()
        entry = SecretEntry(tenant_id, name, value, now, now)
        created = await self._repo.put_secret(entry)
        self._vault.forget(tenant_id)
        return _info(entry), created

    async def list_secrets(self, tenant_id: str) -> list[SecretInfo]:
        return [_info(e) for e in await self._repo.list_secrets(tenant_id)]

    async def delete_secret(self, tenant_id: str, name: str) -> None:
        check_secret_name(name)
        await self._repo.delete_secret(tenant_id, name)
        self._vault.forget(tenant_id)

    async def rotate_key(self) -> tuple[str, dict[str, int]]:
        """Re-encrypt every sealed value of every tenant under the current key: the key id
        and the count per table (the gRPC rule requires ``secrets.rotate``, which only the
        system tenant's admins hold)."""
        kid, counts = await self._repo.rotate_key(ROTATE_BATCH)
        self._vault.clear()
        return kid, counts

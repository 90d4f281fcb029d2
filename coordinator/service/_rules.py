"""Which notifications an ending execution queues, decided above the store.

``RuleBook`` keeps each tenant's notification rules, read once and kept until a rule
changes on this replica (``invalidate``), another replica says one changed (the wake-up key
``rules_key(tenant)``, see the composition root), or ``ttl`` passes. ``with_deliveries``
puts the deliveries of a transition that ends its execution into ``Transition.deliveries``;
the store inserts them in the transition's own database transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from coordinator.model import ExecutionStatus, NotificationRule, Transition, deliveries_for
from coordinator.service.ports import NotificationRepository

RULES_KEY_PREFIX = "notification-rules:"


def rules_key(tenant_id: str) -> str:
    """The wake-up key that tells every replica a tenant's rules changed."""
    return RULES_KEY_PREFIX + tenant_id


class RuleBook:
    def __init__(
        self,
        store: NotificationRepository,
        clock: Callable[[], datetime],
        *,
        ttl: timedelta = timedelta(seconds=1),
    ) -> None:
        self._store = store
        self._clock = clock
        self._ttl = ttl
        self._rules: dict[str, tuple[datetime, tuple[NotificationRule, ...]]] = {}

    async def rules(self, tenant_id: str) -> tuple[NotificationRule, ...]:
        now = self._clock()
        cached = self._rules.get(tenant_id)
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        rules = tuple(
            await self._store.list_rules(
                tenant_id, channel_id=None, workflow_name=None, execution_id=None
            )
        )
        self._rules[tenant_id] = (now, rules)
        return rules

    def invalidate(self, tenant_id: str | None = None) -> None:
        if tenant_id is None:
            self._rules.clear()
        else:
            self._rules.pop(tenant_id, None)

    def on_wakeup(self, keys: Sequence[str]) -> None:
        """Forget the rules of tenants another replica changed (``rules_key``)."""
        for key in keys:
            if key == "*":
                self.invalidate()
            elif key.startswith(RULES_KEY_PREFIX):
                self.invalidate(key.removeprefix(RULES_KEY_PREFIX))


def with_deliveries(
    transition: Transition,
    before: ExecutionStatus | None,
    rules: Sequence[NotificationRule],
) -> Transition:
    """``transition`` carrying one delivery per rule matching the execution it ends (its
    status was ``before``; None for a new execution); unchanged when it ends nothing."""
    execution = transition.execution
    if not execution.status.terminal or (before is not None and before.terminal) or not rules:
        return transition
    mine = [
        r
        for r in rules
        if r.workflow_name == execution.workflow_name or r.execution_id == execution.id
    ]
    deliveries = deliveries_for(execution, mine, execution.updated_at)
    return replace(transition, deliveries=tuple(deliveries)) if deliveries else transition

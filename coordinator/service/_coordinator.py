"""The composition root of the use cases: ``Coordinator`` wires them over one store, and
says, as one ordered list, what runs after every commit of a transition.

Every gRPC servicer, the sweepers and the schedulers reach the use cases through it:
``coordinator.leasing.poll_tasks``, ``coordinator.results.complete_task``,
``coordinator.starts.start_execution`` ... One name per use case from RPC to service.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime

from coordinator import engine
from coordinator.service._approvals import Approvals
from coordinator.service._backpressure import PollWaiters, StartRate, WatchSlots
from coordinator.service._children import SubWorkflows
from coordinator.service._common import Clock, Draining, ServiceSettings, utcnow
from coordinator.service._definitions import Definitions
from coordinator.service._executions import DeadLetters, Executions, Operations
from coordinator.service._group import GroupCommit
from coordinator.service._heartbeats import Heartbeats
from coordinator.service._identity import Authenticator, IdentityAdmin, KeyRing
from coordinator.service._leasing import Leasing
from coordinator.service._notifications import NotificationService
from coordinator.service._notifier import Notifier
from coordinator.service._results import Results
from coordinator.service._rules import RuleBook
from coordinator.service._secrets import DEFAULT_CACHE_TTL, SecretsAdmin, SecretVault
from coordinator.service._starting import Starts
from coordinator.service._tokens import LeaseSigner
from coordinator.service._transactions import Transactions, WakeKeys, WakeUp
from coordinator.service.ports import DispatchPolicy, NoDispatchLimits, Store


class Coordinator:
    """The coordinator's use cases over ``store``.

    ``dispatch``: task-type limits and breakers (``coordinator.dispatch.DispatchControl``,
    built by the server); none when omitted. ``poll_waiters`` bounds the polls waiting at
    once, ``start_rate`` the starts per second, ``watch_slots`` the open WatchExecution
    streams (None: no bound)."""

    def __init__(
        self,
        store: Store,
        settings: ServiceSettings | None = None,
        *,
        notifier: Notifier | None = None,
        clock: Clock = utcnow,
        dispatch: DispatchPolicy | None = None,
        poll_waiters: PollWaiters | None = None,
        start_rate: StartRate | None = None,
        watch_slots: WatchSlots | None = None,
        keyring: KeyRing | None = None,
        authenticator: Authenticator | None = None,
        secret_cache_ttl: float = DEFAULT_CACHE_TTL,
    ) -> None:
        self.store = store
        # The coordinator's secrets: API-key hashes and lease-token signatures. Without one
        # (tests, embedding) a random key: tokens do not outlive the process.
        self.keyring = keyring = keyring or KeyRing([("local", secrets.token_urlsafe(32))])
        signer = LeaseSigner(keyring)
        self.authenticator = authenticator = authenticator or Authenticator(
            store.identity, keyring, clock
        )
        self.settings = settings = settings or ServiceSettings()
        # Expression results (node inputs and outputs, keys) are refused past this.
        engine.set_result_limit(settings.max_payload_bytes)
        self.notifier = notifier = notifier or Notifier()
        self.dispatch = dispatch = dispatch or NoDispatchLimits()
        self._clock = clock
        self._draining = draining = Draining()

        # Secret values: resolved into leases, redacted from what workers send back.
        self.vault = vault = SecretVault(store.secrets, cache_ttl=secret_cache_ttl)
        self.secrets = SecretsAdmin(store.secrets, vault, clock)
        self.definitions = Definitions(store.workflows, settings, clock)
        self.rules = RuleBook(store.notifications, clock)
        wake_keys = WakeKeys(self.definitions, dispatch)
        # Workers' results share database transactions where the store says a transaction
        # costs more than its statements.
        group = GroupCommit(store.executions) if store.group_commit else None
        self.transactions = tx = Transactions(
            store.executions, self.definitions, self.rules, wake_keys, settings, clock, group=group
        )
        self.sub_workflows = SubWorkflows(tx)
        self.starts = Starts(
            store.executions,
            store.queue,
            tx,
            self.definitions,
            settings,
            clock,
            start_rate=start_rate,
        )
        self.leasing = Leasing(
            store.leases,
            store.workers,
            store.executions,
            self.definitions,
            dispatch,
            notifier,
            settings,
            clock,
            draining,
            signer,
            poll_waiters=poll_waiters,
            vault=vault,
        )
        self.results = Results(
            tx, self.definitions, self.leasing, dispatch, settings, signer, vault=vault
        )
        self.leasing.fail_unresolved = self.results.fail_lease
        self.heartbeats = Heartbeats(
            store.leases, store.workers, self.results, settings, clock, signer, self.leasing.owners
        )
        self.identity = IdentityAdmin(store.identity, store.audit, keyring, authenticator, clock)
        self.executions = Executions(
            store.executions, self.definitions, notifier, draining, watch_slots=watch_slots
        )
        self.operations = Operations(tx, self.executions)
        self.approvals = Approvals(tx, self.executions)
        self.dead_letters = DeadLetters(store.dead_letters, tx, self.executions)
        self.notifications = NotificationService(
            store.notifications,
            store.executions,
            store.workflows,
            clock=clock,
            rules=self.rules,
            wakeups=store.wakeups,
            destinations=settings.notify_destinations,
        )

        # What runs after every commit of a transition, in this order:
        tx.after_commit = (
            # 1. wake the polls and watchers it concerns, here and on every other replica;
            WakeUp(wake_keys, notifier, store.wakeups),
            # 2. cancel the child executions it let go;
            self.sub_workflows.cancel_released,
            # 3. tell the parent of a child execution it ended;
            self.sub_workflows.report_ended,
            # 4. start the oldest queued execution of a capped workflow it freed a place in.
            self.starts.start_freed,
        )
        # Then, for a worker's result only (``Results``): the task type's breaker outcome,
        # and eager dispatch of the worker's next task.

    # -- lifecycle ------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Stop handing out work: waiting polls return empty, new polls are refused."""
        self._draining.on = True
        self.notifier.close()

    @property
    def draining(self) -> bool:
        return self._draining()

    def clock(self) -> datetime:
        return self._clock()

    def check_payload(self, name: str, payload: bytes) -> bytes:
        return self.settings.check_payload(name, payload)


__all__: Sequence[str] = ("Coordinator",)

"""The seam between use cases and storage: one protocol per repository, and ``Store``, the
repositories over one database handle. The service talks to these protocols only.

``coordinator.store.SqlStore`` implements them with SQLAlchemy for SQLite and PostgreSQL;
``coordinator.store.MemoryStore`` in memory, for tests and embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from coordinator.errors import TrellisError
from coordinator.model import (
    UNLIMITED,
    Admitted,
    AuditEntry,
    AuditRecord,
    Candidate,
    CappedStart,
    Channel,
    ClaimedDelivery,
    Credential,
    DeadLetter,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Event,
    EventTrigger,
    Execution,
    ExecutionFilter,
    FiringResult,
    LeasedCounts,
    LeaseKey,
    NewExecution,
    NodeRun,
    NotificationRule,
    PendingStart,
    Role,
    RunningCap,
    Schedule,
    ScheduleFire,
    SecretEntry,
    TaskTypeLimits,
    Tenant,
    Transition,
    WebhookTrigger,
    WorkerInfo,
    WorkflowDef,
    WorkflowSummary,
)

# The store's side of the audit contract (``AuditRepository``): its write transactions take
# the call's pending entry with ``take_pending_audit``. Re-exported here, the one service
# module the stores import.
from coordinator.service._audit import PENDING_AUDIT as PENDING_AUDIT
from coordinator.service._audit import take_pending_audit as take_pending_audit

T = TypeVar("T")


@dataclass(frozen=True)
class Decision(Generic[T]):
    """The outcome of a ``decide`` callback: a transition to persist (or none) and a result."""

    transition: Transition | None
    result: T
    # Executions to insert in the same database transaction as ``transition`` (the child
    # executions its workflow nodes start, each with its start transition).
    created: tuple[Transition, ...] = ()
    # Wake-up keys for the other replicas, published in the same database transaction
    # (a PostgreSQL NOTIFY is delivered at commit, and never for a rolled-back one).
    wake: tuple[str, ...] = ()


class ClaimPolicy(Protocol):
    """The dispatch limits one claim applies (built per poll by DispatchControl.plan).

    The store's claim, in one transaction: select up to ``scan(limit)`` candidates of
    ``task_types - excluded_types`` (SKIP LOCKED); when ``counted_types`` or an execution
    cap is involved, take a lock per counted type and per capped execution (PostgreSQL
    advisory transaction locks, in sorted order; SQLite's writer lock serializes anyway)
    and count LEASED rows; ``admit``; ``take_tokens``; lease what is left. If the
    transaction then fails, ``refund`` is awaited with what ``take_tokens`` returned."""

    excluded_types: frozenset[str]
    counted_types: frozenset[str]
    needs_input: bool

    def scan(self, limit: int) -> int:
        """How many candidates to look at for a claim of ``limit``."""
        ...

    def admit(
        self, candidates: Sequence[Candidate], counts: LeasedCounts, limit: int
    ) -> list[Admitted]:
        """The candidates (in order) that concurrency limits let through, at most limit."""
        ...

    async def take_tokens(self, admitted: Sequence[Admitted]) -> list[Admitted]:
        """Those of ``admitted`` the rate limits let through now (tokens taken)."""
        ...

    async def refund(self, taken: Sequence[Admitted]) -> None: ...

    @property
    def wait_hint(self) -> float | None:
        """After a claim that limits held back: seconds until trying again may succeed
        (a token, a breaker's probe), or None when only a lease ending can help."""
        ...


class DispatchPolicy(Protocol):
    """Task-type limits and breakers, as the leasing use cases apply them
    (``coordinator.dispatch.DispatchControl``; ``NoDispatchLimits`` when none are set)."""

    async def plan(self, tenant_id: str, task_types: Sequence[str]) -> ClaimPolicy:
        """The limits one claim of these task types applies."""
        ...

    def wakes_on_lease_end(self, tenant_id: str, task_type: str) -> bool:
        """Whether a lease of this type ending may let a waiting poll claim (a
        concurrency-limited type, or a breaker's probe)."""
        ...

    async def record_outcome(self, tenant_id: str, task_type: str, ok: bool) -> None:
        """Feed an attempt's outcome to the type's breaker."""
        ...


class NoDispatchLimits:
    """A ``DispatchPolicy`` with no task-type limits and no breakers (executions' own
    max_concurrency still applies in the claim)."""

    async def plan(self, tenant_id: str, task_types: Sequence[str]) -> ClaimPolicy:
        return UNLIMITED

    def wakes_on_lease_end(self, tenant_id: str, task_type: str) -> bool:
        return False

    async def record_outcome(self, tenant_id: str, task_type: str, ok: bool) -> None:
        return None


class WakeupChannel(Protocol):
    """Wake-ups across replicas (PostgreSQL LISTEN/NOTIFY; nothing to do for one process)."""

    async def publish_wakeups(self, keys: Sequence[str]) -> None:
        """Tell every replica (this one included) that work for these notifier keys may be
        ready. A store serving one process may do nothing."""
        ...

    async def listen_wakeups(self, on_keys: Callable[[list[str]], None]) -> None:
        """Start handing keys published by any replica to ``on_keys`` (``"*"`` means wake
        every listener) until the store closes."""
        ...


class WorkflowRepository(Protocol):
    """Workflow definitions, immutable once registered."""

    async def register_workflow(self, defn: WorkflowDef, now: datetime) -> tuple[WorkflowDef, bool]:
        """Store ``defn`` as the next version of its name, or return the existing version
        whose ``content_hash`` is equal (``created`` False). Safe under concurrency."""
        ...

    async def get_workflow(self, tenant_id: str, name: str, version: int | None) -> WorkflowDef:
        """The given version, or the latest when ``version`` is None. Raises ``NotFound``."""
        ...

    async def list_workflows(
        self, tenant_id: str, limit: int, after_name: str | None
    ) -> list[WorkflowSummary]: ...
    async def list_workflow_versions(self, tenant_id: str, name: str) -> list[WorkflowDef]: ...


class ExecutionRepository(Protocol):
    """Executions with their node runs and events; every transition goes through ``transact``."""

    async def create_execution(
        self,
        transition: Transition,
        *,
        children: Sequence[Transition] = (),
        idempotency_cutoff: datetime | None = None,
    ) -> tuple[Execution, bool]:
        """Insert the execution, all its node runs and events, and ``children`` (child
        executions with theirs), in one transaction. When the execution's idempotency key is
        already used in its tenant by an execution created at or after
        ``idempotency_cutoff`` (any time when None), insert nothing and return that
        execution with ``created`` False; an older holder releases the key. Race-free."""
        ...

    async def create_executions(
        self, items: Sequence[NewExecution], *, idempotency_cutoff: datetime | None = None
    ) -> list[tuple[Execution, bool]]:
        """``create_execution`` for each item, in order, all in one transaction (a key
        repeated within ``items`` returns the execution its first use created)."""
        ...

    async def get_execution(self, tenant_id: str, execution_id: str) -> Execution:
        """Raises ``NotFound``."""
        ...

    async def get_executions(self, tenant_id: str, ids: Sequence[str]) -> dict[str, Execution]:
        """The executions among ``ids`` that exist, by id."""
        ...

    async def list_node_runs(self, tenant_id: str, execution_id: str) -> list[NodeRun]: ...
    async def get_node_outputs(
        self, tenant_id: str, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], bytes | None]:
        """The output of each existing node run ``(execution_id, node_id)`` in ``keys``."""
        ...

    async def list_executions(
        self,
        tenant_id: str,
        where: ExecutionFilter,
        *,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[Execution]:
        """Those matching ``where``, newest first (created_at, id descending), strictly
        before the cursor when given."""
        ...

    async def list_events(
        self, tenant_id: str, execution_id: str, after_sequence: int, limit: int
    ) -> list[Event]: ...
    async def transact(
        self,
        tenant_id: str,
        execution_id: str,
        decide: Callable[[Execution, Mapping[str, NodeRun]], Decision[T]],
    ) -> T:
        """Load the execution and its node runs, call ``decide`` (pure), persist its transition
        atomically, including its ``dead_lettered`` nodes (a DeadLetter row each, with the
        node's input and its failures since its last redrive, from NODE_ATTEMPT_FAILED and
        NODE_TIMED_OUT events) and its ``redriven_dead_letter`` (stamped redriven_at; one
        already redriven raises ``FailedPrecondition``). On a version conflict, reload and
        call ``decide`` again (bounded). Raises ``NotFound`` for an unknown execution."""
        ...

    async def transact_many(
        self,
        items: Sequence[tuple[str, str, Callable[[Execution, Mapping[str, NodeRun]], Decision[T]]]],
    ) -> list[T | TrellisError] | None:
        """Group commit: ``transact`` for several (tenant, execution id, decide) in one
        database transaction, one commit for all. Per item, the result of its ``decide``, or
        the ``TrellisError`` it (or the execution lookup) raised, in which case that item
        wrote nothing. None when the group could not commit as one (a conflict, a lost
        race, the database): nothing was written, and the caller runs each on its own."""
        ...

    async def claim_transact(
        self,
        tenant_id: str,
        execution_id: str,
        decide: Callable[[Execution, Mapping[str, NodeRun]], Decision[T]],
    ) -> T | None:
        """``transact`` for a sweeper's claim: on PostgreSQL, when another transaction holds
        the execution row (``FOR UPDATE SKIP LOCKED``), or the execution does not exist,
        return None without calling ``decide``."""
        ...

    async def find_due_executions(self, now: datetime, limit: int) -> list[Execution]:
        """PENDING executions whose ``start_at <= now`` (delayed starts now due)."""
        ...

    async def find_ended_children(self, limit: int) -> list[Execution]:
        """Finished child executions whose parent's workflow node still WAITs on them."""
        ...

    async def find_orphaned_children(self, limit: int) -> list[Execution]:
        """Unfinished child executions whose parent's workflow node no longer waits on them
        (the parent ended, or the node was cancelled or skipped)."""
        ...

    async def find_overdue_executions(self, now: datetime, limit: int) -> list[Execution]:
        """Non-terminal executions (any tenant) whose deadline < now."""
        ...

    async def find_waiting_overdue(self, now: datetime, limit: int) -> list[NodeRun]:
        """WAITING node runs (any tenant) whose schedule_deadline < now: approval nodes
        past their approval_timeout."""
        ...


class LeaseRepository(Protocol):
    """The queue: claiming READY node runs and keeping leases alive."""

    async def claim_tasks(
        self,
        tenant_id: str,
        worker_id: str,
        task_types: Sequence[str],
        limit: int,
        now: datetime,
        policy: ClaimPolicy | None = None,
    ) -> list[NodeRun]:
        """Atomically lease up to ``limit`` READY, not held node runs of ``task_types`` whose
        ``available_at <= now``, in dispatch_rank order (priority with ageing), within the
        limits of ``policy`` and of each execution's max_concurrency (see ClaimPolicy).
        Claiming clears schedule_deadline and sets the worker's last_seen = now.
        Each becomes LEASED with attempt + 1, lease_seq + 1, worker_id, lease_deadline
        = now + start_to_close_timeout, heartbeat_deadline = now + heartbeat_timeout;
        a NODE_LEASED event is appended for each. Returns the leased rows."""
        ...

    async def next_available_at(
        self, tenant_id: str, task_types: Sequence[str], now: datetime
    ) -> datetime | None:
        """Earliest ``available_at`` in the future among READY rows of these types."""
        ...

    async def touch_leases(
        self, tenant_id: str, keys: Sequence[LeaseKey], now: datetime
    ) -> dict[LeaseKey, NodeRun | None]:
        """Extend heartbeat_deadline (now + heartbeat_timeout) of each key still LEASED with
        the same lease_seq; return the current row for every key (None if unknown)."""
        ...

    async def find_expired_leases(self, now: datetime, limit: int) -> list[NodeRun]:
        """LEASED rows (any tenant) whose lease_deadline or heartbeat_deadline < now."""
        ...

    async def find_unstarted_overdue(self, now: datetime, limit: int) -> list[NodeRun]:
        """READY, not held rows (any tenant) whose schedule_deadline < now."""
        ...

    async def find_leases_of_lost_workers(self, cutoff: datetime, limit: int) -> list[NodeRun]:
        """LEASED rows (any tenant) whose worker (same tenant, registered) has
        last_seen < cutoff."""
        ...

    async def list_worker_leases(self, tenant_id: str, worker_id: str) -> list[NodeRun]:
        """LEASED rows currently held by this worker."""
        ...


class DeadLetterRepository(Protocol):
    """Node runs that exhausted their retries (written by transitions)."""

    async def list_dead_letters(
        self,
        tenant_id: str,
        *,
        workflow_name: str | None,
        task_type: str | None,
        include_redriven: bool,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[DeadLetter]:
        """Newest first (created_at, id descending), strictly before the cursor when given."""
        ...

    async def get_dead_letter(self, tenant_id: str, dead_letter_id: str) -> DeadLetter:
        """Raises ``NotFound``."""
        ...


class WorkerRepository(Protocol):
    """Registered worker processes."""

    async def upsert_worker(self, worker: WorkerInfo) -> None: ...
    async def get_worker(self, tenant_id: str, worker_id: str) -> WorkerInfo:
        """The registered worker. Raises ``NotFound``."""
        ...

    async def touch_worker(self, tenant_id: str, worker_id: str, now: datetime) -> None:
        """Record that the worker is alive (last_seen = now); unknown workers are ignored."""
        ...


class LimitsRepository(Protocol):
    """Task-type limits (rate, concurrency, breaker settings)."""

    async def set_task_type_limits(self, limits: TaskTypeLimits, now: datetime) -> TaskTypeLimits:
        """Create or replace; returns the stored row (updated_at = now)."""
        ...

    async def get_task_type_limits(self, tenant_id: str, task_type: str) -> TaskTypeLimits:
        """Raises ``NotFound``."""
        ...

    async def list_task_type_limits(self, tenant_id: str | None) -> list[TaskTypeLimits]:
        """Ordered by (tenant, task type); every tenant's when ``tenant_id`` is None."""
        ...

    async def delete_task_type_limits(self, tenant_id: str, task_type: str) -> None:
        """Raises ``NotFound``."""
        ...


class QueueRepository(Protocol):
    """The overflow queue of ``max_running_executions``.

    "Running" means RUNNING or PAUSED executions of the workflow name (every version) in
    the tenant. A capped start counts them in the transaction that writes it; on
    PostgreSQL that transaction first takes a per-workflow advisory lock, so concurrent
    starts on any replica never exceed the cap."""

    async def create_capped_executions(
        self, starts: Sequence[CappedStart], *, idempotency_cutoff: datetime | None = None
    ) -> list[tuple[Execution, bool]]:
        """``Store.create_executions`` with the caps applied, all in one transaction. A
        capped start is created as is when its workflow has room (and, for QUEUE, nothing
        queued before it), else its ``queued`` transition is (QUEUE), or the whole call
        raises ``ResourceExhausted`` and nothing is stored (REJECT). A start whose
        idempotency key is held returns the holder, as ``create_executions`` does."""
        ...

    async def start_pending(
        self,
        execution: Execution,
        start: NewExecution,
        cap: RunningCap | None,
        when_full: Transition | None,
    ) -> PendingStart:
        """Write ``start`` (the start transition of the PENDING ``execution`` and its
        children) if the row is unchanged (same version, not held by another transaction)
        and, with a ``cap``, the workflow has room (for an execution not yet queued: and
        nothing is queued before it). When it has none, write ``when_full`` if given."""
        ...

    async def count_running(self, tenant_id: str, workflow_name: str) -> int:
        """RUNNING and PAUSED executions of the workflow (all versions)."""
        ...

    async def find_queued_workflows(
        self, limit: int, after: tuple[str, str] | None = None
    ) -> list[tuple[str, str]]:
        """(tenant, workflow name) pairs, any tenant, with queued executions."""
        ...

    async def find_queued_executions(
        self, tenant_id: str, workflow_name: str, limit: int
    ) -> list[Execution]:
        """The workflow's queued executions, oldest (created_at) first."""
        ...


class TriggerRepository(Protocol):
    """Webhook and event triggers, schedules and their fires. Tenant-scoped except the
    scheduler's claims."""

    async def create_webhook_trigger(self, trigger: WebhookTrigger) -> None:
        """Raises ``AlreadyExists`` when the path is taken."""
        ...

    async def get_webhook_trigger(self, tenant_id: str, path: str) -> WebhookTrigger:
        """Raises ``NotFound``."""
        ...

    async def list_webhook_triggers(self, tenant_id: str) -> list[WebhookTrigger]: ...
    async def delete_webhook_trigger(self, tenant_id: str, path: str) -> None:
        """Raises ``NotFound``."""
        ...

    async def record_webhook_delivery(
        self, tenant_id: str, digest: str, expires_at: datetime, now: datetime
    ) -> bool:
        """Remember a signed delivery until ``expires_at``. False when ``digest`` is
        recorded already and not expired at ``now`` (a replay). Atomic: of callers racing
        with one digest, on any number of replicas, exactly one gets True."""
        ...

    async def forget_webhook_delivery(self, tenant_id: str, digest: str) -> None:
        """Drop a recorded delivery (its execution could not start: a retry may come)."""
        ...

    async def delete_expired_webhook_deliveries(self, now: datetime, limit: int) -> int:
        """Delete up to ``limit`` deliveries expired at ``now``; returns how many."""
        ...

    async def create_event_trigger(self, trigger: EventTrigger) -> None: ...
    async def list_event_triggers(
        self, tenant_id: str, event_name: str | None
    ) -> list[EventTrigger]: ...
    async def delete_event_trigger(self, tenant_id: str, trigger_id: str) -> None:
        """Raises ``NotFound``."""
        ...

    async def create_schedule(self, schedule: Schedule) -> None:
        """Raises ``AlreadyExists`` when the id is taken."""
        ...

    async def get_schedule(self, tenant_id: str, schedule_id: str) -> Schedule:
        """Raises ``NotFound``."""
        ...

    async def list_schedules(self, tenant_id: str) -> list[Schedule]: ...
    async def update_schedule(
        self, tenant_id: str, schedule_id: str, change: Callable[[Schedule], Schedule]
    ) -> Schedule:
        """Lock the schedule, apply ``change`` (pure) and store the result. ``NotFound``."""
        ...

    async def delete_schedule(self, tenant_id: str, schedule_id: str) -> None:
        """Deletes its fire records too. Raises ``NotFound``."""
        ...

    async def list_schedule_fires(
        self, tenant_id: str, schedule_id: str, limit: int
    ) -> list[ScheduleFire]:
        """Newest fire time first."""
        ...

    async def find_due_schedules(self, now: datetime, limit: int) -> list[Schedule]:
        """Unpaused schedules (any tenant) with ``next_fire_at <= now`` or a buffered fire."""
        ...

    async def next_schedule_fire_at(self) -> datetime | None:
        """The earliest ``next_fire_at`` of any unpaused schedule."""
        ...

    async def has_buffered_fires(self) -> bool: ...
    async def fire_schedule(
        self,
        tenant_id: str,
        schedule_id: str,
        decide: Callable[[Schedule, Execution | None], FiringResult | None],
    ) -> FiringResult | None:
        """In one transaction: lock the schedule row (skipping it when another replica holds
        it: returns None), load its last execution, call ``decide`` (pure; None: nothing
        to do), then insert the executions of ``starts`` (one whose idempotency key exists
        is not inserted again), upsert ``fires`` and store ``schedule``."""
        ...


class NotificationRepository(Protocol):
    """Channels, rules and the delivery outbox with its attempts."""

    async def create_channel(self, channel: Channel) -> Channel:
        """Raises ``Conflict`` when the tenant has a channel of that name."""
        ...

    async def get_channel(self, tenant_id: str, ref: str) -> Channel:
        """By id or name. Raises ``NotFound``."""
        ...

    async def list_channels(self, tenant_id: str) -> list[Channel]: ...
    async def delete_channel(self, tenant_id: str, channel_id: str, now: datetime) -> None:
        """Delete the channel and its rules; its pending deliveries become FAILED."""
        ...

    async def create_rule(self, rule: NotificationRule) -> NotificationRule: ...
    async def list_rules(
        self,
        tenant_id: str,
        *,
        channel_id: str | None,
        workflow_name: str | None,
        execution_id: str | None,
    ) -> list[NotificationRule]: ...
    async def delete_rule(self, tenant_id: str, rule_id: str) -> None:
        """Raises ``NotFound``."""
        ...

    async def list_deliveries(
        self,
        tenant_id: str,
        *,
        execution_id: str | None,
        channel_id: str | None,
        status: DeliveryStatus | None,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[Delivery]:
        """Newest first (created_at, id descending), each with its attempts."""
        ...

    async def claim_deliveries(
        self, now: datetime, limit: int, lease: timedelta
    ) -> list[ClaimedDelivery]:
        """Claim up to ``limit`` PENDING deliveries (any tenant) due at ``now`` and not
        claimed by a live lease: ``claimed_until = now + lease``, ``claim_seq + 1``."""
        ...

    async def defer_delivery(
        self, delivery_id: str, claim_seq: int, until: datetime, now: datetime
    ) -> None:
        """Release a claim without an attempt: due again at ``until``."""
        ...

    async def record_attempt(
        self,
        delivery_id: str,
        claim_seq: int,
        attempt: DeliveryAttempt,
        *,
        retry_at: datetime | None,
    ) -> int:
        """Record one attempt (numbered from the row's count) and settle the delivery:
        DELIVERED once when ``attempt.ok`` (only from PENDING); otherwise PENDING again at
        ``retry_at``, or FAILED when ``retry_at`` is None — both only while ``claim_seq``
        is still the row's. Returns the attempt's number."""
        ...


class BearerVerifier(Protocol):
    """Checks a bearer token that is not an API key (a JWT; ``coordinator.oidc``): returns
    its claims, or raises Unauthenticated. The tenant and roles are read from the claims
    named ``tenant_claim`` and ``roles_claim``."""

    tenant_claim: str
    roles_claim: str

    async def verify(self, token: str) -> dict[str, Any]: ...


class IdentityRepository(Protocol):
    """Tenants, credentials (API keys and certificate names), custom roles, and the
    coordinator's generated secret (docs/security.md)."""

    async def create_tenant(self, tenant: Tenant) -> None:
        """AlreadyExists when a tenant with that id exists."""
        ...

    async def list_tenants(self) -> list[Tenant]: ...
    async def tenant_exists(self, tenant_id: str) -> bool: ...
    async def create_credential(self, credential: Credential) -> None:
        """AlreadyExists when a certificate credential of that subject exists."""
        ...

    async def get_credential(self, credential_id: str) -> Credential:
        """Any tenant's credential by id (its id is what a key presents); NotFound."""
        ...

    async def find_certificate(self, subject: str) -> Credential:
        """The certificate credential for a client certificate's common name; NotFound."""
        ...

    async def list_credentials(self, tenant_id: str) -> list[Credential]: ...
    async def revoke_credential(self, tenant_id: str, credential_id: str, now: datetime) -> None:
        """NotFound unless the tenant has that credential."""
        ...

    async def touch_credential(self, credential_id: str, now: datetime) -> None: ...
    async def put_role(self, role: Role) -> None: ...
    async def list_roles(self, tenant_id: str) -> list[Role]: ...
    async def delete_role(self, tenant_id: str, name: str) -> None:
        """NotFound unless the tenant has that role."""
        ...

    async def server_secret(self, candidate: str, secret_id: str = "main") -> str:
        """The coordinator's generated secret ``secret_id`` ("main": API-key hashes and
        lease tokens; "encryption": the derived at-rest key): ``candidate`` if none was
        stored yet (the first replica to ask stores it), else the stored one."""
        ...


class AuditRepository(Protocol):
    """The hash-chained audit trail, one chain per tenant (docs/security.md).

    Appends are serialized per tenant (a chain head row locked in the appending
    transaction). A write transaction of any repository that runs while
    ``service.PENDING_AUDIT`` holds an unwritten entry appends it in that same transaction
    and marks it written, so a mutating call's record commits (or rolls back) with its
    effect; ``append`` records what wrote nothing (a refusal, an error)."""

    async def append(self, entry: AuditEntry, now: datetime) -> None: ...
    async def list_records(
        self,
        tenant_id: str,
        *,
        since: datetime | None = None,
        actor: str | None = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """Oldest first, ``seq > after_seq``."""
        ...

    async def verify(self, tenant_id: str) -> tuple[int, str | None]:
        """``(records checked, None)`` when the chain holds, else ``(seq, what is wrong)`` for
        the first broken link: a changed row, a missing or inserted one, a cut-off end."""
        ...


class SecretRepository(Protocol):
    """The tenant's secret store, and the re-encryption of every sealed value. The SQL
    store keeps values sealed (``coordinator.sealing``); the in-memory store keeps nothing
    at rest."""

    @property
    def key_configured(self) -> bool:
        """False when values are sealed with the key derived from the database itself."""
        ...

    async def put_secret(self, entry: SecretEntry) -> bool:
        """Create or replace (keeping ``created_at``); True when it was created.
        ResourceExhausted past ``MAX_SECRETS_PER_TENANT``."""
        ...

    async def list_secrets(self, tenant_id: str) -> list[SecretEntry]:
        """By name, values included (the service never shows them)."""
        ...

    async def get_secrets(self, tenant_id: str, names: Sequence[str]) -> dict[str, str]:
        """The values of those of ``names`` that exist."""
        ...

    async def delete_secret(self, tenant_id: str, name: str) -> None:
        """NotFound unless the tenant has that secret."""
        ...

    async def rotate_key(self, batch_size: int) -> tuple[str, dict[str, int]]:
        """Re-encrypt every sealed value of every tenant under the current key, in
        transactions of ``batch_size`` rows: the key id and the count per table."""
        ...


class Store(Protocol):
    """Persistent state: one repository per aggregate over one database handle. Every
    method is tenant-scoped except the cross-tenant sweeps. Use cases take the narrow
    repository they need, never the whole store."""

    @property
    def wakeups(self) -> WakeupChannel: ...

    @property
    def workflows(self) -> WorkflowRepository: ...

    @property
    def executions(self) -> ExecutionRepository: ...

    @property
    def leases(self) -> LeaseRepository: ...

    @property
    def dead_letters(self) -> DeadLetterRepository: ...

    @property
    def workers(self) -> WorkerRepository: ...

    @property
    def limits(self) -> LimitsRepository: ...

    @property
    def queue(self) -> QueueRepository: ...

    @property
    def triggers(self) -> TriggerRepository: ...

    @property
    def notifications(self) -> NotificationRepository: ...

    @property
    def identity(self) -> IdentityRepository: ...

    @property
    def audit(self) -> AuditRepository: ...

    @property
    def secrets(self) -> SecretRepository: ...

    @property
    def group_commit(self) -> bool:
        """Whether concurrent transitions should share database transactions
        (``ExecutionRepository.transact_many``)."""
        ...

    async def close(self) -> None: ...

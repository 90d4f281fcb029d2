"""The schema as SQLAlchemy Core tables (the shape queries are built from).

Alembic owns the schema in the database: ``migrations/versions`` creates these tables with
hand-written operations, and a test checks that the two agree. Conventions:

- every table has ``tenant_id`` and every query filters on it, except the few above the
  tenants: ``tenants`` itself, ``server_secrets``, and ``credentials`` looked up by id or
  certificate subject (what a caller presents, before its tenant is known);
- timestamps are BIGINT epoch milliseconds (UTC), durations BIGINT milliseconds;
- payloads (inputs, outputs, details) are JSON documents kept as bytes, small JSON lists and
  maps (task types, labels, definition documents) as text;
- enum values (statuses, event types, node roles) are stored as their text names;
- flags are BOOLEAN, compared in queries as the literal ``held = false`` so the planners of
  both databases match the partial indexes that carry the same term.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# The non-terminal execution statuses: the deadline index and the execution-timeout query
# both spell them as this literal list (a partial index is matched on the same terms). A
# status added to the model needs a migration of the index, and a test checks they agree.
LIVE_EXECUTION_STATUSES = ("PENDING", "PAUSED", "RUNNING")
_LIVE_SQL = ", ".join(f"'{s}'" for s in LIVE_EXECUTION_STATUSES)

# The predicate of the delayed-start index: a PENDING execution with a start time.
DELAYED = "status = 'PENDING' AND start_at IS NOT NULL"
# The predicate of the live-children index: an unfinished execution that has a parent.
LIVE_CHILD = f"status IN ({_LIVE_SQL}) AND parent_execution_id IS NOT NULL"

# The predicate of the claim index: a READY row that is not held.
CLAIMABLE = "status = 'READY' AND held = false"
# The predicate of the overflow-queue index: PENDING because of max_running_executions.
QUEUED = "status = 'PENDING' AND queued = true"
# The predicate of the running-executions index (max_running_executions counts these).
RUNNING = "status IN ('RUNNING', 'PAUSED')"

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _error_columns() -> list[sa.Column[Any]]:
    """The flattened ``ErrorInfo`` of an execution or a node run (NULL type = no error)."""
    return [
        sa.Column("error_type", sa.Text, nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("error_details", sa.LargeBinary, nullable=True),
        sa.Column("error_node_id", sa.Text, nullable=True),
        sa.Column("error_attempt", sa.Integer, nullable=True),
        sa.Column("error_worker_id", sa.Text, nullable=True),
    ]


workflow_definitions = sa.Table(
    "workflow_definitions",
    metadata,
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("content_hash", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    # json.dumps(model.definition_to_document(defn)) with the stored version.
    sa.Column("document", sa.Text, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint("tenant_id", "name", "version"),
    sa.UniqueConstraint("tenant_id", "name", "content_hash"),
)

executions = sa.Table(
    "executions",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("workflow_name", sa.Text, nullable=False),
    sa.Column("workflow_version", sa.Integer, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("input", sa.LargeBinary, nullable=False),
    sa.Column("output", sa.LargeBinary, nullable=True),
    *_error_columns(),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("idempotency_key", sa.Text, nullable=True),
    sa.Column("parent_execution_id", sa.Text, nullable=True),
    sa.Column("depth", sa.Integer, nullable=False),
    # Optimistic concurrency: every transition writes version + 1 where version matches.
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("ended_at", sa.BigInteger, nullable=True),
    # When the execution times out (the definition's execution_timeout), if it has one.
    sa.Column("deadline", sa.BigInteger, nullable=True),
    # A child execution (sub-workflow): the workflow node of its parent it runs for.
    sa.Column("parent_node_id", sa.Text, nullable=True),
    # A delayed start: the execution stays PENDING (no node runs) until then.
    sa.Column("start_at", sa.BigInteger, nullable=True),
    # Nodes and edges added at run time (dynamic expansion): a JSON document as bytes.
    sa.Column("expansion", sa.LargeBinary, nullable=True),
    # Most nodes of this execution leased at once (0 = no limit).
    sa.Column("max_concurrency", sa.Integer, nullable=False, server_default=sa.text("0")),
    # PENDING behind the workflow's max_running_executions (overflow policy QUEUE).
    sa.Column("queued", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.UniqueConstraint("tenant_id", "idempotency_key"),
    sa.Index(None, "tenant_id", "created_at", "id"),
    sa.Index(None, "tenant_id", "workflow_name", "created_at"),
    # Operators' filters (ListExecutions, bulk actions): by status, and a parent's children.
    sa.Index(None, "tenant_id", "status", "created_at"),
    sa.Index(None, "tenant_id", "parent_execution_id", "created_at"),
    # The execution-timeout sweeper: unfinished executions with a deadline. Finished ones
    # keep their deadline but leave the index, so it stays as small as the live set.
    sa.Index(
        "ix_executions_deadline",
        "deadline",
        postgresql_where=sa.text(f"status IN ({_LIVE_SQL}) AND deadline IS NOT NULL"),
        sqlite_where=sa.text(f"status IN ({_LIVE_SQL}) AND deadline IS NOT NULL"),
    ),
    # The delayed-start sweeper: PENDING executions waiting for their start time.
    sa.Index(
        "ix_executions_start_at",
        "start_at",
        postgresql_where=sa.text(DELAYED),
        sqlite_where=sa.text(DELAYED),
    ),
    # Unfinished children (sub-workflows), by parent: the sweeper that cancels children of
    # finished parents drives from it. Finished children leave it, so it stays small.
    sa.Index(
        "ix_executions_parent_execution_id",
        "parent_execution_id",
        postgresql_where=sa.text(LIVE_CHILD),
        sqlite_where=sa.text(LIVE_CHILD),
    ),
    # The overflow queue of a workflow, oldest first.
    sa.Index(
        "ix_executions_queued",
        "tenant_id",
        "workflow_name",
        "created_at",
        postgresql_where=sa.text(QUEUED),
        sqlite_where=sa.text(QUEUED),
    ),
    # Counting a workflow's running executions (max_running_executions).
    sa.Index(
        "ix_executions_running",
        "tenant_id",
        "workflow_name",
        postgresql_where=sa.text(RUNNING),
        sqlite_where=sa.text(RUNNING),
    ),
)

node_runs = sa.Table(
    "node_runs",
    metadata,
    sa.Column(
        "execution_id",
        sa.Text,
        sa.ForeignKey("executions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("node_id", sa.Text, nullable=False),
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("workflow_name", sa.Text, nullable=False),
    sa.Column("workflow_version", sa.Integer, nullable=False),
    sa.Column("task_type", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("input", sa.LargeBinary, nullable=True),
    sa.Column("output", sa.LargeBinary, nullable=True),
    *_error_columns(),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("available_at", sa.BigInteger, nullable=True),
    sa.Column("start_to_close_ms", sa.BigInteger, nullable=False),
    sa.Column("heartbeat_timeout_ms", sa.BigInteger, nullable=True),
    # Fencing number: incremented by every claim; lease tokens carry it.
    sa.Column("lease_seq", sa.BigInteger, nullable=False),
    sa.Column("worker_id", sa.Text, nullable=True),
    sa.Column("lease_deadline", sa.BigInteger, nullable=True),
    sa.Column("heartbeat_deadline", sa.BigInteger, nullable=True),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    # READY rows still unleased at this time are TIMED_OUT (schedule-to-start).
    sa.Column("schedule_deadline", sa.BigInteger, nullable=True),
    sa.Column("schedule_to_start_ms", sa.BigInteger, nullable=True),
    # Held rows are not dispatched (execution PAUSED or node_paused).
    sa.Column("held", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("node_paused", sa.Boolean, nullable=False, server_default=sa.false()),
    # Attempts made before the last redrive.
    sa.Column("retry_base", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("role", sa.Text, nullable=False, server_default="task"),
    # A workflow node: the child execution it started.
    sa.Column("child_execution_id", sa.Text, nullable=True),
    # Dispatch order with ageing: available_at - priority * TRELLIS_PRIORITY_AGING (ms), so
    # a priority step is worth that much waiting and low priority is never starved.
    sa.Column("dispatch_rank", sa.BigInteger, nullable=True),
    # The value of the type's concurrency-key expression, written when the row is leased.
    sa.Column("concurrency_key", sa.Text, nullable=True),
    sa.PrimaryKeyConstraint("execution_id", "node_id"),
    # The claim: WHERE status = 'READY' AND held = false AND tenant_id = ?
    # AND task_type IN (...) AND available_at <= now ORDER BY dispatch_rank.
    # Queries must spell the status and the flag as the literals 'READY' and false (not
    # bound parameters) for the planner to use it.
    sa.Index(
        "ix_node_runs_dispatch",
        "tenant_id",
        "task_type",
        "dispatch_rank",
        postgresql_where=sa.text(CLAIMABLE),
        sqlite_where=sa.text(CLAIMABLE),
    ),
    # Concurrency limits count leased rows by type and key.
    sa.Index(
        "ix_node_runs_leased_type",
        "tenant_id",
        "task_type",
        "concurrency_key",
        postgresql_where=sa.text("status = 'LEASED'"),
        sqlite_where=sa.text("status = 'LEASED'"),
    ),
    # The schedule-to-start sweeper: claimable rows with a deadline.
    sa.Index(
        "ix_node_runs_schedule_deadline",
        "schedule_deadline",
        postgresql_where=sa.text(f"{CLAIMABLE} AND schedule_deadline IS NOT NULL"),
        sqlite_where=sa.text(f"{CLAIMABLE} AND schedule_deadline IS NOT NULL"),
    ),
    # The lease sweeper: LEASED rows past either deadline.
    sa.Index(
        "ix_node_runs_lease_deadline",
        "lease_deadline",
        postgresql_where=sa.text("status = 'LEASED'"),
        sqlite_where=sa.text("status = 'LEASED'"),
    ),
    # WAITING rows: sub-workflow reconciliation (workflow nodes WAITING on a child
    # execution), and approval nodes past their deadline (schedule_deadline) for the sweeper.
    sa.Index(
        "ix_node_runs_waiting",
        "child_execution_id",
        postgresql_where=sa.text("status = 'WAITING'"),
        sqlite_where=sa.text("status = 'WAITING'"),
    ),
    sa.Index(
        "ix_node_runs_heartbeat_deadline",
        "heartbeat_deadline",
        postgresql_where=sa.text("status = 'LEASED'"),
        sqlite_where=sa.text("status = 'LEASED'"),
    ),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("sequence", BigIntId, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column(
        "execution_id",
        sa.Text,
        sa.ForeignKey("executions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("node_id", sa.Text, nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("worker_id", sa.Text, nullable=True),
    sa.Column("time", sa.BigInteger, nullable=False),
    sa.Column("details", sa.LargeBinary, nullable=True),
    sa.Index(None, "execution_id", "sequence"),
    # AUTOINCREMENT: SQLite never reuses a sequence number, even after deletes.
    sqlite_autoincrement=True,
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("id", sa.Text, nullable=False),
    sa.Column("task_types", sa.Text, nullable=False),  # JSON list
    sa.Column("capacity", sa.Integer, nullable=False),
    sa.Column("labels", sa.Text, nullable=False),  # JSON object
    sa.Column("sdk_language", sa.Text, nullable=False),
    sa.Column("sdk_version", sa.Text, nullable=False),
    sa.Column("identity", sa.Text, nullable=False),
    sa.Column("last_seen", sa.BigInteger, nullable=False),
    # The credential that registered the worker (0007; "" before authentication existed).
    sa.Column("credential", sa.Text, nullable=False, server_default=""),
    sa.PrimaryKeyConstraint("tenant_id", "id"),
    # The lost-worker sweeper: workers silent since a cutoff.
    sa.Index(None, "last_seen"),
)

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column(
        "execution_id",
        sa.Text,
        sa.ForeignKey("executions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("workflow_name", sa.Text, nullable=False),
    sa.Column("workflow_version", sa.Integer, nullable=False),
    sa.Column("node_id", sa.Text, nullable=False),
    sa.Column("task_type", sa.Text, nullable=False),
    sa.Column("input", sa.LargeBinary, nullable=True),
    # JSON list of {attempt, type, message, details (JSON text or null), worker_id, time (ms)}.
    sa.Column("attempts", sa.Text, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("redriven_at", sa.BigInteger, nullable=True),
    # Listing, newest first: all of a tenant's, or (the usual view) those not yet redriven.
    sa.Index(None, "tenant_id", "created_at", "id"),
    sa.Index(
        "ix_dead_letters_unredriven",
        "tenant_id",
        "created_at",
        "id",
        postgresql_where=sa.text("redriven_at IS NULL"),
        sqlite_where=sa.text("redriven_at IS NULL"),
    ),
    # An execution's dead letters (and the cascade when an execution is deleted).
    sa.Index(None, "execution_id"),
)

# Dispatch limits per task type (docs/dispatch.md), read by every replica's claim.
task_type_limits = sa.Table(
    "task_type_limits",
    metadata,
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("task_type", sa.Text, nullable=False),
    sa.Column("rate_per_second", sa.Float, nullable=False),
    sa.Column("burst", sa.Integer, nullable=False),
    sa.Column("rate_key", sa.Text, nullable=False),
    sa.Column("max_concurrency", sa.Integer, nullable=False),
    sa.Column("concurrency_key", sa.Text, nullable=False),
    sa.Column("concurrency_key_limit", sa.Integer, nullable=False),
    sa.Column("breaker_failure_threshold", sa.Integer, nullable=False),
    sa.Column("breaker_reset_ms", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint("tenant_id", "task_type"),
)

# -- notifications (migration 0005) -------------------------------------------------------

# The dispatcher's scan: PENDING deliveries by due time. Queries spell the status as this
# literal so the planners match the partial index.
DELIVERY_DUE = "status = 'PENDING'"

notification_channels = sa.Table(
    "notification_channels",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    # JSON object, validated at creation (coordinator.notify.validate_channel).
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("tenant_id", "name"),
)

notification_rules = sa.Table(
    "notification_rules",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column(
        "channel_id",
        sa.Text,
        sa.ForeignKey("notification_channels.id", ondelete="CASCADE"),
        nullable=False,
    ),
    # Exactly one of workflow_name (every version) and execution_id is set.
    sa.Column("workflow_name", sa.Text, nullable=True),
    sa.Column(
        "execution_id",
        sa.Text,
        sa.ForeignKey("executions.id", ondelete="CASCADE"),
        nullable=True,
    ),
    sa.Column("statuses", sa.Text, nullable=False),  # JSON list of execution statuses
    sa.Column("created_at", sa.BigInteger, nullable=False),
    # The lookup when an execution ends: rules on its workflow or on it.
    sa.Index(None, "tenant_id", "workflow_name"),
    sa.Index(None, "tenant_id", "execution_id"),
    sa.Index(None, "channel_id"),
)

notification_deliveries = sa.Table(
    "notification_deliveries",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column(
        "execution_id",
        sa.Text,
        sa.ForeignKey("executions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("workflow_name", sa.Text, nullable=False),
    sa.Column("execution_status", sa.Text, nullable=False),
    # No foreign keys to channels and rules: the history outlives them.
    sa.Column("channel_id", sa.Text, nullable=False),
    sa.Column("rule_id", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("next_attempt_at", sa.BigInteger, nullable=False),
    # A claim: held until this time by the replica sending it; fenced by claim_seq.
    sa.Column("claimed_until", sa.BigInteger, nullable=True),
    sa.Column("claim_seq", sa.BigInteger, nullable=False),
    sa.Column("delivered_at", sa.BigInteger, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Index(
        "ix_notification_deliveries_due",
        "next_attempt_at",
        postgresql_where=sa.text(DELIVERY_DUE),
        sqlite_where=sa.text(DELIVERY_DUE),
    ),
    sa.Index(None, "tenant_id", "created_at", "id"),
    sa.Index(None, "tenant_id", "execution_id"),
    sa.Index(None, "tenant_id", "channel_id", "created_at"),
)

notification_attempts = sa.Table(
    "notification_attempts",
    metadata,
    sa.Column(
        "delivery_id",
        sa.Text,
        sa.ForeignKey("notification_deliveries.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("time", sa.BigInteger, nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.PrimaryKeyConstraint("delivery_id", "attempt"),
)


# -- triggers (migration 0004) ------------------------------------------------------------

webhook_triggers = sa.Table(
    "webhook_triggers",
    metadata,
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("workflow_name", sa.Text, nullable=False),
    sa.Column("workflow_version", sa.Integer, nullable=False),
    sa.Column("auth", sa.Text, nullable=False),
    # The HMAC key, or the SHA-256 hex digest of the bearer token.
    sa.Column("secret", sa.Text, nullable=False),
    sa.Column("tolerance_ms", sa.BigInteger, nullable=False),
    sa.Column("idempotency_expr", sa.Text, nullable=False),
    sa.Column("input_expr", sa.Text, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint("tenant_id", "path"),
)

# Signed webhook deliveries seen, by a digest of (path, t, body), until their
# signature's timestamp leaves the trigger's tolerance: a replay inside the window finds
# its row (the insert is atomic on the primary key, so of replicas racing, one admits it).
webhook_replays = sa.Table(
    "webhook_replays",
    metadata,
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("digest", sa.Text, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint("tenant_id", "digest"),
    sa.Index(None, "expires_at"),
)

event_triggers = sa.Table(
    "event_triggers",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("event_name", sa.Text, nullable=False),
    sa.Column("workflow_name", sa.Text, nullable=False),
    sa.Column("workflow_version", sa.Integer, nullable=False),
    sa.Column("filter_expr", sa.Text, nullable=False),
    sa.Column("input_expr", sa.Text, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Index(None, "tenant_id", "event_name"),
)

schedules = sa.Table(
    "schedules",
    metadata,
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("id", sa.Text, nullable=False),
    sa.Column("cron", sa.Text, nullable=False),
    sa.Column("timezone", sa.Text, nullable=False),
    sa.Column("workflow_name", sa.Text, nullable=False),
    sa.Column("workflow_version", sa.Integer, nullable=False),
    sa.Column("input", sa.LargeBinary, nullable=False),
    sa.Column("overlap", sa.Text, nullable=False),
    sa.Column("catchup", sa.Text, nullable=False),
    sa.Column("max_catchup", sa.Integer, nullable=False),
    sa.Column("paused", sa.Boolean, nullable=False),
    # NULL while paused; the scheduler claims rows with next_fire_at <= now.
    sa.Column("next_fire_at", sa.BigInteger, nullable=True),
    sa.Column("last_fire_at", sa.BigInteger, nullable=True),
    sa.Column("last_execution_id", sa.Text, nullable=True),
    sa.Column("buffered_fire_at", sa.BigInteger, nullable=True),
    sa.Column("started_fires", sa.BigInteger, nullable=False),
    sa.Column("skipped_fires", sa.BigInteger, nullable=False),
    sa.Column("missed_fires", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint("tenant_id", "id"),
    sa.Index(None, "next_fire_at"),
    sa.Index(None, "buffered_fire_at"),
)

# One row per fire time acted on: the primary key makes a second fire of the same time
# impossible, whatever the replicas do.
schedule_fires = sa.Table(
    "schedule_fires",
    metadata,
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("schedule_id", sa.Text, nullable=False),
    sa.Column("fire_at", sa.BigInteger, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("execution_id", sa.Text, nullable=True),
    sa.Column("recorded_at", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint("tenant_id", "schedule_id", "fire_at"),
)


# -- identity and audit (migration 0007) --------------------------------------------------

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("created_by", sa.Text, nullable=False),
)

# The predicate of the certificate-subject index: one certificate credential per subject.
CERTIFICATE = "kind = 'certificate'"

credentials = sa.Table(
    "credentials",
    metadata,
    # Globally unique: an API key presents its id, so it is found before its tenant is known.
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),  # CredentialKind value
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("roles", sa.Text, nullable=False),  # JSON list of role names
    # API keys: the keyed hash of the secret part and the id of the key that keyed it.
    sa.Column("secret_hash", sa.Text, nullable=False),
    sa.Column("hash_key_id", sa.Text, nullable=False),
    # Certificates: the common name the client certificate carries ("" for API keys).
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("created_by", sa.Text, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=True),
    sa.Column("last_used_at", sa.BigInteger, nullable=True),
    sa.Column("revoked_at", sa.BigInteger, nullable=True),
    sa.Index(None, "tenant_id"),
    # find_certificate, and at most one certificate credential per subject (revoked or not).
    sa.Index(
        "ix_credentials_certificate_subject",
        "subject",
        unique=True,
        postgresql_where=sa.text(CERTIFICATE),
        sqlite_where=sa.text(CERTIFICATE),
    ),
)

# Custom roles; the built-in ones (model.BUILTIN_ROLES) are not stored.
roles = sa.Table(
    "roles",
    metadata,
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    # JSON list of grants in their written form (str(Grant)), sorted; model.parse_grants.
    sa.Column("grants", sa.Text, nullable=False),
    sa.PrimaryKeyConstraint("tenant_id", "name"),
)

# Secrets the coordinator generates for itself (id "main"): the first replica to start
# stores its candidate, every other one reads it.
server_secrets = sa.Table(
    "server_secrets",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("secret", sa.Text, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

# The audit trail: one hash chain per tenant, numbered from 1. Append-only: the store
# never updates or deletes a record (``trellis audit verify`` finds rows that were).
audit_records = sa.Table(
    "audit_records",
    metadata,
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("at", sa.BigInteger, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("credential", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("request_id", sa.Text, nullable=False),
    # The previous record's hash ("" for record 1) and model.audit_hash of this one.
    sa.Column("prev_hash", sa.Text, nullable=False),
    sa.Column("hash", sa.Text, nullable=False),
    sa.PrimaryKeyConstraint("tenant_id", "seq"),
    # Listing one actor's records.
    sa.Index(None, "tenant_id", "actor", "seq"),
)

# The head of each tenant's chain: its last record's seq and hash. An append locks this
# row (FOR UPDATE on PostgreSQL; SQLite's single writer), so appends of a tenant queue, and
# verify finds records removed from the end.
audit_heads = sa.Table(
    "audit_heads",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.Text, nullable=False),
)

# -- the secret store (migration 0008) ----------------------------------------------------

# ``value`` is sealed (coordinator/sealing.py: AES-256-GCM, its key id in the text), as are
# webhook_triggers.secret and notification_channels.config.
secrets = sa.Table(
    "secrets",
    metadata,
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint("tenant_id", "name"),
)

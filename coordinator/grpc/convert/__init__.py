"""Every proto<->domain conversion of the coordinator lives in this package, one module per
service; the servicers decode a request with it, call the service and encode the reply with it.

- ``_common``: what several services use: timestamps, durations, execution statuses and
  filters, and
  node definitions (a workflow's, and a DAG expansion's).
- ``_worker``: WorkerService: leased tasks, completions and their options, failures,
  batched results.
- ``_workflow``: WorkflowService: definitions, starts, executions with their node runs and
  events, dead letters.
- ``_triggers``: TriggerService: webhook and event triggers, schedules, published events.
- ``_notifications``: NotificationService: channels, rules and deliveries.
- ``_dispatch``: DispatchService: task-type limits, breakers and the sharing status.
- ``_identity``: IdentityService: tenants, credentials, roles, audit records, the caller.
- ``_secrets``: SecretService: secrets as listed (never a value), key rotation reports.

Callers import from here (``from coordinator.grpc import convert``), never from the
private modules.
"""

from coordinator.grpc.convert._common import (
    duration_or_none,
    duration_to_proto,
    execution_filter_from_proto,
    execution_filter_to_proto,
    execution_status_from_proto,
    execution_status_to_proto,
    node_from_proto,
    node_to_proto_definition,
    retry_from_proto,
    retry_to_proto,
    timestamp_or_none,
    timestamp_to_proto,
    trigger_rule_from_proto,
)
from coordinator.grpc.convert._dispatch import (
    breaker_to_proto,
    dispatch_status_to_proto,
    limits_from_proto,
    limits_to_proto,
)
from coordinator.grpc.convert._identity import (
    audit_record_to_proto,
    credential_to_proto,
    principal_to_proto,
    role_to_proto,
    tenant_to_proto,
)
from coordinator.grpc.convert._notifications import (
    channel_settings_from_proto,
    channel_to_proto,
    delivery_status_from_proto,
    delivery_to_proto,
    rule_statuses_from_proto,
    rule_to_proto,
)
from coordinator.grpc.convert._secrets import rotation_to_proto, secret_to_proto
from coordinator.grpc.convert._triggers import (
    catchup_from_proto,
    event_trigger_to_proto,
    fire_to_proto,
    overlap_from_proto,
    publish_result_to_proto,
    schedule_to_proto,
    webhook_to_proto,
)
from coordinator.grpc.convert._worker import (
    complete_options_from_proto,
    expansion_from_proto,
    map_index,
    result_from_proto,
    result_status_to_proto,
    task_error_from_proto,
    task_to_proto,
)
from coordinator.grpc.convert._workflow import (
    dead_letter_to_proto,
    definition_from_proto,
    definition_to_proto,
    error_to_proto,
    event_to_proto,
    execution_to_proto,
    execution_view_to_proto,
    node_to_proto,
    overflow_policy_from_proto,
    start_request_from_proto,
    summary_to_proto,
)

__all__ = [
    "audit_record_to_proto",
    "breaker_to_proto",
    "catchup_from_proto",
    "channel_settings_from_proto",
    "channel_to_proto",
    "complete_options_from_proto",
    "credential_to_proto",
    "dead_letter_to_proto",
    "definition_from_proto",
    "definition_to_proto",
    "delivery_status_from_proto",
    "delivery_to_proto",
    "dispatch_status_to_proto",
    "duration_or_none",
    "duration_to_proto",
    "error_to_proto",
    "event_to_proto",
    "event_trigger_to_proto",
    "execution_filter_from_proto",
    "execution_filter_to_proto",
    "execution_status_from_proto",
    "execution_status_to_proto",
    "execution_to_proto",
    "execution_view_to_proto",
    "expansion_from_proto",
    "fire_to_proto",
    "limits_from_proto",
    "limits_to_proto",
    "map_index",
    "node_from_proto",
    "node_to_proto",
    "node_to_proto_definition",
    "overflow_policy_from_proto",
    "overlap_from_proto",
    "principal_to_proto",
    "publish_result_to_proto",
    "result_from_proto",
    "result_status_to_proto",
    "retry_from_proto",
    "retry_to_proto",
    "role_to_proto",
    "rotation_to_proto",
    "rule_statuses_from_proto",
    "rule_to_proto",
    "schedule_to_proto",
    "secret_to_proto",
    "start_request_from_proto",
    "summary_to_proto",
    "task_error_from_proto",
    "task_to_proto",
    "tenant_to_proto",
    "timestamp_or_none",
    "timestamp_to_proto",
    "trigger_rule_from_proto",
    "webhook_to_proto",
]

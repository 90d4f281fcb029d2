"""Use cases of the coordinator, over the store protocols of ``ports`` (no grpc, no
SQLAlchemy). ``Coordinator`` is their composition root; every other package imports the
service's types from here, never from its private modules."""

from coordinator.model import LeaseKey, NewExecution
from coordinator.service._approvals import ADMIN_ROLE, Approvals
from coordinator.service._audit import PENDING_AUDIT, take_pending_audit
from coordinator.service._backpressure import PollWaiters, StartRate, WatchSlots
from coordinator.service._common import Clock, Draining, ServiceSettings, utcnow
from coordinator.service._coordinator import Coordinator
from coordinator.service._executions import ExecutionView
from coordinator.service._heartbeats import HeartbeatResult
from coordinator.service._identity import (
    API_KEY_PREFIX,
    Authenticator,
    IdentityAdmin,
    KeyRing,
    NewApiKey,
)
from coordinator.service._leasing import LeasedTask
from coordinator.service._limits import DispatchStatus, LimitsAdmin
from coordinator.service._notifications import (
    DeliverySettings,
    NotificationDispatcher,
    NotificationService,
)
from coordinator.service._notifier import Notifier
from coordinator.service._results import MAX_REPORT_BATCH, Completion, Failure, ResultOutcome
from coordinator.service._rules import RuleBook, with_deliveries
from coordinator.service._schedules import Scheduler, Schedules
from coordinator.service._secrets import SecretInfo, SecretsAdmin, SecretVault
from coordinator.service._starts import MAX_BATCH_START, MAX_START_DELAY, StartRequest
from coordinator.service._sweeps import Sweeper
from coordinator.service._tokens import Holder, LeaseSigner, LeaseToken
from coordinator.service._triggers import PublishResult, Triggers
from coordinator.service.ports import (
    AuditRepository,
    BearerVerifier,
    Decision,
    IdentityRepository,
    Store,
)

__all__ = [
    "ADMIN_ROLE",
    "API_KEY_PREFIX",
    "MAX_BATCH_START",
    "MAX_REPORT_BATCH",
    "MAX_START_DELAY",
    "PENDING_AUDIT",
    "Approvals",
    "AuditRepository",
    "Authenticator",
    "BearerVerifier",
    "Clock",
    "Completion",
    "Coordinator",
    "Decision",
    "DeliverySettings",
    "DispatchStatus",
    "Draining",
    "ExecutionView",
    "Failure",
    "HeartbeatResult",
    "Holder",
    "IdentityAdmin",
    "IdentityRepository",
    "KeyRing",
    "LeaseKey",
    "LeaseSigner",
    "LeaseToken",
    "LeasedTask",
    "LimitsAdmin",
    "NewApiKey",
    "NewExecution",
    "NotificationDispatcher",
    "NotificationService",
    "Notifier",
    "PollWaiters",
    "PublishResult",
    "ResultOutcome",
    "RuleBook",
    "Scheduler",
    "Schedules",
    "SecretInfo",
    "SecretVault",
    "SecretsAdmin",
    "ServiceSettings",
    "StartRate",
    "StartRequest",
    "Store",
    "Sweeper",
    "Triggers",
    "WatchSlots",
    "take_pending_audit",
    "utcnow",
    "with_deliveries",
]

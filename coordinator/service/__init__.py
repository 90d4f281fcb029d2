"""Use cases of the coordinator, over the ``Store`` protocol (no grpc, no SQLAlchemy)."""

from coordinator.model import LeaseKey, NewExecution
from coordinator.service._coordinator import (
    MAX_REPORT_BATCH,
    Completion,
    Coordinator,
    ExecutionView,
    Failure,
    HeartbeatResult,
    LeasedTask,
    ResultOutcome,
    ServiceSettings,
    utcnow,
)
from coordinator.service._notifier import Notifier
from coordinator.service._rules import RuleBook, with_deliveries
from coordinator.service._starts import MAX_BATCH_START, MAX_START_DELAY, StartRequest
from coordinator.service._sweeps import Sweeper
from coordinator.service._tokens import LeaseToken
from coordinator.service.ports import Decision, Store

__all__ = [
    "MAX_BATCH_START",
    "MAX_REPORT_BATCH",
    "MAX_START_DELAY",
    "Completion",
    "Coordinator",
    "Decision",
    "ExecutionView",
    "Failure",
    "HeartbeatResult",
    "LeaseKey",
    "LeaseToken",
    "LeasedTask",
    "NewExecution",
    "Notifier",
    "ResultOutcome",
    "RuleBook",
    "ServiceSettings",
    "StartRequest",
    "Store",
    "Sweeper",
    "utcnow",
    "with_deliveries",
]

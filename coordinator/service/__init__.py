"""Use cases of the coordinator, over the ``Store`` protocol (no grpc, no SQLAlchemy)."""

from coordinator.service._coordinator import (
    Coordinator,
    ExecutionView,
    HeartbeatResult,
    LeasedTask,
    ServiceSettings,
    utcnow,
)
from coordinator.service._notifier import Notifier
from coordinator.service._starts import MAX_BATCH_START, MAX_START_DELAY, StartRequest
from coordinator.service._sweeps import Sweeper
from coordinator.service._tokens import LeaseToken
from coordinator.service.ports import Decision, LeaseKey, NewExecution, Store

__all__ = [
    "MAX_BATCH_START",
    "MAX_START_DELAY",
    "Coordinator",
    "Decision",
    "ExecutionView",
    "HeartbeatResult",
    "LeaseKey",
    "LeaseToken",
    "LeasedTask",
    "NewExecution",
    "Notifier",
    "ServiceSettings",
    "StartRequest",
    "Store",
    "Sweeper",
    "utcnow",
]

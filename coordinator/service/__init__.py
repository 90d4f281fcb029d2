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
from coordinator.service._sweeps import Sweeper
from coordinator.service._tokens import LeaseToken
from coordinator.service.ports import Decision, LeaseKey, Store

__all__ = [
    "Coordinator",
    "Decision",
    "ExecutionView",
    "HeartbeatResult",
    "LeaseKey",
    "LeaseToken",
    "LeasedTask",
    "Notifier",
    "ServiceSettings",
    "Store",
    "Sweeper",
    "utcnow",
]

"""The Trellis Python SDK: write workers, define workflows, drive executions.

A worker in a dozen lines::

    from worker_sdk import Worker, task

    @task("send-email", timeout="30s", retries=3)
    async def send_email(ctx, data):
        ctx.heartbeat({"sent": 0})
        ...
        return {"ok": True}

    Worker(tasks=[send_email]).run()

and a client::

    async with Client() as client:
        run = await client.start_execution("orders", {"order_id": 42})
        done = await client.wait_for_execution(run.id)

The SDK logs through ``logging`` (loggers under ``worker_sdk``; handler logs via
``ctx.logger`` go to ``worker_sdk.task``) and never configures handlers.
"""

__version__ = "0.1.0"

from worker_sdk._client import Client
from worker_sdk._definition import Workflow, load_workflow
from worker_sdk._errors import (
    DefinitionError,
    FailedPreconditionError,
    InvalidArgumentError,
    NonRetryableError,
    NotFoundError,
    ResourceExhaustedError,
    RpcError,
    TrellisError,
    UnavailableError,
)
from worker_sdk._filters import ExecutionFilter
from worker_sdk._nodes import ApprovalNode, Case, MapNode, SwitchNode, TaskNode, WorkflowNode
from worker_sdk._result import Result
from worker_sdk._settings import DEFAULT_ADDRESS, TlsSettings
from worker_sdk._task import Task, TaskContext, task
from worker_sdk._types import (
    AttemptFailure,
    DeadLetter,
    ErrorDetails,
    Event,
    Execution,
    NodeState,
    RegisteredWorkflow,
    WorkflowSummary,
)
from worker_sdk._worker import Worker

__all__ = [
    "DEFAULT_ADDRESS",
    "ApprovalNode",
    "AttemptFailure",
    "Case",
    "Client",
    "DeadLetter",
    "DefinitionError",
    "ErrorDetails",
    "Event",
    "Execution",
    "ExecutionFilter",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "MapNode",
    "NodeState",
    "NonRetryableError",
    "NotFoundError",
    "RegisteredWorkflow",
    "ResourceExhaustedError",
    "Result",
    "RpcError",
    "SwitchNode",
    "Task",
    "TaskContext",
    "TaskNode",
    "TlsSettings",
    "TrellisError",
    "UnavailableError",
    "Worker",
    "Workflow",
    "WorkflowNode",
    "WorkflowSummary",
    "__version__",
    "load_workflow",
    "task",
]

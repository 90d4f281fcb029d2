"""The SDK's public surface: exports, errors, durations, the @task decorator, TaskContext."""

from __future__ import annotations

import functools
import logging
from datetime import timedelta
from typing import Any

import grpc
import pytest

import worker_sdk
from worker_sdk import (
    DefinitionError,
    NonRetryableError,
    NotFoundError,
    RpcError,
    Task,
    TaskContext,
    TrellisError,
    UnavailableError,
    task,
)
from worker_sdk._duration import parse_duration, parse_positive_duration
from worker_sdk._errors import rpc_error


def test_public_api_is_pinned() -> None:
    assert worker_sdk.__all__ == [
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
    assert worker_sdk.__version__ == "0.1.0"
    assert worker_sdk.DEFAULT_ADDRESS == "127.0.0.1:7400"
    for name in worker_sdk.__all__:
        value = getattr(worker_sdk, name)
        if isinstance(value, type):
            assert value.__doc__, f"{name} needs a docstring"


def test_sdk_does_not_import_the_coordinator() -> None:
    import subprocess
    import sys

    code = "import sys, worker_sdk; print('coordinator' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_error_tree() -> None:
    assert issubclass(RpcError, TrellisError)
    assert issubclass(NonRetryableError, TrellisError)
    assert issubclass(DefinitionError, TrellisError)
    assert issubclass(DefinitionError, ValueError)


class _FakeAioError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.PERMISSION_DENIED, RpcError),
    ],
)
def test_rpc_errors_keep_code_and_message(code: grpc.StatusCode, cls: type[RpcError]) -> None:
    error = rpc_error(_FakeAioError(code, "what went wrong"), "GetExecution")
    assert type(error) is cls
    assert error.code == code
    assert error.message == "what went wrong"
    assert str(error) == f"GetExecution: {code.name}: what went wrong"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("250ms", timedelta(milliseconds=250)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1.5s", timedelta(seconds=1.5)),
        (" 2D ", timedelta(days=2)),
        ("0s", timedelta()),
        (12, timedelta(seconds=12)),
        (0.25, timedelta(milliseconds=250)),
        (timedelta(minutes=2), timedelta(minutes=2)),
    ],
)
def test_parse_duration(text: Any, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("30", "expected a number with a unit"),
        ("5 minutes", "expected a number with a unit"),
        ("", "expected a number with a unit"),
        ("-5s", "expected a number with a unit"),
        (-1, "must not be negative"),
        (float("inf"), "finite"),
        (True, "invalid"),
        (None, "expected a string"),
        ([1], "expected a string"),
    ],
)
def test_parse_duration_rejects_bad_values(value: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as info:
        parse_duration(value, what="task timeout")
    assert "invalid task timeout" in str(info.value)


def test_positive_duration_refuses_zero() -> None:
    with pytest.raises(ValueError, match="greater than zero"):
        parse_positive_duration("0s")


def test_task_decorator() -> None:
    @task("resize", timeout="5m", retries=2)
    async def resize(ctx: TaskContext, data: Any) -> Any:
        return data

    @task("sync")
    def sync(ctx: TaskContext, data: Any) -> Any:
        return data + 1

    assert isinstance(resize, Task)
    assert (resize.name, resize.timeout, resize.retries) == ("resize", timedelta(minutes=5), 2)
    assert resize.is_async
    assert not sync.is_async
    assert sync.timeout is None and sync.retries is None
    assert sync(None, 1) == 2  # type: ignore[arg-type]  # still callable

    async def with_option(ctx: TaskContext, data: Any, *, option: int) -> Any:
        return option

    assert Task("partial", functools.partial(with_option, option=1)).is_async
    assert Task("hand-made", sync.handler, timeout="2s").timeout == timedelta(seconds=2)  # type: ignore[arg-type]


def test_task_decorator_rejects_mistakes() -> None:
    def handler(ctx: TaskContext, data: Any) -> Any:
        return None

    with pytest.raises(TypeError, match=r"use @task\('name'\)"):
        task(handler)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid task timeout 'soon'"):
        task("x", timeout="soon")
    with pytest.raises(ValueError, match="greater than zero"):
        task("x", timeout=0)
    with pytest.raises(ValueError, match="retries must be a non-negative integer"):
        task("x", retries=-1)(handler)
    with pytest.raises(ValueError, match="non-empty"):
        task("")(handler)


def test_task_context(caplog: pytest.LogCaptureFixture) -> None:
    from worker_sdk._task import _LeaseSignals

    beats: list[int] = []
    signals = _LeaseSignals(lambda: beats.append(1))
    ctx = TaskContext(
        execution_id="e1",
        node_id="n1",
        task_type="t",
        attempt=2,
        idempotency_key="e1/n1",
        worker_id="w1",
        _signals=signals,
    )
    ctx.heartbeat({"step": 1})
    assert signals.details == b'{"step":1}'
    assert beats == [1]
    with pytest.raises(TypeError, match="not JSON-serializable"):
        ctx.heartbeat({"x": object()})
    assert not ctx.cancelled
    signals.cancel()
    assert ctx.cancelled
    with caplog.at_level(logging.INFO, logger="worker_sdk.task"):
        ctx.logger.info("hello")
    record = caplog.records[-1]
    ids = {k: getattr(record, k) for k in ("execution_id", "node_id", "attempt", "worker_id")}
    assert ids == {"execution_id": "e1", "node_id": "n1", "attempt": 2, "worker_id": "w1"}
    with pytest.raises(AttributeError):
        setattr(ctx, "attempt", 3)  # noqa: B010 - frozen

"""The Client: register workflows, start executions, inspect and watch them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from trellis.v1 import common_pb2, workflow_service_pb2, workflow_service_pb2_grpc
from worker_sdk._channel import TRANSIENT_CODES, Backoff, open_channel, retry_after
from worker_sdk._convert import (
    dead_letter_from_proto,
    event_from_proto,
    execution_from_proto,
    execution_status_from_name,
    start_request,
)
from worker_sdk._definition import Workflow, load_workflow
from worker_sdk._duration import Duration
from worker_sdk._errors import RpcError, rpc_error
from worker_sdk._filters import ExecutionFilter
from worker_sdk._settings import TlsSettings, connection_settings
from worker_sdk._types import DeadLetter, Event, Execution, RegisteredWorkflow, WorkflowSummary

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_PAGE_SIZE = 100

WorkflowSource = Workflow | common_pb2.WorkflowDefinition | str | os.PathLike[str]
"""What ``register_workflow`` accepts: a builder, a proto, or a YAML/JSON file path."""


class Client:
    """Talks to the coordinator's WorkflowService::

        async with Client("127.0.0.1:7400") as client:
            await client.register_workflow("workflows/orders.yaml")
            run = await client.start_execution("orders", {"order_id": 42})
            done = await client.wait_for_execution(run.id, timeout=60)

    ``address`` is the coordinator's HOST:PORT; without it, ``TRELLIS_ADDRESS`` or else
    ``127.0.0.1:7400`` (as for the ``trellis`` CLI and the Worker). ``api_key`` and
    ``tls`` as for the Worker (else ``TRELLIS_API_KEY``, ``TRELLIS_CA_FILE`` ...).
    ``timeout`` is the deadline of each unary call in seconds (None: none).
    Failed calls raise ``RpcError`` (or a subclass such as ``NotFoundError``).
    A start refused by the coordinator's backpressure (RESOURCE_EXHAUSTED with a
    retry hint) is retried after the hinted delay for up to ``backpressure_wait``
    seconds in all (0: raise ``ResourceExhaustedError`` at once).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | None = 30.0,
        backpressure_wait: float = 30.0,
        api_key: str | None = None,
        tls: TlsSettings | None = None,
    ) -> None:
        if not backpressure_wait >= 0:
            raise ValueError(f"backpressure_wait must not be negative, got {backpressure_wait!r}")
        self._settings = connection_settings(address, api_key=api_key, tls=tls)
        self._timeout = timeout
        self._backpressure_wait = backpressure_wait
        self._channel: grpc.aio.Channel | None = None
        self._stub_: workflow_service_pb2_grpc.WorkflowServiceAsyncStub | None = None

    @property
    def address(self) -> str:
        """The coordinator's HOST:PORT this Client talks to."""
        return self._settings.address

    async def __aenter__(self) -> Self:
        self._stub()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connection (the Client reconnects if used again)."""
        channel, self._channel, self._stub_ = self._channel, None, None
        if channel is not None:
            await channel.close()

    def _stub(self) -> workflow_service_pb2_grpc.WorkflowServiceAsyncStub:
        if self._stub_ is None:
            self._channel = open_channel(self._settings)
            self._stub_ = workflow_service_pb2_grpc.WorkflowServiceStub(self._channel)
        return self._stub_

    async def _rpc(self, method: str, call: Awaitable[_T]) -> _T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, method) from exc

    async def _throttled_rpc(self, method: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()``, retried while the coordinator refuses it with a retry hint
        (RESOURCE_EXHAUSTED from backpressure: nothing was done), within ``backpressure_wait``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._backpressure_wait
        backoff = Backoff()
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or retry_after(exc) is None:
                    raise rpc_error(exc, method) from exc
                delay = backoff.delay_after(exc)
                if loop.time() + delay > deadline:
                    raise rpc_error(exc, method) from exc
                if backoff.failures == 1:
                    logger.info("%s: %s; retrying", method, exc.details())
                await asyncio.sleep(delay)

    # Definitions -------------------------------------------------------------------

    async def register_workflow(self, definition: WorkflowSource) -> RegisteredWorkflow:
        """Registers a definition; a changed definition under an existing name gets a new version.

        Raises DefinitionError for an unreadable file and InvalidArgumentError when
        the coordinator refuses the definition (cycles, unknown references ...).
        """
        if isinstance(definition, Workflow):
            msg = definition.to_proto()
        elif isinstance(definition, common_pb2.WorkflowDefinition):
            msg = definition
        elif isinstance(definition, str | os.PathLike):
            msg = load_workflow(definition)
        else:
            raise TypeError(
                "register_workflow takes a Workflow, a WorkflowDefinition or a file path, "
                f"not {type(definition).__name__}"
            )
        response = await self._rpc(
            "RegisterWorkflow",
            self._stub().RegisterWorkflow(
                workflow_service_pb2.RegisterWorkflowRequest(definition=msg),
                timeout=self._timeout,
            ),
        )
        return RegisteredWorkflow(
            name=response.definition.name,
            version=response.definition.version,
            created=response.created,
        )

    async def get_workflow(
        self, name: str, version: int | None = None
    ) -> common_pb2.WorkflowDefinition:
        """A registered definition (the latest version unless ``version`` is given)."""
        response = await self._rpc(
            "GetWorkflow",
            self._stub().GetWorkflow(
                workflow_service_pb2.GetWorkflowRequest(name=name, version=version or 0),
                timeout=self._timeout,
            ),
        )
        return response.definition

    async def list_workflow_versions(self, name: str) -> list[common_pb2.WorkflowDefinition]:
        """Every registered version of workflow ``name``, oldest first."""
        response = await self._rpc(
            "ListWorkflowVersions",
            self._stub().ListWorkflowVersions(
                workflow_service_pb2.ListWorkflowVersionsRequest(name=name),
                timeout=self._timeout,
            ),
        )
        return list(response.definitions)

    async def list_workflows(self) -> list[WorkflowSummary]:
        """Every registered workflow with its latest version."""
        result: list[WorkflowSummary] = []
        token = ""
        while True:
            response = await self._rpc(
                "ListWorkflows",
                self._stub().ListWorkflows(
                    workflow_service_pb2.ListWorkflowsRequest(
                        page_size=_PAGE_SIZE, page_token=token
                    ),
                    timeout=self._timeout,
                ),
            )
            result.extend(
                WorkflowSummary(
                    name=w.name, latest_version=w.latest_version, description=w.description
                )
                for w in response.workflows
            )
            token = response.next_page_token
            if not token:
                return result

    # Executions --------------------------------------------------------------------

    async def start_execution(
        self,
        workflow_name: str,
        input: Any = None,
        *,
        version: int | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
        delay: Duration | None = None,
        start_at: datetime | None = None,
        max_concurrency: int = 0,
    ) -> Execution:
        """Starts a run of ``workflow_name`` (its latest version unless ``version`` is given).

        ``input`` is any JSON-serializable value, or bytes holding JSON text. A
        repeated ``idempotency_key`` (within the coordinator's idempotency window)
        returns the execution it first started. ``delay`` ("30s", seconds, a
        timedelta) or ``start_at`` (a timezone-aware datetime) start it later: it
        is PENDING until then, durably (a coordinator restart does not lose it).
        ``max_concurrency`` caps the nodes of this execution running at once (0: the
        workflow's own cap). When the workflow has ``max_running_executions`` running,
        the execution is PENDING (queued) until one ends, or the start fails with
        RESOURCE_EXHAUSTED, as the workflow's ``overflow_policy`` says.
        """
        request = start_request(
            workflow_name,
            input,
            version=version,
            idempotency_key=idempotency_key,
            priority=priority,
            delay=delay,
            start_at=start_at,
            max_concurrency=max_concurrency,
        )
        response = await self._throttled_rpc(
            "StartExecution", lambda: self._stub().StartExecution(request, timeout=self._timeout)
        )
        return execution_from_proto(response.execution)

    async def start_many(
        self,
        workflow_name: str,
        inputs: Iterable[Any],
        *,
        version: int | None = None,
        idempotency_keys: Iterable[str] | None = None,
        priority: int = 0,
        delay: Duration | None = None,
        start_at: datetime | None = None,
        max_concurrency: int = 0,
    ) -> list[Execution]:
        """Starts one run of ``workflow_name`` per input in one call (BatchStartExecutions).

        Returns the executions in the order of ``inputs`` (an input whose idempotency
        key was already used gets the execution that key started). ``idempotency_keys``,
        when given, holds one key per input. All or nothing: when the coordinator refuses
        one request (say, an input too large), none is started and the error names it.
        """
        inputs = list(inputs)
        keys: list[str | None] = [None] * len(inputs)
        if idempotency_keys is not None:
            keys = list(idempotency_keys)
            if len(keys) != len(inputs):
                raise ValueError(
                    f"start_many got {len(inputs)} inputs but {len(keys)} idempotency keys; "
                    "give one key per input"
                )
        request = workflow_service_pb2.BatchStartExecutionsRequest(
            requests=[
                start_request(
                    workflow_name,
                    value,
                    version=version,
                    idempotency_key=key,
                    priority=priority,
                    delay=delay,
                    start_at=start_at,
                    max_concurrency=max_concurrency,
                )
                for value, key in zip(inputs, keys, strict=True)
            ]
        )
        response = await self._throttled_rpc(
            "BatchStartExecutions",
            lambda: self._stub().BatchStartExecutions(request, timeout=self._timeout),
        )
        return [execution_from_proto(r.execution) for r in response.results]

    async def get_execution(self, execution_id: str) -> Execution:
        """An execution with the state of every node."""
        response = await self._rpc(
            "GetExecution",
            self._stub().GetExecution(
                workflow_service_pb2.GetExecutionRequest(execution_id=execution_id),
                timeout=self._timeout,
            ),
        )
        return execution_from_proto(response.execution)

    async def list_executions(
        self,
        workflow_name: str | None = None,
        status: str | None = None,
        limit: int = 50,
        *,
        where: ExecutionFilter | None = None,
    ) -> list[Execution]:
        """Up to ``limit`` executions, newest first, optionally filtered: by workflow and
        status (e.g. "FAILED"), or by everything an ``ExecutionFilter`` says."""
        result: list[Execution] = []
        async for so_far in self.list_execution_pages(
            workflow_name=workflow_name, status=status, limit=limit, where=where
        ):
            result = so_far
        return result

    async def list_execution_pages(
        self,
        workflow_name: str | None = None,
        status: str | None = None,
        limit: int = 50,
        *,
        where: ExecutionFilter | None = None,
        page_size: int = _PAGE_SIZE,
    ) -> AsyncGenerator[list[Execution], None]:
        """Like ``list_executions``, yielding everything read so far after each page (the
        last yield holds all of them); for showing a long listing as it arrives."""
        status_value = (
            common_pb2.EXECUTION_STATUS_UNSPECIFIED
            if status is None
            else execution_status_from_name(status)
        )
        where_msg = (where or ExecutionFilter()).to_proto()
        result: list[Execution] = []
        token = ""
        while True:
            response = await self._rpc(
                "ListExecutions",
                self._stub().ListExecutions(
                    workflow_service_pb2.ListExecutionsRequest(
                        workflow_name=workflow_name or "",
                        status=status_value,
                        page_size=max(1, min(limit - len(result), page_size)),
                        page_token=token,
                        filter=where_msg,
                    ),
                    timeout=self._timeout,
                ),
            )
            result.extend(execution_from_proto(e) for e in response.executions)
            token = response.next_page_token
            done = not token or not response.executions or len(result) >= limit
            yield result[:limit]
            if done:
                return

    async def watch_execution(
        self, execution_id: str, after_sequence: int = 0
    ) -> AsyncGenerator[Event, None]:
        """Yields the execution's events after ``after_sequence``; ends once it has ended.

        Raises RpcError when the stream breaks (``wait_for_execution`` resumes on its own).
        """
        call = self._stub().WatchExecution(
            workflow_service_pb2.WatchExecutionRequest(
                execution_id=execution_id, after_sequence=after_sequence
            )
        )
        try:
            async for response in call:
                # Pages of events; a coordinator before paging sent one per message.
                for event in response.events:
                    yield event_from_proto(event)
                if response.HasField("event"):
                    yield event_from_proto(response.event)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, "WatchExecution") from exc
        finally:
            call.cancel()

    async def wait_for_execution(
        self,
        execution_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 - the public API takes a plain timeout
    ) -> Execution:
        """Waits until the execution has ended and returns it (with its nodes).

        Follows the event stream, resuming it after coordinator restarts; raises
        TimeoutError after ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            after = 0
            backoff = Backoff()
            while True:
                try:
                    async with contextlib.aclosing(
                        self.watch_execution(execution_id, after)
                    ) as events:
                        async for event in events:
                            after = max(after, event.sequence)
                            backoff.reset()
                    execution = await self.get_execution(execution_id)
                    if execution.terminal:
                        return execution
                except RpcError as exc:
                    if exc.code not in TRANSIENT_CODES:
                        raise
                    logger.debug("watching execution %s: %s; resuming", execution_id, exc)
                await asyncio.sleep(backoff.next_delay())

    # Operators ----------------------------------------------------------------

    async def cancel_execution(self, execution_id: str, reason: str = "") -> Execution:
        """Cancels every unfinished node; running handlers learn it at their next heartbeat."""
        response = await self._rpc(
            "CancelExecution",
            self._stub().CancelExecution(
                workflow_service_pb2.CancelExecutionRequest(
                    execution_id=execution_id, reason=reason
                ),
                timeout=self._timeout,
            ),
        )
        return execution_from_proto(response.execution)

    async def cancel_node(self, execution_id: str, node_id: str, reason: str = "") -> Execution:
        """Cancels one node; nodes that depend on it are skipped, other branches go on."""
        response = await self._rpc(
            "CancelNode",
            self._stub().CancelNode(
                workflow_service_pb2.CancelNodeRequest(
                    execution_id=execution_id, node_id=node_id, reason=reason
                ),
                timeout=self._timeout,
            ),
        )
        return execution_from_proto(response.execution)

    async def pause_execution(self, execution_id: str) -> Execution:
        """Stops dispatching the execution's nodes; running attempts may finish."""
        response = await self._rpc(
            "PauseExecution",
            self._stub().PauseExecution(
                workflow_service_pb2.PauseExecutionRequest(execution_id=execution_id),
                timeout=self._timeout,
            ),
        )
        return execution_from_proto(response.execution)

    async def resume_execution(self, execution_id: str) -> Execution:
        response = await self._rpc(
            "ResumeExecution",
            self._stub().ResumeExecution(
                workflow_service_pb2.ResumeExecutionRequest(execution_id=execution_id),
                timeout=self._timeout,
            ),
        )
        return execution_from_proto(response.execution)

    async def pause_node(self, execution_id: str, node_id: str) -> Execution:
        """Holds a node that has not started yet until ``resume_node``."""
        response = await self._rpc(
            "PauseNode",
            self._stub().PauseNode(
                workflow_service_pb2.PauseNodeRequest(execution_id=execution_id, node_id=node_id),
                timeout=self._timeout,
            ),
        )
        return execution_from_proto(response.execution)

    async def resume_node(self, execution_id: str, node_id: str) -> Execution:
        response = await self._rpc(
            "ResumeNode",
            self._stub().ResumeNode(
                workflow_service_pb2.ResumeNodeRequest(execution_id=execution_id, node_id=node_id),
                timeout=self._timeout,
            ),
        )
        return execution_from_proto(response.execution)

    async def approve_node(self, execution_id: str, node_id: str, comment: str = "") -> Execution:
        """Approves a WAITING approval node: it succeeds with the decision as its output and
        the execution goes on. Raises ``FailedPreconditionError`` unless it is a WAITING
        approval node, an ``RpcError`` with PERMISSION_DENIED without the node's role."""
        response = await self._rpc(
            "ApproveNode",
            self._stub().ApproveNode(
                workflow_service_pb2.ApproveNodeRequest(
                    execution_id=execution_id, node_id=node_id, comment=comment
                ),
                timeout=self._timeout,
            ),
        )
        return execution_from_proto(response.execution)

    async def reject_node(self, execution_id: str, node_id: str, comment: str = "") -> Execution:
        """Rejects a WAITING approval node: it fails, not retried, with error type
        ``ApprovalRejected`` and ``comment`` as the reason. Raises as ``approve_node``."""
        response = await self._rpc(
            "RejectNode",
            self._stub().RejectNode(
                workflow_service_pb2.RejectNodeRequest(
                    execution_id=execution_id, node_id=node_id, comment=comment
                ),
                timeout=self._timeout,
            ),
        )
        return execution_from_proto(response.execution)

    async def list_dead_letters(
        self,
        *,
        workflow_name: str | None = None,
        task_type: str | None = None,
        include_redriven: bool = False,
        limit: int = 50,
    ) -> list[DeadLetter]:
        """Dead letters, newest first (following pages up to ``limit``)."""
        out: list[DeadLetter] = []
        token = ""
        while len(out) < limit:
            response = await self._rpc(
                "ListDeadLetters",
                self._stub().ListDeadLetters(
                    workflow_service_pb2.ListDeadLettersRequest(
                        workflow_name=workflow_name or "",
                        task_type=task_type or "",
                        include_redriven=include_redriven,
                        page_size=min(_PAGE_SIZE, limit - len(out)),
                        page_token=token,
                    ),
                    timeout=self._timeout,
                ),
            )
            out.extend(dead_letter_from_proto(d) for d in response.dead_letters)
            token = response.next_page_token
            if not token:
                break
        return out[:limit]

    async def get_dead_letter(self, dead_letter_id: str) -> DeadLetter:
        response = await self._rpc(
            "GetDeadLetter",
            self._stub().GetDeadLetter(
                workflow_service_pb2.GetDeadLetterRequest(id=dead_letter_id),
                timeout=self._timeout,
            ),
        )
        return dead_letter_from_proto(response.dead_letter)

    async def redrive_dead_letter(self, dead_letter_id: str) -> Execution:
        """Runs the node again with a fresh attempt budget; the execution continues from
        there without re-running finished nodes."""
        response = await self._rpc(
            "RedriveDeadLetter",
            self._stub().RedriveDeadLetter(
                workflow_service_pb2.RedriveDeadLetterRequest(id=dead_letter_id),
                timeout=self._timeout,
            ),
        )
        return execution_from_proto(response.execution)

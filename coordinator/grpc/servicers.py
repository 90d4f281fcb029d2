"""gRPC servicers: decode the request, call the use case, encode the reply. Nothing else."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc

from coordinator.errors import TrellisError
from coordinator.grpc import convert
from coordinator.grpc.auth import caller, tenant
from coordinator.grpc.status import stream, unary
from coordinator.model import Execution
from coordinator.service import (
    Completion,
    Coordinator,
    Failure,
)
from trellis.v1 import (
    worker_service_pb2 as wpb,
)
from trellis.v1 import (
    worker_service_pb2_grpc as wgrpc,
)
from trellis.v1 import (
    workflow_service_pb2 as fpb,
)
from trellis.v1 import (
    workflow_service_pb2_grpc as fgrpc,
)

Ctx = grpc.aio.ServicerContext[Any, Any]


def _decider() -> tuple[str, frozenset[str]]:
    """Who decides an approval node: the authenticated caller (its subject: an API key's
    name, a certificate's common name, a JWT's sub) and the roles it holds."""
    principal = caller()
    return principal.subject, principal.roles


# Reply this much before the caller's deadline so an empty poll is an answer, not an error.
_DEADLINE_MARGIN = 0.5


class WorkerServicer(wgrpc.WorkerServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self._c = coordinator

    @unary
    async def RegisterWorker(
        self, request: wpb.RegisterWorkerRequest, context: Ctx
    ) -> wpb.RegisterWorkerResponse:
        worker_id = await self._c.leasing.register_worker(
            tenant(),
            request.worker_id,
            list(request.task_types),
            request.capacity,
            labels=dict(request.labels),
            sdk_language=request.sdk_language,
            sdk_version=request.sdk_version,
            identity=request.identity,
            credential=caller().credential,
        )
        reply = wpb.RegisterWorkerResponse(worker_id=worker_id)
        reply.heartbeat_interval.FromTimedelta(self._c.settings.heartbeat_interval)
        return reply

    @unary
    async def PollTasks(self, request: wpb.PollTasksRequest, context: Ctx) -> wpb.PollTasksResponse:
        # The wait asked for, within the call's own deadline (an empty poll is an answer).
        wait = convert.duration_or_none(request, "wait")
        if wait is None:
            wait = self._c.settings.poll_max_wait
        remaining = context.time_remaining()
        if remaining is not None:
            wait = min(wait, timedelta(seconds=max(remaining - _DEADLINE_MARGIN, 0.0)))
        tasks = await self._c.leasing.poll_tasks(
            tenant(),
            request.worker_id,
            list(request.task_types),
            request.max_tasks or 1,
            wait,
            credential=caller().credential,
        )
        return wpb.PollTasksResponse(tasks=[convert.task_to_proto(t) for t in tasks])

    @unary
    async def Heartbeat(self, request: wpb.HeartbeatRequest, context: Ctx) -> wpb.HeartbeatResponse:
        result = await self._c.heartbeats.heartbeat(
            tenant(),
            request.worker_id,
            [lease.lease_token for lease in request.leases],
            credential=caller().credential,
        )
        reply = wpb.HeartbeatResponse(
            cancelled_lease_tokens=result.cancelled, lost_lease_tokens=result.lost
        )
        reply.server_time.GetCurrentTime()
        return reply

    @unary
    async def CompleteTask(
        self, request: wpb.CompleteTaskRequest, context: Ctx
    ) -> wpb.CompleteTaskResponse:
        taken, expansion = convert.complete_options_from_proto(request)
        duplicate, tasks = await self._c.results.complete_task(
            tenant(),
            request.lease_token,
            request.output,
            request.worker_id,
            next=taken,
            expansion=expansion,
            task_types=list(request.task_types),
            max_next=request.max_next_tasks,
            credential=caller().credential,
        )
        return wpb.CompleteTaskResponse(
            duplicate=duplicate, next_tasks=[convert.task_to_proto(t) for t in tasks]
        )

    @unary
    async def FailTask(self, request: wpb.FailTaskRequest, context: Ctx) -> wpb.FailTaskResponse:
        error, retryable = convert.task_error_from_proto(request.error)
        will_retry, duplicate = await self._c.results.fail_task(
            tenant(),
            request.lease_token,
            error,
            retryable,
            worker_id=request.worker_id,
            credential=caller().credential,
        )
        return wpb.FailTaskResponse(will_retry=will_retry, duplicate=duplicate)

    @unary
    async def ReportResults(
        self, request: wpb.ReportResultsRequest, context: Ctx
    ) -> wpb.ReportResultsResponse:
        # A result that does not decode is refused on its own; the others go ahead.
        results: list[Completion | Failure | TrellisError] = []
        for index, msg in enumerate(request.results):
            try:
                results.append(convert.result_from_proto(msg, index))
            except TrellisError as exc:
                results.append(exc)
        outcomes, tasks = await self._c.results.report_results(
            tenant(),
            request.worker_id,
            results,
            list(request.task_types),
            request.max_next_tasks,
            credential=caller().credential,
        )
        return wpb.ReportResultsResponse(
            results=[convert.result_status_to_proto(o) for o in outcomes],
            next_tasks=[convert.task_to_proto(t) for t in tasks],
        )


class WorkflowServicer(fgrpc.WorkflowServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self._c = coordinator

    @unary
    async def RegisterWorkflow(
        self, request: fpb.RegisterWorkflowRequest, context: Ctx
    ) -> fpb.RegisterWorkflowResponse:
        defn = convert.definition_from_proto(request.definition, tenant())
        stored, created = await self._c.definitions.register_workflow(defn)
        return fpb.RegisterWorkflowResponse(
            definition=convert.definition_to_proto(stored), created=created
        )

    @unary
    async def GetWorkflow(
        self, request: fpb.GetWorkflowRequest, context: Ctx
    ) -> fpb.GetWorkflowResponse:
        defn = await self._c.definitions.get_workflow(
            tenant(), request.name, request.version or None
        )
        return fpb.GetWorkflowResponse(definition=convert.definition_to_proto(defn))

    @unary
    async def ListWorkflows(
        self, request: fpb.ListWorkflowsRequest, context: Ctx
    ) -> fpb.ListWorkflowsResponse:
        rows, token = await self._c.definitions.list_workflows(
            tenant(), request.page_size, request.page_token
        )
        return fpb.ListWorkflowsResponse(
            workflows=[convert.summary_to_proto(s) for s in rows], next_page_token=token
        )

    @unary
    async def ListWorkflowVersions(
        self, request: fpb.ListWorkflowVersionsRequest, context: Ctx
    ) -> fpb.ListWorkflowVersionsResponse:
        versions = await self._c.definitions.list_workflow_versions(tenant(), request.name)
        return fpb.ListWorkflowVersionsResponse(
            definitions=[convert.definition_to_proto(d) for d in versions]
        )

    @unary
    async def StartExecution(
        self, request: fpb.StartExecutionRequest, context: Ctx
    ) -> fpb.StartExecutionResponse:
        start = convert.start_request_from_proto(request)
        execution, created = await self._c.starts.start_execution(
            tenant(),
            start.workflow_name,
            start.workflow_version,
            start.input,
            idempotency_key=start.idempotency_key,
            priority=start.priority,
            start_time=start.start_time,
            delay=start.delay,
            max_concurrency=start.max_concurrency,
        )
        return fpb.StartExecutionResponse(
            execution=convert.execution_to_proto(execution), created=created
        )

    @unary
    async def BatchStartExecutions(
        self, request: fpb.BatchStartExecutionsRequest, context: Ctx
    ) -> fpb.BatchStartExecutionsResponse:
        starts = [convert.start_request_from_proto(r) for r in request.requests]
        results = await self._c.starts.batch_start_executions(tenant(), starts)
        return fpb.BatchStartExecutionsResponse(
            results=[
                fpb.StartExecutionResponse(
                    execution=convert.execution_to_proto(execution), created=created
                )
                for execution, created in results
            ]
        )

    @unary
    async def GetExecution(
        self, request: fpb.GetExecutionRequest, context: Ctx
    ) -> fpb.GetExecutionResponse:
        view = await self._c.executions.get_execution(tenant(), request.execution_id)
        return fpb.GetExecutionResponse(execution=convert.execution_view_to_proto(view))

    @unary
    async def ListExecutions(
        self, request: fpb.ListExecutionsRequest, context: Ctx
    ) -> fpb.ListExecutionsResponse:
        where = convert.execution_filter_from_proto(
            request.filter, workflow_name=request.workflow_name, status=request.status
        )
        rows, token = await self._c.executions.list_executions(
            tenant(),
            where,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return fpb.ListExecutionsResponse(
            executions=[convert.execution_to_proto(e) for e in rows], next_page_token=token
        )

    @stream
    async def WatchExecution(
        self, request: fpb.WatchExecutionRequest, context: Ctx
    ) -> AsyncIterator[fpb.WatchExecutionResponse]:
        principal = caller()
        watch = self._c.executions.watch_execution(
            tenant(),
            request.execution_id,
            request.after_sequence,
            caller=f"{principal.tenant_id}/{principal.subject}",
        )
        async with contextlib.aclosing(watch) as items:
            async for item in items:
                if isinstance(item, Execution):
                    yield fpb.WatchExecutionResponse(execution=convert.execution_to_proto(item))
                else:
                    yield fpb.WatchExecutionResponse(
                        events=[convert.event_to_proto(event) for event in item]
                    )

    # -- operators ------------------------------------------------------------------------

    @unary
    async def CancelExecution(
        self, request: fpb.CancelExecutionRequest, context: Ctx
    ) -> fpb.CancelExecutionResponse:
        view = await self._c.operations.cancel_execution(
            tenant(), request.execution_id, request.reason
        )
        return fpb.CancelExecutionResponse(execution=convert.execution_view_to_proto(view))

    @unary
    async def CancelNode(
        self, request: fpb.CancelNodeRequest, context: Ctx
    ) -> fpb.CancelNodeResponse:
        view = await self._c.operations.cancel_node(
            tenant(), request.execution_id, request.node_id, request.reason
        )
        return fpb.CancelNodeResponse(execution=convert.execution_view_to_proto(view))

    @unary
    async def PauseExecution(
        self, request: fpb.PauseExecutionRequest, context: Ctx
    ) -> fpb.PauseExecutionResponse:
        view = await self._c.operations.pause_execution(tenant(), request.execution_id)
        return fpb.PauseExecutionResponse(execution=convert.execution_view_to_proto(view))

    @unary
    async def ResumeExecution(
        self, request: fpb.ResumeExecutionRequest, context: Ctx
    ) -> fpb.ResumeExecutionResponse:
        view = await self._c.operations.resume_execution(tenant(), request.execution_id)
        return fpb.ResumeExecutionResponse(execution=convert.execution_view_to_proto(view))

    @unary
    async def PauseNode(self, request: fpb.PauseNodeRequest, context: Ctx) -> fpb.PauseNodeResponse:
        view = await self._c.operations.pause_node(tenant(), request.execution_id, request.node_id)
        return fpb.PauseNodeResponse(execution=convert.execution_view_to_proto(view))

    @unary
    async def ResumeNode(
        self, request: fpb.ResumeNodeRequest, context: Ctx
    ) -> fpb.ResumeNodeResponse:
        view = await self._c.operations.resume_node(tenant(), request.execution_id, request.node_id)
        return fpb.ResumeNodeResponse(execution=convert.execution_view_to_proto(view))

    @unary
    async def ApproveNode(
        self, request: fpb.ApproveNodeRequest, context: Ctx
    ) -> fpb.ApproveNodeResponse:
        by, roles = _decider()
        view = await self._c.approvals.approve(
            tenant(),
            request.execution_id,
            request.node_id,
            by=by,
            roles=roles,
            comment=request.comment,
        )
        return fpb.ApproveNodeResponse(execution=convert.execution_view_to_proto(view))

    @unary
    async def RejectNode(
        self, request: fpb.RejectNodeRequest, context: Ctx
    ) -> fpb.RejectNodeResponse:
        by, roles = _decider()
        view = await self._c.approvals.reject(
            tenant(),
            request.execution_id,
            request.node_id,
            by=by,
            roles=roles,
            comment=request.comment,
        )
        return fpb.RejectNodeResponse(execution=convert.execution_view_to_proto(view))

    @unary
    async def ListDeadLetters(
        self, request: fpb.ListDeadLettersRequest, context: Ctx
    ) -> fpb.ListDeadLettersResponse:
        rows, token = await self._c.dead_letters.list_dead_letters(
            tenant(),
            workflow_name=request.workflow_name or None,
            task_type=request.task_type or None,
            include_redriven=request.include_redriven,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return fpb.ListDeadLettersResponse(
            dead_letters=[convert.dead_letter_to_proto(d) for d in rows], next_page_token=token
        )

    @unary
    async def GetDeadLetter(
        self, request: fpb.GetDeadLetterRequest, context: Ctx
    ) -> fpb.GetDeadLetterResponse:
        letter = await self._c.dead_letters.get_dead_letter(tenant(), request.id)
        return fpb.GetDeadLetterResponse(dead_letter=convert.dead_letter_to_proto(letter))

    @unary
    async def RedriveDeadLetter(
        self, request: fpb.RedriveDeadLetterRequest, context: Ctx
    ) -> fpb.RedriveDeadLetterResponse:
        view = await self._c.dead_letters.redrive_dead_letter(tenant(), request.id)
        return fpb.RedriveDeadLetterResponse(execution=convert.execution_view_to_proto(view))

"""Results: a worker's attempt succeeded or failed (one at a time or in batches), and what
follows its commit, in this order: the shared ``after_commit`` steps (in
``Transactions.run``), then the task type's breaker outcome, then eager dispatch (a
completion may lease the worker its next task at once)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import NoReturn

from coordinator import engine
from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound, TrellisError
from coordinator.model import (
    ErrorInfo,
    Execution,
    NodeRun,
    NodeStatus,
    Transition,
    WorkflowDef,
    redact,
    redact_text,
)
from coordinator.service._common import ServiceSettings
from coordinator.service._definitions import Definitions
from coordinator.service._leasing import LeasedTask, Leasing, spec_id
from coordinator.service._schemas import OUTPUT_SCHEMA_VIOLATION, output_refusal
from coordinator.service._secrets import SecretVault
from coordinator.service._tokens import Holder, LeaseSigner, LeaseToken
from coordinator.service._transactions import Transactions, Verdict
from coordinator.service.ports import DispatchPolicy

log = logging.getLogger(__name__)

# Most results one ReportResults call may carry.
MAX_REPORT_BATCH = 1000
MAX_ERROR_TYPE = 256
MAX_ERROR_MESSAGE = 8192


@dataclass(frozen=True)
class Completion:
    """A worker's result: the attempt succeeded (see ``Results.complete_task``)."""

    token: str
    output: bytes
    next: Sequence[str] | None = None
    expansion: engine.Expansion | None = None


@dataclass(frozen=True)
class Failure:
    """A worker's result: the attempt failed (see ``Results.fail_task``)."""

    token: str
    error: ErrorInfo
    retryable: bool


@dataclass(frozen=True)
class ResultOutcome:
    """What became of one result of a batch: accepted (``error`` None) or refused."""

    duplicate: bool = False
    will_retry: bool = False
    error: Exception | None = None


@dataclass(frozen=True)
class _Held:
    """What a result's step found: a duplicate of the result that ended the lease, or the
    task type of the lease it ends (and, for a failure, whether a retry is scheduled)."""

    duplicate: bool
    task_type: str = ""
    will_retry: bool = False


class Results:
    def __init__(
        self,
        transactions: Transactions,
        definitions: Definitions,
        leasing: Leasing,
        dispatch: DispatchPolicy,
        settings: ServiceSettings,
        signer: LeaseSigner,
        *,
        vault: SecretVault | None = None,
    ) -> None:
        self._signer = signer
        self._vault = vault
        self._tx = transactions
        self._definitions = definitions
        self._leasing = leasing
        self._dispatch = dispatch
        self._settings = settings

    async def complete_task(
        self,
        tenant_id: str,
        token_text: str,
        output: bytes,
        worker_id: str = "",
        *,
        next: Sequence[str] | None = None,
        expansion: engine.Expansion | None = None,
        task_types: Sequence[str] = (),
        max_next: int = 0,
        credential: str = "",
    ) -> tuple[bool, list[LeasedTask]]:
        """Record a result, with the children to take (``next``) and nodes to add
        (``expansion``). Returns whether it was a duplicate of an accepted result, and, when
        ``max_next`` > 0, the tasks of ``task_types`` eagerly leased to ``worker_id``
        (``eager``). A bad ``next`` or ``expansion`` raises InvalidArgument and changes
        nothing (the lease is still held)."""
        if max_next > 0:
            self._leasing.check_claim(worker_id, task_types, 1, "eager dispatch")
        holder = Holder(worker_id, credential)
        duplicate, transition = await self._complete(
            tenant_id, token_text, output, holder, next=next, expansion=expansion
        )
        return duplicate, await self.eager(tenant_id, holder, task_types, max_next, [transition])

    async def report_results(
        self,
        tenant_id: str,
        worker_id: str,
        results: Sequence[Completion | Failure | TrellisError],
        task_types: Sequence[str] = (),
        max_next: int = 0,
        credential: str = "",
    ) -> tuple[list[ResultOutcome], list[LeasedTask]]:
        """Several results at once, each handled as ``complete_task`` or ``fail_task`` handles
        it. They run concurrently, so they share group commits. A refused result does not
        refuse the others: each outcome carries its own error (an error in ``results`` stands
        for a result that could not be decoded: it is its outcome). Then eager dispatch for
        the batch, after every result is committed."""
        if len(results) > MAX_REPORT_BATCH:
            raise InvalidArgument(
                f"{len(results)} results in one batch; send at most {MAX_REPORT_BATCH} per call"
            )
        if max_next > 0:
            self._leasing.check_claim(worker_id, task_types, 1, "eager dispatch")
        holder = Holder(worker_id, credential)
        transitions: list[Transition | None] = []
        first: dict[str, int] = {}
        for index, result in enumerate(results):
            if not isinstance(result, TrellisError):
                first.setdefault(result.token, index)

        async def one(index: int, result: Completion | Failure | TrellisError) -> ResultOutcome:
            try:
                if isinstance(result, TrellisError):
                    raise result
                if first[result.token] != index:
                    raise InvalidArgument(
                        f"results[{index}] reports the lease of results[{first[result.token]}] "
                        "again; report each lease once per batch"
                    )
                if isinstance(result, Completion):
                    duplicate, transition = await self._complete(
                        tenant_id,
                        result.token,
                        result.output,
                        holder,
                        next=result.next,
                        expansion=result.expansion,
                    )
                    transitions.append(transition)
                    return ResultOutcome(duplicate=duplicate)
                will_retry, duplicate = await self.fail_task(
                    tenant_id,
                    result.token,
                    result.error,
                    result.retryable,
                    worker_id=worker_id,
                    credential=credential,
                )
                return ResultOutcome(duplicate=duplicate, will_retry=will_retry)
            except TrellisError as exc:
                return ResultOutcome(error=exc)
            except Exception as exc:  # one result's fault must not lose the others' replies
                log.exception("reporting a result failed", extra={"worker_id": worker_id})
                return ResultOutcome(error=exc)

        outcomes = await asyncio.gather(*(one(i, r) for i, r in enumerate(results)))
        return list(outcomes), await self.eager(
            tenant_id, holder, task_types, max_next, transitions
        )

    async def eager(
        self,
        tenant_id: str,
        holder: Holder,
        task_types: Sequence[str],
        max_next: int,
        transitions: Iterable[Transition | None],
    ) -> list[LeasedTask]:
        """Eager dispatch: when the ``transitions`` (just committed results) made tasks of
        ``task_types`` ready (the successors in a chain or a fan-out), lease up to
        ``max_next`` ready tasks to the worker at once. A failure to lease leases nothing."""
        made_ready = any(
            t is not None and any(n.task_type in task_types for n in t.ready) for t in transitions
        )
        if not made_ready or max_next <= 0 or self._leasing.draining:
            # Independent tasks are better served by the worker's polls, which lease many
            # per claim; an eager claim per completion would cost one claim per task.
            return []
        try:
            worker_id = holder.worker_id
            max_next = self._leasing.check_claim(worker_id, task_types, max_next, "eager dispatch")
            claimed, _, _ = await self._leasing.claim(tenant_id, worker_id, task_types, max_next)
            if not claimed:
                return []
            return await self._leasing.handout(tenant_id, claimed, holder.credential)
        except TrellisError as exc:
            log.debug("eager dispatch skipped: %s", exc)
            return []

    async def _complete(
        self,
        tenant_id: str,
        token_text: str,
        output: bytes,
        holder: Holder,
        *,
        next: Sequence[str] | None,
        expansion: engine.Expansion | None,
    ) -> tuple[bool, Transition | None]:
        token = self._signer.decode(token_text, holder)
        payload = self._settings.check_payload("output", output)
        defn = await self._definitions.get_workflow(
            tenant_id, token.workflow_name, token.workflow_version
        )
        secrets = await self._secrets_of(tenant_id, defn, token.node_id)
        if secrets:
            payload = redact(payload, secrets)
            if expansion is not None:
                # Nodes added at run time are stored and shown like the output: a value
                # the worker copied into one of their configs is redacted too.
                expansion = replace(
                    expansion,
                    nodes=tuple(
                        replace(n, config=redact(n.config, secrets)) for n in expansion.nodes
                    ),
                )
        if expansion is not None and any(n.output_schema for n in expansion.nodes):
            raise InvalidArgument(
                "a node added at run time (expansion) sets output_schema; only registered "
                "nodes may carry one: remove it"
            )
        why = await output_refusal(defn, token.node_id, payload)
        if why is not None:
            await self._refuse_output(tenant_id, token, why)
        taken = None if next is None else tuple(next)

        def step(
            d: WorkflowDef, execution: Execution, nodes: Mapping[str, NodeRun], now: datetime
        ) -> Verdict[_Held]:
            held = _held_node(nodes, token, accept_done=_SUCCESS_RECORDED)
            if held is None:
                return Verdict(None, _Held(duplicate=True))
            t = engine.complete_node(
                d, execution, nodes, token.node_id, payload, now, next=taken, expansion=expansion
            )
            return Verdict(t, _Held(duplicate=False, task_type=held.task_type))

        applied = await self._tx.run(tenant_id, token.execution_id, step, defn=defn, group=True)
        assert applied is not None
        if not applied.value.duplicate:
            await self._dispatch.record_outcome(tenant_id, applied.value.task_type, ok=True)
        return applied.value.duplicate, applied.transition

    async def _refuse_output(self, tenant_id: str, token: LeaseToken, why: str) -> NoReturn:
        """An output its node's output_schema refuses: the attempt fails, not retried (the
        same result sent again finds it failed: a duplicate), and the call says why."""
        error = ErrorInfo(OUTPUT_SCHEMA_VIOLATION, _clip(why, MAX_ERROR_MESSAGE))
        _, duplicate = await self._fail(tenant_id, token, error, retryable=False)
        log.info(
            "output refused by the node's output_schema; the attempt failed",
            extra={"execution_id": token.execution_id, "node_id": token.node_id},
        )
        raise InvalidArgument(
            f"{why}; the attempt was failed, not retried (error type "
            f"{OUTPUT_SCHEMA_VIOLATION}{', reported before' if duplicate else ''})"
        )

    async def fail_task(
        self,
        tenant_id: str,
        token_text: str,
        error: ErrorInfo,
        retryable: bool,
        *,
        worker_id: str = "",
        credential: str = "",
    ) -> tuple[bool, bool]:
        """Record a failed attempt. Returns ``(will_retry, duplicate)``."""
        token = self._signer.decode(token_text, Holder(worker_id, credential))
        if error.details:
            self._settings.check_payload("error.details", error.details)
        return await self._fail(tenant_id, token, error, retryable)

    async def fail_lease(self, node: NodeRun, error: ErrorInfo, retryable: bool) -> bool:
        """Fail the attempt ``node`` currently holds (a sweeper's or a heartbeat's verdict).
        False when the lease changed meanwhile (completed, or failed by another replica)."""
        try:
            await self._fail(node.tenant_id, LeaseToken.of(node), error, retryable)
        except (FailedPrecondition, NotFound):
            return False
        return True

    async def _fail(
        self, tenant_id: str, token: LeaseToken, error: ErrorInfo, retryable: bool
    ) -> tuple[bool, bool]:
        defn = await self._definitions.get_workflow(
            tenant_id, token.workflow_name, token.workflow_version
        )
        secrets = await self._secrets_of(tenant_id, defn, token.node_id)
        if secrets:
            error = replace(
                error,
                type=redact_text(error.type, secrets),
                message=redact_text(error.message, secrets),
                details=None if error.details is None else redact(error.details, secrets),
            )
        # Error text is copied into events, the execution and dead letters: keep it bounded
        # (after redaction, so that no clipped part of a secret remains).
        error = replace(
            error,
            type=_clip(error.type, MAX_ERROR_TYPE),
            message=_clip(error.message, MAX_ERROR_MESSAGE),
        )

        def step(
            d: WorkflowDef, execution: Execution, nodes: Mapping[str, NodeRun], now: datetime
        ) -> Verdict[_Held]:
            node = _held_node(nodes, token, accept_done=_FAILURE_RECORDED)
            if node is None:
                return Verdict(None, _Held(duplicate=True))
            full = replace(
                error, node_id=node.node_id, attempt=node.attempt, worker_id=node.worker_id
            )
            t = engine.fail_node(d, execution, nodes, token.node_id, full, retryable, now)
            changed = next(n for n in t.nodes if n.node_id == token.node_id)
            retry = changed.status is NodeStatus.READY
            return Verdict(t, _Held(duplicate=False, task_type=node.task_type, will_retry=retry))

        applied = await self._tx.run(tenant_id, token.execution_id, step, defn=defn, group=True)
        assert applied is not None
        held = applied.value
        if not held.duplicate and error.type not in _NOT_THE_TYPES_FAULT:
            await self._dispatch.record_outcome(tenant_id, held.task_type, ok=False)
        return held.will_retry, held.duplicate

    async def _secrets_of(self, tenant_id: str, defn: WorkflowDef, node_id: str) -> dict[str, str]:
        """The values of the secrets the node's config references (resolved into its lease):
        what a worker's result must not carry into the history. {} for most nodes."""
        spec = defn.node_map.get(spec_id(node_id))
        if spec is None or not spec.secret_refs or self._vault is None:
            return {}
        return await self._vault.values(tenant_id, spec.secret_refs)


# Failed attempts a task type's breaker does not count: the worker went away, or its poll
# reply was lost; the handler itself did not fail.
_NOT_THE_TYPES_FAULT = frozenset({"WorkerLost", "LeaseNotHeld", "LeaseRevoked"})

# After a recorded failure the row is READY (retry scheduled) or FAILED, with the same
# lease_seq until the next claim and the error of that attempt.
_FAILURE_RECORDED = frozenset({NodeStatus.READY, NodeStatus.FAILED})
_SUCCESS_RECORDED = frozenset({NodeStatus.SUCCEEDED})


def _held_node(
    nodes: Mapping[str, NodeRun], token: LeaseToken, accept_done: frozenset[NodeStatus]
) -> NodeRun | None:
    """The node the token still leases, None for a duplicate of the result that ended the
    lease (its status is in ``accept_done``), else raise FailedPrecondition."""
    node = nodes.get(token.node_id)
    if node is None:
        raise NotFound(f"node '{token.node_id}' not found in execution '{token.execution_id}'")
    if node.lease_seq == token.lease_seq:
        if node.status is NodeStatus.LEASED:
            return node
        failed_here = node.error is not None and node.error.attempt == node.attempt
        if node.status in accept_done and (node.status is NodeStatus.SUCCEEDED or failed_here):
            return None
    raise FailedPrecondition(
        f"lease on node '{token.node_id}' of execution '{token.execution_id}' is no longer held "
        f"(node is {node.status.value}, attempt {node.attempt}); drop this result"
    )


_CLIPPED = " …(truncated)"


def _clip(text: str, limit: int) -> str:
    """Bounded error text without NUL characters (which PostgreSQL text cannot hold)."""
    text = text.replace("\x00", "")
    return text if len(text) <= limit else text[: limit - len(_CLIPPED)] + _CLIPPED

"""Approval nodes decided by people: approve or reject a WAITING approval node.

The decider is passed in explicitly (who, and the roles they hold): the servicer says who
calls. A decider needs the node's ``required_role`` or ``admin``; the check runs inside the
transition, against the definition the execution runs, so it sees the node as decided.
Timeouts are the sweeper's (``Sweeper.time_out_approvals``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime

from coordinator import engine
from coordinator.errors import InvalidArgument, PermissionDenied
from coordinator.model import Execution, NodeRun, Transition, WorkflowDef
from coordinator.service._executions import Executions, ExecutionView
from coordinator.service._transactions import Transactions

log = logging.getLogger(__name__)

# Holding this role decides any approval node, whatever role it requires.
ADMIN_ROLE = "admin"
# Longest comment kept with a decision (in the node's output or error, and its event).
MAX_COMMENT_LENGTH = 4096


class Approvals:
    def __init__(self, transactions: Transactions, executions: Executions) -> None:
        self._tx = transactions
        self._executions = executions

    async def approve(
        self,
        tenant_id: str,
        execution_id: str,
        node_id: str,
        *,
        by: str,
        roles: frozenset[str],
        comment: str,
    ) -> ExecutionView:
        """``by`` approves WAITING approval node ``node_id``: it SUCCEEDS with the decision
        ``{"approved": true, "by", "at", "comment"}`` as output and the execution goes on.

        Raises ``NotFound`` (execution or node), ``FailedPrecondition`` (not a WAITING
        approval node, or the execution has ended), ``PermissionDenied`` (``roles`` holds
        neither the node's required_role nor admin), ``InvalidArgument`` (comment too long).
        """
        return await self._decide(tenant_id, execution_id, node_id, True, by, roles, comment)

    async def reject(
        self,
        tenant_id: str,
        execution_id: str,
        node_id: str,
        *,
        by: str,
        roles: frozenset[str],
        comment: str,
    ) -> ExecutionView:
        """``by`` rejects WAITING approval node ``node_id``: it FAILS, not retried, with error
        type ``ApprovalRejected``, the comment as message and the decision as details; a
        child handling failures runs, else the execution fails. Raises as ``approve``."""
        return await self._decide(tenant_id, execution_id, node_id, False, by, roles, comment)

    async def _decide(
        self,
        tenant_id: str,
        execution_id: str,
        node_id: str,
        approved: bool,
        by: str,
        roles: frozenset[str],
        comment: str,
    ) -> ExecutionView:
        action = "approve" if approved else "reject"
        decide = engine.approve_node if approved else engine.reject_node
        if not by:
            raise InvalidArgument(f"cannot {action} node '{node_id}': no decider was given")
        if len(comment) > MAX_COMMENT_LENGTH:
            raise InvalidArgument(
                f"comment is {len(comment)} characters long; use at most {MAX_COMMENT_LENGTH}"
            )

        def step(
            defn: WorkflowDef, execution: Execution, nodes: Mapping[str, NodeRun], now: datetime
        ) -> Transition:
            required = engine.approval_role(defn, execution, nodes, node_id, action)
            if ADMIN_ROLE not in roles and required not in roles:
                held = ", ".join(repr(r) for r in sorted(roles)) or "none"
                raise PermissionDenied(
                    f"cannot {action} node '{node_id}' of execution '{execution_id}': it needs "
                    f"the role '{required}' (or '{ADMIN_ROLE}'); {by} has roles: {held}"
                )
            return decide(defn, execution, nodes, node_id, by=by, comment=comment, now=now)

        await self._tx.run_step(tenant_id, execution_id, step)
        log.info(
            "approval node decided",
            extra={"execution_id": execution_id, "node_id": node_id, "action": action, "by": by},
        )
        return await self._executions.get_execution(tenant_id, execution_id)

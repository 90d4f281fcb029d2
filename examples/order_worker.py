"""A Python worker for examples/order.yaml (control flow: a switch, a skipped branch, a join).

    python examples/order_worker.py            # TRELLIS_ADDRESS defaults to 127.0.0.1:7400

`validate` checks the order; the switch node `route` runs on the coordinator and takes
`manual_review` for amounts over 1000, `auto_approve` otherwise (the other branch is
SKIPPED); `join` runs once with the approval of whichever branch ran; `ship` gets the
order id (from the execution input, mapped by its CEL `input`) and the approval.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from worker_sdk import DEFAULT_ADDRESS, NonRetryableError, TaskContext, Worker, task


@task("validate-order")
async def validate(ctx: TaskContext, data: Any) -> dict[str, Any]:
    amount = data.get("amount") if isinstance(data, dict) else None
    if isinstance(amount, bool) or not isinstance(amount, int | float) or amount < 0:
        raise NonRetryableError('input must look like {"order_id": 1, "amount": 120}')
    return {"order_id": data.get("order_id"), "amount": amount}


@task("auto-approve")
async def auto_approve(ctx: TaskContext, data: Any) -> dict[str, Any]:
    # ctx.execution_input is the execution's input, whatever this node's own input is.
    return {"approved_by": "auto", "amount": ctx.execution_input["amount"]}


@task("manual-review")
async def manual_review(ctx: TaskContext, data: Any) -> dict[str, Any]:
    order = ctx.execution_input
    ctx.logger.info("order %s over the limit: reviewing", order["order_id"])
    return {"approved_by": "reviewer", "amount": order["amount"]}


@task("join-approval")
async def join(ctx: TaskContext, data: Any) -> dict[str, Any]:
    # ctx.parent_outputs: parent id -> output; the branch that was skipped has none (null).
    approvals = [value for value in ctx.parent_outputs.values() if value]
    if len(approvals) != 1:
        raise NonRetryableError(f"expected exactly one approval, got {ctx.parent_outputs!r}")
    return dict(approvals[0])


@task("ship-order")
async def ship(ctx: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
    return {"shipped": data["order_id"], "approved_by": data["approval"]["approved_by"]}


TASKS = [validate, auto_approve, manual_review, join, ship]

if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("TRELLIS_LOG_LEVEL", "INFO"))
    Worker(
        tasks=TASKS,
        address=os.environ.get("TRELLIS_ADDRESS", DEFAULT_ADDRESS),
        concurrency=int(os.environ.get("WORKER_CONCURRENCY", "16")),
    ).run()

"""A Python worker for examples/saga.yaml.

    python examples/saga_worker.py            # TRELLIS_ADDRESS defaults to 127.0.0.1:7400

`ship-order` fails (retryable) when the execution input has "ship_fails": true, so the
node is retried, dead-lettered, its failure handler runs, and the completed steps are
compensated in reverse order.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from worker_sdk import DEFAULT_ADDRESS, TaskContext, Worker, task


@task("reserve-stock")
async def reserve(ctx: TaskContext, order: dict[str, Any]) -> dict[str, Any]:
    return {**order, "reservation": f"R-{order['order']}"}


@task("charge-card")
async def charge(ctx: TaskContext, order: dict[str, Any]) -> dict[str, Any]:
    return {**order, "payment": f"P-{order['order']}"}


class ShippingUnavailable(Exception):
    """The carrier refused the parcel."""


@task("ship-order")
async def ship(ctx: TaskContext, order: dict[str, Any]) -> dict[str, Any]:
    ctx.heartbeat({"stage": "booking carrier"})
    if order.get("ship_fails"):
        raise ShippingUnavailable(f"carrier down (attempt {ctx.attempt})")
    return {"tracking": f"T-{order['order']}"}


@task("alert-ops")
async def alert(ctx: TaskContext, failure: dict[str, Any]) -> dict[str, str]:
    ctx.logger.warning("node %s failed: %s", failure["node_id"], failure["error"]["message"])
    return {"alerted": failure["node_id"]}


@task("refund-card")
async def refund(ctx: TaskContext, step: dict[str, Any]) -> dict[str, str]:
    return {"refunded": step["output"]["payment"]}


@task("release-stock")
async def release(ctx: TaskContext, step: dict[str, Any]) -> dict[str, str]:
    return {"released": step["output"]["reservation"]}


TASKS = [reserve, charge, ship, alert, refund, release]

if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("TRELLIS_LOG_LEVEL", "INFO"))
    Worker(tasks=TASKS, address=os.environ.get("TRELLIS_ADDRESS", DEFAULT_ADDRESS)).run()

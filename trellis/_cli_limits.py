"""``trellis limits ...`` and ``trellis breakers ...``: DispatchService from the shell.

Hooked into ``trellis.cli`` by ``add_parser``. Talks gRPC with the generated stubs; a
failed call raises the SDK's ``RpcError``, which the CLI prints as ``trellis: CODE: msg``.
``limits set`` changes only the limits given on the command line: it reads the type's
current limits, applies the flags and writes the result back.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import grpc

from trellis._cli_rpc import Usage, runner
from trellis._cli_rpc import doc as _doc
from trellis._cli_rpc import output_flag as _output
from trellis._cli_rpc import print_json as _print_json
from trellis._cli_rpc import table as _table
from trellis.v1 import dispatch_service_pb2 as dpb
from trellis.v1 import dispatch_service_pb2_grpc as dgrpc
from worker_sdk._duration import parse_duration

TIMEOUT = 30.0

if TYPE_CHECKING:
    Stub = dgrpc.DispatchServiceAsyncStub


_Usage = Usage
_run = runner(dgrpc.DispatchServiceStub)


def _seconds(duration: Any) -> str:
    return f"{duration.ToTimedelta().total_seconds():g}s"


def _rate(limits: dpb.TaskTypeLimits) -> str:
    if not limits.rate_per_second:
        return "-"
    burst = limits.burst or "auto"
    key = f" per {limits.rate_key}" if limits.rate_key else ""
    return f"{limits.rate_per_second:g}/s burst {burst}{key}"


def _concurrency(limits: dpb.TaskTypeLimits) -> str:
    parts = [f"max {limits.max_concurrency}"] if limits.max_concurrency else []
    if limits.concurrency_key:
        parts.append(f"{limits.concurrency_key_limit} per {limits.concurrency_key}")
    return ", ".join(parts) or "-"


def _breaker(limits: dpb.TaskTypeLimits) -> str:
    if not limits.breaker_failure_threshold:
        return "-"
    reset = _seconds(limits.breaker_reset_timeout)
    return f"after {limits.breaker_failure_threshold} failures, reset {reset}"


def _show_limits(limits: dpb.TaskTypeLimits) -> None:
    print(f"task type    {limits.task_type}")
    print(f"rate         {_rate(limits)}")
    print(f"concurrency  {_concurrency(limits)}")
    print(f"breaker      {_breaker(limits)}")
    if limits.HasField("update_time"):
        print(f"updated      {limits.update_time.ToJsonString()}")


# -- limits -----------------------------------------------------------------------------------


def _merge(current: dpb.TaskTypeLimits, a: argparse.Namespace) -> dpb.TaskTypeLimits:
    """``current`` with the limits given on the command line applied."""
    out = dpb.TaskTypeLimits()
    out.CopyFrom(current)
    out.ClearField("update_time")
    if a.rate is not None:
        out.rate_per_second = a.rate
        if not a.rate:  # no rate limit: its bucket settings go too, unless given
            out.burst = 0
            out.rate_key = ""
    if a.burst is not None:
        out.burst = a.burst
    if a.rate_key is not None:
        out.rate_key = a.rate_key
    if a.max_concurrency is not None:
        out.max_concurrency = a.max_concurrency
    if a.concurrency_key is not None:
        out.concurrency_key = a.concurrency_key
        if not a.concurrency_key:
            out.concurrency_key_limit = 0
    if a.concurrency_key_limit is not None:
        out.concurrency_key_limit = a.concurrency_key_limit
    if a.breaker_threshold is not None:
        out.breaker_failure_threshold = a.breaker_threshold
    if a.breaker_reset is not None:
        try:
            reset = parse_duration(a.breaker_reset, what="--breaker-reset")
        except ValueError as exc:
            raise _Usage(str(exc)) from exc
        out.breaker_reset_timeout.FromTimedelta(reset)
    return out


_SET_FLAGS = (
    "rate",
    "burst",
    "rate_key",
    "max_concurrency",
    "concurrency_key",
    "concurrency_key_limit",
    "breaker_threshold",
    "breaker_reset",
)


async def _limits_set(stub: Stub, a: argparse.Namespace) -> int:
    if all(getattr(a, name) is None for name in _SET_FLAGS):
        raise _Usage(
            "give at least one limit to set, e.g. --rate 10 or --max-concurrency 5 "
            "(see trellis limits set --help)"
        )
    try:
        reply = await stub.GetTaskTypeLimits(
            dpb.GetTaskTypeLimitsRequest(task_type=a.task_type), timeout=TIMEOUT
        )
        current = reply.limits
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        current = dpb.TaskTypeLimits(task_type=a.task_type)
    stored = await stub.SetTaskTypeLimits(
        dpb.SetTaskTypeLimitsRequest(limits=_merge(current, a)), timeout=TIMEOUT
    )
    if a.output == "json":
        _print_json(_doc(stored.limits))
    else:
        _show_limits(stored.limits)
    return 0


async def _limits_get(stub: Stub, a: argparse.Namespace) -> int:
    reply = await stub.GetTaskTypeLimits(
        dpb.GetTaskTypeLimitsRequest(task_type=a.task_type), timeout=TIMEOUT
    )
    if a.output == "json":
        _print_json(_doc(reply.limits))
    else:
        _show_limits(reply.limits)
    return 0


async def _limits_list(stub: Stub, a: argparse.Namespace) -> int:
    reply = await stub.ListTaskTypeLimits(dpb.ListTaskTypeLimitsRequest(), timeout=TIMEOUT)
    if a.output == "json":
        _print_json([_doc(x) for x in reply.limits])
        return 0
    if not reply.limits:
        print("no task type has limits; set some with `trellis limits set TYPE ...`")
        return 0
    _table(
        ("TYPE", "RATE", "CONCURRENCY", "BREAKER"),
        [(x.task_type, _rate(x), _concurrency(x), _breaker(x)) for x in reply.limits],
    )
    return 0


async def _limits_delete(stub: Stub, a: argparse.Namespace) -> int:
    await stub.DeleteTaskTypeLimits(
        dpb.DeleteTaskTypeLimitsRequest(task_type=a.task_type), timeout=TIMEOUT
    )
    print(f"limits of {a.task_type} deleted")
    return 0


# -- breakers ---------------------------------------------------------------------------------


def _state(value: dpb.BreakerState.ValueType) -> str:
    return dpb.BreakerState.Name(value).removeprefix("BREAKER_STATE_").lower().replace("_", "-")


def _breaker_doc(b: dpb.Breaker) -> dict[str, Any]:
    doc = _doc(b)
    doc["state"] = _state(b.state)
    return doc


def _breaker_row(b: dpb.Breaker) -> tuple[str, ...]:
    opened = b.open_time.ToJsonString() if b.HasField("open_time") else "-"
    return (
        b.task_type,
        _state(b.state),
        f"{b.failure_count}/{b.failure_threshold}",
        opened,
        "yes" if b.shared else "no",
    )


_BREAKER_HEADER = ("TYPE", "STATE", "FAILURES/THRESHOLD", "OPENED", "SHARED")


async def _breakers_list(stub: Stub, a: argparse.Namespace) -> int:
    reply = await stub.ListBreakers(dpb.ListBreakersRequest(), timeout=TIMEOUT)
    if a.output == "json":
        _print_json([_breaker_doc(b) for b in reply.breakers])
        return 0
    if not reply.breakers:
        print(
            "no task type has a breaker; "
            "add one with `trellis limits set TYPE --breaker-threshold N`"
        )
        return 0
    _table(_BREAKER_HEADER, [_breaker_row(b) for b in reply.breakers])
    return 0


async def _breakers_reset(stub: Stub, a: argparse.Namespace) -> int:
    reply = await stub.ResetBreaker(dpb.ResetBreakerRequest(task_type=a.task_type), timeout=TIMEOUT)
    if a.output == "json":
        _print_json(_breaker_doc(reply.breaker))
    else:
        _table(_BREAKER_HEADER, [_breaker_row(reply.breaker)])
    return 0


def add_parser(sub: Any) -> None:
    """Add ``limits`` and ``breakers`` to the CLI's subcommands."""
    limits = sub.add_parser("limits", help="rate and concurrency limits per task type")
    limits_sub = limits.add_subparsers(dest="limits_command", required=True, metavar="ACTION")

    put = limits_sub.add_parser(
        "set", help="change the limits of a task type (flags not given stay as they are)"
    )
    put.add_argument("task_type", metavar="TYPE")
    put.add_argument("--rate", type=float, help="tasks per second (0 = no rate limit)")
    put.add_argument("--burst", type=int, help="bucket size (0 = one second's worth)")
    put.add_argument("--rate-key", metavar="EXPR", help="CEL over input: a bucket per value")
    put.add_argument("--max-concurrency", type=int, metavar="N", help="leased at once (0 = any)")
    put.add_argument(
        "--concurrency-key",
        metavar="EXPR",
        help="CEL over input, e.g. input.account_id ('' removes it)",
    )
    put.add_argument(
        "--concurrency-key-limit", type=int, metavar="N", help="leased at once per key (1)"
    )
    put.add_argument(
        "--breaker-threshold",
        type=int,
        metavar="N",
        help="consecutive failures that open the breaker (0 = no breaker)",
    )
    put.add_argument(
        "--breaker-reset", metavar="DURATION", help="open this long before a probe, e.g. 30s"
    )
    _output(put)
    put.set_defaults(func=_run(_limits_set))

    get = limits_sub.add_parser("get", help="the limits of a task type")
    get.add_argument("task_type", metavar="TYPE")
    _output(get)
    get.set_defaults(func=_run(_limits_get))
    listed = limits_sub.add_parser("list", help="every task type with limits")
    _output(listed)
    listed.set_defaults(func=_run(_limits_list))
    delete = limits_sub.add_parser("delete", help="remove the limits and breaker of a task type")
    delete.add_argument("task_type", metavar="TYPE")
    delete.set_defaults(func=_run(_limits_delete))

    breakers = sub.add_parser("breakers", help="circuit breakers per task type (default: list)")
    _output(breakers)
    breakers.set_defaults(func=_run(_breakers_list))
    breakers_sub = breakers.add_subparsers(dest="breakers_command", metavar="ACTION")
    shown = breakers_sub.add_parser("list", help="every breaker with its state (the default)")
    _output(shown)
    shown.set_defaults(func=_run(_breakers_list))
    reset = breakers_sub.add_parser("reset", help="close a breaker and clear its failure count")
    reset.add_argument("task_type", metavar="TYPE")
    _output(reset)
    reset.set_defaults(func=_run(_breakers_reset))

"""``trellis schedules ...`` and ``trellis triggers ...``: the TriggerService from the shell.

Talks to the coordinator with the generated stubs (base install: grpcio and protobuf).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format

from trellis._cli_rpc import channel_to
from trellis.v1 import trigger_service_pb2 as tpb
from trellis.v1 import trigger_service_pb2_grpc as tgrpc
from worker_sdk import RpcError

if TYPE_CHECKING:
    Stub = tgrpc.TriggerServiceAsyncStub


_OVERLAP = {
    "skip": tpb.OVERLAP_POLICY_SKIP,
    "allow": tpb.OVERLAP_POLICY_ALLOW,
    "buffer_one": tpb.OVERLAP_POLICY_BUFFER_ONE,
}
_CATCHUP = {
    "skip_missed": tpb.CATCHUP_POLICY_SKIP_MISSED,
    "run_once": tpb.CATCHUP_POLICY_RUN_ONCE,
    "run_all": tpb.CATCHUP_POLICY_RUN_ALL,
}


def _value(raw: str | None) -> str:
    """A literal, or the content of a file given as ``@FILE`` (secrets, inputs)."""
    if raw is None:
        return ""
    if raw.startswith("@"):
        return Path(raw[1:]).read_text().strip()
    return raw


def _call(
    action: Callable[[Stub, argparse.Namespace], Awaitable[Any]],
) -> Callable[[argparse.Namespace], Awaitable[int]]:
    async def run(args: argparse.Namespace) -> int:
        async with channel_to(args.address) as channel:
            try:
                reply = await action(tgrpc.TriggerServiceStub(channel), args)
            except grpc.aio.AioRpcError as exc:
                raise RpcError(exc.code(), exc.details() or "", method="TriggerService") from exc
        if reply is not None:
            print(
                json.dumps(
                    json_format.MessageToDict(reply, preserving_proto_field_name=True), indent=2
                )
            )
        return 0

    return run


# -- schedules ------------------------------------------------------------------------------


async def _schedule_create(stub: Stub, a: argparse.Namespace) -> Any:
    return await stub.CreateSchedule(
        tpb.CreateScheduleRequest(
            id=a.id,
            cron=a.cron,
            timezone=a.timezone or "",
            workflow_name=a.workflow,
            workflow_version=a.version or 0,
            input=_value(a.input).encode(),
            overlap=_OVERLAP[a.overlap],
            catchup=_CATCHUP[a.catchup],
            max_catchup=a.max_catchup or 0,
            paused=a.paused,
        )
    )


async def _schedule_list(stub: Stub, a: argparse.Namespace) -> Any:
    return await stub.ListSchedules(tpb.ListSchedulesRequest())


async def _schedule_get(stub: Stub, a: argparse.Namespace) -> Any:
    return await stub.GetSchedule(tpb.GetScheduleRequest(id=a.id))


async def _schedule_pause(stub: Stub, a: argparse.Namespace) -> Any:
    return await stub.PauseSchedule(tpb.PauseScheduleRequest(id=a.id))


async def _schedule_resume(stub: Stub, a: argparse.Namespace) -> Any:
    return await stub.ResumeSchedule(tpb.ResumeScheduleRequest(id=a.id))


async def _schedule_delete(stub: Stub, a: argparse.Namespace) -> Any:
    await stub.DeleteSchedule(tpb.DeleteScheduleRequest(id=a.id))
    print(f"schedule {a.id} deleted")
    return None


# -- webhooks and events ----------------------------------------------------------------------


async def _webhook_create(stub: Stub, a: argparse.Namespace) -> Any:
    request = tpb.CreateWebhookTriggerRequest(
        path=a.path,
        workflow_name=a.workflow,
        workflow_version=a.version or 0,
        idempotency_key=a.idempotency_key or "",
        input=a.input or "",
    )
    if a.hmac_secret:
        request.hmac_secret = _value(a.hmac_secret)
    if a.bearer_token:
        request.bearer_token = _value(a.bearer_token)
    if a.tolerance:
        request.signature_tolerance.FromSeconds(a.tolerance)
    return await stub.CreateWebhookTrigger(request)


async def _webhook_list(stub: Stub, a: argparse.Namespace) -> Any:
    return await stub.ListWebhookTriggers(tpb.ListWebhookTriggersRequest())


async def _webhook_delete(stub: Stub, a: argparse.Namespace) -> Any:
    await stub.DeleteWebhookTrigger(tpb.DeleteWebhookTriggerRequest(path=a.path))
    print(f"webhook trigger {a.path} deleted")
    return None


async def _event_create(stub: Stub, a: argparse.Namespace) -> Any:
    return await stub.CreateEventTrigger(
        tpb.CreateEventTriggerRequest(
            event_name=a.event,
            workflow_name=a.workflow,
            workflow_version=a.version or 0,
            filter=a.filter or "",
            input=a.input or "",
        )
    )


async def _event_list(stub: Stub, a: argparse.Namespace) -> Any:
    return await stub.ListEventTriggers(tpb.ListEventTriggersRequest(event_name=a.event or ""))


async def _event_delete(stub: Stub, a: argparse.Namespace) -> Any:
    await stub.DeleteEventTrigger(tpb.DeleteEventTriggerRequest(id=a.id))
    print(f"event trigger {a.id} deleted")
    return None


async def _publish(stub: Stub, a: argparse.Namespace) -> Any:
    return await stub.PublishEvent(
        tpb.PublishEventRequest(
            name=a.name,
            payload=_value(a.payload).encode(),
            idempotency_key=a.idempotency_key or "",
        )
    )


def _target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workflow", required=True, help="workflow name")
    p.add_argument("--version", type=int, help="definition version (default: latest)")


def add_commands(sub: Any) -> None:
    """Add ``schedules`` and ``triggers`` to the ``trellis`` subcommands."""
    sch = sub.add_parser("schedules", help="cron schedules that start workflows")
    sch_sub = sch.add_subparsers(dest="schedules_command", required=True, metavar="ACTION")
    create = sch_sub.add_parser("create", help="create a schedule")
    create.add_argument("id")
    create.add_argument(
        "--cron",
        required=True,
        help="5 fields (m h dom mon dow) or 6 with leading seconds, e.g. '*/5 * * * *'",
    )
    create.add_argument("--timezone", help="IANA name (default UTC)")
    _target(create)
    create.add_argument("--input", help="JSON input, or @FILE")
    create.add_argument("--overlap", choices=sorted(_OVERLAP), default="skip")
    create.add_argument("--catchup", choices=sorted(_CATCHUP), default="run_once")
    create.add_argument("--max-catchup", type=int, help="run_all: at most this many (100)")
    create.add_argument("--paused", action="store_true", help="create it paused")
    create.set_defaults(func=_call(_schedule_create))
    sch_sub.add_parser("list", help="list schedules").set_defaults(func=_call(_schedule_list))
    for name, action, text in (
        ("get", _schedule_get, "a schedule with its latest fires"),
        ("pause", _schedule_pause, "stop firing until resumed"),
        ("resume", _schedule_resume, "fire again from the next time (no catch-up)"),
        ("delete", _schedule_delete, "delete a schedule"),
    ):
        cmd = sch_sub.add_parser(name, help=text)
        cmd.add_argument("id")
        cmd.set_defaults(func=_call(action))

    trg = sub.add_parser("triggers", help="webhook and event triggers")
    trg_sub = trg.add_subparsers(dest="triggers_command", required=True, metavar="KIND")

    wh = trg_sub.add_parser("webhook", help="webhooks served by the gateway")
    wh_sub = wh.add_subparsers(dest="webhook_command", required=True, metavar="ACTION")
    wc = wh_sub.add_parser("create", help="POST /api/webhooks/PATH starts the workflow")
    wc.add_argument("path")
    _target(wc)
    auth = wc.add_mutually_exclusive_group(required=True)
    auth.add_argument("--hmac-secret", help="HMAC-SHA256 secret, or @FILE")
    auth.add_argument("--bearer-token", help="bearer token, or @FILE")
    wc.add_argument("--tolerance", type=int, help="signature timestamp tolerance, s (300)")
    wc.add_argument("--idempotency-key", help="CEL over body and headers, e.g. body.id")
    wc.add_argument("--input", help="CEL over body and headers (default: the body)")
    wc.set_defaults(func=_call(_webhook_create))
    wh_sub.add_parser("list", help="list webhook triggers").set_defaults(func=_call(_webhook_list))
    wd = wh_sub.add_parser("delete", help="delete a webhook trigger")
    wd.add_argument("path")
    wd.set_defaults(func=_call(_webhook_delete))

    ev = trg_sub.add_parser("event", help="triggers started by published events")
    ev_sub = ev.add_subparsers(dest="event_command", required=True, metavar="ACTION")
    ec = ev_sub.add_parser("create", help="start the workflow when EVENT is published")
    ec.add_argument("event")
    _target(ec)
    ec.add_argument("--filter", help="boolean CEL over event, e.g. event.total > 100")
    ec.add_argument("--input", help="CEL over event (default: the payload)")
    ec.set_defaults(func=_call(_event_create))
    el = ev_sub.add_parser("list", help="list event triggers")
    el.add_argument("--event", help="only this event's")
    el.set_defaults(func=_call(_event_list))
    ed = ev_sub.add_parser("delete", help="delete an event trigger")
    ed.add_argument("id")
    ed.set_defaults(func=_call(_event_delete))
    pub = ev_sub.add_parser("publish", help="publish an event")
    pub.add_argument("name")
    pub.add_argument("--payload", help="JSON payload, or @FILE")
    pub.add_argument("--idempotency-key")
    pub.set_defaults(func=_call(_publish))

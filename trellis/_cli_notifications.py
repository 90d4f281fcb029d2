"""``trellis notifications ...``: channels, rules and deliveries over NotificationService.

Hooked into ``trellis.cli`` by ``add_parser``. Talks gRPC with the generated stubs; a
failed call raises the SDK's ``RpcError``, which the CLI prints as ``trellis: CODE: msg``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from trellis._cli_rpc import Usage, runner
from trellis.v1 import common_pb2
from trellis.v1 import notification_service_pb2 as npb
from trellis.v1 import notification_service_pb2_grpc as ngrpc

FINAL_STATUSES = ("SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED")
DELIVERY_STATUSES = ("PENDING", "DELIVERED", "FAILED")
TIMEOUT = 30.0

if TYPE_CHECKING:
    Stub = ngrpc.NotificationServiceAsyncStub


_Usage = Usage
_run = runner(ngrpc.NotificationServiceStub)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _doc(message: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return doc


def _secret(value: str | None) -> str:
    """``env:NAME`` reads the secret from the environment (kept off the command line)."""
    if value and value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise _Usage(f"--secret/--password env:{name}: the variable {name} is not set")
        return os.environ[name]
    return value or ""


def _headers(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise _Usage(f"--header {pair!r}: write NAME=VALUE")
        out[name.strip()] = value
    return out


def _channel_from_args(args: argparse.Namespace) -> npb.Channel:
    channel = npb.Channel(name=args.name)
    if args.kind == "webhook":
        channel.webhook.CopyFrom(
            npb.WebhookChannel(
                url=args.url, secret=_secret(args.secret), headers=_headers(args.header)
            )
        )
    elif args.kind == "smtp":
        channel.smtp.CopyFrom(
            npb.SmtpChannel(
                host=args.host,
                port=args.port,
                from_address=args.from_address,
                to=args.to or [],
                starttls=args.starttls,
                username=args.username or "",
                password=_secret(args.password),
                subject_template=args.subject or "",
                body_template=args.body or "",
            )
        )
    else:
        channel.sms.CopyFrom(
            npb.SmsChannel(
                method=args.method,
                url=args.url,
                headers=_headers(args.header),
                body_template=args.body or "",
                to=args.to or [],
            )
        )
    return channel


def _show_channel(channel: npb.Channel) -> str:
    kind = channel.WhichOneof("settings") or "?"
    target = {
        "webhook": lambda: channel.webhook.url,
        "smtp": lambda: f"{channel.smtp.host}:{channel.smtp.port} -> {', '.join(channel.smtp.to)}",
        "sms": lambda: f"{channel.sms.url} -> {', '.join(channel.sms.to)}",
    }.get(kind, lambda: "")()
    return f"{channel.id}  {channel.name}  {kind}  {target}"


async def _channel_create(stub: Stub, args: argparse.Namespace) -> int:
    request = npb.CreateChannelRequest(channel=_channel_from_args(args))
    reply = await stub.CreateChannel(request, timeout=TIMEOUT)
    print(_show_channel(reply.channel))
    return 0


async def _channel_list(stub: Stub, args: argparse.Namespace) -> int:
    reply = await stub.ListChannels(npb.ListChannelsRequest(), timeout=TIMEOUT)
    if args.output == "json":
        _print_json([_doc(c) for c in reply.channels])
    else:
        for c in reply.channels:
            print(_show_channel(c))
    return 0


async def _channel_show(stub: Stub, args: argparse.Namespace) -> int:
    reply = await stub.GetChannel(npb.GetChannelRequest(channel=args.channel), timeout=TIMEOUT)
    _print_json(_doc(reply.channel))
    return 0


async def _channel_delete(stub: Stub, args: argparse.Namespace) -> int:
    await stub.DeleteChannel(npb.DeleteChannelRequest(channel=args.channel), timeout=TIMEOUT)
    print(f"channel {args.channel} deleted")
    return 0


def _show_rule(rule: npb.NotificationRule) -> str:
    target = (
        f"workflow {rule.workflow_name}" if rule.workflow_name else f"execution {rule.execution_id}"
    )
    statuses = ",".join(
        common_pb2.ExecutionStatus.Name(s).removeprefix("EXECUTION_STATUS_") for s in rule.statuses
    )
    return f"{rule.id}  channel {rule.channel_id}  {target}  on {statuses}"


async def _rule_create(stub: Stub, args: argparse.Namespace) -> int:
    request = npb.CreateNotificationRuleRequest(
        channel=args.channel,
        statuses=[common_pb2.ExecutionStatus.Value(f"EXECUTION_STATUS_{s}") for s in args.on or []],
    )
    if args.workflow:
        request.workflow_name = args.workflow
    else:
        request.execution_id = args.execution
    reply = await stub.CreateNotificationRule(request, timeout=TIMEOUT)
    print(_show_rule(reply.rule))
    return 0


async def _rule_list(stub: Stub, args: argparse.Namespace) -> int:
    request = npb.ListNotificationRulesRequest(
        channel=args.channel or "",
        workflow_name=args.workflow or "",
        execution_id=args.execution or "",
    )
    reply = await stub.ListNotificationRules(request, timeout=TIMEOUT)
    if args.output == "json":
        _print_json([_doc(r) for r in reply.rules])
    else:
        for r in reply.rules:
            print(_show_rule(r))
    return 0


async def _rule_delete(stub: Stub, args: argparse.Namespace) -> int:
    await stub.DeleteNotificationRule(
        npb.DeleteNotificationRuleRequest(id=args.id), timeout=TIMEOUT
    )
    print(f"rule {args.id} deleted")
    return 0


def _delivery_doc(d: npb.Delivery) -> dict[str, Any]:
    doc = _doc(d)
    doc.pop("payload", None)
    doc["notification"] = json.loads(d.payload) if d.payload else None
    doc["status"] = npb.DeliveryStatus.Name(d.status).removeprefix("DELIVERY_STATUS_")
    doc["execution_status"] = common_pb2.ExecutionStatus.Name(d.execution_status).removeprefix(
        "EXECUTION_STATUS_"
    )
    doc.setdefault("attempts", [])
    return doc


async def _deliveries(stub: Stub, args: argparse.Namespace) -> int:
    request = npb.ListDeliveriesRequest(
        execution_id=args.execution or "",
        channel=args.channel or "",
        status=npb.DeliveryStatus.Value(f"DELIVERY_STATUS_{args.status or 'UNSPECIFIED'}"),
        page_size=args.limit,
    )
    reply = await stub.ListDeliveries(request, timeout=TIMEOUT)
    if args.output == "json":
        _print_json([_delivery_doc(d) for d in reply.deliveries])
        return 0
    for d in reply.deliveries:
        doc = _delivery_doc(d)
        last = f"  last error: {d.last_error}" if d.last_error else ""
        print(
            f"{d.id}  {doc['status']:<9}  execution {d.execution_id} "
            f"({doc['execution_status']})  channel {d.channel_id}  attempts={len(d.attempts)}{last}"
        )
    return 0


def add_parser(sub: Any) -> None:
    """Add ``notifications`` to the CLI's subcommands."""
    notes = sub.add_parser("notifications", help="notification channels, rules and deliveries")
    notes_sub = notes.add_subparsers(dest="notifications_command", required=True, metavar="WHAT")

    channel = notes_sub.add_parser("channel", help="where notifications go")
    channel_sub = channel.add_subparsers(dest="channel_command", required=True, metavar="ACTION")
    create = channel_sub.add_parser("create", help="create a webhook, smtp or sms channel")
    kinds = create.add_subparsers(dest="kind", required=True, metavar="KIND")

    hook = kinds.add_parser("webhook", help="POST signed JSON to a URL")
    hook.add_argument("name")
    hook.add_argument("--url", required=True)
    hook.add_argument("--secret", required=True, help="signing secret, or env:VAR")
    hook.add_argument("--header", action="append", metavar="NAME=VALUE")

    mail = kinds.add_parser("smtp", help="send e-mail through an SMTP server")
    mail.add_argument("name")
    mail.add_argument("--host", required=True)
    mail.add_argument("--port", type=int, default=25)
    mail.add_argument("--from", dest="from_address", required=True)
    mail.add_argument("--to", action="append", required=True, help="repeat for several")
    mail.add_argument("--starttls", action="store_true")
    mail.add_argument("--username")
    mail.add_argument("--password", help="password, or env:VAR")
    mail.add_argument("--subject", help="subject template, e.g. '{workflow_name} {status}'")
    mail.add_argument("--body", help="body template")

    sms = kinds.add_parser("sms", help="an SMS provider's HTTP API")
    sms.add_argument("name")
    sms.add_argument("--url", required=True, help="URL template ({to} is the recipient)")
    sms.add_argument("--method", default="POST", choices=["POST", "PUT", "GET"])
    sms.add_argument("--header", action="append", metavar="NAME=VALUE", help="value template")
    sms.add_argument("--body", help="body template")
    sms.add_argument("--to", action="append", required=True, help="repeat for several")
    for parser in (hook, mail, sms):
        parser.set_defaults(func=_run(_channel_create))

    channel_list = channel_sub.add_parser("list", help="list channels")
    channel_list.add_argument("--output", choices=["text", "json"], default="text")
    channel_list.set_defaults(func=_run(_channel_list))
    show = channel_sub.add_parser("show", help="a channel's settings (secrets not shown)")
    show.add_argument("channel", help="id or name")
    show.set_defaults(func=_run(_channel_show))
    delete = channel_sub.add_parser("delete", help="delete a channel and its rules")
    delete.add_argument("channel", help="id or name")
    delete.set_defaults(func=_run(_channel_delete))

    rule = notes_sub.add_parser("rule", help="when to notify")
    rule_sub = rule.add_subparsers(dest="rule_command", required=True, metavar="ACTION")
    rule_create = rule_sub.add_parser("create", help="attach a channel to a workflow or execution")
    rule_create.add_argument("--channel", required=True, help="id or name")
    target = rule_create.add_mutually_exclusive_group(required=True)
    target.add_argument("--workflow", help="every version of this workflow")
    target.add_argument("--execution", help="this execution only")
    rule_create.add_argument(
        "--on",
        action="append",
        choices=FINAL_STATUSES,
        help="final status to notify on; repeat; default: all",
    )
    rule_create.set_defaults(func=_run(_rule_create))
    rule_list = rule_sub.add_parser("list", help="list rules")
    rule_list.add_argument("--channel")
    rule_list.add_argument("--workflow")
    rule_list.add_argument("--execution")
    rule_list.add_argument("--output", choices=["text", "json"], default="text")
    rule_list.set_defaults(func=_run(_rule_list))
    rule_delete = rule_sub.add_parser("delete", help="delete a rule")
    rule_delete.add_argument("id")
    rule_delete.set_defaults(func=_run(_rule_delete))

    deliveries = notes_sub.add_parser(
        "deliveries", help="notifications sent or pending, with every attempt (newest first)"
    )
    deliveries.add_argument("--execution")
    deliveries.add_argument("--channel", help="id or name")
    deliveries.add_argument("--status", choices=DELIVERY_STATUSES)
    deliveries.add_argument("--limit", type=int, default=50)
    deliveries.add_argument("--output", choices=["text", "json"], default="text")
    deliveries.set_defaults(func=_run(_deliveries))

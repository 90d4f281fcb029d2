"""The ``trellis`` command-line tool.

Client commands (workflow, run, status) talk to a coordinator over gRPC with the
worker SDK's client; server commands (dev, coordinator serve, migrate) need the
``[coordinator]`` extra. Errors print one line on stderr and exit with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trellis import (
    _cli_identity,
    _cli_limits,
    _cli_notifications,
    _cli_secrets,
    _cli_triggers,
)
from worker_sdk import (
    Client,
    DeadLetter,
    DefinitionError,
    Execution,
    RpcError,
    TrellisError,
)
from worker_sdk._settings import ConnectionSettings

EXIT_FAILED = 1
DEV_DATABASE = ".trellis/dev.db"
DEV_ADMIN_KEY = ".trellis/dev-admin-key"
# The dev coordinator's at-rest encryption key (made on the first run, owner-only), kept
# out of the database it protects.
DEV_ENCRYPTION_KEYS = ".trellis/dev-encryption-keys"


class CliError(Exception):
    """A usage problem; printed as one line."""


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _execution_doc(execution: Execution) -> dict[str, Any]:
    return {
        "id": execution.id,
        "workflow": execution.workflow_name,
        "version": execution.workflow_version,
        "status": execution.status,
        "input": execution.input,
        "output": execution.output,
        "error": None
        if execution.error is None
        else {
            "type": execution.error.type,
            "message": execution.error.message,
            "node_id": execution.error.node_id,
            "attempt": execution.error.attempt,
        },
        "created": execution.create_time,
        "ended": execution.end_time,
        "nodes": [
            {
                "id": n.node_id,
                "task_type": n.task_type,
                "status": n.status,
                "attempt": n.attempt,
                "worker_id": n.worker_id,
                "output": n.output,
                "error": None if n.error is None else n.error.message,
            }
            for n in execution.nodes
        ],
    }


def _print_execution(execution: Execution) -> None:
    print(f"execution {execution.id}")
    print(f"  workflow  {execution.workflow_name} v{execution.workflow_version}")
    print(f"  status    {execution.status}")
    if execution.output is not None or execution.status == "SUCCEEDED":
        print(f"  output    {json.dumps(execution.output)}")
    if execution.error is not None:
        print(f"  error     {execution.error.type}: {execution.error.message}")
    if execution.nodes:
        width = max(len(n.node_id) for n in execution.nodes)
        print(f"  {'NODE'.ljust(width)}  {'STATUS':<10} ATTEMPT  WORKER")
        for n in execution.nodes:
            print(f"  {n.node_id.ljust(width)}  {n.status:<10} {n.attempt:<8} {n.worker_id or '-'}")


def _parse_input(raw: str | None) -> bytes:
    if raw is None:
        return b"null"
    if raw.startswith("@"):
        path = Path(raw[1:])
        try:
            return path.read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read input file {path}: {exc.strerror}") from exc
    return raw.encode()


# -- client commands -----------------------------------------------------------------------


async def _apply(args: argparse.Namespace) -> int:
    async with Client(args.address) as client:
        for path in args.files:
            reg = await client.register_workflow(Path(path))
            state = "registered" if reg.created else "unchanged"
            print(f"{reg.name} version {reg.version} {state}")
    return 0


async def _list_workflows(args: argparse.Namespace) -> int:
    async with Client(args.address) as client:
        rows = await client.list_workflows()
    if args.output == "json":
        _print_json([{"name": w.name, "latest_version": w.latest_version} for w in rows])
    else:
        for w in rows:
            print(f"{w.name}\tv{w.latest_version}\t{w.description}")
    return 0


def _parse_start_at(raw: str | None) -> datetime | None:
    """An ISO 8601 time; without an offset it is local time."""
    if raw is None:
        return None
    try:
        when = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise CliError(
            f"--at {raw!r} is not an ISO 8601 time (e.g. 2030-01-31T09:00:00+01:00)"
        ) from exc
    return when if when.utcoffset() is not None else when.astimezone()


async def _run(args: argparse.Namespace) -> int:
    if args.delay is not None and args.at is not None:
        raise CliError("give either --delay or --at, not both")
    start_at = _parse_start_at(args.at)
    async with Client(args.address) as client:
        try:
            execution = await client.start_execution(
                args.name,
                _parse_input(args.input),
                version=args.version,
                idempotency_key=args.idempotency_key,
                priority=args.priority,
                delay=args.delay,
                start_at=start_at,
                max_concurrency=args.max_concurrency,
            )
        except ValueError as exc:  # a malformed --delay
            raise CliError(str(exc)) from exc
        if args.wait:
            execution = await client.wait_for_execution(execution.id, timeout=args.timeout)
    if args.output == "json":
        _print_json(_execution_doc(execution))
    elif args.wait:
        _print_execution(execution)
    else:
        print(execution.id)
    if args.wait and execution.status != "SUCCEEDED":
        return EXIT_FAILED
    return 0


async def _workflow_versions(args: argparse.Namespace) -> int:
    async with Client(args.address) as client:
        definitions = await client.list_workflow_versions(args.name)
    rows: list[dict[str, Any]] = [
        {
            "version": d.version,
            "created": d.create_time.ToDatetime(tzinfo=UTC).isoformat()
            if d.HasField("create_time")
            else None,
            "nodes": len(d.nodes),
            "description": d.description,
        }
        for d in definitions
    ]
    if args.output == "json":
        _print_json(rows)
    else:
        for row in rows:
            created = row["created"] or "-"
            print(f"v{row['version']}\t{created}\t{row['nodes']} nodes\t{row['description']}")
    return 0


async def _status(args: argparse.Namespace) -> int:
    async with Client(args.address) as client:
        execution = await client.get_execution(args.execution_id)
    if args.output == "json":
        _print_json(_execution_doc(execution))
    else:
        _print_execution(execution)
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    async with Client(args.address) as client:
        if args.node:
            execution = await client.cancel_node(args.execution_id, args.node, args.reason or "")
        else:
            execution = await client.cancel_execution(args.execution_id, args.reason or "")
    _show(args, execution)
    return 0


async def _pause(args: argparse.Namespace) -> int:
    async with Client(args.address) as client:
        if args.node:
            execution = await client.pause_node(args.execution_id, args.node)
        else:
            execution = await client.pause_execution(args.execution_id)
    _show(args, execution)
    return 0


async def _resume(args: argparse.Namespace) -> int:
    async with Client(args.address) as client:
        if args.node:
            execution = await client.resume_node(args.execution_id, args.node)
        else:
            execution = await client.resume_execution(args.execution_id)
    _show(args, execution)
    return 0


async def _approve(args: argparse.Namespace) -> int:
    async with Client(args.address) as client:
        execution = await client.approve_node(args.execution_id, args.node_id, args.comment or "")
    _show(args, execution)
    return 0


async def _reject(args: argparse.Namespace) -> int:
    async with Client(args.address) as client:
        execution = await client.reject_node(args.execution_id, args.node_id, args.comment or "")
    _show(args, execution)
    return 0


def _show(args: argparse.Namespace, execution: Execution) -> None:
    if args.output == "json":
        _print_json(_execution_doc(execution))
    else:
        _print_execution(execution)


def _dead_letter_doc(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "execution_id": letter.execution_id,
        "workflow": letter.workflow_name,
        "version": letter.workflow_version,
        "node_id": letter.node_id,
        "task_type": letter.task_type,
        "input": letter.input,
        "created": letter.create_time,
        "redriven": letter.redrive_time,
        "attempts": [
            {
                "attempt": a.attempt,
                "worker_id": a.worker_id,
                "time": a.time,
                "error": None
                if a.error is None
                else {"type": a.error.type, "message": a.error.message},
            }
            for a in letter.attempts
        ],
    }


async def _dlq_list(args: argparse.Namespace) -> int:
    async with Client(args.address) as client:
        letters = await client.list_dead_letters(
            workflow_name=args.workflow,
            task_type=args.task_type,
            include_redriven=args.all,
            limit=args.limit,
        )
    if args.output == "json":
        _print_json([_dead_letter_doc(d) for d in letters])
        return 0
    for d in letters:
        last = d.attempts[-1].error if d.attempts else None
        reason = f"{last.type}: {last.message}" if last else "-"
        state = " (redriven)" if d.redrive_time else ""
        print(f"{d.id}  {d.workflow_name}/{d.node_id}  attempts={len(d.attempts)}  {reason}{state}")
    return 0


async def _dlq_show(args: argparse.Namespace) -> int:
    async with Client(args.address) as client:
        letter = await client.get_dead_letter(args.id)
    _print_json(_dead_letter_doc(letter))
    return 0


async def _dlq_redrive(args: argparse.Namespace) -> int:
    async with Client(args.address) as client:
        execution = await client.redrive_dead_letter(args.id)
    _show(args, execution)
    return 0


# -- server commands -----------------------------------------------------------------------


def _coordinator_config(environ: Mapping[str, str], overrides: dict[str, Any]) -> Any:
    try:
        from coordinator.config import CoordinatorConfig
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise CliError(
            "the coordinator is not installed; pip install 'trellis[coordinator]'"
        ) from exc
    config = CoordinatorConfig.from_env(environ)
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


async def _serve(config: Any) -> int:
    from coordinator.grpc.server import serve
    from coordinator.logs import configure_logging

    configure_logging(config.log_level, config.log_format)
    try:
        await serve(config)
    except OSError as exc:
        raise CliError(f"cannot serve on {config.listen}: {exc}") from exc
    return 0


def _dev_admin_key(environ: Mapping[str, str], path: Path) -> str:
    """The dev coordinator's admin key: TRELLIS_BOOTSTRAP_ADMIN_KEY, else the one kept in
    ``path`` (made on the first run, readable by its owner only)."""
    given = environ.get("TRELLIS_BOOTSTRAP_ADMIN_KEY", "").strip()
    if given:
        return given
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "dev-" + secrets.token_urlsafe(24)
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key


def _dev_encryption_keys(environ: Mapping[str, str], path: Path) -> dict[str, str]:
    """The dev coordinator's encryption key setting: the environment's if any, else the
    key file at ``path`` (made on the first run, readable by its owner only)."""
    if environ.get("TRELLIS_ENCRYPTION_KEYS") or environ.get("TRELLIS_ENCRYPTION_KEYS_FILE"):
        return {}
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(f"dev1:{base64.b64encode(os.urandom(32)).decode()}\n")
    return {"encryption_keys_file": str(path)}


async def _dev(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    database = args.database_url or env.get("TRELLIS_DATABASE_URL")
    if not database:
        Path(DEV_DATABASE).parent.mkdir(parents=True, exist_ok=True)
        database = f"sqlite:///{DEV_DATABASE}"
    key = _dev_admin_key(env, Path(args.admin_key_file))
    config = _coordinator_config(
        env,
        {
            "database_url": database,
            "listen": args.listen,
            "auto_migrate": True,
            "plaintext": True,
            "bootstrap_admin_key": key,
            **_dev_encryption_keys(env, Path(DEV_ENCRYPTION_KEYS)),
        },
    )
    print(
        f"trellis dev: coordinator on {config.listen} (plaintext), database "
        f"{config.database_url}\n"
        f"trellis dev: admin key of the default tenant (kept in {args.admin_key_file}):\n"
        f"    export TRELLIS_API_KEY={key}",
        file=sys.stderr,
    )
    return await _serve(config)


async def _coordinator_serve(args: argparse.Namespace) -> int:
    return await _serve(_coordinator_config(os.environ, {"listen": args.listen}))


async def _gateway_serve(args: argparse.Namespace) -> int:
    try:
        from gateway.app import serve
        from gateway.config import GatewayConfig, GatewayConfigError
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise CliError("the gateway is not installed; pip install 'trellis[gateway]'") from exc
    from coordinator.logs import configure_logging

    try:
        config = GatewayConfig.from_env(os.environ)
        if args.listen:
            config = replace(config, listen=args.listen)
        if args.coordinator:
            config = replace(config, coordinator_address=args.coordinator)
        config.host_port  # noqa: B018 - validates the listen address before serving
    except GatewayConfigError as exc:
        raise CliError(str(exc)) from exc
    # The coordinator's text format: one escaped line per record (requests' paths and
    # headers reach the logs).
    configure_logging(config.log_level, "text")
    await serve(config)
    return 0


async def _migrate(args: argparse.Namespace) -> int:
    config = _coordinator_config(os.environ, {"database_url": args.database_url})
    from coordinator.store import migrate

    await migrate(config.database_url, encryption_keys=config.encryption_key_text())
    print(f"database at {config.database_url} is up to date")
    return 0


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trellis", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--address",
        default=ConnectionSettings.from_env(os.environ).address,
        help="coordinator address HOST:PORT (env TRELLIS_ADDRESS, default %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = sub.add_parser("dev", help="run a coordinator on SQLite in the foreground")
    dev.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:7400)")
    dev.add_argument(
        "--admin-key-file",
        default=DEV_ADMIN_KEY,
        help=f"where the admin key is kept between runs (default {DEV_ADMIN_KEY})",
    )
    dev.add_argument("--database-url", help=f"default sqlite:///{DEV_DATABASE}")
    dev.set_defaults(func=_dev)

    coord = sub.add_parser("coordinator", help="coordinator service commands")
    coord_sub = coord.add_subparsers(dest="coordinator_command", required=True, metavar="ACTION")
    serve = coord_sub.add_parser("serve", help="serve with TRELLIS_* settings")
    serve.add_argument("--listen", help="HOST:PORT (overrides TRELLIS_LISTEN)")
    serve.set_defaults(func=_coordinator_serve)

    gw = sub.add_parser("gateway", help="HTTP gateway commands")
    gw_sub = gw.add_subparsers(dest="gateway_command", required=True, metavar="ACTION")
    gw_serve = gw_sub.add_parser("serve", help="serve /healthz and /readyz (TRELLIS_GATEWAY_*)")
    gw_serve.add_argument("--listen", help="HOST:PORT (overrides TRELLIS_GATEWAY_LISTEN)")
    gw_serve.add_argument(
        "--coordinator",
        help="coordinator HOST:PORT (overrides TRELLIS_GATEWAY_COORDINATOR_ADDRESS)",
    )
    gw_serve.set_defaults(func=_gateway_serve)

    mig = sub.add_parser("migrate", help="apply database migrations (TRELLIS_DATABASE_URL)")
    mig.add_argument("--database-url", help="overrides TRELLIS_DATABASE_URL")
    mig.set_defaults(func=_migrate)

    wf = sub.add_parser("workflow", help="workflow definitions")
    wf_sub = wf.add_subparsers(dest="workflow_command", required=True, metavar="ACTION")
    apply = wf_sub.add_parser("apply", help="register definitions from YAML/JSON files")
    apply.add_argument("files", nargs="+", metavar="FILE")
    apply.set_defaults(func=_apply)
    wf_list = wf_sub.add_parser("list", help="list registered workflows")
    wf_list.add_argument("--output", choices=["text", "json"], default="text")
    wf_list.set_defaults(func=_list_workflows)
    wf_versions = wf_sub.add_parser("versions", help="list the registered versions of a workflow")
    wf_versions.add_argument("name", help="workflow name")
    wf_versions.add_argument("--output", choices=["text", "json"], default="text")
    wf_versions.set_defaults(func=_workflow_versions)

    run = sub.add_parser("run", help="start an execution")
    run.add_argument("name", help="workflow name")
    run.add_argument("--input", help="JSON input, or @FILE")
    run.add_argument("--version", type=int, help="definition version (default: latest)")
    run.add_argument("--idempotency-key")
    run.add_argument("--priority", type=int, default=0)
    run.add_argument(
        "--max-concurrency",
        type=int,
        default=0,
        metavar="N",
        help="most nodes of this execution running at once (default: the workflow's)",
    )
    run.add_argument(
        "--delay", help="start later, e.g. 30s, 5m, 1h30m (the execution is PENDING until then)"
    )
    run.add_argument(
        "--at", help="start at this ISO 8601 time (local time unless it has an offset)"
    )
    run.add_argument(
        "--wait", action="store_true", help="wait until it ends; exit 1 unless it SUCCEEDED"
    )
    run.add_argument("--timeout", type=float, help="seconds to wait with --wait")
    run.add_argument("--output", choices=["text", "json"], default="text")
    run.set_defaults(func=_run)

    status = sub.add_parser("status", help="show an execution and every node's state")
    status.add_argument("execution_id")
    status.add_argument("--output", choices=["text", "json"], default="text")
    status.set_defaults(func=_status)

    for name, func, text in (
        ("cancel", _cancel, "cancel an execution, or one node with --node"),
        ("pause", _pause, "pause an execution's dispatch, or hold one node with --node"),
        ("resume", _resume, "resume a paused execution, or release a held node with --node"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("execution_id")
        cmd.add_argument("--node", help="act on this node only")
        if name == "cancel":
            cmd.add_argument("--reason", help="recorded in the event history")
        cmd.add_argument("--output", choices=["text", "json"], default="text")
        cmd.set_defaults(func=func)

    for name, func, text in (
        ("approve", _approve, "approve a waiting approval node; the execution goes on"),
        ("reject", _reject, "reject a waiting approval node; it fails with the comment"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("execution_id")
        cmd.add_argument("node_id", help="the approval node")
        cmd.add_argument(
            "--comment", metavar="TEXT", help="recorded with the decision (a rejection's reason)"
        )
        cmd.add_argument("--output", choices=["text", "json"], default="text")
        cmd.set_defaults(func=func)

    dlq = sub.add_parser("dlq", help="dead letters: node runs that exhausted their retries")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_list = dlq_sub.add_parser("list", help="list dead letters, newest first")
    dlq_list.add_argument("--workflow", help="only this workflow")
    dlq_list.add_argument("--task-type", help="only this task type")
    dlq_list.add_argument("--all", action="store_true", help="include redriven ones")
    dlq_list.add_argument("--limit", type=int, default=50)
    dlq_list.add_argument("--output", choices=["text", "json"], default="text")
    dlq_list.set_defaults(func=_dlq_list)
    dlq_show = dlq_sub.add_parser("show", help="a dead letter with every attempt's error")
    dlq_show.add_argument("id")
    dlq_show.set_defaults(func=_dlq_show)
    dlq_redrive = dlq_sub.add_parser(
        "redrive", help="run the node again with a fresh budget; the execution continues"
    )
    dlq_redrive.add_argument("id")
    dlq_redrive.add_argument("--output", choices=["text", "json"], default="text")
    dlq_redrive.set_defaults(func=_dlq_redrive)
    _cli_triggers.add_commands(sub)
    _cli_notifications.add_parser(sub)
    _cli_limits.add_parser(sub)
    _cli_identity.add_parser(sub)
    _cli_secrets.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = asyncio.run(args.func(args))
    except RpcError as exc:
        print(f"trellis: {exc.code.name}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except (DefinitionError, CliError, TrellisError) as exc:
        print(f"trellis: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except TimeoutError:
        print(
            "trellis: timed out waiting; the execution goes on (see trellis status)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if isinstance(exc, _coordinator_error_type()):
            print(f"trellis: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise
    return code


def _coordinator_error_type() -> type[Exception]:
    """The coordinator's error base, when the coordinator is installed."""
    try:
        from coordinator.errors import TrellisError as CoordinatorError
    except ImportError:  # pragma: no cover - SDK-only install
        return CliError
    return CoordinatorError


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Webhook and event triggers: registration, signature checks, and starting executions.

Secrets stay here: the gateway hands over the path, the headers and the raw body
(``fire_webhook``) and gets back an execution or an error (``Unauthenticated``,
``NotFound``, ``InvalidArgument``). Executions start through ``Starts.start_execution``.

Expressions are CEL (``coordinator.engine``), compiled when the trigger is created:
webhooks see ``body`` (the parsed JSON) and ``headers`` (lower-cased names); event
triggers see ``event`` (the payload).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from coordinator import engine, signing
from coordinator.engine import Expression, ExpressionError, compile_expression
from coordinator.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    TrellisError,
    Unauthenticated,
    Unavailable,
)
from coordinator.model import (
    DEFAULT_SIGNATURE_TOLERANCE,
    NULL_JSON,
    EventTrigger,
    Execution,
    WebhookAuth,
    WebhookTrigger,
)
from coordinator.service._coordinator import Coordinator
from coordinator.service.ports import TriggerRepository

log = logging.getLogger(__name__)

SIGNATURE_HEADER = signing.SIGNATURE_HEADER.lower()  # headers arrive lower-cased
MIN_SECRET_LENGTH = 16
MAX_KEY_LENGTH = 512
WEBHOOK_VARIABLES = ("body", "headers")
EVENT_VARIABLES = ("event",)
_PATH = re.compile(r"^[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*$")
_EVENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")
_MAX_PATH = 200
_MAX_TOLERANCE = timedelta(days=1)
# A replay record outlives its signature's window by this much (replicas' clocks differ).
_REPLAY_MARGIN = timedelta(minutes=1)


# -- signatures (pure) --------------------------------------------------------------------


def token_digest(token: str) -> str:
    """Bearer tokens are stored as their SHA-256 hex digest."""
    return hashlib.sha256(token.encode()).hexdigest()


def verify_signature(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    now: datetime,
    tolerance: timedelta = DEFAULT_SIGNATURE_TOLERANCE,
) -> int:
    """Check ``X-Trellis-Signature: t=<unix s>,v1=<hex>`` (several v1 allowed, any may
    match: rotating secrets). ``headers`` have lower-cased names. Returns ``t``; raises
    ``Unauthenticated`` saying what was wrong. The header
    is bounded (``coordinator.signing``) before anything else is done with it."""
    raw = headers.get(SIGNATURE_HEADER)
    if not raw:
        raise Unauthenticated(
            "missing X-Trellis-Signature header; sign the body as t=<unix seconds>,"
            'v1=<hex hmac_sha256(secret, "<t>." + body)> (see docs/triggers.md)'
        )
    try:
        timestamp, signatures = signing.parse_header(raw)
    except ValueError as exc:
        raise Unauthenticated(
            f"X-Trellis-Signature is malformed: the header {exc} "
            "(expected t=<unix seconds>,v1=<hex signature>)"
        ) from None
    skew = abs(now.timestamp() - timestamp)
    if skew > tolerance.total_seconds():
        raise Unauthenticated(
            f"X-Trellis-Signature timestamp is {skew:.0f}s away from the coordinator's clock "
            f"(tolerance {tolerance.total_seconds():.0f}s); sign with the current time"
        )
    matched = signing.matches(secret, body, timestamp, signatures)
    if not matched:
        raise Unauthenticated(
            "X-Trellis-Signature does not match the body; check the secret and sign the raw "
            "body exactly as sent"
        )
    return timestamp


def delivery_digest(path: str, timestamp: int, body: bytes) -> str:
    """What identifies a signed delivery in the replay record: a trigger's signature is
    determined by its ``t`` and body (its secret being the trigger's), so a replay is the
    same path, ``t`` and body — whatever other ``v1`` values come with it."""
    body_digest = hashlib.sha256(body).hexdigest()
    return hashlib.sha256(f"{path}\x00{timestamp}\x00{body_digest}".encode()).hexdigest()


def verify_bearer(digest: str, headers: Mapping[str, str]) -> None:
    """Check ``Authorization: Bearer <token>`` against the stored digest (constant time)."""
    raw = headers.get("authorization", "")
    scheme, _, token = raw.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("missing Authorization: Bearer <token> header")
    if not hmac.compare_digest(token_digest(token.strip()).encode(), digest.encode()):
        raise Unauthenticated("the bearer token is wrong")


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishResult:
    started: list[tuple[str, Execution, bool]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    filtered_out: int = 0


class Triggers:
    """Webhook and event trigger use cases."""

    def __init__(self, coordinator: Coordinator, store: TriggerRepository) -> None:
        self._c = coordinator
        self._store = store
        self._compiled: dict[tuple[str, str, bool, tuple[str, ...]], Expression] = {}

    def _expr(
        self, source: str, where: str, variables: tuple[str, ...], boolean: bool = False
    ) -> Expression:
        key = (source, where, boolean, variables)
        found = self._compiled.get(key)
        if found is None:
            found = compile_expression(source, where=where, variables=variables, boolean=boolean)
            self._compiled[key] = found
        return found

    # -- webhooks -------------------------------------------------------------------------

    async def create_webhook_trigger(
        self,
        tenant_id: str,
        path: str,
        workflow_name: str,
        workflow_version: int,
        *,
        hmac_secret: str = "",
        bearer_token: str = "",
        signature_tolerance: timedelta | None = None,
        idempotency_expr: str = "",
        input_expr: str = "",
    ) -> WebhookTrigger:
        path = path.strip("/")
        if not _PATH.match(path) or len(path) > _MAX_PATH:
            raise InvalidArgument(
                f"webhook path {path!r} must be up to {_MAX_PATH} characters: letters, digits, "
                "'.', '_', '~', '-' in segments separated by '/'"
            )
        if bool(hmac_secret) == bool(bearer_token):
            raise InvalidArgument(
                "give exactly one of hmac_secret and bearer_token: webhooks are authenticated"
            )
        secret = hmac_secret or bearer_token
        if len(secret) < MIN_SECRET_LENGTH:
            raise InvalidArgument(
                f"the webhook secret is {len(secret)} characters; use at least "
                f"{MIN_SECRET_LENGTH} random ones (e.g. openssl rand -hex 32)"
            )
        tolerance = signature_tolerance or DEFAULT_SIGNATURE_TOLERANCE
        if tolerance <= timedelta(0) or tolerance > _MAX_TOLERANCE:
            raise InvalidArgument("signature_tolerance must be positive and at most 1 day")
        _check_workflow(workflow_name, workflow_version)
        where = f"webhook trigger '{path}'"
        if idempotency_expr:
            self._expr(idempotency_expr, f"{where} idempotency_key", WEBHOOK_VARIABLES)
        if input_expr:
            self._expr(input_expr, f"{where} input", WEBHOOK_VARIABLES)
        await self._c.definitions.get_workflow(tenant_id, workflow_name, workflow_version or None)
        trigger = WebhookTrigger(
            path=path,
            workflow_name=workflow_name,
            workflow_version=workflow_version,
            auth=WebhookAuth.HMAC_SHA256 if hmac_secret else WebhookAuth.BEARER,
            secret=hmac_secret or token_digest(bearer_token),
            created_at=self._c.clock(),
            signature_tolerance=tolerance,
            idempotency_expr=idempotency_expr,
            input_expr=input_expr,
            tenant_id=tenant_id,
        )
        await self._store.create_webhook_trigger(trigger)
        log.info("webhook trigger created", extra={"path": path, "workflow": workflow_name})
        return trigger

    async def list_webhook_triggers(self, tenant_id: str) -> list[WebhookTrigger]:
        return await self._store.list_webhook_triggers(tenant_id)

    async def delete_webhook_trigger(self, tenant_id: str, path: str) -> None:
        await self._store.delete_webhook_trigger(tenant_id, path.strip("/"))

    async def fire_webhook(
        self, tenant_id: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[Execution, bool]:
        """Authenticate the request, then start the trigger's workflow. Nothing starts on
        any error."""
        path = path.strip("/")
        try:
            trigger = await self._store.get_webhook_trigger(tenant_id, path)
        except NotFound:
            raise NotFound(f"no webhook trigger at path {path!r}") from None
        lower = {k.lower(): v for k, v in headers.items()}
        now = self._c.clock()
        delivery: tuple[str, datetime] | None = None
        if trigger.auth is WebhookAuth.HMAC_SHA256:
            timestamp = verify_signature(
                trigger.secret, lower, body, now, trigger.signature_tolerance
            )
            # Remembered until the signature's timestamp leaves the window (plus a margin
            # for replicas' clocks): past that the timestamp check refuses it anyway.
            expires = datetime.fromtimestamp(timestamp, UTC) + trigger.signature_tolerance
            delivery = (delivery_digest(path, timestamp, body), expires + _REPLAY_MARGIN)
        else:
            verify_bearer(trigger.secret, lower)
        # Only now, authenticated, is the body parsed.
        parsed = _parse_json("the request body", body)
        variables = {"body": parsed, "headers": lower}
        where = f"webhook trigger '{path}'"
        key: str | None = None
        if trigger.idempotency_expr:
            expr = self._expr(
                trigger.idempotency_expr, f"{where} idempotency_key", WEBHOOK_VARIABLES
            )
            key = _key_text(_evaluate(expr, variables, max_bytes=4 * MAX_KEY_LENGTH))
        payload = body or NULL_JSON
        if trigger.input_expr:
            expr = self._expr(trigger.input_expr, f"{where} input", WEBHOOK_VARIABLES)
            payload = _evaluate_json(expr, variables)
        if delivery is not None and not await self._store.record_webhook_delivery(
            tenant_id, delivery[0], delivery[1], now
        ):
            log.warning("webhook replay refused", extra={"path": path})
            raise AlreadyExists(
                "this signed webhook delivery was received already (a replay: the same "
                "X-Trellis-Signature for the same body); sign every delivery with its own "
                "current timestamp"
            )
        try:
            execution, created = await self._c.starts.start_execution(
                tenant_id,
                trigger.workflow_name,
                trigger.workflow_version or None,
                payload,
                idempotency_key=None if key is None else f"webhook:{path}:{key}",
                rate_limited=False,
            )
        except TrellisError:
            # Refused before anything was written (an input the schema refuses, no such
            # workflow ...): the sender may retry the same signed delivery. Anything else
            # (a cancelled call, a lost connection) may have come after the start committed,
            # so the record stays and a resend is refused rather than started twice.
            if delivery is not None:
                with contextlib.suppress(Exception):
                    await self._store.forget_webhook_delivery(tenant_id, delivery[0])
            raise
        log.info(
            "webhook fired",
            extra={"path": path, "execution_id": execution.id, "new_execution": created},
        )
        return execution, created

    # -- events ---------------------------------------------------------------------------

    async def create_event_trigger(
        self,
        tenant_id: str,
        event_name: str,
        workflow_name: str,
        workflow_version: int,
        *,
        filter_expr: str = "",
        input_expr: str = "",
    ) -> EventTrigger:
        _check_event_name(event_name)
        _check_workflow(workflow_name, workflow_version)
        where = f"event trigger on '{event_name}'"
        if filter_expr:
            self._expr(filter_expr, f"{where} filter", EVENT_VARIABLES, boolean=True)
        if input_expr:
            self._expr(input_expr, f"{where} input", EVENT_VARIABLES)
        await self._c.definitions.get_workflow(tenant_id, workflow_name, workflow_version or None)
        trigger = EventTrigger(
            id=str(uuid.uuid4()),
            event_name=event_name,
            workflow_name=workflow_name,
            workflow_version=workflow_version,
            created_at=self._c.clock(),
            filter_expr=filter_expr,
            input_expr=input_expr,
            tenant_id=tenant_id,
        )
        await self._store.create_event_trigger(trigger)
        return trigger

    async def list_event_triggers(
        self, tenant_id: str, event_name: str | None = None
    ) -> list[EventTrigger]:
        return await self._store.list_event_triggers(tenant_id, event_name or None)

    async def delete_event_trigger(self, tenant_id: str, trigger_id: str) -> None:
        await self._store.delete_event_trigger(tenant_id, trigger_id)

    async def publish_event(
        self, tenant_id: str, name: str, payload: bytes, idempotency_key: str = ""
    ) -> PublishResult:
        """Start every trigger of ``name`` whose filter matches. A trigger whose expressions
        fail on this payload (or whose start is refused) is reported, the others go on."""
        _check_event_name(name)
        if len(idempotency_key) > MAX_KEY_LENGTH:
            raise InvalidArgument(f"idempotency_key is longer than {MAX_KEY_LENGTH} characters")
        payload, event = self._c.settings.decode_payload("payload", payload)
        result = PublishResult()
        filtered = 0
        for trigger in await self._store.list_event_triggers(tenant_id, name):
            variables = {"event": event}
            where = f"event trigger {trigger.id} on '{name}'"
            try:
                if trigger.filter_expr:
                    expr = self._expr(trigger.filter_expr, f"{where} filter", EVENT_VARIABLES, True)
                    if not _evaluate(expr, variables):
                        filtered += 1
                        continue
                data = payload
                if trigger.input_expr:
                    expr = self._expr(trigger.input_expr, f"{where} input", EVENT_VARIABLES)
                    data = _evaluate_json(expr, variables)
                execution, created = await self._c.starts.start_execution(
                    tenant_id,
                    trigger.workflow_name,
                    trigger.workflow_version or None,
                    data,
                    idempotency_key=(
                        f"event:{trigger.id}:{idempotency_key}" if idempotency_key else None
                    ),
                    rate_limited=False,
                )
            except Unavailable:
                raise
            except (InvalidArgument, NotFound, TrellisError) as exc:
                log.warning(
                    "event trigger skipped: %s",
                    exc,
                    extra={"trigger_id": trigger.id, "event": name},
                )
                result.failures.append((trigger.id, str(exc)))
                continue
            result.started.append((trigger.id, execution, created))
        return PublishResult(result.started, result.failures, filtered)


def _check_workflow(workflow_name: str, workflow_version: int) -> None:
    if not workflow_name:
        raise InvalidArgument("workflow_name is required")
    if workflow_version < 0:
        raise InvalidArgument("workflow_version must be 0 (latest) or a version number")


def _check_event_name(name: str) -> None:
    if not _EVENT_NAME.match(name):
        raise InvalidArgument(
            f"event name {name!r} must be 1-200 letters, digits, '.', '_', ':' or '-' "
            "(starting with a letter or digit)"
        )


def _parse_json(what: str, body: bytes) -> Any:
    if not body:
        return None
    return engine.decode_json(body, what)


def _evaluate(expr: Expression, variables: Mapping[str, Any], max_bytes: int | None = None) -> Any:
    try:
        return expr.evaluate(variables, max_bytes=max_bytes)
    except ExpressionError as exc:
        raise InvalidArgument(str(exc)) from exc


def _evaluate_json(expr: Expression, variables: Mapping[str, Any]) -> bytes:
    try:
        return expr.evaluate_json(variables)
    except ExpressionError as exc:
        raise InvalidArgument(str(exc)) from exc


def _key_text(value: Any) -> str | None:
    """An idempotency key from an expression's value: null or "" means none."""
    if value is None or value == "":
        return None
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if len(text) > MAX_KEY_LENGTH or "\x00" in text:
        raise InvalidArgument(
            f"the idempotency key expression gave a value longer than {MAX_KEY_LENGTH} "
            "characters (or with a NUL character)"
        )
    return text


__all__ = [
    "SIGNATURE_HEADER",
    "PublishResult",
    "Triggers",
    "delivery_digest",
    "token_digest",
    "verify_bearer",
    "verify_signature",
]

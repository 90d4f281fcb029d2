"""Notification building blocks without I/O: signatures, templates, backoff, channel
validation, the per-channel breaker, the notification document and the settings."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

import pytest

from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.errors import InvalidArgument
from coordinator.model import (
    MAX_INLINE_OUTPUT,
    ChannelKind,
    ErrorInfo,
    Execution,
    ExecutionStatus,
    notification_document,
)
from coordinator.notify import (
    Backoff,
    ChannelBreakers,
    check_template,
    redacted,
    render,
    sign,
    template_values,
    validate_channel,
    verify,
    webhook_body,
)
from coordinator.notify._senders import body_escape
from tests.support.imports import imported_modules

# -- signing ---------------------------------------------------------------------------------


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"status":"FAILED"}'
    header = sign("s3cret", body, 1700000000)
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"


def test_verify_accepts_the_signature_and_refuses_tampering_and_replays() -> None:
    body = b'{"a":1}'
    header = sign("k", body, 1000)
    assert verify("k", body, header, now=1000)
    assert verify("k", body, header, now=1000 + 300)
    assert not verify("k", body, header, now=1000 + 301)  # too old: a replay
    assert not verify("k", b'{"a":2}', header, now=1000)
    assert not verify("other", body, header, now=1000)
    assert not verify("k", body, "v1=abc", now=1000)
    assert not verify("k", body, "t=x,v1=abc", now=1000)
    # A rotated secret: either signature may match.
    both = f"{header},v1={sign('new', body, 1000).split('v1=')[1]}"
    assert verify("new", body, both, now=1000) and verify("k", body, both, now=1000)


def test_webhook_body_is_the_notification_with_its_delivery_id() -> None:
    body = webhook_body("d1", {"status": "FAILED", "execution_id": "e1"})
    assert json.loads(body) == {"delivery_id": "d1", "status": "FAILED", "execution_id": "e1"}


# -- templates -------------------------------------------------------------------------------


def test_templates_render_known_placeholders_and_literal_braces() -> None:
    values = {"execution_id": "e1", "status": "FAILED"}
    assert render("{status}: {execution_id} {{x}}", values) == "FAILED: e1 {x}"
    assert render("{status}", values, str.lower) == "failed"


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("{nope}", "unknown placeholder {nope}"),
        ("{status!r}", "not allowed"),
        ("{status:>10}", "not allowed"),
        ("{status.__class__}", "not allowed"),
        ("{status", "malformed"),
        ("}", "malformed"),
    ],
)
def test_bad_templates_are_refused_naming_the_field(template: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_template("sms.body_template", template)
    assert "sms.body_template" in str(info.value) and fragment in str(info.value)


def test_template_values_come_from_the_notification() -> None:
    values = template_values(
        {
            "execution_id": "e1",
            "workflow_name": "orders",
            "workflow_version": 3,
            "status": "FAILED",
            "error": {"type": "Boom", "message": "it broke", "node_id": "charge"},
            "output_size": 0,
        },
        to="+15550100",
    )
    assert values["workflow_version"] == "3" and values["error_node"] == "charge"
    assert values["error_message"] == "it broke" and values["to"] == "+15550100"
    assert template_values({"status": "SUCCEEDED", "error": None})["error_type"] == ""


def test_sms_body_values_are_escaped_by_content_type() -> None:
    values = {"error_message": 'say "hi" & bye'}
    json_escape = body_escape({"Content-Type": "application/json"})
    # Literal braces of a JSON body are doubled, as in every template.
    text = render('{{"text": "{error_message}"}}', values, json_escape)
    assert json.loads(text) == {"text": 'say "hi" & bye'}
    form = body_escape({"content-type": "application/x-www-form-urlencoded"})
    assert render("Body={error_message}", values, form) == "Body=say+%22hi%22+%26+bye"
    assert render("{error_message}", values, body_escape({})) == 'say "hi" & bye'


# -- backoff ---------------------------------------------------------------------------------


def test_backoff_is_exponential_and_capped() -> None:
    b = Backoff(timedelta(seconds=1), timedelta(seconds=10), 2.0, 0.0)
    assert [b.delay(n).total_seconds() for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert b.delay(10_000).total_seconds() == 10  # no overflow


def test_backoff_jitter_moves_the_delay_within_its_fraction() -> None:
    b = Backoff(timedelta(seconds=4), timedelta(seconds=100), 2.0, 0.25)
    assert b.delay(1, lambda: 0.0).total_seconds() == 3.0
    assert b.delay(1, lambda: 1.0).total_seconds() == 5.0
    assert b.delay(1, lambda: 0.5).total_seconds() == 4.0
    capped = Backoff(timedelta(seconds=4), timedelta(seconds=4), 2.0, 0.5)
    assert capped.delay(3, lambda: 1.0).total_seconds() == 4.0


# -- channel validation ----------------------------------------------------------------------


def test_valid_channels_are_normalized_and_secrets_redacted() -> None:
    hook = validate_channel(ChannelKind.WEBHOOK, {"url": "https://h.example/x", "secret": "s"})
    assert hook == {"url": "https://h.example/x", "secret": "s", "headers": {}}
    assert redacted(hook)["secret"] == "<set>"
    assert redacted(hook)["url"] == "https://h.example/x"
    # Credentials in a URL (user info, query values) are not shown; templates are.
    sms = {"url": "https://u:tok3n@sms.example/send?api_key=k3y&to={{ to }}&flag"}
    assert redacted(sms)["url"] == "https://<set>@sms.example/send?api_key=<set>&to={{ to }}&flag"
    mail = validate_channel(
        ChannelKind.SMTP,
        {"host": "mx", "port": 25, "from_address": "t@x.io", "to": ["a@x.io"]},
    )
    assert mail["starttls"] is False and "{status}" in mail["subject_template"]
    sms = validate_channel(
        ChannelKind.SMS,
        {"url": "https://sms.example/{to}", "body_template": "{status} {to}", "to": ["+1"]},
    )
    assert sms["method"] == "POST"


@pytest.mark.parametrize(
    ("kind", "config", "fragment"),
    [
        (ChannelKind.WEBHOOK, {"secret": "s"}, "webhook.url is required"),
        (ChannelKind.WEBHOOK, {"url": "not a url", "secret": "s"}, "webhook.url"),
        (ChannelKind.WEBHOOK, {"url": "http://", "secret": "s"}, "webhook.url"),
        (ChannelKind.WEBHOOK, {"url": "https://h/x"}, "webhook.secret is required"),
        (
            ChannelKind.WEBHOOK,
            {"url": "https://h/x", "secret": "s", "headers": {"X-Trellis-Signature": "x"}},
            "webhook.headers",
        ),
        (ChannelKind.WEBHOOK, {"url": "https://h/x", "secret": "s", "x": 1}, "unknown setting x"),
        (ChannelKind.SMTP, {"port": 25, "from_address": "a@b.c", "to": ["d@e.f"]}, "smtp.host"),
        (
            ChannelKind.SMTP,
            {"host": "h", "port": 0, "from_address": "a@b.c", "to": ["d@e.f"]},
            "smtp.port",
        ),
        (
            ChannelKind.SMTP,
            {"host": "h", "port": 25, "from_address": "nope", "to": ["d@e.f"]},
            "smtp.from_address",
        ),
        (ChannelKind.SMTP, {"host": "h", "port": 25, "from_address": "a@b.c", "to": []}, "smtp.to"),
        (
            ChannelKind.SMTP,
            {"host": "h", "port": 25, "from_address": "a@b.c", "to": ["x"]},
            "smtp.to",
        ),
        (
            ChannelKind.SMTP,
            {"host": "h", "port": 25, "from_address": "a@b.c", "to": ["d@e.f"], "username": "u"},
            "smtp.username and smtp.password",
        ),
        (
            ChannelKind.SMTP,
            {
                "host": "h",
                "port": 25,
                "from_address": "a@b.c",
                "to": ["d@e.f"],
                "subject_template": "{to}",
            },
            "smtp.subject_template: unknown placeholder {to}",
        ),
        (
            ChannelKind.SMS,
            {"url": "https://s/x", "body_template": "{bad}", "to": ["+1"]},
            "sms.body_template",
        ),
        (
            ChannelKind.SMS,
            {"url": "https://s/{bad}", "body_template": "x", "to": ["+1"]},
            "sms.url",
        ),
        (ChannelKind.SMS, {"url": "https://s/x", "body_template": "x"}, "sms.to"),
        (
            ChannelKind.SMS,
            {"url": "https://s/x", "method": "DELETE", "body_template": "x", "to": ["+1"]},
            "sms.method",
        ),
        (
            ChannelKind.SMS,
            {"url": "https://s/x", "body_template": "x", "to": ["+1"], "headers": {"A": "{nope}"}},
            "sms.headers.A",
        ),
    ],
)
def test_invalid_channels_name_the_field(
    kind: ChannelKind, config: dict[str, object], fragment: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_channel(kind, config)
    assert fragment in str(info.value)


# -- breaker ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_breaker_opens_after_k_failures_then_lets_one_probe_through() -> None:
    clock = Clock()
    breakers = ChannelBreakers(3, timedelta(seconds=30), clock=clock)
    for _ in range(2):
        assert breakers.admit("c") is None
        breakers.record("c", False)
    assert breakers.state("c") == "closed"
    assert breakers.admit("c") is None
    breakers.record("c", False)  # the third consecutive failure
    assert breakers.state("c") == "open"
    assert breakers.admit("c") == clock.now + timedelta(seconds=30)
    assert breakers.admit("other") is None  # per channel
    clock.now += timedelta(seconds=30)
    assert breakers.admit("c") is None  # the probe
    assert breakers.admit("c") is not None  # only one at a time
    breakers.record("c", False)  # the probe failed: open again for another reset
    assert breakers.state("c") == "open"
    assert breakers.admit("c") == clock.now + timedelta(seconds=30)
    clock.now += timedelta(seconds=30)
    assert breakers.admit("c") is None
    breakers.record("c", True)
    assert breakers.state("c") == "closed" and breakers.admit("c") is None


def test_a_success_resets_the_consecutive_failure_count() -> None:
    breakers = ChannelBreakers(2, timedelta(seconds=30), clock=Clock())
    breakers.record("c", False)
    breakers.record("c", True)
    breakers.record("c", False)
    assert breakers.state("c") == "closed"


# -- the notification document -----------------------------------------------------------------


def _execution(**changes: object) -> Execution:
    base = Execution(
        id="e1",
        workflow_name="orders",
        workflow_version=2,
        status=ExecutionStatus.FAILED,
        input=b"{}",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        updated_at=datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
        ended_at=datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
        error=ErrorInfo("Boom", "it broke", node_id="charge", attempt=3),
    )
    return Execution(**{**base.__dict__, **changes})  # type: ignore[arg-type]


def test_notification_document_carries_status_error_and_times() -> None:
    doc = notification_document(_execution())
    assert doc == {
        "execution_id": "e1",
        "workflow_name": "orders",
        "workflow_version": 2,
        "status": "FAILED",
        "error": {"type": "Boom", "message": "it broke", "node_id": "charge", "attempt": 3},
        "output_size": 0,
        "created_at": "2026-01-01T00:00:00Z",
        "ended_at": "2026-01-01T00:01:00Z",
    }


def test_small_outputs_are_inlined_large_ones_only_sized() -> None:
    small = notification_document(
        _execution(status=ExecutionStatus.SUCCEEDED, error=None, output=b'{"id": 1}')
    )
    assert small["output"] == {"id": 1} and small["output_size"] == 9 and small["error"] is None
    big_output = json.dumps({"x": "y" * MAX_INLINE_OUTPUT}).encode()
    big = notification_document(_execution(status=ExecutionStatus.SUCCEEDED, output=big_output))
    assert "output" not in big and big["output_size"] == len(big_output)


# -- settings --------------------------------------------------------------------------------


def test_notify_settings_are_parsed_and_checked() -> None:
    config = CoordinatorConfig.from_env(
        {
            "TRELLIS_NOTIFY_POLL_INTERVAL": "200ms",
            "TRELLIS_NOTIFY_MAX_ATTEMPTS": "3",
            "TRELLIS_NOTIFY_BACKOFF_INITIAL": "100ms",
            "TRELLIS_NOTIFY_BACKOFF_MULTIPLIER": "1.5",
            "TRELLIS_NOTIFY_BACKOFF_JITTER": "0",
            "TRELLIS_NOTIFY_BREAKER_THRESHOLD": "2",
            "TRELLIS_NOTIFY_BREAKER_RESET": "5s",
        }
    )
    assert config.notify_poll_interval == timedelta(milliseconds=200)
    assert config.notify_max_attempts == 3 and config.notify_breaker_threshold == 2
    assert config.notify_backoff_multiplier == 1.5 and config.notify_backoff_jitter == 0.0
    for env, fragment in [
        ({"TRELLIS_NOTIFY_BACKOFF_JITTER": "1.5"}, "TRELLIS_NOTIFY_BACKOFF_JITTER"),
        ({"TRELLIS_NOTIFY_BACKOFF_MULTIPLIER": "0.5"}, "TRELLIS_NOTIFY_BACKOFF_MULTIPLIER"),
        ({"TRELLIS_NOTIFY_BACKOFF_MULTIPLIER": "x"}, "TRELLIS_NOTIFY_BACKOFF_MULTIPLIER"),
        ({"TRELLIS_NOTIFY_MAX_ATTEMPTS": "0"}, "TRELLIS_NOTIFY_MAX_ATTEMPTS"),
        ({"TRELLIS_NOTIFY_BACKOFF_MAX": "1ms"}, "TRELLIS_NOTIFY_BACKOFF_MAX"),
    ]:
        with pytest.raises(ConfigError) as info:
            CoordinatorConfig.from_env(env)
        assert fragment in str(info.value)


def test_notify_imports_neither_sqlalchemy_nor_grpc() -> None:
    for path, names in imported_modules("coordinator").items():
        if path.startswith("coordinator/notify/"):
            tops = {n.split(".")[0] for n in names}
            assert not tops & {"sqlalchemy", "alembic", "grpc"}, path
            assert not {n for n in names if n.startswith("coordinator.store")}, path


# -- senders (HTTP answered in process by httpx.MockTransport) --------------------------------

NOTE = {
    "execution_id": "e1",
    "workflow_name": "orders",
    "workflow_version": 1,
    "status": "FAILED",
    "error": {"type": "Boom", "message": 'card "4242" declined', "node_id": "charge"},
    "output_size": 0,
}


async def test_sms_sends_one_templated_request_per_recipient() -> None:
    import httpx

    from coordinator.notify import Deliverer, DeliveryError

    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(500 if "%2B2" in str(request.url) else 201, text="quota exceeded")

    config = validate_channel(
        ChannelKind.SMS,
        {
            "url": "https://sms.example/send/{to}",
            "headers": {"Content-Type": "application/json", "X-Flow": "{workflow_name}"},
            "body_template": '{{"to": "{to}", "text": "{status}: {error_message}"}}',
            "to": ["+1 555", "+2 666"],
        },
    )
    deliverer = Deliverer(client=httpx.AsyncClient(transport=httpx.MockTransport(answer)))
    with pytest.raises(DeliveryError) as info:
        await deliverer.send(ChannelKind.SMS, config, "d1", NOTE)
    await deliverer.aclose()
    assert "1 of 2 recipients failed" in str(info.value) and "HTTP 500" in str(info.value)
    by_url = {str(r.url): r for r in seen}
    first = by_url["https://sms.example/send/%2B1%20555"]
    assert first.method == "POST" and first.headers["X-Flow"] == "orders"
    assert first.headers["X-Trellis-Delivery"] == "d1"
    assert json.loads(first.content) == {"to": "+1 555", "text": 'FAILED: card "4242" declined'}


async def test_webhook_posts_the_signed_body_and_refuses_non_2xx() -> None:
    import httpx

    from coordinator.notify import Deliverer, DeliveryError

    seen: list[httpx.Request] = []
    status = 204

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, text="" if status < 300 else "oops\nmore")

    config = validate_channel(
        ChannelKind.WEBHOOK,
        {"url": "https://h.example/x", "secret": "k", "headers": {"X-Team": "ops"}},
    )
    client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    deliverer = Deliverer(client=client, clock=lambda: 1000.0)
    await deliverer.send(ChannelKind.WEBHOOK, config, "d1", NOTE)
    (request,) = seen
    assert request.headers["X-Team"] == "ops"
    assert request.headers["Content-Type"] == "application/json"
    assert verify("k", request.content, request.headers["X-Trellis-Signature"], now=1000)
    assert json.loads(request.content)["delivery_id"] == "d1"
    status = 503
    with pytest.raises(DeliveryError) as info:
        await deliverer.send(ChannelKind.WEBHOOK, config, "d1", NOTE)
    # The status and its standard phrase; never the reply's body.
    assert str(info.value) == "HTTP 503 Service Unavailable"
    await deliverer.aclose()

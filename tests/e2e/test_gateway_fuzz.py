"""Schema-based fuzzing of the real gateway process against its own OpenAPI document
(``GET /openapi.json``), with schemathesis, bounded in count (``EXAMPLES`` per operation
and pass) and so in time.

Every answer must be documented (status, content type, headers, body schema: every error
is ``{"error": "..."}``), none may be a 5xx (the coordinator is kept reachable, so not
even 503), and ``/healthz`` must answer within 200 ms throughout. Two passes: one with
what schemathesis generates (mostly refused at the door: unknown paths, wrong tokens),
one with valid credentials injected so the generated bodies reach the strict parsing and
the coordinator behind it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.hostile import http_health, watched
from tests.support.http import until
from tests.support.procs import (
    ADMIN_KEY,
    ROOT,
    spawn_coordinator,
    spawn_gateway,
)
from trellis.v1 import trigger_service_pb2 as tpb
from trellis.v1 import trigger_service_pb2_grpc as tgrpc
from worker_sdk import Client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

EXAMPLES = 25
EVENTS_TOKEN = "fuzz-events-token-0123456789"
WEBHOOK_TOKEN = "fuzz-webhook-token-0123456789"


def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 5xx at all: the coordinator is up, so not even 503."""
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} answered {response.status_code}: "
        f"{response.text[:500]}"
    )
    return None


CHECKS = [
    no_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

# What the second pass injects per operation: credentials that pass the door.
VALID: dict[str, dict[str, Any]] = {
    "fireWebhook": {
        "path_parameters": {"path": "fuzz"},
        "headers": {"Authorization": f"Bearer {WEBHOOK_TOKEN}"},
    },
    "publishEvent": {
        "path_parameters": {"name": "fuzz.event"},
        "headers": {"Authorization": f"Bearer {EVENTS_TOKEN}"},
    },
    "approveNode": {"headers": {"Authorization": f"Bearer {ADMIN_KEY}"}},
    "rejectNode": {"headers": {"Authorization": f"Bearer {ADMIN_KEY}"}},
}


def fuzz_operation(base: str, operation: Any, overrides: dict[str, Any]) -> int:
    """``EXAMPLES`` generated requests to one operation, with ``overrides`` applied;
    returns how many were checked."""
    checked = 0

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def one(case: Any) -> None:
        nonlocal checked
        for name, value in overrides.get("path_parameters", {}).items():
            case.path_parameters[name] = value
        case.headers = {**(case.headers or {}), **overrides.get("headers", {})}
        response = case.call(base_url=base, timeout=15)
        case.validate_response(response, checks=CHECKS)
        checked += 1

    one()
    return checked


def fuzz(base: str) -> tuple[int, str]:
    """Every operation as generated, then those in ``VALID`` with credentials; returns
    how many requests were checked and the first failure's text ("" for none).

    Run in a process of its own: generating cases is CPU-bound, and in the test's process
    it would hold the GIL against the /healthz probe and be mistaken for a slow gateway."""
    checked = 0
    try:
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        for result in schema.get_all_operations():
            operation = result.ok()
            checked += fuzz_operation(base, operation, {})
            valid = VALID.get(operation.definition.raw.get("operationId", ""))
            if valid is not None:
                checked += fuzz_operation(base, operation, valid)
    except Exception as exc:  # a failure, reported as text: not every one pickles
        return checked, f"{type(exc).__name__}: {exc}"
    return checked, ""


async def test_the_gateway_answers_what_its_openapi_document_says(tmp_path: Path) -> None:
    coordinator, address = spawn_coordinator(f"sqlite:///{tmp_path}/trellis.db", tmp_path)
    gateway, base = spawn_gateway(
        address, tmp_path, events_token=EVENTS_TOKEN, max_body_bytes="65536"
    )
    try:
        async with Client(address) as client:
            await client.register_workflow(ROOT / "examples/diamond.yaml")
        async with grpc.aio.insecure_channel(address) as channel:
            await tgrpc.TriggerServiceStub(channel).CreateWebhookTrigger(
                tpb.CreateWebhookTriggerRequest(
                    path="fuzz",
                    workflow_name="diamond",
                    bearer_token=WEBHOOK_TOKEN,
                    input='{"n": 1}',
                ),
                metadata=(("authorization", f"Bearer {ADMIN_KEY}"),),
            )
        until(f"{base}/readyz", 200, gateway)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            async with watched(gateway, http_health(f"{base}/healthz")) as watch:
                checked, failure = await asyncio.get_running_loop().run_in_executor(
                    pool, fuzz, base
                )
        assert not failure, failure
        # 7 operations generated, 4 of them again with credentials.
        assert checked >= EXAMPLES * 5, checked
        print(f"fuzzed {checked} requests; /healthz: {watch.report()}")
    finally:
        gateway_exit = gateway.stop()
        coordinator.stop()
    assert gateway_exit == 0, gateway.output()

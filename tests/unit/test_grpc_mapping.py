"""The gRPC boundary: the status table, proto ↔ domain conversion, lease tokens, wake-ups."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import grpc
import pytest
from google.protobuf import duration_pb2, json_format

from coordinator import errors
from coordinator.config import ConfigError
from coordinator.grpc.convert import definition_from_proto, definition_to_proto
from coordinator.grpc.status import status_for
from coordinator.service import Holder, KeyRing, LeaseSigner, LeaseToken, Notifier
from trellis.v1 import common_pb2


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (ConfigError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Conflict("x"), grpc.StatusCode.ABORTED),
        (errors.ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.TrellisError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_table(exc: errors.TrellisError, code: grpc.StatusCode) -> None:
    assert status_for(exc) == code


def test_definition_round_trip_keeps_everything() -> None:
    msg = json_format.ParseDict(
        {
            "name": "orders",
            "description": "d",
            "nodes": [
                {"id": "a", "taskType": "t", "config": {"retries": 3, "ratio": 0.5, "tags": ["x"]}},
                {
                    "id": "b",
                    "taskType": "u",
                    "retryPolicy": {"maxAttempts": 4, "initialInterval": "2s"},
                    "startToCloseTimeout": "30s",
                    "heartbeatTimeout": "5s",
                    "priority": 3,
                },
            ],
            "edges": [{"source": "a", "target": "b"}],
            "defaultStartToCloseTimeout": "60s",
        },
        common_pb2.WorkflowDefinition(),
    )
    defn = definition_from_proto(msg, "default")
    a, b = defn.nodes
    assert a.kind == "task"
    assert json.loads(a.config) == {"retries": 3, "ratio": 0.5, "tags": ["x"]}
    assert b'"retries":3,' in a.config or b'"retries":3}' in a.config  # ints stay ints
    assert b.retry_policy is not None and b.retry_policy.max_attempts == 4
    assert b.retry_policy.initial_interval == timedelta(seconds=2)
    assert b.retry_policy.backoff_coefficient == 2.0  # unset → default
    assert b.start_to_close_timeout == timedelta(seconds=30)
    assert a.start_to_close_timeout is None
    assert defn.default_start_to_close_timeout == timedelta(seconds=60)
    assert defn.edges == (("a", "b"),)
    back = definition_from_proto(definition_to_proto(defn), "default")
    assert back.content_hash == defn.content_hash


def test_unset_retry_policy_means_one_attempt() -> None:
    msg = common_pb2.WorkflowDefinition(name="x")
    msg.nodes.add(id="a", task_type="t", start_to_close_timeout=duration_pb2.Duration(seconds=1))
    defn = definition_from_proto(msg, "default")
    assert defn.retry_policy_for(defn.nodes[0]).max_attempts == 1


def test_lease_token_round_trip_and_malformed_tokens() -> None:
    signer = LeaseSigner(KeyRing([("k1", "a-secret-of-enough-length")]))
    token = LeaseToken("e-1", "node.with:odd/chars", 7, "wf", 2, "w-1", "key-1")
    holder = Holder("w-1", "key-1")
    assert signer.decode(signer.encode(token), holder) == token
    for bad in ("", "not-base64!!", "bnVsbA"):
        with pytest.raises(errors.InvalidArgument, match="lease_token is malformed"):
            signer.decode(bad, holder)


def test_lease_tokens_are_signed_and_bound_to_their_holder() -> None:
    ring = KeyRing([("k1", "a-secret-of-enough-length")])
    signer = LeaseSigner(ring)
    text = signer.encode(LeaseToken("e-1", "a", 1, "wf", 1, "w-1", "key-1"))
    body, kid, mac = text.split(".")
    # A token built from public fields, or altered, does not verify.
    forged = LeaseToken("e-1", "a", 2, "wf", 1, "w-1", "key-1")
    forged_body = signer.encode(forged).split(".")[0]
    for bad in (f"{forged_body}.{kid}.{mac}", f"{body}.k9.{mac}", f"{body}.{kid}.{'0' * 64}"):
        with pytest.raises(errors.PermissionDenied, match="not signed by this coordinator"):
            signer.decode(bad, Holder("w-1", "key-1"))
    # Another worker id or another credential may not use it.
    for other in (Holder("w-2", "key-1"), Holder("w-1", "key-2")):
        with pytest.raises(errors.PermissionDenied, match="leased by another worker"):
            signer.decode(text, other)
    # Rotation: a new current key still accepts tokens signed under the old one.
    rotated = LeaseSigner(
        KeyRing([("k2", "the-next-secret-of-length"), ("k1", "a-secret-of-enough-length")])
    )
    assert rotated.decode(text, Holder("w-1", "key-1")).lease_seq == 1
    assert rotated.encode(forged).split(".")[1] == "k2"


async def test_notifier_wakes_only_matching_listeners() -> None:
    notifier = Notifier()
    with notifier.listen(["task:a"]) as a, notifier.listen(["task:b"]) as b:
        assert notifier.waiting == 2
        notifier.notify(["task:a"])
        await asyncio.wait_for(a.wait(), 1)
        assert not b.is_set()
        notifier.close()
        assert b.is_set()
    assert notifier.waiting == 0
    with notifier.listen(["task:c"]) as late:
        assert late.is_set(), "after close every new listener returns at once"

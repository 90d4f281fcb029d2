"""Secret references through the gRPC API on SQLite and PostgreSQL: a missing secret
fails the attempt naming it; set, then redriven, the task carries the value; a malformed
reference is refused at registration."""

from __future__ import annotations

import json

import grpc
from google.protobuf import struct_pb2

from tests.support.grpc_api import Api, definition, expect_status, poll, register, start
from trellis.v1 import common_pb2
from trellis.v1 import secret_service_pb2 as spb
from trellis.v1 import secret_service_pb2_grpc as sgrpc
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import workflow_service_pb2 as fpb

VALUE = "api-key-from-the-store-0123"


def with_config(name: str, config: dict[str, object]) -> common_pb2.WorkflowDefinition:
    defn = definition(name, ["call"], [])
    struct = struct_pb2.Struct()
    struct.update(config)
    defn.nodes[0].config.CopyFrom(struct)
    return defn


async def test_a_missing_secret_fails_the_attempt_and_a_redrive_after_setting_it_runs(
    api: Api,
) -> None:
    secrets = sgrpc.SecretServiceStub(api.channel)
    await api.workers.RegisterWorker(wpb.RegisterWorkerRequest(worker_id="w1", task_types=["t"]))
    await register(api, with_config("call", {"auth": "Bearer ${secret:api_key}"}))
    execution_id = await start(api, "call", {})

    assert await poll(api) == []  # not handed out: the secret is missing
    got = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
    (node,) = got.execution.nodes
    assert node.error.type == "SecretNotFound"
    assert "'api_key'" in node.error.message and "trellis secrets set" in node.error.message
    letters = (await api.workflows.ListDeadLetters(fpb.ListDeadLettersRequest())).dead_letters
    assert [d.execution_id for d in letters] == [execution_id]

    await secrets.SetSecret(spb.SetSecretRequest(name="api_key", value=VALUE))
    await api.workflows.RedriveDeadLetter(fpb.RedriveDeadLetterRequest(id=letters[0].id))
    (task,) = await poll(api, wait=5)
    assert json.loads(task.config) == {"auth": f"Bearer {VALUE}"}
    await api.workers.CompleteTask(
        wpb.CompleteTaskRequest(
            lease_token=task.lease_token, worker_id="w1", output=json.dumps([VALUE]).encode()
        )
    )
    done = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
    assert json.loads(done.execution.output) == ["${secret:api_key}"]
    assert VALUE not in str(done)


async def test_a_malformed_reference_is_refused_at_registration(api: Api) -> None:
    bad = with_config("bad", {"auth": "Bearer ${secret:two words}"})
    await expect_status(
        api.workflows.RegisterWorkflow(fpb.RegisterWorkflowRequest(definition=bad)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "node 'call' config has a malformed secret reference",
    )

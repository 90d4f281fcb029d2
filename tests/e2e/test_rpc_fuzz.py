"""Property-based requests against every RPC of every service on a real coordinator
process (SQLite, the admin key: calls get past authentication): requests generated from
their descriptors (tests/support/proto_fuzz.py: unicode and huge strings, big repeated
fields, random and oversized payloads, out-of-range numbers) and raw bytes sent with a
generic unary call. Throughout: no INTERNAL or UNKNOWN status, the process never exits,
health answers within 200 ms and memory grows by < 50 MB (tests/support/hostile.py).

Bounded for CI: ``EXAMPLES`` generated requests and ``RAW`` raw ones per RPC, derandomized
(the same requests every run), each call with a deadline (``CALL_TIMEOUT``; PollTasks
``POLL_TIMEOUT``, a long poll answers before it): at most about 75 RPCs x 30 calls; about a
minute on a loaded 2-core machine, and the test fails past ``pytest.mark.timeout``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.grpc.limits import services
from tests.support.hostile import grpc_health, watched
from tests.support.procs import ADMIN_KEY, spawn_coordinator
from tests.support.proto_fuzz import messages

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLES = 20
RAW = 8
CALL_TIMEOUT = 5.0
POLL_TIMEOUT = 0.8
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _methods() -> list[tuple[str, MethodDescriptor]]:
    return [(f"/{s.full_name}/{m.name}", m) for s in services() for m in s.methods]


SLOWEST: list[tuple[float, str, int]] = []


def _call(channel: grpc.Channel, path: str, method: MethodDescriptor, data: bytes) -> None:
    started = time.monotonic()
    try:
        _send(channel, path, method, data)
    finally:
        SLOWEST.append((time.monotonic() - started, path, len(data)))
        SLOWEST.sort(reverse=True)
        del SLOWEST[12:]


def _send(channel: grpc.Channel, path: str, method: MethodDescriptor, data: bytes) -> None:
    """Send ``data`` as ``path``'s request; fail on INTERNAL or UNKNOWN."""
    metadata = (("authorization", f"Bearer {ADMIN_KEY}"),)
    timeout = POLL_TIMEOUT if method.name == "PollTasks" else CALL_TIMEOUT
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path)(data, timeout=timeout, metadata=metadata)
            for count, _ in enumerate(stream):  # a few messages, then hang up
                if count >= 2:
                    stream.cancel()
                    break
        else:
            channel.unary_unary(path)(data, timeout=timeout, metadata=metadata)
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.CANCELLED:
            return  # our own hang-up
        assert code not in BAD, f"{path}: {code} {exc.details()}"  # type: ignore[attr-defined]


def _fuzz_method(channel: grpc.Channel, path: str, method: MethodDescriptor) -> None:
    @FUZZ
    @given(messages(method.input_type))
    def generated(request: Message) -> None:
        _call(channel, path, method, request.SerializeToString())

    @settings(FUZZ, max_examples=RAW)
    @given(st.binary(min_size=1, max_size=256))
    def raw(data: bytes) -> None:
        _call(channel, path, method, data)

    generated()
    raw()


def fuzz(address: str) -> tuple[dict[str, float], list[tuple[float, str, int]]]:
    """Every RPC: generated requests, then raw bytes. Returns seconds per service and the
    slowest calls (seconds, RPC, request bytes)."""
    spent: dict[str, float] = {}
    with grpc.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    ) as channel:
        for path, method in _methods():
            started = time.monotonic()
            _fuzz_method(channel, path, method)
            service = path.split("/")[1]
            spent[service] = round(spent.get(service, 0.0) + time.monotonic() - started, 1)
    return spent, SLOWEST


@pytest.mark.timeout(400)
async def test_no_request_to_any_rpc_gets_internal(tmp_path: Path) -> None:
    proc, address = spawn_coordinator(f"sqlite:///{tmp_path / 'trellis.db'}", tmp_path)
    try:
        # In a process of its own: generating requests holds this process's GIL, which would
        # slow the health probe down here, not the coordinator.
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            async with watched(proc, grpc_health(address)) as watch:
                spent, slowest = await asyncio.get_running_loop().run_in_executor(
                    pool, fuzz, address
                )
                print(f"fuzzed {len(_methods())} RPCs, seconds per service: {spent}")
                print(f"slowest calls: {slowest}")
        print(f"health: {watch.report()}")
        assert "Traceback" not in proc.output(), proc.output()[-5000:]
    finally:
        code = proc.stop()
    assert code == 0, proc.output()[-3000:]

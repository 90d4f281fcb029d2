"""Durations and timestamps out of range are INVALID_ARGUMENT, not an overflow (INTERNAL):
found by tests/e2e/test_rpc_fuzz.py (CreateApiKey.expires_in of 2**62 seconds)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from coordinator.errors import InvalidArgument
from coordinator.grpc import convert
from trellis.v1 import identity_service_pb2 as ipb
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import workflow_service_pb2 as fpb


@pytest.mark.parametrize("seconds", [2**62, -(2**62), 3650 * 86_400 + 1])
def test_a_duration_past_ten_years_is_refused(seconds: int) -> None:
    request = ipb.CreateApiKeyRequest(expires_in=duration_pb2.Duration(seconds=seconds))
    with pytest.raises(InvalidArgument, match=r"expires_in is .* at most 3650 days"):
        convert.duration_or_none(request, "expires_in")


def test_durations_in_range_and_unset_convert() -> None:
    request = wpb.PollTasksRequest(wait=duration_pb2.Duration(seconds=0))
    assert convert.duration_or_none(request, "wait") == timedelta(0)
    assert convert.duration_or_none(wpb.PollTasksRequest(), "wait") is None


@pytest.mark.parametrize(
    ("seconds", "nanos"), [(2**62, 0), (-(2**62), 0), (253_402_300_800, 0), (0, -1)]
)
def test_a_timestamp_outside_years_1_to_9999_is_refused(seconds: int, nanos: int) -> None:
    request = fpb.StartExecutionRequest(
        start_time=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    )
    with pytest.raises(InvalidArgument, match=r"start_time .* not a time between the years"):
        convert.timestamp_or_none(request, "start_time")


def test_timestamps_in_range_convert_to_aware_utc() -> None:
    request = fpb.StartExecutionRequest(start_time=timestamp_pb2.Timestamp(seconds=86_400))
    assert convert.timestamp_or_none(request, "start_time") == datetime(1970, 1, 2, tzinfo=UTC)


def test_timestamps_to_proto_match_from_datetime() -> None:
    for value in (
        datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=UTC),
        datetime(1900, 1, 1, tzinfo=UTC),
        datetime(2026, 3, 4, 5, 6, 7),  # naive: UTC
    ):
        expected = timestamp_pb2.Timestamp()
        expected.FromDatetime(value)
        assert convert.timestamp_to_proto(value) == expected

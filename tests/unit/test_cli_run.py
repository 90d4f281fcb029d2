"""`trellis run --delay/--at` and `trellis workflow versions`: parsing, before any call."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from trellis.cli import CliError, _parse_start_at, build_parser, main


def test_run_parses_delay_and_at() -> None:
    args = build_parser().parse_args(["run", "order", "--delay", "30s"])
    assert (args.delay, args.at) == ("30s", None)
    args = build_parser().parse_args(["run", "order", "--at", "2030-01-31T09:00:00Z"])
    assert args.at == "2030-01-31T09:00:00Z"
    args = build_parser().parse_args(["workflow", "versions", "order", "--output", "json"])
    assert (args.name, args.output) == ("order", "json")


def test_start_times() -> None:
    assert _parse_start_at(None) is None
    assert _parse_start_at("2030-01-31T09:00:00Z") == datetime(2030, 1, 31, 9, tzinfo=UTC)
    plus_one = _parse_start_at("2030-01-31T09:00:00+01:00")
    assert plus_one == datetime(2030, 1, 31, 9, tzinfo=timezone(timedelta(hours=1)))
    local = _parse_start_at("2030-01-31T09:00:00")
    assert local is not None and local.utcoffset() is not None  # local time, made aware
    with pytest.raises(CliError, match="not an ISO 8601 time"):
        _parse_start_at("tomorrow")


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["run", "order", "--delay", "1s", "--at", "2030-01-01T00:00:00Z"], "not both"),
        (["run", "order", "--at", "soon"], "not an ISO 8601 time"),
        (["run", "order", "--delay", "soon"], "invalid delay 'soon'"),
    ],
)
def test_bad_start_options_fail_with_one_line(
    argv: list[str], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # 127.0.0.1:1 is never contacted: the options are refused before the call.
    assert main(["--address", "127.0.0.1:1", *argv]) == 1
    err = capsys.readouterr().err
    assert problem in err
    assert err.count("\n") == 1

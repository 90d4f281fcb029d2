"""TRELLIS_MAX_WORKFLOW_DEPTH and TRELLIS_IDEMPOTENCY_WINDOW."""

from __future__ import annotations

from datetime import timedelta

import pytest

from coordinator.config import ConfigError, CoordinatorConfig


def test_defaults_and_values() -> None:
    config = CoordinatorConfig.from_env({})
    assert (config.max_workflow_depth, config.idempotency_window) == (10, timedelta(hours=24))
    config = CoordinatorConfig.from_env(
        {"TRELLIS_MAX_WORKFLOW_DEPTH": "3", "TRELLIS_IDEMPOTENCY_WINDOW": "90m"}
    )
    assert (config.max_workflow_depth, config.idempotency_window) == (3, timedelta(minutes=90))


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("TRELLIS_MAX_WORKFLOW_DEPTH", "0", "TRELLIS_MAX_WORKFLOW_DEPTH=0"),
        ("TRELLIS_MAX_WORKFLOW_DEPTH", "101", "between 1 and 100"),
        ("TRELLIS_MAX_WORKFLOW_DEPTH", "deep", "not an integer"),
        ("TRELLIS_IDEMPOTENCY_WINDOW", "0s", "must be positive"),
        ("TRELLIS_IDEMPOTENCY_WINDOW", "a day", "not a duration"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        CoordinatorConfig.from_env({name: value})

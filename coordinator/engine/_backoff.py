"""Retry decisions and backoff delays (pure)."""

from __future__ import annotations

from datetime import timedelta

from coordinator.model import RetryPolicy


def backoff_delay(policy: RetryPolicy, attempt: int) -> timedelta:
    """Delay before the attempt after ``attempt`` (1-based) failed.

    ``initial_interval * backoff_coefficient ** (attempt - 1)``, capped at ``max_interval``;
    never overflows, however large ``attempt`` is.
    """
    exponent = max(attempt - 1, 0)
    try:
        factor = policy.backoff_coefficient**exponent
    except OverflowError:
        return policy.max_interval
    seconds = policy.initial_interval.total_seconds() * factor
    if not seconds < policy.max_interval.total_seconds():  # also catches NaN
        return policy.max_interval
    return policy.initial_interval * factor


def should_retry(policy: RetryPolicy, error_type: str, retryable: bool, attempt: int) -> bool:
    """True when a failed ``attempt`` gets another one under ``policy``."""
    return (
        retryable
        and error_type not in policy.non_retryable_error_types
        and attempt < policy.max_attempts
    )

"""Retry decisions and backoff delays (pure)."""

from __future__ import annotations

import hashlib
from datetime import timedelta

from coordinator.model import RetryPolicy


def backoff_delay(policy: RetryPolicy, attempt: int) -> timedelta:
    """Delay before the attempt after ``attempt`` (1-based) failed, without jitter.

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


def jitter_fraction(execution_id: str, node_id: str, attempt: int) -> float:
    """A reproducible number in [-1, 1] for one attempt: sha256 of ``execution:node:attempt``."""
    digest = hashlib.sha256(f"{execution_id}:{node_id}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / (2**64 - 1) * 2.0 - 1.0


def retry_delay(
    policy: RetryPolicy, execution_id: str, node_id: str, attempt: int, retry_base: int = 0
) -> timedelta:
    """Delay before retrying after ``attempt`` failed, with the policy's jitter.

    The backoff counts the attempts since the last redrive (``attempt - retry_base``); the
    jitter moves it by up to ``jitter`` of itself either way, decided by
    :func:`jitter_fraction` so the engine stays pure; the result is never negative and
    never above ``max_interval``.
    """
    delay = backoff_delay(policy, attempt - retry_base)
    if policy.jitter <= 0:
        return delay
    factor = 1.0 + policy.jitter * jitter_fraction(execution_id, node_id, attempt)
    seconds = min(max(delay.total_seconds() * factor, 0.0), policy.max_interval.total_seconds())
    return timedelta(seconds=seconds)


def should_retry(policy: RetryPolicy, error_type: str, retryable: bool, attempts: int) -> bool:
    """True when another attempt follows under ``policy`` after ``attempts`` failed ones.

    ``attempts`` counts the attempts of the current budget: since the last redrive.
    """
    return (
        retryable
        and error_type not in policy.non_retryable_error_types
        and attempts < policy.max_attempts
    )

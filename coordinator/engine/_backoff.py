"""Retry decisions and backoff delays (pure)."""

from __future__ import annotations

import hashlib
from datetime import timedelta

from coordinator.model import RetryPolicy


def exponential_delay(
    initial: timedelta,
    coefficient: float,
    maximum: timedelta,
    attempt: int,
    jitter: float = 0.0,
    fraction: float = 0.0,
) -> timedelta:
    """Delay before the attempt after ``attempt`` (1-based) failed.

    ``initial * coefficient ** (attempt - 1)``, capped at ``maximum``; never overflows,
    however large ``attempt`` is. A positive ``jitter`` moves it by ``jitter * fraction``
    of itself (``fraction`` in [-1, 1], chosen by the caller, so this stays pure); the
    result is never negative and never above ``maximum``. Node retries and notification
    deliveries both use it.
    """
    exponent = max(attempt - 1, 0)
    try:
        factor = coefficient**exponent
    except OverflowError:
        delay = maximum
    else:
        seconds = initial.total_seconds() * factor
        # ``not <`` also catches NaN.
        delay = maximum if not seconds < maximum.total_seconds() else initial * factor
    if jitter <= 0:
        return delay
    moved = delay.total_seconds() * (1.0 + jitter * fraction)
    return timedelta(seconds=min(max(moved, 0.0), maximum.total_seconds()))


def backoff_delay(policy: RetryPolicy, attempt: int) -> timedelta:
    """Delay before the attempt after ``attempt`` (1-based) failed, without jitter."""
    return exponential_delay(
        policy.initial_interval, policy.backoff_coefficient, policy.max_interval, attempt
    )


def jitter_fraction(execution_id: str, node_id: str, attempt: int) -> float:
    """A reproducible number in [-1, 1] for one attempt: sha256 of ``execution:node:attempt``."""
    digest = hashlib.sha256(f"{execution_id}:{node_id}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / (2**64 - 1) * 2.0 - 1.0


def retry_delay(
    policy: RetryPolicy, execution_id: str, node_id: str, attempt: int, retry_base: int = 0
) -> timedelta:
    """Delay before retrying after ``attempt`` failed, with the policy's jitter.

    The backoff counts the attempts since the last redrive (``attempt - retry_base``); the
    jitter is decided by :func:`jitter_fraction` so the engine stays pure.
    """
    fraction = jitter_fraction(execution_id, node_id, attempt) if policy.jitter > 0 else 0.0
    return exponential_delay(
        policy.initial_interval,
        policy.backoff_coefficient,
        policy.max_interval,
        attempt - retry_base,
        policy.jitter,
        fraction,
    )


def should_retry(policy: RetryPolicy, error_type: str, retryable: bool, attempts: int) -> bool:
    """True when another attempt follows under ``policy`` after ``attempts`` failed ones.

    ``attempts`` counts the attempts of the current budget: since the last redrive.
    """
    return (
        retryable
        and error_type not in policy.non_retryable_error_types
        and attempts < policy.max_attempts
    )

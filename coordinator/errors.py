"""The coordinator's error tree; each class maps to one gRPC status (see grpc/status.py).

::

    TrellisError
    ├─ NotFound            → NOT_FOUND
    ├─ InvalidArgument     → INVALID_ARGUMENT   (bad definition, payload too large)
    ├─ FailedPrecondition  → FAILED_PRECONDITION (stale lease, illegal transition)
    ├─ Conflict            → ABORTED            (concurrent update lost; retry)
    │  └─ AlreadyExists    → ALREADY_EXISTS     (a trigger or schedule with that name)
    ├─ ResourceExhausted   → RESOURCE_EXHAUSTED (backpressure, rate limit)
    ├─ Unavailable         → UNAVAILABLE        (store down, shutting down)
    ├─ Unauthenticated     → UNAUTHENTICATED    (missing or bad credentials, signature)
    └─ PermissionDenied    → PERMISSION_DENIED  (the caller may not do this)

Messages say what was wrong and what to do; they reach users verbatim.
ResourceExhausted and Unavailable may carry ``retry_after`` (seconds), sent to clients as
the ``retry-after-ms`` trailer.
"""

from __future__ import annotations


class TrellisError(Exception):
    """Base of every error the coordinator raises on purpose."""


class NotFound(TrellisError):
    """The named workflow, version, execution or lease does not exist."""


class InvalidArgument(TrellisError):
    """The request is malformed: fix the request, retrying it unchanged will fail again."""


class FailedPrecondition(TrellisError):
    """The request is well formed but the state does not allow it (e.g. a stale lease token)."""


class Conflict(TrellisError):
    """A concurrent update won; the operation may be retried."""


class _RetryLater(TrellisError):
    """An error that may carry a hint: ``retry_after`` seconds before retrying is worthwhile.

    grpc/status.py sends the hint to clients as the ``retry-after-ms`` trailer.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ResourceExhausted(_RetryLater):
    """Over a limit; retry later (after ``retry_after`` seconds when given)."""


class Unavailable(_RetryLater):
    """A dependency (the database) is unreachable, or the coordinator is shutting down."""


class AlreadyExists(Conflict):
    """Something with that name (a webhook path, a schedule id) exists already."""


class Unauthenticated(TrellisError):
    """The caller's credentials (a webhook signature or token) are missing or wrong."""


class PermissionDenied(TrellisError):
    """The caller is authenticated but may not do this; the message names the permission
    (or the role) it lacks."""

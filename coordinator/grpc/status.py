"""The one table from domain errors to gRPC status codes, and the decorators applying it."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any, NoReturn, TypeVar

import grpc

from coordinator.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TrellisError,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

STATUS_TABLE: tuple[tuple[type[TrellisError], grpc.StatusCode], ...] = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),  # before its base class Conflict
    (Conflict, grpc.StatusCode.ABORTED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
)


# Trailer carrying an error's retry hint, in whole milliseconds (rounded up).
RETRY_AFTER_KEY = "retry-after-ms"


def status_for(exc: TrellisError) -> grpc.StatusCode:
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def retry_hint(exc: TrellisError) -> float | None:
    """Seconds after which the refused call may be sent again, when ``exc`` says."""
    return exc.retry_after if isinstance(exc, ResourceExhausted | Unavailable) else None


def trailers_for(exc: TrellisError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata sent with ``exc``'s status: its retry hint, when it has one."""
    retry_after = retry_hint(exc)
    if retry_after is None:
        return ()
    return ((RETRY_AFTER_KEY, str(max(math.ceil(retry_after * 1000), 1))),)


S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Ctx = grpc.aio.ServicerContext[Any, Any]


# What must happen before a call's error status leaves (``abort`` sends it at once): the
# auth interceptor's audit record of the failed call. Set per call; awaited with the code.
BEFORE_ERROR: ContextVar[Callable[[grpc.StatusCode], Awaitable[None]] | None] = ContextVar(
    "trellis_before_error", default=None
)


async def _abort(context: Ctx, exc: Exception, method: str) -> NoReturn:
    code = status_for(exc) if isinstance(exc, TrellisError) else grpc.StatusCode.INTERNAL
    hook = BEFORE_ERROR.get()
    if hook is not None:
        await hook(code)
    if isinstance(exc, TrellisError):
        await context.abort(code, str(exc), trailers_for(exc))
    log.exception("unexpected error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the coordinator's log")


def unary(
    fn: Callable[[S, Req, Ctx], Awaitable[Resp]],
) -> Callable[[S, Req, Ctx], Awaitable[Resp]]:
    """Map TrellisError raised by a unary handler to its status code."""

    @functools.wraps(fn)
    async def wrapper(self: S, request: Req, context: Ctx) -> Resp:
        try:
            return await fn(self, request, context)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, exc, fn.__name__)

    return wrapper


def stream(
    fn: Callable[[S, Req, Ctx], AsyncIterator[Resp]],
) -> Callable[[S, Req, Ctx], AsyncIterator[Resp]]:
    """Map TrellisError raised by a server-streaming handler to its status code."""

    @functools.wraps(fn)
    async def wrapper(self: S, request: Req, context: Ctx) -> AsyncIterator[Resp]:
        try:
            async for item in fn(self, request, context):
                yield item
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, exc, fn.__name__)

    return wrapper


__all__ = [
    "BEFORE_ERROR",
    "RETRY_AFTER_KEY",
    "STATUS_TABLE",
    "retry_hint",
    "status_for",
    "stream",
    "trailers_for",
    "unary",
]

"""The SDK's error tree.

::

    TrellisError
    ├─ RpcError                    a call to the coordinator failed (.code, .message)
    │  ├─ NotFoundError            NOT_FOUND
    │  ├─ InvalidArgumentError     INVALID_ARGUMENT (bad definition, payload too large)
    │  ├─ FailedPreconditionError  FAILED_PRECONDITION (stale lease, illegal transition)
    │  ├─ ResourceExhaustedError   RESOURCE_EXHAUSTED (backpressure, rate limit)
    │  └─ UnavailableError         UNAVAILABLE (coordinator down or restarting)
    ├─ DefinitionError             a workflow definition file or builder is malformed
    │                              (also a ValueError)
    └─ NonRetryableError           raised by a handler: fail the node without retrying

Other status codes arrive as a plain ``RpcError``; every ``RpcError`` carries
the ``grpc.StatusCode`` in ``.code`` and the server's message in ``.message``,
and ``.retry_after``: the seconds the coordinator asked to wait before retrying
(backpressure), or None.
"""

from __future__ import annotations

import grpc

from worker_sdk._channel import retry_after


class TrellisError(Exception):
    """Base of every error the SDK raises on purpose (see the module docstring for the tree)."""


class RpcError(TrellisError):
    """A call to the coordinator failed with a gRPC status.

    ``code`` is the ``grpc.StatusCode``; ``message`` is the server's explanation,
    verbatim. Test ``err.code`` or catch one of the subclasses.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        method: str = "",
        retry_after: float | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.method = method
        self.retry_after = retry_after
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{code.name}: {message}")


class NotFoundError(RpcError):
    """The named workflow, version or execution does not exist."""


class InvalidArgumentError(RpcError):
    """The request was rejected as malformed; retrying it unchanged fails again."""


class FailedPreconditionError(RpcError):
    """The request is well formed but the current state does not allow it."""


class ResourceExhaustedError(RpcError):
    """The coordinator is over a limit; retry later."""


class UnavailableError(RpcError):
    """The coordinator could not be reached or is shutting down; retry later."""


class DefinitionError(TrellisError, ValueError):
    """A workflow definition (file or builder) is malformed.

    The message names the file (when there is one) and the problem, on one line.
    Semantic checks (cycles, unknown task types ...) happen on the coordinator at
    registration and surface as ``InvalidArgumentError``.
    """


class NonRetryableError(TrellisError):
    """Raise from a handler to fail the node at once, without further attempts.

    The error type reported to the coordinator is the exception's class name, so
    subclass it to give failures a distinct type::

        class CardDeclined(NonRetryableError): ...
    """


_BY_CODE: dict[grpc.StatusCode, type[RpcError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


def rpc_error(exc: grpc.aio.AioRpcError, method: str = "") -> RpcError:
    """Converts a gRPC failure into the matching ``RpcError`` (raise it ``from exc``)."""
    code = exc.code()
    cls = _BY_CODE.get(code, RpcError)
    return cls(code, exc.details() or "", method=method, retry_after=retry_after(exc))

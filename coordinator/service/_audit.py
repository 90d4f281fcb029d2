"""The audit entry of the call being served, carried in a context variable.

The gRPC layer sets ``PENDING_AUDIT`` for each mutating call; the store's write
transactions append it in the transaction that carries the call's effect (see
``AuditRepository``). A context variable, not a parameter: every use case and repository
would otherwise take it, and a task started by the call (``asyncio`` copies the context)
must not append it twice, which ``AuditEntry.written`` prevents.
"""

from __future__ import annotations

from contextvars import ContextVar

from coordinator.model import AuditEntry

PENDING_AUDIT: ContextVar[AuditEntry | None] = ContextVar("trellis_pending_audit", default=None)


def take_pending_audit() -> AuditEntry | None:
    """The call's unwritten entry, marked written (the caller appends it now), or None."""
    entry = PENDING_AUDIT.get()
    if entry is None or entry.written:
        return None
    entry.written = True
    return entry

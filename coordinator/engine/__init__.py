"""The pure engine: validates definitions and decides what each transition does.

No I/O and no clock (``now`` is an argument): the service loads state, calls the engine
and persists the returned ``Transition`` in one transaction (DESIGN §3).
"""

from coordinator.engine._backoff import backoff_delay, should_retry
from coordinator.engine._transitions import complete_node, fail_node, start_execution
from coordinator.engine._validate import ALLOWED_KINDS, Limits, validate_definition

__all__ = [
    "ALLOWED_KINDS",
    "Limits",
    "backoff_delay",
    "complete_node",
    "fail_node",
    "should_retry",
    "start_execution",
    "validate_definition",
]

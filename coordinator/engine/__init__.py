"""The pure engine: validates definitions and decides what each transition does.

No I/O and no clock (``now`` is an argument): the service loads state, calls the engine
and persists the returned ``Transition`` in one transaction (DESIGN §3).
"""

from coordinator.engine._backoff import backoff_delay, jitter_fraction, retry_delay, should_retry
from coordinator.engine._cel import (
    NODE_VARIABLES,
    Expression,
    ExpressionError,
    compile_expression,
)
from coordinator.engine._control import (
    cancel_execution,
    cancel_node,
    pause_execution,
    pause_node,
    redrive,
    resume_execution,
    resume_node,
    time_out_execution,
    time_out_unstarted,
)
from coordinator.engine._transitions import complete_node, fail_node, start_execution
from coordinator.engine._validate import ALLOWED_KINDS, Limits, validate_definition

__all__ = [
    "ALLOWED_KINDS",
    "NODE_VARIABLES",
    "Expression",
    "ExpressionError",
    "Limits",
    "backoff_delay",
    "cancel_execution",
    "cancel_node",
    "compile_expression",
    "complete_node",
    "fail_node",
    "jitter_fraction",
    "pause_execution",
    "pause_node",
    "redrive",
    "resume_execution",
    "resume_node",
    "retry_delay",
    "should_retry",
    "start_execution",
    "time_out_execution",
    "time_out_unstarted",
    "validate_definition",
]

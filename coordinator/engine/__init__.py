"""The pure engine: validates definitions and decides what each transition does.

No I/O and no clock (``now`` is an argument): the service loads state, calls the engine
and persists the returned ``Transition`` in one transaction (DESIGN §3). The service
passes ``effective_definition(defn, execution)`` (the definition with the execution's
dynamic expansion merged in) to every transition.
"""

from coordinator.engine._approvals import (
    APPROVAL_REJECTED,
    APPROVAL_TIMEOUT,
    approval_role,
    approve_node,
    reject_node,
    time_out_approval,
)
from coordinator.engine._backoff import (
    backoff_delay,
    exponential_delay,
    jitter_fraction,
    retry_delay,
    should_retry,
)
from coordinator.engine._cel import (
    LIMIT_VARIABLES,
    NODE_VARIABLES,
    OUTPUT_VARIABLES,
    Expression,
    ExpressionError,
    compile_expression,
    result_limit,
    set_result_limit,
)
from coordinator.engine._children import child_ended, fail_waiting_node
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
from coordinator.engine._expand import Expansion, effective_definition
from coordinator.engine._json import MAX_JSON_DEPTH, MAX_NUMBER_DIGITS, decode_json
from coordinator.engine._transitions import complete_node, fail_node, start_execution
from coordinator.engine._validate import (
    ALLOWED_KINDS,
    Limits,
    check_task_type,
    validate_definition,
)

# Plainly sorted (a test pins it), not in ruff's constants-first order.
__all__ = [  # noqa: RUF022
    "ALLOWED_KINDS",
    "APPROVAL_REJECTED",
    "APPROVAL_TIMEOUT",
    "Expansion",
    "Expression",
    "ExpressionError",
    "LIMIT_VARIABLES",
    "Limits",
    "MAX_JSON_DEPTH",
    "MAX_NUMBER_DIGITS",
    "NODE_VARIABLES",
    "OUTPUT_VARIABLES",
    "approval_role",
    "approve_node",
    "backoff_delay",
    "cancel_execution",
    "cancel_node",
    "check_task_type",
    "child_ended",
    "compile_expression",
    "complete_node",
    "decode_json",
    "effective_definition",
    "exponential_delay",
    "fail_node",
    "fail_waiting_node",
    "jitter_fraction",
    "pause_execution",
    "pause_node",
    "redrive",
    "reject_node",
    "result_limit",
    "resume_execution",
    "resume_node",
    "retry_delay",
    "set_result_limit",
    "should_retry",
    "start_execution",
    "time_out_approval",
    "time_out_execution",
    "time_out_unstarted",
    "validate_definition",
]

"""validate_definition: every rule has a case that breaks it and checks the message."""

from __future__ import annotations

import itertools
import re
from datetime import timedelta

import pytest

from coordinator import engine
from coordinator.engine import Limits, validate_definition
from coordinator.errors import InvalidArgument
from coordinator.model import NodeSpec, RetryPolicy, WorkflowDef


def node(id: str, **kw: object) -> NodeSpec:
    kw.setdefault("task_type", "work")
    return NodeSpec(id=id, **kw)  # type: ignore[arg-type]


def wf(
    nodes: tuple[NodeSpec, ...] = (),
    edges: tuple[tuple[str, str], ...] = (),
    name: str = "wf",
    **kw: object,
) -> WorkflowDef:
    return WorkflowDef(name=name, nodes=nodes or (node("a"),), edges=edges, **kw)  # type: ignore[arg-type]


DEFAULT_LIMITS = Limits()


def invalid(defn: WorkflowDef, limits: Limits = DEFAULT_LIMITS) -> str:
    with pytest.raises(InvalidArgument) as info:
        validate_definition(defn, limits)
    return str(info.value)


def test_public_api_is_sorted_and_complete() -> None:
    assert engine.__all__ == sorted(engine.__all__)
    for name in engine.__all__:
        assert hasattr(engine, name)


def test_valid_definitions_pass() -> None:
    validate_definition(wf())
    validate_definition(
        wf(
            name="Order.v2_x-1",
            nodes=(
                node("a", task_type="ns:mail/send-v1.0", config=b'{"to": ["x"]}'),
                node("b", retry_policy=RetryPolicy(max_attempts=5, initial_interval=timedelta(0))),
                node("c", start_to_close_timeout=timedelta(seconds=1)),
                node("d", heartbeat_timeout=timedelta(seconds=1), config=b"[1, 2.5, null]"),
            ),
            edges=(("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")),
        )
    )


# -- names, ids, kinds, task types ----------------------------------------------------------


def test_empty_name() -> None:
    assert "workflow name is empty" in invalid(wf(name=""))


@pytest.mark.parametrize("name", ["-x", "_x", ".x", "a b", "a/b", "é"])
def test_bad_name_charset(name: str) -> None:
    msg = invalid(wf(name=name))
    assert f"workflow name {name!r} is invalid" in msg
    assert "use only letters, digits" in msg


def test_name_too_long() -> None:
    validate_definition(wf(name="n" * 10), Limits(max_name_length=10))
    msg = invalid(wf(name="n" * 11), Limits(max_name_length=10))
    assert "11 characters long; use at most 10" in msg


def test_no_nodes() -> None:
    defn = WorkflowDef(name="wf", nodes=())
    assert invalid(defn) == "workflow 'wf' has no nodes; add at least one node"


def test_duplicate_node_id() -> None:
    msg = invalid(wf(nodes=(node("a"), node("b"), node("a"))))
    assert "duplicate node id 'a'" in msg


def test_empty_node_id() -> None:
    assert "empty id" in invalid(wf(nodes=(node(""),)))


@pytest.mark.parametrize("bad", ["-a", "a b", "a:b", "a/b"])
def test_bad_node_id_charset(bad: str) -> None:
    assert f"node id {bad!r} is invalid" in invalid(wf(nodes=(node(bad),)))


def test_node_id_too_long() -> None:
    limits = Limits(max_id_length=4)
    validate_definition(wf(nodes=(node("abcd"),)), limits)
    assert "5 characters long; use at most 4" in invalid(wf(nodes=(node("abcde"),)), limits)


def test_unknown_kind_lists_allowed_kinds() -> None:
    msg = invalid(wf(nodes=(node("a", kind="timer"),)))
    assert msg == (
        "node 'a' has unknown kind 'timer'; allowed kinds: 'task', 'switch', 'workflow', 'map', "
        "'approval'"
    )


def test_empty_task_type() -> None:
    assert "node 'a' has an empty task_type" in invalid(wf(nodes=(node("a", task_type=""),)))


@pytest.mark.parametrize("bad", ["send mail", "x;y", "a\n"])
def test_bad_task_type_charset(bad: str) -> None:
    msg = invalid(wf(nodes=(node("a", task_type=bad),)))
    assert f"task_type {bad!r} is invalid" in msg


def test_task_type_too_long() -> None:
    limits = Limits(max_id_length=4)
    msg = invalid(wf(nodes=(node("a", task_type="abcde"),)), limits)
    assert "node 'a' task_type is 5 characters long; use at most 4" in msg


# -- edges and cycles ----------------------------------------------------------------------


def test_edge_to_unknown_node() -> None:
    msg = invalid(wf(nodes=(node("a"),), edges=(("a", "zz"),)))
    assert msg.startswith("edge a -> zz refers to unknown node 'zz'")


def test_edge_from_unknown_node() -> None:
    msg = invalid(wf(nodes=(node("a"),), edges=(("q", "a"),)))
    assert "edge q -> a refers to unknown node 'q'" in msg


def test_self_edge() -> None:
    assert "edge a -> a connects node 'a' to itself" in invalid(wf(edges=(("a", "a"),)))


def test_duplicate_edge() -> None:
    defn = wf(nodes=(node("a"), node("b")), edges=(("a", "b"), ("a", "b")))
    assert "duplicate edge a -> b" in invalid(defn)


def test_two_node_cycle() -> None:
    defn = wf(name="x", nodes=(node("a"), node("b")), edges=(("a", "b"), ("b", "a")))
    assert invalid(defn) == "workflow 'x' has a cycle: a -> b -> a; remove one of these edges"


def test_cycle_reported_as_a_real_path() -> None:
    # entry -> a -> b -> c -> a, plus an unrelated branch; the reported path must be the cycle.
    defn = wf(
        nodes=(node("entry"), node("side"), node("a"), node("b"), node("c")),
        edges=(("entry", "side"), ("entry", "a"), ("a", "b"), ("b", "c"), ("c", "a")),
    )
    msg = invalid(defn)
    match = re.search(r"has a cycle: (.*); remove", msg)
    assert match is not None
    path = match.group(1).split(" -> ")
    assert path[0] == path[-1]
    assert set(path) == {"a", "b", "c"}
    edges = set(defn.edges)
    assert all((s, t) in edges for s, t in itertools.pairwise(path))


def test_diamond_is_not_a_cycle() -> None:
    defn = wf(
        nodes=(node("a"), node("b"), node("c"), node("d")),
        edges=(("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("a", "d")),
    )
    validate_definition(defn)


def test_node_and_edge_limits() -> None:
    nodes = tuple(node(f"n{i}") for i in range(3))
    edges = (("n0", "n1"), ("n1", "n2"))
    validate_definition(wf(nodes=nodes, edges=edges), Limits(max_nodes=3, max_edges=2))
    msg = invalid(wf(nodes=nodes, edges=edges), Limits(max_nodes=2))
    assert "has 3 nodes, more than the limit of 2" in msg
    msg = invalid(wf(nodes=nodes, edges=edges), Limits(max_edges=1))
    assert "has 2 edges, more than the limit of 1" in msg


# -- config --------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [b"{", b"{'a': 1}", b"NaN", b'{"a": Infinity}', b"\xff\xfe"])
def test_config_must_be_json(config: bytes) -> None:
    msg = invalid(wf(nodes=(node("a", config=config),)))
    assert msg.startswith("node 'a' config ")  # the strict decoder says what is wrong
    assert "JSON" in msg


def test_config_nested_too_deep_is_a_clear_error() -> None:
    config = b"[" * 30_000 + b"]" * 30_000
    assert "deeper than 128 levels" in invalid(wf(nodes=(node("a", config=config),)))


def test_config_size_limit() -> None:
    config = b'"' + b"x" * 8 + b'"'  # 10 bytes
    validate_definition(wf(nodes=(node("a", config=config),)), Limits(max_config_bytes=10))
    msg = invalid(wf(nodes=(node("a", config=config),)), Limits(max_config_bytes=9))
    assert "node 'a' config is 10 bytes, more than the limit of 9" in msg


# -- retry policies and timeouts -----------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "fragment"),
    [
        (RetryPolicy(max_attempts=0), "max_attempts 0; use 1 or more"),
        (RetryPolicy(initial_interval=timedelta(seconds=-1)), "negative initial_interval"),
        (
            RetryPolicy(initial_interval=timedelta(0), max_interval=timedelta(seconds=-1)),
            "negative max_interval",
        ),
        (
            RetryPolicy(initial_interval=timedelta(seconds=10), max_interval=timedelta(seconds=5)),
            "max_interval 5.0s below initial_interval 10.0s",
        ),
        (RetryPolicy(backoff_coefficient=0.5), "backoff_coefficient 0.5; use a finite number"),
        (RetryPolicy(backoff_coefficient=float("nan")), "backoff_coefficient nan"),
        (RetryPolicy(backoff_coefficient=float("inf")), "backoff_coefficient inf"),
        (RetryPolicy(non_retryable_error_types=("",)), "empty non-retryable error type"),
    ],
)
def test_bad_retry_policy(policy: RetryPolicy, fragment: str) -> None:
    assert fragment in invalid(wf(nodes=(node("a", retry_policy=policy),)))
    msg = invalid(wf(default_retry_policy=policy))
    assert msg.startswith("workflow 'wf' default retry policy")
    assert fragment in msg


@pytest.mark.parametrize("field", ["start_to_close_timeout", "heartbeat_timeout"])
@pytest.mark.parametrize("value", [timedelta(0), timedelta(seconds=-1)])
def test_node_timeouts_positive(field: str, value: timedelta) -> None:
    msg = invalid(wf(nodes=(node("a", **{field: value}),)))
    assert f"node 'a' {field} is" in msg
    assert "use a positive duration" in msg


def test_default_timeout_positive() -> None:
    msg = invalid(wf(default_start_to_close_timeout=timedelta(0)))
    assert "default_start_to_close_timeout is 0.0s; use a positive duration" in msg


# -- fault tolerance: handlers, compensation, timeouts, jitter ------------------------------

SEC = timedelta(seconds=1)


def test_fault_tolerance_features_pass() -> None:
    validate_definition(
        wf(
            nodes=(
                node("a", on_failure="h", compensation_task_type="ns:undo/a-1.0"),
                node("b", on_failure="h", pause_before=True, schedule_to_start_timeout=SEC),
                node("h", pause_before=True, retry_policy=RetryPolicy(jitter=1.0)),
            ),
            edges=(("a", "b"),),
            execution_timeout=SEC,
            default_schedule_to_start_timeout=SEC,
            default_heartbeat_timeout=SEC,
            default_retry_policy=RetryPolicy(jitter=0.0),
        )
    )


def test_on_failure_must_name_a_node() -> None:
    msg = invalid(wf(nodes=(node("a", on_failure="zz"),)))
    assert msg == (
        "node 'a' on_failure names unknown node 'zz'; declare the handler node or fix on_failure"
    )


def test_on_failure_cannot_name_the_node_itself() -> None:
    msg = invalid(wf(nodes=(node("a", on_failure="a"),)))
    assert msg == "node 'a' on_failure names the node itself; point it at a separate handler node"


@pytest.mark.parametrize("edge", [("h", "b"), ("b", "h")])
def test_handler_must_have_no_edges(edge: tuple[str, str]) -> None:
    defn = wf(nodes=(node("a", on_failure="h"), node("b"), node("h")), edges=(edge,))
    msg = invalid(defn)
    assert msg.startswith(
        "node 'h' is the on_failure handler of 'a' and so must have no edges, "
        f"but has edge {edge[0]} -> {edge[1]}; remove the edge"
    )


def test_handlers_cannot_chain() -> None:
    defn = wf(nodes=(node("a", on_failure="h"), node("h", on_failure="g"), node("g")))
    msg = invalid(defn)
    assert "node 'h' is the on_failure handler of 'a' and declares on_failure 'g' itself" in msg
    assert "handlers cannot have handlers" in msg
    loop = wf(nodes=(node("a", on_failure="h"), node("h", on_failure="a")))
    assert "handlers cannot have handlers" in invalid(loop)


def test_handlers_are_not_compensated() -> None:
    defn = wf(nodes=(node("a", on_failure="h"), node("h", compensation_task_type="u")))
    assert "declares compensation_task_type; only workflow nodes are compensated" in (invalid(defn))


@pytest.mark.parametrize("bad", ["", "undo it", "x;y"])
def test_compensation_task_type_charset(bad: str) -> None:
    msg = invalid(wf(nodes=(node("a", compensation_task_type=bad),)))
    assert f"node 'a' compensation_task_type {bad!r} is invalid; use only letters" in msg


def test_compensation_task_type_length() -> None:
    msg = invalid(wf(nodes=(node("a", compensation_task_type="abcde"),)), Limits(max_id_length=4))
    assert "node 'a' compensation_task_type is 5 characters long; use at most 4" in msg


@pytest.mark.parametrize("value", [timedelta(0), timedelta(seconds=-1)])
def test_new_timeouts_positive(value: timedelta) -> None:
    msg = invalid(wf(nodes=(node("a", schedule_to_start_timeout=value),)))
    assert "node 'a' schedule_to_start_timeout is" in msg
    for field in (
        "execution_timeout",
        "default_schedule_to_start_timeout",
        "default_heartbeat_timeout",
    ):
        msg = invalid(wf(**{field: value}))
        assert msg.startswith(f"workflow 'wf' {field} is")
        assert "use a positive duration or leave it unset" in msg


@pytest.mark.parametrize("jitter", [-0.1, 1.01, float("nan"), float("inf")])
def test_jitter_is_a_fraction(jitter: float) -> None:
    policy = RetryPolicy(jitter=jitter)
    fragment = f"has jitter {jitter}; use a fraction between 0 (none) and 1"
    assert fragment in invalid(wf(nodes=(node("a", retry_policy=policy),)))
    assert fragment in invalid(wf(default_retry_policy=policy))


def test_durations_past_ten_years_are_rejected() -> None:
    from datetime import timedelta

    from coordinator.errors import InvalidArgument
    from coordinator.model import NodeSpec, RetryPolicy, WorkflowDef

    huge = timedelta(seconds=3e11)
    cases = [
        WorkflowDef(name="w", nodes=(NodeSpec(id="a", task_type="t"),), execution_timeout=huge),
        WorkflowDef(
            name="w",
            nodes=(
                NodeSpec(
                    id="a",
                    task_type="t",
                    retry_policy=RetryPolicy(initial_interval=huge, max_interval=huge),
                ),
            ),
        ),
    ]
    for defn in cases:
        with pytest.raises(InvalidArgument, match="3650-day limit"):
            validate_definition(defn)


# -- control flow ----------------------------------------------------------------------------

from coordinator.model import SwitchCase  # noqa: E402


def switch(id: str = "s", **kw: object) -> NodeSpec:
    kw.setdefault("task_type", "")
    return node(id, kind="switch", **kw)


def test_control_flow_kinds_pass() -> None:
    validate_definition(
        wf(
            nodes=(
                switch(
                    cases=(SwitchCase("input.x > 1", ("m",)),),
                    default_targets=("sub",),
                    match_all=True,
                    skip_if="execution.depth > 3",
                ),
                node("m", kind="map", items_expr="input.items", max_concurrency=4),
                node(
                    "sub",
                    task_type="",
                    kind="workflow",
                    workflow_name="child.v1",
                    workflow_version=2,
                    input_expr="{'a': parents.s}",
                    output_expr="output.total",
                ),
                node("j", trigger_rule="one_success"),  # type: ignore[arg-type]
            ),
            edges=(("s", "m"), ("s", "sub"), ("m", "j"), ("sub", "j")),
        )
    )


@pytest.mark.parametrize(
    ("nodes", "edges", "message"),
    [
        ((switch(),), (), "node 's' is a switch with no cases and no default_targets"),
        (
            (switch(cases=(SwitchCase("true", ("b",)),)), node("b")),
            (),
            "node 's' case 1 names 'b', which is not a child of the switch; add the edge s -> b",
        ),
        (
            (switch(default_targets=("b",)), node("b")),
            (),
            "node 's' default_targets names 'b', which is not a child",
        ),
        (
            (switch(cases=(SwitchCase("true", ()),), default_targets=("b",)), node("b")),
            (("s", "b"),),
            "node 's' case 1 has no targets",
        ),
        (
            (switch(cases=(SwitchCase("true", ("b",)), SwitchCase("1 +", ("b",)))), node("b")),
            (("s", "b"),),
            "node 's' case 2 condition is not a valid CEL expression: ",
        ),
        (
            (switch(cases=(SwitchCase("input.x + 1", ("b",)),)), node("b")),
            (("s", "b"),),
            "node 's' case 1 condition",
        ),
        ((node("w", task_type="", kind="workflow"),), (), "node 'w' is a workflow node with no"),
        (
            (node("w", task_type="", kind="workflow", workflow_name="bad name"),),
            (),
            "node 'w' workflow_name: workflow name 'bad name' is invalid",
        ),
        (
            (node("w", task_type="", kind="workflow", workflow_name="c", workflow_version=-1),),
            (),
            "node 'w' has workflow_version -1",
        ),
        ((node("m", kind="map"),), (), "node 'm' is a map node with no items_expr"),
        (
            (node("m", kind="map", task_type="", items_expr="input"),),
            (),
            "node 'm' has an empty task_type",
        ),
        (
            (node("m", kind="map", items_expr="input", max_concurrency=-1),),
            (),
            "node 'm' has max_concurrency -1; use 0 (no limit) or more",
        ),
        ((node("a", items_expr="input"),), (), "node 'a' sets items_expr but is a task node"),
        ((node("a", match_all=True),), (), "node 'a' sets match_all but is a task node"),
        (
            (node("a", trigger_rule="sometimes"),),
            (),
            "node 'a' has unknown trigger_rule 'sometimes'; allowed: 'all_success'",
        ),
        ((node("a", skip_if="input.x + 1"),), (), "node 'a' skip_if ('input.x + 1') gives"),
        ((node("a", input_expr="output"),), (), "node 'a' input_expr is not a valid CEL"),
        ((node("a", output_expr="nope"),), (), "node 'a' output_expr is not a valid CEL"),
        ((node("a", input_expr=" "),), (), "node 'a' input_expr is empty"),
        (
            (node("a", on_failure="h"), node("h", kind="workflow", workflow_name="x")),
            (),
            "node 'h' is the on_failure handler of 'a' and so must be a task node",
        ),
    ],
)
def test_control_flow_rules(
    nodes: tuple[NodeSpec, ...], edges: tuple[tuple[str, str], ...], message: str
) -> None:
    assert message in invalid(wf(nodes=nodes, edges=edges))


def test_output_expr_sees_output_and_the_compile_cache_keeps_messages_apart() -> None:
    validate_definition(wf(nodes=(node("a", output_expr="output.x"),)))
    for where in ("a", "b"):
        msg = invalid(wf(nodes=(node(where, skip_if="1 +"),)))
        assert msg.startswith(f"node '{where}' skip_if is not a valid CEL expression")

"""The claim's admission under concurrency limits (coordinator/dispatch/_admit.py)."""

from __future__ import annotations

from coordinator.model import Candidate, LeasedCounts, admit


def cand(node: str, task_type: str = "t", execution: str = "e", cap: int = 0) -> Candidate:
    return Candidate(execution, node, task_type, None, cap)


def ids(admitted: list) -> list[str]:  # type: ignore[type-arg]
    return [a.candidate.node_id for a in admitted]


def test_without_limits_the_first_candidates_up_to_the_limit() -> None:
    got = admit([cand("a"), cand("b"), cand("c")], LeasedCounts(), 2)
    assert ids(got) == ["a", "b"]


def test_an_execution_cap_counts_leased_rows_and_those_admitted() -> None:
    cs = [cand("a", cap=2), cand("b", cap=2), cand("c", execution="f"), cand("d", cap=2)]
    got = admit(cs, LeasedCounts(by_execution={"e": 1}), 10)
    assert ids(got) == ["a", "c"]


def test_a_type_cap_counts_every_key_of_the_type() -> None:
    counts = LeasedCounts(by_type_key={("t", "k1"): 1, ("t", None): 1})
    got = admit([cand("a"), cand("b", "u")], counts, 10, type_caps={"t": 3})
    assert ids(got) == ["a", "b"]
    got = admit([cand("a"), cand("x")], counts, 10, type_caps={"t": 2})
    assert ids(got) == []


def test_a_key_limit_passes_over_saturated_keys_to_later_candidates() -> None:
    keys = {"a": "k1", "b": "k1", "c": "k2", "d": "k3"}
    got = admit(
        [cand(n) for n in "abcd"],
        LeasedCounts(by_type_key={("t", "k3"): 1}),
        10,
        key_limits={"t": 1},
        key_of=lambda c: keys[c.node_id],
    )
    assert [(a.candidate.node_id, a.concurrency_key) for a in got] == [("a", "k1"), ("c", "k2")]


def test_a_key_limit_of_two() -> None:
    got = admit(
        [cand(n) for n in "abc"],
        LeasedCounts(),
        10,
        key_limits={"t": 2},
        key_of=lambda c: "same",
    )
    assert ids(got) == ["a", "b"]

"""Chaos, bounded (issue 8): 3 coordinator replicas on PostgreSQL and 4 SDK workers run
2,000 executions of a 5-node DAG while, every 2 s, a random replica or worker is SIGKILLed
and restarted (a replica on the same port, so its workers reconnect). Every execution must
succeed, no node may succeed twice, and every node's event history must be a gap-free chain
of attempts. Verdicts come from the events table, not from thousands of watch streams.

Executions are started through any replica, the killed ones included: each batch carries
one idempotency key per execution and is re-sent to the next replica when the call fails
as UNAVAILABLE (or times out), so a batch that was committed but whose reply was lost in a
kill is not started twice. A replica kept out of the chaos would make the test weaker:
every coordinator process is a target.

CHAOS_SEED=n reproduces one sequence of kills; CHAOS_EXECUTIONS=n runs fewer executions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest

from tests.support.procs import ROOT, Proc, free_port, spawn_coordinator, spawn_worker
from tests.support.wait import WaitTimeout, wait_for, wait_for_sync
from worker_sdk import Client, RpcError, Workflow

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(600)]

EXECUTIONS = int(os.environ.get("CHAOS_EXECUTIONS", "2000"))
REPLICAS = 3
WORKERS = 4
KILL_EVERY = 2.0  # seconds between two kills
BATCH = 100  # executions per BatchStartExecutions
CHAOS_WINDOW = 360.0  # the chaos stops after this even if executions are left ...
CALM_WINDOW = 120.0  # ... which then have this long to finish without it
WORKER = ROOT / "tests/support/chaos_worker.py"
WORKFLOW = "chaos-dag"
NODES = ("a", "b", "c", "d", "e")
FAN = ("b", "c", "d")
# Quick recovery: a lost worker is noticed in ~3 s, a lease lost with a replica in 5 s.
SETTINGS = {
    "heartbeat_interval": "1s",
    "worker_liveness_timeout": "3s",
    "sweep_interval": "250ms",
    "shutdown_grace": "5s",
}
ENDED = {"SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"}
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def _dag() -> Workflow:
    """a -> (b, c, d) -> e; short start-to-close timeouts and many quick retries, so that
    attempts lost with a process are retried within seconds and never run out."""
    wf = Workflow(WORKFLOW)

    def node(node_id: str, task_type: str, after: str | Sequence[str] = ()) -> str:
        return wf.node(
            node_id,
            task_type,
            after=after,
            timeout="5s",
            retries=50,
            retry_initial_interval="100ms",
            retry_backoff=1.0,
        )

    a = node("a", "chaos-noop")
    node("e", "chaos-noop", after=[node(n, "chaos-sleep", after=a) for n in FAN])
    return wf


# -- the processes and the chaos ----------------------------------------------------------------


@dataclass
class Cluster:
    url: str
    log_dir: Path
    ports: list[int]
    replicas: list[Proc] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)
    generations: Counter[str] = field(default_factory=Counter)

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def start(self) -> None:
        for port in self.ports:
            self.replicas.append(
                spawn_coordinator(self.url, self.log_dir, port=port, **SETTINGS)[0]
            )
        self.workers = [self._spawn_worker(i) for i in range(WORKERS)]

    def _spawn_worker(self, index: int) -> Proc:
        generation = self.generations[f"worker-{index}"]
        self.generations[f"worker-{index}"] += 1
        address = self.addresses[index % REPLICAS]  # spread over the replicas
        return spawn_worker(WORKER, address, self.log_dir, f"worker-{index}.{generation}")

    def kill_and_restart_replica(self, index: int) -> None:
        proc = self.replicas[index]
        assert proc.stop(signal.SIGKILL) == -signal.SIGKILL, proc.output()[-3000:]
        key = f"replica-{index}"
        proc.log.rename(self.log_dir / f"{proc.name}.killed-{self.generations[key]}.log")
        self.generations[key] += 1
        self.replicas[index] = spawn_coordinator(
            self.url, self.log_dir, port=self.ports[index], **SETTINGS
        )[0]

    def kill_and_restart_worker(self, index: int) -> None:
        proc = self.workers[index]
        assert proc.stop(signal.SIGKILL) == -signal.SIGKILL, proc.output()[-3000:]
        self.workers[index] = self._spawn_worker(index)

    def stop(self) -> tuple[list[int], list[int]]:
        """SIGTERM everything still running: (worker exit codes, replica exit codes).

        A worker restarted by the last kill may still be importing: a SIGTERM before its
        handler is installed kills it outright (-15), which says nothing about draining.
        So each worker is first given up to 30 s to register (its log says so)."""
        deadline = time.monotonic() + 30
        for w in self.workers:
            # Past the deadline each is stopped anyway: its exit code then tells the test.
            with contextlib.suppress(WaitTimeout):
                wait_for_sync(
                    lambda w=w: "registered with" in w.output() or w.popen.poll() is not None,
                    timeout=max(0.0, deadline - time.monotonic()),
                    interval=0.1,
                )
        return [w.stop() for w in self.workers], [r.stop() for r in self.replicas]


class Chaos(threading.Thread):
    """Every KILL_EVERY seconds, SIGKILLs a random replica or worker and restarts it."""

    def __init__(self, cluster: Cluster, seed: int) -> None:
        super().__init__(name="chaos", daemon=True)
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.halt = threading.Event()
        self.kills: Counter[str] = Counter()
        self.error: BaseException | None = None

    def run(self) -> None:
        targets = [("replica", i) for i in range(REPLICAS)] + [
            ("worker", i) for i in range(WORKERS)
        ]
        next_kill = time.monotonic() + KILL_EVERY
        try:
            while not self.halt.wait(max(0.0, next_kill - time.monotonic())):
                next_kill += KILL_EVERY
                kind, index = self.rng.choice(targets)
                if kind == "replica":
                    self.cluster.kill_and_restart_replica(index)
                else:
                    self.cluster.kill_and_restart_worker(index)
                self.kills[kind] += 1
                next_kill = max(next_kill, time.monotonic())
        except BaseException as exc:  # reported by the test, not as an unhandled thread error
            self.error = exc

    def finish(self) -> None:
        self.halt.set()
        self.join(60)
        assert not self.is_alive(), "the chaos thread did not stop"
        if self.error is not None:
            raise AssertionError(f"chaos failed: {self.error!r}") from self.error


@contextlib.contextmanager
def running_cluster(url: str, log_dir: Path) -> Iterator[Cluster]:
    cluster = Cluster(url, log_dir, [free_port() for _ in range(REPLICAS)])
    try:
        cluster.start()
        yield cluster
    finally:
        worker_exits, replica_exits = cluster.stop()
    assert worker_exits == [0] * WORKERS, [w.output()[-3000:] for w in cluster.workers]
    assert replica_exits == [0] * REPLICAS, [r.output()[-3000:] for r in cluster.replicas]


# -- starting and waiting -----------------------------------------------------------------------


async def start_all(clients: list[Client], total: int) -> tuple[list[str], int]:
    """Starts ``total`` executions in batches, each re-sent to the next replica (same
    idempotency keys) while replicas are down. Returns (execution ids, calls re-sent)."""
    ids: list[str] = []
    resent = 0
    turn = 0
    for first in range(0, total, BATCH):
        numbers = range(first, min(first + BATCH, total))
        deadline = time.monotonic() + 60
        while True:
            client = clients[turn % len(clients)]
            turn += 1
            try:
                started = await client.start_many(
                    WORKFLOW,
                    [{"n": n} for n in numbers],
                    idempotency_keys=[f"chaos-{n}" for n in numbers],
                )
                break
            except RpcError as exc:
                if exc.code not in RETRYABLE or time.monotonic() > deadline:
                    raise
                resent += 1
                # Not a wait for a state: the pause of a client retrying a refused call.
                await asyncio.sleep(0.1)
        ids += [e.id for e in started]
    return ids, resent


def statuses(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return dict(
            conn.execute("SELECT status, count(*) FROM executions GROUP BY status").fetchall()
        )


async def wait_finished(url: str, total: int, until: float) -> dict[str, int]:
    """Until ``total`` executions have ended or ``until`` (monotonic) passes: the statuses."""

    def settled() -> dict[str, int] | None:
        counts = statuses(url)
        ended = sum(v for k, v in counts.items() if k in ENDED)
        failed = ended - counts.get("SUCCEEDED", 0)
        return counts if ended >= total or failed else None

    try:
        return await wait_for(settled, timeout=max(0.0, until - time.monotonic()), interval=0.5)
    except WaitTimeout:
        return statuses(url)


# -- the verdict from the event history ---------------------------------------------------------


@dataclass(frozen=True)
class Row:
    sequence: int
    execution_id: str
    node_id: str | None
    type: str
    attempt: int
    details: dict[str, object]


def load_events(url: str) -> list[Row]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT sequence, execution_id, node_id, type, attempt, details FROM events "
            "ORDER BY sequence"
        ).fetchall()
    return [Row(s, e, n, t, a, json.loads(bytes(d)) if d else {}) for s, e, n, t, a, d in rows]


def node_chain_problem(events: list[Row]) -> str | None:
    """None when one node's events (in sequence order) are NODE_READY, then attempts 1, 2 ...
    each NODE_LEASED followed by NODE_SUCCEEDED (the last one) or by NODE_ATTEMPT_FAILED and
    NODE_RETRY_SCHEDULED; else what is wrong."""
    kinds = [(e.type, e.attempt) for e in events]
    if not kinds or kinds[0][0] != "NODE_READY":
        return f"does not start with NODE_READY: {kinds}"
    attempt = 0
    expect = "NODE_LEASED"
    for kind, n in kinds[1:]:
        if expect == "end":
            return f"events after NODE_SUCCEEDED: {kinds}"
        if expect == "NODE_LEASED":
            if kind != "NODE_LEASED" or n != attempt + 1:
                return f"expected NODE_LEASED of attempt {attempt + 1}: {kinds}"
            attempt, expect = n, "outcome"
        elif expect == "outcome":
            if n != attempt or kind not in {"NODE_SUCCEEDED", "NODE_ATTEMPT_FAILED"}:
                return f"expected the outcome of attempt {attempt}: {kinds}"
            expect = "end" if kind == "NODE_SUCCEEDED" else "NODE_RETRY_SCHEDULED"
        elif kind != "NODE_RETRY_SCHEDULED" or n != attempt:
            return f"expected NODE_RETRY_SCHEDULED after attempt {attempt} failed: {kinds}"
        else:
            expect = "NODE_LEASED"
    return None if expect == "end" else f"does not end with NODE_SUCCEEDED: {kinds}"


def execution_problems(execution_id: str, events: list[Row]) -> list[str]:
    own = [e.type for e in events if e.node_id is None]
    if own != ["EXECUTION_STARTED", "EXECUTION_SUCCEEDED"]:
        return [f"{execution_id}: execution events {own}"]
    by_node: dict[str, list[Row]] = {}
    for e in events:
        if e.node_id is not None:
            by_node.setdefault(e.node_id, []).append(e)
    if set(by_node) != set(NODES):
        return [f"{execution_id}: events for nodes {sorted(by_node)}"]
    problems = [
        f"{execution_id}/{node}: {problem}"
        for node, rows in by_node.items()
        if (problem := node_chain_problem(rows)) is not None
    ]
    if problems:
        return problems
    started, ended = events[0], events[-1]
    if (started.type, ended.type) != ("EXECUTION_STARTED", "EXECUTION_SUCCEEDED"):
        return [f"{execution_id}: node events before the start or after the end"]

    def ready(node: str) -> int:
        return by_node[node][0].sequence

    def done(node: str) -> int:
        return by_node[node][-1].sequence

    if min(ready(n) for n in FAN) < done("a") or ready("e") < max(done(n) for n in FAN):
        return [f"{execution_id}: a node became READY before its parents succeeded"]
    return []


# -- the test -----------------------------------------------------------------------------------


async def test_chaos_kills_lose_nothing_and_run_nothing_twice(
    fresh_postgres_url: str, tmp_path: Path
) -> None:
    url, total = fresh_postgres_url, EXECUTIONS
    seed = int(os.environ.get("CHAOS_SEED", str(random.randrange(1 << 30))))
    began = time.monotonic()
    with running_cluster(url, tmp_path) as cluster:
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(Client(a, timeout=20)) for a in cluster.addresses
            ]
            await clients[0].register_workflow(_dag())
            chaos = Chaos(cluster, seed)
            t0 = time.monotonic()  # the clock of the run itself, without process start-up
            chaos.start()
            try:
                ids, resent = await start_all(clients, total)
                started_in = time.monotonic() - t0
                counts = await wait_finished(url, total, time.monotonic() + CHAOS_WINDOW)
            finally:
                chaos.finish()
            chaos_ended = time.monotonic() - t0
            counts = await wait_finished(url, total, time.monotonic() + CALM_WINDOW)
            finished_in = time.monotonic() - t0
    duration = time.monotonic() - began

    events = load_events(url)
    failures = Counter(
        str(e.details.get("error_type")) for e in events if e.type == "NODE_ATTEMPT_FAILED"
    )
    print(
        f"\nchaos (seed {seed}): {total} executions x {len(NODES)} nodes ended in "
        f"{finished_in:.1f} s ({total / finished_in:.1f} executions/s; started in "
        f"{started_in:.1f} s, chaos for {chaos_ended:.1f} s, {duration:.1f} s with the "
        f"start and stop of the processes); kills: {dict(chaos.kills)}; start batches "
        f"re-sent: {resent}; "
        f"attempts retried: {sum(failures.values())} {dict(failures)}; statuses {counts}"
    )

    assert len(set(ids)) == total, "an idempotency key started two executions"
    assert counts == {"SUCCEEDED": total}, counts

    succeeded = Counter((e.execution_id, e.node_id) for e in events if e.type == "NODE_SUCCEEDED")
    twice = [key for key, n in succeeded.items() if n > 1]
    assert twice == [], f"{len(twice)} nodes succeeded twice, e.g. {twice[:5]}"
    assert len(succeeded) == total * len(NODES)

    by_execution: dict[str, list[Row]] = {}
    for e in events:
        by_execution.setdefault(e.execution_id, []).append(e)
    assert set(by_execution) == set(ids)
    problems = [p for eid, rows in by_execution.items() for p in execution_problems(eid, rows)]
    assert problems == [], f"{len(problems)} broken histories, e.g. {problems[:5]}"

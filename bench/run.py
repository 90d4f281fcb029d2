"""Trellis benchmark: ``python -m bench.run [--quick] [--db sqlite|postgres|both] [--json F]``.

Starts real coordinator and worker processes on 127.0.0.1 (fresh database per scenario),
runs the scenarios described in docs/performance.md, prints a table and stops everything
(also on Ctrl-C or error). Timings come from the coordinator's own timestamps in the
database (executions.created_at / ended_at, events.time; milliseconds, wall clock) unless
a row says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa

from tests.support.procs import ADMIN_KEY, ROOT, Proc, spawn_coordinator, spawn_worker
from worker_sdk import Client, Workflow

PG_ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
WORKER_SCRIPT = ROOT / "bench" / "noop_worker.py"
# Executions per BatchStartExecutions call of the load generator.
START_BATCH = 100


# ---------------------------------------------------------------------------- sizes


@dataclass
class Sizes:
    throughput_n: int
    chain_runs: int
    fanout_runs: int
    dispatch_runs: int
    rss_n: int
    scenario_timeout: float  # seconds: every scenario's waiting loop is bounded by this
    rss_timeout: float


FULL = Sizes(2000, 30, 5, 50, 100_000, 600.0, 900.0)
QUICK = Sizes(300, 10, 3, 20, 10_000, 180.0, 300.0)


# ---------------------------------------------------------------------------- security


@dataclass
class Security:
    """What ``--security`` turns on: ``key`` (the default deployment: every call carries an
    API key, plaintext), ``open`` (no authentication: TRELLIS_INSECURE_OPEN), ``tls`` (API
    key over TLS). Settings for the coordinator and for clients (workers, this process)."""

    mode: str = "key"
    ca_pem: bytes = b""
    coordinator: dict[str, str] = field(default_factory=dict)
    client: dict[str, str] = field(default_factory=dict)

    def configure(self, mode: str, root: Path) -> None:
        self.mode = mode
        if mode == "open":
            self.coordinator = {"insecure_open": "true"}
        elif mode == "tls":
            from tests.support.certs import CertificateAuthority

            ca = CertificateAuthority("bench CA")
            server = ca.issue_server().write(root, "coordinator")
            self.coordinator = {
                "tls_cert_file": str(server.cert),
                "tls_key_file": str(server.key),
            }
            self.ca_pem = ca.cert_pem
            self.client = {"TRELLIS_CA_FILE": str(ca.write(root, "ca"))}
        os.environ.update(self.client)  # the load generator's Client


SECURITY = Security()


# ---------------------------------------------------------------------------- processes


@dataclass
class Env:
    """Everything started for one scenario; ``close`` stops it all."""

    kind: str  # sqlite | postgres
    tmp: Path
    url: str = ""
    pg_db: str = ""
    procs: list[Proc] = field(default_factory=list)
    coordinators: list[tuple[Proc, str]] = field(default_factory=list)

    @classmethod
    def create(cls, kind: str, root: Path, name: str) -> Env:
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}-{kind}-", dir=root))
        env = cls(kind, tmp)
        if kind == "sqlite":
            env.url = f"sqlite:///{tmp / 'bench.db'}"
        else:
            import psycopg

            env.pg_db = f"bench_{uuid.uuid4().hex[:12]}"
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{env.pg_db}"')
            env.url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + env.pg_db
        return env

    def coordinator(self, **settings: str) -> tuple[Proc, str]:
        settings.setdefault("log_level", "WARNING")
        settings.update(SECURITY.coordinator)
        tls = grpc.ssl_channel_credentials(SECURITY.ca_pem) if SECURITY.ca_pem else None
        proc, address = spawn_coordinator(self.url, self.tmp, tls=tls, **settings)
        self.procs.append(proc)
        self.coordinators.append((proc, address))
        return proc, address

    def worker(self, address: str, concurrency: int, record: Path | None = None) -> Proc:
        extra = {"WORKER_CONCURRENCY": str(concurrency), **SECURITY.client}
        if record is not None:
            extra["RECORD_FILE"] = str(record)
        proc = spawn_worker(WORKER_SCRIPT, address, self.tmp, f"worker-{len(self.procs)}", **extra)
        self.procs.append(proc)
        return proc

    def sync_url(self) -> str:
        if self.kind == "sqlite":
            return self.url
        return self.url.replace("postgresql://", "postgresql+psycopg://", 1)

    def close(self) -> None:
        # Workers first (they drain), then coordinators.
        for proc in [p for p in self.procs if not p.name.startswith("coordinator")]:
            proc.stop(timeout=15)
        for proc, _ in self.coordinators:
            proc.stop(timeout=20)
        if self.pg_db:
            import psycopg

            try:
                with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')
            except Exception as exc:
                print(f"  (could not drop {self.pg_db}: {exc})", file=sys.stderr)
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- helpers


def single_wf(name: str = "single") -> Workflow:
    wf = Workflow(name)
    wf.node("only", "noop")
    return wf


def chain_wf(n: int = 10) -> Workflow:
    wf = Workflow("chain")
    prev: str | None = None
    for i in range(n):
        prev = wf.node(f"n{i}", "noop", after=[prev] if prev else [])
    return wf


def fan_wf(width: int = 100) -> Workflow:
    wf = Workflow("fan")
    head = wf.node("head", "noop")
    mids = [wf.node(f"m{i}", "noop", after=[head]) for i in range(width)]
    wf.node("tail", "noop", after=mids)
    return wf


async def start_many(
    addresses: list[str],
    workflow: str,
    n: int,
    deadline: float,
    parallel: int = 4,
    batch: int = START_BATCH,
) -> list[str]:
    """Start ``n`` executions in BatchStartExecutions calls of ``batch`` (the way a producer
    with many runs to submit uses ``Client.start_many``), up to ``parallel`` calls at once,
    round-robin over ``addresses``; stops early at ``deadline`` (monotonic)."""
    clients = [Client(a, timeout=60) for a in addresses]
    ids: list[str] = []
    counter = iter(range(0, n, batch))

    async def lane(k: int) -> None:
        client = clients[k % len(clients)]
        for first in counter:
            if time.monotonic() > deadline:
                return
            runs = await client.start_many(workflow, [{}] * min(batch, n - first))
            ids.extend(run.id for run in runs)

    try:
        await asyncio.gather(*(lane(k) for k in range(parallel)))
    finally:
        for c in clients:
            await c.close()
    return ids


def db_query(engine: sa.Engine, sql: str, **params: Any) -> list[sa.Row[Any]]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(sql), params))


def wait_until(
    check: Callable[[], bool], deadline: float, what: str, interval: float = 0.5
) -> None:
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def vm_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0])  # kB
    return out


PROFILE: dict[str, str] = {}  # {"out": path, "seconds": "15"} when --pyspy is given


def start_pyspy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy on the coordinator for PROFILE['seconds'] s, collapsed stacks (--format raw)."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    cmd = [
        pyspy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        PROFILE.get("seconds", "15"),
        "--rate",
        "100",
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
    ]
    print("    profiling:", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------------------- scenarios


def throughput(
    env: Env, sizes: Sizes, *, workers: int, replicas: int = 1, concurrency: int, **settings: str
) -> dict[str, Any]:
    """(a)/(a'): N independent single-node executions; tasks/s from the first execution's
    created_at to the last one's ended_at (coordinator timestamps)."""
    coords = [env.coordinator(**settings) for _ in range(replicas)]
    addresses = [a for _, a in coords]
    asyncio.run(_register(addresses[0], single_wf()))
    for i in range(workers):
        env.worker(addresses[i % len(addresses)], concurrency)
    time.sleep(1.0)  # let workers register and park their first poll
    profiler = None
    if PROFILE.get("out") and env.kind == "sqlite" and workers == 1 and replicas == 1:
        profiler = start_pyspy(coords[0][0].popen.pid, Path(PROFILE["out"]))
    deadline = time.monotonic() + sizes.scenario_timeout
    t0 = time.monotonic()
    ids = asyncio.run(start_many(addresses, "single", sizes.throughput_n, deadline))
    start_wall = time.monotonic() - t0
    engine = sa.create_engine(env.sync_url())
    try:

        def done() -> bool:
            rows = db_query(engine, "SELECT count(*) FROM executions WHERE status = 'SUCCEEDED'")
            return rows[0][0] >= len(ids)

        wait_until(done, deadline, f"{len(ids)} executions to succeed")
        wall = time.monotonic() - t0
        first, last, n = db_query(
            engine,
            "SELECT min(created_at), max(ended_at), count(*) FROM executions "
            "WHERE status = 'SUCCEEDED'",
        )[0]
    finally:
        engine.dispose()
        if profiler is not None:
            try:
                profiler.wait(60)
            except subprocess.TimeoutExpired:
                profiler.kill()
                profiler.wait(5)
    span = (last - first) / 1000
    return {
        "value": n / span,
        "unit": "tasks/s",
        "n": n,
        "span_s": span,
        "client_wall_s": wall,
        "start_phase_s": start_wall,
        "workers": workers,
        "replicas": replicas,
    }


async def _register(address: str, *wfs: Workflow) -> None:
    async with Client(address) as c:
        for wf in wfs:
            await c.register_workflow(wf)


async def _sequential_runs(
    address: str, workflow: str, runs: int, deadline: float, pause: float = 0.0
) -> list[str]:
    ids: list[str] = []
    async with Client(address, timeout=60) as c:
        for _ in range(runs):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            run = await c.start_execution(workflow, {})
            done = await c.wait_for_execution(run.id, timeout=min(remaining, 120))
            if done.status != "SUCCEEDED":
                raise RuntimeError(f"{workflow} run {run.id} ended {done.status}")
            ids.append(run.id)
            if pause:
                await asyncio.sleep(pause)
    return ids


def latency(env: Env, sizes: Sizes, wf: Workflow, runs: int, *, concurrency: int) -> dict[str, Any]:
    """(b)/(c): sequential runs; created_at -> ended_at per execution (coordinator clock)."""
    _, address = env.coordinator()
    asyncio.run(_register(address, wf))
    env.worker(address, concurrency)
    time.sleep(1.0)
    deadline = time.monotonic() + sizes.scenario_timeout
    ids = asyncio.run(_sequential_runs(address, wf.name, runs, deadline))
    engine = sa.create_engine(env.sync_url())
    try:
        rows = db_query(
            engine,
            "SELECT ended_at - created_at FROM executions WHERE status = 'SUCCEEDED'",
        )
    finally:
        engine.dispose()
    ms = [float(r[0]) for r in rows]
    return {
        "value": statistics.median(ms),
        "p50_ms": statistics.median(ms),
        "p99_ms": pct(ms, 99),
        "max_ms": max(ms),
        "unit": "ms",
        "runs": len(ids),
    }


def dispatch(env: Env, sizes: Sizes, *, concurrency: int) -> dict[str, Any]:
    """(d): NODE_READY event time -> handler start (time.time() in the worker), with one
    idle worker parked in a long-poll; sequential single-node runs, 0.2 s apart."""
    _, address = env.coordinator()
    asyncio.run(_register(address, single_wf()))
    record = env.tmp / "handler-starts.txt"
    env.worker(address, concurrency, record=record)
    time.sleep(1.0)
    deadline = time.monotonic() + sizes.scenario_timeout
    ids = asyncio.run(_sequential_runs(address, "single", sizes.dispatch_runs, deadline, pause=0.2))
    starts: dict[str, float] = {}
    for line in record.read_text().splitlines():
        exec_id, _node, ts = line.split()
        starts.setdefault(exec_id, float(ts))
    engine = sa.create_engine(env.sync_url())
    try:
        rows = db_query(engine, "SELECT execution_id, time FROM events WHERE type = 'NODE_READY'")
    finally:
        engine.dispose()
    ready = {r[0]: r[1] / 1000 for r in rows}
    ms = [(starts[e] - ready[e]) * 1000 for e in ids if e in starts and e in ready]
    return {
        "value": statistics.median(ms),
        "p50_ms": statistics.median(ms),
        "p99_ms": pct(ms, 99),
        "unit": "ms",
        "runs": len(ms),
    }


def rss(env: Env, sizes: Sizes) -> dict[str, Any]:
    """(e): coordinator VmHWM after starting N single-node executions with no worker."""
    proc, address = env.coordinator()
    asyncio.run(_register(address, single_wf()))
    before = vm_status(proc.popen.pid)
    deadline = time.monotonic() + sizes.rss_timeout
    t0 = time.monotonic()
    ids = asyncio.run(start_many([address], "single", sizes.rss_n, deadline))
    elapsed = time.monotonic() - t0
    after = vm_status(proc.popen.pid)
    engine = sa.create_engine(env.sync_url())
    try:
        ready = db_query(engine, "SELECT count(*) FROM node_runs WHERE status = 'READY'")[0][0]
    finally:
        engine.dispose()
    return {
        "value": after["VmHWM"] / 1024,
        "unit": "MiB",
        "vmhwm_mib": after["VmHWM"] / 1024,
        "vmrss_mib": after["VmRSS"] / 1024,
        "idle_vmhwm_mib": before["VmHWM"] / 1024,
        "ready": ready,
        "requested": sizes.rss_n,
        "start_rate_per_s": len(ids) / elapsed,
        "capped": len(ids) < sizes.rss_n,
    }


# ---------------------------------------------------------------------------- main


def scenarios(args: argparse.Namespace, sizes: Sizes) -> list[tuple[str, str, Callable[..., Any]]]:
    c = args.concurrency
    n = sizes.throughput_n
    out: list[tuple[str, str, Callable[..., Any]]] = []
    for db in ["sqlite", "postgres"] if args.db == "both" else [args.db]:
        out += [
            (
                f"a  throughput {n}x1-node, 1 worker (tasks/s)",
                db,
                lambda e, s: throughput(e, s, workers=1, concurrency=c),
            ),
            (
                f"a  throughput {n}x1-node, 2 workers (tasks/s)",
                db,
                lambda e, s: throughput(e, s, workers=2, concurrency=c),
            ),
        ]
        if db == "postgres":
            out += [
                (
                    "a' throughput, 1 replica, 3 workers (tasks/s)",
                    db,
                    lambda e, s: throughput(e, s, workers=3, replicas=1, concurrency=c),
                ),
                (
                    "a' throughput, 3 replicas, 3 workers (tasks/s)",
                    db,
                    lambda e, s: throughput(e, s, workers=3, replicas=3, concurrency=c),
                ),
            ]
        out += [
            (
                f"b  10-node chain start->SUCCEEDED p50/p99 ({sizes.chain_runs} runs, ms)",
                db,
                lambda e, s: latency(e, s, chain_wf(), s.chain_runs, concurrency=c),
            ),
            (
                f"c  1->100->1 fan start->SUCCEEDED p50 ({sizes.fanout_runs} runs, ms)",
                db,
                lambda e, s: latency(e, s, fan_wf(), s.fanout_runs, concurrency=c),
            ),
            (
                f"d  dispatch NODE_READY->handler p50/p99 ({sizes.dispatch_runs} runs, ms)",
                db,
                lambda e, s: dispatch(e, s, concurrency=c),
            ),
            (f"e  coordinator VmHWM, {sizes.rss_n} READY tasks (MiB)", db, lambda e, s: rss(e, s)),
        ]
    return out


def fmt(result: dict[str, Any]) -> str:
    if "error" in result:
        return "ERROR: " + result["error"][:60]
    if "p99_ms" in result:
        return f"{result['p50_ms']:.0f} / {result['p99_ms']:.0f}"
    if result.get("unit") == "MiB":
        extra = f" ({result['ready']} READY, idle {result['idle_vmhwm_mib']:.0f})"
        return f"{result['value']:.0f}{extra}"
    return f"{result['value']:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--concurrency", type=int, default=32, help="per worker process")
    parser.add_argument("--only", default="", help="comma-separated scenario letters, e.g. a,d")
    parser.add_argument(
        "--pyspy",
        type=Path,
        help="profile the coordinator with py-spy during (a) 1 worker on SQLite; "
        "collapsed stacks written here",
    )
    parser.add_argument("--pyspy-seconds", default="15")
    parser.add_argument("--throughput-n", type=int, help="override N for scenario (a)")
    parser.add_argument(
        "--security",
        choices=["key", "open", "tls"],
        default="key",
        help="key: API key, plaintext (default); open: no authentication; tls: API key over TLS",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.throughput_n:
        sizes = dataclasses.replace(sizes, throughput_n=args.throughput_n)
    if args.pyspy:
        PROFILE.update(out=str(args.pyspy.resolve()), seconds=args.pyspy_seconds)

    machine = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "quick": args.quick,
    }
    print(f"machine: {machine['cores']} cores, Python {machine['python']}, {machine['platform']}")
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    results: list[dict[str, Any]] = []
    root = Path(tempfile.mkdtemp(prefix="trellis-bench-"))
    os.environ["TRELLIS_API_KEY"] = ADMIN_KEY
    SECURITY.configure(args.security, root)
    machine["security"] = args.security
    print(f"security: {args.security}")
    try:
        for name, db, fn in scenarios(args, sizes):
            if only and name.split()[0].rstrip("'") not in only and name.split()[0] not in only:
                continue
            print(f"- {name} [{db}] ...", flush=True)
            env = Env.create(db, root, name.split()[0].replace("'", "p"))
            t0 = time.monotonic()
            try:
                result = fn(env, sizes)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                result = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                env.close()
            result["seconds"] = round(time.monotonic() - t0, 1)
            print(f"    {fmt(result)}   {json.dumps(result, default=str)}", flush=True)
            results.append({"scenario": name, "db": db, **result})
    except KeyboardInterrupt:
        print("interrupted; everything started has been stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(root, ignore_errors=True)

    names = list(dict.fromkeys(r["scenario"] for r in results))
    dbs = list(dict.fromkeys(r["db"] for r in results))
    cell = {(r["scenario"], r["db"]): fmt(r) for r in results}
    w0 = max(len(n) for n in names) if names else 10
    print()
    print(f"{'scenario':<{w0}} | " + " | ".join(f"{d:<28}" for d in dbs))
    print("-" * (w0 + 31 * len(dbs)))
    for n in names:
        print(f"{n:<{w0}} | " + " | ".join(f"{cell.get((n, d), '-'):<28}" for d in dbs))
    print(f"\n{machine['cores']} cores, Python {machine['python']}, {machine['date']}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

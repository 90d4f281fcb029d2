"""Watch a real process while hostile input is thrown at it: does it stay responsive, and
how much memory does it grow by?

    async with watched(proc, grpc_health(address)) as watch:
        ...send the hostile request, expect a clear error...
    # on exit: health answered within 200 ms every time, the RSS grew by < 50 MB

``watched`` probes every ``every`` seconds with ``probe`` (an async callable that raises
or returns False when the process does not answer) under a ``budget`` deadline, samples
the process's resident memory (Linux ``/proc``) and fails the test on exit with the
slowest answer and the growth it saw. The figures are on the returned ``Watch`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.procs import Proc

Probe = Callable[[], Awaitable[bool]]

RESPONSIVE_WITHIN = 0.2  # seconds: the slowest answer a probe may take
GROWTH_LIMIT = 50 * 1024 * 1024  # bytes of resident memory


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid``."""
    with open(f"/proc/{pid}/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


def grpc_health(address: str) -> Probe:
    """A probe calling the standard gRPC health service (open to everyone) at ``address``."""
    channel = grpc.aio.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)

    async def probe() -> bool:
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    return probe


def http_health(url: str) -> Probe:
    """A probe GETting ``url`` (e.g. the gateway's /healthz) in a thread; 2xx is healthy."""

    def get() -> bool:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return bool(200 <= reply.status < 300)

    async def probe() -> bool:
        return await asyncio.to_thread(get)

    return probe


@dataclass
class Watch:
    slowest: float = 0.0  # seconds
    failures: list[str] = field(default_factory=list)
    rss_start: int = 0
    rss_peak: int = 0
    probes: int = 0

    @property
    def growth(self) -> int:
        return max(0, self.rss_peak - self.rss_start)

    def report(self) -> str:
        return (
            f"{self.probes} probes, slowest {self.slowest * 1000:.0f} ms, "
            f"memory grew {self.growth / 1e6:.1f} MB, failures: {self.failures[:3]}"
        )


@contextlib.asynccontextmanager
async def watched(
    proc: Proc,
    probe: Probe,
    *,
    every: float = 0.05,
    budget: float = RESPONSIVE_WITHIN,
    growth_limit: int = GROWTH_LIMIT,
) -> AsyncIterator[Watch]:
    """Probe ``proc`` while the body runs; on exit assert it stayed responsive and small."""
    pid = proc.popen.pid
    watch = Watch()
    for _ in range(3):  # warm up: connect the probe's channel before measuring
        await probe()
    watch.rss_start = watch.rss_peak = rss_bytes(pid)
    stop = asyncio.Event()

    async def run() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                healthy = await probe()
            except Exception as exc:  # noqa: BLE001 - any failure to answer is a finding
                watch.failures.append(f"{type(exc).__name__}: {exc}")
            else:
                if not healthy:
                    watch.failures.append("not healthy")
            watch.slowest = max(watch.slowest, time.monotonic() - started)
            watch.probes += 1
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                watch.rss_peak = max(watch.rss_peak, rss_bytes(pid))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    prober = asyncio.create_task(run())
    try:
        yield watch
        # One more round after the body, so a stall the request left behind is seen.
        await asyncio.sleep(every * 2)  # not synchronisation: lets the prober take a sample
    finally:
        stop.set()
        await prober
    assert proc.popen.poll() is None, f"{proc.name} exited:\n{proc.output()[-3000:]}"
    assert not watch.failures, f"{proc.name} did not answer: {watch.report()}"
    assert watch.slowest < budget, f"{proc.name} was slow to answer: {watch.report()}"
    assert watch.growth < growth_limit, f"{proc.name} grew too much: {watch.report()}"

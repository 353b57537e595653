"""Part of figure 12: how many admissions per second one limiter workflow sustains.

One limiter (one key) on an in-process worker, with a limit that never binds, driven straight from
the client by many concurrent callers: each admission is the ``acquire_now`` update answered "go"
and its ``release`` signal, exactly what a model call costs the limiter. The limiter continues as new
every 2,000 events as it does in production. Client, worker and dev server share this machine's
cores, so the figure is what one key sustains here, not the server's ceiling.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from temporalio.client import WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.service import RPCError

from bench._common import Mode, Progress, Result
from kernel.limits import LimitsConfig, RateLimit
from simulator.core import SimulatorConfig
from simulator.server import SimulatorServer
from worker.app import build_registry, build_worker, simulator_settings
from workflows.limiter import AcquireRequest, LimiterInput, LimiterWorkflow, ReleaseRequest, limiter_id

__all__ = ["measure"]

_COUNTS: dict[Mode, int] = {"full": 3000, "quick": 1000, "smoke": 100}
CONCURRENCY = 10
"""Callers asking at once: the server's cap on updates in flight on one workflow (dynamic config
``history.maxInFlightUpdates``, default 10); an eleventh is refused with RESOURCE_EXHAUSTED."""


async def measure(client: Any, mode: Mode, progress: Progress) -> Result:
    count = _COUNTS[mode]
    queue = f"limiter-rate-{uuid.uuid4().hex[:6]}"
    key = "bench/unbounded"
    limit = RateLimit(requests_per_second=1e9)
    with SimulatorServer(config=SimulatorConfig()) as sim:
        registry = build_registry(provider_settings=simulator_settings(sim.url))
        try:
            limits = LimitsConfig(models={key: limit})
            async with build_worker(
                client, task_queue=queue, registry=registry, limits=limits, max_concurrent_workflow_tasks=10
            ):
                first = await client.start_workflow(
                    LimiterWorkflow.run,
                    LimiterInput(key=key, limit=limit),
                    id=limiter_id(key, queue),
                    task_queue=queue,
                )
                handle = client.get_workflow_handle(first.id)  # follows the limiter's continue-as-new
                progress.note(f"one limiter: {count} admissions, {CONCURRENCY} callers at once")
                gate = asyncio.Semaphore(CONCURRENCY)
                refused = retried = 0

                async def admit(n: int) -> None:
                    nonlocal refused, retried
                    async with gate:
                        request = AcquireRequest(
                            id=f"bench-{n}", requester="bench", tokens=1, lease_s=600, limit=limit
                        )
                        while True:
                            try:
                                granted = await handle.execute_update(LimiterWorkflow.acquire_now, request)
                                break
                            except (RPCError, WorkflowUpdateRPCTimeoutOrCancelledError):
                                # An update caught by the limiter's continue-as-new: asked again, as
                                # Temporal retries limits_acquire (the same id reserves once).
                                retried += 1
                                await asyncio.sleep(0.05)
                        if not granted:
                            refused += 1
                        await handle.signal(LimiterWorkflow.release, ReleaseRequest(id=request.id))

                await asyncio.gather(*(admit(n) for n in range(20)))  # warm-up
                started = time.perf_counter()
                await asyncio.gather(*(admit(n) for n in range(20, 20 + count)))
                elapsed = time.perf_counter() - started
                latest = client.get_workflow_handle(handle.id)
                state = await latest.query("state")
                continued = (await latest.describe()).run_id != first.first_execution_run_id
                await latest.terminate("bench done")
        finally:
            await registry.aclose()
    return Result(
        name="12. admissions per second, one limiter",
        value=count / elapsed,
        unit="admissions/s",
        params={
            "admissions": count,
            "callers_at_once": CONCURRENCY,
            "not_admitted_at_once": refused,
            "updates_asked_again": retried,
            "admitted_total": state["admitted"],
            "continued_as_new": continued,
            "what": "acquire_now update + release signal per admission, one key, in-process worker",
        },
    )

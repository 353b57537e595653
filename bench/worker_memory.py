"""Figure 5: resident memory of one worker process per pipeline waiting on an approval step.

A fresh worker process per side (``bench._worker_proc``) is warmed up by running a few workflows of its
kind to completion; its VmRSS (``/proc/<pid>/status``) is then read idle, N workflows are started and
awaited until every one answers a query saying it waits, and VmRSS is read again. Per workflow =
(waiting RSS - idle RSS) / N. Baseline: the same number of minimal workflows waiting on a signal. The
worker keeps waiting workflows in its sticky cache (default ``max_cached_workflows`` = 1000), which is
what a real worker holding waiting pipelines does.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from temporalio.client import Client, WorkflowHandle

from bench._common import Mode, Progress, Result, not_measured, rss_kib
from bench._durable import durable_env
from bench._workflows import WaitingRequest
from kernel.errors import PipelineError
from kernel.pipeline import PipelineSpec, parse_pipeline
from worker.client import start_pipeline

__all__ = ["run"]

_COUNTS: dict[Mode, dict[str, int]] = {
    "full": {"workflows": 1000, "warmup": 20},
    "quick": {"workflows": 100, "warmup": 5},
    "smoke": {"workflows": 10, "warmup": 2},
}
_NAME = "5. worker memory per waiting pipeline"
_WAIT_LIMIT_S = 120.0


def approval_spec() -> PipelineSpec:
    return parse_pipeline(
        {
            "name": "bench-approval",
            "steps": [{"id": "sign_off", "type": "approval", "message": "Ship the release?"}],
            "outputs": {"decision": "{{ steps.sign_off.output.decision }}"},
        }
    )


class _WorkerProcess:
    def __init__(self, target: str, queue: str, payload_dir: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench._worker_proc", target, queue, payload_dir],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    async def ready(self) -> None:
        assert self.process.stdout is not None
        line = await asyncio.to_thread(self.process.stdout.readline)
        if line.strip() != "ready":
            raise RuntimeError(f"the worker process did not start (said {line!r})")

    def rss_kib(self) -> int:
        return rss_kib(self.process.pid)

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def _gather_limited(factories: list[Callable[[], Awaitable[Any]]], limit: int = 50) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(factory: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await factory()

    return await asyncio.gather(*(one(f) for f in factories))


async def _wait_until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    try:
        async with asyncio.timeout(_WAIT_LIMIT_S):
            while True:  # the state lives in the worker process: poll it
                if await check():
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise TimeoutError(f"{what} did not happen within {_WAIT_LIMIT_S:g}s") from None


class _Kind:
    """How to start, recognise as waiting, and release one workflow of a side."""

    def __init__(self, client: Client, queue: str, pipeline: bool) -> None:
        self.client, self.queue, self.pipeline = client, queue, pipeline

    async def start(self) -> WorkflowHandle[Any, Any]:
        if self.pipeline:
            return await start_pipeline(self.client, approval_spec(), {}, task_queue=self.queue)
        return await self.client.start_workflow(
            "BenchWaitingWorkflow",
            WaitingRequest(),
            id=f"bench-waiting-{uuid.uuid4().hex[:12]}",
            task_queue=self.queue,
            result_type=str,
        )

    async def waiting(self, handle: WorkflowHandle[Any, Any]) -> bool:
        if not self.pipeline:
            return bool(await handle.query("waiting", result_type=bool))
        status = await handle.query("status", result_type=dict)
        return any(a.get("status") == "waiting" for a in status.get("approvals") or [])

    async def release(self, handle: WorkflowHandle[Any, Any]) -> None:
        if self.pipeline:
            await handle.execute_update("approve", {"step_id": "sign_off", "by": "bench"})
        else:
            await handle.signal("approve")
        await handle.result()


async def _side(env: Any, pipeline: bool, counts: dict[str, int], progress: Progress) -> dict[str, Any]:
    label = "pipeline" if pipeline else "minimal"
    queue = f"bench-mem-{label}-{uuid.uuid4().hex[:6]}"
    worker = _WorkerProcess(env.server.target, queue, str(env.state_dir / "payloads"))
    try:
        await worker.ready()
        kind = _Kind(env.client, queue, pipeline)
        for _ in range(counts["warmup"]):
            handle = await kind.start()
            await _wait_until(partial(kind.waiting, handle), f"a warm-up {label} waiting")
            await kind.release(handle)
        idle = worker.rss_kib()
        total = counts["workflows"]
        handles: list[WorkflowHandle[Any, Any]] = []
        for number in range(0, total, 50):
            handles += await _gather_limited([kind.start for _ in range(min(50, total - number))])
            progress.step(f"{label}: started", len(handles), total)
        for waiting, handle in enumerate(handles, start=1):
            await _wait_until(partial(kind.waiting, handle), f"{label} {handle.id} waiting")
            progress.step(f"{label}: waiting", waiting, total)
        loaded = worker.rss_kib()
        await _gather_limited([partial(kind.release, h) for h in handles])
        return {"idle_kib": idle, "loaded_kib": loaded, "per_workflow_kib": (loaded - idle) / total}
    finally:
        worker.stop()


async def run(mode: Mode) -> list[Result]:
    counts = _COUNTS[mode]
    progress = Progress("5 worker memory")
    try:
        approval_spec()
    except PipelineError as exc:
        return [
            not_measured(
                _NAME,
                "KiB",
                f"the pipeline language has no approval step yet ({exc})",
                target="ratio <= 1.25",
            )
        ]
    progress.note("starting dev server and simulator")
    async with durable_env(worker=False) as env:
        minimal = await _side(env, False, counts, progress)
        try:
            pipeline = await _side(env, True, counts, progress)
        except Exception as exc:
            return [
                not_measured(
                    _NAME,
                    "KiB",
                    f"pipelines waiting on an approval could not be run ({type(exc).__name__}: {exc})",
                    target="ratio <= 1.25",
                    minimal=minimal,
                )
            ]
    return [
        Result(
            name=_NAME,
            value=pipeline["per_workflow_kib"],
            unit="KiB",
            baseline="minimal workflow waiting on a signal",
            baseline_value=minimal["per_workflow_kib"],
            params={
                "workflows": counts["workflows"],
                "warmup": counts["warmup"],
                "pipeline": pipeline,
                "minimal": minimal,
                "measure": "VmRSS of a separate worker process, delta over idle / N",
            },
        ).check(ratio_at_most=1.25)
    ]

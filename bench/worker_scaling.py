"""Figure 7: one-step pipelines per second with 1, 2 and 4 `kernelflow worker` processes.

Each worker is the production command (`kernelflow worker`, JSON logs at info into /dev/null),
started with its environment pointing at the bench's dev server and simulator, on one task queue.
Once all of them poll, the bench starts pipelines at concurrency 100 and counts completed results per
second. The dev server, the simulator, the bench client and the workers share the machine's cores, so
more processes only help while a core is idle: the figure is reported as measured, with the
machine's core count, and ratios are against one process.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

from bench._common import Mode, Progress, Result
from bench._durable import DurableEnv, durable_env, one_step_spec
from bench.durable_throughput import _batch
from worker.client import start_pipeline

__all__ = ["run"]

_COUNTS: dict[Mode, dict[str, int]] = {
    "full": {"workflows": 600, "warmup": 60},
    "quick": {"workflows": 150, "warmup": 20},
    "smoke": {"workflows": 8, "warmup": 2},
}
PROCESSES = (1, 2, 4)


def _start_workers(env: DurableEnv, queue: str, count: int) -> list[subprocess.Popen[bytes]]:
    kernelflow = str(Path(sys.executable).parent / "kernelflow")
    environ = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")},
        "TEMPORAL_ADDRESS": env.server.target,
        "KERNELFLOW_TASK_QUEUE": queue,
        "KERNELFLOW_PAYLOADS_DIR": str(env.state_dir / "payloads"),
        "KERNELFLOW_LOG_FORMAT": "json",
        "OPENAI_BASE_URL": env.simulator_url.rstrip("/") + "/v1",
        "OPENAI_API_KEY": "sim-key",
    }
    return [
        subprocess.Popen(
            [kernelflow, "worker"], env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(count)
    ]


async def _pollers(env: DurableEnv, queue: str) -> int:
    described = await env.client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=env.client.namespace,
            task_queue=TaskQueue(name=queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
    )
    return len({p.identity for p in described.pollers})


async def _measure(
    env: DurableEnv, processes: int, counts: dict[str, int], progress: Progress
) -> dict[str, Any]:
    queue = f"scale-{processes}-{uuid.uuid4().hex[:6]}"
    workers = _start_workers(env, queue, processes)
    try:
        deadline = time.monotonic() + 60
        while await _pollers(env, queue) < processes:
            if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                raise RuntimeError(f"{processes} worker processes did not all start polling")
            await asyncio.sleep(0.2)
        spec = one_step_spec()

        async def once() -> None:
            handle = await start_pipeline(env.client, spec, {}, task_queue=queue)
            result = await handle.result()
            if result.status != "completed":
                raise RuntimeError(f"pipeline did not complete: {result}")

        await _batch(once, counts["warmup"], progress, f"{processes} processes, warm-up", 0, counts["warmup"])
        wall = await _batch(
            once, counts["workflows"], progress, f"{processes} processes", 0, counts["workflows"]
        )
        return {"rate": counts["workflows"] / wall, "wall_s": round(wall, 2)}
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


async def run(mode: Mode) -> list[Result]:
    counts = _COUNTS[mode]
    progress = Progress("8 worker processes")
    progress.note("starting dev server and simulator")
    async with durable_env(worker=False) as env:
        measured = {n: await _measure(env, n, counts, progress) for n in PROCESSES}
    one = measured[1]["rate"]
    cores = os.cpu_count() or 1
    return [
        Result(
            name=f"8. throughput, {n} worker process{'es' if n > 1 else ''}",
            value=measured[n]["rate"],
            unit="workflows/s",
            baseline="1 worker process",
            baseline_value=one,
            params={
                "workflows": counts["workflows"],
                "concurrency": 100,
                "wall_s": measured[n]["wall_s"],
                "cores": cores,
                "note": "dev server, simulator, bench client and workers share these cores",
            },
        )
        for n in PROCESSES
    ]

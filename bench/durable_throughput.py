"""Figure 3: one-step pipelines completed per second at concurrency 100, against the minimal workflow.

Each side runs its workflows in two halves, ordered pipeline, baseline, baseline, pipeline, so drift
on the shared machine falls on both alike. A workflow counts when its result has come back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench._common import Mode, Progress, Result
from bench._durable import DurableEnv, durable_env
from bench.durable_latency import _minimal_once, _pipeline_once

__all__ = ["measure", "run"]

_COUNTS: dict[Mode, dict[str, int]] = {
    "full": {"workflows": 1000, "warmup": 100},
    "quick": {"workflows": 100, "warmup": 20},
    "smoke": {"workflows": 10, "warmup": 2},
}
_CONCURRENCY = 100


async def _batch(
    once: Callable[[], Awaitable[Any]], count: int, progress: Progress, what: str, offset: int, total: int
) -> float:
    remaining = count
    done = 0

    async def lane() -> None:
        nonlocal remaining, done
        while remaining > 0:
            remaining -= 1
            await once()
            done += 1
            progress.step(what, offset + done, total)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(min(_CONCURRENCY, count))))
    return time.perf_counter() - started


async def measure(env: DurableEnv, mode: Mode, progress: Progress) -> list[Result]:
    counts = _COUNTS[mode]
    half = max(counts["workflows"] // 2, 1)

    def pipeline() -> Awaitable[Any]:
        return _pipeline_once(env, local=False, eager=False)

    def minimal() -> Awaitable[Any]:
        return _minimal_once(env, local=False, eager=False)

    await _batch(pipeline, counts["warmup"], progress, "warm-up pipeline", 0, counts["warmup"])
    await _batch(minimal, counts["warmup"], progress, "warm-up minimal", 0, counts["warmup"])
    walls: dict[str, float] = {"pipeline": 0.0, "minimal": 0.0}
    done: dict[str, int] = {"pipeline": 0, "minimal": 0}
    for name in ("pipeline", "minimal", "minimal", "pipeline"):
        walls[name] += await _batch(
            pipeline if name == "pipeline" else minimal, half, progress, name, done[name], 2 * half
        )
        done[name] += half
    rate = {name: done[name] / walls[name] for name in walls}
    params: dict[str, Any] = {
        "workflows_per_side": done["pipeline"],
        "concurrency": _CONCURRENCY,
        "warmup_per_side": counts["warmup"],
        "wall_s": {name: round(wall, 2) for name, wall in walls.items()},
        "worker": "one in-process worker: max_concurrent_workflow_tasks=100, max_concurrent_activities=200",
    }
    return [
        Result(
            name="3. durable throughput, c=100",
            value=rate["pipeline"],
            unit="workflows/s",
            baseline="minimal workflow",
            baseline_value=rate["minimal"],
            params=params,
        ).check(ratio_at_least=0.95)
    ]


async def run(mode: Mode) -> list[Result]:
    progress = Progress("3 durable throughput")
    progress.note("starting dev server, simulator and worker")
    async with durable_env() as env:
        return await measure(env, mode, progress)

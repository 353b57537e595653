"""Figure 2: start-to-result latency of a one-step pipeline against a minimal hand-written workflow.

Sequential runs, alternating pipeline and baseline so drift falls on both alike, after a warm-up. Two
modes: ``standard`` (a normal workflow start and a normal activity) and ``low-latency`` (eager workflow
start with the worker on the same client, and a local activity). Same dev server, worker and simulator.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from bench._common import Mode, Progress, Result, percentile
from bench._durable import DurableEnv, durable_env, minimal_request, one_step_spec
from worker.client import start_pipeline

__all__ = ["measure", "run"]

_COUNTS: dict[Mode, dict[str, int]] = {
    "full": {"runs": 200, "warmup": 20},
    "quick": {"runs": 30, "warmup": 5},
    "smoke": {"runs": 4, "warmup": 1},
}


async def _pipeline_once(env: DurableEnv, *, local: bool, eager: bool) -> tuple[float, bool]:
    spec = one_step_spec(local_activity=local)
    started = time.perf_counter()
    handle = await start_pipeline(env.client, spec, {}, task_queue=env.task_queue, eager=eager)
    result = await handle.result()
    elapsed = time.perf_counter() - started
    if result.status != "completed" or not result.outputs.get("answer"):
        raise RuntimeError(f"the pipeline did not complete: {result}")
    return elapsed, bool(getattr(handle, "__temporal_eagerly_started", False))


async def _minimal_once(env: DurableEnv, *, local: bool, eager: bool) -> tuple[float, bool]:
    started = time.perf_counter()
    handle = await env.client.start_workflow(
        "BenchMinimalWorkflow",
        minimal_request(local_activity=local),
        id=f"bench-minimal-{uuid.uuid4().hex[:12]}",
        task_queue=env.task_queue,
        result_type=str,
        request_eager_start=eager,
    )
    text = await handle.result()
    elapsed = time.perf_counter() - started
    if not text:
        raise RuntimeError("the minimal workflow returned no text")
    return elapsed, bool(getattr(handle, "__temporal_eagerly_started", False))


async def measure(env: DurableEnv, mode: Mode, progress: Progress) -> list[Result]:
    counts = _COUNTS[mode]
    results: list[Result] = []
    for label, local, eager in (("standard", False, False), ("low-latency", True, True)):
        for _ in range(counts["warmup"]):
            await _pipeline_once(env, local=local, eager=eager)
            await _minimal_once(env, local=local, eager=eager)
        pipeline: list[float] = []
        minimal: list[float] = []
        eager_hits = {"pipeline": 0, "minimal": 0}
        for number in range(counts["runs"]):
            order = (("pipeline", _pipeline_once), ("minimal", _minimal_once))
            for name, once in order if number % 2 == 0 else order[::-1]:
                elapsed, was_eager = await once(env, local=local, eager=eager)
                (pipeline if name == "pipeline" else minimal).append(elapsed)
                eager_hits[name] += was_eager
            progress.step(f"{label} runs", number + 1, counts["runs"])
        params: dict[str, Any] = {
            "mode": label,
            "runs_per_side": counts["runs"],
            "warmup_per_side": counts["warmup"],
            "eager_start_requested": eager,
            "eagerly_started": eager_hits,
            "local_activity": local,
            "pipeline": "PipelineWorkflow via start_pipeline, one llm step (openai/gpt-4o-mini)",
            "baseline": "BenchMinimalWorkflow: one activity posting with raw httpx",
            "pipeline_ms": {
                q: round(percentile(pipeline, int(q[1:])) * 1e3, 2) for q in ("p50", "p90", "p99")
            },
            "minimal_ms": {q: round(percentile(minimal, int(q[1:])) * 1e3, 2) for q in ("p50", "p90", "p99")},
        }
        for q in (50, 99):
            results.append(
                Result(
                    name=f"2. durable latency, {label}, p{q}",
                    value=percentile(pipeline, q) * 1e3,
                    unit="ms",
                    baseline="minimal workflow",
                    baseline_value=percentile(minimal, q) * 1e3,
                    params=params,
                ).check(ratio_at_most=1.05 if label == "standard" else 1.10)
            )
    return results


async def run(mode: Mode) -> list[Result]:
    progress = Progress("2 durable latency")
    progress.note("starting dev server, simulator and worker")
    async with durable_env() as env:
        return await measure(env, mode, progress)

"""Figure 11: what publishing lifecycle events costs a pipeline.

The one-step pipeline of figure 2, once with ``events: true`` (three events: started, step completed,
completed, through the ``publish_events`` activity to NATS JetStream, drained before the close) and
once without, alternating, on the same worker, dev server, simulator and NATS server. Start-to-result
latency; the ratio is with / without.
"""

from __future__ import annotations

import time
from typing import Any

from activities.events import EventPublisher
from bench._common import Mode, Progress, Result, percentile
from bench._durable import MODEL, PROMPT, DurableEnv, durable_env
from brokers.nats import NatsBroker
from kernel.pipeline import PipelineSpec, parse_pipeline
from kernel.triggers import OutboundConfig
from worker.app import build_worker
from worker.client import start_pipeline
from worker.nats_server import NatsServer

__all__ = ["run"]

_COUNTS: dict[Mode, dict[str, int]] = {
    "full": {"runs": 200, "warmup": 20},
    "quick": {"runs": 30, "warmup": 5},
    "smoke": {"runs": 3, "warmup": 1},
}


def _spec(events: bool) -> PipelineSpec:
    data: dict[str, Any] = {
        "name": "bench-events" if events else "bench-quiet",
        "steps": [{"id": "answer", "model": f"openai/{MODEL}", "prompt": PROMPT}],
        "outputs": {"answer": "{{ steps.answer.text }}"},
    }
    if events:
        data["events"] = True
    return parse_pipeline(data)


async def _once(env: DurableEnv, spec: PipelineSpec) -> float:
    started = time.perf_counter()
    handle = await start_pipeline(env.client, spec, {}, task_queue=env.task_queue)
    result = await handle.result()
    if result.status != "completed":
        raise RuntimeError(f"the pipeline did not complete: {result}")
    return time.perf_counter() - started


async def measure(env: DurableEnv, mode: Mode, progress: Progress) -> list[Result]:
    counts = _COUNTS[mode]
    loud, quiet = _spec(True), _spec(False)
    for _ in range(counts["warmup"]):
        await _once(env, loud)
        await _once(env, quiet)
    with_events: list[float] = []
    without: list[float] = []
    for number in range(counts["runs"]):
        order = ((loud, with_events), (quiet, without))
        for spec, into in order if number % 2 == 0 else order[::-1]:
            into.append(await _once(env, spec))
        progress.step("runs", number + 1, counts["runs"])
    params: dict[str, Any] = {
        "runs_per_side": counts["runs"],
        "pipeline": "one llm step; with events: 3 lifecycle events published and drained before the close",
        "with_events_ms": {q: round(percentile(with_events, int(q[1:])) * 1e3, 2) for q in ("p50", "p99")},
        "without_ms": {q: round(percentile(without, int(q[1:])) * 1e3, 2) for q in ("p50", "p99")},
    }
    return [
        Result(
            name=f"11. pipeline latency with lifecycle events, p{q}",
            value=percentile(with_events, q) * 1e3,
            unit="ms",
            baseline="same pipeline without events",
            baseline_value=percentile(without, q) * 1e3,
            params=params,
        ).check(ratio_at_most=1.05)
        for q in (50, 99)
    ]


async def run(mode: Mode) -> list[Result]:
    progress = Progress("11 events outbound")
    progress.note("starting dev server, simulator, NATS and a worker that publishes")
    async with durable_env(worker=False) as env:
        with NatsServer(state_dir=env.state_dir, port=None) as server:
            async with NatsBroker(server.url) as broker:
                publisher = EventPublisher(
                    broker, OutboundConfig(stream="BENCH_LIFECYCLE", subject_prefix="bench")
                )
                async with build_worker(
                    env.client, task_queue=env.task_queue, registry=env.registry, events=publisher
                ):
                    return await measure(env, mode, progress)

"""Figure 6: what metrics and tracing cost, on vs off.

* per model call: the ``llm_chat`` activity called through the worker's activity interceptors
  (metrics, and the model-call span inside the SDK's activity tracing) against the same activity
  called bare, both against the simulator, alternating round by round; the ratio is the median of the
  per-round ratios;
* durable latency: a one-step pipeline started and awaited on a worker whose client has the metrics
  runtime (Prometheus endpoint on) and the tracing and metrics interceptors (spans batched to an
  exporter that drops them, so the export itself is not measured), against the same pipeline on a
  plain worker of the same process; sequential, alternating, p50 and p99.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from temporalio.testing import ActivityEnvironment
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput

from activities.llm import LlmActivities, LlmCallInput
from bench._common import Mode, Progress, Result, percentile
from bench._durable import MODEL, PROMPT, DurableEnv, durable_env, one_step_spec
from kernel.contracts import ChatRequest, UserMessage
from worker.app import build_worker, connect
from worker.client import start_pipeline
from worker.config import PayloadSettings
from worker.devserver import free_port
from worker.metrics import KernelflowMetrics, MetricsInterceptor
from worker.telemetry import build_runtime
from worker.tracing import Tracing

__all__ = ["run"]

_COUNTS: dict[Mode, dict[str, int]] = {
    "full": {"calls": 2000, "rounds": 20, "runs": 200, "warmup": 20},
    "quick": {"calls": 300, "rounds": 10, "runs": 30, "warmup": 5},
    "smoke": {"calls": 20, "rounds": 2, "runs": 3, "warmup": 1},
}


class _Dropped(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _tracing() -> Tracing:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Dropped()))
    return Tracing(provider)


class _Bare(ActivityInboundInterceptor):
    """The end of the chain: calls the activity function."""

    def __init__(self) -> None:
        pass

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        return await input.fn(*input.args)


def _chain(interceptors: Sequence[Any]) -> ActivityInboundInterceptor:
    inbound: ActivityInboundInterceptor = _Bare()
    for interceptor in reversed(interceptors):
        inbound = interceptor.intercept_activity(inbound)
    return inbound


async def _per_call(sim_url: str, registry: Any, counts: dict[str, int], progress: Progress) -> Result:
    runtime = build_runtime(metrics_bind=f"127.0.0.1:{free_port()}")
    metrics = KernelflowMetrics(runtime.metric_meter)
    tracing = _tracing()
    plain = LlmActivities(registry)
    observed = LlmActivities(registry)
    observed.observer = metrics
    on = _chain([*tracing.interceptors(), MetricsInterceptor(metrics)])
    call = LlmCallInput(
        model=f"openai/{MODEL}",
        request=ChatRequest(model=MODEL, messages=[UserMessage(content=PROMPT)]),
        step_id="answer",
        pipeline="bench",
    )
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, activity_type="llm_chat")

    def input_for(fn: Callable[..., Awaitable[Any]]) -> ExecuteActivityInput:
        return ExecuteActivityInput(fn=fn, args=[call], executor=None, headers={})

    async def side(inbound: ActivityInboundInterceptor, acts: LlmActivities, n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await inbound.execute_activity(input_for(acts.chat))
        return (time.perf_counter() - started) / n

    async def both(n: int, first_on: bool) -> tuple[float, float]:
        if first_on:
            t_on = await env.run(side, on, observed, n)
            t_off = await env.run(side, _Bare(), plain, n)
        else:
            t_off = await env.run(side, _Bare(), plain, n)
            t_on = await env.run(side, on, observed, n)
        return t_on, t_off

    await both(max(counts["calls"] // 10, 2), True)
    per_round = max(counts["calls"] // counts["rounds"], 1)
    ratios: list[float] = []
    ons: list[float] = []
    offs: list[float] = []
    for number in range(counts["rounds"]):
        t_on, t_off = await both(per_round, number % 2 == 0)
        ons.append(t_on)
        offs.append(t_off)
        ratios.append(t_on / t_off)
        progress.step("per-call rounds", number + 1, counts["rounds"])
    tracing.shutdown()
    return Result(
        name="7. observability on/off, per model call",
        value=statistics.median(ons) * 1e6,
        unit="us/call",
        baseline="same call, no interceptors",
        baseline_value=statistics.median(offs) * 1e6,
        ratio=statistics.median(ratios),
        params={
            "calls": per_round * counts["rounds"],
            "rounds": counts["rounds"],
            "upstream": f"simulator at {sim_url}",
            "on": "metrics interceptor (runtime meter, Prometheus on) + tracing interceptors + model-call span",
        },
    ).check(ratio_at_most=1.03)


async def _durable(env: DurableEnv, counts: dict[str, int], progress: Progress) -> list[Result]:
    runtime = build_runtime(metrics_bind=f"127.0.0.1:{free_port()}")
    metrics = KernelflowMetrics(runtime.metric_meter)
    tracing = _tracing()
    payloads = PayloadSettings(dir=env.state_dir / "payloads")
    observed_client = await connect(
        env.server.target,
        payloads=payloads,
        runtime=runtime,
        interceptors=[*tracing.interceptors(), MetricsInterceptor(metrics)],
    )
    observed_acts = LlmActivities(env.registry)
    observed_acts.observer = metrics
    plain_queue, observed_queue = f"plain-{uuid.uuid4().hex[:6]}", f"observed-{uuid.uuid4().hex[:6]}"
    spec = one_step_spec()

    async def once(client: Any, queue: str) -> float:
        started = time.perf_counter()
        handle = await start_pipeline(client, spec, {}, task_queue=queue)
        result = await handle.result()
        if result.status != "completed":
            raise RuntimeError(f"pipeline did not complete: {result}")
        return time.perf_counter() - started

    async with (
        build_worker(env.client, task_queue=plain_queue, registry=env.registry),
        build_worker(observed_client, task_queue=observed_queue, llm_activities=observed_acts),
    ):
        for _ in range(counts["warmup"]):
            await once(env.client, plain_queue)
            await once(observed_client, observed_queue)
        on: list[float] = []
        off: list[float] = []
        for number in range(counts["runs"]):
            order = [(observed_client, observed_queue, on), (env.client, plain_queue, off)]
            for client, queue, into in order if number % 2 == 0 else order[::-1]:
                into.append(await once(client, queue))
            progress.step("durable runs", number + 1, counts["runs"])
    tracing.shutdown()
    params = {"runs_per_side": counts["runs"], "warmup_per_side": counts["warmup"],
              "pipeline": "one llm step, standard start, workers in one process, same dev server"}  # fmt: skip
    return [
        Result(
            name=f"7. observability on/off, durable latency p{q}",
            value=percentile(on, q) * 1e3,
            unit="ms",
            baseline="same pipeline, observability off",
            baseline_value=percentile(off, q) * 1e3,
            params=params,
        ).check(ratio_at_most=1.03)
        for q in (50, 99)
    ]


async def run(mode: Mode) -> list[Result]:
    counts = _COUNTS[mode]
    progress = Progress("7 observability overhead")
    progress.note("starting dev server and simulator")
    async with durable_env(worker=False) as env:
        per_call = await _per_call(env.simulator_url, env.registry, counts, progress)
        return [per_call, *await _durable(env, counts, progress)]

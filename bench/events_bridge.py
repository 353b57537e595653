"""Figure 10: business events turned into started pipelines.

Throughput: N CloudEvents are stored on a NATS JetStream stream first, then a bridge turns them into
pipeline starts (``start`` trigger, workflow id from the business key, duplicate-rejecting policy); the
baseline makes the same N starts directly with the Temporal client, at the same concurrency as the
bridge's ``max_in_flight``. Same dev server, same run, alternating order. No worker polls the task
queue, so only starts are measured.

Latency: events published one at a time to a running bridge; event-to-started is the workflow's
start time (server clock) minus the publication time (same machine).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from bench._common import Mode, Progress, Result, percentile
from bench._durable import DurableEnv, durable_env
from brokers.nats import NatsBroker
from kernel.cloudevents import CloudEvent, encode_structured
from kernel.triggers import EventsConfig
from worker.bridge import Bridge
from worker.nats_server import NatsServer
from workflows.contract import PIPELINE_WORKFLOW, PipelineRequest

__all__ = ["run"]

_COUNTS: dict[Mode, dict[str, int]] = {
    "full": {"events": 2000, "latency": 200, "in_flight": 64},
    "quick": {"events": 300, "latency": 40, "in_flight": 64},
    "smoke": {"events": 20, "latency": 4, "in_flight": 16},
}


def _config(tag: str, in_flight: int) -> EventsConfig:
    return EventsConfig.model_validate(
        {
            "stream": f"BENCH_{tag}",
            "consumer": f"bench-{tag}",
            "dead_letter_stream": f"BENCH_DLQ_{tag}",
            "dead_letter_subject": f"benchdlq.{tag}",
            "max_in_flight": in_flight,
            "triggers": [
                {
                    "name": "paid",
                    "subject": f"bench.{tag}.paid",
                    "type": "com.shop.order.paid",
                    "start": {
                        "pipeline": "bench-order",
                        "workflow_id": f"bench-{tag}-{{{{ data.order_id }}}}",
                        "inputs": {"order_id": "{{ data.order_id }}"},
                    },
                }
            ],
        }
    )


async def _publish(broker: NatsBroker, tag: str, order_id: str) -> None:
    event = CloudEvent(
        id=f"{tag}-{order_id}", source="/bench", type="com.shop.order.paid", data={"order_id": order_id}
    )
    body, headers = encode_structured(event)
    await broker.publish(f"bench.{tag}.paid", body, headers=headers)


async def _through_bridge(env: DurableEnv, broker: NatsBroker, count: int, in_flight: int) -> float:
    tag = uuid.uuid4().hex[:8]
    config = _config(tag, in_flight)
    bridge = Bridge(env.client, broker, config, task_queue=env.task_queue)
    await broker.ensure_stream(config.stream, config.inbound_subjects())
    await asyncio.gather(*(_publish(broker, tag, str(n)) for n in range(count)))
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    await bridge.ready.wait()  # streams and consumer set up: the clock starts with consumption
    started = time.perf_counter()
    while bridge.stats["started"] < count:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    if bridge.stats["dead_lettered"] or bridge.stats["duplicate"]:
        raise RuntimeError(f"unexpected bridge outcomes: {dict(bridge.stats)}")
    return count / elapsed


async def _direct(env: DurableEnv, count: int, in_flight: int) -> float:
    tag = uuid.uuid4().hex[:8]
    slots = asyncio.Semaphore(in_flight)

    async def start(n: int) -> None:
        async with slots:
            await env.client.start_workflow(
                PIPELINE_WORKFLOW,
                PipelineRequest(pipeline_name="bench-order", inputs={"order_id": str(n)}),
                id=f"direct-{tag}-{n}",
                task_queue=env.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            )

    started = time.perf_counter()
    await asyncio.gather(*(start(n) for n in range(count)))
    return count / (time.perf_counter() - started)


async def _latency(env: DurableEnv, broker: NatsBroker, count: int, progress: Progress) -> list[float]:
    tag = uuid.uuid4().hex[:8]
    config = _config(tag, 64)
    bridge = Bridge(env.client, broker, config, task_queue=env.task_queue)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    await bridge.ready.wait()
    sent: dict[str, datetime] = {}
    for n in range(count):
        sent[str(n)] = datetime.now(UTC)
        await _publish(broker, tag, str(n))
        while bridge.stats["started"] < n + 1:  # noqa: ASYNC110
            await asyncio.sleep(0.0005)
        progress.step("latency events", n + 1, count)
    stop.set()
    await task
    latencies: list[float] = []
    for order_id, at in sent.items():
        described = await env.client.get_workflow_handle(f"bench-{tag}-{order_id}").describe()
        latencies.append((described.start_time - at).total_seconds())
    return latencies


async def measure(env: DurableEnv, broker: NatsBroker, mode: Mode, progress: Progress) -> list[Result]:
    counts = _COUNTS[mode]
    await _through_bridge(env, broker, max(4, counts["events"] // 10), counts["in_flight"])  # warm-up
    await _direct(env, max(4, counts["events"] // 10), counts["in_flight"])
    bridge_rates: list[float] = []
    direct_rates: list[float] = []
    for round_ in range(2):
        if round_ % 2 == 0:
            bridge_rates.append(await _through_bridge(env, broker, counts["events"], counts["in_flight"]))
            direct_rates.append(await _direct(env, counts["events"], counts["in_flight"]))
        else:
            direct_rates.append(await _direct(env, counts["events"], counts["in_flight"]))
            bridge_rates.append(await _through_bridge(env, broker, counts["events"], counts["in_flight"]))
        progress.step("throughput rounds", round_ + 1, 2)
    latencies = await _latency(env, broker, counts["latency"], progress)
    params: dict[str, Any] = {
        "events_per_round": counts["events"],
        "rounds": 2,
        "max_in_flight": counts["in_flight"],
        "bridge_rates": [round(r, 1) for r in bridge_rates],
        "direct_rates": [round(r, 1) for r in direct_rates],
        "baseline": "client.start_workflow at the same concurrency, same server, same run",
        "latency_events": counts["latency"],
    }
    bridge_rate = sum(bridge_rates) / len(bridge_rates)
    direct_rate = sum(direct_rates) / len(direct_rates)
    return [
        Result(
            name="10. events -> started pipelines through the bridge",
            value=bridge_rate,
            unit="events/s",
            baseline="direct client starts",
            baseline_value=direct_rate,
            params=params,
        ).check(ratio_at_least=0.90),
        Result(
            name="10. event-to-started latency, p50",
            value=percentile(latencies, 50) * 1e3,
            unit="ms",
            params=params,
        ),
        Result(
            name="10. event-to-started latency, p99",
            value=percentile(latencies, 99) * 1e3,
            unit="ms",
            params=params,
        ),
    ]


async def run(mode: Mode) -> list[Result]:
    progress = Progress("10 events bridge")
    progress.note("starting dev server, simulator and NATS (no worker: starts only)")
    async with durable_env(worker=False) as env:
        with NatsServer(state_dir=env.state_dir, port=None) as server:
            async with NatsBroker(server.url) as broker:
                return await measure(env, broker, mode, progress)

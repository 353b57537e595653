"""The bridge against a real NATS JetStream server and the real Temporal dev server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError

from brokers.nats import NatsBroker
from kernel.cloudevents import CloudEvent, decode_event, encode_binary, encode_structured
from kernel.pipeline import PipelineSpec
from kernel.registry import Registry
from kernel.triggers import EventsConfig, TriggerSpec
from worker.app import build_worker
from worker.bridge import Bridge
from worker.pipelines import PipelineCatalog

ORDER_PIPELINE = PipelineSpec.model_validate(
    {
        "name": "order-flow",
        "inputs": {"order_id": {"type": "string"}, "amount": {"type": "number"}},
        "steps": [
            {"id": "shipped", "type": "wait_event", "event": "order.shipped", "timeout_s": 600},
            {"id": "done", "type": "transform", "expression": "{'carrier': steps.shipped.output.carrier}"},
        ],
        "outputs": {"carrier": "{{ steps.done.output.carrier }}", "amount": "{{ inputs.amount }}"},
    }
)

TWO_WAITS = PipelineSpec.model_validate(
    {
        "name": "two-waits",
        "inputs": {"order_id": {"type": "string"}, "amount": {"type": "number"}},
        "steps": [
            {"id": "shipped", "type": "wait_event", "event": "order.shipped", "timeout_s": 600},
            {"id": "delivered", "type": "wait_event", "event": "order.delivered", "timeout_s": 600},
        ],
    }
)
GATED = PipelineSpec.model_validate(
    {
        "name": "gated",
        "inputs": {"order_id": {"type": "string"}, "amount": {"type": "number"}},
        "steps": [{"id": "review", "type": "approval", "timeout_s": 600}],
        "outputs": {"by": "{{ steps.review.output.by }}"},
    }
)
CATALOG = [ORDER_PIPELINE, TWO_WAITS, GATED]


def triggers(prefix: str, **extra: Any) -> EventsConfig:
    return EventsConfig.model_validate(
        {
            "stream": f"IN_{prefix}",
            "consumer": f"bridge-{prefix}",
            "dead_letter_stream": f"DLQ_{prefix}",
            "dead_letter_subject": f"dlq.{prefix}",
            "retry_delay_s": 0.2,
            "triggers": [
                {
                    "name": "paid",
                    "subject": f"{prefix}.orders.paid",
                    "type": "com.shop.order.paid",
                    "filter": "data.amount != 0",
                    "start": {
                        "pipeline": "order-flow",
                        "workflow_id": f"{prefix}-order-{{{{ data.order_id }}}}",
                        "inputs": {"order_id": "{{ data.order_id }}", "amount": "{{ data.amount }}"},
                    },
                },
                {
                    "name": "shipped",
                    "subject": f"{prefix}.orders.shipped",
                    "type": "com.shop.order.shipped",
                    "signal": {
                        "workflow_id": f"{prefix}-order-{{{{ data.order_id }}}}",
                        "event": "order.shipped",
                    },
                },
            ],
            **extra,
        }
    )


def event(type_: str, data: Any, *, id_: str | None = None) -> CloudEvent:
    return CloudEvent(id=id_ or uuid.uuid4().hex, source="/shop", type=type_, data=data)


@pytest.fixture
async def broker(nats_server: str) -> AsyncIterator[NatsBroker]:
    async with NatsBroker(nats_server) as connected:
        yield connected


@pytest.fixture
async def worker_queue(client: Client, registry: Registry) -> AsyncIterator[str]:
    queue = f"events-{uuid.uuid4().hex[:8]}"
    async with build_worker(client, task_queue=queue, registry=registry, pipelines=PipelineCatalog(CATALOG)):
        yield queue


class RunningBridge:
    def __init__(self, bridge: Bridge, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        self.bridge, self.task, self.stop = bridge, task, stop

    async def until(self, predicate: Callable[[], bool], within: float = 60) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                if self.task.done():
                    self.task.result()
                await asyncio.sleep(0.05)


@pytest.fixture
async def run_bridge(client: Client, broker: NatsBroker) -> AsyncIterator[Callable[..., Any]]:
    running: list[RunningBridge] = []

    async def start(
        config: EventsConfig, task_queue: str, *, temporal: Client | None = None
    ) -> RunningBridge:
        bridge = Bridge(
            temporal or client,
            broker,
            config,
            task_queue=task_queue,
            catalog=PipelineCatalog(CATALOG),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(bridge.run(stop))
        async with asyncio.timeout(30):
            await bridge.ready.wait()
        running.append(RunningBridge(bridge, task, stop))
        return running[-1]

    yield start
    for item in running:
        item.stop.set()
        await asyncio.wait_for(item.task, timeout=30)


async def executions(client: Client, query: str, expected: int, within: float = 30) -> list[Any]:
    """The runs matching ``query`` once visibility (which lags) shows at least ``expected`` of them."""
    async with asyncio.timeout(within):
        while True:
            runs = [w async for w in client.list_workflows(query)]
            if len(runs) >= expected:
                return runs
            await asyncio.sleep(0.2)


async def publish(broker: NatsBroker, subject: str, ce: CloudEvent, *, binary: bool = False) -> None:
    body, headers = encode_binary(ce) if binary else encode_structured(ce)
    await broker.publish(subject, body, headers=headers)


async def test_paid_starts_shipped_resumes_duplicates_start_nothing(
    client: Client, broker: NatsBroker, worker_queue: str, run_bridge: Any
) -> None:
    p = "t1" + uuid.uuid4().hex[:6]
    running = await run_bridge(triggers(p), worker_queue)
    paid = event("com.shop.order.paid", {"order_id": "42", "amount": 120})
    await publish(broker, f"{p}.orders.paid", paid)
    await publish(broker, f"{p}.orders.paid", paid)  # the same event again (a producer's retry)
    await running.until(lambda: running.bridge.stats["started"] + running.bridge.stats["duplicate"] == 2)
    assert running.bridge.stats["started"] == 1
    assert running.bridge.stats["duplicate"] == 1

    shipped = event("com.shop.order.shipped", {"order_id": "42", "carrier": "DHL"}, id_="ship-1")
    await publish(broker, f"{p}.orders.shipped", shipped, binary=True)
    handle = client.get_workflow_handle(f"{p}-order-42")
    result = await asyncio.wait_for(handle.result(), timeout=60)
    assert result["outputs"] == {"carrier": "DHL", "amount": "120"}

    # A new event with the same business key after the pipeline closed: refused as a duplicate.
    await publish(broker, f"{p}.orders.paid", event("com.shop.order.paid", {"order_id": "42", "amount": 5}))
    await running.until(lambda: running.bridge.stats["duplicate"] == 2)
    runs = await executions(client, f"WorkflowId = '{p}-order-42'", 1)
    assert len(runs) == 1
    assert runs[0].status == WorkflowExecutionStatus.COMPLETED


async def test_second_event_first_waits_for_the_pipeline(
    client: Client, broker: NatsBroker, worker_queue: str, run_bridge: Any
) -> None:
    p = "t2" + uuid.uuid4().hex[:6]
    running = await run_bridge(triggers(p), worker_queue)
    await publish(
        broker, f"{p}.orders.shipped", event("com.shop.order.shipped", {"order_id": "7", "carrier": "UPS"})
    )
    await running.until(lambda: running.bridge.stats["retry"] >= 1)
    await publish(broker, f"{p}.orders.paid", event("com.shop.order.paid", {"order_id": "7", "amount": 3}))
    await running.until(lambda: running.bridge.stats["signalled"] == 1)
    result = await asyncio.wait_for(client.get_workflow_handle(f"{p}-order-7").result(), timeout=60)
    assert result["outputs"]["carrier"] == "UPS"
    assert running.bridge.stats["signalled"] == 1


async def dead_letters(
    broker: NatsBroker, stream: str, count: int
) -> list[tuple[str, bytes, dict[str, str]]]:
    subscription = await broker.subscribe(stream, f"reader-{uuid.uuid4().hex[:6]}")
    found: list[tuple[str, bytes, dict[str, str]]] = []
    async with asyncio.timeout(30):
        while len(found) < count:
            for delivery in await subscription.fetch(count, timeout_s=1):
                found.append((delivery.subject, delivery.data, dict(delivery.headers)))
                await delivery.ack()
    await subscription.close()
    return found


async def test_bad_events_are_dead_lettered_with_reason_and_bytes(
    client: Client, broker: NatsBroker, worker_queue: str, run_bridge: Any
) -> None:
    p = "t3" + uuid.uuid4().hex[:6]
    config = triggers(p)
    config.triggers.append(
        config.triggers[0].model_copy(
            update={
                "name": "ghost",
                "subject": f"{p}.ghost",
                "start": config.triggers[0].start.model_copy(update={"pipeline": "no-such-pipeline"}),  # type: ignore[union-attr]
            }
        )
    )
    running = await run_bridge(config, worker_queue)
    not_json = b"\x00this is not a cloud event"
    await broker.publish(f"{p}.orders.paid", not_json)
    no_key = event("com.shop.order.paid", {"amount": 3})  # the workflow id template reads data.order_id
    await publish(broker, f"{p}.orders.paid", no_key)
    bad_input = event("com.shop.order.paid", {"order_id": "9", "amount": "lots"})  # amount must be a number
    await publish(broker, f"{p}.orders.paid", bad_input)
    await publish(broker, f"{p}.ghost", event("com.shop.order.paid", {"order_id": "9", "amount": 1}))
    await running.until(lambda: running.bridge.stats["dead_lettered"] == 4)
    letters = await dead_letters(broker, f"DLQ_{p}", 4)
    reasons = {data: headers["Kernelflow-Dead-Letter-Reason"] for _, data, headers in letters}
    assert "not a CloudEvents 1.0 event" in reasons[not_json]
    assert "order_id" in reasons[encode_structured(no_key)[0]]
    assert (
        "amount" in reasons[encode_structured(bad_input)[0]]
        and "number" in reasons[encode_structured(bad_input)[0]]
    )
    assert any("no pipeline 'no-such-pipeline'" in r for r in reasons.values())
    assert {s for s, _, _ in letters} == {f"dlq.{p}.{p}.orders.paid", f"dlq.{p}.{p}.ghost"}
    assert running.bridge.stats["started"] == 0
    runs = [w async for w in client.list_workflows(f"WorkflowId STARTS_WITH '{p}-'")]
    assert runs == []


async def test_in_flight_is_bounded(
    client: Client, broker: NatsBroker, worker_queue: str, run_bridge: Any
) -> None:
    p = "t4" + uuid.uuid4().hex[:6]
    running = await run_bridge(triggers(p, max_in_flight=3), worker_queue)
    for n in range(40):
        await publish(
            broker, f"{p}.orders.paid", event("com.shop.order.paid", {"order_id": str(n), "amount": 1})
        )
    await running.until(lambda: running.bridge.stats["started"] + running.bridge.stats["duplicate"] == 40)
    assert 1 <= running.bridge.peak_in_flight <= 3


async def test_filter_and_unmatched_events_are_acked_without_action(
    broker: NatsBroker, worker_queue: str, run_bridge: Any
) -> None:
    p = "t5" + uuid.uuid4().hex[:6]
    running = await run_bridge(triggers(p), worker_queue)
    await publish(broker, f"{p}.orders.paid", event("com.shop.order.paid", {"order_id": "1", "amount": 0}))
    await publish(broker, f"{p}.orders.paid", event("com.shop.order.refunded", {"order_id": "1"}))
    await running.until(lambda: running.bridge.stats["unmatched"] == 2)
    assert running.bridge.stats["started"] == 0


def test_event_round_trip_binary_and_structured() -> None:
    ce = CloudEvent(id="1", source="/shop", type="t", data={"a": [1, 2]}, traceparent="00-abc-def-01")
    assert decode_event(*encode_structured(ce)) == ce
    assert decode_event(*encode_binary(ce)) == ce.model_copy(update={"datacontenttype": "application/json"})
    assert json.loads(encode_structured(ce)[0])["specversion"] == "1.0"


async def test_temporal_outage_loses_nothing_and_starts_nothing_twice(
    tmp_path: Any, broker: NatsBroker, run_bridge: Any
) -> None:
    """Kill -9 the Temporal server while events flow, restart it on the same data, count."""
    from worker.app import connect
    from worker.devserver import DevServer, free_port

    p = "t6" + uuid.uuid4().hex[:6]
    port = free_port()
    server = DevServer(state_dir=tmp_path, port=port, headless=True)
    await server.start()
    try:
        temporal = await connect(server.target)
        running = await run_bridge(
            triggers(p, retry_delay_s=0.3, temporal_timeout_s=5), "no-worker-needed", temporal=temporal
        )
        total = 30
        for n in range(10):
            await publish(
                broker, f"{p}.orders.paid", event("com.shop.order.paid", {"order_id": str(n), "amount": 1})
            )
        # (a start whose answer was late is retried and then refused as a duplicate: still one run)
        await running.until(lambda: running.bridge.stats["started"] + running.bridge.stats["duplicate"] == 10)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)  # no goodbye
        for n in range(10, total):
            await publish(
                broker, f"{p}.orders.paid", event("com.shop.order.paid", {"order_id": str(n), "amount": 1})
            )
        await running.until(lambda: running.bridge.stats["retry"] >= 3)
        assert running.bridge.stats["started"] + running.bridge.stats["duplicate"] == 10

        server = DevServer(state_dir=tmp_path, port=port, headless=True)
        await server.start()
        await running.until(
            lambda: running.bridge.stats["started"] + running.bridge.stats["duplicate"] == total, 90
        )
        fresh = await connect(server.target)
        for n in range(total):  # none lost (describe is consistent; visibility lists lag)
            await fresh.get_workflow_handle(f"{p}-order-{n}").describe()
        runs = await executions(fresh, f"WorkflowId STARTS_WITH '{p}-'", total)
        assert len(runs) == total  # none twice
    finally:
        await server.stop()


async def test_a_redelivered_event_is_applied_once(
    client: Client, broker: NatsBroker, worker_queue: str, run_bridge: Any
) -> None:
    p = "t7" + uuid.uuid4().hex[:6]
    config = triggers(p)
    start = config.triggers[0].start
    assert start is not None
    start.pipeline = "two-waits"
    config.triggers.append(
        config.triggers[1].model_copy(
            update={
                "name": "delivered",
                "subject": f"{p}.orders.delivered",
                "type": "com.shop.order.delivered",
                "signal": config.triggers[1].signal.model_copy(update={"event": "order.delivered"}),  # type: ignore[union-attr]
            }
        )
    )
    running = await run_bridge(config, worker_queue)
    await publish(broker, f"{p}.orders.paid", event("com.shop.order.paid", {"order_id": "3", "amount": 1}))
    await running.until(lambda: running.bridge.stats["started"] == 1)
    shipped = event("com.shop.order.shipped", {"order_id": "3"}, id_="ship-3")
    await publish(broker, f"{p}.orders.shipped", shipped)
    await publish(broker, f"{p}.orders.shipped", shipped)  # stored twice: the bridge sees it twice
    await running.until(lambda: running.bridge.stats["signalled"] == 2)
    await publish(broker, f"{p}.orders.delivered", event("com.shop.order.delivered", {"order_id": "3"}))
    handle = client.get_workflow_handle(f"{p}-order-3")
    result = await asyncio.wait_for(handle.result(), timeout=60)
    assert result["status"] == "completed"
    status = await handle.query("status")
    assert status["pending_events"] == {}  # the second copy was recognised by its id, not kept


async def test_signal_with_start_starts_once_and_delivers_each_event(
    client: Client, broker: NatsBroker, worker_queue: str, run_bridge: Any
) -> None:
    p = "t8" + uuid.uuid4().hex[:6]
    config = EventsConfig.model_validate(
        {
            "stream": f"IN_{p}",
            "consumer": f"bridge-{p}",
            "dead_letter_stream": f"DLQ_{p}",
            "dead_letter_subject": f"dlq.{p}",
            "triggers": [
                {
                    "name": "note",
                    "subject": f"{p}.orders.*",
                    "signal_with_start": {
                        "pipeline": "two-waits",
                        "workflow_id": f"{p}-order-{{{{ data.order_id }}}}",
                        "inputs": {"order_id": "{{ data.order_id }}", "amount": 1},
                        "event": "{{ event.type }}",
                    },
                }
            ],
        }
    )
    running = await run_bridge(config, worker_queue)
    # The second event first: it starts the pipeline, which keeps it until its wait_event step.
    await publish(broker, f"{p}.orders.x", event("order.delivered", {"order_id": "4"}))
    await running.until(lambda: running.bridge.stats["signalled"] == 1)
    shipped = event("order.shipped", {"order_id": "4"})
    await publish(broker, f"{p}.orders.x", shipped)
    await publish(broker, f"{p}.orders.x", shipped)
    result = await asyncio.wait_for(client.get_workflow_handle(f"{p}-order-4").result(), timeout=60)
    assert result["status"] == "completed"
    runs = await executions(client, f"WorkflowId = '{p}-order-4'", 1)
    assert len(runs) == 1


async def test_update_events_decide_once_and_refusals_are_dead_lettered(
    client: Client, broker: NatsBroker, worker_queue: str, run_bridge: Any
) -> None:
    p = "t9" + uuid.uuid4().hex[:6]
    config = triggers(p)
    start = config.triggers[0].start
    assert start is not None
    start.pipeline = "gated"
    config.triggers[1] = TriggerSpec.model_validate(
        {
            "name": "decided",
            "subject": f"{p}.orders.decided",
            "update": {
                "workflow_id": f"{p}-order-{{{{ data.order_id }}}}",
                "name": "approve",
                "args": {"step_id": "{{ data.step }}", "by": "{{ data.by }}"},
            },
        }
    )
    running = await run_bridge(config, worker_queue)
    await publish(broker, f"{p}.orders.paid", event("com.shop.order.paid", {"order_id": "5", "amount": 1}))
    await running.until(lambda: running.bridge.stats["started"] == 1)
    refused = event("decision", {"order_id": "5", "step": "no-such-step", "by": "mallory"})
    await publish(broker, f"{p}.orders.decided", refused)
    await running.until(lambda: running.bridge.stats["dead_lettered"] == 1)
    approve = event("decision", {"order_id": "5", "step": "review", "by": "alice"})
    await publish(broker, f"{p}.orders.decided", approve)
    await publish(broker, f"{p}.orders.decided", approve)  # the same decision again: applied once
    await running.until(lambda: running.bridge.stats["updated"] == 2)
    result = await asyncio.wait_for(client.get_workflow_handle(f"{p}-order-5").result(), timeout=60)
    assert result["outputs"]["by"] == "alice"
    (letter,) = await dead_letters(broker, f"DLQ_{p}", 1)
    assert "refused" in letter[2]["Kernelflow-Dead-Letter-Reason"]


async def test_two_bridges_share_the_consumer_and_start_each_pipeline_once(
    client: Client, broker: NatsBroker, worker_queue: str, run_bridge: Any
) -> None:
    p = "ta" + uuid.uuid4().hex[:6]
    one = await run_bridge(triggers(p, max_in_flight=4), worker_queue)
    two = await run_bridge(triggers(p, max_in_flight=4), worker_queue)
    total = 40
    for n in range(total):
        await publish(
            broker, f"{p}.orders.paid", event("com.shop.order.paid", {"order_id": str(n), "amount": 1})
        )
    settled = ("started", "duplicate")  # a start answered late is retried and refused as a duplicate
    await one.until(lambda: sum(one.bridge.stats[k] + two.bridge.stats[k] for k in settled) == total)
    assert one.bridge.stats["started"] > 0 and two.bridge.stats["started"] > 0  # both took a share
    for n in range(total):  # each exists (describe is consistent; visibility lists lag)
        await client.get_workflow_handle(f"{p}-order-{n}").describe()
    assert len(await executions(client, f"WorkflowId STARTS_WITH '{p}-'", total)) == total  # none twice


async def test_a_broker_restart_under_the_bridge_loses_nothing(
    client: Client, worker_queue: str, tmp_path: Any
) -> None:
    from worker.nats_server import NatsServer

    p = "tb" + uuid.uuid4().hex[:6]
    server = NatsServer(state_dir=tmp_path, port=None).start()
    try:
        async with NatsBroker(server.url) as broker:
            bridge = Bridge(
                client, broker, triggers(p), task_queue=worker_queue, catalog=PipelineCatalog(CATALOG)
            )
            stop = asyncio.Event()
            task = asyncio.create_task(bridge.run(stop))
            running = RunningBridge(bridge, task, stop)
            async with asyncio.timeout(30):
                await bridge.ready.wait()
            for n in range(5):
                await publish(
                    broker,
                    f"{p}.orders.paid",
                    event("com.shop.order.paid", {"order_id": str(n), "amount": 1}),
                )
            await running.until(lambda: bridge.stats["started"] + bridge.stats["duplicate"] == 5)
            server.kill()
            server.start()  # same port, same JetStream data
            fifth = event("com.shop.order.paid", {"order_id": "5", "amount": 1})
            async with asyncio.timeout(30):
                while True:  # the publisher's connection comes back too
                    try:  # with its id as the dedup id: a retried publication is stored once
                        body, headers = encode_structured(fifth)
                        await broker.publish(f"{p}.orders.paid", body, headers=headers, dedup_id=fifth.key)
                        break
                    except Exception:
                        await asyncio.sleep(0.2)
            for n in range(6, 10):
                await publish(
                    broker,
                    f"{p}.orders.paid",
                    event("com.shop.order.paid", {"order_id": str(n), "amount": 1}),
                )
            # An event in hand when the server died is redelivered and refused as a duplicate: the
            # outcomes may exceed 10, the pipelines may not, and none may be missing.
            async with asyncio.timeout(60):
                for n in range(10):
                    while True:
                        try:
                            await client.get_workflow_handle(f"{p}-order-{n}").describe()
                            break
                        except RPCError:
                            await asyncio.sleep(0.1)
            stop.set()
            await asyncio.wait_for(task, timeout=30)
        assert bridge.stats["dead_lettered"] == 0
    finally:
        server.stop()


async def test_outcomes_are_exported_as_metrics(
    temporal_target: str, broker: NatsBroker, worker_queue: str, run_bridge: Any
) -> None:
    """Through the Temporal runtime's meter: the Prometheus exporter the worker configures shows them."""
    import httpx
    from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

    from worker.app import connect
    from worker.devserver import free_port

    port = free_port()
    runtime = Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=f"127.0.0.1:{port}")))
    base = await connect(temporal_target)
    metered = await Client.connect(temporal_target, data_converter=base.data_converter, runtime=runtime)
    p = "tm" + uuid.uuid4().hex[:6]
    running = await run_bridge(triggers(p), worker_queue, temporal=metered)
    await publish(broker, f"{p}.orders.paid", event("com.shop.order.paid", {"order_id": "1", "amount": 1}))
    await broker.publish(f"{p}.orders.paid", b"not an event")
    await running.until(
        lambda: running.bridge.stats["started"] == 1 and running.bridge.stats["dead_lettered"] == 1
    )
    async with httpx.AsyncClient() as http, asyncio.timeout(30):
        while True:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            if "kernelflow_bridge_events" in text and 'outcome="dead_lettered"' in text:
                break
            await asyncio.sleep(0.2)
    assert any('outcome="started"' in line and 'trigger="paid"' in line for line in text.splitlines())
    assert "kernelflow_bridge_in_flight" in text

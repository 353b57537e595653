"""The publish_events activity on real NATS JetStream and real Temporal: deduplicated publication,
a bus outage longer than the duplicate window, signed outbound webhooks with retries."""

from __future__ import annotations

import asyncio
import base64
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from pydantic import BaseModel
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from temporalio import workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError
from temporalio.worker import Worker

from activities.events import (
    PUBLISH_EVENTS,
    EventPublisher,
    LifecycleRecord,
    PublishEventsInput,
)
from brokers.nats import NatsBroker
from kernel.cloudevents import decode_event
from kernel.errors import ConfigurationError
from kernel.triggers import OutboundConfig
from worker.devserver import free_port
from worker.nats_server import NatsServer

SECRET = "whsec_" + base64.b64encode(b"outbound-webhook-secret-0123456").decode()


class PublishPlan(BaseModel):
    batches: list[PublishEventsInput]
    retry_span_s: float


@workflow.defn(sandboxed=False)
class PublishingWorkflow:
    """Publishes each batch in turn; a batch the bus never took is given up, and the workflow goes on."""

    @workflow.run
    async def run(self, plan: PublishPlan) -> list[str]:
        outcomes: list[str] = []
        for batch in plan.batches:
            try:
                await workflow.execute_activity(
                    PUBLISH_EVENTS,
                    batch,
                    schedule_to_close_timeout=timedelta(seconds=plan.retry_span_s),
                    start_to_close_timeout=timedelta(seconds=2),
                    retry_policy=RetryPolicy(
                        initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=1)
                    ),
                )
                outcomes.append("published")
            except ActivityError:
                outcomes.append("given up")
        return outcomes


def record(workflow_id: str, sequence: int, type_: str = "step.completed", **data: Any) -> LifecycleRecord:
    return LifecycleRecord(
        type=type_,
        sequence=sequence,
        workflow_id=workflow_id,
        run_id="r1",
        pipeline="order-flow",
        tenant="acme",
        step_id="draft" if type_.startswith("step") else None,
        time=datetime(2026, 1, 2, tzinfo=UTC),
        data=data,
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )


async def read_all(broker: NatsBroker, stream: str, subject: str) -> list[tuple[str, bytes, dict[str, str]]]:
    subscription = await broker.subscribe(stream, f"reader-{uuid.uuid4().hex[:6]}", subjects=[subject])
    found: list[tuple[str, bytes, dict[str, str]]] = []
    while batch := await subscription.fetch(100, timeout_s=1.0):
        for delivery in batch:
            found.append((delivery.subject, delivery.data, dict(delivery.headers)))
            await delivery.ack()
    await subscription.close()
    return found


@pytest.fixture
async def broker(nats_server: str) -> AsyncIterator[NatsBroker]:
    async with NatsBroker(nats_server) as connected:
        yield connected


async def run_plan(client: Client, publisher: EventPublisher, plan: PublishPlan) -> list[str]:
    queue = f"publish-{uuid.uuid4().hex[:8]}"
    async with Worker(
        client, task_queue=queue, workflows=[PublishingWorkflow], activities=[publisher.publish_events]
    ):
        result: list[str] = await client.execute_workflow(
            PublishingWorkflow.run, plan, id=f"pub-{uuid.uuid4().hex[:8]}", task_queue=queue
        )
    return result


async def test_each_event_is_published_once_across_retries_and_replays(
    client: Client, broker: NatsBroker
) -> None:
    prefix = "ev" + uuid.uuid4().hex[:6]
    config = OutboundConfig(stream=prefix.upper(), subject_prefix=prefix)
    publisher = EventPublisher(broker, config)
    wf = f"order-{uuid.uuid4().hex[:6]}"
    first = PublishEventsInput(
        events=[record(wf, 1, "pipeline.started"), record(wf, 2, usage={"total_tokens": 12})]
    )
    # The second batch repeats event 2 (a retried attempt or a replayed workflow) and adds event 3.
    second = PublishEventsInput(
        events=[record(wf, 2, usage={"total_tokens": 12}), record(wf, 3, "pipeline.completed")]
    )
    assert (
        await run_plan(client, publisher, PublishPlan(batches=[first, second], retry_span_s=30))
        == ["published"] * 2
    )

    found = await read_all(broker, config.stream, f"{prefix}.>")
    assert [s for s, _, _ in found] == [
        f"{prefix}.acme.order-flow.pipeline.started",
        f"{prefix}.acme.order-flow.step.completed",
        f"{prefix}.acme.order-flow.pipeline.completed",
    ]
    events = [decode_event(body, headers) for _, body, headers in found]
    assert [e.id for e in events] == [f"{wf}:1", f"{wf}:2", f"{wf}:3"]
    assert events[1].type == "kernelflow.step.completed"
    assert events[1].data == {"usage": {"total_tokens": 12}}
    assert events[1].extensions["traceparent"].startswith("00-0af7")
    assert events[1].extensions["kftenant"] == "acme"
    assert found[0][2]["Nats-Msg-Id"] == f"{wf}:1"


def test_a_duplicate_window_shorter_than_the_retry_span_is_refused(nats_server: str) -> None:
    with pytest.raises(ConfigurationError, match="shorter than the publisher's retry span"):
        EventPublisher(NatsBroker(nats_server), OutboundConfig(duplicate_window_s=60))


async def test_bus_outage_longer_than_the_window_neither_fails_the_workflow_nor_duplicates(
    client: Client, tmp_path: Path
) -> None:
    """Window 4 s, retry span 2 s, outage ~6 s: the publisher gives up inside the window, so even an
    event whose acknowledgement was lost cannot be stored twice."""
    server = NatsServer(state_dir=tmp_path, port=None).start()
    try:
        async with NatsBroker(server.url) as broker:
            config = OutboundConfig(stream="OUTAGE", subject_prefix="outage", duplicate_window_s=4)
            publisher = EventPublisher(broker, config, retry_span=timedelta(seconds=2))
            wf = "outage-1"
            queue = f"publish-{uuid.uuid4().hex[:8]}"
            async with Worker(
                client,
                task_queue=queue,
                workflows=[PublishingWorkflow],
                activities=[publisher.publish_events],
            ):
                before = await client.execute_workflow(
                    PublishingWorkflow.run,
                    PublishPlan(batches=[PublishEventsInput(events=[record(wf, 1)])], retry_span_s=2),
                    id=f"pub-{uuid.uuid4().hex[:8]}",
                    task_queue=queue,
                )
                server.kill()
                loop = asyncio.get_running_loop()
                outage_started = loop.time()
                during = await client.execute_workflow(
                    PublishingWorkflow.run,
                    PublishPlan(
                        batches=[PublishEventsInput(events=[record(wf, 1), record(wf, 2)])], retry_span_s=2
                    ),
                    id=f"pub-{uuid.uuid4().hex[:8]}",
                    task_queue=queue,
                )
                # Keep the bus down past the duplicate window, then bring it back on the same data.
                await asyncio.sleep(max(0.0, 6 - (loop.time() - outage_started)))
                server.start()
                found: list[Any] = []
                async with asyncio.timeout(30):
                    while True:
                        try:
                            found = await read_all(broker, "OUTAGE", "outage.>")
                            break
                        except Exception:
                            await asyncio.sleep(0.2)
        assert before == ["published"]
        assert during == ["given up"]  # the workflow completed; the outage did not fail it
        ids = [decode_event(body, headers).id for _, body, headers in found]
        assert ids == [f"{wf}:1"]
    finally:
        server.stop()


class Receiver:
    """An HTTP subscriber that fails its first ``failures`` deliveries, then verifies and keeps them."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[dict[str, Any]] = []
        self.port = free_port()
        app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        if self.failures > 0:
            self.failures -= 1
            return Response(status_code=503)
        self.received.append(
            {"body": Webhook(SECRET).verify(body, dict(request.headers)), "id": request.headers["webhook-id"]}
        )
        return Response(status_code=204)

    def __enter__(self) -> Receiver:
        self.thread.start()
        while not self.server.started:
            threading.Event().wait(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(failures=2) as running:
        yield running


async def test_outbound_webhooks_are_signed_and_retried(
    client: Client, broker: NatsBroker, receiver: Receiver
) -> None:
    prefix = "wh" + uuid.uuid4().hex[:6]
    config = OutboundConfig.model_validate(
        {
            "stream": prefix.upper(),
            "subject_prefix": prefix,
            "webhooks": [
                {
                    "url": f"http://127.0.0.1:{receiver.port}/hook",
                    "secret_env": "HOOK_SECRET",
                    "types": ["pipeline.completed"],
                }
            ],
        }
    )
    publisher = EventPublisher(broker, config, environ={"HOOK_SECRET": SECRET})
    try:
        wf = f"order-{uuid.uuid4().hex[:6]}"
        batch = PublishEventsInput(
            events=[record(wf, 1, "pipeline.started"), record(wf, 2, "pipeline.completed", cost_usd=0.01)]
        )
        assert await run_plan(client, publisher, PublishPlan(batches=[batch], retry_span_s=30)) == [
            "published"
        ]
    finally:
        await publisher.aclose()
    assert [r["id"] for r in receiver.received] == [f"{wf}:2"]  # only the subscribed type, once accepted
    assert receiver.received[0]["body"]["type"] == "kernelflow.pipeline.completed"
    assert receiver.received[0]["body"]["data"] == {"cost_usd": 0.01}
    assert len(await read_all(broker, config.stream, f"{prefix}.>")) == 2  # retries did not publish twice

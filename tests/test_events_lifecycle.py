"""Lifecycle events published by PipelineWorkflow itself (opt-in `events:`), on real NATS and Temporal."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from activities.events import EventPublisher
from brokers.nats import NatsBroker
from kernel.cloudevents import decode_event, encode_structured
from kernel.pipeline import PipelineSpec
from kernel.registry import Registry
from kernel.triggers import OutboundConfig
from simulator.server import SimulatorServer
from worker.app import build_worker, workflow_runner
from worker.client import approve, start_pipeline
from worker.nats_server import NatsServer
from worker.pipelines import PipelineCatalog
from workflows.pipeline import PipelineWorkflow


def spec(events: Any = True, name: str = "evented") -> PipelineSpec:
    data: dict[str, Any] = {
        "name": name,
        "inputs": {"who": {"type": "string"}},
        "steps": [
            {"id": "greet", "model": "openai/gpt-4o-mini", "prompt": "Say hello to {{ inputs.who }}"},
            {"id": "shape", "type": "transform", "expression": "steps.greet.output | length"},
        ],
        "outputs": {"greeting": "{{ steps.greet.output }}"},
    }
    if events is not None:
        data["events"] = events
    return PipelineSpec.model_validate(data)


async def read_all(broker: NatsBroker, stream: str) -> list[Any]:
    subscription = await broker.subscribe(stream, f"reader-{uuid.uuid4().hex[:6]}")
    events = []
    while batch := await subscription.fetch(100, timeout_s=1.0):
        for delivery in batch:
            events.append((delivery.subject, decode_event(delivery.data, delivery.headers)))
            await delivery.ack()
    await subscription.close()
    return events


@pytest.fixture
async def broker(nats_server: str) -> AsyncIterator[NatsBroker]:
    async with NatsBroker(nats_server) as connected:
        yield connected


async def test_an_opted_in_pipeline_publishes_its_lifecycle_in_order(
    client: Client, broker: NatsBroker, registry: Registry
) -> None:
    prefix = "lc" + uuid.uuid4().hex[:6]
    config = OutboundConfig(stream=prefix.upper(), subject_prefix=prefix)
    publisher = EventPublisher(broker, config)
    queue = f"lc-{uuid.uuid4().hex[:8]}"
    async with build_worker(client, task_queue=queue, registry=registry, events=publisher):
        handle = await start_pipeline(client, spec(), {"who": "Ada"}, task_queue=queue, tenant="acme")
        result = await handle.result()
    assert result.status == "completed"
    published = await read_all(broker, config.stream)
    types = [e.type for _, e in published]
    assert types == [
        "kernelflow.pipeline.started",
        "kernelflow.step.completed",
        "kernelflow.step.completed",
        "kernelflow.pipeline.completed",
    ]
    assert [e.id for _, e in published] == [f"{handle.id}:{n}" for n in range(1, 5)]
    subject, completed = published[-1]
    assert subject == f"{prefix}.acme.evented.pipeline.completed"
    assert completed.data["usage"]["total_tokens"] == result.usage.total_tokens > 0
    assert completed.data["cost_usd"] == result.cost_usd
    assert completed.extensions["kftenant"] == "acme" and completed.subject == handle.id
    assert "Hello" not in str([e.data for _, e in published])  # summaries, never the model's output

    # The run replays on today's code (tests/histories/lifecycle-events-linger.json keeps one such run;
    # lifecycle-events.json one from before the outbox lingered).
    history = await handle.fetch_history()
    replayer = Replayer(
        workflows=[PipelineWorkflow],
        data_converter=pydantic_data_converter,
        workflow_runner=workflow_runner(),
    )
    assert (await replayer.replay_workflow(history, raise_on_replay_failure=False)).replay_failure is None
    if os.environ.get("KERNELFLOW_RECORD_HISTORY"):
        target = Path(os.environ["KERNELFLOW_RECORD_HISTORY"])
        await asyncio.to_thread(target.write_text, history.to_json(), encoding="utf-8")


async def test_a_runs_first_events_gather_briefly_and_a_waiting_run_has_published_them(
    client: Client, broker: NatsBroker, registry: Registry
) -> None:
    """A workflow task is not completed while a local activity it started runs, so the outbox lets a
    run's first events gather (up to ``LINGER``, one timer per run) instead of holding back the first
    task. A run waiting for an approval has published what happened so far while it waits: the timer
    fired once, and later batches went out as they came."""
    from temporalio.api.enums.v1 import EventType

    from workflows.engine.outbox import LIFECYCLE_LINGER_PATCH

    prefix = "lg" + uuid.uuid4().hex[:6]
    config = OutboundConfig(stream=prefix.upper(), subject_prefix=prefix)
    await broker.ensure_stream(config.stream, [prefix + ".>"], duplicate_window_s=config.duplicate_window_s)
    publisher = EventPublisher(broker, config)
    gated = PipelineSpec.model_validate(
        {
            "name": "gathered",
            "events": True,
            "steps": [
                {"id": "draft", "model": "openai/gpt-4o-mini", "prompt": "Draft a reply"},
                {"id": "review", "type": "approval", "timeout_s": 600},
            ],
        }
    )
    queue = f"lg-{uuid.uuid4().hex[:8]}"
    async with build_worker(client, task_queue=queue, registry=registry, events=publisher):
        handle = await start_pipeline(client, gated, {}, task_queue=queue)
        seen: list[str] = []
        async with asyncio.timeout(60):
            while "kernelflow.approval.requested" not in seen:
                await asyncio.sleep(0.2)
                seen = [e.type for _, e in await read_all(broker, config.stream)]
        assert seen == [
            "kernelflow.pipeline.started",
            "kernelflow.step.completed",
            "kernelflow.approval.requested",
        ], seen
        assert (await handle.query("status"))["status"] == "running"  # published while it waits
        await approve(client, handle.id, "review", by="alice")
        assert (await handle.result()).status == "completed"
        history = await handle.fetch_history()
    published = await read_all(broker, config.stream)
    assert [e.id for _, e in published] == [f"{handle.id}:{n}" for n in range(1, len(published) + 1)]
    assert published[-1][1].type == "kernelflow.pipeline.completed"
    kinds = [event.event_type for event in history.events]
    markers = [
        event.marker_recorded_event_attributes.marker_name
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
    ]
    publications = markers.count("core_local_activity")
    assert kinds.count(EventType.EVENT_TYPE_TIMER_FIRED) == 1 and publications >= 2, (kinds, publications)
    patches = [
        json.loads(payload.data)["id"]
        for event in history.events
        if event.marker_recorded_event_attributes.marker_name == "core_patch"
        for payload in event.marker_recorded_event_attributes.details["patch-data"].payloads
    ]
    assert LIFECYCLE_LINGER_PATCH in patches


async def test_without_opt_in_nothing_is_published_and_without_a_broker_nothing_waits(
    client: Client, broker: NatsBroker, registry: Registry
) -> None:
    prefix = "lo" + uuid.uuid4().hex[:6]
    config = OutboundConfig(stream=prefix.upper(), subject_prefix=prefix)
    publisher = EventPublisher(broker, config)
    await broker.ensure_stream(config.stream, [prefix + ".>"])
    queue = f"lc-{uuid.uuid4().hex[:8]}"
    async with build_worker(client, task_queue=queue, registry=registry, events=publisher):
        quiet = await start_pipeline(client, spec(events=None), {"who": "Bo"}, task_queue=queue)
        assert (await quiet.result()).status == "completed"
    assert await read_all(broker, config.stream) == []
    queue = f"lc-{uuid.uuid4().hex[:8]}"
    async with build_worker(client, task_queue=queue, registry=registry):  # no events: section
        handle = await start_pipeline(client, spec(), {"who": "Cy"}, task_queue=queue)
        assert (await handle.result()).status == "completed"


async def test_registered_pipelines_follow_the_worker_default(
    client: Client, broker: NatsBroker, registry: Registry
) -> None:
    from worker.client import start_registered

    prefix = "ld" + uuid.uuid4().hex[:6]
    config = OutboundConfig(stream=prefix.upper(), subject_prefix=prefix, default=True)
    publisher = EventPublisher(broker, config)
    catalog = PipelineCatalog(
        [spec(events=None, name="plain"), spec(events=False, name="silent")], events_default=True
    )
    queue = f"lc-{uuid.uuid4().hex[:8]}"
    async with build_worker(client, task_queue=queue, registry=registry, events=publisher, pipelines=catalog):
        for name in ("plain", "silent"):
            handle = await start_registered(client, name, {"who": "Di"}, task_queue=queue)
            assert (await handle.result()).status == "completed"
    published = await read_all(broker, config.stream)
    assert {e.extensions["kfpipeline"] for _, e in published} == {"plain"}
    assert len(published) == 4


async def test_a_bus_outage_neither_fails_nor_stalls_the_steps_and_final_events_are_drained(
    client: Client, sim: SimulatorServer, registry: Registry, tmp_path: Path
) -> None:
    server = NatsServer(state_dir=tmp_path, port=None).start()
    try:
        async with NatsBroker(server.url) as broker:
            config = OutboundConfig(stream="OUTAGE_LC", subject_prefix="outage")
            await broker.ensure_stream(
                config.stream, ["outage.>"], duplicate_window_s=config.duplicate_window_s
            )
            publisher = EventPublisher(broker, config)
            server.kill()
            queue = f"lc-{uuid.uuid4().hex[:8]}"
            async with build_worker(client, task_queue=queue, registry=registry, events=publisher):
                handle = await start_pipeline(client, spec(), {"who": "Ed"}, task_queue=queue)
                # The steps run while the bus is down ...
                async with asyncio.timeout(60):
                    while True:
                        status = await handle.query("status")
                        if all(step["status"] == "completed" for step in status["steps"]):
                            break
                        await asyncio.sleep(0.1)
                # ... and the close waits for the final events, which go out once the bus is back.
                server.start()
                result = await asyncio.wait_for(handle.result(), timeout=120)
            assert result.status == "completed"
            published = await read_all(broker, config.stream)
        assert [e.id for _, e in published] == [f"{handle.id}:{n}" for n in range(1, 5)]
    finally:
        server.stop()


SCHEMAS = Path(__file__).resolve().parents[1] / "docs" / "events"


def validator(event_type: str) -> Any:
    import jsonschema

    schema = json.loads((SCHEMAS / f"{event_type}.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def test_every_lifecycle_type_has_a_schema_whose_example_validates() -> None:
    from kernel.engine import LIFECYCLE_TYPES

    assert sorted(p.stem for p in SCHEMAS.glob("kernelflow.*.json")) == sorted(
        f"kernelflow.{t}" for t in LIFECYCLE_TYPES
    )
    for event_type in LIFECYCLE_TYPES:
        check = validator(f"kernelflow.{event_type}")
        for example in check.schema["examples"]:
            check.validate(example)


async def test_published_events_match_their_schemas(
    client: Client, broker: NatsBroker, sim: SimulatorServer, registry: Registry
) -> None:
    prefix = "ls" + uuid.uuid4().hex[:6]
    config = OutboundConfig(stream=prefix.upper(), subject_prefix=prefix)
    publisher = EventPublisher(broker, config)
    sim.add_faults([{"fault": "503", "model": "gpt-4.1", "retry_after": 0.05}])
    gated = PipelineSpec.model_validate(
        {
            "name": "gated",
            "events": True,
            "inputs": {"n": {"type": "number"}},
            "steps": [
                {
                    "id": "draft",
                    "model": "openai/gpt-4.1",
                    "fallbacks": ["openai/gpt-4o-mini"],
                    "retry": {"max_attempts": 1},
                    "prompt": "Draft {{ inputs.n }}",
                },
                {"id": "review", "type": "approval", "timeout_s": 600},
            ],
        }
    )
    queue = f"ls-{uuid.uuid4().hex[:8]}"
    async with build_worker(client, task_queue=queue, registry=registry, events=publisher):
        handle = await start_pipeline(client, gated, {"n": 1}, task_queue=queue, tenant="acme")
        async with asyncio.timeout(60):
            while True:  # approve once the step waits, so approval.requested is published too
                if any(a["status"] == "waiting" for a in (await handle.query("status"))["approvals"]):
                    break
                await asyncio.sleep(0.05)
        await approve(client, handle.id, "review", by="alice")
        assert (await handle.result()).status == "completed"
        broken = await client.start_workflow(
            "PipelineWorkflow",
            {"pipeline": gated.model_dump(mode="json", exclude_none=True), "inputs": {"n": "not a number"}},
            id=f"broken-{uuid.uuid4().hex[:6]}",
            task_queue=queue,
        )
        with pytest.raises(WorkflowFailureError):
            await broken.result()
    published = [event for _, event in await read_all(broker, config.stream)]
    seen = {event.type for event in published}
    assert {
        "kernelflow.pipeline.started",
        "kernelflow.model.fallback",
        "kernelflow.step.completed",
        "kernelflow.approval.requested",
        "kernelflow.approval.decided",
        "kernelflow.pipeline.completed",
        "kernelflow.pipeline.failed",
    } <= seen
    for event in published:
        validator(event.type).validate(json.loads(encode_structured(event)[0]))


async def test_events_from_a_bridged_start_carry_the_triggering_trace(
    client: Client, broker: NatsBroker, registry: Registry
) -> None:
    from kernel.cloudevents import CloudEvent
    from kernel.triggers import EventsConfig
    from worker.bridge import Bridge

    prefix = "lt" + uuid.uuid4().hex[:6]
    config = OutboundConfig(stream=prefix.upper(), subject_prefix=prefix)
    publisher = EventPublisher(broker, config)
    catalog = PipelineCatalog([spec(name="traced")])
    events = EventsConfig.model_validate(
        {
            "triggers": [
                {
                    "name": "hello",
                    "subject": f"{prefix}.hello",
                    "start": {
                        "pipeline": "traced",
                        "workflow_id": "{{ data.id }}",
                        "inputs": {"who": "{{ data.who }}"},
                    },
                }
            ]
        }
    )
    queue = f"lt-{uuid.uuid4().hex[:8]}"
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    incoming = CloudEvent(
        id="h1",
        source="/crm",
        type="hello",
        data={"id": f"{prefix}-1", "who": "Flo"},
        traceparent=traceparent,
    )
    async with build_worker(client, task_queue=queue, registry=registry, events=publisher, pipelines=catalog):
        bridge = Bridge(client, broker, events, task_queue=queue, catalog=catalog)
        outcome = await bridge.dispatch(f"{prefix}.hello", *encode_structured(incoming))
        assert outcome.result == "started"
        assert (await client.get_workflow_handle(f"{prefix}-1").result())["status"] == "completed"
    published = await read_all(broker, config.stream)
    assert published and all(e.extensions.get("traceparent") == traceparent for _, e in published)


async def test_opted_in_content_is_encoded_like_any_payload_and_encrypted_with_the_worker(
    client: Client, broker: NatsBroker, registry: Registry, tmp_path: Path
) -> None:
    from google.protobuf import json_format
    from temporalio.api.common.v1 import Payload

    from worker.config import EncryptionSettings, PayloadSettings
    from worker.keys import FileKeyProvider, format_ring, generate_key
    from worker.storage import build_data_converter

    keys = FileKeyProvider(dir=tmp_path / "keys")
    keys.ring_path().parent.mkdir(parents=True)
    keys.ring_path().write_text(format_ring([generate_key("k1")]))
    settings = PayloadSettings(
        dir=tmp_path / "payloads",
        encryption=EncryptionSettings(enabled=True, provider="file", options={"dir": str(tmp_path / "keys")}),
    )
    converter = build_data_converter(settings)
    encrypted = Client(**{**client.config(), "data_converter": converter})
    prefix = "lx" + uuid.uuid4().hex[:6]
    config = OutboundConfig(stream=prefix.upper(), subject_prefix=prefix)
    publisher = EventPublisher(broker, config)
    queue = f"lx-{uuid.uuid4().hex[:8]}"
    async with build_worker(encrypted, task_queue=queue, registry=registry, events=publisher):
        handle = await start_pipeline(
            encrypted, spec(events={"content": True}), {"who": "Gus"}, task_queue=queue
        )
        result = await handle.result()
    published = await read_all(broker, config.stream)
    by_type = {event.type: event for _, event in published}
    greeting = result.outputs["greeting"]
    assert "Gus" in greeting
    raw = b"".join(encode_structured(event)[0] for _, event in published)
    assert b"Gus" not in raw  # the bus sees ciphertext only
    greet = next(e for _, e in published if e.extensions.get("kfstep") == "greet")
    step = greet.data["content"]
    assert base64.b64decode(step["metadata"]["encoding"]) != b"json/plain"
    (decoded,) = await converter.decode([json_format.ParseDict(step, Payload())], [str])
    assert decoded == greeting
    final = by_type["kernelflow.pipeline.completed"].data["content"]
    (outputs,) = await converter.decode([json_format.ParseDict(final, Payload())], [dict])
    assert outputs == {"greeting": greeting}
    for _, event in published:
        validator(event.type).validate(json.loads(encode_structured(event)[0]))


async def test_sequences_continue_across_continue_as_new_and_each_run_drains(
    client: Client, broker: NatsBroker, registry: Registry
) -> None:
    prefix = "lc" + uuid.uuid4().hex[:6]
    config = OutboundConfig(stream=prefix.upper(), subject_prefix=prefix)
    publisher = EventPublisher(broker, config)
    pipeline = {
        "name": "hopping",
        "events": True,
        "steps": [{"id": f"s{n}", "type": "transform", "expression": str(n)} for n in range(3)],
    }
    queue = f"lc-{uuid.uuid4().hex[:8]}"
    workflow_id = f"hopping-{uuid.uuid4().hex[:6]}"
    async with build_worker(client, task_queue=queue, registry=registry, events=publisher):
        handle = await client.start_workflow(
            "PipelineWorkflow",
            {"pipeline": pipeline, "continue_as_new_after": 1},  # a new run before every later step
            id=workflow_id,
            task_queue=queue,
        )
        result = await handle.result()
    assert result["status"] == "completed"
    published = [e for _, e in await read_all(broker, config.stream)]
    runs = {e.extensions["kfrunid"] for e in published}
    assert [e.id for e in published] == [f"{workflow_id}:{n}" for n in range(1, 6)]
    assert [e.type for e in published] == [
        "kernelflow.pipeline.started",
        *["kernelflow.step.completed"] * 3,
        "kernelflow.pipeline.completed",
    ]
    assert len(runs) == 3  # three runs, one sequence

"""Long pipelines continue as new between top-level steps and carry their state into the next run."""

from __future__ import annotations

import asyncio
import uuid

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from kernel.pipeline import parse_pipeline
from simulator.server import SimulatorServer
from workflows.pipeline import PIPELINE_WORKFLOW, PipelineRequest, PipelineResult, PipelineStatus

MODEL = "openai/gpt-4o-mini"


async def test_continue_as_new_carries_outputs_usage_events_and_routes(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    steps = [{"id": f"s{i}", "model": MODEL, "prompt": f"[[sim: tag=s{i}]] part {i}"} for i in range(6)]
    steps[1]["prompt"] += " [[sim: latency=1]]"  # the event below arrives while s1 works, before the gate
    steps.insert(3, {"id": "gate", "type": "wait_event", "event": "go"})
    spec = parse_pipeline(
        {
            "name": "long",
            "steps": steps,
            "outputs": {"first": "{{ steps.s0.output }}", "go": "{{ steps.gate.output }}"},
        }
    )
    handle = await client.start_workflow(
        PIPELINE_WORKFLOW,
        PipelineRequest(
            pipeline=spec.model_dump(mode="json", by_alias=True, exclude_none=True),
            continue_as_new_after=12,  # a few events: every step boundary continues as new
        ),
        id=f"long-{uuid.uuid4().hex[:8]}",
        task_queue=task_queue,
        result_type=PipelineResult,
    )
    # Sent once the first step has answered (so it ran on the original model) and before the gate:
    # the event is kept in the carry-over until the wait_event takes it.
    while True:
        current = await client.get_workflow_handle(handle.id).query("status", result_type=PipelineStatus)
        if current.steps[0].status == "completed":
            break
        await asyncio.sleep(0.05)
    await handle.signal("event", {"name": "go", "payload": "green light"})
    await handle.execute_update("reroute", {"routes": {MODEL: "openai/gpt-4.1-nano"}}, result_type=dict)
    result = await handle.result()

    assert result.status == "completed"
    assert result.outputs == {"first": "Simulated reply from gpt-4o-mini: part 0", "go": "green light"}
    assert [s.status for s in result.steps] == ["completed"] * 7
    assert result.usage.total_tokens == sum(s.usage.total_tokens for s in result.steps) > 0
    assert sim.stats()["by_tag"] == {f"s{i}": 1 for i in range(6)}  # nothing ran twice
    assert sim.stats()["by_model"].get("gpt-4.1-nano", 0) >= 1  # the reroute survived the new runs
    status = await client.get_workflow_handle(handle.id).query("status", result_type=PipelineStatus)
    assert status.run > 1 and status.routes == {MODEL: "openai/gpt-4.1-nano"}
    first_run = client.get_workflow_handle(handle.id, run_id=handle.result_run_id)
    kinds = [e.event_type for e in (await first_run.fetch_history()).events]
    assert kinds[-1] == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW

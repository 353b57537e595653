"""Provider state survives workflow history: a Gemini 3 tool loop in a user's workflow, on a real
Temporal server against the simulator, which refuses the second call if the signature was lost."""

from __future__ import annotations

import uuid

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from kernel.registry import Registry
from simulator.server import SimulatorServer
from tests.tool_turn_workflow import ToolTurnInput, ToolTurnResult, ToolTurnWorkflow
from worker.app import build_worker, workflow_runner


async def test_gemini_3_tool_loop_through_history_keeps_its_signature(
    client: Client, registry: Registry, sim: SimulatorServer
) -> None:
    queue = f"tool-turn-{uuid.uuid4().hex[:8]}"
    workflow_id = f"tool-turn-{uuid.uuid4().hex[:8]}"
    async with build_worker(client, task_queue=queue, registry=registry, extra_workflows=[ToolTurnWorkflow]):
        result: ToolTurnResult = await client.execute_workflow(
            ToolTurnWorkflow.run,
            ToolTurnInput(model="gemini/gemini-3-pro-preview", question="Weather in Oslo?"),
            id=workflow_id,
            task_queue=queue,
        )
    assert result.called == "get_weather" and result.signed
    assert result.answer.endswith('{"temp_c":4}')
    assert sim.stats()["requests"] == 2  # no refused call, no retry

    history = await client.get_workflow_handle(workflow_id).fetch_history()
    replayer = Replayer(
        workflows=[ToolTurnWorkflow],
        data_converter=pydantic_data_converter,
        workflow_runner=workflow_runner(),
    )
    replayed = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert replayed.replay_failure is None

"""Provider state survives workflow history: a Gemini 3 tool loop in a user's workflow, on a real
Temporal server against the simulator, which refuses the second call if the signature was lost."""

from __future__ import annotations

import json
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


async def test_a_gemini_3_agent_keeps_its_signatures_across_turns(client: Client, registry: Registry) -> None:
    """The agent step's loop sends each answered turn back as it came, so Gemini 3 (in the simulator,
    which refuses a current turn whose first call lost its signature) accepts every later turn."""
    from kernel.pipeline import parse_pipeline
    from worker.client import start_pipeline
    from worker.pipelines import PipelineCatalog

    measure = parse_pipeline(
        {
            "name": "measure",
            "inputs": {"text": {"type": "string"}},
            "steps": [{"id": "n", "type": "transform", "expression": "inputs.text | length"}],
            "outputs": {"length": "{{ steps.n.output }}"},
        }
    )
    turns = [
        {"calls": [{"name": "measure", "arguments": {"text": "hello"}}]},
        {"calls": [{"name": "measure", "arguments": {"text": "hello, world"}}]},
        {"text": "done"},
    ]
    tool = {
        "type": "pipeline",
        "name": "measure",
        "pipeline": "measure",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    }
    spec = {
        "name": "signed-agent",
        "steps": [
            {
                "id": "desk",
                "type": "agent",
                "model": "gemini/gemini-3-pro-preview",
                "prompt": f"measure twice [[sim: script='{json.dumps(turns)}']]",
                "tools": [tool],
            }
        ],
        "outputs": {"answer": "{{ steps.desk.output }}", "messages": "{{ steps.desk.messages | tojson }}"},
    }
    queue = f"signed-agent-{uuid.uuid4().hex[:8]}"
    async with build_worker(
        client, task_queue=queue, registry=registry, pipelines=PipelineCatalog([measure])
    ):
        handle = await start_pipeline(client, parse_pipeline(spec), {}, task_queue=queue)
        result = await handle.result()
    assert result.outputs["answer"] == "done"
    messages = json.loads(result.outputs["messages"])
    signed = [m for m in messages if m["role"] == "assistant" and m.get("provider_state")]
    assert len(signed) == 2 and all(m["provider_state"]["provider"] == "gemini" for m in signed)
    assert [m["content"] for m in messages if m["role"] == "tool"] == ['{"length": "5"}', '{"length": "12"}']

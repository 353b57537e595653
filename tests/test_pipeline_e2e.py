"""Pipelines end to end: real Temporal server, real worker, real HTTP to the simulator."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from kernel.errors import PipelineError
from kernel.pipeline import parse_pipeline
from kernel.provider import ProviderSettings
from simulator.server import SimulatorServer
from worker.app import build_registry, build_worker
from worker.client import follow, start_pipeline
from workflows.pipeline import (
    PIPELINE_WORKFLOW,
    PipelineRequest,
    PipelineResult,
    PipelineStatus,
    PipelineWorkflow,
)


def _spec(steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": "test-pipeline", "inputs": {"topic": {"type": "string"}}, "steps": steps, **extra}


async def _run(client: Client, spec: dict[str, Any], task_queue: str, **inputs: Any) -> PipelineResult:
    handle = await start_pipeline(
        client, parse_pipeline(spec), inputs or {"topic": "tides"}, task_queue=task_queue
    )
    return await handle.result()


async def test_happy_path_chains_steps_and_reports_usage_and_cost(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        [
            {
                "id": "outline",
                "model": "openai/gpt-4o-mini",
                "prompt": "Outline {{ inputs.topic }} [[sim: tag=outline]]",
            },
            {
                "id": "extract",
                "model": "openai/gpt-4o-mini",
                "prompt": "Extract facts from {{ steps.outline.output }}",
                "output": "json",
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "facts",
                        "schema": {
                            "type": "object",
                            "properties": {"facts": {"type": "array", "items": {"type": "string"}}},
                            "required": ["facts"],
                        },
                    },
                },
            },
            {
                "id": "write",
                "model": "openai/gpt-4.1-nano",
                "prompt": "Write about {{ steps.extract.output.facts | length }} facts",
            },
        ],
        outputs={"article": "{{ steps.write.output }}", "outline_model": "{{ steps.outline.model }}"},
    )
    result = await _run(client, spec, task_queue)

    assert result.status == "completed"
    assert result.outputs["article"] == "Simulated reply from gpt-4.1-nano: Write about 1 facts"
    assert result.outputs["outline_model"] == "openai/gpt-4o-mini"
    assert [s.status for s in result.steps] == ["completed"] * 3
    assert isinstance(result.steps[1].output, dict) and isinstance(result.steps[1].output["facts"], list)
    assert result.usage.total_tokens == sum(s.usage.total_tokens for s in result.steps) > 0
    assert result.cost_usd > 0 and result.cost_unknown_models == []
    assert sim.stats()["requests"] == 3


async def test_status_query_reports_progress_while_running(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        [
            {"id": "quick", "model": "openai/gpt-4o-mini", "prompt": "hi {{ inputs.topic }}"},
            {"id": "slow", "model": "openai/gpt-4o-mini", "prompt": "[[sim: latency=1.5]] slow one"},
        ]
    )
    handle = await start_pipeline(client, parse_pipeline(spec), {"topic": "x"}, task_queue=task_queue)
    seen: list[PipelineStatus] = []
    result = await follow(handle, seen.append, every=0.05)
    assert result.status == "completed"
    running_slow = [s for s in seen if s.current_step == "slow"]
    assert running_slow, "the status query never showed the slow step running"
    assert running_slow[0].steps[0].status == "completed" and running_slow[0].usage.total_tokens > 0


async def test_rate_limit_with_retry_after_is_waited_out(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    key = uuid.uuid4().hex
    # The retry interval is an hour: the pipeline can only finish in time if Retry-After (1 s) is honoured.
    spec = _spec(
        [
            {
                "id": "limited",
                "model": "openai/gpt-4o-mini",
                "prompt": f"[[sim: fault=429 retry_after=1 times=1 key={key} tag=limited]] {{{{ inputs.topic }}}}",
                "retry": {"max_attempts": 3, "initial_interval_s": 3600},
            }
        ]
    )
    result = await _run(client, spec, task_queue)
    assert result.status == "completed"
    assert result.steps[0].failures == []
    assert sim.stats()["by_tag"]["limited"] == 2


async def test_non_retryable_error_falls_back_without_retrying(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        [
            {
                "id": "answer",
                "model": "openai/gpt-4.1",
                "fallbacks": ["openai/gpt-4o-mini"],
                "prompt": "[[sim: fault=400 model=gpt-4.1]] {{ inputs.topic }}",
                "retry": {"max_attempts": 5, "initial_interval_s": 0.1},
            }
        ],
        outputs={"by": "{{ steps.answer.model }}"},
    )
    result = await _run(client, spec, task_queue)
    assert result.outputs["by"] == "openai/gpt-4o-mini"
    step = result.steps[0]
    assert [(f.model, f.error_type) for f in step.failures] == [("openai/gpt-4.1", "InvalidRequest")]
    assert sim.stats()["by_model"] == {"gpt-4.1": 1, "gpt-4o-mini": 1}


async def test_every_model_failing_fails_the_pipeline_naming_step_and_models(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        [
            {"id": "ok", "model": "openai/gpt-4o-mini", "prompt": "fine"},
            {
                "id": "doomed",
                "model": "openai/gpt-4.1",
                "fallbacks": ["openai/no-such-model"],
                "prompt": "[[sim: fault=401 model=gpt-4.1]] x",
                "retry": {"max_attempts": 2, "initial_interval_s": 0.1},
            },
        ]
    )
    handle = await start_pipeline(client, parse_pipeline(spec), {"topic": "x"}, task_queue=task_queue)
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "StepFailed"
    assert (
        "doomed" in cause.message
        and "AuthenticationFailed" in cause.message
        and "ModelNotFound" in cause.message
    )
    status = await handle.query("status", result_type=PipelineStatus)
    assert status.status == "failed"
    assert status.steps[0].status == "completed" and status.steps[0].output
    assert sim.stats()["by_model"]["gpt-4.1"] == 1


async def test_bad_spec_is_refused_before_start_with_a_clear_message() -> None:
    bad = _spec(
        [
            {"id": "a", "model": "openai/gpt-4o-mini", "prompt": "{{ steps.b.output }}"},
            {"id": "b", "modle": "x"},
        ]
    )
    with pytest.raises(PipelineError) as err:
        parse_pipeline(bad)
    message = str(err.value)
    assert "steps[1]" in message and "modle" in message and "unknown field" in message

    forward = _spec(
        [
            {"id": "a", "model": "openai/gpt-4o-mini", "prompt": "{{ steps.b.output }}"},
            {"id": "b", "model": "openai/gpt-4o-mini", "prompt": "x"},
        ]
    )
    with pytest.raises(PipelineError, match=r"step 'a'.*steps\.b.*does not run before it"):
        parse_pipeline(forward)


async def test_bad_inputs_never_start_a_workflow(client: Client, task_queue: str) -> None:
    spec = parse_pipeline(_spec([{"id": "a", "model": "openai/gpt-4o-mini", "prompt": "{{ inputs.topic }}"}]))
    with pytest.raises(PipelineError, match="needs input 'topic'"):
        await start_pipeline(
            client, spec, {}, task_queue=task_queue, workflow_id="never-started-" + uuid.uuid4().hex
        )
    with pytest.raises(PipelineError, match="must be of type string"):
        await start_pipeline(client, spec, {"topic": 3}, task_queue=task_queue)


async def test_bad_spec_sent_raw_fails_the_workflow_fast_instead_of_retrying(
    client: Client, task_queue: str
) -> None:
    request = PipelineRequest(pipeline={"name": "Bad Name!", "steps": []}, inputs={})
    handle = await client.start_workflow(
        PIPELINE_WORKFLOW,
        request,
        id=f"raw-{uuid.uuid4().hex}",
        task_queue=task_queue,
        result_type=PipelineResult,
    )
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "PipelineError" and cause.non_retryable
    assert "pipeline.name" in cause.message and "pipeline.steps" in cause.message


async def test_cancel_signal_stops_the_call_in_flight_and_keeps_finished_work(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        [
            {"id": "first", "model": "openai/gpt-4o-mini", "prompt": "one"},
            {"id": "stuck", "model": "openai/gpt-4o-mini", "prompt": "[[sim: fault=hang tag=stuck]] two"},
            {"id": "never", "model": "openai/gpt-4o-mini", "prompt": "three [[sim: tag=never]]"},
        ]
    )
    handle = await start_pipeline(client, parse_pipeline(spec), {"topic": "x"}, task_queue=task_queue)

    # Poll both sides each time: the status alone stops changing once the step is running, so waiting
    # for a status change could miss the moment the simulator receives the held call.
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        status = await handle.query(PipelineWorkflow.status)
        if status.current_step == "stuck" and sim.stats()["by_tag"].get("stuck"):
            break
        assert asyncio.get_running_loop().time() < deadline, f"the held call never arrived: {status}"
        await asyncio.sleep(0.05)
    await handle.signal("cancel", {"reason": "customer withdrew the ticket"})
    result = await handle.result()
    assert result.status == "cancelled" and result.reason == "customer withdrew the ticket"
    assert [s.status for s in result.steps] == ["completed", "cancelled", "pending"]
    assert result.steps[0].output
    assert "never" not in sim.stats()["by_tag"]


async def test_api_key_never_enters_the_history(client: Client, sim: SimulatorServer) -> None:
    secret = "sk-live-" + uuid.uuid4().hex
    registry = build_registry(
        provider_settings={"openai": ProviderSettings(base_url=f"{sim.url}/v1", api_key=secret)}
    )
    queue = f"secret-{uuid.uuid4().hex[:8]}"
    spec = _spec(
        [
            {"id": "ok", "model": "openai/gpt-4o-mini", "prompt": "hello {{ inputs.topic }}"},
            {
                "id": "fails_then_falls_back",
                "model": "openai/gpt-4.1",
                "fallbacks": ["openai/gpt-4o-mini"],
                "prompt": "[[sim: fault=401 model=gpt-4.1]] again",
            },
        ]
    )
    async with build_worker(client, task_queue=queue, registry=registry):
        handle = await start_pipeline(client, parse_pipeline(spec), {"topic": "x"}, task_queue=queue)
        result = await handle.result()
    await registry.aclose()
    assert result.status == "completed"
    history = await handle.fetch_history()
    # Every event as raw protobuf bytes: payloads and failure messages appear unencoded in them.
    raw = b"".join(event.SerializeToString() for event in history.events)
    assert b"gpt-4o-mini" in raw and b"AuthenticationFailed" in raw  # the history really holds the calls
    assert secret.encode() not in raw and secret[8:].encode() not in raw


async def test_result_and_status_are_plain_json_for_other_languages(client: Client, task_queue: str) -> None:
    spec = _spec([{"id": "a", "model": "openai/gpt-4o-mini", "prompt": "hi"}])
    handle = await start_pipeline(client, parse_pipeline(spec), {"topic": "x"}, task_queue=task_queue)
    await handle.result()
    raw = await client.get_workflow_handle(handle.id, result_type=dict).result()
    assert raw["status"] == "completed" and raw["steps"][0]["id"] == "a"
    json.dumps(raw)

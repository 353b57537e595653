"""A pipeline asking ``mode: batch`` of a provider that takes no batches is refused before any step runs:
by the client's checks, and by the worker when it is started any other way (the Python client without
checks, the ``temporal`` CLI with raw JSON). The message names the step, the model's provider and the
providers that do take batches."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.worker import Replayer

from kernel.errors import FailureType, PipelineError
from kernel.model_checks import batch_mode_problem, batch_providers
from kernel.pipeline import parse_pipeline
from kernel.registry import Registry
from simulator.server import SimulatorServer
from worker.app import workflow_runner
from worker.client import check_models, start_pipeline, status
from workflows.contract import PIPELINE_WORKFLOW
from workflows.engine.checks import install_spec_check
from workflows.pipeline import BATCH_REFUSED, PipelineWorkflow

pytestmark = pytest.mark.timeout(90)


def _spec(model: str, **batch: Any) -> dict[str, Any]:
    step: dict[str, Any] = {"id": "summary", "model": model, "prompt": "Sum {{ item }}", "mode": "batch"}
    if batch:
        step["batch"] = batch
    return {
        "name": "refused-batch",
        "inputs": {"docs": {"type": "array"}},
        "steps": [{"id": "each", "type": "map", "items": "{{ inputs.docs }}", "steps": [step]}],
    }


def _says_everything(message: str, provider: str) -> None:
    assert "step 'summary' has mode: batch" in message, message
    assert f"provider {provider!r} does not take batches" in message, message
    assert "providers with batch mode: gemini, openai" in message, message


def test_the_registry_knows_which_providers_take_batches(registry: Registry) -> None:
    assert batch_providers(registry) == ["gemini", "openai"]


@pytest.mark.parametrize(
    ("model", "provider", "why"),
    [
        ("anthropic/claude-sonnet-4-5", "anthropic", "carry no metadata"),
        ("bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0", "bedrock", "from S3"),
    ],
)
def test_the_client_check_refuses_a_provider_without_batches(
    registry: Registry, model: str, provider: str, why: str
) -> None:
    with pytest.raises(PipelineError) as caught:
        check_models(parse_pipeline(_spec(model)), registry)
    _says_everything(str(caught.value), provider)
    assert why in str(caught.value)


def test_fallbacks_are_checked_only_when_they_are_asked_in_batch_rounds(registry: Registry) -> None:
    realtime = _spec("openai/gpt-4o-mini")
    realtime["steps"][0]["steps"][0]["fallbacks"] = ["anthropic/claude-sonnet-4-5"]
    assert batch_mode_problem(parse_pipeline(realtime), registry) is None  # fallbacks go realtime
    rounds = _spec("openai/gpt-4o-mini", retry_failed="batch")
    rounds["steps"][0]["steps"][0]["fallbacks"] = ["anthropic/claude-sonnet-4-5"]
    problem = batch_mode_problem(parse_pipeline(rounds), registry)
    assert problem is not None
    _says_everything(problem, "anthropic")


def test_an_alias_is_followed_to_its_provider(registry: Registry) -> None:
    registry.set_alias("cheap", "anthropic/claude-haiku-4-5")
    problem = batch_mode_problem(parse_pipeline(_spec("cheap")), registry)
    assert problem is not None and "(through 'cheap')" in problem
    _says_everything(problem, "anthropic")


async def _failure(handle: WorkflowHandle[Any, Any]) -> ApplicationError:
    with pytest.raises(WorkflowFailureError) as caught:
        await asyncio.wait_for(handle.result(), 30)
    cause = caught.value.cause
    assert isinstance(cause, ApplicationError)
    return cause


async def _nothing_ran(client: Client, handle: WorkflowHandle[Any, Any]) -> None:
    history = await handle.fetch_history()
    scheduled = [e for e in history.events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED]
    assert scheduled == [], "the refused pipeline scheduled activities"
    # A query replays the refused run: the verdict comes from its marker, not from the worker again.
    assert (await status(client, handle.id)).status == "failed"
    replayer = Replayer(
        workflows=[PipelineWorkflow],
        data_converter=pydantic_data_converter,
        workflow_runner=workflow_runner(),
    )
    saved = install_spec_check(None)  # a replaying worker that could not tell
    try:
        replayed = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    finally:
        install_spec_check(saved)
    assert replayed.replay_failure is None, replayed.replay_failure


async def test_the_python_client_without_checks_gets_a_run_failed_at_once(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    handle = await start_pipeline(
        client,
        parse_pipeline(_spec("anthropic/claude-sonnet-4-5")),
        {"docs": ["a", "b"]},
        task_queue=task_queue,
    )
    cause = await _failure(handle)
    assert cause.type == FailureType.PIPELINE_ERROR and cause.non_retryable
    _says_everything(cause.message, "anthropic")
    await _nothing_ran(client, handle)
    history = await handle.fetch_history()
    markers = [e for e in history.events if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED]
    assert any(BATCH_REFUSED.encode() in e.SerializeToString() for e in markers)
    assert sim.stats()["requests"] == 0


async def test_a_supported_provider_records_no_marker(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec("openai/gpt-4o-mini", poll_s=0.2, poll_max_s=0.5)
    handle = await start_pipeline(client, parse_pipeline(spec), {"docs": ["a"]}, task_queue=task_queue)
    result = await asyncio.wait_for(handle.result(), 60)
    assert result.status == "completed"
    history = await handle.fetch_history()
    assert not any(BATCH_REFUSED.encode() in e.SerializeToString() for e in history.events)


async def test_the_temporal_cli_with_raw_json_gets_the_refusal(
    client: Client, temporal_target: str, task_queue: str, sim: SimulatorServer
) -> None:
    binary = shutil.which("temporal")
    assert binary, "the temporal CLI is not installed"
    workflow_id = f"refused-batch-{uuid.uuid4().hex[:8]}"
    raw = json.dumps({"pipeline": _spec("anthropic/claude-sonnet-4-5"), "inputs": {"docs": ["a"]}})
    done = await asyncio.to_thread(
        subprocess.run,
        [
            binary, "workflow", "start", "--type", PIPELINE_WORKFLOW, "--task-queue", task_queue,
            "--workflow-id", workflow_id, "--input", raw, "--address", temporal_target,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr or done.stdout
    handle = client.get_workflow_handle(workflow_id)
    cause = await _failure(handle)
    assert cause.type == FailureType.PIPELINE_ERROR
    _says_everything(cause.message, "anthropic")
    await _nothing_ran(client, handle)
    assert sim.stats()["requests"] == 0

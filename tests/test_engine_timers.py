"""Durable timers on the time-skipping test server: approval timeouts, sleeps, event timeouts.

The server skips time while the workflow waits on a timer, so an hour-long timeout takes no real time.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from kernel.pipeline import parse_pipeline
from kernel.registry import Registry
from worker.app import build_worker
from workflows.pipeline import PIPELINE_WORKFLOW, PipelineRequest, PipelineResult

MODEL = "openai/gpt-4o-mini"


@pytest.fixture(scope="module")
async def skipping() -> AsyncIterator[WorkflowEnvironment]:
    path = shutil.which("temporal-test-server")
    if path is None:
        pytest.fail("`temporal-test-server` is not installed in this environment (run `make setup`)")
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=path, data_converter=pydantic_data_converter
    )
    try:
        yield env
    finally:
        await env.shutdown()


async def _run(env: WorkflowEnvironment, registry: Registry, spec: dict[str, Any]) -> Any:
    queue = f"timers-{uuid.uuid4().hex[:8]}"
    async with build_worker(env.client, task_queue=queue, registry=registry):
        # The time-skipping server cannot register search attributes, so the pipeline sets none.
        handle = await env.client.start_workflow(
            PIPELINE_WORKFLOW,
            PipelineRequest(
                pipeline=parse_pipeline(spec).model_dump(mode="json", by_alias=True, exclude_none=True),
                search_attributes=False,
            ),
            id=f"{spec['name']}-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
            result_type=PipelineResult,
        )
        try:
            return await handle.result()
        except WorkflowFailureError as failure:
            return failure.cause


async def test_approval_timeout_applies_the_default_decision(
    skipping: WorkflowEnvironment, registry: Registry
) -> None:
    spec = {
        "name": "timeout-approve",
        "steps": [
            {"id": "ok", "type": "approval", "timeout_s": 3 * 86400, "default": "approve"},
            {"id": "after", "type": "transform", "expression": "steps.ok.output"},
        ],
    }
    result = await _run(skipping, registry, spec)
    assert isinstance(result, PipelineResult) and result.status == "completed"
    assert result.steps[1].output == {
        "decision": "approved",
        "by": "timeout",
        "comment": None,
        "timed_out": True,
    }


async def test_approval_timeout_with_default_reject_fails(
    skipping: WorkflowEnvironment, registry: Registry
) -> None:
    spec = {"name": "timeout-reject", "steps": [{"id": "ok", "type": "approval", "timeout_s": 3600}]}
    cause = await _run(skipping, registry, spec)
    assert isinstance(cause, ApplicationError) and cause.type == "ApprovalRejected"
    assert "timed out (default reject)" in cause.message


async def test_sleep_is_a_durable_timer(skipping: WorkflowEnvironment, registry: Registry) -> None:
    spec = {
        "name": "sleeper",
        "steps": [
            {"id": "nap", "type": "sleep", "seconds": 7 * 86400},
            {"id": "after", "model": MODEL, "prompt": "awake"},
        ],
    }
    before = await skipping.get_current_time()
    result = await _run(skipping, registry, spec)
    assert isinstance(result, PipelineResult) and result.status == "completed"
    assert (await skipping.get_current_time() - before).days >= 7


async def test_wait_event_timeout_fails_or_continues(
    skipping: WorkflowEnvironment, registry: Registry
) -> None:
    failing = {
        "name": "no-event",
        "steps": [{"id": "w", "type": "wait_event", "event": "paid", "timeout_s": 600}],
    }
    cause = await _run(skipping, registry, failing)
    assert isinstance(cause, ApplicationError) and cause.type == "EventTimeout"
    assert "'paid' did not arrive within 600s" in cause.message
    lenient = {
        "name": "no-event-ok",
        "steps": [
            {"id": "w", "type": "wait_event", "event": "paid", "timeout_s": 600, "on_timeout": "continue"},
            {"id": "t", "type": "transform", "expression": "steps.w.timed_out"},
        ],
    }
    result = await _run(skipping, registry, lenient)
    assert isinstance(result, PipelineResult) and result.steps[1].output is True

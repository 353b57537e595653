"""A step kind added from one module (``examples/wait_until_step.py``), with no other edit: specs accept
it everywhere a step may stand, and a real worker runs it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from examples.wait_until_step import WAIT_UNTIL, WaitUntilStep
from kernel.errors import PipelineError
from kernel.pipeline import STEP_TYPES, parse_pipeline, step_types
from kernel.registry import Registry
from kernel.steps import StepKind, register_step_kind
from worker.app import build_worker
from worker.client import start_pipeline


def _spec(until: str) -> dict[str, object]:
    return {
        "name": "sla",
        "inputs": {"deadline": {"type": "string"}},
        "steps": [
            {
                "id": "fan",
                "type": "parallel",
                "branches": {"wait": [{"id": "hold", "type": "wait_until", "until": until}]},
            },
            {"id": "after", "type": "transform", "expression": "steps.hold.output.waited_s >= 0"},
        ],
        "outputs": {"waited": "{{ steps.hold.output.waited_s }}"},
    }


def test_the_kind_is_in_the_table_and_validated_like_any_other() -> None:
    assert "wait_until" in step_types() and STEP_TYPES["wait_until"] is WaitUntilStep
    spec = parse_pipeline(_spec("{{ inputs.deadline }}"))
    assert isinstance(spec.step("hold"), WaitUntilStep)
    with pytest.raises(PipelineError, match=r"branches.wait\[0\] \(id 'hold'\).untill: unknown field"):
        parse_pipeline(
            {
                "name": "x",
                "steps": [
                    {
                        "id": "fan",
                        "type": "parallel",
                        "branches": {"wait": [{"id": "hold", "type": "wait_until", "untill": "x"}]},
                    }
                ],
            }
        )
    with pytest.raises(PipelineError, match=r"reads inputs\.nope, which is not declared"):
        parse_pipeline(_spec("{{ inputs.nope }}"))
    with pytest.raises(ValueError, match="already registered"):
        register_step_kind(StepKind("wait_until", WaitUntilStep, WAIT_UNTIL.handler))
    assert register_step_kind(WAIT_UNTIL) is WAIT_UNTIL  # the same kind again is harmless


async def test_a_worker_runs_the_new_kind(client: Client, registry: Registry) -> None:
    queue = f"kinds-{uuid.uuid4().hex[:8]}"
    deadline = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    async with build_worker(client, task_queue=queue, registry=registry):
        handle = await start_pipeline(
            client, parse_pipeline(_spec("{{ inputs.deadline }}")), {"deadline": deadline}, task_queue=queue
        )
        result = await handle.result()
        bad = await start_pipeline(
            client, parse_pipeline(_spec("{{ inputs.deadline }}")), {"deadline": "tomorrow"}, task_queue=queue
        )
        with pytest.raises(WorkflowFailureError) as failure:
            await bad.result()
    assert result.status == "completed"
    assert 0 < float(result.outputs["waited"]) <= 1.0
    assert [s.status for s in result.steps] == ["completed", "completed", "completed"]
    assert isinstance(failure.value.cause, ApplicationError)
    assert "step 'hold' until: 'tomorrow' is not an ISO 8601 time" in failure.value.cause.message

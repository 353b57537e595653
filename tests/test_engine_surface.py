"""The pipeline's public surface as senders meet it: malformed starts, signals and updates sent raw
from the ``temporal`` CLI fail fast and visibly; the typed client helpers drive every control; the
search attributes find pipelines by what they wait for and which models they may still call."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from kernel.errors import FailureType
from kernel.pipeline import parse_pipeline
from simulator.server import SimulatorServer
from worker import client as kf
from workflows.contract import PIPELINE_WORKFLOW, PipelineStatus

MODEL = "openai/gpt-4o-mini"


async def _temporal(target: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("temporal")
    assert binary
    done = await asyncio.to_thread(
        subprocess.run, [binary, *args, "--address", target], capture_output=True, text=True, timeout=60
    )
    if check:
        assert done.returncode == 0, done.stderr or done.stdout
    return done


async def _until(
    client: Client, workflow_id: str, check: Callable[[PipelineStatus], bool], what: str, within: float = 30
) -> PipelineStatus:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        status = await kf.status(client, workflow_id)
        if check(status):
            return status
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last status: {status.model_dump_json()}")
        await asyncio.sleep(0.05)


async def _failure(handle: WorkflowHandle[Any, Any]) -> ApplicationError:
    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(handle.result(), 30)
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError)
    return cause


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ('"a string"', "request takes an object"),
        ("[1, 2]", "request takes an object"),
        ('{"pipeline": "name: x"}', "request.pipeline: Input should be a valid dictionary"),
        ('{"pipeline_name": "ticket-triage", "input": {"ticket": "x"}}', "request.input: unknown field"),
        ('{"inputs": {}}', "names no pipeline"),
    ],
)
async def test_malformed_start_from_the_cli_fails_the_run_at_once(
    client: Client, temporal_target: str, task_queue: str, raw: str, says: str
) -> None:
    workflow_id = f"malformed-{uuid.uuid4().hex[:8]}"
    await _temporal(
        temporal_target,
        "workflow", "start",
        "--type", PIPELINE_WORKFLOW,
        "--task-queue", task_queue,
        "--workflow-id", workflow_id,
        "--input", raw,
    )  # fmt: skip
    handle = client.get_workflow_handle(workflow_id)
    cause = await _failure(handle)
    assert cause.type == FailureType.PIPELINE_ERROR
    assert says in cause.message
    assert cause.non_retryable
    status = await kf.status(client, workflow_id)  # queries still answer
    assert status.status == "failed"
    assert says in (status.error or "")


_WAITING = {
    "name": "surface",
    "steps": [
        {"id": "draft", "model": MODEL, "prompt": "[[sim: tag=draft]] Draft"},
        {"id": "ok", "type": "approval", "approvers": ["alice"]},
        {"id": "parcel", "type": "wait_event", "event": "parcel"},
        {
            "id": "send",
            "model": "openai/gpt-4.1",
            "fallbacks": ["anthropic/claude-sonnet-4-5"],
            "prompt": "Send",
        },
    ],
    "outputs": {"where": "{{ steps.parcel.output.at }}"},
}


async def test_refused_signals_are_recorded_and_updates_answer_the_sender(
    client: Client, temporal_target: str, task_queue: str, sim: SimulatorServer
) -> None:
    handle = await kf.start_pipeline(client, parse_pipeline(_WAITING), {}, task_queue=task_queue)
    await _until(client, handle.id, lambda s: any(a.status == "waiting" for a in s.approvals), "the approval")

    # Signals that cannot be applied: each is recorded with why, nothing else changes.
    for name, raw in (
        ("event", "{}"),
        ("event", '{"name": "x", "payload": 1, "data": 2}'),
        ("cancel", '"now"'),
    ):
        await _temporal(
            temporal_target, "workflow", "signal", "--workflow-id", handle.id, "--name", name, "--input", raw
        )
    status = await _until(client, handle.id, lambda s: len(s.refused) == 3, "three refusals")
    errors = [r.error for r in status.refused]
    assert "event.name: Field required" in errors[0]
    assert "event.data: unknown field" in errors[1]
    assert "cancel takes an object" in errors[2]
    assert status.status == "running"

    # The update twin refuses the same input to the sender's face, as a non-retryable error.
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await client.get_workflow_handle(handle.id).execute_update("event_update", {"payload": 1})
    cause = refused.value.cause
    assert isinstance(cause, ApplicationError)
    assert cause.type == FailureType.INVALID_INPUT and cause.non_retryable
    assert "event_update.name: Field required" in cause.message

    # An update sent without input names what it takes instead of leaking a Python TypeError.
    done = await _temporal(
        temporal_target, "workflow", "update", "execute", "--workflow-id", handle.id, "--name", "approve",
        check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "approve takes an object with fields step_id, by, comment" in done.stderr + done.stdout
    assert "positional argument" not in done.stderr + done.stdout
    with pytest.raises(WorkflowUpdateFailedError) as wrong:
        await kf.approve(client, handle.id, "ok", by="mallory")
    assert isinstance(wrong.value.cause, ApplicationError)
    assert wrong.value.cause.type == FailureType.NOT_AN_APPROVER and wrong.value.cause.non_retryable

    # The approvals inbox finds it through visibility, by step.
    async def inbox() -> list[str]:
        found = await kf.list_pipelines(client, awaiting="ok", running=True)
        return [p.workflow_id for p in found]

    await _eventually(lambda: inbox(), lambda ids: handle.id in ids, "the approval in visibility")
    decided = await kf.approve(client, handle.id, "ok", by="alice", comment="fine")
    assert decided.status == "approved"
    await _eventually(lambda: inbox(), lambda ids: handle.id not in ids, "the approval gone from visibility")

    # A business event delivered twice with one id is applied once; the answer says so.
    first = await kf.send_event(client, handle.id, "parcel", {"at": "dock 4"}, event_id="evt-1", confirm=True)
    again = await kf.send_event(client, handle.id, "parcel", {"at": "dock 9"}, event_id="evt-1", confirm=True)
    assert first is not None and first.applied
    assert again is not None and not again.applied and again.detail == "event id already applied"
    result = await handle.result()
    assert result.outputs == {"where": "dock 4"}


async def _eventually(
    probe: Callable[[], Any], check: Callable[[Any], bool], what: str, within: float = 20
) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await probe()
        if check(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last: {value!r}")
        await asyncio.sleep(0.2)


async def test_reroute_refuses_targets_the_worker_cannot_call_and_models_follow_reroutes(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    handle = await kf.start_pipeline(client, parse_pipeline(_WAITING), {}, task_queue=task_queue)
    await _until(client, handle.id, lambda s: any(a.status == "waiting" for a in s.approvals), "the approval")

    for target, says in (
        ("nosuch/model-x", "no provider named 'nosuch'"),
        ("not-an-alias", "neither 'provider/model' nor a known alias"),
    ):
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await kf.reroute(client, handle.id, {"openai/gpt-4.1": target})
        cause = refused.value.cause
        assert isinstance(cause, ApplicationError)
        assert cause.type == FailureType.INVALID_REROUTE and cause.non_retryable
        assert says in cause.message
        assert "openai" in cause.message  # names what is available
    assert (await kf.status(client, handle.id)).routes == {}

    # Running work is found by the models it may still call, and moves with a reroute.
    async def by_model(model: str) -> list[str]:
        return [p.workflow_id for p in await kf.list_pipelines(client, model=model, running=True)]

    await _eventually(lambda: by_model("openai/gpt-4.1"), lambda ids: handle.id in ids, "gpt-4.1 in models")
    assert handle.id not in await by_model(MODEL)  # the finished draft step's model is no longer listed
    routes = await kf.reroute(client, handle.id, {"openai/gpt-4.1": "openai/gpt-4o"}, by="ops")
    assert routes == {"openai/gpt-4.1": "openai/gpt-4o"}
    await _eventually(lambda: by_model("openai/gpt-4o"), lambda ids: handle.id in ids, "the rerouted model")
    assert handle.id not in await by_model("openai/gpt-4.1")
    status = await kf.status(client, handle.id)
    assert status.reroutes[-1].by == "ops"

    await kf.approve(client, handle.id, "ok", by="alice")
    await kf.send_event(client, handle.id, "parcel", {"at": "gate"})
    result = await handle.result()
    send = next(s for s in result.steps if s.id == "send")
    assert send.model == "openai/gpt-4o"


async def test_pause_resume_and_cancel_through_their_update_twins(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    handle = await kf.start_pipeline(client, parse_pipeline(_WAITING), {}, task_queue=task_queue)
    await _until(client, handle.id, lambda s: any(a.status == "waiting" for a in s.approvals), "the approval")
    paused = await kf.pause(client, handle.id, reason="audit", by="ops")
    assert paused.applied and paused.paused
    again = await kf.pause(client, handle.id)
    assert not again.applied and again.detail == "already paused"
    resumed = await kf.resume(client, handle.id)
    assert resumed.applied and not resumed.paused
    cancelled = await kf.cancel(client, handle.id, reason="no longer needed")
    assert cancelled.applied
    result = await handle.result()
    assert result.status == "cancelled" and result.reason == "no longer needed"
    with pytest.raises(RPCError, match="already completed"):
        await kf.pause(client, handle.id)  # a closed pipeline takes no control
    assert "draft" in await kf.outputs(client, handle.id)

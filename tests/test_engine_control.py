"""Driving pipelines from outside: approvals, events, pause/resume, budgets, reroutes, registered
pipelines and sub-pipelines, on a real Temporal server with the simulator."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from kernel.pipeline import parse_pipeline
from kernel.registry import Registry
from simulator.server import SimulatorServer
from worker.app import build_worker
from worker.client import (
    approve,
    decide_with_start,
    deliver_event,
    reject,
    reroute,
    send_event,
    start_pipeline,
)
from worker.pipelines import PipelineCatalog
from workflows.pipeline import PIPELINE_WORKFLOW, PipelineRequest, PipelineResult, PipelineStatus

MODEL = "openai/gpt-4o-mini"


def _spec(steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": "control-test", "steps": steps, **extra}


async def _start(
    client: Client, spec: dict[str, Any], queue: str, **inputs: Any
) -> WorkflowHandle[Any, PipelineResult]:
    return await start_pipeline(client, parse_pipeline(spec), inputs, task_queue=queue)


async def _until(
    handle: WorkflowHandle[Any, Any], check: Callable[[PipelineStatus], bool], what: str, within: float = 30
) -> PipelineStatus:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        status = await handle.query("status", result_type=PipelineStatus)
        if check(status):
            return status
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last status: {status.model_dump_json()}")
        await asyncio.sleep(0.05)


def _waiting_on(step_id: str) -> Callable[[PipelineStatus], bool]:
    return lambda s: any(a.step_id == step_id and a.status == "waiting" for a in s.approvals)


async def _failure(handle: WorkflowHandle[Any, Any]) -> ApplicationError:
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError)
    return cause


_GATE = _spec(
    [
        {"id": "draft", "model": MODEL, "prompt": "Draft a refund for {{ inputs.customer }}"},
        {
            "id": "review",
            "type": "approval",
            "message": "Send this? {{ steps.draft.output }}",
            "approvers": ["alice", "bob"],
        },
        {"id": "send", "model": MODEL, "prompt": "[[sim: tag=send]] Send it"},
    ],
    inputs={"customer": {"type": "string"}},
    outputs={"decided_by": "{{ steps.review.output.by }}"},
)


async def test_approval_by_update_with_validators_refusing_unknown_and_double_decisions(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    handle = await _start(client, _GATE, task_queue, customer="ACME")
    status = await _until(handle, _waiting_on("review"), "the approval to wait")
    review = next(a for a in status.approvals if a.step_id == "review")
    assert review.message == "Send this? Simulated reply from gpt-4o-mini: Draft a refund for ACME"
    assert "send" not in sim.stats()["by_tag"]

    with pytest.raises(WorkflowUpdateFailedError) as unknown:
        await approve(client, handle.id, "reveiw", by="alice")
    assert isinstance(unknown.value.cause, ApplicationError) and unknown.value.cause.type == "UnknownApproval"
    assert "'reveiw'" in unknown.value.cause.message and "review" in unknown.value.cause.message
    with pytest.raises(WorkflowUpdateFailedError) as stranger:
        await approve(client, handle.id, "review", by="mallory")
    assert "mallory" in str(stranger.value.cause)

    decided = await approve(client, handle.id, "review", by="alice", comment="fine")
    assert decided.status == "approved" and decided.by == "alice"
    with pytest.raises(WorkflowUpdateFailedError) as twice:
        await reject(client, handle.id, "review", by="bob")
    assert isinstance(twice.value.cause, ApplicationError) and twice.value.cause.type == "AlreadyDecided"
    assert "already approved by alice" in twice.value.cause.message

    result = await handle.result()
    assert result.status == "completed" and result.outputs["decided_by"] == "alice"
    assert result.steps[1].output == {
        "decision": "approved",
        "by": "alice",
        "comment": "fine",
        "timed_out": False,
    }
    assert sim.stats()["by_tag"]["send"] == 1
    history = await handle.fetch_history()
    accepted = [
        e for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    ]
    assert len(accepted) == 1  # refused updates leave no trace


async def test_rejection_fails_the_pipeline_naming_who_and_why(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    handle = await _start(client, _GATE, task_queue, customer="ACME")
    await _until(handle, _waiting_on("review"), "the approval to wait")
    await reject(client, handle.id, "review", by="bob", comment="wrong amount")
    cause = await _failure(handle)
    assert cause.type == "ApprovalRejected"
    assert "rejected by bob" in cause.message and "wrong amount" in cause.message
    assert "send" not in sim.stats()["by_tag"]


async def test_decision_by_update_with_start_before_the_step_is_reached(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    workflow_id = f"uws-{uuid.uuid4().hex[:8]}"
    data = {**_GATE, "steps": [*_GATE["steps"], {"id": "closed", "type": "wait_event", "event": "closed"}]}
    spec = parse_pipeline(data)
    decided = await decide_with_start(
        client, workflow_id, spec, {"customer": "ACME"}, "review", by="bob", task_queue=task_queue
    )
    assert decided.status == "approved"
    handle = client.get_workflow_handle(workflow_id, result_type=PipelineResult)
    await _until(handle, lambda s: s.waiting_for_events == ["closed"], "the pipeline to pass the approval")
    with pytest.raises(WorkflowUpdateFailedError) as again:  # the same call finds the running pipeline
        await decide_with_start(
            client, workflow_id, spec, {"customer": "ACME"}, "review", by="bob", task_queue=task_queue
        )
    assert "already approved by bob" in str(again.value.cause)
    await send_event(client, workflow_id, "closed")
    result = await handle.result()
    assert result.status == "completed" and result.outputs["decided_by"] == "bob"


_ORDER = _spec(
    [
        {"id": "paid", "type": "wait_event", "event": "order.paid"},
        {"id": "shipped", "type": "wait_event", "event": "order.shipped", "timeout_s": 120},
        {
            "id": "note",
            "model": MODEL,
            "prompt": "Order {{ steps.paid.output.order }} via {{ steps.shipped.output.carrier }}",
        },
    ],
    outputs={"note": "{{ steps.note.output }}"},
)


async def test_wait_event_by_signal_and_events_that_arrive_early_are_kept(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    handle = await _start(client, _ORDER, task_queue)
    await _until(handle, lambda s: s.waiting_for_events == ["order.paid"], "the event wait")
    await send_event(client, handle.id, "order.shipped", {"carrier": "DHL"})  # early: kept
    status = await _until(handle, lambda s: s.pending_events == {"order.shipped": 1}, "the early event")
    assert status.steps[0].status == "waiting"
    await send_event(client, handle.id, "order.paid", {"order": 7})
    result = await handle.result()
    assert result.outputs["note"] == "Simulated reply from gpt-4o-mini: Order 7 via DHL"


async def test_wait_event_by_signal_with_start(client: Client, task_queue: str, sim: SimulatorServer) -> None:
    workflow_id = f"order-{uuid.uuid4().hex[:8]}"
    spec = parse_pipeline(_ORDER)
    first = await deliver_event(
        client, workflow_id, spec, {}, "order.paid", {"order": 9}, task_queue=task_queue
    )
    second = await deliver_event(
        client, workflow_id, spec, {}, "order.shipped", {"carrier": "UPS"}, task_queue=task_queue
    )
    assert first.result_run_id == second.result_run_id  # the second delivery joined the running pipeline
    result = await second.result()
    assert result.outputs["note"] == "Simulated reply from gpt-4o-mini: Order 9 via UPS"


async def test_budget_fail_names_the_budget_and_the_amount(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        [
            {"id": "a", "model": MODEL, "prompt": "one two three four five six seven eight"},
            {"id": "b", "model": MODEL, "prompt": "[[sim: tag=b]] more"},
        ],
        budget={"max_tokens": 10},
    )
    handle = await _start(client, spec, task_queue)
    cause = await _failure(handle)
    assert cause.type == "BudgetExceeded"
    assert "over max_tokens 10" in cause.message and "tokens used" in cause.message
    assert "b" not in sim.stats()["by_tag"]


async def test_budget_pause_waits_for_resume_then_continues(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        [
            {"id": "a", "model": MODEL, "prompt": "one two three four five six seven eight"},
            {"id": "b", "model": MODEL, "prompt": "[[sim: tag=b]] more"},
        ],
        budget={"max_cost_usd": 0.0000001, "on_exceed": "pause"},
    )
    handle = await _start(client, spec, task_queue)
    status = await _until(handle, lambda s: s.paused, "the budget pause")
    assert status.pause_reason is not None and "max_cost_usd" in status.pause_reason
    assert "b" not in sim.stats()["by_tag"]
    described = await client.get_workflow_handle(handle.id).describe()
    assert described.typed_search_attributes.get(_status_key()) == "Paused"
    await handle.signal("resume", {"reason": "finance agreed", "budget": {"max_tokens": 100000}})
    result = await handle.result()
    assert result.status == "completed" and sim.stats()["by_tag"]["b"] == 1


async def test_pause_signal_holds_before_the_next_step(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        [
            {"id": "wait", "type": "wait_event", "event": "go"},
            {"id": "b", "model": MODEL, "prompt": "[[sim: tag=b]] more"},
        ]
    )
    handle = await _start(client, spec, task_queue)
    await _until(handle, lambda s: s.waiting_for_events == ["go"], "the event wait")
    await handle.signal("pause", {"reason": "incident"})
    await send_event(client, handle.id, "go")
    status = await _until(handle, lambda s: s.steps[0].status == "completed", "the event to be taken")
    assert status.paused and status.steps[1].status == "pending"
    await handle.signal("resume")
    assert (await handle.result()).status == "completed"


def _status_key() -> Any:
    from workflows.search_attributes import STATUS

    return STATUS


async def test_reroute_migrates_a_batch_of_waiting_pipelines_to_another_provider(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        [
            {"id": "hold", "type": "wait_event", "event": "go"},
            {
                "id": "answer",
                "model": "openai/gpt-4o",
                "fallbacks": ["openai/gpt-4o-mini"],
                "prompt": "hello",
            },
        ],
        outputs={"by": "{{ steps.answer.model }}"},
    )
    handles = [await _start(client, spec, task_queue) for _ in range(10)]
    for handle in handles:
        await _until(handle, lambda s: s.waiting_for_events == ["go"], "the batch to wait")
    with pytest.raises(WorkflowUpdateFailedError) as bad:
        await reroute(client, handles[0].id, {"openai/gpt-4o": "anthropic claude"})
    assert "'anthropic claude'" in str(bad.value.cause)
    routes = {"openai/gpt-4o": "anthropic/claude-sonnet-4-5"}
    for handle in handles:
        assert await reroute(client, handle.id, routes, reason="openai incident") == routes
        await send_event(client, handle.id, "go")
    results = [await handle.result() for handle in handles]
    assert all(r.status == "completed" and r.outputs["by"] == "anthropic/claude-sonnet-4-5" for r in results)
    assert sim.stats()["by_model"] == {"claude-sonnet-4-5": 10}
    status = await handles[0].query("status", result_type=PipelineStatus)
    assert status.routes == routes and status.reroutes[0].reason == "openai incident"


async def test_registered_pipeline_by_name_and_sub_pipelines(
    client: Client, registry: Registry, sim: SimulatorServer
) -> None:
    greeter = parse_pipeline(
        {
            "name": "greeter",
            "version": 2,
            "inputs": {"who": {"type": "string"}},
            "steps": [{"id": "greet", "model": MODEL, "prompt": "[[sim: tag=greet]] Greet {{ inputs.who }}"}],
            "outputs": {"text": "{{ steps.greet.output }}"},
        }
    )
    old = greeter.model_copy(update={"version": 1})
    parent = _spec(
        [
            {
                "id": "by_name",
                "type": "pipeline",
                "pipeline": "greeter",
                "inputs": {"who": "{{ inputs.who }}"},
            },
            {
                "id": "inline",
                "type": "pipeline",
                "spec": {
                    "name": "shout",
                    "inputs": {"t": {"type": "string"}},
                    "steps": [{"id": "up", "type": "transform", "expression": "inputs.t | upper"}],
                    "outputs": {"t": "{{ steps.up.output }}"},
                },
                "inputs": {"t": "{{ steps.by_name.output.text }}"},
            },
        ],
        inputs={"who": {"type": "string"}},
        outputs={"shouted": "{{ steps.inline.output.t }}"},
    )
    queue = f"registered-{uuid.uuid4().hex[:8]}"
    async with build_worker(
        client, task_queue=queue, registry=registry, pipelines=PipelineCatalog([old, greeter])
    ):
        named = await client.execute_workflow(
            PIPELINE_WORKFLOW,
            PipelineRequest(pipeline_name="greeter", inputs={"who": "Ada"}),
            id=f"named-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
            result_type=PipelineResult,
        )
        handle = await _start(client, parent, queue, who="Bo")
        result = await handle.result()
        unknown = await client.start_workflow(
            PIPELINE_WORKFLOW,
            PipelineRequest(pipeline_name="greter"),
            id=f"unknown-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
            result_type=PipelineResult,
        )
        cause = await _failure(unknown)
    assert named.outputs == {"text": "Simulated reply from gpt-4o-mini: Greet Ada"}
    assert result.outputs["shouted"] == "SIMULATED REPLY FROM GPT-4O-MINI: GREET BO"
    assert result.usage.total_tokens > 0 and result.cost_usd > 0  # the child's spend counts
    assert (
        cause.type == "UnknownPipeline"
        and "'greter'" in cause.message
        and "greeter (v1, v2)" in cause.message
    )
    children = [
        e
        for e in (await handle.fetch_history()).events
        if e.event_type == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED
    ]
    assert len(children) == 2


async def _temporal(target: str, *args: str) -> str:
    binary = shutil.which("temporal")
    assert binary
    done = await asyncio.to_thread(
        subprocess.run, [binary, *args, "--address", target], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr or done.stdout
    return done.stdout


async def test_temporal_cli_approves_and_sends_events_with_json(
    client: Client, temporal_target: str, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        [
            {"id": "ok", "type": "approval"},
            {"id": "arrived", "type": "wait_event", "event": "parcel"},
        ],
        outputs={"where": "{{ steps.arrived.output.at }}", "by": "{{ steps.ok.output.by }}"},
    )
    handle = await _start(client, spec, task_queue)
    await _until(handle, _waiting_on("ok"), "the approval to wait")
    out = await _temporal(
        temporal_target,
        "workflow", "update", "execute",
        "--workflow-id", handle.id,
        "--name", "approve",
        "--input", json.dumps({"step_id": "ok", "by": "cli-user"}),
    )  # fmt: skip
    assert "approved" in out
    await _temporal(
        temporal_target,
        "workflow", "signal",
        "--workflow-id", handle.id,
        "--name", "event",
        "--input", json.dumps({"name": "parcel", "payload": {"at": "dock 4"}}),
    )  # fmt: skip
    result = await handle.result()
    assert result.outputs == {"where": "dock 4", "by": "cli-user"}

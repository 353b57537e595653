"""Batches shared across pipelines (``batch.window_s``): the batcher entity workflow gathers the same
step's calls from many pipelines into one provider batch and signals each pipeline its own answers.
Real Temporal server, real worker processes (one killed with SIGKILL mid-window), the simulator's batch
endpoints over HTTP counting the batches made."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from temporalio.client import Client, WithStartWorkflowOperation, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy

from kernel.errors import PipelineError
from kernel.pipeline import parse_pipeline
from simulator.server import SimulatorServer
from worker.client import start_pipeline
from workflows.batcher import (
    AddItems,
    BatcherInput,
    BatcherSettings,
    BatcherWorkflow,
    SharedItem,
    batcher_id,
)
from workflows.pipeline import PipelineResult

pytestmark = pytest.mark.timeout(180)

MODEL = "openai/gpt-4o-mini"


def _lone(key: str, **batch: Any) -> dict[str, Any]:
    """A pipeline of one batch-mode step outside any map: each run adds one item to the shared batch."""
    return {
        "name": "shared-one",
        "inputs": {"question": {"type": "string"}},
        "steps": [
            {
                "id": "answer",
                "model": MODEL,
                "prompt": "Answer {{ inputs.question }}",
                "mode": "batch",
                "batch": {"poll_s": 0.2, "poll_max_s": 1, "key": key, **batch},
            }
        ],
        "outputs": {"answer": "{{ steps.answer.output }}"},
    }


def _mapped(key: str, **batch: Any) -> dict[str, Any]:
    return {
        "name": "shared-map",
        "inputs": {"questions": {"type": "array"}},
        "steps": [
            {
                "id": "each",
                "type": "map",
                "items": "{{ inputs.questions }}",
                "steps": [
                    {
                        "id": "answer",
                        "model": MODEL,
                        "prompt": "Answer {{ item }}",
                        "mode": "batch",
                        "batch": {"poll_s": 0.2, "poll_max_s": 1, "key": key, **batch},
                    }
                ],
            }
        ],
    }


def _batches(sim: SimulatorServer, **control: Any) -> dict[str, Any]:
    if control:
        response = httpx.post(f"{sim.url}/_sim/batches", json=control)
    else:
        response = httpx.get(f"{sim.url}/_sim/batches")
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


async def _until(check: Callable[[], Awaitable[Any]], what: str, within: float = 60.0) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    seen: Any = None
    while True:
        seen = await check()
        if seen:
            return seen
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last saw {seen!r}")
        await asyncio.sleep(0.1)


def _state(client: Client, key: str) -> Callable[[], Awaitable[dict[str, Any]]]:
    handle = client.get_workflow_handle(batcher_id(MODEL, key, ""))

    async def state() -> dict[str, Any]:
        try:
            found: dict[str, Any] = await handle.query("state", result_type=dict)
        except Exception as exc:  # not started yet
            return {"error": str(exc), "pending": 0, "requesters": [], "batches_started": 0}
        return found

    return state


async def test_three_pipelines_share_one_provider_batch_and_each_gets_its_own_answer(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    _batches(sim, complete_after_s=0.5)
    key = f"k{uuid.uuid4().hex[:8]}"
    spec = parse_pipeline(_lone(key, window_s=600, max_items=3))
    handles = [
        await start_pipeline(client, spec, {"question": f"q{i}"}, task_queue=task_queue) for i in range(3)
    ]
    results: list[PipelineResult] = [await asyncio.wait_for(h.result(), 60) for h in handles]

    for i, result in enumerate(results):
        assert result.status == "completed"
        assert f"Answer q{i}" in result.outputs["answer"], result.outputs
        report = result.steps[0].batch
        assert report is not None and [(x.via, x.outcome) for x in report.items] == [("batch", "succeeded")]
        assert 0 < report.cost_usd < report.realtime_cost_usd
    assert _batches(sim)["created"] == 1
    assert sim.stats()["requests"] == 3
    state = await _state(client, key)()
    assert (state["pending"], state["batches_started"], state["seen"]) == (0, 1, 3)


async def test_the_window_closes_on_its_timer_for_a_lone_pipeline(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    _batches(sim, complete_after_s=0.2)
    key = f"k{uuid.uuid4().hex[:8]}"
    spec = parse_pipeline(_mapped(key, window_s=0.5))
    handle = await start_pipeline(client, spec, {"questions": ["a", "b"]}, task_queue=task_queue)
    result = await asyncio.wait_for(handle.result(), 60)
    assert result.status == "completed"
    assert ["Answer a" in result.steps[0].output[0], "Answer b" in result.steps[0].output[1]] == [True, True]
    assert _batches(sim)["created"] == 1


async def test_the_batcher_takes_an_item_id_once(client: Client, task_queue: str) -> None:
    key = f"k{uuid.uuid4().hex[:8]}"
    settings = BatcherSettings(model=MODEL, key=key)
    item = SharedItem(
        id="ticket-1-i0",
        ticket="ticket-1",
        requester="nobody",
        custom_id="i0",
        request={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
    )
    answers = []
    for _ in range(2):
        start = WithStartWorkflowOperation(
            BatcherWorkflow.run,
            BatcherInput(settings=settings),
            id=batcher_id(MODEL, key, ""),
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
        answers.append(
            await client.execute_update_with_start_workflow(
                BatcherWorkflow.add_items,
                AddItems(items=[item], window_s=3600, max_items=10),
                start_workflow_operation=start,
            )
        )
    assert [(a.accepted, a.duplicates, a.pending) for a in answers] == [(1, 0, 1), (0, 1, 1)]
    await client.get_workflow_handle(batcher_id(MODEL, key, "")).terminate("test over")


async def test_a_deadline_before_the_window_closes_answers_in_realtime_and_takes_the_items_back(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    key = f"k{uuid.uuid4().hex[:8]}"
    spec = parse_pipeline(_mapped(key, window_s=3600, deadline_s=1))
    handle = await start_pipeline(client, spec, {"questions": ["a", "b"]}, task_queue=task_queue)
    result = await asyncio.wait_for(handle.result(), 60)
    assert result.status == "completed"
    report = result.steps[0].batch
    assert report is not None and {i.via for i in report.items} == {"realtime"}
    state = await _state(client, key)()
    assert (state["pending"], state["batches_started"]) == (0, 0)  # withdrawn, never submitted
    assert _batches(sim)["created"] == 0
    await client.get_workflow_handle(batcher_id(MODEL, key, "")).terminate("test over")


def test_shared_options_need_a_window() -> None:
    spec = _mapped("k", max_items=3)
    del spec["steps"][0]["steps"][0]["batch"]["key"]
    with pytest.raises(PipelineError, match="batch: max_items goes with window_s"):
        parse_pipeline(spec)
    lone = _lone("k")
    del lone["steps"][0]["batch"]["key"]
    with pytest.raises(PipelineError, match=r"set batch\.window_s"):
        parse_pipeline(lone)


async def test_a_worker_killed_mid_window_loses_no_item_and_the_provider_sees_one_batch(
    client: Client, sim: SimulatorServer, worker_process: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    queue = f"shared-kill-{uuid.uuid4().hex[:8]}"
    key = f"k{uuid.uuid4().hex[:8]}"
    _batches(sim, complete_after_s=1)
    # The window closes when the sixth item arrives (max_items), never on its timer within the test.
    spec = parse_pipeline(_mapped(key, window_s=3600, max_items=6))
    state = _state(client, key)
    first = worker_process(queue)
    handles: list[WorkflowHandle[Any, PipelineResult]] = []
    for p in range(2):
        handles.append(
            await start_pipeline(
                client, spec, {"questions": [f"p{p}-q{i}" for i in range(2)]}, task_queue=queue
            )
        )
    await _until(lambda: _pending_at_least(state, 4), "the first two pipelines' items in the window")
    first.kill()
    first.wait()
    assert first.returncode == -9
    assert _batches(sim)["created"] == 0  # the window was open when the worker died

    worker_process(queue)
    handles.append(await start_pipeline(client, spec, {"questions": ["p2-q0", "p2-q1"]}, task_queue=queue))
    results = [await asyncio.wait_for(h.result(), 120) for h in handles]
    for p, result in enumerate(results):
        assert result.status == "completed"
        answers = result.steps[0].output
        assert [f"Answer p{p}-q{i}" in a for i, a in enumerate(answers)] == [True, True], answers
        report = result.steps[0].batch
        assert report is not None and {i.via for i in report.items} == {"batch"}
    assert _batches(sim)["created"] == 1
    assert sim.stats()["requests"] == 6
    final = await state()
    assert (final["pending"], final["batches_started"], final["seen"]) == (0, 1, 6)


async def _pending_at_least(
    state: Callable[[], Awaitable[dict[str, Any]]], count: int
) -> dict[str, Any] | None:
    seen = await state()
    return seen if seen["pending"] >= count else None


async def test_items_waiting_in_a_window_are_carried_across_continue_as_new(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    _batches(sim, complete_after_s=0.2)
    key = f"k{uuid.uuid4().hex[:8]}"
    # A batcher that continues as new after a handful of events, so the first item's arrival ends its run.
    first = await client.start_workflow(
        BatcherWorkflow.run,
        BatcherInput(
            settings=BatcherSettings(model=MODEL, key=key, poll_s=0.2, poll_max_s=1), events_per_run=5
        ),
        id=batcher_id(MODEL, key, ""),
        task_queue=task_queue,
    )
    # Its first workflow task done (a query answers), the first item's arrival lands in a later one,
    # past the 5 events, and the batcher continues as new right after taking it.
    await _until(_answers(_state(client, key)), "the batcher's first workflow task")
    spec = parse_pipeline(_lone(key, window_s=3600, max_items=2))
    a = await start_pipeline(client, spec, {"question": "qa"}, task_queue=task_queue)
    handle = client.get_workflow_handle(first.id)

    async def carried() -> dict[str, Any] | None:
        run_id = (await handle.describe()).run_id
        seen = await _state(client, key)()
        return seen if run_id != first.result_run_id and seen["pending"] == 1 else None

    await _until(carried, "the batcher to continue as new with the first item waiting")
    b = await start_pipeline(client, spec, {"question": "qb"}, task_queue=task_queue)
    answers = [(await asyncio.wait_for(h.result(), 60)).outputs["answer"] for h in (a, b)]
    assert ["Answer qa" in answers[0], "Answer qb" in answers[1]] == [True, True]
    assert _batches(sim)["created"] == 1
    await handle.terminate("test over")


async def test_cancelling_a_pipeline_takes_its_items_back_from_the_window(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    key = f"k{uuid.uuid4().hex[:8]}"
    spec = parse_pipeline(_mapped(key, window_s=3600))
    state = _state(client, key)
    handle = await start_pipeline(client, spec, {"questions": ["a", "b"]}, task_queue=task_queue)
    await _until(lambda: _pending_at_least(state, 2), "the pipeline's items in the window")
    await handle.cancel()

    async def emptied() -> dict[str, Any] | None:
        seen = await state()
        return seen if seen["pending"] == 0 else None

    await _until(emptied, "the cancelled pipeline's items to leave the window")
    assert (await state())["batches_started"] == 0
    assert _batches(sim)["created"] == 0
    await client.get_workflow_handle(batcher_id(MODEL, key, "")).terminate("test over")


async def test_a_tenants_pipelines_share_the_tenants_own_batcher(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    _batches(sim, complete_after_s=0.2)
    key = f"k{uuid.uuid4().hex[:8]}"
    spec = parse_pipeline(_lone(key, window_s=0.3))
    handle = await start_pipeline(client, spec, {"question": "qt"}, task_queue=task_queue, tenant="acme")
    result = await asyncio.wait_for(handle.result(), 60)
    assert "Answer qt" in result.outputs["answer"]
    tenant_batcher = client.get_workflow_handle(batcher_id(MODEL, key, "acme"))
    assert tenant_batcher.id.startswith("tenant/acme/")
    assert (await tenant_batcher.query("state", result_type=dict))["batches_started"] == 1
    assert (await _state(client, key)())["batches_started"] == 0  # the shared one never ran
    await tenant_batcher.terminate("test over")


def test_the_shared_example_parses() -> None:
    from pathlib import Path

    import yaml

    spec = parse_pipeline(
        yaml.safe_load((Path(__file__).parent.parent / "examples/batch-shared.yaml").read_text())
    )
    step = spec.steps[0]
    assert getattr(step, "mode", None) == "batch"


async def test_a_batch_that_cannot_be_made_tells_its_pipelines_instead_of_leaving_them_waiting(
    client: Client, task_queue: str
) -> None:
    key = f"k{uuid.uuid4().hex[:8]}"
    model = "nosuch/model"
    settings = BatcherSettings(model=model, key=key, max_attempts=2)
    start = WithStartWorkflowOperation(
        BatcherWorkflow.run,
        BatcherInput(settings=settings),
        id=batcher_id(model, key, ""),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )
    item = SharedItem(
        id="t-i0",
        ticket="t",
        requester=f"gone-{uuid.uuid4().hex[:6]}",
        custom_id="i0",
        request={"model": model, "messages": [{"role": "user", "content": "x"}]},
    )
    await client.execute_update_with_start_workflow(
        BatcherWorkflow.add_items,
        AddItems(items=[item], window_s=3600, max_items=1),
        start_workflow_operation=start,
    )
    batcher = client.get_workflow_handle(batcher_id(model, key, ""))
    first_run = (await batcher.describe()).raw_description.workflow_execution_info.first_run_id
    run = client.get_workflow_handle(f"{batcher.id}/{first_run[:12]}-batch-1")

    async def started() -> bool:
        try:
            await run.describe()
        except Exception:  # the batcher has not started its batch run yet
            return False
        return True

    await _until(started, "the batcher to start its batch run")
    outcome = await asyncio.wait_for(run.result(), 60)
    assert outcome["answered"] is False and "nosuch" in outcome["error"], outcome
    await batcher.terminate("test over")


async def test_an_item_failing_inside_the_shared_batch_is_answered_in_realtime(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    _batches(sim, complete_after_s=0.2)
    key = f"k{uuid.uuid4().hex[:8]}"
    spec = parse_pipeline(_mapped(key, window_s=0.5))
    questions = ["a", "b [[sim: fault=429 times=1 key=shared-b]]"]
    result = await asyncio.wait_for(
        (await start_pipeline(client, spec, {"questions": questions}, task_queue=task_queue)).result(), 60
    )
    assert result.status == "completed"
    assert ["Answer a" in result.steps[0].output[0], "Answer b" in result.steps[0].output[1]] == [True, True]
    report = result.steps[0].batch
    assert report is not None
    assert [(i.index, i.via, i.outcome) for i in report.items] == [
        (0, "batch", "succeeded"),
        (1, "realtime", "succeeded"),
    ]
    assert [b.state for b in report.batches] == ["completed"]
    assert _batches(sim)["created"] == 1


@pytest.mark.parametrize("name", ["batcher/batcher", "batcher/batch-run", "batch-shared"])
async def test_the_recorded_shared_batch_replays(name: str) -> None:
    """``tests/histories/record.py batch-shared`` recorded a pipeline's call answered by the batcher,
    the batcher itself and its batch run: today's code replays all three."""
    from pathlib import Path

    from temporalio.client import WorkflowHistory
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.worker import Replayer

    from worker.app import workflow_runner
    from workflows.batcher import BatchRunWorkflow
    from workflows.pipeline import PipelineWorkflow

    path = Path(__file__).parent / "histories" / f"{name}.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    # Each replays under the id it ran with: the batch run's and the batcher's ids name the batch.
    batcher = batcher_id(MODEL, "recorded", "")
    if name == "batch-shared":
        workflow_id = name
    elif name == "batcher/batcher":
        workflow_id = batcher
    else:
        workflow_id = f"{batcher}/{_first_run(raw)[:12]}-batch-1"
    history = WorkflowHistory.from_json(workflow_id, raw)
    assert len(history.events) > 5, f"{name} holds {len(history.events)} events"
    replayer = Replayer(
        workflows=[PipelineWorkflow, BatcherWorkflow, BatchRunWorkflow],
        data_converter=pydantic_data_converter,
        workflow_runner=workflow_runner(),
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{name}: {result.replay_failure}"


def _first_run(raw: dict[str, Any]) -> str:
    """The batch run's parent's first run id, from the run's started event."""
    started = raw["events"][0]["workflowExecutionStartedEventAttributes"]
    return str(started["parentWorkflowExecution"]["runId"])


async def test_an_idle_batcher_ends_and_the_next_item_starts_a_new_one(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    from temporalio.client import WorkflowExecutionStatus

    _batches(sim, complete_after_s=0.2)
    key = f"k{uuid.uuid4().hex[:8]}"
    first = await client.start_workflow(
        BatcherWorkflow.run,
        BatcherInput(settings=BatcherSettings(model=MODEL, key=key), idle_s=0.5),
        id=batcher_id(MODEL, key, ""),
        task_queue=task_queue,
    )
    await asyncio.wait_for(first.result(), 30)  # nothing came: it ended on its own
    assert (await first.describe()).status == WorkflowExecutionStatus.COMPLETED
    spec = parse_pipeline(_lone(key, window_s=0.3))
    handle = await start_pipeline(client, spec, {"question": "later"}, task_queue=task_queue)
    assert "Answer later" in (await asyncio.wait_for(handle.result(), 60)).outputs["answer"]
    again = client.get_workflow_handle(batcher_id(MODEL, key, ""))
    assert (await again.describe()).run_id != first.result_run_id
    await again.terminate("test over")


def _answers(state: Callable[[], Awaitable[dict[str, Any]]]) -> Callable[[], Awaitable[bool]]:
    async def answered() -> bool:
        return "error" not in await state()

    return answered

"""``mode: batch`` end to end: a real Temporal server and worker, provider batches made on the simulator
over HTTP; every item's answer lands in its place, failures go realtime, an expired batch's missing
items run realtime, cancelling the pipeline cancels the provider batch."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError

from kernel.errors import PipelineError
from kernel.pipeline import parse_pipeline
from simulator.server import SimulatorServer
from worker.client import start_pipeline
from workflows.pipeline import PipelineResult

pytestmark = pytest.mark.timeout(120)


def _spec(
    count_steps: list[dict[str, Any]] | None = None, *, batch: dict[str, Any] | None = None, **llm: Any
) -> dict[str, Any]:
    step = {
        "id": "answer",
        "model": "openai/gpt-4o-mini",
        "prompt": "Answer {{ item }}",
        "mode": "batch",
        "batch": {"poll_s": 0.2, "poll_max_s": 1, **(batch or {})},
        **llm,
    }
    return {
        "name": "batch-pipeline",
        "inputs": {"questions": {"type": "array"}},
        "steps": [
            {
                "id": "each",
                "type": "map",
                "items": "{{ inputs.questions }}",
                "concurrency": 4,
                "max_items": 1000,
                "steps": [step, *(count_steps or [])],
            }
        ],
        "outputs": {"answers": "{{ steps.each.output }}"},
    }


def _batches(sim: SimulatorServer, **control: Any) -> dict[str, Any]:
    if control:
        response = httpx.post(f"{sim.url}/_sim/batches", json=control)
    else:
        response = httpx.get(f"{sim.url}/_sim/batches")
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


async def _run(client: Client, spec: dict[str, Any], task_queue: str, questions: list[str]) -> PipelineResult:
    handle = await start_pipeline(
        client, parse_pipeline(spec), {"questions": questions}, task_queue=task_queue
    )
    return await handle.result()


async def test_a_200_item_map_in_batch_mode_across_two_providers_puts_every_answer_in_place(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    _batches(sim, complete_after_s=1)
    questions = [f"q{i}" for i in range(200)]
    questions[7] = (
        "q7 [[sim: fault=429 times=1 key=q7]]"  # fails inside the batch, answered in realtime after
    )
    check = {
        "id": "check",
        "model": "gemini/gemini-2.5-flash",
        "prompt": "Check {{ steps.answer.output }}",
        "mode": "batch",
        "batch": {"poll_s": 0.2, "poll_max_s": 1},
    }
    result = await _run(client, _spec([check]), task_queue, questions)

    assert result.status == "completed"
    answers = result.steps[0].output
    assert len(answers) == 200
    for i, answer in enumerate(answers):
        # Gemini's answer to OpenAI's answer to question i, in place i.
        assert answer.startswith("Simulated reply from gemini-2.5-flash") and f"Answer q{i}" in answer
    counts = _batches(sim)
    assert counts["created"] == 2 and counts["by_wire"] == {"openai": 1, "gemini": 1}
    report = result.steps[0].batch
    assert report is not None
    assert sorted((b.provider, b.state) for b in report.batches) == [
        ("gemini", "completed"),
        ("openai", "completed"),
    ]
    first = [i for i in report.items if i.step_id == "answer"]
    assert [i.index for i in first] == list(range(200))
    assert (first[7].via, first[7].outcome) == ("realtime", "succeeded")
    assert sum(1 for i in report.items if i.via == "batch") == 399
    assert 0 < report.cost_usd < report.realtime_cost_usd
    assert report.saving_usd == pytest.approx(report.realtime_cost_usd - report.cost_usd)
    assert result.cost_usd == pytest.approx(report.cost_usd)
    assert result.steps[0].status == "completed"


async def test_an_expired_batch_answers_the_missing_items_in_realtime(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    _batches(sim, complete_after_s=0.5, expire=True, expire_keep=3)
    questions = [f"q{i}" for i in range(10)]
    result = await _run(client, _spec(), task_queue, questions)

    assert result.status == "completed"
    assert [f"Answer q{i}" in a for i, a in enumerate(result.steps[0].output)] == [True] * 10
    report = result.steps[0].batch
    assert report is not None and [b.state for b in report.batches] == ["expired"]
    assert [i.via for i in report.items] == ["batch"] * 3 + ["realtime"] * 7
    assert sim.stats()["requests"] == 10  # 3 in the batch, 7 in realtime


async def test_the_deadline_cancels_the_batch_and_answers_in_realtime(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    _batches(sim, complete_after_s=600)
    result = await _run(client, _spec(batch={"deadline_s": 1}), task_queue, ["a", "b", "c"])

    assert result.status == "completed"
    assert [f"Answer {q}" in a for q, a in zip("abc", result.steps[0].output, strict=True)] == [True] * 3
    assert _batches(sim)["cancelled"] == 1
    report = result.steps[0].batch
    assert report is not None and {i.via for i in report.items} == {"realtime"}


async def test_cancelling_the_pipeline_cancels_the_provider_batch(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    _batches(sim, complete_after_s=600)
    handle = await start_pipeline(
        client,
        parse_pipeline(_spec()),
        {"questions": ["a", "b"]},
        task_queue=task_queue,
        workflow_id=f"batch-cancel-{uuid.uuid4().hex[:8]}",
    )
    await _until(lambda: _batches(sim)["created"] == 1, "the batch to be submitted")
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), 60)
    assert _batches(sim)["cancelled"] == 1
    assert _batches(sim)["created"] == 1
    assert sim.stats()["requests"] == 0


async def test_cancelling_while_the_submission_is_in_flight_cancels_the_batch_it_made(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    # The provider made the batch but has not answered the create call when the pipeline is cancelled:
    # the workflow never learns the batch's id from the submission, and finds it by its tag instead.
    _batches(sim, complete_after_s=600, hold_create_s=60)
    handle = await start_pipeline(
        client,
        parse_pipeline(_spec()),
        {"questions": ["a", "b"]},
        task_queue=task_queue,
        workflow_id=f"batch-cancel-held-{uuid.uuid4().hex[:8]}",
    )
    await _until(lambda: _batches(sim)["created"] == 1, "the batch to be made")
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), 60)
    assert _batches(sim)["cancelled"] == 1
    assert _batches(sim)["created"] == 1
    assert sim.stats()["requests"] == 0


def test_batch_mode_outside_a_map_is_refused_before_start() -> None:
    spec = {
        "name": "lonely",
        "steps": [{"id": "a", "model": "openai/gpt-4o-mini", "prompt": "x", "mode": "batch"}],
    }
    with pytest.raises(PipelineError, match="step 'a' has mode: batch outside a map"):
        parse_pipeline(spec)


def test_batch_mode_refuses_streaming() -> None:
    with pytest.raises(PipelineError, match="mode: batch cannot be combined with stream"):
        parse_pipeline(_spec(stream=True))


async def _until(check: Callable[[], bool], what: str, within: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_killed_worker_never_submits_the_batch_twice(
    client: Client, sim: SimulatorServer, worker_process: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    queue = f"batch-kill-{uuid.uuid4().hex[:8]}"
    # The provider makes the batch, then answers the create call late: the first worker dies after the
    # provider accepted and before it heard so.
    _batches(sim, complete_after_s=25, hold_create_s=60)
    spec = _spec(heartbeat_timeout_s=2, retry={"max_attempts": 10, "initial_interval_s": 0.2})
    first = worker_process(queue)
    handle = await start_pipeline(
        client, parse_pipeline(spec), {"questions": [f"q{i}" for i in range(20)]}, task_queue=queue
    )
    await _until(lambda: _batches(sim)["created"] == 1, "the provider to accept the batch")
    first.kill()
    first.wait()
    assert first.returncode == -9

    # The second worker finds the batch by its tag, then dies while the batch is in progress.
    second = worker_process(queue)
    history_has = _history_has(handle)
    deadline = asyncio.get_running_loop().time() + 60
    while not await history_has("llm_batch_status"):
        assert asyncio.get_running_loop().time() < deadline, "the second worker never polled"
        await asyncio.sleep(0.1)
    second.kill()
    second.wait()
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING

    worker_process(queue)
    result = await asyncio.wait_for(handle.result(), timeout=90)
    assert result.status == "completed"
    assert [f"Answer q{i}" in a for i, a in enumerate(result.steps[0].output)] == [True] * 20
    assert _batches(sim)["created"] == 1
    assert sim.stats()["requests"] == 20  # every item answered once, in the one batch


def _history_has(handle: Any) -> Callable[[str], Any]:
    async def has(activity: str) -> bool:
        history = await handle.fetch_history()
        return any(
            e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
            and any(
                s.event_id == e.activity_task_completed_event_attributes.scheduled_event_id
                and s.activity_task_scheduled_event_attributes.activity_type.name == activity
                for s in history.events
            )
            for e in history.events
        )

    return has


async def test_retry_in_the_next_batch_round_on_the_same_model_or_the_fallback(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    _batches(sim, complete_after_s=0.3)
    questions = [
        "q0",
        "q1 [[sim: fault=429 times=1 key=r1]]",  # retryable: the next round, same model
        "q2 [[sim: fault=400 model=gpt-4o-mini]]",  # not retryable: the next round, on the fallback
    ]
    spec = _spec(batch={"retry_failed": "batch"}, fallbacks=["gemini/gemini-2.5-flash"])
    result = await _run(client, spec, task_queue, questions)

    assert result.status == "completed"
    answers = result.steps[0].output
    assert answers[0].startswith("Simulated reply from gpt-4o-mini") and "Answer q0" in answers[0]
    assert answers[1].startswith("Simulated reply from gpt-4o-mini") and "Answer q1" in answers[1]
    assert answers[2].startswith("Simulated reply from gemini-2.5-flash") and "Answer q2" in answers[2]
    counts = _batches(sim)
    assert counts["by_wire"] == {"openai": 2, "gemini": 1}  # round 0: openai; round 1: openai and gemini
    report = result.steps[0].batch
    assert report is not None and {i.via for i in report.items} == {"batch"}
    assert sim.stats()["by_model"] == {"gpt-4o-mini": 4, "gemini-2.5-flash": 1}


async def test_a_provider_without_batches_fails_the_step_naming_it(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(model="anthropic/claude-sonnet-4-5")
    handle = await start_pipeline(client, parse_pipeline(spec), {"questions": ["a"]}, task_queue=task_queue)
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()
    message = str(caught.value.cause)
    assert "provider 'anthropic' does not take batches" in message, message
    assert _batches(sim)["created"] == 0 and sim.stats()["requests"] == 0


async def test_an_answer_off_the_schema_is_asked_again_in_realtime(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    schema = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
    spec = _spec(output_schema=schema)
    questions = ["a", 'b [[sim: reply="not json at all" times=1 key=offschema]]']
    result = await _run(client, spec, task_queue, questions)

    assert result.status == "completed"
    assert all(
        isinstance(answer, dict) and isinstance(answer["label"], str) for answer in result.steps[0].output
    )
    report = result.steps[0].batch
    assert report is not None
    assert [(i.index, i.via, i.outcome) for i in report.items] == [
        (0, "batch", "succeeded"),
        (1, "batch", "invalid"),
        (1, "realtime", "succeeded"),
    ]


async def test_an_item_refused_by_every_model_in_batch_rounds_fails_the_step_with_its_error(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(batch={"retry_failed": "batch"})
    handle = await start_pipeline(
        client, parse_pipeline(spec), {"questions": ["a", "b [[sim: fault=400]]"]}, task_queue=task_queue
    )
    with pytest.raises(WorkflowFailureError) as caught:
        await asyncio.wait_for(handle.result(), 60)
    message = str(caught.value.cause)
    assert "item 1" in message and "failed on every model in batch mode" in message, message
    assert "InvalidRequest" in message
    assert _batches(sim)["created"] == 1

"""``mode: batch`` end to end: a real Temporal server and worker, provider batches made on the simulator
over HTTP; every item's answer lands in its place, failures go realtime, an expired batch's missing
items run realtime, cancelling the pipeline cancels the provider batch."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from temporalio.client import Client, WorkflowFailureError

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


async def test_a_200_item_map_in_batch_mode_puts_every_answer_in_place(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    _batches(sim, complete_after_s=1)
    questions = [f"q{i}" for i in range(200)]
    questions[7] = (
        "q7 [[sim: fault=429 times=1 key=q7]]"  # fails inside the batch, answered in realtime after
    )
    result = await _run(client, _spec(), task_queue, questions)

    assert result.status == "completed"
    answers = result.steps[0].output
    assert len(answers) == 200
    for i, answer in enumerate(answers):
        assert answer.startswith("Simulated reply from gpt-4o-mini") and f"Answer q{i}" in answer
    counts = _batches(sim)
    assert counts["created"] == 1
    report = result.steps[0].batch
    assert report is not None
    assert [b.state for b in report.batches] == ["completed"]
    assert [i.index for i in report.items] == list(range(200))
    assert (report.items[7].via, report.items[7].outcome) == ("realtime", "succeeded")
    assert result.steps[0].status == "completed"
    assert sum(1 for i in report.items if i.via == "batch") == 199
    assert 0 < report.cost_usd < report.realtime_cost_usd
    assert report.saving_usd == pytest.approx(report.realtime_cost_usd - report.cost_usd)
    assert result.cost_usd == pytest.approx(report.cost_usd)


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
    while _batches(sim)["created"] < 1:
        await asyncio.sleep(0.05)
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), 20)
    assert _batches(sim)["cancelled"] == 1
    assert _batches(sim)["created"] == 1
    assert sim.stats()["requests"] == 0


async def test_batch_mode_outside_a_map_is_refused(client: Client, task_queue: str) -> None:
    spec = {
        "name": "lonely",
        "steps": [{"id": "a", "model": "openai/gpt-4o-mini", "prompt": "x", "mode": "batch"}],
    }
    handle = await start_pipeline(client, parse_pipeline(spec), {}, task_queue=task_queue)
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()
    assert "outside a map" in str(caught.value.cause)


def test_batch_mode_refuses_streaming() -> None:
    with pytest.raises(PipelineError, match="mode: batch cannot be combined with stream"):
        parse_pipeline(_spec(stream=True))

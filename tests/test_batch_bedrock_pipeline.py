"""``mode: batch`` on Bedrock end to end: a real Temporal server and worker, the simulator's Bedrock control
plane and an S3 stand-in (moto's server) over HTTP. Every item's answer lands in its place; a batch under
Bedrock's minimum of records is not submitted and its items are answered in realtime; a worker killed after
Bedrock accepted the job, before it heard so, never makes a second one."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from kernel.pipeline import parse_pipeline
from kernel.provider import ProviderSettings
from providers import bedrock_batch
from simulator.server import SimulatorServer
from worker.app import build_registry, build_worker, simulator_settings
from worker.client import start_pipeline
from workflows.pipeline import PipelineResult

pytestmark = pytest.mark.timeout(120)

MODEL = "amazon.nova-lite-v1:0"
ROLE = "arn:aws:iam::123456789012:role/kernelflow-batch"
AWS = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "sim-secret"}


def _spec(**batch: Any) -> dict[str, Any]:
    step = {
        "id": "answer",
        "model": f"bedrock/{MODEL}",
        "prompt": "Answer {{ item }}",
        "mode": "batch",
        "batch": {"poll_s": 0.2, "poll_max_s": 1, **batch},
    }
    return {
        "name": "bedrock-batch",
        "inputs": {"questions": {"type": "array"}},
        "steps": [
            {
                "id": "each",
                "type": "map",
                "items": "{{ inputs.questions }}",
                "concurrency": 8,
                "max_items": 1000,
                "steps": [step],
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


@pytest.fixture
def bucket(moto_s3: str) -> str:
    import boto3

    name = f"kf-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3", endpoint_url=moto_s3, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
    ).create_bucket(Bucket=name)
    return name


@pytest.fixture
async def bedrock_queue(
    client: Client, sim: SimulatorServer, moto_s3: str, bucket: str
) -> AsyncIterator[str]:
    """A worker whose Bedrock provider has the batch settings (Bedrock's default minimum of records)."""
    settings = simulator_settings(sim.url)
    bedrock = settings["bedrock"]
    options = {**bedrock.options, "batch_bucket": bucket, "batch_role_arn": ROLE, "s3_endpoint": moto_s3}
    settings["bedrock"] = ProviderSettings(base_url=bedrock.base_url, options=options)
    registry = build_registry(provider_settings=settings, environ={**os.environ, **AWS})
    queue = f"bedrock-batch-{uuid.uuid4().hex[:8]}"
    try:
        async with build_worker(client, task_queue=queue, registry=registry):
            yield queue
    finally:
        await registry.aclose()


async def _run(client: Client, queue: str, questions: list[str], **batch: Any) -> PipelineResult:
    handle = await start_pipeline(
        client, parse_pipeline(_spec(**batch)), {"questions": questions}, task_queue=queue
    )
    return await asyncio.wait_for(handle.result(), 90)


async def test_a_120_item_map_goes_to_bedrock_as_one_job_and_every_answer_lands_in_place(
    client: Client, bedrock_queue: str, sim: SimulatorServer
) -> None:
    _batches(sim, complete_after_s=0.5)
    questions = [f"q{i}" for i in range(120)]
    questions[7] = "q7 [[sim: fault=429 times=1 key=bq7]]"  # fails in the job, answered in realtime after
    result = await _run(client, bedrock_queue, questions)

    assert result.status == "completed"
    answers = result.steps[0].output
    assert len(answers) == 120
    for i, answer in enumerate(answers):
        assert answer.startswith(f"Simulated reply from {MODEL}") and f"Answer q{i}" in answer, (i, answer)
    assert _batches(sim)["by_wire"] == {"bedrock": 1}
    report = result.steps[0].batch
    assert report is not None
    assert [(b.provider, b.state, b.vendor_state) for b in report.batches] == [
        ("bedrock", "completed", "PartiallyCompleted")
    ]
    assert [i.index for i in report.items] == list(range(120))
    assert (report.items[7].via, report.items[7].outcome) == ("realtime", "succeeded")
    assert sum(1 for i in report.items if i.via == "batch") == 119
    assert 0 < report.cost_usd < report.realtime_cost_usd
    assert sim.stats()["requests"] == 121  # 120 records in the job, item 7 once more in realtime


async def test_a_batch_under_bedrocks_minimum_is_answered_in_realtime(
    client: Client, bedrock_queue: str, sim: SimulatorServer
) -> None:
    questions = [f"q{i}" for i in range(5)]
    result = await _run(client, bedrock_queue, questions)

    assert result.status == "completed"
    assert [f"Answer q{i}" in a for i, a in enumerate(result.steps[0].output)] == [True] * 5
    assert _batches(sim)["created"] == 0
    report = result.steps[0].batch
    assert report is not None
    [held] = report.batches
    assert held.state == "expired" and "fewer than its minimum of 100" in held.vendor_state, held
    assert {i.via for i in report.items} == {"realtime"}
    assert sim.stats()["requests"] == 5


async def test_under_the_minimum_with_batch_rounds_the_items_still_end_in_realtime(
    client: Client, bedrock_queue: str, sim: SimulatorServer
) -> None:
    result = await _run(client, bedrock_queue, ["a", "b"], retry_failed="batch", max_rounds=2)

    assert result.status == "completed"
    assert [f"Answer {q}" in a for q, a in zip("ab", result.steps[0].output, strict=True)] == [True, True]
    assert _batches(sim)["created"] == 0 and sim.stats()["requests"] == 2
    report = result.steps[0].batch
    assert report is not None and {i.via for i in report.items} == {"realtime"}
    assert {b.vendor_state for b in report.batches} == {
        "not submitted to bedrock: 2 requests, fewer than its minimum of 100 per batch"
    }


async def _until(check: Callable[[], bool], what: str, within: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_worker_killed_after_bedrock_accepted_the_job_never_submits_it_twice(
    client: Client,
    sim: SimulatorServer,
    moto_s3: str,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    worker_process: Callable[[str], subprocess.Popen[bytes]],
) -> None:
    # The worker processes take Bedrock's settings from the environment, as a deployment would.
    for name, value in {
        **AWS,
        "AWS_REGION": "us-east-1",
        "BEDROCK_ENDPOINT_URL": sim.url,
        bedrock_batch.BUCKET_ENV: bucket,
        bedrock_batch.ROLE_ARN_ENV: ROLE,
        bedrock_batch.S3_ENDPOINT_ENV: moto_s3,
        bedrock_batch.MIN_RECORDS_ENV: "1",
    }.items():
        monkeypatch.setenv(name, value)
    queue = f"bedrock-kill-{uuid.uuid4().hex[:8]}"
    # Bedrock makes the job, then answers the create call late: the first worker dies after Bedrock
    # accepted and before it heard so.
    _batches(sim, complete_after_s=3, hold_create_s=60)
    spec = _spec()
    spec["steps"][0]["steps"][0].update(
        heartbeat_timeout_s=2, retry={"max_attempts": 10, "initial_interval_s": 0.2}
    )
    first = worker_process(queue)
    handle = await start_pipeline(
        client, parse_pipeline(spec), {"questions": [f"q{i}" for i in range(12)]}, task_queue=queue
    )
    await _until(lambda: _batches(sim)["created"] == 1, "Bedrock to accept the job")
    first.kill()
    first.wait()
    assert first.returncode == -9

    worker_process(queue)  # finds the job by its name (the tag) and carries on
    result = await asyncio.wait_for(handle.result(), timeout=90)
    assert result.status == "completed"
    assert [f"Answer q{i}" in a for i, a in enumerate(result.steps[0].output)] == [True] * 12
    assert _batches(sim)["created"] == 1
    assert sim.stats()["requests"] == 12  # every item answered once, in the one job

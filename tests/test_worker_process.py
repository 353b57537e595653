"""A worker started as users start it: `kernelflow worker` in its own process, configured through the
environment, against the real dev server and simulator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import uuid
from pathlib import Path

import httpx
import pytest
from temporalio.client import WorkflowFailureError

from kernel.pipeline import PipelineSpec
from simulator.server import SimulatorServer
from tests.worker_process import WorkerProcess
from worker.app import connect
from worker.client import start_pipeline
from worker.config import PayloadSettings, payload_settings_from_env
from worker.devserver import free_port

pytestmark = pytest.mark.timeout(180)

SPEC = PipelineSpec.model_validate(
    {
        "name": "echo-long",
        "inputs": {"text": {"type": "string"}},
        "steps": [{"id": "answer", "model": "openai/gpt-4o-mini", "prompt": "Summarise: {{ inputs.text }}"}],
        "outputs": {"answer": "{{ steps.answer.output }}"},
    }
)


def worker_env(temporal_target: str, sim: SimulatorServer, queue: str, **extra: str) -> dict[str, str]:
    return {
        "TEMPORAL_ADDRESS": temporal_target,
        "KERNELFLOW_TASK_QUEUE": queue,
        "OPENAI_BASE_URL": sim.url.rstrip("/") + "/v1",
        "OPENAI_API_KEY": "sim-key",
        **extra,
    }


async def test_worker_uses_the_payload_store_named_by_the_environment(
    temporal_target: str, sim: SimulatorServer, tmp_path: Path
) -> None:
    store = tmp_path / "shared-store"
    queue = f"proc-{uuid.uuid4().hex[:8]}"
    env = worker_env(temporal_target, sim, queue, KERNELFLOW_PAYLOADS_DIR=str(store))
    # The worker runs in another directory: its default store (.state/payloads there) is not the client's.
    worker_dir = tmp_path / "worker-cwd"
    worker_dir.mkdir()
    with WorkerProcess(env, cwd=worker_dir) as worker:
        started = worker.wait_started()
        payloads = payload_settings_from_env({"KERNELFLOW_PAYLOADS_DIR": str(store)})
        client = await connect(temporal_target, payloads=payloads)
        big = "a long contract clause. " * 5_000  # ~120 kB, over the 64 KiB threshold
        handle = await start_pipeline(client, SPEC, {"text": big}, task_queue=queue)
        try:
            result = await asyncio.wait_for(handle.result(), timeout=60)
        except WorkflowFailureError as exc:  # pragma: no cover - the failure is the message
            pytest.fail(f"pipeline failed: {exc.cause}")
        assert result.status == "completed"
        assert any(p.is_file() for p in store.rglob("*")), "the large input must be in the shared store"
        assert not (worker_dir / ".state").exists(), "the worker must not use a store of its own"
    # The start-up message says which store the process uses.
    assert str(store.resolve()) in started.get("payload_store", ""), started
    assert json.dumps(result.outputs)


async def test_json_logs_of_a_failing_run_are_json_on_every_line(
    temporal_target: str, sim: SimulatorServer, tmp_path: Path
) -> None:
    queue = f"proc-{uuid.uuid4().hex[:8]}"
    env = worker_env(temporal_target, sim, queue, KERNELFLOW_PAYLOADS_DIR=str(tmp_path / "store"))
    failing = PipelineSpec.model_validate(
        {
            "name": "fails",
            "steps": [
                {"id": "flaky", "model": "openai/gpt-4o-mini", "prompt": "hi [[sim: fault=500 times=1]]",
                 "retry": {"max_attempts": 2, "initial_interval_s": 0.1}},
                {"id": "broken", "model": "openai/gpt-4o-mini", "prompt": "hi [[sim: fault=400]]"},
            ],
        }
    )  # fmt: skip
    with WorkerProcess(env, cwd=tmp_path) as worker:
        worker.wait_started()
        client = await connect(
            temporal_target,
            payloads=payload_settings_from_env({"KERNELFLOW_PAYLOADS_DIR": str(tmp_path / "store")}),
        )
        handle = await start_pipeline(client, failing, {}, task_queue=queue)
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), timeout=60)
        # A workflow type the worker does not have: its workflow tasks fail, which the SDK core and
        # the SDK's Python side both report (the core's report used to be coloured text).
        await client.start_workflow("NoSuchWorkflow", id=f"missing-{queue}", task_queue=queue)
        worker.wait_for(lambda r: r.get("logger") == "temporalio.core", within=60)
        worker.wait_for(lambda r: "exception" in r and "NoSuchWorkflow" in json.dumps(r), within=60)
        await client.get_workflow_handle(f"missing-{queue}").terminate()
    assert worker.process is not None and worker.process.returncode == 0
    not_json = []
    for line in worker.lines:
        try:
            assert isinstance(json.loads(line), dict)
        except (ValueError, AssertionError):
            not_json.append(line)
    assert not not_json, "lines that are not JSON objects:\n" + "\n".join(not_json[:20])
    assert not any("\x1b[" in line for line in worker.lines), "colour codes in JSON logs"


async def test_sigterm_drains_in_flight_model_calls_and_no_step_runs_twice(
    temporal_target: str, sim: SimulatorServer, tmp_path: Path
) -> None:
    queue = f"drain-{uuid.uuid4().hex[:8]}"
    http_port = free_port()
    env = worker_env(
        temporal_target, sim, queue, KERNELFLOW_PAYLOADS_STORAGE="off", KERNELFLOW_SHUTDOWN_GRACE_S="30",
        KERNELFLOW_METRICS_PORT=str(http_port), KERNELFLOW_METRICS_HOST="127.0.0.1",
    )  # fmt: skip
    readyz = f"http://127.0.0.1:{http_port}/readyz"
    spec = PipelineSpec.model_validate(
        {
            "name": "drained",
            "steps": [
                {"id": "slow", "model": "openai/gpt-4o-mini", "prompt": "Take your time. [[sim: latency=3]]"},
                {"id": "after", "model": "openai/gpt-4o-mini", "prompt": "Next."},
            ],
        }
    )
    client = await connect(temporal_target, payloads=PayloadSettings(storage="off"))
    first = WorkerProcess(env, cwd=tmp_path).start()
    first.wait_started()
    deadline = asyncio.get_running_loop().time() + 30
    async with httpx.AsyncClient() as http:
        while (await http.get(readyz)).status_code != 200:  # polling, so ready
            assert asyncio.get_running_loop().time() < deadline, "the worker never became ready"
            await asyncio.sleep(0.1)
        handle = await start_pipeline(client, spec, {}, task_queue=queue)
        while sim.stats()["requests"] < 1:  # the slow call is in flight
            assert asyncio.get_running_loop().time() < deadline, "the model call never started"
            await asyncio.sleep(0.05)
        assert first.process is not None
        first.process.send_signal(signal.SIGTERM)
        draining = None
        while first.process.poll() is None:  # not ready from the moment the drain starts
            with contextlib.suppress(httpx.HTTPError):
                answer = await http.get(readyz)
                if answer.status_code == 503:
                    draining = answer.json()
                    break
            await asyncio.sleep(0.05)
    assert draining is not None and draining["reason"].startswith("draining"), draining
    code = await asyncio.to_thread(first.process.wait, 60)
    assert code == 0, "\n".join(first.lines[-20:])
    events = [r.get("event") for r in first.records()]
    assert "worker draining: polling stopped, in-flight work finishing" in events
    finished = [r for r in first.records() if r.get("event") == "llm call finished"]
    assert [r["step"] for r in finished] == ["slow"], "the in-flight call must finish during the drain"
    assert not [r for r in first.records() if r.get("level") in ("error", "critical")]

    with WorkerProcess(env, cwd=tmp_path) as second:
        second.wait_started()
        result = await asyncio.wait_for(handle.result(), timeout=60)
    assert result.status == "completed"
    assert sim.stats()["requests"] == 2, "the drained step must not be called again"
    history = await handle.fetch_history()
    attempts = [
        e.activity_task_started_event_attributes.attempt
        for e in history.events
        if e.HasField("activity_task_started_event_attributes")
    ]
    assert attempts == [1, 1], attempts


async def test_a_hanging_provider_cannot_take_the_other_providers_slots(
    temporal_target: str, sim: SimulatorServer, tmp_path: Path
) -> None:
    """With a task queue per provider, one activity slot each: anthropic hangs on its slot while an
    openai pipeline still runs at once, its call scheduled on the openai queue."""
    queue = f"prov-{uuid.uuid4().hex[:8]}"
    env = worker_env(
        temporal_target, sim, queue, KERNELFLOW_PAYLOADS_STORAGE="off", KERNELFLOW_PROVIDER_QUEUES="openai,anthropic",
        KERNELFLOW_MAX_CONCURRENT_ACTIVITIES="1", KERNELFLOW_SHUTDOWN_GRACE_S="1",
        ANTHROPIC_BASE_URL=sim.url.rstrip("/"), ANTHROPIC_API_KEY="sim-key",
    )  # fmt: skip
    hangs = PipelineSpec.model_validate(
        {"name": "hangs", "steps": [{"id": "slow", "model": "anthropic/claude-sonnet-4-5", "timeout_s": 120,
                                      "prompt": "Wait. [[sim: latency=90]]"}]}
    )  # fmt: skip
    quick = PipelineSpec.model_validate(
        {"name": "quick", "steps": [{"id": "fast", "model": "openai/gpt-4o-mini", "prompt": "Now."}]}
    )
    client = await connect(temporal_target, payloads=PayloadSettings(storage="off"))
    with WorkerProcess(env, cwd=tmp_path) as worker:
        started = worker.wait_started()
        assert started["provider_queues"] == [f"{queue}.openai", f"{queue}.anthropic"], started
        stuck = await start_pipeline(client, hangs, {}, task_queue=queue)
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while sim.stats()["requests"] < 1:  # the anthropic call holds its queue's only slot
                assert asyncio.get_running_loop().time() < deadline, "the anthropic call never started"
                await asyncio.sleep(0.05)
            handle = await start_pipeline(client, quick, {}, task_queue=queue)
            assert (await asyncio.wait_for(handle.result(), timeout=30)).status == "completed"
            queues = {
                e.activity_task_scheduled_event_attributes.task_queue.name
                for e in (await handle.fetch_history()).events
                if e.HasField("activity_task_scheduled_event_attributes")
            }
            assert queues == {f"{queue}.openai"}, queues
        finally:
            await stuck.terminate()

"""A worker started as users start it: `kernelflow worker` in its own process, configured through the
environment, against the real dev server and simulator."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError

from kernel.pipeline import PipelineSpec
from simulator.server import SimulatorServer
from tests.worker_process import WorkerProcess
from worker.app import connect
from worker.client import start_pipeline
from worker.config import payload_settings_from_env

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

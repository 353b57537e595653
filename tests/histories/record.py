"""Record the event histories that ``tests/test_replay.py`` replays.

Run from the repository root whenever an example pipeline or the engine changes on purpose::

    .venv/bin/python tests/histories/record.py            # every recording
    .venv/bin/python tests/histories/record.py ticket-triage

Each recording runs an example pipeline on an embedded Temporal dev server against the simulator and
writes ``tests/histories/<name>.json``. Histories recorded by earlier engine versions are kept under
their own names and never regenerated: they prove that running workflows survive a deploy.
``*-v1.json``: before step types, budgets and continue-as-new; ``*-v2.json``: before the engine became
data (runs without the ``kernelflow-engine-2`` marker, so without its search attributes).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from activities.mcp import McpServerConfig  # noqa: E402
from kernel.limits import LimitsConfig  # noqa: E402
from kernel.pipeline import load_pipeline  # noqa: E402
from kernel.shadow_rules import ShadowConfig  # noqa: E402
from simulator.server import SimulatorServer  # noqa: E402
from worker.app import build_registry, build_worker, connect, simulator_settings  # noqa: E402
from worker.client import approve, pause, reroute, resume, send_event, start_pipeline  # noqa: E402
from worker.search_attributes import ensure_search_attributes  # noqa: E402
from workflows.pipeline import PipelineStatus  # noqa: E402

Drive = Callable[[Client, WorkflowHandle[Any, Any]], Awaitable[None]]


async def _nothing(client: Client, handle: WorkflowHandle[Any, Any]) -> None:
    return None


async def _approve_review(client: Client, handle: WorkflowHandle[Any, Any]) -> None:
    """Wait until the approval waits, then approve it as a person would."""
    for _ in range(600):
        status = await handle.query("status", result_type=PipelineStatus)
        if any(a.step_id == "review" and a.status == "waiting" for a in status.approvals):
            await approve(client, handle.id, "review", by="alice", comment="recorded")
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the approval never started waiting")


async def _drive_from_outside(client: Client, handle: WorkflowHandle[Any, Any]) -> None:
    """Every control once: a refused signal, a pause and resume by update, a reroute, an approval,
    and a business event delivered twice under one id."""
    await _wait_for(
        handle, lambda s: any(a.step_id == "review" and a.status == "waiting" for a in s.approvals)
    )
    await handle.signal("event", {"payload": "no name"})  # refused, recorded in status
    await pause(client, handle.id, reason="recorded", by="ops")
    await resume(client, handle.id, by="ops")
    await reroute(client, handle.id, {"openai/gpt-4.1": "openai/gpt-4o"}, by="ops")
    await approve(client, handle.id, "review", by="alice", comment="recorded")
    for _ in range(2):
        await send_event(client, handle.id, "shipped", {"carrier": "DHL"}, event_id="evt-recorded-1")


async def _wait_for(handle: WorkflowHandle[Any, Any], check: Callable[[PipelineStatus], bool]) -> None:
    for _ in range(600):
        if check(await handle.query("status", result_type=PipelineStatus)):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the pipeline never reached the awaited state")


async def _approve_refund(client: Client, handle: WorkflowHandle[Any, Any]) -> None:
    await _wait_for(
        handle, lambda s: any(a.step_id == "desk.2.0" and a.status == "waiting" for a in s.approvals)
    )
    await approve(client, handle.id, "desk.2.0", by="refunds@example.com", comment="recorded")


_REFUND_SCRIPT = json.dumps(
    [
        {
            "calls": [
                {"name": "lookup_order", "arguments": {"order_id": "B200"}},
                {"name": "shipping_status", "arguments": {"order_id": "B200"}},
            ]
        },
        {
            "calls": [
                {"name": "issue_refund", "arguments": {"order_id": "B200", "amount": 18.5, "reason": "lost"}}
            ]
        },
        {
            "text": json.dumps(
                {"order_id": "B200", "refunded": 18.5, "note": "Sorry, your lamp was lost; refunded."}
            )
        },
    ]
)


async def _cancel_during_batch(client: Client, handle: WorkflowHandle[Any, Any]) -> None:
    """Wait until the provider holds the batch, then cancel the pipeline (which cancels the batch)."""
    for _ in range(600):
        status = await handle.query("status", result_type=PipelineStatus)
        report = status.steps[0].batch if status.steps else None
        if report is not None and report.batches:
            await handle.cancel()
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the batch was never submitted")


async def _save_the_batcher(client: Client, handle: WorkflowHandle[Any, Any]) -> None:
    """After the pipeline's answer came, keep the batcher's and its batch run's histories too
    (``tests/histories/batcher/``; the batcher is terminated first, as it never ends on its own)."""
    from workflows.batcher import batcher_id

    await handle.result()
    batcher = client.get_workflow_handle(batcher_id("openai/gpt-4o-mini", "recorded", ""))
    first_run = (await batcher.describe()).raw_description.workflow_execution_info.first_run_id
    run = client.get_workflow_handle(f"{batcher.id}/{first_run[:12]}-batch-1")
    await run.result()
    await batcher.terminate("recorded")
    folder = HERE / "batcher"
    folder.mkdir(exist_ok=True)
    for name, workflow in (("batcher", batcher), ("batch-run", run)):
        history = await workflow.fetch_history()
        (folder / f"{name}.json").write_text(history.to_json(), encoding="utf-8")


@dataclass
class Recording:
    name: str
    pipeline: str
    inputs: dict[str, Any]
    drive: Drive = _nothing
    faults: list[dict[str, Any]] = field(default_factory=list)
    mcp: bool = False
    limits: dict[str, Any] | None = None
    batches: dict[str, Any] | None = None
    """How the simulator's provider batches behave (``/_sim/batches``)."""
    cancelled: bool = False
    """The drive cancels the pipeline."""
    shadow: dict[str, Any] | None = None
    """The worker's ``shadow`` section (its store goes to a temporary directory)."""
    workflow_id: str | None = None
    """The pipeline's workflow id (default ``<name>-recorded``); a shared batch's answers reach a pipeline by
    a ticket made of its workflow id, so its replay needs the same id (the file's name)."""


TICKET = "I was charged twice for my March invoice. Please refund the second charge."
CONTRACT_PDF = (
    "data:application/pdf;base64,JVBERi0xLjQKJcfsj6IKMSAwIG9iago8PD4+CmVuZG9iagp0cmFpbGVyCjw8Pj4KJSVFT0YK"
)

RECORDINGS: list[Recording] = [
    Recording(
        "ticket-triage",
        "examples/ticket-triage.yaml",
        {"ticket": TICKET, "customer": "ACME Corp"},
        faults=[{"fault": "503", "model": "gpt-4.1", "retry_after": 0.1}],
    ),
    Recording(
        "approval-gate",
        "examples/approval-gate.yaml",
        {"customer": "ACME Corp", "amount": 120},
        drive=_approve_review,
    ),
    Recording(
        "contract-review",
        "examples/contract-review.yaml",
        {"contract_pdf": CONTRACT_PDF, "question": "Is liability capped, and at what amount?"},
    ),
    Recording(
        "batch-summaries",
        "examples/batch-summaries.yaml",
        {
            "reviews": [
                "Great lamp.",
                "Arrived broken [[sim: fault=500 times=1 key=broken]]",
                "Too dim.",
                "Fine.",
            ]
        },
        batches={"complete_after_s": 1},
    ),
    Recording(
        "batch-cancelled",
        "examples/batch-summaries.yaml",
        {"reviews": ["Great lamp.", "Too dim."]},
        drive=_cancel_during_batch,
        batches={"complete_after_s": 3600},
        cancelled=True,
    ),
    Recording(
        "batch-shared",
        "tests/histories/batch-shared.yaml",
        {"document": "The lamp arrived on time and works."},
        drive=_save_the_batcher,
        batches={"complete_after_s": 0.5},
        workflow_id="batch-shared",
    ),
    Recording(
        "fan-out",
        "examples/fan-out.yaml",
        {"text": "The release went well.", "sections": ["intro", "results", "outlook"]},
    ),
    Recording(
        "refund-agent",
        "examples/refund-agent.yaml",
        {"request": f"My order B200 never arrived. [[sim: script='{_REFUND_SCRIPT}']]"},
        drive=_approve_refund,
        mcp=True,
    ),
    Recording(
        "limited",
        "examples/ticket-triage.yaml",
        {"ticket": TICKET, "customer": "ACME Corp"},
        limits={"models": {"openai": {"requests_per_second": 1}}},
    ),
    Recording(
        "shadowed",
        "tests/histories/shadowed.yaml",
        {"ticket": TICKET},
        faults=[{"fault": "503", "model": "claude-sonnet-4-5", "times": 1, "key": "shadowed-candidate"}],
        shadow={"models": {"openai/gpt-4.1": {"model": "anthropic/claude-sonnet-4-5"}}},
    ),
    Recording(
        "shadowed-bounded",
        "tests/histories/shadowed.yaml",
        {"ticket": TICKET},
        faults=[
            {"fault": "503", "model": "claude-sonnet-4-5", "times": 1, "key": "shadowed-candidate"},
            # the last step's candidate answers after the run's bounded wait at its close
            {"model": "claude-sonnet-4-5", "match": "Reply to this", "latency": 8},
        ],
        shadow={
            "models": {"openai/gpt-4.1": {"model": "anthropic/claude-sonnet-4-5"}},
            "close_wait_s": 3,
        },
    ),
    Recording(
        "driven",
        "tests/histories/driven.yaml",
        {"order": "A-1001"},
        drive=_drive_from_outside,
    ),
]


async def record(recording: Recording, client: Client, sim: SimulatorServer, out: Path) -> Path:
    sim.reset()
    sim.add_faults(recording.faults)
    if recording.batches is not None:
        async with httpx.AsyncClient() as http:
            (await http.post(f"{sim.url}/_sim/batches", json=recording.batches)).raise_for_status()
    registry = build_registry(provider_settings=simulator_settings(sim.url))
    queue = f"record-{uuid.uuid4().hex[:8]}"
    spec = load_pipeline(REPO / recording.pipeline)
    servers: dict[str, McpServerConfig] = {}
    if recording.mcp:  # the order desk's MCP server over stdio, started by the worker per call
        servers["orders"] = McpServerConfig(
            command=sys.executable, args=["-m", "examples.orders_mcp"], cwd=str(REPO)
        )
    limits = LimitsConfig.model_validate(recording.limits) if recording.limits is not None else None
    shadow = None
    if recording.shadow is not None:
        store = Path(tempfile.mkdtemp(prefix="kernelflow-record-")) / "shadow.db"
        shadow = ShadowConfig.model_validate({"store": f"sqlite:///{store}", **recording.shadow})
    async with build_worker(
        client, task_queue=queue, registry=registry, mcp_servers=servers, limits=limits, shadow=shadow
    ):
        handle = await start_pipeline(
            client,
            spec,
            recording.inputs,
            task_queue=queue,
            workflow_id=recording.workflow_id or f"{recording.name}-recorded",
        )
        await recording.drive(client, handle)
        try:
            await handle.result()
        except WorkflowFailureError:
            if not recording.cancelled:
                raise
    await registry.aclose()
    history = await handle.fetch_history()
    path = out / f"{recording.name}.json"
    path.write_text(history.to_json(), encoding="utf-8")
    return path


async def main(names: list[str]) -> None:
    chosen = [r for r in RECORDINGS if not names or r.name in names]
    temporal = shutil.which("temporal") or str(Path(sys.executable).parent / "temporal")
    async with await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal, dev_server_extra_args=["--log-level", "error"]
    ) as env:
        target = env.client.service_client.config.target_host
        client = await connect(target)
        await ensure_search_attributes(client, "default")
        with SimulatorServer() as sim:
            for recording in chosen:
                print(f"recorded {await record(recording, client, sim, HERE)}")


if __name__ == "__main__":
    import os

    asyncio.run(main(sys.argv[1:]))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown, which the SDK's runtime threads can abort

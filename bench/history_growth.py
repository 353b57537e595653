"""Figure 4: workflow history size after a long conversation, with and without payload storage.

``ConversationWorkflow`` makes N model calls over one growing conversation, each sending all of it.
Kernelflow's design keeps payloads of 64 KiB and more in the payload store (the history holds a
reference); the naive design sends the whole conversation inline into the history at every step (the
same workflow on a worker whose converter has storage off). History bytes and events come from the
server (``DescribeWorkflowExecution``: ``history_size_bytes``, ``history_length``) once the run has
ended, however it ended; nothing is extrapolated.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

from bench._common import Mode, Progress, Result, not_measured
from bench._durable import BenchDevServer, free_port

__all__ = ["run"]

_NAME = "4. history size after a long conversation"
_COUNTS: dict[Mode, dict[str, int]] = {
    "full": {"calls": 200, "turn_chars": 2000},
    "quick": {"calls": 40, "turn_chars": 2000},
    "smoke": {"calls": 6, "turn_chars": 2000},
}
_MODEL = "openai/gpt-4o-mini"


async def _conversation(
    target: str, sim_url: str, converter: Any, calls: int, turn_chars: int, progress: Progress, label: str
) -> dict[str, Any]:
    import asyncio

    from temporalio.client import Client, WorkflowFailureError

    from worker.app import build_registry, build_worker, simulator_settings
    from workflows.conversation import (
        CONVERSATION_WORKFLOW,
        ConversationInput,
        ConversationResult,
        ConversationWorkflow,
    )

    client = await Client.connect(target, data_converter=converter)
    registry = build_registry(provider_settings=simulator_settings(sim_url))
    queue = f"bench-history-{label}-{uuid.uuid4().hex[:6]}"
    outcome: dict[str, Any] = {}
    async with build_worker(
        client, task_queue=queue, registry=registry, extra_workflows=[ConversationWorkflow]
    ):
        handle = await client.start_workflow(
            CONVERSATION_WORKFLOW,
            ConversationInput(models=[_MODEL], calls=calls, user_turn_chars=turn_chars),
            id=f"bench-conversation-{label}-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
            result_type=ConversationResult,
        )
        result_task = asyncio.ensure_future(handle.result())
        while not result_task.done():
            await asyncio.wait({result_task}, timeout=1.0)
            try:
                done = await handle.query("progress", result_type=int)
            except Exception:
                continue
            progress.step(f"{label} calls", done, calls)
        try:
            result = result_task.result()
            outcome["status"] = "completed"
            outcome["final_chars"] = result.chars
            outcome["final_tokens_approx"] = result.chars // 4
            outcome["calls_completed"] = result.calls
        except WorkflowFailureError as exc:
            outcome["status"] = f"failed: {exc.cause or exc}"
        description = await handle.describe()
        info = description.raw_description.workflow_execution_info
        outcome["history_bytes"] = int(info.history_size_bytes)
        outcome["history_events"] = int(info.history_length)
        outcome["workflow_status"] = description.status.name if description.status else None
    await registry.aclose()
    return outcome


async def run(mode: Mode) -> list[Result]:
    counts = _COUNTS[mode]
    progress = Progress("4 history growth")
    try:
        from worker.config import PayloadSettings
        from worker.storage import build_data_converter
        from workflows.conversation import ConversationWorkflow  # noqa: F401
    except ImportError as exc:
        return [
            not_measured(
                _NAME,
                "MB",
                f"payload storage or the conversation workflow is not there yet ({exc})",
                target="value <= 10 MB",
            )
        ]
    from simulator.server import SimulatorProcess

    with (
        tempfile.TemporaryDirectory(prefix="kernelflow-bench-history-") as state,
        SimulatorProcess() as sim,
    ):
        store = Path(state) / "payloads"
        stored = build_data_converter(PayloadSettings(storage="filesystem", dir=store))
        inline = build_data_converter(PayloadSettings(storage="off"))
        server = BenchDevServer(
            state_dir=Path(state) / "temporal", port=free_port(), ui_port=free_port(), headless=True
        )
        async with server:
            progress.note("Kernelflow design: payload storage on")
            kernelflow = await _conversation(
                server.target, sim.url, stored, counts["calls"], counts["turn_chars"], progress, "storage"
            )
            kernelflow["payload_store_bytes"] = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
            progress.note("naive design: whole conversation inline in the history")
            naive = await _conversation(
                server.target, sim.url, inline, counts["calls"], counts["turn_chars"], progress, "inline"
            )
    mb = 1e6
    params = {
        "calls": counts["calls"],
        "user_turn_chars": counts["turn_chars"],
        "model": _MODEL,
        "kernelflow": kernelflow,
        "naive": naive,
        "threshold_bytes": 64 * 1024,
        "note": "quick/smoke modes run fewer calls; the figure is what was measured, not extrapolated",
    }
    return [
        Result(
            name=_NAME,
            value=kernelflow["history_bytes"] / mb,
            unit="MB",
            baseline="naive: conversation inline in history",
            baseline_value=naive["history_bytes"] / mb,
            params=params,
        ).check(value_at_most=10),
        Result(
            name="4. history events after a long conversation",
            value=float(kernelflow["history_events"]),
            unit="events",
            baseline="naive: conversation inline in history",
            baseline_value=float(naive["history_events"]),
            params={"calls": counts["calls"]},
        ),
    ]

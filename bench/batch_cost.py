"""Figure 13: a map in batch mode against the same map in realtime.

The same pipeline (a map of N items, one ``llm`` step each) runs twice against the simulator: once with
``mode: batch`` (the simulator keeps the batch in progress for a set time) and once in realtime. Reported:
the cost ratio batch/realtime recomputed here from the two runs' reported usage (per item for the batch
run) and the catalog's list price times ``kernel.pricing.BATCH_DISCOUNTS`` for answers that came through
the batch, checked against the costs the pipelines accounted; the CPU-seconds the worker process spent while the provider held the
batch (the worker runs in this process; nothing else runs here meanwhile), and the batch run's history
size and length as the server reports them.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench._common import Mode, Progress, Result
from bench._durable import BenchDevServer, free_port

__all__ = ["run"]

_COUNTS: dict[Mode, dict[str, float]] = {
    "full": {"items": 1000, "hold_s": 30},
    "quick": {"items": 200, "hold_s": 10},
    "smoke": {"items": 20, "hold_s": 3},
}
_MODEL = "openai/gpt-4o-mini"


def _spec(items: int, batch: bool) -> dict[str, Any]:
    step: dict[str, Any] = {
        "id": "answer",
        "model": _MODEL,
        "prompt": "Summarise review {{ item }} in a line",
    }
    if batch:
        step |= {"mode": "batch", "batch": {"poll_s": 1, "poll_max_s": 5}}
    return {
        "name": f"bench-batch-{'batch' if batch else 'realtime'}",
        "inputs": {"reviews": {"type": "array"}},
        "steps": [
            {
                "id": "each",
                "type": "map",
                "items": "{{ inputs.reviews }}",
                "concurrency": 50,
                "max_items": max(items, 1),
                "steps": [step],
            }
        ],
    }


def _price() -> Any:
    from kernel.pricing import DEFAULT_PRICES

    provider, model = _MODEL.split("/", 1)
    return DEFAULT_PRICES[provider][model]


def _priced(items: list[Any]) -> float:
    """The batch run's cost recomputed here from each item's reported usage and the catalog's list
    price: answers that came through the batch at the provider's published batch share, items that went
    realtime at the list price. Independent of the cost the pipeline accounted."""
    from kernel.pricing import BATCH_DISCOUNTS

    price, share = _price(), BATCH_DISCOUNTS[_MODEL.split("/", 1)[0]][0]
    return sum(price.cost(i.usage) * (share if i.via == "batch" else 1.0) for i in items)


async def _run(target: str, sim_url: str, items: int, hold_s: float, progress: Progress) -> dict[str, Any]:
    from temporalio.client import Client

    from kernel.pipeline import parse_pipeline
    from worker.app import build_registry, build_worker, simulator_settings
    from worker.client import start_pipeline
    from worker.storage import build_data_converter

    client = await Client.connect(target, data_converter=build_data_converter())
    registry = build_registry(provider_settings=simulator_settings(sim_url))
    queue = f"bench-batch-{uuid.uuid4().hex[:6]}"
    reviews = [f"r{i}" for i in range(items)]
    out: dict[str, Any] = {}
    async with httpx.AsyncClient() as http, build_worker(client, task_queue=queue, registry=registry):
        (await http.post(f"{sim_url}/_sim/batches", json={"complete_after_s": hold_s})).raise_for_status()
        progress.note(f"batch mode, {items} items, the provider holds the batch {hold_s:g} s")
        handle = await start_pipeline(
            client, parse_pipeline(_spec(items, True)), {"reviews": reviews}, task_queue=queue
        )
        for _ in range(600):
            if (await http.get(f"{sim_url}/_sim/batches")).json()["created"] >= 1:
                break
            await asyncio.sleep(0.2)
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(max(0.0, hold_s - 1.0))  # the provider works; the worker should be idle
        out["waiting_cpu_s"] = time.process_time() - cpu0
        out["waiting_wall_s"] = time.monotonic() - wall0
        batch = await handle.result()
        description = await handle.describe()
        info = description.raw_description.workflow_execution_info
        out["history_bytes"] = int(info.history_size_bytes)
        out["history_events"] = int(info.history_length)
        out["batch_cost_usd"] = batch.cost_usd
        report = batch.steps[0].batch
        out["report_saving_usd"] = report.saving_usd if report else None
        out["batch_items_via_batch"] = sum(1 for i in report.items if i.via == "batch") if report else 0
        out["batch_usage"] = batch.usage.model_dump()
        out["batch_cost_from_usage_usd"] = _priced(report.items if report else [])
        progress.note(f"realtime, {items} items")
        realtime_handle = await start_pipeline(
            client, parse_pipeline(_spec(items, False)), {"reviews": reviews}, task_queue=queue
        )
        realtime = await realtime_handle.result()
        out["realtime_cost_usd"] = realtime.cost_usd
        out["realtime_usage"] = realtime.usage.model_dump()
        out["realtime_cost_from_usage_usd"] = _price().cost(realtime.usage)
        realtime_info = (await realtime_handle.describe()).raw_description.workflow_execution_info
        out["realtime_history_bytes"] = int(realtime_info.history_size_bytes)
    await registry.aclose()
    return out


async def run(mode: Mode) -> list[Result]:
    from kernel.pricing import BATCH_DISCOUNTS

    counts = _COUNTS[mode]
    items, hold_s = int(counts["items"]), float(counts["hold_s"])
    progress = Progress("13 batch")
    from simulator.server import SimulatorProcess

    with tempfile.TemporaryDirectory(prefix="kernelflow-bench-batch-") as state, SimulatorProcess() as sim:
        server = BenchDevServer(
            state_dir=Path(state) / "temporal", port=free_port(), ui_port=free_port(), headless=True
        )
        async with server:
            measured = await _run(server.target, sim.url, items, hold_s, progress)
    params = {"items": items, "model": _MODEL, "provider_holds_batch_s": hold_s, **measured}
    # The ratio is recomputed from the two runs' usage and the price table; the costs the pipelines
    # accounted must agree with it, or the figure is not reported as met.
    ratio = measured["batch_cost_from_usage_usd"] / measured["realtime_cost_from_usage_usd"]
    accounted = measured["batch_cost_usd"] / measured["realtime_cost_usd"]
    params["accounted_ratio"] = accounted
    params["batch_share"] = BATCH_DISCOUNTS[_MODEL.split("/", 1)[0]]
    if abs(accounted - ratio) > 1e-6 * max(ratio, 1e-9):
        raise RuntimeError(
            f"the pipelines accounted a cost ratio of {accounted}, their usage prices at {ratio}"
        )
    return [
        Result(
            name="13. batch mode: cost batch/realtime",
            value=ratio,
            unit="ratio",
            baseline="the same map in realtime",
            baseline_value=1.0,
            params=params,
        ).check(value_at_most=0.55),
        Result(
            name="13. batch mode: worker CPU while the provider holds the batch",
            value=measured["waiting_cpu_s"],
            unit="CPU-s",
            params={"over_wall_s": measured["waiting_wall_s"], "items": items},
        ),
        Result(
            name="13. batch mode: history size",
            value=measured["history_bytes"] / 1e6,
            unit="MB",
            baseline="the same map in realtime",
            baseline_value=measured["realtime_history_bytes"] / 1e6,
            params={"events": measured["history_events"], "items": items},
        ),
    ]

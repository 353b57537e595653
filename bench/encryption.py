"""Figure 6: what encryption at rest costs. One dev server and simulator; two clients and two workers
with the same settings except the payload codec: ``plain`` (no encryption, no compression) and
``encrypted`` (AES-256-GCM with a file key ring, and zlib compression of payloads over 1 KiB).

- durable latency: one-step pipelines one after another, alternating sides (drift falls on both);
  p50 and p99, ratio encrypted / plain (target <= 1.05);
- durable throughput at concurrency 100, halves ordered plain, encrypted, encrypted, plain
  (target ratio >= 0.95);
- sizes: a three-step pipeline over a ~200 KB conversation (text, so it compresses as real ones do):
  the history's bytes and the payload store's bytes, encrypted+compressed / plain.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temporalio.client import Client

from bench._common import Mode, Progress, Result, percentile
from bench._durable import BenchDevServer, one_step_spec
from kernel.pipeline import parse_pipeline
from simulator.server import SimulatorProcess
from worker.app import build_registry, build_worker, connect, simulator_settings
from worker.client import start_pipeline
from worker.config import CompressionSettings, EncryptionSettings, PayloadSettings
from worker.devserver import free_port
from worker.keys import format_ring, generate_key

__all__ = ["measure", "run"]

_COUNTS: dict[Mode, dict[str, int]] = {
    "full": {"runs": 200, "warmup": 20, "workflows": 1000, "tp_warmup": 100},
    "quick": {"runs": 30, "warmup": 5, "workflows": 100, "tp_warmup": 20},
    "smoke": {"runs": 4, "warmup": 1, "workflows": 10, "tp_warmup": 2},
}
_CONCURRENCY = 100
_SIDES = ("plain", "encrypted")


@dataclass
class _Side:
    name: str
    client: Client
    queue: str
    store: Path


@contextlib.asynccontextmanager
async def _env() -> AsyncIterator[dict[str, _Side]]:
    with tempfile.TemporaryDirectory(prefix="kernelflow-bench-enc-") as tmp, SimulatorProcess() as sim:
        state = Path(tmp)
        keys = state / "keys"
        keys.mkdir()
        (keys / "default.keys").write_text(format_ring([generate_key()]))
        settings = {
            "plain": PayloadSettings(dir=state / "payloads-plain"),
            "encrypted": PayloadSettings(
                dir=state / "payloads-encrypted",
                encryption=EncryptionSettings(enabled=True, provider="file", options={"dir": str(keys)}),
                compression=CompressionSettings(enabled=True, min_bytes=1024),
            ),
        }
        async with BenchDevServer(
            state_dir=state, port=free_port(), ui_port=free_port(), headless=True
        ) as server:
            registry = build_registry(provider_settings=simulator_settings(sim.url))
            sides = {}
            async with contextlib.AsyncExitStack() as stack:
                for name in _SIDES:
                    client = await connect(server.target, payloads=settings[name])
                    queue = f"bench-{name}-{uuid.uuid4().hex[:6]}"
                    await stack.enter_async_context(build_worker(client, task_queue=queue, registry=registry))
                    sides[name] = _Side(name, client, queue, settings[name].dir)
                try:
                    yield sides
                finally:
                    await registry.aclose()


async def _once(side: _Side) -> float:
    started = time.perf_counter()
    handle = await start_pipeline(side.client, one_step_spec(), {}, task_queue=side.queue)
    result = await handle.result()
    elapsed = time.perf_counter() - started
    if result.status != "completed":
        raise RuntimeError(f"the {side.name} pipeline did not complete: {result}")
    return elapsed


async def _latency(sides: dict[str, _Side], mode: Mode, progress: Progress) -> list[Result]:
    counts = _COUNTS[mode]
    for _ in range(counts["warmup"]):
        for side in sides.values():
            await _once(side)
    times: dict[str, list[float]] = {name: [] for name in _SIDES}
    for number in range(counts["runs"]):
        order = _SIDES if number % 2 == 0 else _SIDES[::-1]
        for name in order:
            times[name].append(await _once(sides[name]))
        progress.step("latency runs", number + 1, counts["runs"])
    params = {
        "runs_per_side": counts["runs"],
        "warmup_per_side": counts["warmup"],
        "pipeline": "one llm step",
    }
    return [
        Result(
            name=f"6. encryption: durable latency p{q}",
            value=percentile(times["encrypted"], q) * 1e3,
            unit="ms",
            baseline="encryption off",
            baseline_value=percentile(times["plain"], q) * 1e3,
            params=params,
        ).check(ratio_at_most=1.05)
        for q in (50, 99)
    ]


async def _batch(once: Callable[[], Awaitable[Any]], count: int) -> float:
    remaining = count

    async def lane() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await once()

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(min(_CONCURRENCY, count))))
    return time.perf_counter() - started


async def _throughput(sides: dict[str, _Side], mode: Mode, progress: Progress) -> Result:
    counts = _COUNTS[mode]
    half = max(counts["workflows"] // 2, 1)
    for side in sides.values():
        await _batch(lambda side=side: _once(side), counts["tp_warmup"])  # type: ignore[misc]
    walls = dict.fromkeys(_SIDES, 0.0)
    for number, name in enumerate(("plain", "encrypted", "encrypted", "plain")):
        walls[name] += await _batch(lambda name=name: _once(sides[name]), half)  # type: ignore[misc]
        progress.step("throughput halves", number + 1, 4)
    rate = {name: 2 * half / walls[name] for name in _SIDES}
    return Result(
        name="6. encryption: durable throughput, c=100",
        value=rate["encrypted"],
        unit="workflows/s",
        baseline="encryption off",
        baseline_value=rate["plain"],
        params={"workflows_per_side": 2 * half, "concurrency": _CONCURRENCY},
    ).check(ratio_at_least=0.95)


def _conversation(size: int) -> str:
    source = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    return (source * (size // len(source) + 1))[:size]


async def _sizes(sides: dict[str, _Side]) -> list[Result]:
    spec = parse_pipeline(
        {
            "name": "bench-enc-size",
            "inputs": {"history": {"type": "string"}},
            "steps": [
                {"id": "first", "model": "openai/gpt-4o-mini", "prompt": "{{ inputs.history }} Summarise."},
                {
                    "id": "second",
                    "model": "openai/gpt-4o-mini",
                    "prompt": "{{ inputs.history }} {{ steps.first.output }}",
                },
                {
                    "id": "third",
                    "model": "openai/gpt-4o-mini",
                    "prompt": "{{ inputs.history }} {{ steps.second.output }}",
                },
            ],
        }
    )
    conversation = _conversation(200_000)
    history_bytes: dict[str, int] = {}
    store_bytes: dict[str, int] = {}
    for name in _SIDES:
        side = sides[name]
        handle = await start_pipeline(side.client, spec, {"history": conversation}, task_queue=side.queue)
        await handle.result()
        history = await handle.fetch_history()
        history_bytes[name] = sum(event.ByteSize() for event in history.events)
        store_bytes[name] = sum(p.stat().st_size for p in side.store.rglob("*") if p.is_file())
    params = {
        "conversation_bytes": len(conversation),
        "steps": 3,
        "compression": "zlib level 6, payloads >= 1 KiB",
    }
    total = {name: history_bytes[name] + store_bytes[name] for name in _SIDES}
    params["note"] = (
        "compressed, the conversation fits under the 64 KiB storage threshold and stays in the history"
        if store_bytes["encrypted"] == 0
        else "the conversation is kept in the payload store on both sides"
    )
    return [
        Result(
            name="6. encryption+compression: history + payload store",
            value=total["encrypted"] / 1e6,
            unit="MB",
            baseline="encryption off",
            baseline_value=total["plain"] / 1e6,
            params=params,
        ),
        Result(
            name="6. encryption+compression: history size",
            value=history_bytes["encrypted"] / 1e6,
            unit="MB",
            baseline="encryption off",
            baseline_value=history_bytes["plain"] / 1e6,
            params=params,
        ),
        Result(
            name="6. encryption+compression: payload-store size",
            value=store_bytes["encrypted"] / 1e6,
            unit="MB",
            baseline="encryption off",
            baseline_value=store_bytes["plain"] / 1e6,
            params=params,
        ),
    ]


async def measure(sides: dict[str, _Side], mode: Mode, progress: Progress) -> list[Result]:
    results = await _latency(sides, mode, progress)
    results.append(await _throughput(sides, mode, progress))
    results.extend(await _sizes(sides))
    return results


async def run(mode: Mode) -> list[Result]:
    progress = Progress("6 encryption")
    progress.note("starting dev server, simulator and two workers (encryption off and on)")
    async with _env() as sides:
        return await measure(sides, mode, progress)

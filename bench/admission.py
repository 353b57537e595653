"""Figure 12: admission control. One limit (requests per second) on one model, enforced by the
simulator with 429s as well; a burst of several times the limit from many pipelines on 1, 2 and 4
`kernelflow worker` processes.

- achieved rate as a ratio of the limit, measured from the simulator's own request timestamps
  (requests after the first, over the time from the first to the last); the most requests the
  simulator saw in any window of the limit's period is reported too (never above the limit);
- 429s the pipelines saw (the simulator's count of refused requests);
- admission overhead per call: one-step pipelines one after another on an in-process worker, with a
  limit that never binds against no limits, p50 and p99 of the pipeline's duration;
- admissions per second one limiter workflow sustains (``bench/limiter_throughput.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import limiter_throughput
from bench._common import Mode, Progress, Result, percentile
from bench._durable import BenchDevServer, one_step_spec
from kernel.limits import LimitsConfig, RateLimit
from simulator.core import RateLimitRule, SimulatorConfig
from simulator.server import SimulatorServer
from worker.app import build_registry, build_worker, connect, simulator_settings
from worker.client import start_pipeline
from worker.config import PayloadSettings
from worker.devserver import free_port

__all__ = ["run"]

MODEL = "openai/gpt-4o-mini"
RATE = 5.0
_COUNTS: dict[Mode, dict[str, int]] = {
    "full": {"calls": 150, "overhead": 200},
    "quick": {"calls": 60, "overhead": 60},
    "smoke": {"calls": 10, "overhead": 5},
}
PROCESSES = (1, 2, 4)


def _max_in_window(times: list[float], window: float) -> int:
    ordered = sorted(times)
    best, start = 0, 0
    for end, at in enumerate(ordered):
        while ordered[start] <= at - window:
            start += 1
        best = max(best, end - start + 1)
    return best


def _start_workers(
    target: str, sim_url: str, queue: str, config: Path, count: int
) -> list[subprocess.Popen[bytes]]:
    kernelflow = str(Path(sys.executable).parent / "kernelflow")
    environ = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")},
        "TEMPORAL_ADDRESS": target,
        "KERNELFLOW_TASK_QUEUE": queue,
        "KERNELFLOW_CONFIG": str(config),
        "KERNELFLOW_PAYLOADS_STORAGE": "off",
        "KERNELFLOW_LOG_FORMAT": "json",
        "KERNELFLOW_LOG_LEVEL": "warning",
        "OPENAI_BASE_URL": sim_url.rstrip("/") + "/v1",
        "OPENAI_API_KEY": "sim-key",
    }
    return [
        subprocess.Popen(
            [kernelflow, "worker"], env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(count)
    ]


async def _burst(
    client: Any, target: str, state: Path, processes: int, calls: int, progress: Progress
) -> dict[str, Any]:
    config = SimulatorConfig(rate_limits={"gpt-4o-mini": RateLimitRule(requests=int(RATE), window_s=1.0)})
    with SimulatorServer(config=config) as sim:
        queue = f"admission-{processes}-{uuid.uuid4().hex[:6]}"
        path = state / f"{queue}.yaml"
        limits = {"limits": {"models": {MODEL: {"requests_per_second": RATE}}}}
        path.write_text(json.dumps(limits))
        workers = _start_workers(target, sim.url, queue, path, processes)
        try:
            spec = one_step_spec()
            progress.note(f"{processes} worker processes: {calls} calls at {RATE:g}/s")
            handles = [await start_pipeline(client, spec, {}, task_queue=queue) for _ in range(calls)]
            results = await asyncio.gather(*(h.result() for h in handles))
            if any(r.status != "completed" for r in results):
                raise RuntimeError("a pipeline did not complete")
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
        times = sim.simulator.admitted_times("gpt-4o-mini")
        refused = sim.simulator.stats()["rate_limited"]
    span = max(times) - min(times)
    return {
        "rate": (len(times) - 1) / span if span > 0 else 0.0,
        "max_in_window": _max_in_window(times, 1.0),
        "refused": refused,
    }


async def _durations(client: Any, registry: Any, limits: LimitsConfig | None, count: int) -> list[float]:
    queue = f"overhead-{uuid.uuid4().hex[:6]}"
    spec = one_step_spec()
    durations: list[float] = []
    async with build_worker(client, task_queue=queue, registry=registry, limits=limits):
        for n in range(count + 2):
            started = time.perf_counter()
            handle = await start_pipeline(client, spec, {}, task_queue=queue)
            await handle.result()
            if n >= 2:  # warm-up
                durations.append((time.perf_counter() - started) * 1000)
    return durations


async def run(mode: Mode) -> list[Result]:
    counts = _COUNTS[mode]
    progress = Progress("12 admission control")
    with tempfile.TemporaryDirectory(prefix="kernelflow-bench-") as state_dir:
        state = Path(state_dir)
        server = BenchDevServer(state_dir=state_dir, port=free_port(), ui_port=free_port(), headless=True)
        async with server:
            client = await connect(server.target, payloads=PayloadSettings(storage="off"))
            measured = {
                n: await _burst(client, server.target, state, n, counts["calls"], progress) for n in PROCESSES
            }
            throughput = await limiter_throughput.measure(client, mode, progress)
            with SimulatorServer(config=SimulatorConfig()) as sim:
                registry = build_registry(provider_settings=simulator_settings(sim.url))
                try:
                    progress.note("admission overhead")
                    plain = await _durations(client, registry, None, counts["overhead"])
                    loose = LimitsConfig(models={MODEL: RateLimit(requests_per_second=10_000)})
                    limited = await _durations(client, registry, loose, counts["overhead"])
                    await _durations(client, registry, None, 0)  # switch the process back to no limits
                finally:
                    await registry.aclose()

    results = [_rate_result(n, measured[n], counts["calls"]) for n in PROCESSES]
    results.append(
        Result(
            name="12. 429s seen by pipelines",
            value=float(sum(m["refused"] for m in measured.values())),
            unit="429s",
            params={"calls": counts["calls"] * len(PROCESSES)},
        ).check(value_at_most=0)
    )
    for q in (50, 99):
        results.append(
            Result(
                name=f"12. admission overhead per call p{q}",
                value=percentile(limited, q) - percentile(plain, q),
                unit="ms",
                params={
                    "calls": counts["overhead"],
                    "with_limits_ms": round(percentile(limited, q), 2),
                    "without_limits_ms": round(percentile(plain, q), 2),
                },
            )
        )
    results.append(throughput)
    return results


def _rate_result(processes: int, measured: dict[str, Any], calls: int) -> Result:
    """The target is 0.95-1.00 of the limit, never above. "Never above" is judged where it matters, in
    every window of the limit's period at the simulator: (requests - 1) / span may pass the limit by a
    little with no window above it, when the first and the last windows are both full."""
    result = Result(
        name=f"12. admitted rate / limit, {processes} worker process{'es' if processes > 1 else ''}",
        value=measured["rate"],
        unit="req/s",
        baseline=f"limit {RATE:g} req/s",
        baseline_value=RATE,
        params={
            "calls": calls,
            "max_requests_in_any_1s_window": measured["max_in_window"],
            "429s_seen": measured["refused"],
        },
    )
    result.target = f"ratio >= 0.95 and most requests in any 1 s window <= {RATE:g}"
    result.met = measured["max_in_window"] <= RATE and measured["rate"] / RATE >= 0.95
    return result

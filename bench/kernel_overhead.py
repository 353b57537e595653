"""Figure 1: what the kernel adds to one chat call, against raw httpx and against LiteLLM.

Three clients post the same chat request to the same upstream (``bench.upstream``, in its own process)
through one shared ``httpx.AsyncClient`` (the pool settings the kernel's providers use):

* ``raw``: ``client.post(json=...)`` then ``response.json()`` and reading the text;
* ``kernel``: ``OpenAIProvider.chat(ChatRequest(...))``, the request model built on each call;
* ``litellm``: ``litellm.acompletion("openai/gpt-4o-mini", api_base=..., retries off)``.

After a warm-up, two paired phases run at each concurrency: raw vs kernel, then kernel vs LiteLLM. In
a phase the two sides alternate round by round (AB, BA, ...), so drift and bursts of other load on a
shared machine fall on both alike; the ratio is the median of the per-round ratios. "Time per call" is
wall time of a round divided by its calls: at concurrency 1 the mean latency, at 64 the inverse of
throughput.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from bench._common import Mode, Progress, Result, not_measured, percentile, proc_cpu_seconds, summary_us
from bench.upstream import CANNED_COMPLETION, MinimalUpstream
from kernel.contracts import ChatRequest, UserMessage
from kernel.provider import ProviderSettings
from providers.openai import OpenAIProvider
from simulator.server import SimulatorProcess

__all__ = ["run"]

PROMPT = "Summarise the ticket in one sentence: the printer on floor 3 jams on every duplex job."
MODEL = "gpt-4o-mini"
_COUNTS: dict[Mode, dict[str, int]] = {
    "full": {"calls": 5000, "warmup": 300, "rounds": 20, "cpu_loops": 20000, "sim_calls": 1000},
    "quick": {"calls": 500, "warmup": 100, "rounds": 10, "cpu_loops": 5000, "sim_calls": 200},
    "smoke": {"calls": 40, "warmup": 10, "rounds": 2, "cpu_loops": 300, "sim_calls": 20},
}
_CONCURRENCY = (1, 64)
_DRAIN_S = 2.0

Call = Callable[[], Awaitable[str]]


def _shared_client() -> httpx.AsyncClient:
    """The client ``HttpProvider`` builds for itself, so raw httpx gets the same pool and timeouts."""
    settings = ProviderSettings()
    limits = OpenAIProvider.max_connections
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
        limits=httpx.Limits(max_connections=limits, max_keepalive_connections=limits),
    )


def _raw_call(client: httpx.AsyncClient, base_url: str) -> Call:
    url = f"{base_url}/chat/completions"
    headers = {"Authorization": "Bearer sim-key"}

    async def call() -> str:
        payload = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
        response = await client.post(url, json=payload, headers=headers)
        response.raise_for_status()
        text: str = response.json()["choices"][0]["message"]["content"]
        return text

    return call


def _kernel_call(provider: OpenAIProvider) -> Call:
    async def call() -> str:
        response = await provider.chat(ChatRequest(model=MODEL, messages=[UserMessage(content=PROMPT)]))
        return response.text

    return call


def _litellm_call(client: httpx.AsyncClient, base_url: str) -> tuple[Call | None, str | None]:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_LOG", "ERROR")
    try:
        import litellm
    except Exception as exc:  # an import failure of any kind is reported, not raised
        return None, f"litellm cannot be imported ({type(exc).__name__}: {exc})"
    litellm.suppress_debug_info = True
    litellm.telemetry = False
    litellm.aclient_session = client  # the same pool as the other two sides

    async def call() -> str:
        response = await litellm.acompletion(
            model=f"openai/{MODEL}",
            messages=[{"role": "user", "content": PROMPT}],
            api_base=base_url,
            api_key="sim-key",
            num_retries=0,
            max_retries=0,
        )
        text: str = response.choices[0].message.content
        return text

    return call, None


async def _drive(call: Call, count: int, concurrency: int) -> tuple[float, list[float]]:
    """Run ``count`` calls, ``concurrency`` at a time; wall seconds and each call's latency."""
    latencies: list[float] = []
    remaining = count

    async def lane() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(min(concurrency, count))))
    return time.perf_counter() - started, latencies


class _Side:
    def __init__(self, name: str, call: Call) -> None:
        self.name = name
        self.call = call
        self.wall = 0.0
        self.calls = 0
        self.latencies: list[float] = []
        self.client_cpu = 0.0
        self.upstream_cpu = 0.0
        self.rounds: list[float] = []  # time per call of each round

    @property
    def per_call_us(self) -> float:
        return self.wall / self.calls * 1e6

    def stats(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "time_per_call_us": round(self.per_call_us, 1),
            "calls_per_s": round(self.calls / self.wall, 1),
            **summary_us(self.latencies),
            "client_cpu_us_per_call": round(self.client_cpu / self.calls * 1e6, 1),
            "upstream_cpu_us_per_call": round(self.upstream_cpu / self.calls * 1e6, 1),
        }


async def _measure(
    sides: list[_Side], *, calls: int, rounds: int, concurrency: int, upstream_pid: int, progress: Progress
) -> None:
    per_round = max(calls // rounds, 1)
    total = per_round * rounds * len(sides)
    done = 0
    for number in range(rounds):
        shift = number % len(sides)
        for side in sides[shift:] + sides[:shift]:
            cpu, upstream = time.process_time(), proc_cpu_seconds(upstream_pid)
            wall, latencies = await _drive(side.call, per_round, concurrency)
            side.client_cpu += time.process_time() - cpu
            side.upstream_cpu += proc_cpu_seconds(upstream_pid) - upstream
            side.wall += wall
            side.rounds.append(wall / per_round)
            side.calls += per_round
            side.latencies += latencies
            done += per_round
            progress.step(f"concurrency {concurrency}, {'/'.join(s.name for s in sides)}", done, total)


def _paired_ratio(side: _Side, other: _Side) -> float:
    return statistics.median(a / b for a, b in zip(side.rounds, other.rounds, strict=True))


def _ratio_spread(side: _Side, other: _Side) -> dict[str, float]:
    """The spread of per-round ratios: how much the machine's other load moved them."""
    ratios = [a / b for a, b in zip(side.rounds, other.rounds, strict=True)]
    return {f"p{q}": round(percentile(ratios, q), 3) for q in (10, 25, 75, 90)}


def _pure_cpu(loops: int) -> tuple[float, float]:
    """Microseconds per call without I/O: build, map and encode the request, decode and parse a
    canned response. The baseline does what the raw httpx side does: a dict, dumps, loads, a lookup."""
    provider = OpenAIProvider(settings=ProviderSettings(base_url="http://127.0.0.1:9/v1", api_key="k"))
    body = json.dumps(CANNED_COMPLETION).encode()

    def kernel_once() -> str:
        request = ChatRequest(model=MODEL, messages=[UserMessage(content=PROMPT)])
        provider.check_chat(request)
        provider._auth_headers()
        json.dumps(provider._map_request(request, stream=False)).encode()
        return provider._parse_response(json.loads(body), MODEL).text

    def raw_once() -> str:
        payload = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
        json.dumps(payload).encode()
        text: str = json.loads(body)["choices"][0]["message"]["content"]
        return text

    # CPU time of this process, not wall time: on a shared machine a batch may wait for a core, and
    # that wait is not the kernel's cost.
    results: dict[str, list[float]] = {"kernel": [], "raw": []}
    for _ in range(5):
        for name, once in (("kernel", kernel_once), ("raw", raw_once)):
            started = time.process_time()
            for _ in range(loops // 5):
                once()
            results[name].append((time.process_time() - started) / (loops // 5) * 1e6)
    return min(results["kernel"]), min(results["raw"])


async def _upstream_cost(upstream_pid: int, base_url: str, calls: int, progress: Progress) -> dict[str, Any]:
    """Raw httpx against one upstream at concurrency 1 and 64: its CPU per request and time per call."""
    out: dict[str, Any] = {}
    async with _shared_client() as client:
        call = _raw_call(client, base_url)
        await _drive(call, 20, 4)
        for concurrency in _CONCURRENCY:
            cpu = proc_cpu_seconds(upstream_pid)
            wall, _ = await _drive(call, calls, concurrency)
            used = proc_cpu_seconds(upstream_pid) - cpu
            out[f"c{concurrency}"] = {
                "upstream_cpu_us_per_request": round(used / calls * 1e6, 1),
                "raw_httpx_time_per_call_us": round(wall / calls * 1e6, 1),
            }
            progress.step(f"upstream alone, concurrency {concurrency}", calls, calls)
    return out


async def run(mode: Mode) -> list[Result]:
    counts = _COUNTS[mode]
    progress = Progress("1 kernel overhead")
    results: list[Result] = []

    # The simulator's own cost, to show why the minimal upstream is used for this figure.
    with SimulatorProcess() as sim:
        simulator_cost = await _upstream_cost(sim.pid, f"{sim.url}/v1", counts["sim_calls"], progress)

    with MinimalUpstream() as upstream:
        base_url = f"{upstream.url}/v1"
        minimal_cost = await _upstream_cost(upstream.pid, base_url, counts["sim_calls"], progress)
        async with _shared_client() as client:
            provider = OpenAIProvider(
                settings=ProviderSettings(base_url=base_url, api_key="sim-key"), http_client=client
            )
            litellm_call, litellm_reason = _litellm_call(client, base_url)
            calls: list[tuple[str, Call]] = [
                ("raw", _raw_call(client, base_url)),
                ("kernel", _kernel_call(provider)),
            ]
            if litellm_call is not None:
                calls.append(("litellm", litellm_call))
            for name, call in calls:
                progress.note(f"warm-up {name}")
                await _drive(call, counts["warmup"], 8)
            answers = {name: await call() for name, call in calls}
            if len(set(answers.values())) != 1:
                raise RuntimeError(f"the sides disagree on the answer: {answers}")

            await asyncio.sleep(_DRAIN_S)
            for concurrency in _CONCURRENCY:
                # Two paired phases: raw vs kernel, then kernel vs LiteLLM; within a phase the two sides
                # alternate round by round (AB, BA, ...) and the ratio is the median of the per-round
                # ratios, so a burst of other load on the machine falls on one pair, not on one side.
                pairs = [("raw", "kernel")] + ([("kernel", "litellm")] if litellm_call is not None else [])
                by_call = dict(calls)
                phases: dict[str, tuple[_Side, _Side]] = {}
                for first, second in pairs:
                    phase = (_Side(first, by_call[first]), _Side(second, by_call[second]))
                    await _measure(
                        list(phase),
                        calls=counts["calls"],
                        rounds=counts["rounds"],
                        concurrency=concurrency,
                        upstream_pid=upstream.pid,
                        progress=progress,
                    )
                    await asyncio.sleep(_DRAIN_S)  # let LiteLLM's background logging finish
                    phases[second] = phase
                raw, kernel = phases["kernel"]
                common: dict[str, Any] = {
                    "concurrency": concurrency,
                    "calls_per_side": kernel.calls,
                    "rounds": counts["rounds"],
                    "upstream": "bench.upstream (canned reply, own process)",
                    "definition": "time per call = wall time / calls (mean latency at c=1, 1/throughput at "
                    "c=64); ratio = median over paired rounds of kernel time per call / other side's",
                }
                results.append(
                    Result(
                        name=f"1. kernel vs raw httpx, time per call, c={concurrency}",
                        value=kernel.per_call_us,
                        unit="us/call",
                        baseline="raw httpx",
                        baseline_value=raw.per_call_us,
                        ratio=_paired_ratio(kernel, raw),
                        params={
                            **common,
                            "raw": raw.stats(),
                            "kernel": kernel.stats(),
                            "ratio_of_totals": round(kernel.wall / raw.wall, 4),
                            "paired_ratio_spread": _ratio_spread(kernel, raw),
                        },
                    ).check(ratio_at_most=1.15)
                )
                if "litellm" in phases:
                    kernel_l, lite = phases["litellm"]
                    results.append(
                        Result(
                            name=f"1. kernel vs LiteLLM, time per call, c={concurrency}",
                            value=kernel_l.per_call_us,
                            unit="us/call",
                            baseline="litellm.acompletion",
                            baseline_value=lite.per_call_us,
                            ratio=_paired_ratio(kernel_l, lite),
                            params={
                                **common,
                                "kernel": kernel_l.stats(),
                                "litellm": lite.stats(),
                                "ratio_of_totals": round(kernel_l.wall / lite.wall, 4),
                                "paired_ratio_spread": _ratio_spread(kernel_l, lite),
                            },
                        ).check(ratio_at_most=0.25)
                    )
                else:
                    results.append(
                        not_measured(
                            f"1. kernel vs LiteLLM, time per call, c={concurrency}",
                            "us/call",
                            litellm_reason or "litellm unavailable",
                            target="ratio <= 0.25",
                        )
                    )
                results.append(
                    Result(
                        name=f"1. client CPU per call, kernel vs raw httpx, c={concurrency}",
                        value=kernel.client_cpu / kernel.calls * 1e6,
                        unit="us/call",
                        baseline="raw httpx",
                        baseline_value=raw.client_cpu / raw.calls * 1e6,
                        params={
                            "definition": "CPU time (user + system) of the client process per call over "
                            "the raw-vs-kernel phase; less sensitive than wall time to other load",
                            "concurrency": concurrency,
                            "litellm_client_cpu_us_per_call": phases["litellm"][1].stats()[
                                "client_cpu_us_per_call"
                            ]
                            if "litellm" in phases
                            else None,
                        },
                    )
                )
                if concurrency == 1:
                    for q in (50, 99):
                        added = percentile(kernel.latencies, q) - percentile(raw.latencies, q)
                        results.append(
                            Result(
                                name=f"1. added latency over raw httpx, p{q}, c=1",
                                value=added * 1e6,
                                unit="us",
                                params={
                                    "definition": f"p{q}(kernel latency) - p{q}(raw httpx latency)",
                                    "kernel_us": round(percentile(kernel.latencies, q) * 1e6, 1),
                                    "raw_us": round(percentile(raw.latencies, q) * 1e6, 1),
                                    "median_of_raw_us": round(statistics.median(raw.latencies) * 1e6, 1),
                                },
                            )
                        )
            await provider.aclose()

    kernel_cpu, raw_cpu = _pure_cpu(counts["cpu_loops"])
    progress.step("pure CPU", counts["cpu_loops"], counts["cpu_loops"])
    results.append(
        Result(
            name="1. kernel pure CPU per call (no I/O)",
            value=kernel_cpu,
            unit="us/call",
            baseline="dict + json dumps/loads",
            baseline_value=raw_cpu,
            params={
                "loops": counts["cpu_loops"],
                "kernel_steps": "ChatRequest(...), check_chat, auth headers, _map_request, json.dumps, "
                "json.loads, _parse_response",
                "added_us": round(kernel_cpu - raw_cpu, 2),
                "statistic": "best of 5 batches of process CPU time (runs before 2026-11-29 used wall time)",
            },
        )
    )
    results.append(
        Result(
            name="1. upstream CPU per request (minimal vs simulator)",
            value=minimal_cost["c64"]["upstream_cpu_us_per_request"],
            unit="us/request",
            baseline="simulator (uvicorn + starlette)",
            baseline_value=simulator_cost["c64"]["upstream_cpu_us_per_request"],
            params={
                "minimal_upstream": minimal_cost,
                "simulator": simulator_cost,
                "calls": counts["sim_calls"],
                "client": "raw httpx",
            },
        )
    )
    return results

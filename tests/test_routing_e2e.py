"""Routing end to end: real Temporal server, real worker, real HTTP to the simulator.

Circuit breakers skip a failing model across pipelines of one worker and let a probe through after the
cool-down (the breakers' clock is the test's, so nothing waits for real time); weighted balancing
spreads a step's calls; a changed config file re-points an alias for the next steps of pipelines
already running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from temporalio.client import Client
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

from kernel.contracts import ChatRequest, ChatResponse
from kernel.pipeline import parse_pipeline
from kernel.provider import ProviderSettings
from kernel.registry import Registry
from kernel.routing import BreakerBoard, BreakerSettings
from providers.openai import OpenAIProvider
from simulator.server import SimulatorServer
from worker.app import ConfigReloader, build_registry, build_worker, simulator_settings
from worker.client import reroute, start_pipeline
from worker.config import ConfigWatcher, KernelflowConfig, load_config
from workflows.pipeline import PipelineResult, PipelineWorkflow

_FAST_RETRY = {"max_attempts": 2, "initial_interval_s": 0.05}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class _Counter:
    """A count that tests can wait on."""

    def __init__(self) -> None:
        self.value = 0
        self._changed = asyncio.Condition()

    async def add(self) -> None:
        async with self._changed:
            self.value += 1
            self._changed.notify_all()

    async def reach(self, value: int, what: str) -> None:
        try:
            async with asyncio.timeout(30), self._changed:
                await self._changed.wait_for(lambda: self.value >= value)
        except TimeoutError:
            pytest.fail(f"timed out waiting until {what}")


async def _run(client: Client, spec: dict[str, Any], task_queue: str) -> PipelineResult:
    handle = await start_pipeline(client, parse_pipeline(spec), {}, task_queue=task_queue)
    return await handle.result()


def _queue() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


# --- circuit breaker -----------------------------------------------------------------------------


async def test_breaker_skips_a_failing_model_across_pipelines_then_probes(
    client: Client, registry: Registry, sim: SimulatorServer
) -> None:
    clock = FakeClock()
    board = BreakerBoard(BreakerSettings(failure_threshold=3, cooldown_s=30), clock=clock)
    spec = {
        "name": "breaker",
        "steps": [
            {
                "id": "answer",
                "model": "openai/gpt-4.1",
                "fallbacks": ["openai/gpt-4o-mini"],
                "prompt": "hello",
                "retry": _FAST_RETRY,
            }
        ],
    }
    sim.add_faults([{"fault": "503", "model": "gpt-4.1"}])
    queue = _queue()
    async with build_worker(client, task_queue=queue, registry=registry, breakers=board):
        first = await _run(client, spec, queue)  # 2 failures: still closed
        second = await _run(client, spec, queue)  # the 3rd failure opens it; its retry is refused
        assert sim.stats()["by_model"]["gpt-4.1"] == 3
        assert [f.error_type for f in first.steps[0].failures] == ["Overloaded"]
        assert [f.error_type for f in second.steps[0].failures] == ["CircuitOpen"]

        skipping = await asyncio.gather(*(_run(client, spec, queue) for _ in range(5)))
        assert sim.stats()["by_model"]["gpt-4.1"] == 3, "an open circuit still let calls through"
        for result in [first, second, *skipping]:
            assert result.status == "completed"
            assert result.steps[0].model == "openai/gpt-4o-mini"
        refusal = skipping[0].steps[0].failures[0]
        assert refusal.model == "openai/gpt-4.1" and refusal.error_type == "CircuitOpen"
        assert "circuit open for openai/gpt-4.1" in refusal.message
        assert "3 consecutive retryable failures" in refusal.message and "Overloaded" in refusal.message
        assert "2023-11-14T22:13:50+00:00" in refusal.message

        clock.now += 30  # cool-down over, model still broken: one probe, then open again
        probed = await _run(client, spec, queue)
        assert sim.stats()["by_model"]["gpt-4.1"] == 4
        assert probed.steps[0].model == "openai/gpt-4o-mini"
        assert "the probe call failed" in probed.steps[0].failures[0].message

        sim.reset()  # the model recovers
        clock.now += 30
        healed = [await _run(client, spec, queue) for _ in range(2)]
        assert [r.steps[0].model for r in healed] == ["openai/gpt-4.1"] * 2
        assert all(r.steps[0].failures == [] for r in healed)
        assert sim.stats()["by_model"] == {"gpt-4.1": 2}
    assert [s.state for s in board.snapshot()] == ["closed", "closed"]


async def test_invalid_requests_do_not_open_the_circuit(
    client: Client, registry: Registry, sim: SimulatorServer
) -> None:
    board = BreakerBoard(BreakerSettings(failure_threshold=2), clock=FakeClock())
    spec = {
        "name": "refused",
        "steps": [
            {
                "id": "answer",
                "model": "openai/gpt-4.1",
                "fallbacks": ["openai/gpt-4o-mini"],
                "prompt": "hello",
                "retry": _FAST_RETRY,
            }
        ],
    }
    sim.add_faults([{"fault": "400", "model": "gpt-4.1"}])
    queue = _queue()
    async with build_worker(client, task_queue=queue, registry=registry, breakers=board):
        results = [await _run(client, spec, queue) for _ in range(4)]
    assert [f.error_type for r in results for f in r.steps[0].failures] == ["InvalidRequest"] * 4
    assert sim.stats()["by_model"]["gpt-4.1"] == 4
    assert {s.key: s.state for s in board.snapshot()}["openai/gpt-4.1"] == "closed"


# --- weighted balancing --------------------------------------------------------------------------


async def test_balance_spreads_calls_by_weight_and_replays(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = {
        "name": "balanced",
        "steps": [
            {
                "id": "answer",
                "model": "openai/gpt-4o-mini",
                "balance": [
                    {"model": "openai/gpt-4o-mini", "weight": 3},
                    {"model": "openai/gpt-4.1-nano", "weight": 1},
                ],
                "prompt": "hello",
            }
        ],
    }
    handles = await asyncio.gather(
        *(start_pipeline(client, parse_pipeline(spec), {}, task_queue=task_queue) for _ in range(50))
    )
    results = await asyncio.gather(*(h.result() for h in handles))
    used = Counter(r.steps[0].model for r in results)
    # Binomial(50, 1/4): the lighter model is unused with p ~ 6e-7 and outnumbers the heavier with p ~ 1e-4.
    assert set(used) == {"openai/gpt-4o-mini", "openai/gpt-4.1-nano"}
    assert used["openai/gpt-4o-mini"] > used["openai/gpt-4.1-nano"]
    assert sim.stats()["by_model"] == {
        "gpt-4o-mini": used["openai/gpt-4o-mini"],
        "gpt-4.1-nano": used["openai/gpt-4.1-nano"],
    }

    replayer = Replayer(
        workflows=[PipelineWorkflow],
        data_converter=client.data_converter,
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    for handle in handles[:5]:
        await replayer.replay_workflow(await handle.fetch_history())  # the pick is in the history


# --- alias hot-reload ----------------------------------------------------------------------------


class _Gate:
    """Holds calls of the gated provider until opened, counting arrivals."""

    def __init__(self) -> None:
        self.arrived = _Counter()
        self.opened = asyncio.Event()


def _gated_provider(gate: _Gate) -> type[OpenAIProvider]:
    class GatedProvider(OpenAIProvider):
        name: ClassVar[str] = "gated"

        async def chat(self, request: ChatRequest) -> ChatResponse:
            await gate.arrived.add()
            await gate.opened.wait()
            return await super().chat(request)

    return GatedProvider


def _write_config(path: Path, aliases: dict[str, str]) -> None:
    staging = path.with_suffix(".tmp")
    staging.write_text(yaml.safe_dump({"aliases": aliases}), encoding="utf-8")
    os.replace(staging, path)


@contextlib.asynccontextmanager
async def _reloading_worker(
    client: Client, config_file: Path, sim: SimulatorServer, gate: _Gate
) -> AsyncIterator[tuple[str, ConfigWatcher, _Counter]]:
    """A worker wired like ``run_worker``: its config file is watched and applied while it runs."""
    gated = _gated_provider(gate)
    settings = {
        **simulator_settings(sim.url),
        "gated": ProviderSettings(base_url=sim.url.rstrip("/") + "/v1", api_key="sim-key"),
    }

    def registry_for(config: KernelflowConfig) -> Registry:
        registry = build_registry(config, provider_settings=settings)
        registry.register(gated)
        return registry

    config = load_config(config_file)
    from activities.llm import LlmActivities

    activities = LlmActivities(registry_for(config), breakers=BreakerBoard())
    reloader = ConfigReloader(activities, registry_factory=registry_for)
    applied = _Counter()

    async def apply(new: KernelflowConfig) -> None:
        await reloader.apply(new)
        await applied.add()

    watcher = ConfigWatcher(config_file, config, apply, interval=0.05)
    watching = asyncio.create_task(watcher.run())
    queue = _queue()
    try:
        async with build_worker(client, task_queue=queue, llm_activities=activities):
            yield queue, watcher, applied
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await reloader.aclose()
        await activities.registry.aclose()


async def test_changed_alias_serves_the_next_steps_of_running_pipelines(
    client: Client, sim: SimulatorServer, tmp_path: Path
) -> None:
    config_file = tmp_path / "kernelflow.yaml"
    _write_config(config_file, {"smart": "openai/gpt-4o-mini"})
    gate = _Gate()
    two_steps = {
        "name": "two-steps",
        "steps": [
            {"id": "first", "model": "gated/gpt-4.1", "prompt": "start"},
            {"id": "second", "model": "smart", "prompt": "after {{ steps.first.output }}"},
        ],
    }
    one_step = {"name": "one-step", "steps": [{"id": "only", "model": "smart", "prompt": "hi"}]}
    async with _reloading_worker(client, config_file, sim, gate) as (queue, watcher, applied):
        before = await _run(client, one_step, queue)
        assert before.steps[0].model == "openai/gpt-4o-mini"

        handles = [
            await start_pipeline(client, parse_pipeline(two_steps), {}, task_queue=queue) for _ in range(3)
        ]
        await gate.arrived.reach(3, "every pipeline is in its first step")
        _write_config(config_file, {"smart": "openai/gpt-4.1-nano"})
        await applied.reach(1, "the worker reloads its changed config file")
        gate.opened.set()
        results = await asyncio.gather(*(h.result() for h in handles))

        assert [r.steps[1].model for r in results] == ["openai/gpt-4.1-nano"] * 3
        assert sim.stats()["by_model"] == {"gpt-4o-mini": 1, "gpt-4.1": 3, "gpt-4.1-nano": 3}

        # A broken file is refused and the running aliases stay; a reload request (SIGHUP) reads at once.
        config_file.write_text("aliases: [not, a, mapping", encoding="utf-8")
        assert await watcher.reload() is False
        assert (await _run(client, one_step, queue)).steps[0].model == "openai/gpt-4.1-nano"
        _write_config(config_file, {"smart": "openai/gpt-4o-mini"})
        watcher.request_reload()
        await applied.reach(2, "the requested reload is applied")
        assert (await _run(client, one_step, queue)).steps[0].model == "openai/gpt-4o-mini"


async def test_watcher_reports_changes_and_ignores_unchanged_files(tmp_path: Path) -> None:
    config_file = tmp_path / "kernelflow.yaml"
    _write_config(config_file, {"smart": "openai/gpt-4o-mini", "old": "openai/gpt-4.1"})
    applied: list[dict[str, str]] = []

    async def apply(config: KernelflowConfig) -> None:
        applied.append(config.aliases)

    watcher = ConfigWatcher(config_file, load_config(config_file), apply)
    assert await watcher.reload() is False  # same content: nothing to apply
    _write_config(config_file, {"smart": "openai/gpt-4.1-nano", "new": "openai/o3"})
    assert await watcher.reload() is True
    assert applied == [{"smart": "openai/gpt-4.1-nano", "new": "openai/o3"}]

    from worker.config import config_changes

    changes, restart = config_changes(
        KernelflowConfig(aliases={"smart": "a/x", "old": "a/y"}),
        KernelflowConfig.model_validate(
            {"aliases": {"smart": "a/z", "new": "a/w"}, "routing": {"breaker": {"failure_threshold": 2}}}
        ),
    )
    assert changes == [
        "alias 'new' added: 'a/w'",
        "alias 'old' removed (was 'a/y')",
        "alias 'smart': 'a/x' -> 'a/z'",
        "routing changed",
    ]
    assert restart == []


async def test_refused_reload_keeps_the_running_config(tmp_path: Path) -> None:
    config_file = tmp_path / "kernelflow.yaml"
    _write_config(config_file, {"smart": "openai/gpt-4o-mini"})

    async def refuse(config: KernelflowConfig) -> None:
        from kernel.errors import PluginError

        raise PluginError("preset 'x' is broken")

    apply: Callable[[KernelflowConfig], Awaitable[None]] = refuse
    watcher = ConfigWatcher(config_file, load_config(config_file), apply)
    _write_config(config_file, {"smart": "openai/gpt-4.1-nano"})
    assert await watcher.reload() is False
    assert watcher.current.aliases == {"smart": "openai/gpt-4o-mini"} and watcher.reloads == 0


async def test_reload_reaches_embeddings_and_reroute_checks_the_live_registry(
    client: Client, sim: SimulatorServer, tmp_path: Path
) -> None:
    config_file = tmp_path / "kernelflow.yaml"
    _write_config(config_file, {"vectors": "openai/text-embedding-3-small"})
    embed = {"name": "embed", "steps": [{"id": "v", "type": "embed", "model": "vectors", "input": "hello"}]}
    async with _reloading_worker(client, config_file, sim, _Gate()) as (queue, _, applied):
        before = await _run(client, embed, queue)
        assert before.steps[0].model == "openai/text-embedding-3-small"
        _write_config(config_file, {"vectors": "openai/text-embedding-3-large", "fresh": "openai/gpt-4o"})
        await applied.reach(1, "the worker reloads its changed config file")
        after = await _run(client, embed, queue)
        assert after.steps[0].model == "openai/text-embedding-3-large"

        # Reroute validators ask the same live registry: an alias added by the reload is a valid target.
        waiting = {
            "name": "waits",
            "steps": [
                {"id": "gate", "type": "approval"},
                {"id": "ask", "model": "openai/gpt-4.1", "prompt": "hi"},
            ],
        }
        handle = await start_pipeline(client, parse_pipeline(waiting), {}, task_queue=queue)
        assert await reroute(client, handle.id, {"openai/gpt-4.1": "fresh"}) == {"openai/gpt-4.1": "fresh"}
        await handle.cancel()

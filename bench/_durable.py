"""A durable environment for figures 2, 3 and 5: a headless dev server in a temporary state directory,
the simulator in its own process, one client, and a worker in this process serving both the pipeline
engine and the minimal baseline workflows with the same settings."""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from temporalio import activity
from temporalio.client import Client

from bench._workflows import MINIMAL_ACTIVITY, BenchMinimalWorkflow, BenchWaitingWorkflow, MinimalRequest
from kernel.pipeline import PipelineSpec, parse_pipeline
from kernel.registry import Registry
from simulator.server import SimulatorProcess
from worker.app import build_registry, build_worker, connect, simulator_settings
from worker.config import PayloadSettings
from worker.devserver import DevServer, free_port

__all__ = [
    "MODEL",
    "PROMPT",
    "BenchDevServer",
    "DurableEnv",
    "MinimalActivities",
    "durable_env",
    "free_port",
    "minimal_request",
    "one_step_spec",
]

PROMPT = "Summarise the ticket in one sentence: the printer on floor 3 jams on every duplex job."
MODEL = "gpt-4o-mini"


class BenchDevServer(DevServer):
    """The dev server with eager workflow start switched on explicitly."""

    def command(self) -> list[str]:
        return [*super().command(), "--dynamic-config-value", "system.enableEagerWorkflowStart=true"]


class MinimalActivities:
    """The baseline's activity: the same chat request posted with raw httpx, the text read back."""

    def __init__(self, base_url: str) -> None:
        self.url = f"{base_url.rstrip('/')}/v1/chat/completions"
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(600.0, connect=10.0),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=200),
        )

    @activity.defn(name=MINIMAL_ACTIVITY)
    async def chat(self, request: MinimalRequest) -> str:
        response = await self.client.post(
            self.url,
            json={"model": request.model, "messages": request.messages},
            headers={"Authorization": "Bearer sim-key"},
        )
        response.raise_for_status()
        text: str = response.json()["choices"][0]["message"]["content"]
        return text


def one_step_spec(*, local_activity: bool = False) -> PipelineSpec:
    step: dict[str, Any] = {"id": "answer", "model": f"openai/{MODEL}", "prompt": PROMPT}
    if local_activity:
        step["local_activity"] = True
    return parse_pipeline(
        {"name": "bench-one-step", "steps": [step], "outputs": {"answer": "{{ steps.answer.text }}"}}
    )


def minimal_request(*, local_activity: bool = False) -> MinimalRequest:
    return MinimalRequest(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], local_activity=local_activity
    )


@dataclass
class DurableEnv:
    client: Client
    task_queue: str
    simulator_url: str
    registry: Registry
    server: DevServer
    state_dir: Path
    simulator: SimulatorProcess


@contextlib.asynccontextmanager
async def durable_env(*, worker: bool = True) -> AsyncIterator[DurableEnv]:
    with tempfile.TemporaryDirectory(prefix="kernelflow-bench-") as state, SimulatorProcess() as sim:
        server = BenchDevServer(state_dir=state, port=free_port(), ui_port=free_port(), headless=True)
        async with server:
            client = await connect(server.target, payloads=PayloadSettings(dir=Path(state) / "payloads"))
            registry = build_registry(provider_settings=simulator_settings(sim.url))
            minimal = MinimalActivities(sim.url)
            queue = f"bench-{uuid.uuid4().hex[:8]}"
            env = DurableEnv(client, queue, sim.url, registry, server, Path(state), sim)
            try:
                if worker:
                    async with build_worker(
                        client,
                        task_queue=queue,
                        registry=registry,
                        extra_workflows=[BenchMinimalWorkflow, BenchWaitingWorkflow],
                        extra_activities=[minimal.chat],
                    ):
                        yield env
                else:
                    yield env
            finally:
                await minimal.client.aclose()
                await registry.aclose()

"""The example third-party plugin (examples/plugin-echo): discovered through its own entry point,
conformant, and usable in pipelines on a real Temporal server."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from kernel.pipeline import parse_pipeline
from kernel.provider import Provider, ProviderSettings
from kernel.registry import Registry
from kernel.testing import ProviderConformance
from simulator.server import SimulatorServer
from worker.app import build_registry, build_worker, simulator_settings
from worker.client import start_pipeline

kernelflow_echo = pytest.importorskip(
    "kernelflow_echo", reason="install the example plugin: pip install -e examples/plugin-echo"
)
EchoProvider = kernelflow_echo.EchoProvider


def test_cli_lists_the_plugin_from_its_own_distribution() -> None:
    executable = shutil.which("kernelflow")
    assert executable is not None, "the kernelflow console script is not installed"
    listed = subprocess.run(
        [executable, "providers", "--json"], capture_output=True, text=True, check=True, timeout=60
    )
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    echo = rows["echo"]
    assert "kernelflow-plugin-echo" in echo["source"] and "kernelflow_echo:EchoProvider" in echo["source"]
    assert echo["capabilities"] == ["chat", "stream"]
    assert echo["json_schema_mode"] == "none"
    assert echo["credentials_env"] == "ECHO_API_KEY"
    assert {"openai", "anthropic", "groq"} <= set(rows), "the built-ins are listed alongside"


class TestEchoConformance(ProviderConformance):
    chat_model = "house-small"

    @pytest.fixture(autouse=True)
    def _session_simulator(self, simulator_server: SimulatorServer) -> None:
        self.simulator_url = simulator_server.url  # type: ignore[misc]

    def make_provider(
        self, base_url: str, *, api_key: str | None, http_client: httpx.AsyncClient
    ) -> Provider:
        settings = ProviderSettings(base_url=base_url, api_key=api_key)
        provider: Provider = EchoProvider(settings=settings, environ={}, http_client=http_client)
        return provider


@pytest.fixture
async def echo_queue(client: Client, sim: SimulatorServer) -> AsyncIterator[str]:
    settings = {
        **simulator_settings(sim.url),
        "echo": ProviderSettings(base_url=sim.url, api_key="house-key"),
    }
    registry: Registry = build_registry(provider_settings=settings)
    queue = f"test-echo-{uuid.uuid4().hex[:10]}"
    try:
        async with build_worker(client, task_queue=queue, registry=registry):
            yield queue
    finally:
        await registry.aclose()


async def _run(client: Client, steps: list[dict[str, Any]], queue: str, **extra: Any) -> Any:
    spec = {"name": "echo-pipeline", "inputs": {"topic": {"type": "string"}}, "steps": steps, **extra}
    handle = await start_pipeline(client, parse_pipeline(spec), {"topic": "tides"}, task_queue=queue)
    return await handle.result()


async def test_pipeline_runs_the_plugin_next_to_a_builtin(
    client: Client, echo_queue: str, sim: SimulatorServer
) -> None:
    result = await _run(
        client,
        [
            {"id": "draft", "model": "echo/house-small", "prompt": "Draft about {{ inputs.topic }}"},
            {"id": "polish", "model": "openai/gpt-4o-mini", "prompt": "Polish: {{ steps.draft.output }}"},
        ],
        echo_queue,
        outputs={"draft": "{{ steps.draft.output }}", "by": "{{ steps.draft.model }}"},
    )
    assert result.status == "completed"
    assert result.outputs["draft"] == "Simulated reply from house-small: Draft about tides"
    assert result.outputs["by"] == "echo/house-small"
    assert result.steps[0].usage.prompt_tokens > 0 and result.steps[0].usage.completion_tokens > 0
    assert sim.stats()["by_wire"] == {"house": 1, "openai": 1}


async def test_plugin_errors_drive_temporal_retries_and_fallbacks(
    client: Client, echo_queue: str, sim: SimulatorServer
) -> None:
    key = uuid.uuid4().hex
    result = await _run(
        client,
        [
            {
                # The retry interval is an hour: only the plugin's retry_after (1 s) lets this finish.
                "id": "limited",
                "model": "echo/house-small",
                "prompt": f"[[sim: fault=429 retry_after=1 times=1 key={key} tag=limited]] {{{{ inputs.topic }}}}",
                "retry": {"max_attempts": 3, "initial_interval_s": 3600},
            },
            {
                "id": "refused",
                "model": "echo/house-large",
                "fallbacks": ["openai/gpt-4o-mini"],
                "prompt": "[[sim: fault=content_filter model=house-large]] {{ inputs.topic }}",
                "retry": {"max_attempts": 5, "initial_interval_s": 0.1},
            },
        ],
        echo_queue,
        outputs={"by": "{{ steps.refused.model }}"},
    )
    assert result.status == "completed"
    assert sim.stats()["by_tag"]["limited"] == 2
    assert result.outputs["by"] == "openai/gpt-4o-mini"
    assert [(f.model, f.error_type) for f in result.steps[1].failures] == [
        ("echo/house-large", "ContentFiltered")
    ]

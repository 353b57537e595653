"""What the Temporal Web UI shows an operator, read by a real browser (Debian's chromium, headless)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import urllib.parse
import uuid
from collections.abc import AsyncIterator

import pytest
from temporalio.client import Client, WorkflowFailureError

from kernel.pipeline import parse_pipeline
from simulator.server import SimulatorServer
from worker.app import build_registry, build_worker, connect, simulator_settings
from worker.client import start_pipeline
from worker.devserver import DevServer, free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (`make setup` installs it when run as root)"
)


async def _rendered_dom(url: str) -> str:
    """The page's DOM after its scripts ran (the UI is a single-page app)."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        done = await asyncio.to_thread(
            subprocess.run,
            [
                CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", "--window-size=1500,1200", "--virtual-time-budget=10000",
                "--dump-dom", url,
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
async def ui_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[DevServer, Client]]:
    server = DevServer(state_dir=tmp_path_factory.mktemp("ui"), port=free_port(), ui_port=free_port())
    async with server:
        yield server, await connect(server.target)


async def test_operator_finds_failed_pipelines_of_a_tenant_and_reads_the_steps(
    ui_server: tuple[DevServer, Client], simulator_server: SimulatorServer
) -> None:
    server, client = ui_server
    tenant = f"tenant-{uuid.uuid4().hex[:6]}"
    spec = parse_pipeline(
        {
            "name": "triage",
            "inputs": {"ticket": {"type": "string"}},
            "steps": [
                {"id": "classify", "model": "openai/gpt-4o-mini", "prompt": "Classify {{ inputs.ticket }}"},
                {
                    "id": "draft",
                    "model": "openai/gpt-4o-mini",
                    "prompt": "Draft for {{ steps.classify.output }}",
                },
            ],
        }
    )
    registry = build_registry(provider_settings=simulator_settings(simulator_server.url))
    queue = f"ui-{uuid.uuid4().hex[:8]}"
    async with build_worker(client, task_queue=queue, registry=registry):
        ok = await start_pipeline(client, spec, {"ticket": "refund please"}, task_queue=queue, tenant=tenant)
        await ok.result()
        bad = await start_pipeline(
            client, spec, {"ticket": "[[sim: fault=401]] broken"}, task_queue=queue, tenant=tenant
        )
        with pytest.raises(WorkflowFailureError):
            await bad.result()
    await registry.aclose()

    query = urllib.parse.quote(f"KernelflowTenant = '{tenant}' AND KernelflowStatus = 'Failed'")
    listing = await _rendered_dom(f"{server.ui_url}/namespaces/default/workflows?query={query}")
    assert bad.id in listing, "the failed pipeline is not in the UI list filtered by tenant and status"
    assert ok.id not in listing

    page = await _rendered_dom(f"{server.ui_url}/namespaces/default/workflows/{ok.id}")
    assert "classify · openai/gpt-4o-mini" in page, "the timeline does not name the step and model"
    assert "draft · openai/gpt-4o-mini" in page

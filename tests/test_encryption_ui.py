"""The Web UI with encryption on, read by a real browser (Debian's chromium, driven by Playwright):
with the codec server it shows a run's prompt and answer; without it, or when the codec server refuses
the UI (a token is required and the UI sends none), only ciphertext."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kernel.pipeline import parse_pipeline
from simulator.server import SimulatorServer
from worker.app import build_registry, build_worker, connect, simulator_settings
from worker.client import start_pipeline
from worker.codec_server import CodecServer, CodecServerSettings
from worker.config import PayloadSettings
from worker.devkeys import dev_payload_settings
from worker.devserver import DevServer, free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.async_api", reason="the playwright package is not installed")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (`make browser` installs it when run as root)",
)

REPO = Path(__file__).resolve().parents[1]
PROMPT = "UICANARY-4d1e the customer asks for a refund"
CIPHERTEXT = r"[A-Za-z0-9+/=]{300,}"
"""What the UI shows of a payload it cannot decode: its bytes in base64 (the input and the result here)."""


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[object]:
    async with playwright.async_playwright() as driver:
        launched = await driver.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield launched
        finally:
            await launched.close()


async def _page_text(browser: object, url: str, *, wait_for: str) -> str:
    """The page's text once ``wait_for`` (a regular expression) matches it."""
    page = await browser.new_page()  # type: ignore[attr-defined]
    try:
        await page.goto(url)
        try:
            await page.wait_for_function(
                "pattern => new RegExp(pattern).test(document.body.innerText)", arg=wait_for, timeout=30_000
            )
        except playwright.TimeoutError:
            shown = await page.inner_text("body")
            raise AssertionError(
                f"{wait_for!r} never appeared on {url}; the page shows:\n{shown[:3000]}"
            ) from None
        text: str = await page.inner_text("body")
        return text
    finally:
        await page.close()


async def test_web_ui_shows_prompt_and_answer_only_through_the_codec_server(
    browser: object, simulator_server: SimulatorServer, tmp_path: Path
) -> None:
    payloads = dev_payload_settings(PayloadSettings(dir=tmp_path / "payloads"), tmp_path)
    ui_port, codec_port = free_port(), free_port()
    origin = f"http://127.0.0.1:{ui_port}"
    dev_codec = CodecServerSettings(ui_origins=[origin], authenticate=False, payloads=payloads)
    codec = CodecServer(dev_codec, port=codec_port)
    codec.start()
    try:
        async with DevServer(
            state_dir=tmp_path, port=free_port(), ui_port=ui_port, ui_codec_endpoint=codec.url
        ) as server:
            client = await connect(server.target, payloads=payloads)
            spec = parse_pipeline(
                {
                    "name": "ui-encrypted",
                    "inputs": {"ticket": {"type": "string"}},
                    "outputs": {"answer": "{{ steps.answer.output }}"},
                    "steps": [
                        {"id": "answer", "model": "openai/gpt-4o-mini", "prompt": "{{ inputs.ticket }}"}
                    ],
                }
            )
            registry = build_registry(provider_settings=simulator_settings(simulator_server.url))
            queue = f"ui-enc-{uuid.uuid4().hex[:8]}"
            async with build_worker(client, task_queue=queue, registry=registry):
                handle = await start_pipeline(client, spec, {"ticket": PROMPT}, task_queue=queue)
                await handle.result()
            await registry.aclose()
            url = f"{server.ui_url}/namespaces/default/workflows/{handle.id}"

            # With the codec server: the prompt, the answer, and which step and model ran.
            decoded = await _page_text(browser, url, wait_for="Simulated reply from gpt-4o-mini")
            assert PROMPT in decoded
            assert "answer · openai/gpt-4o-mini" in decoded
            assert not re.search(CIPHERTEXT, decoded), "a payload was left undecoded"

            # A codec server that requires a token: the UI sends none, is refused, shows ciphertext.
            codec.stop()
            guarded = CodecServerSettings(ui_origins=[origin], token="not-sent-by-the-ui", payloads=payloads)
            codec = CodecServer(guarded, port=codec_port)
            codec.start()
            refused = await _page_text(browser, url, wait_for=CIPHERTEXT)
            assert "UICANARY" not in refused and "Simulated reply" not in refused
            assert len(re.findall(CIPHERTEXT, refused)) >= 2, "input and result are not shown as ciphertext"
            assert codec.refusals.get(401), f"the UI was not refused for want of a token: {codec.refusals}"

            # No codec server at all: ciphertext.
            codec.stop()
            absent = await _page_text(browser, url, wait_for=CIPHERTEXT)
            assert "UICANARY" not in absent and "Simulated reply" not in absent
            assert len(re.findall(CIPHERTEXT, absent)) >= 2, "input and result are not shown as ciphertext"
    finally:
        codec.stop()


async def test_kernelflow_dev_is_encrypted_at_rest_and_readable_in_its_web_ui(
    browser: object, tmp_path: Path
) -> None:
    """The default experience: `kernelflow dev` (its own process) stores ciphertext, and its Web UI reads
    the run through the loopback codec server it started."""
    kernelflow = str(Path(sys.executable).parent / "kernelflow")
    state = tmp_path / "state"
    port, ui_port, sim_port = free_port(), free_port(), free_port()
    dev = subprocess.Popen(  # noqa: ASYNC220
        [kernelflow, "dev", "--port", str(port), "--ui-port", str(ui_port), "--sim-port", str(sim_port),
         "--state-dir", str(state), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        banner = await asyncio.to_thread(_banner, dev)
        assert "Encryption on (AES-256-GCM" in banner and "no token: loopback only" in banner, banner

        keys = {"KERNELFLOW_ENCRYPTION_KEYS_DIR": str(state / "keys")}
        env = {**os.environ, "TEMPORAL_ADDRESS": f"127.0.0.1:{port}", **keys}
        ticket = "UICANARY-dev my parcel never arrived"
        done = await asyncio.to_thread(
            subprocess.run,
            [kernelflow, "run", "examples/ticket-triage.yaml", "--input", f"ticket={ticket}", "--json"],
            capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        workflow_id = done.stderr.split("started ", 1)[1].split()[0]

        url = f"http://127.0.0.1:{ui_port}/namespaces/default/workflows/{workflow_id}"
        page = await _page_text(browser, url, wait_for="UICANARY-dev")
        assert "classify · openai/gpt-4o-mini" in page
    finally:
        dev.send_signal(signal.SIGINT)
        await asyncio.to_thread(dev.wait, 60)
    database = b"".join(p.read_bytes() for p in state.glob("temporal.db*"))
    assert workflow_id.encode() in database, "not the dev server's database"
    assert b"UICANARY-dev" not in database, "the ticket is readable in the dev server's database"


def _banner(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
    return "".join(lines)

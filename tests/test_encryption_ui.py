"""The Web UI with encryption on, read by a real browser (Debian's chromium, driven by Playwright):
with the codec server it shows a run's prompt and answer; without it, or when the codec server refuses
the UI (a token is required and the UI sends none), only ciphertext."""

from __future__ import annotations

import re
import shutil
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

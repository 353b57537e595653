"""The console's metrics reader against real Prometheus endpoints: Temporal runtimes exporting the
metric names the workers publish, scraped over HTTP, and the figures on the Providers page."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from temporalio.client import Client
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from worker.app import build_registry
from worker.console import ConsoleSettings, create_app
from worker.console.auth import User, Users, hash_password
from worker.console.serve import ConsoleServer, metrics_from_env
from worker.console.sources import (
    NoMetrics,
    PrometheusMetrics,
    ProviderFigures,
    ScrapedMetrics,
    parse_exposition,
)
from worker.devserver import free_port

T = TypeVar("T")


async def _until(probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], what: str) -> T:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:
        value = await probe()
        if ok(value):
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not seen (last: {value!r})")
        await asyncio.sleep(0.1)


def _worker_metrics(calls_ok: int, calls_failed: int, seconds: list[float], cost: float) -> str:
    """A Temporal runtime exporting a worker's model-call metrics on a Prometheus endpoint."""
    port = free_port()
    runtime = Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=f"127.0.0.1:{port}")))
    meter = runtime.metric_meter
    calls = meter.create_counter("kernelflow_model_calls", "Model calls (attempts) by outcome.")
    calls.add(calls_ok, {"provider": "openai", "model": "gpt-4o", "outcome": "ok", "pipeline": "p"})
    calls.add(
        calls_failed, {"provider": "openai", "model": "gpt-4o", "outcome": "RateLimited", "pipeline": "p"}
    )
    duration = meter.create_histogram_float(
        "gen_ai_client_operation_duration", "GenAI operation duration.", "s"
    )
    for s in seconds:
        duration.record(s, {"gen_ai_provider_name": "openai", "gen_ai_operation_name": "chat"})
    meter.create_histogram_float("kernelflow_model_cost", "Cost per priced call.", "USD").record(
        cost, {"provider": "openai", "model": "gpt-4o"}
    )
    meter.create_gauge("kernelflow_circuit_breaker_state", "0 closed, 1 half-open, 2 open.").set(
        2, {"provider": "anthropic", "model": "claude-sonnet-4-5"}
    )
    _RUNTIMES.append(runtime)  # kept alive for the endpoint
    return f"http://127.0.0.1:{port}/metrics"


_RUNTIMES: list[Runtime] = []


def test_exposition_parser_reads_labels_escapes_and_skips_comments() -> None:
    text = '# HELP x y\n# TYPE x counter\nx_total{a="q\\"uote",b="2"} 3\nbad line\ny 1e3\n'
    samples = parse_exposition(text)
    assert [(s.name, s.labels, s.value) for s in samples] == [
        ("x_total", {"a": 'q"uote', "b": "2"}, 3.0),
        ("y", {}, 1000.0),
    ]


def test_metrics_source_is_chosen_from_the_environment() -> None:
    assert isinstance(metrics_from_env({}), NoMetrics)
    scraped = metrics_from_env({"KERNELFLOW_METRICS_URLS": "http://a/metrics, http://b/metrics"})
    assert isinstance(scraped, ScrapedMetrics) and scraped.urls == ["http://a/metrics", "http://b/metrics"]
    prom = metrics_from_env(
        {"KERNELFLOW_PROMETHEUS_URL": "http://prom:9090/", "KERNELFLOW_METRICS_URLS": "x"}
    )
    assert isinstance(prom, PrometheusMetrics) and prom.url == "http://prom:9090"


async def test_scraped_workers_add_up_and_show_on_the_providers_page(client: Client) -> None:
    first = _worker_metrics(3, 1, [0.5, 1.5], 0.25)
    second = _worker_metrics(4, 0, [1.0], 0.5)
    down = f"http://127.0.0.1:{free_port()}/metrics"
    reader = ScrapedMetrics([first, second, down])
    figures = await _until(
        reader.providers, lambda f: "openai" in f and f["openai"].calls == 8, "both workers' model calls"
    )
    openai = figures["openai"]
    assert openai.errors == 1 and openai.error_ratio == 1 / 8
    assert openai.latency_s == 1.0  # (0.5 + 1.5 + 1.0) / 3
    assert openai.cost_usd == 0.75
    assert figures["anthropic"].breakers == {"claude-sonnet-4-5": "open"}
    assert reader.unreachable and reader.unreachable[0].startswith(down)

    registry = build_registry()
    users = Users(users=[User(name="vic", roles=["viewer"], password_hash=hash_password("pw"))])
    settings = ConsoleSettings(
        users=users, secret=os.urandom(32), describe_providers=registry.describe, metrics=reader
    )
    async with (
        ConsoleServer(create_app(client, settings), port=free_port()) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        token = re.search(r'name="csrf" value="([^"]+)"', (await http.get("/login")).text)
        assert token is not None
        await http.post("/login", data={"csrf": token.group(1), "username": "vic", "password": "pw"})
        page = (await http.get("/providers")).text
    row: Any = re.search(r'<tr data-provider="openai">(.*?)</tr>', page, re.S)
    assert row is not None
    cells = re.sub(r"<[^>]+>", " ", row.group(1)).split()
    assert "8" in cells and "12.5%" in cells and "1000" in cells and "$0.7500" in cells
    anthropic: Any = re.search(r'<tr data-provider="anthropic">(.*?)</tr>', page, re.S)
    assert "open" in anthropic.group(1)
    assert "since the workers started" in page
    await registry.aclose()


def _start_prometheus(folder: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [shutil.which("prometheus") or "prometheus", f"--config.file={folder / 'prometheus.yml'}",
         f"--storage.tsdb.path={folder / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="Debian's prometheus is not installed (`make ops-tools`)"
)
async def test_prometheus_reader_reports_the_last_hour_from_a_real_prometheus(tmp_path: Path) -> None:
    port = free_port()
    runtime = Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=f"127.0.0.1:{port}")))
    _RUNTIMES.append(runtime)
    meter = runtime.metric_meter
    calls = meter.create_counter("kernelflow_model_calls", "Model calls (attempts) by outcome.")
    ok = {"provider": "openai", "model": "gpt-4o", "outcome": "ok", "pipeline": "p"}
    failed = {**ok, "outcome": "RateLimited"}
    duration = meter.create_histogram_float(
        "gen_ai_client_operation_duration", "GenAI operation duration.", "s"
    )
    timing = {"gen_ai_provider_name": "openai", "gen_ai_operation_name": "chat"}
    # The series exist before Prometheus first scrapes them: increase() counts from there.
    calls.add(0, ok)
    calls.add(0, failed)
    duration.record(2.0, timing)
    meter.create_gauge("kernelflow_circuit_breaker_state", "0 closed, 1 half-open, 2 open.").set(
        1, {"provider": "openai", "model": "gpt-4o"}
    )
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: w, static_configs: [{{targets: ['127.0.0.1:{port}']}}]}}]\n"
    )
    prometheus = _start_prometheus(tmp_path, prom_port)
    try:
        reader = PrometheusMetrics(f"http://127.0.0.1:{prom_port}")

        async def scraped() -> dict[str, ProviderFigures]:
            try:
                return await reader.providers()
            except httpx.HTTPError:
                return {}

        await _until(scraped, lambda f: "openai" in f and bool(f["openai"].breakers), "the first scrape")
        calls.add(6, ok)
        calls.add(2, failed)
        duration.record(1.0, timing)
        figures = await _until(scraped, lambda f: f["openai"].calls >= 8, "the calls since then")
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=20)
    openai = figures["openai"]
    # increase() extrapolates over the window's edges, so the figures are close, not exact.
    assert openai.error_ratio is not None and 0.2 <= openai.error_ratio <= 0.3
    assert openai.breakers == {"gpt-4o": "half-open"}
    assert reader.window == "last hour"

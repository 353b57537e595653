"""Metrics as an operator sees them: Debian's Prometheus scrapes a `kernelflow worker` process started
here, pipelines run (one taking a fallback, one failing), and Prometheus's query API returns the series."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError

from kernel.pipeline import PipelineSpec
from simulator.server import SimulatorServer
from tests.test_deploy import alert_expressions, dashboard_expressions, metric_names
from tests.worker_process import WorkerProcess
from worker.app import connect
from worker.client import start_pipeline
from worker.config import PayloadSettings
from worker.devserver import free_port

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        shutil.which("prometheus") is None, reason="Debian's prometheus is not installed (`make ops-tools`)"
    ),
]

INLINE = PayloadSettings(storage="off")
AWAITING = SearchAttributeKey.for_keyword_list("KernelflowAwaiting")


def _spec(name: str, steps: list[dict[str, Any]]) -> PipelineSpec:
    return PipelineSpec.model_validate({"name": name, "steps": steps})


OK = _spec(
    "metrics-ok", [{"id": "write", "model": "openai/gpt-4o-mini", "stream": True, "prompt": "Write a line."}]
)
FALLBACK = _spec(
    "metrics-fallback",
    [{"id": "draft", "model": "openai/gpt-4.1", "fallbacks": ["anthropic/claude-sonnet-4-5"],
      "retry": {"max_attempts": 1}, "prompt": "Draft. [[sim: fault=400 model=gpt-4.1]]"}],
)  # fmt: skip
FAILING = _spec(
    "metrics-fails", [{"id": "broken", "model": "openai/gpt-4o-mini", "prompt": "x [[sim: fault=400]]"}]
)


@dataclass
class Stack:
    worker: WorkerProcess
    metrics_url: str
    prometheus_url: str
    queue: str
    client: Client


def _wait_http(url: str, within: float = 30) -> httpx.Response:
    deadline = time.monotonic() + within
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
            last = response.text
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready: {last}")


async def _ensure_awaiting_attribute(client: Client) -> None:
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=client.namespace)
    )
    if "KernelflowAwaiting" not in listed.custom_attributes:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=client.namespace,
                search_attributes={"KernelflowAwaiting": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST},
            )
        )


def _start_prometheus(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
async def stack(temporal_target: str, simulator_server: SimulatorServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:  # fmt: skip
    folder = tmp_path_factory.mktemp("metrics")
    client = await connect(temporal_target, payloads=INLINE)
    await _ensure_awaiting_attribute(client)
    queue = f"metrics-{uuid.uuid4().hex[:8]}"
    port = free_port()
    sim = simulator_server.url.rstrip("/")
    worker = WorkerProcess(
        {
            "TEMPORAL_ADDRESS": temporal_target,
            "KERNELFLOW_TASK_QUEUE": queue,
            "KERNELFLOW_PAYLOADS_STORAGE": "off",
            "KERNELFLOW_METRICS_PORT": str(port),
            "KERNELFLOW_METRICS_HOST": "127.0.0.1",
            "KERNELFLOW_APPROVALS_POLL_S": "1",
            "OPENAI_BASE_URL": sim + "/v1",
            "OPENAI_API_KEY": "sim-key",
            "ANTHROPIC_BASE_URL": sim,
            "ANTHROPIC_API_KEY": "sim-key",
        },
        cwd=folder,
    ).start()
    worker.wait_started()
    prom_port = free_port()
    (folder / "prometheus.yml").write_text(
        f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: kernelflow-worker
    static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
"""
    )
    prometheus = _start_prometheus(
        [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ]
    )
    try:
        _wait_http(f"http://127.0.0.1:{prom_port}/-/ready")
        yield Stack(worker, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}", queue, client)
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=20)
        worker.stop()


async def _query(stack: Stack, promql: str) -> dict[str, float]:
    async with httpx.AsyncClient() as http:
        answer = (await http.get(f"{stack.prometheus_url}/api/v1/query", params={"query": promql})).json()
    assert answer["status"] == "success", answer
    return {
        ",".join(f"{k}={v}" for k, v in sorted(item["metric"].items()) if k != "__name__"): float(
            item["value"][1]
        )
        for item in answer["data"]["result"]
    }


async def _eventually(stack: Stack, promql: str, expected: dict[str, float], within: float = 30) -> None:
    deadline = time.monotonic() + within
    found: dict[str, float] = {}
    while time.monotonic() < deadline:
        found = await _query(stack, promql)
        if found == expected:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{promql}: expected {expected}, Prometheus has {found}")


def test_health_and_readiness_on_the_metrics_port(stack: Stack) -> None:
    assert httpx.get(f"{stack.metrics_url}/healthz").json() == {"status": "alive"}
    ready = _wait_http(f"{stack.metrics_url}/readyz").json()
    assert ready["status"] == "ready"


async def test_prometheus_scrapes_model_pipeline_and_sdk_metrics(stack: Stack) -> None:
    for spec in (OK, FALLBACK, FAILING):
        handle = await start_pipeline(stack.client, spec, {}, task_queue=stack.queue)
        if spec is FAILING:
            with pytest.raises(WorkflowFailureError):
                await asyncio.wait_for(handle.result(), timeout=60)
        else:
            assert (await asyncio.wait_for(handle.result(), timeout=60)).status == "completed"

    await _eventually(
        stack,
        'sum by (pipeline) (kernelflow_pipelines_started_total{pipeline=~"metrics-.*"})',
        {"pipeline=metrics-ok": 1, "pipeline=metrics-fallback": 1, "pipeline=metrics-fails": 1},
    )
    await _eventually(
        stack,
        'sum by (pipeline, status) (kernelflow_pipelines_finished_total{pipeline=~"metrics-.*"})',
        {
            "pipeline=metrics-ok,status=completed": 1,
            "pipeline=metrics-fallback,status=completed": 1,
            "pipeline=metrics-fails,status=failed": 1,
        },
    )
    await _eventually(
        stack,
        "sum by (from_model, to_model) (kernelflow_fallbacks_total)",
        {"from_model=openai/gpt-4.1,to_model=anthropic/claude-sonnet-4-5": 1},
    )
    await _eventually(
        stack,
        'sum by (provider, model, outcome) (kernelflow_model_calls_total{pipeline=~"metrics-.*"})',
        {
            "model=gpt-4o-mini,outcome=ok,provider=openai": 1,
            "model=gpt-4.1,outcome=InvalidRequest,provider=openai": 1,
            "model=claude-sonnet-4-5,outcome=ok,provider=anthropic": 1,
            "model=gpt-4o-mini,outcome=InvalidRequest,provider=openai": 1,
        },
    )
    # GenAI semantic conventions: token usage by input/output, duration with error.type on failures.
    tokens = await _query(stack, "sum by (gen_ai_token_type) (gen_ai_client_token_usage_count)")
    assert set(tokens) == {"gen_ai_token_type=input", "gen_ai_token_type=output"}, tokens
    failed = await _query(
        stack, "sum by (error_type) (gen_ai_client_operation_duration_count{error_type!=''})"
    )
    assert failed == {"error_type=InvalidRequest": 2}, failed
    kinds = await _query(stack, "sum by (kind) (kernelflow_model_tokens_total)")
    assert {"kind=prompt", "kind=completion"} <= set(kinds), kinds
    ttft = await _query(stack, "sum(kernelflow_model_time_to_first_token_count)")
    assert list(ttft.values()) == [1], ttft
    cost = await _query(stack, "sum(kernelflow_model_cost_sum) > 0")
    assert cost, "the money spent is the cost histogram's sum"
    # The SDK's own runtime metrics come through the same port.
    completed = await _query(stack, "sum(temporal_workflow_completed_total)")
    assert next(iter(completed.values())) >= 2, completed
    assert await _query(stack, "sum(temporal_worker_task_slots_available) > 0")
    # No label carries a workflow id or a prompt.
    series = await _query(stack, '{__name__=~"kernelflow_.*|gen_ai_.*"}')
    assert not [s for s in series if "workflow_id" in s or "run_id" in s or "Draft." in s]


async def test_approvals_waiting_comes_from_visibility(stack: Stack) -> None:
    """A pipeline waiting at an approval step is counted (KernelflowAwaiting is not empty); once
    approved, it is not."""
    gate = _spec(
        "metrics-approval",
        [{"id": "review", "type": "approval", "timeout_s": 600, "default": "reject"},
         {"id": "done", "type": "transform", "expression": "1"}],
    )  # fmt: skip
    handle = await start_pipeline(stack.client, gate, {}, task_queue=stack.queue)
    try:
        await _eventually(stack, "max(kernelflow_approvals_waiting)", {"": 1}, within=60)
        await handle.execute_update("approve", {"step_id": "review", "by": "ops", "comment": "ok"})
        assert (await asyncio.wait_for(handle.result(), timeout=30)).status == "completed"
    finally:
        with contextlib.suppress(RPCError):
            await handle.terminate()
    await _eventually(stack, "max(kernelflow_approvals_waiting)", {"": 0}, within=60)


async def test_dashboard_and_alerts_read_only_metrics_a_worker_exports(stack: Stack) -> None:
    """Every metric the Grafana dashboard and the alert rules query is in a real worker's /metrics,
    once it has run pipelines and a circuit breaker has opened."""
    breaker = _spec(
        "metrics-breaker",
        [{"id": "down", "model": "openai/gpt-4o", "retry": {"max_attempts": 6, "initial_interval_s": 0.05,
          "backoff": 1.0}, "prompt": "x [[sim: fault=500]]"}],
    )  # fmt: skip
    handle = await start_pipeline(stack.client, breaker, {}, task_queue=stack.queue)
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), timeout=60)
    async with httpx.AsyncClient() as http:
        exported = (await http.get(f"{stack.metrics_url}/metrics")).text
    families = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", exported, re.MULTILINE))
    wanted: set[str] = set()
    for expression in dashboard_expressions() + alert_expressions():
        wanted |= metric_names(expression)
    assert wanted, "the dashboard queries no metric"
    missing = sorted(wanted - families)
    assert not missing, f"queried but not exported: {missing}"
    assert "kernelflow_circuit_breaker_state" in wanted

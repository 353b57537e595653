"""OpenTelemetry traces: the SDK's tracing interceptor plus a GenAI span per model call.

In process with the SDK's in-memory exporter (the span tree and its attributes, for a pipeline with a
retry and a fallback), and across a worker restart with `kernelflow worker` processes exporting OTLP
to a receiver inside this test."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kernel.pipeline import PipelineSpec
from kernel.registry import Registry
from simulator.server import SimulatorServer
from tests.worker_process import WorkerProcess
from worker.app import build_worker
from worker.client import start_pipeline
from worker.config import PayloadSettings
from worker.connection import open_client, resolve_connection
from worker.tracing import Tracing

INLINE = PayloadSettings(storage="off")

SPEC = PipelineSpec.model_validate(
    {
        "name": "traced",
        "steps": [
            {"id": "classify", "model": "openai/gpt-4o-mini", "retry": {"max_attempts": 3, "initial_interval_s": 0.1},
             "prompt": "Secret prompt text. [[sim: fault=500 times=1 key=traced-retry]]"},
            {"id": "draft", "model": "openai/gpt-4.1", "fallbacks": ["anthropic/claude-sonnet-4-5"],
             "retry": {"max_attempts": 1}, "prompt": "Draft. [[sim: fault=400 model=gpt-4.1]]"},
        ],
    }
)  # fmt: skip


def _tracing() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


def _by_name(spans: list[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


async def test_one_trace_from_start_to_each_model_call_with_genai_attributes(
    temporal_target: str, registry: Registry
) -> None:
    tracing, exporter = _tracing()
    client = await open_client(
        resolve_connection(address=temporal_target, environ={}),
        payloads=INLINE,
        interceptors=tracing.interceptors(),
    )
    queue = f"traced-{uuid.uuid4().hex[:8]}"
    async with build_worker(client, task_queue=queue, registry=registry):
        handle = await start_pipeline(client, SPEC, {}, task_queue=queue)
        assert (await asyncio.wait_for(handle.result(), timeout=60)).status == "completed"
    spans = list(exporter.get_finished_spans())
    [start] = _by_name(spans, "StartWorkflow:PipelineWorkflow")
    trace_id = start.context.trace_id
    assert {s.context.trace_id for s in spans} == {trace_id}, "every span belongs to the client's trace"
    assert _by_name(spans, "RunWorkflow:PipelineWorkflow")

    chats = sorted(_by_name(spans, "chat "), key=lambda s: s.start_time or 0)
    assert [(s.name, s.attributes.get("error.type")) for s in chats] == [
        ("chat gpt-4o-mini", "UpstreamError"),  # the retried attempt
        ("chat gpt-4o-mini", None),
        ("chat gpt-4.1", "InvalidRequest"),  # the failed primary
        ("chat claude-sonnet-4-5", None),  # the fallback
    ]
    by_id = {s.context.span_id: s for s in spans}
    for chat in chats:
        assert chat.parent is not None
        parent = by_id[chat.parent.span_id]
        assert parent.name == "RunActivity:llm_chat", parent.name
    ok = chats[3].attributes
    assert ok["gen_ai.operation.name"] == "chat"
    assert ok["gen_ai.provider.name"] == "anthropic"
    assert ok["gen_ai.request.model"] == "claude-sonnet-4-5"
    assert ok["gen_ai.response.model"]
    assert ok["gen_ai.usage.input_tokens"] > 0 and ok["gen_ai.usage.output_tokens"] > 0
    assert ok["gen_ai.response.finish_reasons"] == ("stop",)
    assert ok["kernelflow.step"] == "draft"
    assert chats[1].attributes["kernelflow.attempt"] == 2
    text = repr([dict(s.attributes or {}) for s in spans])
    assert "Secret prompt text" not in text, "prompts are not recorded unless enabled"


# --- across a restart, over OTLP -------------------------------------------------------------------------


class Receiver:
    """An OTLP/HTTP trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                with receiver.cond:
                    for resource in request.resource_spans:
                        for scope in resource.scope_spans:
                            for span in scope.spans:
                                receiver.spans.append(
                                    {
                                        "name": span.name,
                                        "trace_id": span.trace_id.hex(),
                                        "attributes": {a.key: a.value for a in span.attributes},
                                    }
                                )
                    receiver.cond.notify_all()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_for(self, predicate: Any, within: float = 30) -> list[dict[str, Any]]:
        with self.cond:
            assert self.cond.wait_for(lambda: [s for s in self.spans if predicate(s)], timeout=within), [
                s["name"] for s in self.spans
            ]
            return [s for s in self.spans if predicate(s)]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.server.shutdown()


@pytest.mark.timeout(180)
async def test_the_trace_continues_across_a_killed_worker(
    temporal_target: str, sim: SimulatorServer, receiver: Receiver, tmp_path: Path
) -> None:
    tracing, exporter = _tracing()
    client = await open_client(
        resolve_connection(address=temporal_target, environ={}),
        payloads=INLINE,
        interceptors=tracing.interceptors(),
    )
    queue = f"restart-{uuid.uuid4().hex[:8]}"
    env = {
        "TEMPORAL_ADDRESS": temporal_target,
        "KERNELFLOW_TASK_QUEUE": queue,
        "KERNELFLOW_PAYLOADS_STORAGE": "off",
        "KERNELFLOW_TRACING": "1",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OPENAI_BASE_URL": sim.url.rstrip("/") + "/v1",
        "OPENAI_API_KEY": "sim-key",
    }
    spec = PipelineSpec.model_validate(
        {
            "name": "restarted",
            "steps": [
                {"id": "before", "model": "openai/gpt-4o-mini", "prompt": "One."},
                {"id": "wait", "type": "wait_event", "event": "go"},
                {"id": "after", "model": "openai/gpt-4o-mini", "prompt": "Two."},
            ],
        }
    )
    first = WorkerProcess(env, cwd=tmp_path).start()
    first.wait_started()
    handle = await start_pipeline(client, spec, {}, task_queue=queue)
    [start] = [s for s in exporter.get_finished_spans() if s.name.startswith("StartWorkflow")]
    trace_id = format(start.context.trace_id, "032x")
    receiver.wait_for(lambda s: s["name"] == "chat gpt-4o-mini" and s["trace_id"] == trace_id)
    first.stop(signal_kill := 9)  # kill -9: no goodbye
    assert signal_kill == 9

    with WorkerProcess(env, cwd=tmp_path) as second:
        second.wait_started()
        await handle.signal("event", {"name": "go", "payload": {}})
        assert (await asyncio.wait_for(handle.result(), timeout=60)).status == "completed"
        after = receiver.wait_for(
            lambda s: (
                s["name"] == "chat gpt-4o-mini" and s["attributes"]["kernelflow.step"].string_value == "after"
            )
        )
    assert {s["trace_id"] for s in after} == {trace_id}, "the second worker continues the client's trace"
    # Every log line of a traced call carries the trace and span ids.
    traced = [r for r in second.records() if r.get("event") == "llm call finished"]
    assert traced and all(r.get("trace_id") == trace_id and r.get("span_id") for r in traced), traced

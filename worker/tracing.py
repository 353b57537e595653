"""OpenTelemetry traces: the SDK's tracing interceptor plus one span per model call.

``TracingInterceptor`` (``temporalio.contrib.opentelemetry``) makes the client's ``StartWorkflow``,
the workflow run and each activity spans of one trace, carried in Temporal headers, so a pipeline
resumed by another worker after a restart continues the same trace. Inside the ``llm_chat``
activity's span, each model call gets a span named ``chat {model}`` (kind CLIENT) with the GenAI
semantic-convention attributes: ``gen_ai.operation.name``, ``gen_ai.provider.name``,
``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.usage.input_tokens``,
``gen_ai.usage.output_tokens``, ``gen_ai.response.finish_reasons``, and ``error.type`` on failure;
``kernelflow.step`` and ``kernelflow.pipeline`` name where it was called. Prompt and completion text
(``gen_ai.input.messages``, ``gen_ai.output.messages``) only with ``KERNELFLOW_TRACE_CONTENT=1``.
"""

from __future__ import annotations

import json
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from temporalio import activity
from temporalio.client import Interceptor as ClientInterceptor
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.exceptions import ApplicationError
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

__all__ = ["ModelCallSpans", "Tracing"]

LLM_CHAT = "llm_chat"


class Tracing:
    """A tracer provider and the interceptors that use it."""

    def __init__(self, provider: TracerProvider, *, record_content: bool = False) -> None:
        self.provider = provider
        self.record_content = record_content
        self.tracer = provider.get_tracer("kernelflow")

    @classmethod
    def from_environment(
        cls, *, record_content: bool = False, exporter: SpanExporter | None = None
    ) -> Tracing:
        """OTLP over HTTP/protobuf or gRPC as ``OTEL_EXPORTER_OTLP_PROTOCOL`` says (default
        http/protobuf), to ``OTEL_EXPORTER_OTLP_ENDPOINT``; the resource from ``OTEL_SERVICE_NAME``
        and ``OTEL_RESOURCE_ATTRIBUTES`` (service name ``kernelflow-worker`` by default)."""
        import os

        if exporter is None:
            if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter as GrpcExporter,
                )

                exporter = GrpcExporter()
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter()
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "kernelflow-worker")})
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        if not isinstance(trace.get_tracer_provider(), TracerProvider):
            trace.set_tracer_provider(provider)
        return cls(provider, record_content=record_content)

    def interceptors(self) -> list[ClientInterceptor]:
        return [
            TracingInterceptor(self.tracer),
            ModelCallSpans(self.tracer, record_content=self.record_content),
        ]

    def shutdown(self) -> None:
        self.provider.force_flush()
        self.provider.shutdown()


class ModelCallSpans(ClientInterceptor, Interceptor):
    def __init__(self, tracer: trace.Tracer, *, record_content: bool = False) -> None:
        self.tracer = tracer
        self.record_content = record_content

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ModelCallSpan(next, self)


class _ModelCallSpan(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, root: ModelCallSpans) -> None:
        super().__init__(next)
        self.root = root

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        if activity.info().activity_type != LLM_CHAT or not input.args:
            return await super().execute_activity(input)
        call = input.args[0]
        model = str(getattr(call, "model", ""))
        provider, _, name = model.partition("/")
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": provider if name else "alias",
            "gen_ai.request.model": name or model,
            "kernelflow.step": str(getattr(call, "step_id", "")),
            "kernelflow.pipeline": str(getattr(call, "pipeline", "")),
            "kernelflow.attempt": activity.info().attempt,
        }
        if self.root.record_content:
            request = getattr(call, "request", None)
            messages = getattr(request, "messages", None)
            if messages is not None:
                attributes["gen_ai.input.messages"] = json.dumps(
                    [m.model_dump(mode="json") if hasattr(m, "model_dump") else str(m) for m in messages]
                )
        with self.root.tracer.start_as_current_span(
            f"chat {name or model}", kind=SpanKind.CLIENT, attributes=attributes, record_exception=False
        ) as span:
            try:
                result = await super().execute_activity(input)
            except ApplicationError as exc:
                span.set_attribute("error.type", exc.type or type(exc).__name__)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise
            except BaseException as exc:
                span.set_attribute("error.type", type(exc).__name__)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise
            response = getattr(result, "response", None)
            usage = getattr(response, "usage", None)
            answered: dict[str, Any] = {
                "gen_ai.provider.name": str(getattr(result, "provider", provider)),
                "gen_ai.response.model": str(
                    getattr(response, "model", None)
                    or str(getattr(result, "model_ref", "")).split("/", 1)[-1]
                ),
            }
            if usage is not None:
                answered["gen_ai.usage.input_tokens"] = int(usage.prompt_tokens)
                answered["gen_ai.usage.output_tokens"] = int(usage.completion_tokens)
            finish = getattr(response, "finish_reason", None)
            if finish:
                answered["gen_ai.response.finish_reasons"] = [str(finish)]
            if self.root.record_content and response is not None:
                answered["gen_ai.output.messages"] = json.dumps({"text": getattr(response, "text", None)})
            span.set_attributes(answered)  # one call: the span takes its lock once
            return result

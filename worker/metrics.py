"""Kernelflow's metrics, recorded through the Temporal SDK's meters and exported with the SDK's own.

Model calls are measured in an activity interceptor (and the time to first token by a hook in the
streaming reader); pipelines started/finished and fallbacks taken are counted from a workflow
interceptor through the workflow's replay-safe meter (a replayed history counts nothing again);
approvals waiting is read from visibility; circuit-breaker state comes from the breakers' listener.

Names follow OpenTelemetry's GenAI semantic conventions where they define one
(``gen_ai.client.operation.duration``, ``gen_ai.client.token.usage``), with their attributes, in
the form an OpenTelemetry Prometheus exporter gives them (dots become underscores: the SDK core
exports names as they are given, and Prometheus refuses dots); counters end in ``_total``. Every label is bounded: provider
and model names come from the configuration, outcomes from the error classes, statuses from a fixed
set; the ``pipeline`` label (on by default) has one value per pipeline name you deploy and
``tenant`` (off by default) one per tenant: ``KERNELFLOW_METRICS_LABELS`` chooses them
(``pipeline,tenant``, ``pipeline`` or ``none``). No workflow ids, no prompts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.client import Interceptor as ClientInterceptor
from temporalio.common import MetricMeter
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    ExecuteWorkflowInput,
    Interceptor,
    StartActivityInput,
    StartLocalActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)
from temporalio.workflow import ContinueAsNewError

from kernel.routing import BreakerState, BreakerStatus

__all__ = ["APPROVALS_QUERY", "METRICS", "KernelflowMetrics", "MetricsInterceptor"]

_log = structlog.get_logger("kernelflow.metrics")

LLM_CHAT = "llm_chat"
PIPELINE_WORKFLOW = "PipelineWorkflow"

METRICS: dict[str, tuple[str, str, str]] = {
    # name: (type, labels, meaning)
    "gen_ai_client_operation_duration": (
        "histogram (s)",
        "gen_ai_operation_name, gen_ai_provider_name, gen_ai_request_model, gen_ai_response_model, error_type",
        "duration of one model call (one attempt), failed ones included with error_type",
    ),
    "gen_ai_client_token_usage": (
        "histogram ({token})",
        "gen_ai_operation_name, gen_ai_provider_name, gen_ai_request_model, gen_ai_response_model, "
        "gen_ai_token_type (input|output)",
        "input and output tokens per call",
    ),
    "kernelflow_model_calls": (
        "counter",
        "provider, model, outcome (ok or the error class), pipeline",
        "model calls (attempts) by outcome",
    ),
    "kernelflow_model_tokens": (
        "counter",
        "provider, model, kind (prompt|completion|cached|reasoning)",
        "tokens by kind; cached and reasoning are parts of prompt and completion",
    ),
    "kernelflow_model_cost": (
        "histogram (USD)",
        "provider, model",
        "cost per priced call; _sum is the money spent",
    ),
    "kernelflow_model_time_to_first_token": (
        "histogram (s)",
        "provider, model",
        "streamed calls: time until the first token",
    ),
    "kernelflow_fallbacks": ("counter", "from_model, to_model, pipeline", "fallbacks taken by a step"),
    "kernelflow_circuit_breaker_state": (
        "gauge",
        "provider, model",
        "0 closed, 1 half-open, 2 open",
    ),
    "kernelflow_pipelines_started": ("counter", "pipeline, tenant", "pipelines started"),
    "kernelflow_pipelines_finished": (
        "counter",
        "pipeline, tenant, status (completed|failed|cancelled|terminated-by-error)",
        "pipelines finished",
    ),
    "kernelflow_approvals_waiting": (
        "gauge",
        "namespace",
        "running pipelines waiting for an approval (from visibility: KernelflowAwaiting not empty)",
    ),
}
"""Every Kernelflow metric: the documentation table and the dashboard test read this."""

APPROVALS_QUERY = "ExecutionStatus = 'Running' AND KernelflowAwaiting IS NOT NULL"

_BREAKER_VALUE: dict[str, int] = {"closed": 0, "half_open": 1, "open": 2}


def _split_model(model: str) -> tuple[str, str]:
    provider, sep, name = model.partition("/")
    return (provider, name) if sep else ("alias", model)


@dataclass(frozen=True, slots=True)
class _FinishedCall:
    duration: Any
    input_tokens: Any
    output_tokens: Any
    calls: Any
    prompt: Any
    completion: Any
    cached: Any
    reasoning: Any
    cost: Any


class KernelflowMetrics:
    """The process-side instruments (activities, breakers, visibility), on the runtime's meter."""

    def __init__(self, meter: MetricMeter, *, labels: Sequence[str] = ("pipeline",)) -> None:
        self.labels = frozenset(labels)
        self._cache: dict[tuple[int, tuple[tuple[str, str], ...]], Any] = {}
        self._finished: dict[tuple[str, str, str, str, str | None], _FinishedCall] = {}
        self.duration = meter.create_histogram_float(
            "gen_ai_client_operation_duration", "GenAI operation duration.", "s"
        )
        self.token_usage = meter.create_histogram(
            "gen_ai_client_token_usage", "Number of input and output tokens used.", "{token}"
        )
        self.calls = meter.create_counter("kernelflow_model_calls", "Model calls (attempts) by outcome.")
        self.tokens = meter.create_counter("kernelflow_model_tokens", "Tokens by kind.", "{token}")
        self.cost = meter.create_histogram_float("kernelflow_model_cost", "Cost per priced call.", "USD")
        self.ttft = meter.create_histogram_float(
            "kernelflow_model_time_to_first_token", "Time to the first streamed token.", "s"
        )
        self.breaker = meter.create_gauge(
            "kernelflow_circuit_breaker_state", "0 closed, 1 half-open, 2 open."
        )
        self.approvals = meter.create_gauge(
            "kernelflow_approvals_waiting", "Running pipelines waiting for an approval."
        )

    def _bound(self, instrument: Any, attributes: Mapping[str, str]) -> Any:
        """``instrument`` with ``attributes`` bound once per label set (a record through a bound
        instrument costs a third of one that passes its attributes). Label sets are bounded, so is
        this cache."""
        key = (id(instrument), tuple(sorted(attributes.items())))
        bound = self._cache.get(key)
        if bound is None:
            bound = self._cache[key] = instrument.with_additional_attributes(attributes)
        return bound

    # --- model calls (activity side) --------------------------------------------------------------

    def call_finished(self, call: Any, result: Any, seconds: float) -> None:
        provider = str(result.provider)
        model = str(result.model_ref).split("/", 1)[-1]
        requested = _split_model(str(call.model))[1]
        answered = str(getattr(result.response, "model", None) or model)
        pipeline = self._pipeline(call).get("pipeline")
        key = (provider, model, requested, answered, pipeline)
        bound = self._finished.get(key)
        if bound is None:
            bound = self._finished[key] = self._bind_finished(provider, model, requested, answered, pipeline)
        bound.duration.record(seconds)
        usage = result.response.usage
        bound.input_tokens.record(int(usage.prompt_tokens))
        bound.output_tokens.record(int(usage.completion_tokens))
        bound.calls.add(1)
        for counter, value in (
            (bound.prompt, usage.prompt_tokens),
            (bound.completion, usage.completion_tokens),
            (bound.cached, getattr(usage, "cached_tokens", 0) or 0),
            (bound.reasoning, getattr(usage, "reasoning_tokens", 0) or 0),
        ):
            if value:
                counter.add(int(value))
        if result.cost_usd is not None:
            bound.cost.record(float(result.cost_usd))

    def _bind_finished(
        self, provider: str, model: str, requested: str, answered: str, pipeline: str | None
    ) -> _FinishedCall:
        """Every instrument a finished call records, bound to its labels once per label set."""
        base = {
            "gen_ai_operation_name": "chat",
            "gen_ai_provider_name": provider,
            "gen_ai_request_model": requested,
            "gen_ai_response_model": answered,
        }
        short = {"provider": provider, "model": model}
        calls = {**short, "outcome": "ok", **({"pipeline": pipeline} if pipeline else {})}
        return _FinishedCall(
            duration=self._bound(self.duration, base),
            input_tokens=self._bound(self.token_usage, {**base, "gen_ai_token_type": "input"}),
            output_tokens=self._bound(self.token_usage, {**base, "gen_ai_token_type": "output"}),
            calls=self._bound(self.calls, calls),
            prompt=self._bound(self.tokens, {**short, "kind": "prompt"}),
            completion=self._bound(self.tokens, {**short, "kind": "completion"}),
            cached=self._bound(self.tokens, {**short, "kind": "cached"}),
            reasoning=self._bound(self.tokens, {**short, "kind": "reasoning"}),
            cost=self._bound(self.cost, short),
        )

    def call_failed(self, call: Any, error: str, seconds: float) -> None:
        provider, model = _split_model(str(call.model))
        attributes = {
            "gen_ai_operation_name": "chat",
            "gen_ai_provider_name": provider,
            "gen_ai_request_model": model,
            "error_type": error,
        }
        self._bound(self.duration, attributes).record(seconds)
        outcome = {"provider": provider, "model": model, "outcome": error, **self._pipeline(call)}
        self._bound(self.calls, outcome).add(1)

    def first_token(self, provider: str, model: str, seconds: float) -> None:
        """Called by the streaming reader when the first token arrives."""
        self._bound(self.ttft, {"provider": provider, "model": _split_model(model)[1]}).record(seconds)

    def _pipeline(self, call: Any) -> dict[str, str]:
        name = getattr(call, "pipeline", None)
        if "pipeline" in self.labels and name:
            return {"pipeline": str(name)}
        return {}

    # --- breakers, visibility ----------------------------------------------------------------------

    def breaker_changed(self, status: BreakerStatus, _: BreakerState) -> None:
        provider, model = _split_model(str(status.key))
        self.breaker.set(_BREAKER_VALUE.get(str(status.state), 0), {"provider": provider, "model": model})

    async def watch_approvals(self, client: Client, *, every: float = 15.0) -> None:
        """Keep ``kernelflow.approvals.waiting`` current from visibility until cancelled."""
        warned = False
        while True:
            try:
                counted = await client.count_workflows(APPROVALS_QUERY)
                self.approvals.set(int(counted.count), {"namespace": client.namespace})
                warned = False
            except Exception as exc:  # visibility unavailable or the attribute not registered yet
                if not warned:
                    error = " ".join(str(exc).split())
                    if "KernelflowAwaiting" in error:  # a namespace set up before the attribute existed
                        _log.info(
                            "approvals waiting not counted: KernelflowAwaiting is not registered", error=error
                        )
                    else:
                        _log.warning("cannot count approvals waiting", error=error)
                    warned = True
            await asyncio.sleep(every)


class MetricsInterceptor(ClientInterceptor, Interceptor):
    """Measures ``llm_chat`` attempts (activity side) and pipelines and fallbacks (workflow side)."""

    def __init__(self, metrics: KernelflowMetrics) -> None:
        self.metrics = metrics

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityMetrics(next, self.metrics)

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        labels = self.metrics.labels

        class _Bound(_WorkflowMetrics):
            enabled = labels

        return _Bound


class _ActivityMetrics(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, metrics: KernelflowMetrics) -> None:
        super().__init__(next)
        self.metrics = metrics

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        if activity.info().activity_type != LLM_CHAT or not input.args:
            return await super().execute_activity(input)
        call = input.args[0]
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            result = await super().execute_activity(input)
        except ApplicationError as exc:
            self.metrics.call_failed(call, exc.type or type(exc).__name__, loop.time() - started)
            raise
        except asyncio.CancelledError:
            self.metrics.call_failed(call, "Cancelled", loop.time() - started)
            raise
        except Exception as exc:
            self.metrics.call_failed(call, type(exc).__name__, loop.time() - started)
            raise
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            self.metrics.call_finished(call, result, loop.time() - started)
        return result


class _WorkflowMetrics(WorkflowInboundInterceptor):
    enabled: frozenset[str] = frozenset()

    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        self.attributes: dict[str, str] = {}
        super().init(_FallbackCounter(outbound, self))

    async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
        info = workflow.info()
        if info.workflow_type != PIPELINE_WORKFLOW:
            return await super().execute_workflow(input)
        request = input.args[0] if input.args else None
        self.attributes = self._labels(request)
        meter = workflow.metric_meter()
        if info.continued_run_id is None:
            meter.create_counter("kernelflow_pipelines_started").add(1, self.attributes)
        finished = meter.create_counter("kernelflow_pipelines_finished")
        try:
            result = await super().execute_workflow(input)
        except ContinueAsNewError:
            raise
        except asyncio.CancelledError:
            finished.add(1, {**self.attributes, "status": "cancelled"})
            raise
        except BaseException:
            finished.add(1, {**self.attributes, "status": "failed"})
            raise
        finished.add(1, {**self.attributes, "status": str(getattr(result, "status", "completed"))})
        return result

    def _labels(self, request: Any) -> dict[str, str]:
        """From the request as the workflow receives it: a model or the raw JSON object."""

        def field(owner: Any, name: str) -> Any:
            return owner.get(name) if isinstance(owner, Mapping) else getattr(owner, name, None)

        labels: dict[str, str] = {}
        if "pipeline" in self.enabled:
            name = field(field(request, "pipeline"), "name") or field(request, "pipeline_name")
            labels["pipeline"] = str(name or "unknown")[:64]
        if "tenant" in self.enabled:
            labels["tenant"] = str(field(request, "tenant") or "none")[:64]
        return labels


class _FallbackCounter(WorkflowOutboundInterceptor):
    """A step whose next model call names another model than its previous one took a fallback."""

    def __init__(self, next: WorkflowOutboundInterceptor, owner: _WorkflowMetrics) -> None:
        super().__init__(next)
        self.owner = owner
        self.last_model: dict[str, str] = {}

    def _seen(self, activity_name: str, args: Sequence[Any]) -> None:
        if activity_name != LLM_CHAT or not args:
            return
        call = args[0]
        step, model = str(getattr(call, "step_id", "")), str(getattr(call, "model", ""))
        if not step or not model:
            return
        before = self.last_model.get(step)
        self.last_model[step] = model
        if before is not None and before != model:
            attributes = {"from_model": before, "to_model": model}
            if "pipeline" in self.owner.attributes:
                attributes["pipeline"] = self.owner.attributes["pipeline"]
            workflow.metric_meter().create_counter("kernelflow_fallbacks").add(1, attributes)

    def start_activity(self, input: StartActivityInput) -> workflow.ActivityHandle[Any]:
        self._seen(input.activity, input.args)
        return super().start_activity(input)

    def start_local_activity(self, input: StartLocalActivityInput) -> workflow.ActivityHandle[Any]:
        self._seen(input.activity, input.args)
        return super().start_local_activity(input)

"""``PipelineWorkflow``: the deterministic interpreter of a pipeline spec.

The event history is the record: each completed model call is an activity result in it, so a crashed
worker resumes after the last completed step and nothing completed is paid for twice. No I/O, clocks or
randomness here; everything with side effects is an activity.

Names are public API and never change: workflow ``PipelineWorkflow``, query ``status`` and ``outputs``,
signal ``cancel``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from pydantic import BaseModel, Field
from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.llm import LlmCallResult
    from kernel.contracts import ChatRequest, Usage
    from kernel.errors import PipelineError
    from kernel.pipeline import LlmStep, PipelineSpec, parse_pipeline
    from kernel.templating import render
    from workflows import search_attributes as sa
    from workflows.calls import AllModelsFailed, CallOptions, ModelFailure, call_model, order_models

__all__ = [
    "PIPELINE_WORKFLOW",
    "CancelRequest",
    "ModelFailure",
    "PipelineRequest",
    "PipelineResult",
    "PipelineStatus",
    "PipelineWorkflow",
    "StepState",
]

PIPELINE_WORKFLOW = "PipelineWorkflow"

StepStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
RunStatus = Literal["running", "completed", "failed", "cancelled"]


class PipelineRequest(BaseModel):
    """Workflow input. ``pipeline`` is the spec as JSON (validated by the workflow, so a spec sent
    from the ``temporal`` CLI gets the same clear error as one sent by ``kernelflow run``)."""

    pipeline: dict[str, Any]
    inputs: dict[str, Any] = Field(default_factory=dict)
    tenant: str | None = None


class CancelRequest(BaseModel):
    reason: str = "cancelled by request"


class StepState(BaseModel):
    id: str
    type: str
    status: StepStatus = "pending"
    model: str | None = Field(default=None, description="The provider/model that answered (or is trying).")
    provider: str | None = None
    failures: list[ModelFailure] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float | None = None
    output: Any = None
    error: str | None = None


class PipelineStatus(BaseModel):
    pipeline: str
    status: RunStatus = "running"
    current_step: str | None = None
    steps: list[StepState] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    cost_unknown_models: list[str] = Field(default_factory=list, description="Models whose price is unknown.")
    error: str | None = None


class PipelineResult(BaseModel):
    pipeline: str
    status: RunStatus
    outputs: dict[str, Any] = Field(default_factory=dict)
    steps: list[StepState] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    cost_unknown_models: list[str] = Field(default_factory=list)
    reason: str | None = None


def _parse_json(result: LlmCallResult) -> Any:
    try:
        return json.loads(result.response.text)
    except ValueError as exc:
        raise ValueError(f"the answer is not JSON: {exc}") from exc


@workflow.defn(name=PIPELINE_WORKFLOW)
class PipelineWorkflow:
    @workflow.init
    def __init__(self, request: PipelineRequest) -> None:
        name = request.pipeline.get("name") if isinstance(request.pipeline, dict) else None
        self._status = PipelineStatus(pipeline=str(name or "unnamed"))
        self._cancel: CancelRequest | None = None
        self._in_flight: asyncio.Task[Any] | None = None
        self._providers: list[str] = []

    # --- driving from outside ---------------------------------------------------------------------

    @workflow.query(name="status")
    def status(self) -> PipelineStatus:
        return self._status

    @workflow.query(name="outputs")
    def outputs(self) -> dict[str, Any]:
        return {s.id: s.output for s in self._status.steps if s.status == "completed"}

    @workflow.signal(name="cancel")
    def cancel(self, request: CancelRequest | None = None) -> None:
        """Stop after cancelling the call in flight; finished steps and their outputs are kept."""
        if self._cancel is None and self._status.status == "running":
            self._cancel = request or CancelRequest()
            if self._in_flight is not None and not self._in_flight.done():
                self._in_flight.cancel()

    # --- the run ----------------------------------------------------------------------------------

    @workflow.run
    async def run(self, request: PipelineRequest) -> PipelineResult:
        spec = self._validate(request)
        self._status.steps = [StepState(id=s.id, type=s.type) for s in spec.steps]
        try:
            inputs = spec.resolve_inputs(request.inputs)
        except PipelineError as exc:
            raise self._fail(f"invalid inputs: {exc}", error_type="PipelineError") from None
        attributes = [sa.PIPELINE.value_set(spec.name), sa.STATUS.value_set("Running")]
        if request.tenant:
            attributes.append(sa.TENANT.value_set(request.tenant))
        workflow.upsert_search_attributes(attributes)
        context: dict[str, Any] = {"inputs": inputs, "steps": {}}
        try:
            for index, step in enumerate(spec.steps):
                if self._cancel is not None:
                    break
                state = self._status.steps[index]
                self._status.current_step = step.id
                await self._run_llm_step(spec, step, state, context, position=(index + 1, len(spec.steps)))
                if state.status == "cancelled":
                    break
        except asyncio.CancelledError:
            self._finish("cancelled", "Cancelled", reason="workflow cancelled")
            raise
        if self._cancel is not None:
            return self._finish("cancelled", "Cancelled", reason=self._cancel.reason)
        outputs = {
            name: self._render(source, context, location=f"outputs.{name}")
            for name, source in spec.outputs.items()
        }
        return self._finish("completed", "Completed", outputs=outputs)

    def _validate(self, request: PipelineRequest) -> PipelineSpec:
        try:
            return parse_pipeline(request.pipeline)
        except PipelineError as exc:
            raise self._fail(str(exc), error_type="PipelineError") from None

    async def _run_llm_step(
        self,
        spec: PipelineSpec,
        step: LlmStep,
        state: StepState,
        context: dict[str, Any],
        *,
        position: tuple[int, int],
    ) -> None:
        messages = [
            {
                "role": m.role,
                "content": self._render(m.content, context, location=f"step {step.id!r} messages[{i}]"),
            }
            for i, m in enumerate(step.message_templates())
        ]
        models = order_models(step.model, step.fallbacks, step.balance)
        request = self._chat_request(step, step.model, messages)
        options = CallOptions(
            timeout_s=step.timeout_s,
            heartbeat_timeout_s=step.heartbeat_timeout_s,
            retry=step.retry or spec.retry,
            local_activity=step.local_activity,
            stream=step.stream,
        )

        def on_attempt(model: str, number: int) -> None:
            state.model = model
            suffix = f" (fallback {number - 1} of {len(models) - 1})" if number > 1 else ""
            self._details(position, f"{step.id} · {model}{suffix}")

        state.status = "running"
        self._in_flight = asyncio.ensure_future(
            call_model(
                models,
                request,
                options=options,
                label=f"step {step.id!r}",
                step_id=step.id,
                pipeline=spec.name,
                validate=_parse_json if step.output == "json" else None,
                on_attempt=on_attempt,
                on_failure=state.failures.append,
            )
        )
        try:
            result, output = await self._in_flight
        except asyncio.CancelledError:
            if self._cancel is None:
                raise
            state.status = "cancelled"
            return
        except AllModelsFailed as exc:
            state.status = "failed"
            state.error = exc.message
            raise self._fail(exc.message, error_type="StepFailed") from None
        finally:
            self._in_flight = None
        self._record(state, result, output)
        context["steps"][step.id] = {
            "output": output,
            "text": result.response.text,
            "model": result.model_ref,
            "provider": result.provider,
        }

    def _chat_request(self, step: LlmStep, model: str, messages: list[dict[str, Any]]) -> ChatRequest:
        try:
            return ChatRequest.model_validate(
                {
                    "model": model,
                    "messages": messages,
                    "temperature": step.temperature,
                    "max_tokens": step.max_tokens,
                    "response_format": step.response_format,
                    "tools": step.tools,
                }
            )
        except ValueError as exc:
            raise self._fail(
                f"step {step.id!r} builds an invalid request: {exc}", error_type="PipelineError"
            ) from None

    # --- bookkeeping ------------------------------------------------------------------------------

    def _record(self, state: StepState, result: LlmCallResult, output: Any) -> None:
        state.status = "completed"
        state.model = result.model_ref
        state.provider = result.provider
        state.usage = result.response.usage
        state.cost_usd = result.cost_usd
        state.output = output
        self._status.usage = self._status.usage + result.response.usage
        if result.cost_usd is None:
            if result.model_ref not in self._status.cost_unknown_models:
                self._status.cost_unknown_models.append(result.model_ref)
        else:
            self._status.cost_usd = round(self._status.cost_usd + result.cost_usd, 10)
        if result.provider not in self._providers:
            self._providers.append(result.provider)
            workflow.upsert_search_attributes([sa.PROVIDER.value_set(list(self._providers))])

    def _render(self, source: str, context: dict[str, Any], *, location: str) -> str:
        try:
            return render(source, context, location=location)
        except PipelineError as exc:
            raise self._fail(str(exc), error_type="PipelineError") from None

    def _details(self, position: tuple[int, int], summary: str) -> None:
        done = [s.id for s in self._status.steps if s.status == "completed"]
        workflow.set_current_details(
            f"**{self._status.pipeline}** — step {position[0]}/{position[1]}: `{summary}`\n\n"
            f"completed: {', '.join(done) or 'none'} · tokens {self._status.usage.total_tokens}"
            f" · cost ${self._status.cost_usd:.6f}"
        )

    def _fail(self, message: str, *, error_type: str) -> ApplicationError:
        self._status.status = "failed"
        self._status.error = message
        self._status.current_step = None
        workflow.upsert_search_attributes([sa.STATUS.value_set("Failed")])
        workflow.set_current_details(f"**failed**: {message}")
        return ApplicationError(message, type=error_type, non_retryable=True)

    def _finish(
        self,
        status: RunStatus,
        label: str,
        *,
        outputs: dict[str, Any] | None = None,
        reason: str | None = None,
    ) -> PipelineResult:
        self._status.status = status
        self._status.current_step = None
        workflow.upsert_search_attributes([sa.STATUS.value_set(label)])
        workflow.set_current_details(f"**{label.lower()}**" + (f": {reason}" if reason else ""))
        return PipelineResult(
            pipeline=self._status.pipeline,
            status=status,
            outputs=outputs or {},
            steps=self._status.steps,
            usage=self._status.usage,
            cost_usd=self._status.cost_usd,
            cost_unknown_models=self._status.cost_unknown_models,
            reason=reason,
        )

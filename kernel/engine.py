"""The pipeline interpreter: runs a validated spec step by step over ``RunState``.

Pure and deterministic given its ``Effects``: every timer, wait, model call, tool call, child
pipeline, search-attribute update and Web UI detail goes through that small interface. The
``PipelineWorkflow`` gives it Temporal's (``workflows.engine.effects``); a unit test can give it an
in-memory one and run a pipeline without a Temporal server.

How each kind of step runs lives with its spec in ``kernel/steps/<kind>.py``; this module holds what
all steps share: scopes, step states, skipping, accounting, budgets, routes, and lifecycle events.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, TypeVar

from kernel.contracts import ChatRequest, ChatResponse, EmbedRequest, EmbedResponse, Usage
from kernel.errors import FailureType, PipelineError
from kernel.expressions import evaluate, render_value
from kernel.pipeline import PipelineSpec
from kernel.routing import apply_routes
from kernel.run import ApprovalState, ModelFailure, RunState, StepState
from kernel.steps.base import BudgetSpec, RetrySpec, StepFailure, StepSpec, step_kind
from kernel.templating import render

__all__ = [
    "LIFECYCLE_TYPES",
    "Answered",
    "CallResult",
    "ChildCall",
    "ChildResult",
    "Effects",
    "EmbedCall",
    "EmbedResult",
    "Engine",
    "LifecycleEvent",
    "ModelCall",
    "RunInfo",
    "Scope",
    "SearchField",
    "StepRun",
    "ToolCall",
    "ToolResult",
    "json_value",
]

SearchField = Literal["status", "providers", "awaiting", "models"]

LIFECYCLE_TYPES = (
    "pipeline.started",
    "step.completed",
    "step.failed",
    "model.fallback",
    "approval.requested",
    "approval.decided",
    "pipeline.completed",
    "pipeline.failed",
    "pipeline.cancelled",
)


@dataclass(frozen=True)
class LifecycleEvent:
    """Something that happened to a pipeline, as outbound events report it: references and summaries
    (ids, models, usage, cost, error types), never prompts or outputs."""

    type: str
    sequence: int
    time: datetime
    step_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunInfo:
    workflow_id: str
    pipeline: str
    tenant: str | None = None


# --- what effects take and give ------------------------------------------------------------------


_R_co = TypeVar("_R_co", covariant=True)


class Answered(Protocol[_R_co]):
    """What a model answered: its response, the ``provider/model`` that answered, and the cost."""

    @property
    def response(self) -> _R_co: ...
    @property
    def model_ref(self) -> str: ...
    @property
    def provider(self) -> str: ...
    @property
    def cost_usd(self) -> float | None: ...


CallResult = Answered[ChatResponse]
EmbedResult = Answered[EmbedResponse]


@dataclass
class ModelCall:
    """One model call of a step: the models in order (fallbacks after the first), how each is called,
    and the hooks the step uses to follow it."""

    models: list[str]
    request: ChatRequest
    step_id: str
    pipeline: str
    label: str
    timeout_s: float
    heartbeat_timeout_s: float | None
    retry: RetrySpec
    local_activity: bool = False
    stream: bool = False
    max_repairs: int = 0
    validate: Callable[[Any], Any] | None = None
    on_attempt: Callable[[str, int], None] | None = None
    on_failure: Callable[[ModelFailure], None] | None = None
    on_repair: Callable[[ModelFailure], None] | None = None
    route: Callable[[str], str] | None = None


@dataclass
class EmbedCall:
    model: str
    request: EmbedRequest
    step_id: str
    pipeline: str
    timeout_s: float
    retry: RetrySpec
    summary: str
    heartbeat_timeout_s: float | None = None


@dataclass
class ToolCall:
    url: str
    method: str
    headers: dict[str, str]
    query: dict[str, str]
    body: Any
    timeout_s: float
    step_id: str
    retry: RetrySpec
    summary: str
    heartbeat_timeout_s: float | None = None


class ToolResult(Protocol):
    @property
    def status_code(self) -> int: ...
    @property
    def body(self) -> Any: ...


@dataclass
class ChildCall:
    step_id: str
    name: str
    workflow_id: str
    request: dict[str, Any]
    summary: str


class ChildResult(Protocol):
    @property
    def outputs(self) -> dict[str, Any]: ...
    @property
    def usage(self) -> Usage: ...
    @property
    def cost_usd(self) -> float: ...
    @property
    def cost_unknown_models(self) -> list[str]: ...


class Effects(Protocol):
    """Everything the interpreter does to the world. Each method either returns or raises
    ``StepFailure`` (a failure the step reports) or ``asyncio.CancelledError``."""

    def now(self) -> datetime: ...
    def random(self) -> float: ...
    async def sleep(self, seconds: float, *, summary: str) -> None: ...
    async def wait(self, condition: Callable[[], bool], *, timeout: float | None, summary: str) -> bool:  # noqa: ASYNC109
        """Wait until ``condition()`` holds: True, or False when ``timeout`` seconds passed first."""
        ...

    async def call_model(self, call: ModelCall) -> tuple[CallResult, Any]: ...
    async def embed(self, call: EmbedCall) -> EmbedResult: ...
    async def tool(self, call: ToolCall) -> ToolResult: ...
    async def child(self, call: ChildCall) -> ChildResult: ...
    def search(self, updates: Mapping[SearchField, str | list[str]]) -> None:
        """Set search attributes, all in one update."""
        ...

    def details(self, text: str) -> None: ...
    def lifecycle(self, event: LifecycleEvent) -> None: ...


# --- scopes and the handler's view -----------------------------------------------------------------


@dataclass
class Scope:
    """Where steps run: the template context, whether their states are listed in the status (not
    inside a scope boundary such as a map), the enclosing step, and a label for ids."""

    context: dict[str, Any]
    listed: bool = True
    parent: str | None = None
    label: str = ""
    scratch: dict[str, StepState] = field(default_factory=dict)

    @property
    def steps(self) -> MutableMapping[str, Any]:
        steps: MutableMapping[str, Any] = self.context["steps"]
        return steps

    def inner(self, parent: str) -> Scope:
        """The scope of a step's nested steps (same context; listed like the step)."""
        return Scope(self.context, self.listed, parent, self.label, self.scratch)


@dataclass
class StepRun:
    """What a step handler gets: the engine, the step's scope and its state, and helpers that name
    the step in every error."""

    engine: Engine
    step: StepSpec
    scope: Scope
    state: StepState

    @property
    def effects(self) -> Effects:
        return self.engine.effects

    @property
    def spec(self) -> PipelineSpec:
        return self.engine.spec

    def where(self, field_name: str = "") -> str:
        return f"step {self.step.id!r}" + (f" {field_name}" if field_name else "")

    def fail(self, message: str, type: str = FailureType.STEP_FAILED) -> StepFailure:
        return StepFailure(message, type)

    def render(self, source: str, field_name: str, scope: Scope | None = None) -> str:
        return self.engine.render(source, scope or self.scope, self.where(field_name))

    def value(self, value: Any, field_name: str, scope: Scope | None = None) -> Any:
        return self.engine.value(value, scope or self.scope, self.where(field_name))

    def evaluate(self, source: str, field_name: str, scope: Scope | None = None) -> Any:
        return self.engine.evaluate(source, scope or self.scope, self.where(field_name))

    def detail(self, text: str | None) -> None:
        self.state.detail = text

    def details(self, summary: str) -> None:
        self.engine.details(summary)

    def account(self, usage: Usage, cost: float | None, model_ref: str | None) -> None:
        self.engine.account(self.state, usage, cost, model_ref)

    def route(self, model: str) -> str:
        return self.engine.route(model)


# --- the engine ------------------------------------------------------------------------------------


class Engine:
    """Runs ``spec`` over ``state`` through ``effects``."""

    def __init__(self, spec: PipelineSpec, state: RunState, effects: Effects, info: RunInfo) -> None:
        self.spec = spec
        self.state = state
        self.effects = effects
        self.info = info
        self._listed = {s.id: s for s in state.status.steps}

    # --- running -------------------------------------------------------------------------------

    def top_scope(self) -> Scope:
        return Scope({"inputs": self.state.inputs, "steps": self.state.context_steps})

    async def run_steps(self, steps: Sequence[StepSpec], scope: Scope) -> Any:
        output: Any = None
        for step in steps:
            output = await self.run_step(step, scope)
        return output

    async def run_step(self, step: StepSpec, scope: Scope) -> Any:
        status = self.state.status
        if status.paused:
            await self.effects.wait(lambda: not status.paused, timeout=None, summary="paused")
        state = self.step_state(step, scope)
        if step.when is not None and not self.evaluate(step.when, scope, f"step {step.id!r} when"):
            self.skip([step], scope)
            return None
        state.status = "running"
        if scope.listed:
            status.current_step = step.id
        self.details(f"{step.id} ({step.type})")
        run = StepRun(self, step, scope, state)
        try:
            output, extras = await step_kind(step.type).handler(step, run)
        except StepFailure as exc:
            state.status = "failed"
            state.error = exc.message
            if scope.listed:
                self.lifecycle("step.failed", step.id, {"error_type": exc.type, "step_type": step.type})
            raise
        except BaseException:
            state.status = "cancelled" if state.status in ("running", "waiting") else state.status
            raise
        state.status = "completed"
        state.detail = None
        state.output = output
        scope.steps[step.id] = {"output": output, "status": "completed", **extras}
        if scope.listed:
            self.lifecycle("step.completed", step.id, _step_summary(step, state))
        return output

    def step_state(self, step: StepSpec, scope: Scope) -> StepState:
        if scope.listed and step.id in self._listed:
            return self._listed[step.id]
        return scope.scratch.setdefault(step.id, StepState(id=step.id, type=step.type, parent=scope.parent))

    def skip(self, steps: Sequence[StepSpec], scope: Scope) -> None:
        for step in steps:
            self.step_state(step, scope).status = "skipped"
            scope.steps[step.id] = {"output": None, "status": "skipped"}
            decision = self.state.decisions.get(step.id)
            if step.single_instance and decision is not None:
                decision.status = "skipped"
            if not step.scope_boundary:
                for _, children in step.children():
                    self.skip(children, scope)

    # --- templates -----------------------------------------------------------------------------

    def render(self, source: str, scope: Scope, location: str) -> str:
        try:
            return render(source, scope.context, location=location)
        except PipelineError as exc:
            raise StepFailure(str(exc), FailureType.PIPELINE_ERROR) from None

    def value(self, value: Any, scope: Scope, location: str) -> Any:
        try:
            return render_value(value, scope.context, location=location)
        except PipelineError as exc:
            raise StepFailure(str(exc), FailureType.PIPELINE_ERROR) from None

    def evaluate(self, source: str, scope: Scope, location: str) -> Any:
        try:
            return evaluate(source, scope.context, location=location)
        except PipelineError as exc:
            raise StepFailure(str(exc), FailureType.PIPELINE_ERROR) from None

    # --- routes, providers, money ----------------------------------------------------------------

    def route(self, model: str) -> str:
        try:
            return apply_routes(model, self.state.status.routes)
        except ValueError:
            return model

    def note_provider(self, provider: str) -> None:
        if provider not in self.state.providers:
            self.state.providers.append(provider)
            self.effects.search({"providers": list(self.state.providers)})

    def account(self, state: StepState, usage: Usage, cost: float | None, model_ref: str | None) -> None:
        status = self.state.status
        state.usage = state.usage + usage
        status.usage = status.usage + usage
        if cost is not None:
            state.cost_usd = round((state.cost_usd or 0.0) + cost, 10)
            status.cost_usd = round(status.cost_usd + cost, 10)
        elif model_ref is not None and model_ref not in status.cost_unknown_models:
            status.cost_unknown_models.append(model_ref)

    def _over_budget(self, budget: BudgetSpec) -> str | None:
        status = self.state.status
        if budget.max_tokens is not None and status.usage.total_tokens > budget.max_tokens:
            return f"{status.usage.total_tokens} tokens used, over max_tokens {budget.max_tokens}"
        if budget.max_cost_usd is not None and status.cost_usd > budget.max_cost_usd:
            return f"${status.cost_usd:.6f} spent, over max_cost_usd ${budget.max_cost_usd:g}"
        return None

    async def check_budget(self) -> None:
        status = self.state.status
        budget = status.budget
        over = None if budget is None else self._over_budget(budget)
        if budget is None or over is None:
            return
        if budget.on_exceed == "fail":
            raise StepFailure(
                f"pipeline {status.pipeline!r} exceeded its budget: {over}", FailureType.BUDGET_EXCEEDED
            )
        if not status.paused:
            status.paused, status.pause_reason = True, f"budget exceeded: {over}"
            self.state.budget_paused = True
            self.refresh_search_status()
            self.details(f"paused: budget exceeded: {over}")
        await self.effects.wait(lambda: not status.paused, timeout=None, summary="budget pause")

    # --- what the outside sees -----------------------------------------------------------------

    def refresh_search_status(self, also: Mapping[SearchField, str | list[str]] | None = None) -> None:
        """Update ``KernelflowStatus`` if the run's state changed it, together with ``also``."""
        status = self.state.status
        waiting = any(a.status == "waiting" for a in self.state.decisions.values())
        label = "Running"
        if status.paused:
            label = "Paused"
        elif waiting:
            label = "WaitingForApproval"
        elif status.waiting_for_events:
            label = "WaitingForEvent"
        updates: dict[SearchField, str | list[str]] = dict(also or {})
        if label != self.state.search_status:
            self.state.search_status = label
            updates["status"] = label
        if updates:
            self.effects.search(updates)

    def awaiting_changed(self) -> None:
        """The approvals waiting for a decision changed: tell visibility (the approvals inbox)."""
        waiting = sorted(a.step_id for a in self.state.decisions.values() if a.status == "waiting")
        self.refresh_search_status({"awaiting": waiting})

    def remaining_models(self) -> list[str]:
        """The models the pipeline may still call: those of steps not finished, after routes."""
        done = {s.id for s in self.state.status.steps if s.status in ("completed", "skipped", "failed")}
        models: set[str] = set()
        for step, _ in self.spec.walk():
            if step.id not in done:
                models.update(self.route(m) for m in step.models())
        return sorted(models)

    def refresh_models(self) -> None:
        models = self.remaining_models()
        if models != self.state.search_models:
            self.state.search_models = models
            self.effects.search({"models": models})

    def details(self, summary: str) -> None:
        status = self.state.status
        done = [s.id for s in status.steps if s.status == "completed"]
        position = ""
        top = [s.id for s in self.spec.steps]
        if status.current_step in top:
            position = f" — step {top.index(status.current_step) + 1}/{len(top)}"
        self.effects.details(
            f"**{status.pipeline}**{position}: `{summary}`\n\n"
            f"completed: {', '.join(done) or 'none'} · tokens {status.usage.total_tokens}"
            f" · cost ${status.cost_usd:.6f}" + (" · PAUSED" if status.paused else "")
        )

    def lifecycle(self, type_: str, step_id: str | None = None, data: dict[str, Any] | None = None) -> None:
        self.state.lifecycle_sequence += 1
        self.effects.lifecycle(
            LifecycleEvent(
                type=type_,
                sequence=self.state.lifecycle_sequence,
                time=self.effects.now(),
                step_id=step_id,
                data=dict(data or {}),
            )
        )

    def decision(self, step_id: str) -> ApprovalState:
        return self.state.decisions.setdefault(step_id, ApprovalState(step_id=step_id))


def _step_summary(step: StepSpec, state: StepState) -> dict[str, Any]:
    summary: dict[str, Any] = {"step_type": step.type}
    if state.model:
        summary["model"] = state.model
    if state.usage.total_tokens:
        summary["usage"] = state.usage.model_dump()
    if state.cost_usd is not None:
        summary["cost_usd"] = state.cost_usd
    return summary


def json_value(value: Any, location: str) -> Any:
    """Values become JSON data (kept in status and history); anything else is a clear error."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        raise StepFailure(
            f"{location}: the value is not JSON data ({type(value).__name__}); a generator needs '| list'",
            FailureType.PIPELINE_ERROR,
        ) from None

"""The pipeline interpreter: runs a validated spec step by step over ``RunState``.

Pure and deterministic given its ``Effects``: every timer, wait, model call, tool call, child
pipeline, search-attribute update and Web UI detail goes through that small interface. The
``PipelineWorkflow`` gives it Temporal's (``workflows.engine.effects``); a unit test can give it an
in-memory one and run a pipeline without a Temporal server.

How each kind of step runs lives with its spec in ``kernel/steps/<kind>.py``; what a handler works
with (``StepRun``, ``Scope``, ``Effects`` and the calls it takes) is ``kernel/steps/context.py``; this
module holds what all steps share: step states, skipping, accounting, budgets, routes, visibility and
lifecycle events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kernel.contracts import Usage
from kernel.errors import FailureType, PipelineError
from kernel.expressions import evaluate, render_value
from kernel.limits import BudgetRefusal, TenantBudgetRaise
from kernel.pipeline import PipelineSpec
from kernel.routing import apply_routes
from kernel.run import ApprovalState, RunState, StepState
from kernel.steps.base import BudgetSpec, StepFailure, StepSpec, step_kind
from kernel.steps.context import (
    LIFECYCLE_TYPES,
    Answered,
    CallResult,
    ChildCall,
    ChildResult,
    ContinueAsNewRequested,
    Effects,
    EmbedCall,
    EmbedResult,
    EngineView,
    LifecycleEvent,
    McpCall,
    McpList,
    ModelCall,
    RunInfo,
    Scope,
    SearchField,
    SpecView,
    StepRun,
    ToolCall,
    ToolResult,
    json_value,
)
from kernel.templating import render

__all__ = [
    "LIFECYCLE_TYPES",
    "Answered",
    "CallResult",
    "ChildCall",
    "ChildResult",
    "ContinueAsNewRequested",
    "Effects",
    "EmbedCall",
    "EmbedResult",
    "Engine",
    "EngineView",
    "LifecycleEvent",
    "McpCall",
    "McpList",
    "ModelCall",
    "RunInfo",
    "Scope",
    "SearchField",
    "SpecView",
    "StepRun",
    "ToolCall",
    "ToolResult",
    "json_value",
]

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
        except ContinueAsNewRequested:
            raise
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

    async def tenant_budget_exceeded(self, refusal: BudgetRefusal) -> TenantBudgetRaise | None:
        """A call was refused by its tenant's cost budget; the spec's ``tenant_budget.on_exceed``
        decides. Returns the raise to apply before the call is tried again (None: try it as is), or
        raises ``StepFailure``."""
        policy = self.spec.tenant_budget
        on_exceed = policy.on_exceed if policy is not None else "fail"
        message = refusal.message()
        status = self.state.status
        if on_exceed == "fail":
            raise StepFailure(
                f"{message} (tenant_budget.on_exceed: fail)", FailureType.TENANT_BUDGET_EXCEEDED
            )
        if on_exceed == "pause":
            self.state.tenant_budget_raise = None
            if not status.paused:
                status.paused, status.pause_reason = True, f"tenant budget exceeded: {message}"
                self.refresh_search_status()
                self.details(f"paused: tenant budget exceeded: {message}")
            await self.effects.wait(lambda: not status.paused, timeout=None, summary="tenant budget pause")
            raised, self.state.tenant_budget_raise = self.state.tenant_budget_raise, None
            return raised
        number = 1 + sum(1 for d in self.state.decisions.values() if d.budget is not None)
        approval = ApprovalState(
            step_id=f"tenant-budget-{number}",
            status="waiting",
            message=f"raise the cost budget? {message}",
            approvers=policy.approvers if policy is not None else None,
            budget=refusal,
        )
        self.state.decisions[approval.step_id] = approval
        self.awaiting_changed()
        step = status.current_step
        self.lifecycle(
            "approval.requested",
            step,
            {"approval_id": approval.step_id, "tenant_budget": refusal.model_dump()},
        )
        self.details(f"{approval.step_id} waits for approval: {message}")
        try:
            await self.effects.wait(
                lambda: approval.status in ("approved", "rejected"), timeout=None, summary=approval.step_id
            )
        except GeneratorExit:  # the run is being evicted from the worker's cache: no workflow calls
            raise
        except BaseException:
            self.awaiting_changed()
            raise
        self.awaiting_changed()
        self.lifecycle(
            "approval.decided",
            step,
            {"approval_id": approval.step_id, "decision": approval.status, "by": approval.by},
        )
        if approval.status == "rejected":
            who = approval.by or "someone"
            raise StepFailure(
                f"{message}; raising it was rejected by {who}"
                + (f": {approval.comment}" if approval.comment else ""),
                FailureType.TENANT_BUDGET_EXCEEDED,
            )
        return approval.raised or refusal.covering()

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

"""``PipelineWorkflow``: the deterministic interpreter of a pipeline spec.

The event history is the record: each completed model call, tool call, timer and decision is in it, so
a crashed worker resumes after the last completed step and nothing completed is paid for twice. No
I/O, clocks or randomness here; everything with side effects is an activity. Step types run in
``workflows.engine.steps``; this module holds the state and the public surface.

Names are public API and never change: workflow ``PipelineWorkflow``; queries ``status`` and
``outputs``; signals ``cancel``, ``pause``, ``resume``, ``event``; updates ``approve``, ``reject``,
``reroute``.
"""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.contrib.workflow_streams import WorkflowStream
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from kernel.errors import PipelineError
    from kernel.pipeline import ApprovalStep, PipelineSpec, Step, parse_pipeline
    from kernel.routing import check_routes
    from workflows import search_attributes as sa
    from workflows.calls import ModelFailure
    from workflows.engine.models import (
        ApprovalState,
        CancelRequest,
        CarryOver,
        DecisionRequest,
        EventRequest,
        LoadPipelineInput,
        PauseRequest,
        PipelineRequest,
        PipelineResult,
        PipelineStatus,
        RerouteRecord,
        RerouteRequest,
        ResumeRequest,
        RunStatus,
        StepState,
    )

from workflows.engine.steps import PIPELINE_WORKFLOW, Scope, StepRunner, error

__all__ = [
    "CONTINUE_AS_NEW_AFTER",
    "LOAD_PIPELINE",
    "PIPELINE_WORKFLOW",
    "CancelRequest",
    "DecisionRequest",
    "EventRequest",
    "ModelFailure",
    "PauseRequest",
    "PipelineRequest",
    "PipelineResult",
    "PipelineStatus",
    "PipelineWorkflow",
    "RerouteRequest",
    "ResumeRequest",
    "StepState",
]

LOAD_PIPELINE = "load_pipeline"
"""The local activity that reads a registered pipeline on the worker (recorded in history)."""

CONTINUE_AS_NEW_AFTER = 10_000
"""History length after which a pipeline continues as new between top-level steps."""

_MAX_PENDING_EVENTS = 1000
_MODEL = r"^[A-Za-z0-9_.:-]+(/[^\s]+)?$"


@workflow.defn(name=PIPELINE_WORKFLOW)
class PipelineWorkflow(StepRunner):
    @workflow.init
    def __init__(self, request: PipelineRequest) -> None:
        self._request = request
        carry = request.carry_over
        name = request.pipeline_name or (
            request.pipeline.get("name") if isinstance(request.pipeline, dict) else None
        )
        self._status = PipelineStatus(pipeline=str(name or "unnamed"))
        self._cancel: CancelRequest | None = None
        self._main: asyncio.Task[Any] | None = None
        self._providers: list[str] = []
        self._token_stream_for_watchers = WorkflowStream(prior_state=carry.token_stream if carry else None)
        self._spec: PipelineSpec | None = None
        self._spec_error: str | None = None
        self._states: dict[str, StepState] = {}
        self._decisions: dict[str, ApprovalState] = {}
        self._events: dict[str, list[Any]] = {}
        self._routes: dict[str, str] = {}
        self._sa_status = "Running"
        self._budget_paused = False
        self._context: dict[str, Any] = {"inputs": {}, "steps": {}}
        if carry is not None:
            self._status = carry.status.model_copy(update={"run": carry.status.run + 1})
            self._providers = list(carry.providers)
            self._events = {k: list(v) for k, v in carry.events.items()}
            self._decisions = dict(carry.decisions)
            self._routes = dict(self._status.routes)
            self._context = {"inputs": carry.inputs, "steps": dict(carry.context_steps)}
        if request.pipeline is not None:
            try:
                self._adopt(parse_pipeline(request.pipeline))
            except PipelineError as exc:
                self._spec_error = str(exc)

    def _adopt(self, spec: PipelineSpec) -> None:
        """Take ``spec`` as the pipeline: list its steps and approvals (unless carried over)."""
        self._spec = spec
        self._status.pipeline = spec.name
        if not self._status.steps:
            self._status.steps = [
                StepState(id=step.id, type=step.type, parent=parent) for step, parent in _listed(spec.steps)
            ]
            self._status.budget = spec.budget
        self._states = {state.id: state for state in self._status.steps}
        for step, _ in spec.walk():
            if isinstance(step, ApprovalStep):
                self._decisions.setdefault(step.id, ApprovalState(step_id=step.id))

    # --- queries ----------------------------------------------------------------------------------

    @workflow.query(name="status")
    def status(self) -> PipelineStatus:
        self._status.approvals = list(self._decisions.values())
        self._status.pending_events = {k: len(v) for k, v in self._events.items() if v}
        self._status.routes = dict(self._routes)
        return self._status

    @workflow.query(name="outputs")
    def outputs(self) -> dict[str, Any]:
        return {s.id: s.output for s in self._status.steps if s.status == "completed"}

    # --- signals ----------------------------------------------------------------------------------

    @workflow.signal(name="cancel")
    def cancel(self, request: CancelRequest | None = None) -> None:
        """Stop after cancelling the work in flight; finished steps and their outputs are kept."""
        if self._cancel is None and self._status.status in ("running", "paused"):
            self._cancel = request or CancelRequest()
            if self._main is not None and not self._main.done():
                self._main.cancel()

    @workflow.signal(name="pause")
    def pause(self, request: PauseRequest | None = None) -> None:
        """Hold before the next step (work in flight finishes) until ``resume``."""
        if not self._status.paused and self._status.status == "running":
            self._status.paused, self._status.pause_reason = True, (request or PauseRequest()).reason
            self._refresh_search_status()
            self._details(f"paused: {self._status.pause_reason}")

    @workflow.signal(name="resume")
    def resume(self, request: ResumeRequest | None = None) -> None:
        request = request or ResumeRequest()
        if request.budget is not None or self._budget_paused:
            self._status.budget = request.budget
        self._budget_paused = False
        if self._status.paused:
            self._status.paused, self._status.pause_reason = False, None
            self._refresh_search_status()
            self._details(f"resumed: {request.reason}")

    @workflow.signal(name="event")
    def event(self, request: EventRequest) -> None:
        """A business event; a ``wait_event`` step for its name takes it (now or later)."""
        queue = self._events.setdefault(request.name, [])
        if sum(len(q) for q in self._events.values()) < _MAX_PENDING_EVENTS:
            queue.append(request.payload)
        else:
            workflow.logger.warning("event %r dropped: too many events waiting to be taken", request.name)

    # --- updates ----------------------------------------------------------------------------------

    @workflow.update(name="approve")
    async def approve(self, request: DecisionRequest) -> ApprovalState:
        return await self._decide(request, "approved")

    @approve.validator
    def _validate_approve(self, request: DecisionRequest) -> None:
        self._check_decision(request)

    @workflow.update(name="reject")
    async def reject(self, request: DecisionRequest) -> ApprovalState:
        return await self._decide(request, "rejected")

    @reject.validator
    def _validate_reject(self, request: DecisionRequest) -> None:
        self._check_decision(request)

    @workflow.update(name="reroute")
    def reroute(self, request: RerouteRequest) -> dict[str, str]:
        """Send later calls for a model to another; applies to following steps and to fallbacks not
        yet started. Returns the routes now in force."""
        for source, target in request.routes.items():
            if target == source:
                self._routes.pop(source, None)
            else:
                self._routes[source] = target
        self._status.reroutes.append(
            RerouteRecord(at=workflow.now(), routes=request.routes, reason=request.reason)
        )
        self._status.routes = dict(self._routes)
        return dict(self._routes)

    @reroute.validator
    def _validate_reroute(self, request: RerouteRequest) -> None:
        for model in (*request.routes, *request.routes.values()):
            if not re.match(_MODEL, model):
                raise ApplicationError(
                    f"reroute: {model!r} is not a model ('provider/model' or an alias)", type="InvalidReroute"
                )
        merged = {**self._routes, **{k: v for k, v in request.routes.items() if k != v}}
        try:
            check_routes(merged)
        except ValueError as exc:
            raise ApplicationError(f"reroute: {exc}", type="InvalidReroute") from None

    def _check_decision(self, request: DecisionRequest) -> None:
        if self._spec is not None:
            step = _find(self._spec, request.step_id)
            if not isinstance(step, ApprovalStep):
                known = sorted(self._decisions) or "none"
                raise ApplicationError(
                    f"pipeline {self._spec.name!r} has no approval step {request.step_id!r}; "
                    f"its approval steps: {known}",
                    type="UnknownApproval",
                )
            if step.approvers is not None and request.by not in step.approvers:
                raise ApplicationError(
                    f"{request.by!r} may not decide approval {request.step_id!r}; approvers: {step.approvers}",
                    type="NotAnApprover",
                )
        state = self._decisions.get(request.step_id)
        if state is not None and state.status in ("approved", "rejected", "skipped"):
            how = "skipped" if state.status == "skipped" else f"already {state.status}"
            who = f" by {state.by}" if state.by else ""
            raise ApplicationError(f"approval {request.step_id!r} is {how}{who}", type="AlreadyDecided")

    async def _decide(self, request: DecisionRequest, decision: str) -> ApprovalState:
        await workflow.wait_condition(lambda: self._spec is not None or self._status.status != "running")
        self._check_decision(request)
        state = self._decisions.setdefault(request.step_id, ApprovalState(step_id=request.step_id))
        state.status = "approved" if decision == "approved" else "rejected"
        state.by, state.comment, state.decided_at = request.by, request.comment, workflow.now()
        return state

    # --- the run ----------------------------------------------------------------------------------

    @workflow.run
    async def run(self, request: PipelineRequest) -> PipelineResult:
        if self._spec is None:
            await self._load(request)
        spec = self._require_spec()
        carry = request.carry_over
        if carry is None:
            try:
                self._context["inputs"] = spec.resolve_inputs(request.inputs)
            except PipelineError as exc:
                raise self._fail(f"invalid inputs: {exc}", error_type="PipelineError") from None
            attributes = [sa.PIPELINE.value_set(spec.name), sa.STATUS.value_set("Running")]
            if request.tenant:
                attributes.append(sa.TENANT.value_set(request.tenant))
            self._upsert(attributes)
        self._main = asyncio.ensure_future(self._execute(spec, carry.position if carry else 0))
        try:
            await self._main
        except asyncio.CancelledError:
            if self._cancel is None:
                self._finish("cancelled", "Cancelled", reason="workflow cancelled")
                raise
        except ApplicationError as exc:
            raise self._fail(exc.message, error_type=exc.type or "StepFailed") from None
        if self._cancel is not None:
            return self._finish("cancelled", "Cancelled", reason=self._cancel.reason)
        top = Scope(self._context)
        outputs = {
            name: self._render(source, top, f"outputs.{name}") for name, source in spec.outputs.items()
        }
        return self._finish("completed", "Completed", outputs=outputs)

    async def _load(self, request: PipelineRequest) -> None:
        if self._spec_error is not None:
            raise self._fail(self._spec_error, error_type="PipelineError")
        if request.pipeline_name is None:
            raise self._fail(
                "the request names no pipeline: give 'pipeline' or 'pipeline_name'",
                error_type="PipelineError",
            )
        try:
            data: dict[str, Any] = await workflow.execute_local_activity(
                LOAD_PIPELINE,
                LoadPipelineInput(name=request.pipeline_name, version=request.pipeline_version),
                result_type=dict,
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=RetryPolicy(maximum_attempts=3),
                summary=f"load pipeline {request.pipeline_name}",
            )
        except ActivityError as exc:
            cause = exc.cause
            message = cause.message if isinstance(cause, ApplicationError) else str(cause or exc)
            raise self._fail(message, error_type="UnknownPipeline") from None
        try:
            self._adopt(parse_pipeline(data))
        except PipelineError as exc:
            raise self._fail(str(exc), error_type="PipelineError") from None

    async def _execute(self, spec: PipelineSpec, start: int) -> None:
        top = Scope(self._context)
        for index in range(start, len(spec.steps)):
            if index > start and self._should_continue_as_new():
                self._token_stream_for_watchers.detach_pollers()
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(self._carry_over(index))
            await self._run_step(spec.steps[index], top)

    def _should_continue_as_new(self) -> bool:
        info = workflow.info()
        limit = self._request.continue_as_new_after or CONTINUE_AS_NEW_AFTER
        if not (info.is_continue_as_new_suggested() or info.get_current_history_length() >= limit):
            return False
        return workflow.patched("continue-as-new")

    def _carry_over(self, position: int) -> PipelineRequest:
        status = self.status()
        carry = CarryOver(
            position=position,
            inputs=self._context["inputs"],
            context_steps=dict(self._context["steps"]),
            status=status,
            providers=self._providers,
            events=self._events,
            decisions=self._decisions,
            token_stream=self._token_stream_for_watchers.get_state(),
        )
        spec = self._require_spec()
        return self._request.model_copy(
            update={
                "pipeline": spec.model_dump(mode="json", by_alias=True, exclude_none=True),
                "pipeline_name": None,
                "carry_over": carry,
            }
        )

    # --- bookkeeping ------------------------------------------------------------------------------

    def _upsert(self, updates: list[Any]) -> None:
        if self._request.search_attributes:
            workflow.upsert_search_attributes(updates)

    def _details(self, summary: str) -> None:
        done = [s.id for s in self._status.steps if s.status == "completed"]
        position = ""
        if self._spec is not None and self._status.current_step in self._states:
            top = [s.id for s in self._spec.steps]
            current = self._status.current_step
            if current in top:
                position = f" — step {top.index(current) + 1}/{len(top)}"
        workflow.set_current_details(
            f"**{self._status.pipeline}**{position}: `{summary}`\n\n"
            f"completed: {', '.join(done) or 'none'} · tokens {self._status.usage.total_tokens}"
            f" · cost ${self._status.cost_usd:.6f}" + (" · PAUSED" if self._status.paused else "")
        )

    def _fail(self, message: str, *, error_type: str) -> ApplicationError:
        self._status.status = "failed"
        self._status.error = message
        self._status.current_step = None
        self._upsert([sa.STATUS.value_set("Failed")])
        workflow.set_current_details(f"**failed**: {message}")
        return error(message, error_type)

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
        self._upsert([sa.STATUS.value_set(label)])
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


def _listed(steps: list[Step], parent: str | None = None) -> list[tuple[Step, str | None]]:
    """Steps shown in the status, in order: all but those inside a map (which run once per item)."""
    listed: list[tuple[Step, str | None]] = []
    for step in steps:
        listed.append((step, parent))
        if step.type != "map":
            for _, children in step.children():
                listed.extend(_listed(children, step.id))
    return listed


def _find(spec: PipelineSpec, step_id: str) -> Step | None:
    return next((step for step, _ in spec.walk() if step.id == step_id), None)

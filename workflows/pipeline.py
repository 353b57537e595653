"""``PipelineWorkflow``: a pipeline spec run by the kernel's interpreter on Temporal.

The event history is the record: each completed model call, tool call, timer and decision is in it, so
a crashed worker resumes after the last completed step and nothing completed is paid for twice. No
I/O, clocks or randomness here; everything with side effects goes through ``TemporalEffects``.

What the pipeline knows is one ``RunState``; the interpreter (``kernel.engine``) runs the steps over
it, and this class adds the public surface (``workflows.contract``): the start request, queries,
signals and their update twins, approvals and reroutes, continue-as-new.
"""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.contrib.workflow_streams import WorkflowStream
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from kernel.engine import ContinueAsNewRequested, Engine, RunInfo
    from kernel.errors import FailureType, PipelineError
    from kernel.pipeline import PipelineSpec, format_validation_error, parse_pipeline
    from kernel.routing import check_routes
    from kernel.run import MAX_PENDING_EVENTS, MAX_SEEN_EVENT_IDS, RunState
    from kernel.shadow_rules import ShadowSpec
    from kernel.steps.base import MODEL_PATTERN, StepFailure, StepSpec
    from workflows import search_attributes as sa
    from workflows.calls import ModelFailure, waiting_for_capacity
    from workflows.contract import (
        LOAD_PIPELINE,
        PIPELINE_WORKFLOW,
        ApprovalState,
        CancelRequest,
        CarryOver,
        ControlAnswer,
        DecisionRequest,
        EventRequest,
        LoadPipelineInput,
        PauseRequest,
        PipelineRequest,
        PipelineResult,
        PipelineStatus,
        Query,
        RerouteRecord,
        RerouteRequest,
        ResumeRequest,
        RunStatus,
        Signal,
        StepState,
        Update,
    )
    from workflows.engine.checks import check_model, check_spec
    from workflows.engine.effects import TemporalEffects
    from workflows.engine.outbox import LIFECYCLE_EVENTS_PATCH, Outbox
    from workflows.engine.shadow import Shadows

__all__ = [
    "CONTINUE_AS_NEW_AFTER",
    "ENGINE_V2",
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

CONTINUE_AS_NEW_AFTER = 10_000
"""History length after which a pipeline continues as new between top-level steps."""

BATCH_REFUSED = "kernelflow-batch-mode-refused"
"""Marker recorded when the worker refused a pipeline whose batch-mode step's provider takes no batches:
the verdict came from the worker's live registry, so a replay reads it from the history instead."""

ENGINE_V2 = "kernelflow-engine-2"
"""Patch marker of runs started with the engine's second shape: the defaults of version 2 and the
``KernelflowAwaiting`` and ``KernelflowModels`` search attributes. Runs without it replay as before."""

_M = TypeVar("_M", bound=BaseModel)
_MODEL = MODEL_PATTERN


def refuse(message: str, failure: FailureType) -> ApplicationError:
    """A refusal the sender sees as it is: never retried."""
    return ApplicationError(message, type=failure, non_retryable=True)


def _parse(model: type[_M], raw: Any, handler: str, *, required: bool = False) -> _M:
    """Validate a handler's raw input; the error names the handler, each field, and what is allowed."""
    if raw is None and not required:
        raw = {}
    if isinstance(raw, model):
        return raw
    if not isinstance(raw, dict):
        fields = ", ".join(model.model_fields)
        raise ValueError(
            f"{handler} takes an object with fields {fields}; got {type(raw).__name__} {raw!r:.80}"
        )
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, prefix=handler)) from None


@workflow.defn(name=PIPELINE_WORKFLOW)
class PipelineWorkflow:
    @workflow.init
    def __init__(self, request: Any) -> None:
        self._v2 = workflow.patched(ENGINE_V2)
        self._request_error: str | None = None
        try:
            self._request = _parse(PipelineRequest, request, "request", required=True)
        except ValueError as exc:
            self._request_error = (
                f"{exc}; a pipeline request is a JSON object with 'pipeline' (a spec) or 'pipeline_name' "
                "(registered on the worker), and optionally 'pipeline_version', 'inputs', 'tenant'"
            )
            self._request = PipelineRequest()
        carry = self._request.carry_over
        name = self._request.pipeline_name or (self._request.pipeline or {}).get("name")
        if carry is not None:
            self._state: RunState = RunState.model_validate(carry.model_dump(exclude={"token_stream"}))
            self._state.status.run += 1
        else:
            self._state = RunState(status=PipelineStatus(pipeline=str(name or "unnamed")))
        if self._state.defaults_version is None:  # a carried-over run without one started before versions
            self._state.defaults_version = 2 if self._v2 and carry is None else 1
        self._effects = TemporalEffects(
            search_attributes=self._request.search_attributes,
            v2=self._v2,
            continue_as_new_after=self._request.continue_as_new_after,
        )
        self._shadows = Shadows(tenant=self._request.tenant or _tenant_of(workflow.info().workflow_id))
        self._effects.shadows = self._shadows
        self._token_stream_for_watchers = WorkflowStream(prior_state=carry.token_stream if carry else None)
        self._engine: Engine | None = None
        self._final_outputs: dict[str, Any] | None = None
        self._spec_error: str | None = None
        self._cancel: CancelRequest | None = None
        self._main: asyncio.Task[Any] | None = None
        if self._request_error is None and self._request.pipeline is not None:
            try:
                self._adopt(
                    parse_pipeline(self._request.pipeline, defaults_version=self._state.defaults_version)
                )
            except PipelineError as exc:
                self._spec_error = str(exc)

    def _adopt(self, spec: PipelineSpec) -> None:
        """Take ``spec`` as the pipeline: list its steps and approvals (unless carried over)."""
        status = self._state.status
        status.pipeline = spec.name
        if not status.steps:
            status.steps = [
                StepState(id=step.id, type=step.type, parent=parent) for step, parent in _listed(spec.steps)
            ]
            status.budget = spec.budget
        for step, _ in spec.walk():
            if step.single_instance:
                self._state.decisions.setdefault(step.id, ApprovalState(step_id=step.id))
        info = workflow.info()
        self._engine = Engine(
            spec,
            self._state,
            self._effects,
            RunInfo(workflow_id=info.workflow_id, pipeline=spec.name, tenant=self._request.tenant),
        )
        self._effects.on_over_budget = self._engine.tenant_budget_exceeded
        self._effects.tenant = self._request.tenant

    @property
    def _running(self) -> bool:
        return self._state.status.status in ("running", "paused")

    # --- queries ----------------------------------------------------------------------------------

    @workflow.query(name=Query.STATUS)
    def status(self) -> PipelineStatus:
        view = self._state.view()
        view.waiting_for_capacity = waiting_for_capacity()
        return view

    @workflow.query(name=Query.OUTPUTS)
    def outputs(self) -> dict[str, Any]:
        return {s.id: s.output for s in self._state.status.steps if s.status == "completed"}

    # --- signals (fire and forget; what cannot be applied is recorded in status().refused) --------

    def _signal_input(self, model: type[_M], raw: Any, handler: str, *, required: bool = False) -> _M | None:
        try:
            return _parse(model, raw, handler, required=required)
        except ValueError as exc:
            self._state.refuse(handler, str(exc), workflow.now())
            workflow.logger.warning("signal refused: %s", exc)
            return None

    @workflow.signal(name=Signal.CANCEL)
    def cancel(self, request: Any = None) -> None:
        """Stop after cancelling the work in flight; finished steps and their outputs are kept."""
        parsed = self._signal_input(CancelRequest, request, "cancel")
        if parsed is not None:
            self._apply_cancel(parsed)

    @workflow.signal(name=Signal.PAUSE)
    def pause(self, request: Any = None) -> None:
        """Hold before the next step (work in flight finishes) until ``resume``."""
        parsed = self._signal_input(PauseRequest, request, "pause")
        if parsed is not None:
            self._apply_pause(parsed)

    @workflow.signal(name=Signal.RESUME)
    def resume(self, request: Any = None) -> None:
        parsed = self._signal_input(ResumeRequest, request, "resume")
        if parsed is not None:
            self._apply_resume(parsed)

    @workflow.signal(name=Signal.EVENT)
    def event(self, request: Any = None) -> None:
        """A business event; a ``wait_event`` step for its name takes it (now or later)."""
        parsed = self._signal_input(EventRequest, request, "event", required=True)
        if parsed is None:
            return
        problem = self._event_problem(parsed)
        if problem is not None:
            self._state.refuse("event", problem, workflow.now())
            workflow.logger.warning("event refused: %s", problem)
            return
        self._apply_event(parsed)

    def _apply_cancel(self, request: CancelRequest) -> bool:
        if self._cancel is not None or not self._running:
            return False
        self._cancel = request
        if self._main is not None and not self._main.done():
            self._main.cancel()
        return True

    def _apply_pause(self, request: PauseRequest) -> bool:
        status = self._state.status
        if status.paused or status.status != "running":
            return False
        status.paused, status.pause_reason = True, request.reason
        if self._engine is not None:
            self._engine.refresh_search_status()
            self._engine.details(f"paused: {request.reason}")
        return True

    def _apply_resume(self, request: ResumeRequest) -> bool:
        status = self._state.status
        if request.budget is not None or self._state.budget_paused:
            status.budget = request.budget
        self._state.budget_paused = False
        if not status.paused:
            return False
        self._state.tenant_budget_raise = request.tenant_budget
        status.paused, status.pause_reason = False, None
        if self._engine is not None:
            self._engine.refresh_search_status()
            self._engine.details(f"resumed: {request.reason}")
        return True

    def _event_problem(self, request: EventRequest) -> str | None:
        fresh = request.id is None or request.id not in self._state.seen_event_ids
        if fresh and self._state.pending_event_count() >= MAX_PENDING_EVENTS:
            return f"event {request.name!r} not kept: {MAX_PENDING_EVENTS} events already wait to be taken"
        return None

    def _apply_event(self, request: EventRequest) -> bool:
        """Keep the event for a ``wait_event`` step; an event id seen before is not applied again."""
        state = self._state
        if request.id is not None:
            if request.id in state.seen_event_ids:
                return False
            state.seen_event_ids.append(request.id)
            del state.seen_event_ids[:-MAX_SEEN_EVENT_IDS]
        state.events.setdefault(request.name, []).append(request.payload)
        return True

    # --- update twins of the signals (validated; the sender gets an answer) -----------------------

    def _answer(self, applied: bool, detail: str | None = None) -> ControlAnswer:
        status = self._state.status
        return ControlAnswer(applied=applied, status=status.status, paused=status.paused, detail=detail)

    def _update_input(self, model: type[_M], raw: Any, handler: str, *, required: bool = False) -> _M:
        try:
            return _parse(model, raw, handler, required=required)
        except ValueError as exc:
            raise refuse(str(exc), FailureType.INVALID_INPUT) from None

    def _require_running(self, handler: str) -> None:
        if not self._running:
            raise refuse(
                f"{handler}: the pipeline is {self._state.status.status}; only a running pipeline takes it",
                FailureType.NOT_RUNNING,
            )

    @workflow.update(name=Update.CANCEL)
    def cancel_update(self, request: Any = None) -> ControlAnswer:
        return self._answer(self._apply_cancel(_parse(CancelRequest, request, "cancel_update")))

    @cancel_update.validator
    def _validate_cancel(self, request: Any = None) -> None:
        self._update_input(CancelRequest, request, "cancel_update")
        self._require_running("cancel_update")

    @workflow.update(name=Update.PAUSE)
    def pause_update(self, request: Any = None) -> ControlAnswer:
        applied = self._apply_pause(_parse(PauseRequest, request, "pause_update"))
        return self._answer(applied, None if applied else "already paused")

    @pause_update.validator
    def _validate_pause(self, request: Any = None) -> None:
        self._update_input(PauseRequest, request, "pause_update")
        self._require_running("pause_update")

    @workflow.update(name=Update.RESUME)
    def resume_update(self, request: Any = None) -> ControlAnswer:
        applied = self._apply_resume(_parse(ResumeRequest, request, "resume_update"))
        return self._answer(applied, None if applied else "not paused")

    @resume_update.validator
    def _validate_resume(self, request: Any = None) -> None:
        self._update_input(ResumeRequest, request, "resume_update")
        self._require_running("resume_update")

    @workflow.update(name=Update.EVENT)
    def event_update(self, request: Any = None) -> ControlAnswer:
        applied = self._apply_event(_parse(EventRequest, request, "event_update", required=True))
        return self._answer(applied, None if applied else "event id already applied")

    @event_update.validator
    def _validate_event(self, request: Any = None) -> None:
        parsed = self._update_input(EventRequest, request, "event_update", required=True)
        self._require_running("event_update")
        problem = self._event_problem(parsed)
        if problem is not None:
            raise refuse(problem, FailureType.INVALID_INPUT)

    # --- approvals ---------------------------------------------------------------------------------

    @workflow.update(name=Update.APPROVE)
    async def approve(self, request: Any = None) -> ApprovalState:
        return await self._decide(_parse(DecisionRequest, request, "approve", required=True), "approved")

    @approve.validator
    def _validate_approve(self, request: Any = None) -> None:
        self._check_decision(self._update_input(DecisionRequest, request, "approve", required=True))

    @workflow.update(name=Update.REJECT)
    async def reject(self, request: Any = None) -> ApprovalState:
        return await self._decide(_parse(DecisionRequest, request, "reject", required=True), "rejected")

    @reject.validator
    def _validate_reject(self, request: Any = None) -> None:
        self._check_decision(self._update_input(DecisionRequest, request, "reject", required=True))

    def _check_decision(self, request: DecisionRequest) -> None:
        dynamic = self._state.decisions.get(request.step_id)
        if request.tenant_budget is not None and (dynamic is None or dynamic.budget is None):
            raise refuse(
                f"tenant_budget applies only to a tenant budget approval (tenant-budget-<n>), "
                f"not to {request.step_id!r}",
                FailureType.INVALID_INPUT,
            )
        if dynamic is not None and (dynamic.tool is not None or dynamic.budget is not None):
            # a tool call of an agent step, or a call over its tenant's budget
            if dynamic.approvers is not None and request.by not in dynamic.approvers:
                raise refuse(
                    f"{request.by!r} may not decide approval {request.step_id!r}; approvers: {dynamic.approvers}",
                    FailureType.NOT_AN_APPROVER,
                )
        elif self._engine is not None:
            spec = self._engine.spec
            step = _find(spec, request.step_id)
            if step is None or not step.single_instance:
                known = sorted(self._state.decisions) or "none"
                raise refuse(
                    f"pipeline {spec.name!r} has no approval step or tool call waiting {request.step_id!r}; "
                    f"its approvals: {known}",
                    FailureType.UNKNOWN_APPROVAL,
                )
            approvers = getattr(step, "approvers", None)
            if approvers is not None and request.by not in approvers:
                raise refuse(
                    f"{request.by!r} may not decide approval {request.step_id!r}; approvers: {approvers}",
                    FailureType.NOT_AN_APPROVER,
                )
        state = self._state.decisions.get(request.step_id)
        if state is not None and state.status in ("approved", "rejected", "skipped"):
            how = "skipped" if state.status == "skipped" else f"already {state.status}"
            who = f" by {state.by}" if state.by else ""
            raise refuse(f"approval {request.step_id!r} is {how}{who}", FailureType.ALREADY_DECIDED)

    async def _decide(self, request: DecisionRequest, decision: str) -> ApprovalState:
        await workflow.wait_condition(
            lambda: self._engine is not None or self._state.status.status != "running"
        )
        self._check_decision(request)
        state = self._state.decisions.setdefault(request.step_id, ApprovalState(step_id=request.step_id))
        state.status = "approved" if decision == "approved" else "rejected"
        state.by, state.comment, state.decided_at = request.by, request.comment, workflow.now()
        if state.budget is not None and decision == "approved":
            state.raised = request.tenant_budget
        return state

    # --- reroute -----------------------------------------------------------------------------------

    @workflow.update(name=Update.REROUTE)
    def reroute(self, request: Any = None) -> dict[str, str]:
        """Send later calls for a model to another; applies to following steps and to fallbacks not
        yet started. Returns the routes now in force."""
        parsed = _parse(RerouteRequest, request, "reroute", required=True)
        routes = self._state.status.routes
        for source, target in parsed.routes.items():
            if target == source:
                routes.pop(source, None)
            else:
                routes[source] = target
        self._state.status.reroutes.append(
            RerouteRecord(at=workflow.now(), routes=parsed.routes, reason=parsed.reason, by=parsed.by)
        )
        if self._engine is not None and self._v2:
            self._engine.refresh_models()
        return dict(routes)

    @reroute.validator
    def _validate_reroute(self, request: Any = None) -> None:
        parsed = self._update_input(RerouteRequest, request, "reroute", required=True)
        for model in (*parsed.routes, *parsed.routes.values()):
            if not re.match(_MODEL, model):
                raise refuse(
                    f"reroute: {model!r} is not a model ('provider/model' or an alias)",
                    FailureType.INVALID_REROUTE,
                )
        for source, target in parsed.routes.items():
            problem = check_model(target) if target != source else None
            if problem is not None:
                raise refuse(f"reroute: target {target!r}: {problem}", FailureType.INVALID_REROUTE)
        merged = {**self._state.status.routes, **{k: v for k, v in parsed.routes.items() if k != v}}
        try:
            check_routes(merged)
        except ValueError as exc:
            raise refuse(f"reroute: {exc}", FailureType.INVALID_REROUTE) from None

    # --- the run ----------------------------------------------------------------------------------

    @workflow.run
    async def run(self, request: Any) -> PipelineResult:
        try:
            return await self._run()
        finally:
            # Shadow calls still running get a short bound (close_wait_s) to finish, so a shadowed last
            # step records its pair within the run when it can; one still running after that records
            # its pair on its worker. Then the final events go out.
            await self._shadows.drain()
            if self._effects.outbox is not None:
                await self._effects.outbox.drain()

    async def _run(self) -> PipelineResult:
        if self._request_error is not None:
            raise self._fail(self._request_error, FailureType.PIPELINE_ERROR)
        if self._engine is None:
            await self._load()
        engine = self._require_engine()
        spec = engine.spec
        if spec.events is not None and spec.events.enabled and workflow.patched(LIFECYCLE_EVENTS_PATCH):
            self._effects.outbox = Outbox(
                spec.events, pipeline=spec.name, tenant=self._request.tenant, content=self._event_content
            )
        carry = self._request.carry_over
        if carry is None and any(getattr(step, "mode", None) == "batch" for step, _ in spec.walk()):
            self._refuse_unsupported_batch_mode(spec)
        if carry is None:
            try:
                self._state.inputs.update(spec.resolve_inputs(self._request.inputs))
            except PipelineError as exc:
                raise self._fail(f"invalid inputs: {exc}", FailureType.PIPELINE_ERROR) from None
            attributes: list[Any] = [sa.PIPELINE.value_set(spec.name), sa.STATUS.value_set("Running")]
            if self._request.tenant:
                attributes.append(sa.TENANT.value_set(self._request.tenant))
            if self._v2:
                models = engine.remaining_models()
                self._state.search_models = models
                attributes.append(sa.MODELS.value_set(models))
            self._upsert(attributes)
            engine.lifecycle("pipeline.started", data={"pipeline": spec.name, "tenant": self._request.tenant})
        shadowed = [
            (step.id, rule)
            for step, _ in spec.walk()
            if isinstance(rule := getattr(step, "shadow", None), ShadowSpec)
        ]
        try:
            await self._shadows.begin(shadowed)
        except StepFailure as exc:
            raise self._fail(exc.message, exc.type) from None
        self._main = asyncio.ensure_future(self._execute(engine, carry.position if carry else 0))
        try:
            await self._main
        except asyncio.CancelledError:
            if self._cancel is None:
                self._finish("cancelled", "Cancelled", reason="workflow cancelled")
                raise
        except (StepFailure, ApplicationError) as exc:
            raise self._fail(exc.message, exc.type or FailureType.STEP_FAILED) from None
        if self._cancel is not None:
            return self._finish("cancelled", "Cancelled", reason=self._cancel.reason)
        top = engine.top_scope()
        try:
            outputs = {
                name: engine.render(source, top, f"outputs.{name}") for name, source in spec.outputs.items()
            }
        except StepFailure as exc:
            raise self._fail(exc.message, exc.type) from None
        return self._finish("completed", "Completed", outputs=outputs)

    def _refuse_unsupported_batch_mode(self, spec: PipelineSpec) -> None:
        """Fail before any step when a batch-mode step's provider takes no batches on this worker."""
        replaying = workflow.unsafe.is_replaying()
        problem = None if replaying else check_spec(spec)
        # The marker is the verdict: recorded with a refusal, found again on its replay.
        if (problem is not None or replaying) and workflow.patched(BATCH_REFUSED):
            raise self._fail(
                problem or "a batch-mode step's provider takes no batches (refused when it started)",
                FailureType.PIPELINE_ERROR,
            )

    async def _load(self) -> None:
        request = self._request
        if self._spec_error is not None:
            raise self._fail(self._spec_error, FailureType.PIPELINE_ERROR)
        if request.pipeline_name is None:
            raise self._fail(
                "the request names no pipeline: give 'pipeline' (a spec) or 'pipeline_name' (registered)",
                FailureType.PIPELINE_ERROR,
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
            raise self._fail(message, FailureType.UNKNOWN_PIPELINE) from None
        try:
            self._adopt(parse_pipeline(data, defaults_version=self._state.defaults_version))
        except PipelineError as exc:
            raise self._fail(str(exc), FailureType.PIPELINE_ERROR) from None

    async def _execute(self, engine: Engine, start: int) -> None:
        top = engine.top_scope()
        steps = engine.spec.steps
        for index in range(start, len(steps)):
            if index > start and self._should_continue_as_new():
                self._token_stream_for_watchers.detach_pollers()
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(self._carry_over(index))
            self._state.position = index
            try:
                await engine.run_step(steps[index], top)
            except ContinueAsNewRequested:  # a step (an agent's loop) asks to go on in a new run
                self._token_stream_for_watchers.detach_pollers()
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(self._carry_over(index))
            if self._v2:
                engine.refresh_models()

    def _should_continue_as_new(self) -> bool:
        info = workflow.info()
        limit = self._request.continue_as_new_after or CONTINUE_AS_NEW_AFTER
        if not (info.is_continue_as_new_suggested() or info.get_current_history_length() >= limit):
            return False
        return workflow.patched("continue-as-new")

    def _carry_over(self, position: int) -> PipelineRequest:
        self._state.position = position
        self._state.view()
        state = self._state.model_dump()
        state["status"]["agents"] = {}  # shown by the status query; carried once, in ``agents``
        carry = CarryOver.model_validate(
            {**state, "token_stream": self._token_stream_for_watchers.get_state()}
        )
        spec = self._require_engine().spec
        return self._request.model_copy(
            update={
                "pipeline": spec.model_dump(mode="json", by_alias=True, exclude_none=True),
                "pipeline_name": None,
                "carry_over": carry,
            }
        )

    # --- bookkeeping ------------------------------------------------------------------------------

    def _require_engine(self) -> Engine:
        if self._engine is None:
            raise StepFailure("the pipeline spec is not loaded", FailureType.PIPELINE_ERROR)
        return self._engine

    def _upsert(self, updates: list[Any]) -> None:
        if self._request.search_attributes:
            workflow.upsert_search_attributes(updates)

    def _close(self, status: RunStatus, label: str) -> None:
        self._state.status.status = status
        self._state.status.current_step = None
        updates: list[Any] = [sa.STATUS.value_set(label)]
        if self._v2 and self._engine is not None:
            if any(d.status == "waiting" for d in self._state.decisions.values()):
                updates.append(sa.AWAITING.value_set([]))
            if self._state.search_models:
                updates.append(sa.MODELS.value_set([]))
        self._upsert(updates)

    def _event_content(self, event: Any) -> Any:
        """What an event carries for a pipeline whose ``events.content`` is on: a step's output, the
        pipeline's outputs."""
        if event.type == "step.completed":
            return next((s.output for s in self._state.status.steps if s.id == event.step_id), None)
        if event.type == "pipeline.completed":
            return self._final_outputs
        return None

    def _fail(self, message: str, failure: str) -> ApplicationError:
        self._state.status.error = message
        self._close("failed", "Failed")
        workflow.set_current_details(f"**failed**: {message}")
        if self._engine is not None:
            self._engine.lifecycle("pipeline.failed", data={"error_type": failure})
        return ApplicationError(message, type=failure, non_retryable=True)

    def _finish(
        self,
        status: RunStatus,
        label: str,
        *,
        outputs: dict[str, Any] | None = None,
        reason: str | None = None,
    ) -> PipelineResult:
        self._final_outputs = outputs
        self._close(status, label)
        workflow.set_current_details(f"**{label.lower()}**" + (f": {reason}" if reason else ""))
        run = self._state.status
        if self._engine is not None:
            self._engine.lifecycle(
                f"pipeline.{status}",
                data={"usage": run.usage.model_dump(), "cost_usd": run.cost_usd},
            )
        return PipelineResult(
            pipeline=run.pipeline,
            status=status,
            outputs=outputs or {},
            steps=run.steps,
            usage=run.usage,
            cost_usd=run.cost_usd,
            cost_unknown_models=run.cost_unknown_models,
            reason=reason,
        )


def _listed(steps: list[StepSpec], parent: str | None = None) -> list[tuple[StepSpec, str | None]]:
    """Steps shown in the status, in order: all but those inside a scope boundary (which run once
    per item)."""
    listed: list[tuple[StepSpec, str | None]] = []
    for step in steps:
        listed.append((step, parent))
        if not step.scope_boundary:
            for _, children in step.children():
                listed.extend(_listed(children, step.id))
    return listed


def _tenant_of(workflow_id: str) -> str | None:
    """``<tenant>`` of a workflow id ``tenant/<tenant>/...`` (per-tenant keys' naming), else None."""
    if not workflow_id.startswith("tenant/"):
        return None
    tenant, sep, _ = workflow_id.removeprefix("tenant/").partition("/")
    return tenant if sep and tenant else None


def _find(spec: PipelineSpec, step_id: str) -> StepSpec | None:
    return next((step for step, _ in spec.walk() if step.id == step_id), None)

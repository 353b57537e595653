"""The ``shadow_chat`` activity: send the request a primary model answered to a candidate model too,
and record both answers as a ``ShadowPair`` in the shadow store. Off the pipeline's path: the workflow
starts it after the primary answered and never waits on it for a step.

It never heartbeats: Temporal tells an activity it is cancelled only in a heartbeat's answer, so a
run that closed while its shadow call ran (it waits ``close_wait_s`` at most) never cancels it. The call
goes on, writes its pair, and its result is then refused by Temporal (``NotFound``, which the SDK logs
as "Activity not found on completion"); no retry follows, so a retryable failure of a call whose run
has closed is recorded at once instead.

What it never does: execute tools (the candidate gets the same request, tools included, and the tool
calls it asks for are recorded as output), raise the candidate's failure to the workflow (a failure on
the last attempt, or a timeout, is recorded in the pair), or call an opted-out tenant's candidate.

Before calling, in order: the tenant's opt-out, the candidate's hourly caps (the fleet-wide shadow
budget workflow), the candidate's provider limits when the worker has a ``limits`` key for it (the
admission-control limiter: admitted now, or skipped; a shadow call never waits for capacity) and the
candidate's circuit breaker on this worker (open after ``shadow.breaker.failure_threshold``
consecutive failures). A call refused there is *skipped*: counted (the result's
``outcome``, the worker's ``kernelflow_shadow_calls`` metric), not recorded as a pair, so the pairs
say only how the candidate answered.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal

import structlog
from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.client import WithStartWorkflowOperation, WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError

from activities.limits import AcquireInput, LimitsActivities
from activities.live import LiveProviders
from kernel.contracts import ChatRequest, ChatResponse
from kernel.errors import CircuitOpen, KernelflowError, UpstreamTimeout, error_type
from kernel.routing import BreakerBoard, Permit
from kernel.schema import schema_errors
from kernel.shadow import ShadowPair, ShadowSide, request_digest
from kernel.shadow_rules import ShadowConfig, ShadowSpec
from workflows.limiter import ReleaseRequest
from workflows.shadow_budget import (
    BudgetInput,
    ShadowBudgetWorkflow,
    SpentRequest,
    TakeAnswer,
    TakeRequest,
    budget_id,
)

__all__ = [
    "SHADOW_CHAT",
    "SHADOW_RULES",
    "ShadowActivities",
    "ShadowCallInput",
    "ShadowOutcome",
    "ShadowRules",
    "ShadowRulesInput",
    "side_of",
]

SHADOW_CHAT = "shadow_chat"
"""The activity's name: public API, never renamed."""
SHADOW_RULES = "shadow_rules"
"""The local activity a run reads the worker's rules with, once, at its start."""

Outcome = Literal[
    "recorded",
    "disabled",
    "opted_out",
    "breaker_open",
    "over_budget",
    "over_limit",
    "unknown_candidate",
    "same_model",
]

_log = structlog.get_logger("kernelflow.shadow")


class ShadowCallInput(BaseModel):
    """One shadow call: the candidate, the request as the primary got it, and the primary's side."""

    pair_id: str
    candidate: str
    request: ChatRequest
    primary: ShadowSide
    output_schema: dict[str, Any] | None = None
    pipeline: str
    step_id: str
    workflow_id: str
    run_id: str = ""
    tenant: str | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=2, ge=1)
    per_hour: int | None = None
    max_cost_usd_per_hour: float | None = None


class ShadowRulesInput(BaseModel):
    tenant: str | None = None
    candidates: list[str] = Field(default_factory=list, description="The spec's candidates, to check.")


class ShadowRules(BaseModel):
    """What a run knows of the worker's shadow section: its rules, whether the run's tenant opted
    out, and why the worker cannot call any of the spec's candidates."""

    enabled: bool = True
    models: dict[str, ShadowSpec] = Field(default_factory=dict)
    opted_out: bool = False
    problems: dict[str, str] = Field(default_factory=dict)
    close_wait_s: float = 2.0
    """How long the run waits for its shadow calls still running when it closes or continues as new."""


class ShadowOutcome(BaseModel):
    outcome: Outcome
    candidate_error_type: str | None = None
    detail: str | None = None


def side_of(
    model: str,
    response: ChatResponse,
    *,
    cost_usd: float | None,
    latency_ms: float,
    output_schema: dict[str, Any] | None,
) -> ShadowSide:
    """One side of a pair from a model's answer (structured and valid only with a schema)."""
    structured: Any = None
    valid: bool | None = None
    if output_schema is not None:
        try:
            structured = json.loads(response.text or "")
        except ValueError:
            valid = False
        else:
            valid = not schema_errors(structured, output_schema)
    return ShadowSide(
        model=model,
        output=response.text,
        structured=structured,
        valid=valid,
        tool_calls=[call.model_dump(mode="json") for call in response.tool_calls] or None,
        prompt_tokens=response.usage.prompt_tokens,
        completion_tokens=response.usage.completion_tokens,
        cost_usd=cost_usd,
        latency_ms=latency_ms,
    )


class ShadowActivities:
    """The worker's shadow calls: its config section (replaceable), a breaker board of its own (shadow
    failures never open a primary's breaker), the store writer and counts of every outcome."""

    def __init__(
        self,
        live: LiveProviders,
        config: ShadowConfig,
        record: Callable[[ShadowPair], Awaitable[None]],
        *,
        scope: str | None = None,
        limits: LimitsActivities | None = None,
    ) -> None:
        self.live = live
        self.limits = limits
        """The worker's admission control: a candidate with a ``limits`` key is admitted there too."""
        self.config = config
        self.record = record
        self.scope = scope
        self.breakers = BreakerBoard(config.breaker)
        self.outcomes: Counter[tuple[str, str]] = Counter()
        """(candidate, outcome) -> how many, since the worker started."""

    @activity.defn(name=SHADOW_RULES)
    async def rules(self, request: ShadowRulesInput) -> ShadowRules:
        problems: dict[str, str] = {}
        for candidate in request.candidates:
            try:
                self.live.registry.resolve_ref(candidate)
            except KernelflowError as exc:
                problems[candidate] = str(exc)
        return ShadowRules(
            enabled=self.config.enabled,
            models=self.config.models,
            opted_out=self.config.opted_out(request.tenant),
            problems=problems,
            close_wait_s=self.config.close_wait_s,
        )

    @activity.defn(name=SHADOW_CHAT)
    async def chat(self, call: ShadowCallInput) -> ShadowOutcome:
        info = activity.info()
        log = _log.bind(workflow_id=call.workflow_id, step=call.step_id, candidate=call.candidate)
        if not self.config.enabled:
            return self._count(call, "disabled", "shadow traffic is disabled on this worker")
        if self.config.opted_out(call.tenant):
            return self._count(call, "opted_out", "the tenant opted out of shadow traffic")
        try:
            provider, model_name = self.live.registry.resolve(call.candidate)
        except KernelflowError as exc:
            log.warning("shadow candidate unknown", error=str(exc))
            return self._count(call, "unknown_candidate", str(exc))
        candidate = f"{provider.name}/{model_name}"
        if candidate == call.primary.model:
            return self._count(call, "same_model", "the candidate is the model that answered")
        if info.attempt == 1 and (call.per_hour is not None or call.max_cost_usd_per_hour is not None):
            answer = await self._take(candidate, call)
            if not answer.admitted:
                return self._count(call, "over_budget", f"{answer.refused_by} cap reached")
        admission = await self._admit(candidate, call, info.attempt)
        if admission is False:
            return self._count(call, "over_limit", f"no capacity now under the limits of {candidate}")
        response: ChatResponse | None = None
        outcome: ShadowOutcome | None = None
        try:
            response, outcome = await self._ask(call, candidate, provider, model_name, log)
        finally:
            if isinstance(admission, tuple):
                used: int | None = None  # sent but no usage known: the estimate stands
                if response is not None:
                    used = response.usage.total_tokens
                elif outcome is not None and outcome.outcome == "breaker_open":
                    used = 0  # never sent
                await self._release(admission, used)
        return outcome

    async def _ask(
        self, call: ShadowCallInput, candidate: str, provider: Any, model_name: str, log: Any
    ) -> tuple[ChatResponse | None, ShadowOutcome]:
        """Call the candidate once; record its answer, or its failure unless Temporal retries it."""
        attempt = activity.info().attempt
        permit: Permit | None = None
        started = time.perf_counter()
        try:
            permit = self.breakers.admit(provider.name, model_name)
            prepared = provider.prepare_chat(call.request.model_copy(update={"model": model_name}))
            provider.check_chat(prepared.request)
            try:
                response: ChatResponse = await asyncio.wait_for(
                    provider.chat(prepared.request), timeout=call.timeout_s
                )
            except TimeoutError:
                raise UpstreamTimeout(
                    f"the candidate did not answer within {call.timeout_s:g}s",
                    provider=provider.name,
                    model=model_name,
                ) from None
        except CircuitOpen as exc:
            return None, self._count(call, "breaker_open", str(exc))
        except KernelflowError as exc:
            self.breakers.settle(permit, exc)
            retry = exc.retryable and not isinstance(exc, UpstreamTimeout) and attempt < call.max_attempts
            if retry and await self._run_closed(call):
                retry = False  # its run closed: Temporal would refuse this failure, so no retry comes
            log.warning("shadow call failed", error_type=error_type(exc), attempt=attempt, retried=retry)
            if retry:
                raise ApplicationError(str(exc), type=error_type(exc)) from exc
            side = ShadowSide(
                model=candidate,
                error_type=error_type(exc),
                error=str(exc),
                latency_ms=(time.perf_counter() - started) * 1000,
            )
            await self._store(call, side)
            return None, self._count(call, "recorded", None, error=side.error_type)
        except BaseException as exc:
            self.breakers.settle(permit, exc)
            raise
        self.breakers.settle(permit, None)
        latency_ms = (time.perf_counter() - started) * 1000
        cost = self.live.prices.cost(provider.name, model_name, response.usage)
        side = side_of(
            candidate, response, cost_usd=cost, latency_ms=latency_ms, output_schema=call.output_schema
        )
        if cost is not None and (call.per_hour is not None or call.max_cost_usd_per_hour is not None):
            await self._spent(candidate, call.pair_id, cost)
        await self._store(call, side)
        return response, self._count(call, "recorded", None)

    async def _run_closed(self, call: ShadowCallInput) -> bool:
        """Whether the run that started this call has closed (it waited for it only ``close_wait_s``):
        then Temporal refuses the attempt's result and retries nothing. Unknown: not closed."""
        if not call.run_id:
            return False
        try:
            description = await (
                activity.client().get_workflow_handle(call.workflow_id, run_id=call.run_id).describe()
            )
        except Exception as exc:
            _log.warning("shadow call could not tell whether its run is open", error=str(exc))
            return False
        return description.status != WorkflowExecutionStatus.RUNNING

    async def _admit(self, candidate: str, call: ShadowCallInput, attempt: int) -> tuple[str, str] | bool:
        """With a ``limits`` key for the candidate: ``(limiter, request id)`` when the limiter admits
        this call now, False when it has no capacity now (the request is withdrawn at once: a shadow
        call never waits, so production calls keep the capacity). True without a key."""
        if self.limits is None:
            return True
        key = self.limits.limits.key_for(candidate)
        if key is None:
            return True
        request_id = f"shadow:{call.pair_id}:{attempt}"
        ticket = await self.limits.acquire(
            AcquireInput(
                model=candidate,
                request=call.request,
                id=request_id,
                requester=f"kernelflow-shadow/{call.pair_id}",  # no such workflow: a late grant is given back
                tenant="",
                lease_s=call.timeout_s + 30,
            )
        )
        if ticket.key is None:
            return True
        admitted = (ticket.limiter, request_id)
        if not ticket.granted:
            await self._release(admitted, 0)
            return False
        return admitted

    async def _release(self, admitted: tuple[str, str], used_tokens: int | None) -> None:
        limiter, request_id = admitted
        try:
            await (
                activity.client()
                .get_workflow_handle(limiter)
                .signal("release", ReleaseRequest(id=request_id, used_tokens=used_tokens))
            )
        except Exception as exc:  # the lease gives the capacity back
            _log.warning("limiter did not take a shadow call's release", limiter=limiter, error=str(exc))

    async def _store(self, call: ShadowCallInput, candidate: ShadowSide) -> None:
        request = call.request.model_dump(mode="json", exclude_none=True, by_alias=True)
        request.pop("model", None)
        await self.record(
            ShadowPair(
                id=call.pair_id,
                source="shadow",
                recorded_at=datetime.now(UTC),
                pipeline=call.pipeline,
                step_id=call.step_id,
                workflow_id=call.workflow_id,
                run_id=call.run_id,
                tenant=call.tenant,
                request_digest=request_digest(request),
                request=request,
                output_schema=call.output_schema,
                primary=call.primary,
                candidate=candidate,
            )
        )

    def _count(
        self, call: ShadowCallInput, outcome: Outcome, detail: str | None, *, error: str | None = None
    ) -> ShadowOutcome:
        self.outcomes[(call.candidate, outcome)] += 1
        activity.metric_meter().create_counter(
            "kernelflow_shadow_calls", "Shadow calls by candidate and outcome (recorded or why skipped)."
        ).add(1, {"candidate": call.candidate, "outcome": outcome})
        if outcome != "recorded":
            _log.info("shadow call skipped", candidate=call.candidate, outcome=outcome, detail=detail)
        return ShadowOutcome(outcome=outcome, candidate_error_type=error, detail=detail)

    def _budget(self, candidate: str) -> str:
        return budget_id(candidate, self.config.scope or self.scope or activity.info().task_queue)

    async def _take(self, candidate: str, call: ShadowCallInput) -> TakeAnswer:
        workflow_id = self._budget(candidate)
        start = WithStartWorkflowOperation(
            ShadowBudgetWorkflow.run,
            BudgetInput(candidate=candidate),
            id=workflow_id,
            task_queue=activity.info().task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=f"shadow budget for {candidate}",
        )
        answer: TakeAnswer = await activity.client().execute_update_with_start_workflow(
            ShadowBudgetWorkflow.take,
            TakeRequest(
                id=call.pair_id, per_hour=call.per_hour, max_cost_usd_per_hour=call.max_cost_usd_per_hour
            ),
            start_workflow_operation=start,
        )
        return answer

    async def _spent(self, candidate: str, pair_id: str, cost: float) -> None:
        try:
            await (
                activity.client()
                .get_workflow_handle(self._budget(candidate))
                .signal(ShadowBudgetWorkflow.spent, SpentRequest(id=pair_id, cost_usd=cost))
            )
        except Exception as exc:  # the budget restarts on the next take; this cost is then not counted
            _log.warning("shadow budget did not take a cost", candidate=candidate, error=str(exc))

"""Calling models from workflow code: one model call with Temporal's retries, then ordered fallbacks.

This is the one place both ``PipelineWorkflow`` and users' own workflows go through, so routing,
fallbacks, activity summaries and failure records behave the same everywhere. Deterministic: it only
schedules activities.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, Field
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.limits import LIMITS_ACQUIRE, AcquireInput, AcquireTicket
    from activities.llm import LLM_CHAT, LlmCallInput, LlmCallResult
    from kernel.contracts import AssistantMessage, ChatRequest, UserMessage
    from kernel.errors import FailureType
    from kernel.limits import BudgetRefusal, TenantBudgetRaise
    from kernel.pipeline import RetrySpec
    from kernel.routing import WeightedModel, weighted_order
    from kernel.run import ModelFailure
    from workflows.limiter import (
        CAPACITY_SIGNAL,
        CapacityGrant,
        RaiseBudgetRequest,
        ReleaseRequest,
        limits_enabled,
    )

ADMISSION_PATCH = "admission-control"
TENANT_BUDGET_PATCH = "tenant-budgets"
"""Marker of runs that handled a tenant budget refusal (pause, approval, a raise sent to the limiter)."""

OverBudget = Callable[[BudgetRefusal], Awaitable[TenantBudgetRaise | None]]
"""Told of a call its tenant's budget refused: returns the raise to send before trying again (None:
try again as is), or raises to fail the call."""

__all__ = [
    "ADMISSION_PATCH",
    "TENANT_BUDGET_PATCH",
    "AllModelsFailed",
    "CallOptions",
    "ModelFailure",
    "OverBudget",
    "call_model",
    "order_models",
    "retry_policy",
]


class CallOptions(BaseModel):
    """How one model is called: per-attempt timeout, heartbeat timeout, Temporal retry policy."""

    timeout_s: float = Field(default=120.0, gt=0)
    heartbeat_timeout_s: float | None = Field(default=None, gt=0)
    retry: RetrySpec = Field(default_factory=RetrySpec)
    local_activity: bool = False
    stream: bool = False


class AllModelsFailed(ApplicationError):
    """Every model of a call failed; ``failures`` says how, in order."""

    def __init__(self, label: str, failures: list[ModelFailure]) -> None:
        tried = "; ".join(f"{f.model}: {f.error_type}: {f.message}" for f in failures)
        super().__init__(
            f"{label} failed on every model ({tried})", type=FailureType.STEP_FAILED, non_retryable=True
        )
        self.failures = failures


def retry_policy(spec: RetrySpec) -> RetryPolicy:
    return RetryPolicy(
        initial_interval=timedelta(seconds=spec.initial_interval_s),
        backoff_coefficient=spec.backoff,
        maximum_interval=None if spec.max_interval_s is None else timedelta(seconds=spec.max_interval_s),
        maximum_attempts=spec.max_attempts,
    )


def _failure(model: str, error: ActivityError) -> ModelFailure:
    cause = error.cause if error.cause is not None else error
    if isinstance(cause, ApplicationError):
        return ModelFailure(model=model, error_type=cause.type or "ApplicationError", message=cause.message)
    return ModelFailure(model=model, error_type=type(cause).__name__, message=str(cause))


def order_models(
    primary: str, fallbacks: Sequence[str], balance: Sequence[WeightedModel] | None = None
) -> list[str]:
    """The models a step tries, in order. Without ``balance``: ``primary`` then ``fallbacks``, as
    given. With it (each model once): one of the balanced models picked by weight with ``workflow.random()``
    (seeded by the run, so replay picks the same), the other balanced ones, then ``primary`` and
    ``fallbacks``."""
    if not balance:
        return [primary, *fallbacks]
    picked = weighted_order(balance, workflow.random().random())
    return list(dict.fromkeys([*picked, primary, *fallbacks]))


async def call_model(
    models: Sequence[str],
    request: ChatRequest,
    *,
    options: CallOptions | None = None,
    label: str = "model call",
    step_id: str = "",
    pipeline: str = "",
    validate: Callable[[LlmCallResult], Any] | None = None,
    on_attempt: Callable[[str, int], None] | None = None,
    on_failure: Callable[[ModelFailure], None] | None = None,
    route: Callable[[str], str] | None = None,
    max_repairs: int = 0,
    on_repair: Callable[[ModelFailure], None] | None = None,
    on_over_budget: OverBudget | None = None,
    tenant: str | None = None,
) -> tuple[LlmCallResult, Any]:
    """Try ``models`` in order; each gets Temporal's retries per ``options.retry``.

    ``validate`` turns a result into the step's output or raises ``ValueError`` (an answer of the wrong
    shape counts as that model failing). With ``max_repairs``, a wrong answer is first re-asked that
    many times on the same model with the error appended as a user message (``on_repair`` hears of
    each). ``route`` maps each model to the one to call just before it is tried, so a reroute reaches
    fallbacks not yet started. ``on_over_budget`` decides what a call its tenant's cost budget
    refuses does (without it: a non-retryable ``TenantBudgetExceeded`` failure). ``tenant`` names the
    tenant whose limits apply (default: from a ``tenant/<name>/...`` workflow id). Returns the result and
    the validated output. Raises ``AllModelsFailed`` when every model failed, and
    ``asyncio.CancelledError`` when cancelled.
    """
    if not models:
        raise ApplicationError(
            f"{label}: no model to call", type=FailureType.PIPELINE_ERROR, non_retryable=True
        )
    options = options or CallOptions()
    failures: list[ModelFailure] = []
    for number, planned in enumerate(models, start=1):
        model = route(planned) if route is not None else planned
        if on_attempt is not None:
            on_attempt(model, number)
        summary = f"{step_id or label} · {model}"
        if number > 1:
            summary += f" (fallback {number - 1} of {len(models) - 1})"
        asked = request
        for repair in range(max_repairs + 1):
            call = LlmCallInput(
                model=model, request=asked, step_id=step_id, pipeline=pipeline, stream=options.stream
            )
            label_repair = f" (repair {repair} of {max_repairs})" if repair else ""
            try:
                result = await _execute(call, options, summary + label_repair, on_over_budget, tenant)
            except ActivityError as err:
                if is_cancelled_exception(err):
                    raise asyncio.CancelledError(str(err)) from err
                failure = _failure(model, err)
                break
            if validate is None:
                return result, result.response.text
            try:
                return result, validate(result)
            except ValueError as exc:
                failure = ModelFailure(model=model, error_type=FailureType.INVALID_OUTPUT, message=str(exc))
            if repair == max_repairs:
                break
            if on_repair is not None:
                on_repair(failure)
            asked = _repair_request(asked, result, failure.message)
        failures.append(failure)
        if on_failure is not None:
            on_failure(failure)
    raise AllModelsFailed(label, failures)


def _repair_request(request: ChatRequest, result: LlmCallResult, error: str) -> ChatRequest:
    """The same conversation plus the wrong answer and what is wrong with it."""
    feedback = UserMessage(
        content=f"Your answer was not valid: {error}\nAnswer again with only the corrected JSON."
    )
    answer = AssistantMessage(content=result.response.text or "(empty)")
    return request.model_copy(update={"messages": [*request.messages, answer, feedback]})


async def _execute(
    call: LlmCallInput,
    options: CallOptions,
    summary: str,
    on_over_budget: OverBudget | None = None,
    tenant: str | None = None,
) -> LlmCallResult:
    admission = await _admit(call, options, on_over_budget, tenant) if _admission_on() else None
    if admission is not None and admission.not_before is not None:
        # Granted ahead: the activity holds the request until its slot opens; until then the call is
        # still waiting for capacity, as the Web UI and the status say.
        call = call.model_copy(update={"not_before": admission.not_before})
        _waiting()[admission.request_id] = admission.key
        workflow.set_current_details(f"waiting for capacity on {admission.key}")
    try:
        result = await _run_call(call, options, summary)
    except (Exception, asyncio.CancelledError):  # not on eviction: the replay that follows releases
        if admission is not None:
            _waiting().pop(admission.request_id, None)
            await _release(admission, None, 0.0)
        raise
    if admission is not None:
        _waiting().pop(admission.request_id, None)
        # Awaited: a workflow that completes right after would drop a signal still to be sent.
        usage = result.response.usage.total_tokens
        await _release(admission, usage, result.cost_usd or 0.0, result.answered_at)
    return result


def _admission_on() -> bool:
    """Whether this call goes through admission: when this worker has limits, and on replay whenever
    the run was recorded with admission (its marker), so a worker with other settings still replays."""
    if not (limits_enabled() or workflow.unsafe.is_replaying()):
        return False
    return workflow.patched(ADMISSION_PATCH)


class _Admission:
    def __init__(
        self, request_id: str, limiters: list[str], not_before: float | None = None, key: str = ""
    ) -> None:
        self.request_id = request_id
        self.limiters = limiters
        self.not_before = not_before
        """Granted ahead: the instant the request may be sent (the latest of its limiters')."""
        self.key = key
        """The key whose grant made ahead holds the request longest."""


def _waiting() -> dict[str, str]:
    instance = workflow.instance()
    found: dict[str, str] | None = getattr(instance, "_kernelflow_waiting", None)
    if found is None:
        found = {}
        instance._kernelflow_waiting = found
    return found


def waiting_for_capacity() -> list[str]:
    """The limited keys the current workflow's calls wait on (for its status query)."""
    return sorted(set(_waiting().values()))


def _on_grant(grant: CapacityGrant) -> None:
    name = f"{grant.key}|{grant.id}"
    if grant.not_before is not None:
        _not_before()[name] = grant.not_before
    _granted().add(name)


def _not_before() -> dict[str, float]:
    """``key|id`` -> the instant a grant made ahead lets the request go."""
    instance = workflow.instance()
    found: dict[str, float] | None = getattr(instance, "_kernelflow_not_before", None)
    if found is None:
        found = {}
        instance._kernelflow_not_before = found
    return found


def _granted() -> set[str]:
    """``key|id`` of this workflow's calls a limiter admitted and that have not started yet."""
    instance = workflow.instance()
    found: set[str] | None = getattr(instance, "_kernelflow_granted", None)
    if found is None:
        found = set()
        instance._kernelflow_granted = found
        workflow.set_signal_handler(CAPACITY_SIGNAL, _on_grant)
    return found


def _tenant(workflow_id: str) -> str:
    if workflow_id.startswith("tenant/"):
        return workflow_id.split("/", 2)[1]
    return ""


async def _admit(
    call: LlmCallInput,
    options: CallOptions,
    on_over_budget: OverBudget | None = None,
    tenant: str | None = None,
) -> _Admission | None:
    """Reserve capacity for ``call`` with its key's limiter and wait, durably, until admitted."""
    granted = _granted()
    request_id = str(workflow.uuid4())
    attempts = options.retry.max_attempts
    lease = options.timeout_s * attempts + 60 if attempts else None
    info = workflow.info()
    while True:
        ticket: AcquireTicket = await workflow.execute_local_activity(
            LIMITS_ACQUIRE,
            AcquireInput(
                model=call.model,
                request=call.request,
                id=request_id,
                requester=info.workflow_id,
                tenant=tenant or _tenant(info.workflow_id),
                lease_s=lease,
            ),
            result_type=AcquireTicket,
            start_to_close_timeout=timedelta(seconds=30),
            summary=f"admission · {call.model}",
        )
        refusal = ticket.over_budget
        if refusal is None:
            break
        # Refused by the tenant's budget: nothing was reserved, so the same request id asks again.
        if on_over_budget is None or not workflow.patched(TENANT_BUDGET_PATCH):
            raise ApplicationError(
                refusal.message(), type=FailureType.TENANT_BUDGET_EXCEEDED, non_retryable=True
            )
        raised = await on_over_budget(refusal)
        if raised is not None:
            limiter = workflow.get_external_workflow_handle(ticket.tenant_limiter)
            await limiter.signal("raise_budget", RaiseBudgetRequest(budget=raised, by=info.workflow_id))
    holds = [
        (key, limiter, now)
        for key, limiter, now in (
            (ticket.tenant_key, ticket.tenant_limiter, ticket.tenant_granted),
            (ticket.key, ticket.limiter, ticket.granted),
        )
        if key is not None
    ]
    if not holds:
        return None
    starts: list[tuple[float, str]] = []
    for key, _, now in holds:
        if not now:
            start = await _wait_for_grant(key, request_id, granted)
            if start is not None:
                starts.append((start, key))
    latest = max(starts, default=None)
    return _Admission(
        request_id,
        [limiter for _, limiter, _ in holds],
        latest[0] if latest else None,
        latest[1] if latest else "",
    )


async def _wait_for_grant(key: str, request_id: str, granted: set[str]) -> float | None:
    """Wait, durably, for ``key``'s limiter to admit ``request_id``; returns the grant's not-before
    when it was granted ahead."""
    name = f"{key}|{request_id}"
    if name not in granted:
        waiting = _waiting()
        waiting[request_id] = key
        workflow.set_current_details(f"waiting for capacity on {key}")
        meter = workflow.metric_meter()
        meter.create_counter(
            "kernelflow_admission_waits", "Model calls that waited for capacity on a limited key."
        ).add(1, {"key": key})
        since = workflow.now()
        try:
            await workflow.wait_condition(lambda: name in granted)
        finally:
            waiting.pop(request_id, None)
        meter.create_histogram_float(
            "kernelflow_admission_wait", "How long a model call waited for capacity.", "s"
        ).record((workflow.now() - since).total_seconds(), {"key": key})
        workflow.set_current_details(f"calling {key}")
    granted.discard(name)
    return _not_before().pop(name, None)


async def _release(
    admission: _Admission, used_tokens: int | None, cost_usd: float, answered_at: float | None = None
) -> None:
    """Reconcile the reservations with the reported usage (None: the estimate stands) and the
    call's actual cost (0 for a call that failed); ``answered_at`` lets the windows trail the answer."""
    for limiter_id in admission.limiters:
        limiter = workflow.get_external_workflow_handle(limiter_id)
        release = ReleaseRequest(
            id=admission.request_id, used_tokens=used_tokens, cost_usd=cost_usd, answered_at=answered_at
        )
        try:
            await limiter.signal("release", release)
        except Exception:  # a limiter that is gone holds nothing; the lease covers the rest
            workflow.logger.warning("limiter %s did not take a release", limiter_id)


async def _run_call(call: LlmCallInput, options: CallOptions, summary: str) -> LlmCallResult:
    retry = retry_policy(options.retry)
    timeout = timedelta(seconds=options.timeout_s)
    if options.local_activity:
        result: LlmCallResult = await workflow.execute_local_activity(
            LLM_CHAT,
            call,
            result_type=LlmCallResult,
            start_to_close_timeout=timeout,
            retry_policy=retry,
            summary=summary,
        )
        return result
    heartbeat = options.heartbeat_timeout_s or min(max(options.timeout_s / 4, 10.0), 60.0)
    result = await workflow.execute_activity(
        LLM_CHAT,
        call,
        result_type=LlmCallResult,
        start_to_close_timeout=timeout,
        heartbeat_timeout=timedelta(seconds=heartbeat),
        retry_policy=retry,
        summary=summary,
    )
    return result

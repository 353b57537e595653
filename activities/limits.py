"""The ``limits_acquire`` activity: find the limited key of a model call, estimate its tokens and
signal-with-start the key's limiter workflow. Run as a local activity before each limited call.

The estimate is the prompt (about four characters a token) plus ``max_tokens`` when the request sets
it, else the model's output allowance: the catalog's ``max_output_tokens`` capped by the key's
``output_tokens`` (default ``limits.default_output_tokens``), so a model with a large output limit does
not reserve its whole allowance on every call. Usage reported after the call replaces the estimate.

A tenant with cost budgets is asked first, with the call's estimated cost (the same token estimate
at the model's catalog price); a refusal comes back in the ticket (``over_budget``), and nothing is
reserved anywhere for that call.
"""

from __future__ import annotations

import structlog
from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.client import WithStartWorkflowOperation, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError

from activities.live import LiveProviders
from kernel.contracts import ChatRequest, Usage
from kernel.errors import FailureType, KernelflowError
from kernel.limits import (
    BudgetRefusal,
    LimitsConfig,
    RateLimit,
    estimate_prompt_tokens,
    tenant_limit_key,
)
from workflows.limiter import AcquireRequest, LimiterInput, LimiterWorkflow, ReleaseRequest, limiter_id

__all__ = ["LIMITS_ACQUIRE", "AcquireInput", "AcquireTicket", "LimitsActivities"]

LIMITS_ACQUIRE = "limits_acquire"
"""The activity's name: public API, never renamed."""


_log = structlog.get_logger("kernelflow.limits")


class AcquireInput(BaseModel):
    model: str
    request: ChatRequest
    id: str = Field(description="Unique per call; the limiter reserves once per id.")
    requester: str
    tenant: str = ""
    lease_s: float | None = Field(default=None, gt=0)


class AcquireTicket(BaseModel):
    """``key`` is None when the model has no limit, ``tenant_key`` when the tenant has none (with
    neither, the call goes ahead at once)."""

    key: str | None = None
    limiter: str = ""
    tokens: int = 0
    granted: bool = Field(default=False, description="Admitted at once; else the limiter signals later.")
    tenant_key: str | None = Field(default=None, description="The tenant's own limit, when it has one.")
    tenant_limiter: str = ""
    tenant_granted: bool = False
    cost_usd: float = Field(
        default=0.0, description="The call's estimated cost (0 when its price is unknown)."
    )
    over_budget: BudgetRefusal | None = Field(
        default=None, description="The tenant's cost budget refused the call: nothing was reserved."
    )


class LimitsActivities:
    """Holds the worker's ``limits`` section (replaceable on config reload) and the live providers."""

    def __init__(self, limits: LimitsConfig, live: LiveProviders) -> None:
        self.limits = limits
        self.live = live

    @activity.defn(name=LIMITS_ACQUIRE)
    async def acquire(self, call: AcquireInput) -> AcquireTicket:
        limits = self.limits  # one config for the whole call, whatever a reload does meanwhile
        try:
            provider, model_name = self.live.registry.resolve(call.model)
        except KernelflowError:
            return AcquireTicket()  # the call itself reports the unknown model
        key = limits.key_for(f"{provider.name}/{model_name}")
        tenant_key = tenant_limit_key(call.tenant) if call.tenant in limits.tenants else None
        if key is None and tenant_key is None:
            return AcquireTicket()
        limit = limits.models.get(key) if key is not None else None
        output = limits.default_output_tokens
        facts = provider.model_facts(model_name)
        if facts is not None and facts.max_output_tokens is not None:
            output = min(output, facts.max_output_tokens)
        if limit is not None and limit.output_tokens is not None:
            output = limit.output_tokens
        prompt = estimate_prompt_tokens(call.request)
        completion = call.request.max_tokens if call.request.max_tokens is not None else output
        tokens = prompt + completion
        price = self.live.prices.lookup(provider.name, model_name)
        cost = 0.0 if price is None else price.cost(Usage(prompt_tokens=prompt, completion_tokens=completion))
        ticket = AcquireTicket(tokens=tokens, cost_usd=cost)
        # The tenant's share first: a tenant waiting on its own limit holds nothing of the model's.
        if tenant_key is not None:
            ticket.tenant_key = tenant_key
            try:
                ticket.tenant_limiter, ticket.tenant_granted = await self._acquire(
                    tenant_key, limits.tenants[call.tenant], tokens, call, cost
                )
            except WorkflowUpdateFailedError as exc:
                refusal = _budget_refusal(exc)
                if refusal is None:
                    raise
                ticket.tenant_limiter = self._limiter_id(tenant_key)
                ticket.over_budget = refusal
                _log.info("call refused by the tenant's budget", tenant=call.tenant, reason=refusal.message())
                return ticket
        if key is not None and limit is not None:
            shard = limit.shard(call.id)
            if shard is not None:  # a hot key: this call counts in one shard, with its share of the limit
                key, limit = f"{key}#{shard[0]}", shard[1]
            ticket.key = key
            ticket.limiter, ticket.granted = await self._acquire(key, limit, tokens, call, 0.0)
        return ticket

    def _limiter_id(self, key: str) -> str:
        return limiter_id(key, self.limits.scope or activity.info().task_queue)

    async def _acquire(
        self, key: str, limit: RateLimit, tokens: int, call: AcquireInput, cost: float
    ) -> tuple[str, bool]:
        workflow_id = self._limiter_id(key)
        start = WithStartWorkflowOperation(
            LimiterWorkflow.run,
            LimiterInput(key=key, limit=limit),
            id=workflow_id,
            task_queue=activity.info().task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=f"limiter for {key}",
        )
        granted = await activity.client().execute_update_with_start_workflow(
            LimiterWorkflow.acquire_now,
            AcquireRequest(
                id=call.id,
                requester=call.requester,
                tenant=call.tenant,
                tokens=tokens,
                lease_s=min(call.lease_s or self.limits.lease_s, self.limits.lease_s),
                limit=limit,
                cost_usd=cost,
                schedules=True,  # llm_chat holds the request until the grant's not_before
            ),
            start_workflow_operation=start,
        )
        return workflow_id, granted

    async def back_off(self, model_ref: str, seconds: float) -> None:
        """A provider answered 429 with Retry-After: every caller of the key waits that long. Best
        effort (a limiter not running yet has nothing to hold back)."""
        limits = self.limits
        key = limits.key_for(model_ref)
        if key is None:
            return
        shards = limits.models[key].shards
        keys = [key] if shards == 1 else [f"{key}#{n}" for n in range(shards)]
        for each in keys:
            workflow_id = limiter_id(each, limits.scope or activity.info().task_queue)
            try:
                await (
                    activity.client()
                    .get_workflow_handle(workflow_id)
                    .signal("release", ReleaseRequest(id="", retry_after_s=seconds))
                )
            except Exception as exc:  # the call's own failure is what matters; this only helps the others
                _log.warning("limiter did not take a back-off", limiter=workflow_id, error=str(exc))


def _budget_refusal(exc: WorkflowUpdateFailedError) -> BudgetRefusal | None:
    cause = exc.cause
    if not isinstance(cause, ApplicationError) or cause.type != FailureType.TENANT_BUDGET_EXCEEDED:
        return None
    if not cause.details:
        return None
    return BudgetRefusal.model_validate(cause.details[0])

"""The ``limits_acquire`` activity: find the limited key of a model call, estimate its tokens and
signal-with-start the key's limiter workflow. Run as a local activity before each limited call.

The estimate is the prompt (about four characters a token) plus ``max_tokens`` when the request sets
it, else the model's output allowance: the catalog's ``max_output_tokens`` capped by the key's
``output_tokens`` (default ``limits.default_output_tokens``), so a model with a large output limit does
not reserve its whole allowance on every call. Usage reported after the call replaces the estimate.
"""

from __future__ import annotations

import structlog
from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.client import WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy

from activities.live import LiveProviders
from kernel.contracts import ChatRequest
from kernel.errors import KernelflowError
from kernel.limits import LimitsConfig, RateLimit, estimate_tokens, tenant_limit_key
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


class LimitsActivities:
    """Holds the worker's ``limits`` section (replaceable on config reload) and the live providers."""

    def __init__(self, limits: LimitsConfig, live: LiveProviders) -> None:
        self.limits = limits
        self.live = live

    @activity.defn(name=LIMITS_ACQUIRE)
    async def acquire(self, call: AcquireInput) -> AcquireTicket:
        try:
            provider, model_name = self.live.registry.resolve(call.model)
        except KernelflowError:
            return AcquireTicket()  # the call itself reports the unknown model
        key = self.limits.key_for(f"{provider.name}/{model_name}")
        tenant_key = tenant_limit_key(call.tenant) if call.tenant in self.limits.tenants else None
        if key is None and tenant_key is None:
            return AcquireTicket()
        limit = self.limits.models.get(key) if key is not None else None
        output = self.limits.default_output_tokens
        facts = provider.model_facts(model_name)
        if facts is not None and facts.max_output_tokens is not None:
            output = min(output, facts.max_output_tokens)
        if limit is not None and limit.output_tokens is not None:
            output = limit.output_tokens
        tokens = estimate_tokens(call.request, output)
        ticket = AcquireTicket(tokens=tokens)
        # The tenant's share first: a tenant waiting on its own limit holds nothing of the model's.
        if tenant_key is not None:
            ticket.tenant_key = tenant_key
            ticket.tenant_limiter, ticket.tenant_granted = await self._acquire(
                tenant_key, self.limits.tenants[call.tenant], tokens, call
            )
        if key is not None and limit is not None:
            ticket.key = key
            ticket.limiter, ticket.granted = await self._acquire(key, limit, tokens, call)
        return ticket

    async def _acquire(self, key: str, limit: RateLimit, tokens: int, call: AcquireInput) -> tuple[str, bool]:
        workflow_id = limiter_id(key, self.limits.scope or activity.info().task_queue)
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
            ),
            start_workflow_operation=start,
        )
        return workflow_id, granted

    async def back_off(self, model_ref: str, seconds: float) -> None:
        """A provider answered 429 with Retry-After: every caller of the key waits that long. Best
        effort (a limiter not running yet has nothing to hold back)."""
        key = self.limits.key_for(model_ref)
        if key is None:
            return
        workflow_id = limiter_id(key, self.limits.scope or activity.info().task_queue)
        try:
            await (
                activity.client()
                .get_workflow_handle(workflow_id)
                .signal("release", ReleaseRequest(id="", retry_after_s=seconds))
            )
        except Exception as exc:  # the call's own failure is what matters; this only helps the others
            _log.warning("limiter did not take a back-off", limiter=workflow_id, error=str(exc))

"""The limiter: one entity workflow per limited key (``kernelflow-limiter/<scope>/<key>``), shared by every
worker. Deterministic workflow code.

Callers signal ``acquire`` (through the ``limits_acquire`` local activity, which signal-with-starts
this workflow) and wait for the ``kernelflow_capacity`` signal back, durably: no worker slot is held
while waiting. After the call they signal ``release`` with the usage the provider reported. Request
ids are deduplicated, so a retried local activity or a replayed workflow never reserves twice. A
grant whose requester cannot be signalled (terminated) is released at once; one never released
expires with its lease. The ledger is carried across continue-as-new.

A tenant's limiter (key ``tenant:<name>``) also keeps its cost budgets: ``acquire_now``'s validator
refuses a call whose estimated cost would pass the budget (an update refused by its validator leaves
no trace in history, so a refused request id may ask again), the ``release`` signal settles the
actual cost, and ``raise_budget`` raises the budget of the current day or month.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from pydantic import BaseModel, Field
from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from kernel.errors import FailureType
    from kernel.limits import Grant, Ledger, RateLimit, TenantBudgetRaise, Waiting, budget_periods

__all__ = [
    "CAPACITY_SIGNAL",
    "COUNT_FROM_ANSWER_PATCH",
    "GRANT_AHEAD_PATCH",
    "LIMITER_WORKFLOW",
    "AcquireRequest",
    "CapacityGrant",
    "LimiterInput",
    "LimiterWorkflow",
    "RaiseBudgetRequest",
    "ReleaseRequest",
    "install_limits",
    "limiter_id",
    "limits_enabled",
]

LIMITER_WORKFLOW = "kernelflow.limiter"
CAPACITY_SIGNAL = "kernelflow_capacity"
"""Sent by the limiter to the workflow whose call was admitted."""
GRANT_AHEAD_PATCH = "limiter-grants-ahead"
"""Marker of limiter runs that grant a call ahead, with the instant its request may be sent."""
COUNT_FROM_ANSWER_PATCH = "limiter-counts-from-answer"
"""Marker of limiter runs whose windows trail a call's answer rather than its release."""


_enabled = False


def install_limits(enabled: bool) -> None:
    """Called by the worker: whether its config has a ``limits`` section (same on every worker)."""
    global _enabled
    _enabled = enabled


def limits_enabled() -> bool:
    return _enabled


def limiter_id(key: str, scope: str) -> str:
    """The limiter of ``key`` for the workers of ``scope`` (``limits.scope``, else their task queue)."""
    return f"kernelflow-limiter/{scope}/{key}"


class AcquireRequest(BaseModel):
    id: str = Field(description="Unique per call: the same id twice reserves once.")
    requester: str = Field(description="Workflow id to signal when admitted.")
    tenant: str = ""
    tokens: int = Field(ge=0)
    lease_s: float = Field(gt=0)
    limit: RateLimit = Field(description="The worker's current limit for the key (config reloads apply).")
    cost_usd: float = Field(default=0.0, ge=0, description="Estimated cost, checked against cost budgets.")
    schedules: bool = Field(
        default=False,
        description="The caller holds its request until a grant's not_before (may be granted ahead).",
    )


class ReleaseRequest(BaseModel):
    id: str
    used_tokens: int | None = Field(
        default=None, ge=0, description="Reported usage; None keeps the estimate."
    )
    retry_after_s: float | None = Field(
        default=None, gt=0, description="The provider answered 429 with Retry-After: every caller waits."
    )
    cost_usd: float | None = Field(
        default=None,
        ge=0,
        description="The call's actual cost, settled in the budgets; None keeps the estimate.",
    )
    answered_at: float | None = Field(
        default=None, description="When the provider's answer was in (s since the epoch); None: at release."
    )


class RaiseBudgetRequest(BaseModel):
    """New cost budgets of the tenant for the current UTC day and/or month."""

    budget: TenantBudgetRaise
    by: str | None = None
    reason: str | None = None


class CapacityGrant(BaseModel):
    id: str
    key: str
    not_before: float | None = Field(
        default=None,
        description="Granted ahead: send the request at this instant (s since the epoch), not before.",
    )


class LimiterInput(BaseModel):
    key: str
    limit: RateLimit
    ledger: Ledger | None = None
    events_per_run: int = Field(default=2000, gt=0, description="Continue as new after this many events.")


@workflow.defn(name=LIMITER_WORKFLOW)
class LimiterWorkflow:
    @workflow.init
    def __init__(self, request: LimiterInput) -> None:
        self.key = request.key
        self.ledger: Ledger = request.ledger or Ledger(limit=request.limit)
        self.pending_acquire: list[AcquireRequest] = []
        self.pending_release: list[ReleaseRequest] = []
        self.events = 0
        self.signalling = 0
        self.changed = False
        self.notifying: set[asyncio.Future[None]] = set()

    @workflow.signal(name="acquire")
    def acquire(self, request: AcquireRequest) -> None:
        self.pending_acquire.append(request)

    @workflow.signal(name="release")
    def release(self, request: ReleaseRequest) -> None:
        self.pending_release.append(request)

    @workflow.signal(name="raise_budget")
    def raise_budget(self, request: RaiseBudgetRequest) -> None:
        self.ledger.raise_budget(request.budget, self._now())
        workflow.logger.info("budget of %s raised to %s by %s", self.key, request.budget, request.by)
        self.changed = True

    @workflow.update(name="acquire_now")
    def acquire_now(self, request: AcquireRequest) -> bool:
        """``acquire``, answering at once whether the call may start now (else the grant comes later,
        as the ``kernelflow_capacity`` signal). Asked again with the same id, says whether it holds."""
        ledger = self.ledger
        held = any(g.id == request.id and not g.released for g in ledger.grants)
        queued = any(w.id == request.id for w in ledger.waiting)
        if request.id in ledger.seen and not held and not queued:
            # Asked again after its lease ran out, before the caller ever recorded the answer (a
            # retried acquire): it has not called yet, so it queues again.
            ledger.seen.remove(request.id)
        self.pending_acquire.append(request)
        self._apply(ledger)
        self.changed = True
        for grant in self.ledger.admit(self._now()):
            if grant.id != request.id or grant.not_before is not None:
                self._spawn_notify(grant)
        # Granted ahead, the answer is the grant signal, which carries the instant to send at.
        mine = next((g for g in self.ledger.grants if g.id == request.id and not g.released), None)
        return mine is not None and mine.not_before is None

    @acquire_now.validator
    def _within_budget(self, request: AcquireRequest) -> None:
        """Refuse a call whose estimated cost would pass the tenant's budget (asked again, a request
        that already holds or waits is not checked twice)."""
        ledger = self.ledger
        if any(g.id == request.id and not g.released for g in ledger.grants) or any(
            w.id == request.id for w in ledger.waiting
        ):
            return
        refusal = ledger.budget_refusal(request.limit, request.tenant, request.cost_usd, self._now())
        if refusal is not None:
            raise ApplicationError(
                refusal.message(),
                refusal.model_dump(),
                type=FailureType.TENANT_BUDGET_EXCEEDED,
                non_retryable=True,
            )

    def _spawn_notify(self, grant: Grant) -> None:
        task = asyncio.ensure_future(self._notify(self.key, grant))
        self.notifying.add(task)
        task.add_done_callback(self.notifying.discard)

    @workflow.query(name="state")
    def state(self) -> dict[str, object]:
        return {**self.ledger.summary(), "limit": self.ledger.limit.model_dump(exclude_none=True)}

    def _now(self) -> float:
        return workflow.now().timestamp()

    def _apply(self, ledger: Ledger) -> None:
        now = self._now()
        for request in self.pending_acquire:
            ledger.limit = request.limit
            ledger.request(
                Waiting(
                    id=request.id,
                    requester=request.requester,
                    tenant=request.tenant,
                    tokens=request.tokens,
                    lease_s=request.lease_s,
                    since=now,
                    cost_usd=request.cost_usd,
                    periods=list(budget_periods(now).values()) if request.limit.budgets() else [],
                    schedules=request.schedules and workflow.patched(GRANT_AHEAD_PATCH),
                )
            )
        for release in self.pending_release:
            answered = release.answered_at
            if answered is not None and not workflow.patched(COUNT_FROM_ANSWER_PATCH):
                answered = None
            ledger.release(release.id, release.used_tokens, now, release.cost_usd, answered)
            if release.retry_after_s is not None:
                ledger.back_off(now + release.retry_after_s)
        self.events += len(self.pending_acquire) + len(self.pending_release)
        self.pending_acquire.clear()
        self.pending_release.clear()

    async def _notify(self, key: str, grant: Grant) -> None:
        self.signalling += 1
        try:
            handle = workflow.get_external_workflow_handle(grant.requester)
            await handle.signal(
                CAPACITY_SIGNAL, CapacityGrant(id=grant.id, key=key, not_before=grant.not_before)
            )
        except Exception:
            # The requester is gone (terminated, reset away): its capacity comes back now.
            self.pending_release.append(ReleaseRequest(id=grant.id, used_tokens=0, cost_usd=0.0))
        finally:
            self.signalling -= 1

    @workflow.run
    async def run(self, request: LimiterInput) -> None:
        ledger = self.ledger
        while True:
            self.changed = False
            self._apply(ledger)
            for grant in ledger.admit(self._now()):
                self._spawn_notify(grant)
            waiting = bool(ledger.waiting)
            workflow.set_current_details(
                f"{request.key}: {ledger.limit.describe()} · {len(ledger.waiting)} waiting · "
                f"{sum(1 for g in ledger.grants if not g.released)} active"
            )
            if self.events >= request.events_per_run or workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(lambda: self.signalling == 0)
                self._apply(ledger)
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(
                    LimiterInput(
                        key=request.key,
                        limit=ledger.limit,
                        ledger=ledger,
                        events_per_run=request.events_per_run,
                    )
                )
            wake = ledger.next_change(self._now())
            timeout = None if wake is None else max(wake - self._now(), 0.001)
            if not waiting and not any(not g.released for g in ledger.grants) and wake is None:
                timeout = 3600.0  # idle: wake hourly to keep the ledger small
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: bool(self.pending_acquire or self.pending_release or self.changed),
                    timeout=timedelta(seconds=timeout) if timeout is not None else None,
                )

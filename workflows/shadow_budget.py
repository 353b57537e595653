"""The shadow budget: one entity workflow per candidate (``kernelflow-shadow-budget/<scope>/<candidate>``),
shared by every worker, that keeps the candidate's shadow calls of the last hour and answers whether
one more may start (the ``per_hour`` and ``max_cost_usd_per_hour`` caps). Deterministic workflow code.

The ``shadow_chat`` activity asks with the ``take`` update (update-with-start) before calling the
candidate, and reports the call's cost with the ``spent`` signal after it. Nothing waits: a refused
call is skipped, never queued. The budget finishes once an hour went by without a call (the next
``take`` starts it again) and continues as new after many events.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

from pydantic import BaseModel, Field
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from kernel.shadow_rules import HourlyBudget

__all__ = [
    "SHADOW_BUDGET_WORKFLOW",
    "BudgetInput",
    "ShadowBudgetWorkflow",
    "SpentRequest",
    "TakeAnswer",
    "TakeRequest",
    "budget_id",
]

SHADOW_BUDGET_WORKFLOW = "kernelflow.shadow-budget"


def budget_id(candidate: str, scope: str) -> str:
    return f"kernelflow-shadow-budget/{scope}/{candidate}"


class BudgetInput(BaseModel):
    candidate: str
    budget: HourlyBudget | None = None
    events_per_run: int = Field(default=2000, gt=0)


class TakeRequest(BaseModel):
    id: str = Field(description="The shadow call's pair id: asking twice takes once.")
    per_hour: int | None = Field(default=None, gt=0)
    max_cost_usd_per_hour: float | None = Field(default=None, gt=0)


class TakeAnswer(BaseModel):
    admitted: bool
    refused_by: str | None = Field(default=None, description="per_hour or cost when refused.")
    calls_this_hour: int = 0
    cost_usd_this_hour: float = 0.0


class SpentRequest(BaseModel):
    id: str
    cost_usd: float = Field(ge=0)


@workflow.defn(name=SHADOW_BUDGET_WORKFLOW)
class ShadowBudgetWorkflow:
    @workflow.init
    def __init__(self, request: BudgetInput) -> None:
        self.budget = request.budget or HourlyBudget()
        self.events = 0
        self.changed = False

    def _now(self) -> float:
        return workflow.now().timestamp()

    @workflow.update(name="take")
    def take(self, request: TakeRequest) -> TakeAnswer:
        admitted, why = self.budget.take(
            request.id,
            self._now(),
            per_hour=request.per_hour,
            max_cost_usd_per_hour=request.max_cost_usd_per_hour,
        )
        self.events += 1
        self.changed = True
        return TakeAnswer(
            admitted=admitted,
            refused_by=None if admitted else why,
            calls_this_hour=len(self.budget.spends),
            cost_usd_this_hour=self.budget.cost(),
        )

    @workflow.signal(name="spent")
    def spent(self, request: SpentRequest) -> None:
        self.budget.spent(request.id, request.cost_usd)
        self.events += 1
        self.changed = True

    @workflow.query(name="state")
    def state(self) -> dict[str, object]:
        return {
            "calls_this_hour": len(self.budget.spends),
            "cost_usd_this_hour": self.budget.cost(),
            "admitted": self.budget.admitted,
            "refused": self.budget.refused,
        }

    @workflow.run
    async def run(self, request: BudgetInput) -> None:
        while True:
            self.changed = False
            self.budget.prune(self._now())
            workflow.set_current_details(
                f"{request.candidate}: {len(self.budget.spends)} shadow calls, "
                f"${self.budget.cost():.4f} in the last hour"
            )
            if self.events >= request.events_per_run or workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(
                    BudgetInput(
                        candidate=request.candidate,
                        budget=self.budget,
                        events_per_run=request.events_per_run,
                    )
                )
            expiry = self.budget.next_expiry()
            if expiry is None:
                idle = True
                with contextlib.suppress(TimeoutError):
                    await workflow.wait_condition(lambda: self.changed, timeout=timedelta(hours=1))
                    idle = False
                if idle:
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    return
                continue
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self.changed, timeout=timedelta(seconds=max(expiry - self._now(), 0.001))
                )

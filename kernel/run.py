"""What a running pipeline knows: ``RunState``, the single source the interpreter, the ``status``
query, the signal and update handlers and continue-as-new all read and write.

``PipelineStatus`` is the part shown to the outside (the ``status`` query, ``kernelflow run``'s
progress, the result's steps); the rest of ``RunState`` is what the interpreter needs to go on
(the template context, events received and not yet taken, decisions, event ids already applied).
Pure data: no Temporal here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from kernel.batch import BatchReport
from kernel.contracts import Usage
from kernel.limits import BudgetRefusal, TenantBudgetRaise
from kernel.steps.base import BudgetSpec

__all__ = [
    "MAX_PENDING_EVENTS",
    "MAX_REFUSED",
    "MAX_SEEN_EVENT_IDS",
    "AgentLoopState",
    "AgentToolCallState",
    "ApprovalState",
    "ModelFailure",
    "PipelineStatus",
    "RefusedInput",
    "RerouteRecord",
    "RunState",
    "RunStatus",
    "StepState",
    "StepStatus",
]

StepStatus = Literal["pending", "running", "waiting", "completed", "failed", "cancelled", "skipped"]
RunStatus = Literal["running", "paused", "completed", "failed", "cancelled"]

MAX_PENDING_EVENTS = 1000
"""Events received and not yet taken by a ``wait_event`` step; more are refused."""
MAX_SEEN_EVENT_IDS = 1000
"""Business event ids remembered for de-duplication (the most recent ones)."""
MAX_REFUSED = 20
"""Refused signals kept in the status (the most recent ones)."""


class ModelFailure(BaseModel):
    model: str
    error_type: str
    message: str


class RerouteRecord(BaseModel):
    at: datetime
    routes: dict[str, str]
    reason: str | None = None
    by: str | None = None


class RefusedInput(BaseModel):
    """A signal the pipeline could not apply, and why (a signal has no answer, so the sender finds
    it here, in the ``status`` query)."""

    at: datetime
    handler: str
    error: str


class ApprovalState(BaseModel):
    step_id: str
    status: Literal["pending", "waiting", "approved", "rejected", "skipped"] = "pending"
    message: str | None = None
    by: str | None = None
    comment: str | None = None
    timed_out: bool = False
    decided_at: datetime | None = None
    deadline: datetime | None = Field(default=None, description="When the default decision applies.")
    tool: str | None = Field(default=None, description="For an agent's tool call: the tool to be called.")
    arguments: Any = Field(default=None, description="For an agent's tool call: its arguments.")
    approvers: list[str] | None = Field(default=None, description="Who may decide a tool call's approval.")
    budget: BudgetRefusal | None = Field(
        default=None, description="For a tenant budget approval: the refused call's budget and spend."
    )
    raised: TenantBudgetRaise | None = Field(
        default=None, description="For a tenant budget approval: the new budget the approver set."
    )


class AgentToolCallState(BaseModel):
    """One tool call the model asked for, and what became of it."""

    id: str
    tool: str
    arguments: Any = None
    status: Literal["pending", "waiting", "running", "done", "error", "rejected"] = "pending"
    result: str | None = Field(default=None, description="What the model is told (a result or an error).")
    approval_id: str | None = None


class AgentLoopState(BaseModel):
    """The half-finished loop of an ``agent`` step: carried whole when the run continues as new, so
    the loop goes on from its last turn, and no finished tool call is made again."""

    turn: int = 0
    messages: list[dict[str, Any]] = Field(default_factory=list)
    tools: list[dict[str, Any]] = Field(default_factory=list, description="The catalogue fixed at start.")
    calls: list[AgentToolCallState] = Field(default_factory=list, description="The last turn's tool calls.")
    started_at: datetime | None = None
    tool_calls: int = 0
    repairs: int = 0


class StepState(BaseModel):
    id: str
    type: str
    status: StepStatus = "pending"
    parent: str | None = Field(default=None, description="The parallel/switch step it runs in.")
    model: str | None = Field(default=None, description="The provider/model that answered (or is trying).")
    provider: str | None = None
    failures: list[ModelFailure] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float | None = None
    output: Any = None
    error: str | None = None
    detail: str | None = Field(default=None, description="What the step is doing or waiting for.")
    batch: BatchReport | None = Field(default=None, description="A map in batch mode: batches, items, cost.")


class PipelineStatus(BaseModel):
    pipeline: str
    status: RunStatus = "running"
    current_step: str | None = None
    steps: list[StepState] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    cost_unknown_models: list[str] = Field(default_factory=list, description="Models whose price is unknown.")
    error: str | None = None
    paused: bool = False
    pause_reason: str | None = None
    approvals: list[ApprovalState] = Field(default_factory=list)
    waiting_for_events: list[str] = Field(default_factory=list)
    waiting_for_capacity: list[str] = Field(
        default_factory=list,
        description="Limited keys this run's model calls are waiting on (docs/limits.md).",
    )
    pending_events: dict[str, int] = Field(default_factory=dict, description="Received, not yet taken.")
    routes: dict[str, str] = Field(default_factory=dict)
    reroutes: list[RerouteRecord] = Field(default_factory=list)
    budget: BudgetSpec | None = None
    run: int = Field(default=1, description="Which run of a continued-as-new pipeline this is.")
    refused: list[RefusedInput] = Field(
        default_factory=list, description="Signals that could not be applied (the most recent 20)."
    )
    agents: dict[str, AgentLoopState] = Field(
        default_factory=dict, description="Agent loops in progress: turn, the turn's calls, the conversation."
    )


class RunState(BaseModel):
    """Everything a pipeline knows; carried whole into the next run when it continues as new."""

    position: int = Field(default=0, ge=0, description="Index of the next top-level step.")
    inputs: dict[str, Any] = Field(default_factory=dict)
    context_steps: dict[str, Any] = Field(default_factory=dict, description="steps.<id> for templates.")
    status: PipelineStatus
    providers: list[str] = Field(default_factory=list)
    events: dict[str, list[Any]] = Field(default_factory=dict, description="Received, not yet taken.")
    decisions: dict[str, ApprovalState] = Field(default_factory=dict)
    seen_event_ids: list[str] = Field(default_factory=list)
    budget_paused: bool = False
    tenant_budget_raise: TenantBudgetRaise | None = Field(
        default=None, description="What the resume after a tenant budget pause carried."
    )
    search_status: str = "Running"
    search_models: list[str] | None = None
    lifecycle_sequence: int = 0
    defaults_version: int | None = None
    agents: dict[str, AgentLoopState] = Field(default_factory=dict, description="Loops of agent steps.")

    def refuse(self, handler: str, error: str, at: datetime) -> None:
        refused = self.status.refused
        refused.append(RefusedInput(at=at, handler=handler, error=error))
        del refused[:-MAX_REFUSED]

    def pending_event_count(self) -> int:
        return sum(len(queue) for queue in self.events.values())

    def view(self) -> PipelineStatus:
        """The status as the ``status`` query shows it."""
        status = self.status
        status.approvals = list(self.decisions.values())
        status.pending_events = {name: len(queue) for name, queue in self.events.items() if queue}
        status.agents = dict(self.agents)
        return status

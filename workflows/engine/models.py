"""The pipeline workflow's public payloads: its input, status, result, and the inputs of its signals
and updates. Each is one pydantic model, so fields can be added without breaking running workflows."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field
from temporalio.contrib.workflow_streams import WorkflowStreamState

from kernel.contracts import Usage
from kernel.pipeline import BudgetSpec
from workflows.calls import ModelFailure

__all__ = [
    "ApprovalState",
    "CancelRequest",
    "CarryOver",
    "DecisionRequest",
    "EventRequest",
    "LoadPipelineInput",
    "PauseRequest",
    "PipelineRequest",
    "PipelineResult",
    "PipelineStatus",
    "RerouteRecord",
    "RerouteRequest",
    "ResumeRequest",
    "RunStatus",
    "StepState",
    "StepStatus",
]

StepStatus = Literal["pending", "running", "waiting", "completed", "failed", "cancelled", "skipped"]
RunStatus = Literal["running", "paused", "completed", "failed", "cancelled"]


class CancelRequest(BaseModel):
    reason: str = "cancelled by request"


class PauseRequest(BaseModel):
    reason: str = "paused by request"


class ResumeRequest(BaseModel):
    """Resume a paused pipeline. After a budget pause, ``budget`` sets new limits; without it the
    pipeline continues with no budget."""

    reason: str = "resumed by request"
    budget: BudgetSpec | None = None


class EventRequest(BaseModel):
    """A business event for ``wait_event`` steps waiting on (or later asking for) ``name``."""

    name: str = Field(min_length=1, max_length=200)
    payload: Any = None


class DecisionRequest(BaseModel):
    """Input of the ``approve`` and ``reject`` updates."""

    step_id: str = Field(min_length=1)
    by: str | None = Field(default=None, description="Who decided (shown in status and history).")
    comment: str | None = None


class RerouteRequest(BaseModel):
    """Input of the ``reroute`` update: ``{from: to}`` model strings (``provider/model`` or alias).
    A route to the same model removes it."""

    routes: dict[str, str] = Field(min_length=1)
    reason: str | None = None


class RerouteRecord(BaseModel):
    at: datetime
    routes: dict[str, str]
    reason: str | None = None


class ApprovalState(BaseModel):
    step_id: str
    status: Literal["pending", "waiting", "approved", "rejected", "skipped"] = "pending"
    message: str | None = None
    by: str | None = None
    comment: str | None = None
    timed_out: bool = False
    decided_at: datetime | None = None


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
    pending_events: dict[str, int] = Field(default_factory=dict, description="Received, not yet taken.")
    routes: dict[str, str] = Field(default_factory=dict)
    reroutes: list[RerouteRecord] = Field(default_factory=list)
    budget: BudgetSpec | None = None
    run: int = Field(default=1, description="Which run of a continued-as-new pipeline this is.")


class PipelineResult(BaseModel):
    pipeline: str
    status: RunStatus
    outputs: dict[str, Any] = Field(default_factory=dict)
    steps: list[StepState] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    cost_unknown_models: list[str] = Field(default_factory=list)
    reason: str | None = None


class CarryOver(BaseModel):
    """What a pipeline carries into its next run when it continues as new (between top-level steps)."""

    position: int = Field(ge=0, description="Index of the next top-level step.")
    inputs: dict[str, Any] = Field(default_factory=dict)
    context_steps: dict[str, Any] = Field(default_factory=dict)
    status: PipelineStatus
    providers: list[str] = Field(default_factory=list)
    events: dict[str, list[Any]] = Field(default_factory=dict)
    decisions: dict[str, ApprovalState] = Field(default_factory=dict)
    token_stream: WorkflowStreamState | None = Field(
        default=None, description="The token stream so far, so watchers replay across runs."
    )


class PipelineRequest(BaseModel):
    """Workflow input: the spec inline as JSON (``pipeline``, validated by the workflow, so a spec sent
    from the ``temporal`` CLI gets the same clear error as one sent by ``kernelflow run``) or the name
    (and optionally version) of a pipeline registered on the worker."""

    pipeline: dict[str, Any] | None = None
    pipeline_name: str | None = None
    pipeline_version: int | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    tenant: str | None = None
    search_attributes: bool = Field(
        default=True,
        description="Upsert Kernelflow's search attributes; False on a server without them "
        "(the time-skipping test server cannot register any).",
    )
    continue_as_new_after: int | None = Field(
        default=None, gt=0, description="History length that triggers continue-as-new (default 10,000)."
    )
    carry_over: CarryOver | None = None


class LoadPipelineInput(BaseModel):
    name: str
    version: int | None = None

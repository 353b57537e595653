"""The pipeline workflow's public surface, in one place: the names of the workflow, its queries,
signals and updates, and the pydantic model of every input and output.

The workflow, the client helpers (``worker.client``), the CLI and the docs all read these. Names are
public API and never change; each input is one model, so fields can be added without breaking
running workflows. Every control input refuses unknown fields, so a misspelt key is an error the
sender sees, not a value silently ignored.

Each signal has an update twin (``event`` / ``event_update`` …): the signal is fire-and-forget (what
business systems and signal-with-start use; a signal that cannot be applied is recorded in
``status().refused``), the update answers the sender, and refuses bad input before anything changes.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from temporalio.contrib.workflow_streams import WorkflowStreamState

from kernel.contracts import Usage
from kernel.errors import FailureType
from kernel.limits import TenantBudgetRaise
from kernel.run import (
    ApprovalState,
    ModelFailure,
    PipelineStatus,
    RefusedInput,
    RerouteRecord,
    RunState,
    RunStatus,
    StepState,
    StepStatus,
)
from kernel.steps.base import BudgetSpec

__all__ = [
    "LOAD_PIPELINE",
    "PIPELINE_WORKFLOW",
    "ApprovalState",
    "CancelRequest",
    "CarryOver",
    "ControlAnswer",
    "DecisionRequest",
    "EventRequest",
    "FailureType",
    "LoadPipelineInput",
    "ModelFailure",
    "PauseRequest",
    "PipelineRequest",
    "PipelineResult",
    "PipelineStatus",
    "Query",
    "RefusedInput",
    "RerouteRecord",
    "RerouteRequest",
    "ResumeRequest",
    "RunStatus",
    "Signal",
    "StepState",
    "StepStatus",
    "Update",
]

PIPELINE_WORKFLOW = "PipelineWorkflow"
"""The workflow type name."""

LOAD_PIPELINE = "load_pipeline"
"""The local activity that reads a registered pipeline on the worker (recorded in history)."""


class Query(StrEnum):
    STATUS = "status"
    OUTPUTS = "outputs"


class Signal(StrEnum):
    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    EVENT = "event"


class Update(StrEnum):
    APPROVE = "approve"
    REJECT = "reject"
    REROUTE = "reroute"
    EVENT = "event_update"
    PAUSE = "pause_update"
    RESUME = "resume_update"
    CANCEL = "cancel_update"


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CancelRequest(_Input):
    reason: str = "cancelled by request"
    by: str | None = None


class PauseRequest(_Input):
    reason: str = "paused by request"
    by: str | None = None


class ResumeRequest(_Input):
    """Resume a paused pipeline. After a budget pause, ``budget`` sets new limits; without it the
    pipeline continues with no budget."""

    reason: str = "resumed by request"
    budget: BudgetSpec | None = None
    tenant_budget: TenantBudgetRaise | None = Field(
        default=None,
        description="After a tenant budget pause: the tenant's new cost budget for the current day/month "
        "(without it the call is tried again as is, e.g. after the worker config raised it).",
    )
    by: str | None = None


class EventRequest(_Input):
    """A business event for ``wait_event`` steps waiting on (or later asking for) ``name``. With
    ``id`` (a business event id, such as a CloudEvents id), an event delivered twice is applied once."""

    name: str = Field(min_length=1, max_length=200)
    payload: Any = None
    id: str | None = Field(default=None, min_length=1, max_length=200)


class DecisionRequest(_Input):
    """Input of the ``approve`` and ``reject`` updates."""

    step_id: str = Field(min_length=1)
    by: str | None = Field(default=None, description="Who decided (shown in status and history).")
    comment: str | None = None
    tenant_budget: TenantBudgetRaise | None = Field(
        default=None,
        description="Approving a tenant budget approval: the tenant's new budget (default: just enough "
        "for the refused call).",
    )


class RerouteRequest(_Input):
    """Input of the ``reroute`` update: ``{from: to}`` model strings (``provider/model`` or alias).
    A route to the same model removes it."""

    routes: dict[str, str] = Field(min_length=1)
    reason: str | None = None
    by: str | None = None


class ControlAnswer(BaseModel):
    """What an update twin of a signal answers: whether it changed anything, and the run's state."""

    applied: bool
    status: RunStatus
    paused: bool
    detail: str | None = None


class PipelineResult(BaseModel):
    pipeline: str
    status: RunStatus
    outputs: dict[str, Any] = Field(default_factory=dict)
    steps: list[StepState] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    cost_unknown_models: list[str] = Field(default_factory=list)
    reason: str | None = None


class CarryOver(RunState):
    """What a pipeline carries into its next run when it continues as new (between top-level steps):
    its whole ``RunState`` and the token stream so far, so watchers replay across runs."""

    token_stream: WorkflowStreamState | None = Field(default=None)


class PipelineRequest(_Input):
    """Workflow input: the spec inline as JSON (``pipeline``, validated by the workflow, so a spec sent
    from the ``temporal`` CLI gets the same clear error as one sent by ``kernelflow run``) or the name
    (and optionally version) of a pipeline registered on the worker."""

    pipeline: dict[str, Any] | None = None
    pipeline_name: str | None = Field(default=None, min_length=1)
    pipeline_version: int | None = Field(default=None, ge=1)
    inputs: dict[str, Any] = Field(default_factory=dict)
    tenant: str | None = Field(default=None, min_length=1, max_length=200)
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

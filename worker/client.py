"""Starting and following pipelines from Python (what ``kernelflow run`` and business systems use)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from temporalio.client import Client, WithStartWorkflowOperation, WorkflowFailureError, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError
from temporalio.workflow import UpdateMethodMultiParam

from kernel.errors import PipelineError, UnknownProvider
from kernel.model_checks import check_step_options
from kernel.pipeline import PipelineSpec
from kernel.registry import Registry
from worker.codec import scoped_workflow_id
from workflows import search_attributes as sa
from workflows.contract import (
    PIPELINE_WORKFLOW,
    ApprovalState,
    CancelRequest,
    ControlAnswer,
    DecisionRequest,
    EventRequest,
    PauseRequest,
    PipelineRequest,
    PipelineResult,
    PipelineStatus,
    RerouteRequest,
    ResumeRequest,
    Signal,
)
from workflows.pipeline import PipelineWorkflow

__all__ = [
    "PipelineSummary",
    "approve",
    "cancel",
    "check_models",
    "decide_with_start",
    "deliver_event",
    "follow",
    "list_pipelines",
    "outputs",
    "pause",
    "reject",
    "reroute",
    "resume",
    "send_event",
    "start_pipeline",
    "start_registered",
    "status",
    "visibility_query",
    "workflow_url",
]


def check_models(spec: PipelineSpec, registry: Registry) -> None:
    """Refuse, before start, a pipeline naming a provider no plugin serves, or asking a model for
    options it refuses. Aliases are the worker's business and are not checked here."""
    for model in spec.models():
        if "/" in model:
            try:
                registry.resolve_ref(model)
            except UnknownProvider as exc:
                raise PipelineError(f"pipeline {spec.name!r} uses model {model!r}: {exc}") from exc
    check_step_options(spec, registry)  # what known models and their providers refuse


async def start_pipeline(
    client: Client,
    spec: PipelineSpec,
    inputs: Mapping[str, Any],
    *,
    task_queue: str,
    workflow_id: str | None = None,
    tenant: str | None = None,
    eager: bool = False,
) -> WorkflowHandle[Any, PipelineResult]:
    """Validate inputs against the spec (a bad one never starts), then start ``PipelineWorkflow``.

    ``workflow_id`` and ``tenant`` are never encrypted (the server indexes them): keep personal data
    and business keys out of them. With per-tenant keys the id is ``tenant/<tenant>/...``.

    ``eager`` asks the server to hand the first workflow task straight back to a worker of this same
    client (request_eager_start), saving a round trip when client and worker share a process."""
    request = _request(spec, inputs, tenant)
    return await client.start_workflow(
        PipelineWorkflow.run,
        request,
        id=scoped_workflow_id(client, tenant, workflow_id, f"{spec.name}-{uuid.uuid4().hex[:12]}"),
        task_queue=task_queue,
        static_summary=f"pipeline {spec.name}" + (f" · tenant {tenant}" if tenant else ""),
        static_details=spec.description or f"{len(spec.steps)} steps: " + ", ".join(s.id for s in spec.steps),
        request_eager_start=eager,
    )


async def follow(
    handle: WorkflowHandle[Any, PipelineResult],
    on_status: Callable[[PipelineStatus], None] | None = None,
    *,
    every: float = 0.25,
) -> PipelineResult:
    """Wait for the result, calling ``on_status`` with each new status while the pipeline runs.
    A failed pipeline raises ``WorkflowFailureError`` (its cause names the step and the reason)."""
    result_task = asyncio.ensure_future(handle.result())
    last: str | None = None
    try:
        while not result_task.done():
            if on_status is not None:
                try:
                    status = await handle.query(PipelineWorkflow.status)
                except (RPCError, WorkflowFailureError):
                    status = None
                if status is not None:
                    fingerprint = status.model_dump_json()
                    if fingerprint != last:
                        last = fingerprint
                        on_status(status)
            await asyncio.wait({result_task}, timeout=every)
        result = result_task.result()
        if on_status is not None:
            final = PipelineStatus(
                pipeline=result.pipeline,
                status=result.status,
                steps=result.steps,
                usage=result.usage,
                cost_usd=result.cost_usd,
                cost_unknown_models=result.cost_unknown_models,
            )
            if final.model_dump_json() != last:
                on_status(final)
        return result
    finally:
        if not result_task.done():
            result_task.cancel()


def workflow_url(ui_url: str, namespace: str, workflow_id: str) -> str:
    return f"{ui_url.rstrip('/')}/namespaces/{namespace}/workflows/{workflow_id}"


# --- driving running pipelines -------------------------------------------------------------------

# The SDK types an async update handler's result as its coroutine; these say what it answers.
_APPROVE = cast("UpdateMethodMultiParam[[Any, DecisionRequest], ApprovalState]", PipelineWorkflow.approve)
_REJECT = cast("UpdateMethodMultiParam[[Any, DecisionRequest], ApprovalState]", PipelineWorkflow.reject)

# Every helper names the workflow's handler by reference, never by a string: a renamed handler
# would fail type checking here, not at run time. Refusals raise ``WorkflowUpdateFailedError`` whose
# cause is an ``ApplicationError`` with a ``FailureType`` and a message saying why; nothing changed.


async def approve(
    client: Client,
    workflow_id: str,
    step_id: str,
    *,
    by: str | None = None,
    comment: str | None = None,
    tenant_budget: Mapping[str, Any] | None = None,
) -> ApprovalState:
    """Approve the pipeline's approval step ``step_id``. An unknown or already decided approval is
    refused and changes nothing. For a tenant budget approval (``tenant-budget-<n>``),
    ``tenant_budget`` (``{"cost_per_day_usd": ..}``) is the tenant's new budget."""
    decision = DecisionRequest.model_validate(
        {"step_id": step_id, "by": by, "comment": comment, "tenant_budget": tenant_budget}
    )
    return await client.get_workflow_handle(workflow_id).execute_update(_APPROVE, decision)


async def reject(
    client: Client, workflow_id: str, step_id: str, *, by: str | None = None, comment: str | None = None
) -> ApprovalState:
    decision = DecisionRequest(step_id=step_id, by=by, comment=comment)
    return await client.get_workflow_handle(workflow_id).execute_update(_REJECT, decision)


async def send_event(
    client: Client,
    workflow_id: str,
    name: str,
    payload: Any = None,
    *,
    event_id: str | None = None,
    confirm: bool = False,
) -> ControlAnswer | None:
    """Deliver business event ``name`` to a running pipeline (kept until a ``wait_event`` takes it).
    With ``event_id``, a redelivered event is applied once. ``confirm`` sends the ``event_update``
    twin instead of the signal: a refused event raises, and the answer says whether it was applied."""
    handle = client.get_workflow_handle(workflow_id)
    event = EventRequest(name=name, payload=payload, id=event_id)
    if confirm:
        return await handle.execute_update(PipelineWorkflow.event_update, event)
    await handle.signal(PipelineWorkflow.event, event)
    return None


async def reroute(
    client: Client,
    workflow_id: str,
    routes: Mapping[str, str],
    *,
    reason: str | None = None,
    by: str | None = None,
) -> dict[str, str]:
    """Send the pipeline's later calls for each model in ``routes`` to its target; returns the routes
    in force. Targets the worker cannot call (unknown provider or alias) are refused before anything
    changes."""
    request = RerouteRequest(routes=dict(routes), reason=reason, by=by)
    return await client.get_workflow_handle(workflow_id).execute_update(PipelineWorkflow.reroute, request)


async def pause(
    client: Client, workflow_id: str, *, reason: str = "paused by request", by: str | None = None
) -> ControlAnswer:
    """Hold the pipeline before its next step (work in flight finishes); refused unless it runs."""
    request = PauseRequest(reason=reason, by=by)
    return await client.get_workflow_handle(workflow_id).execute_update(
        PipelineWorkflow.pause_update, request
    )


async def resume(
    client: Client,
    workflow_id: str,
    *,
    reason: str = "resumed by request",
    budget: Mapping[str, Any] | None = None,
    by: str | None = None,
    tenant_budget: Mapping[str, Any] | None = None,
) -> ControlAnswer:
    """Resume a paused pipeline; after a budget pause, ``budget`` sets its new limits; after a
    tenant budget pause, ``tenant_budget`` (``{"cost_per_day_usd": ..}``) the tenant's new budget."""
    request = ResumeRequest.model_validate(
        {"reason": reason, "budget": budget, "by": by, "tenant_budget": tenant_budget}
    )
    return await client.get_workflow_handle(workflow_id).execute_update(
        PipelineWorkflow.resume_update, request
    )


async def cancel(
    client: Client, workflow_id: str, *, reason: str = "cancelled by request", by: str | None = None
) -> ControlAnswer:
    """Stop the pipeline after cancelling the work in flight; finished steps and outputs are kept."""
    request = CancelRequest(reason=reason, by=by)
    return await client.get_workflow_handle(workflow_id).execute_update(
        PipelineWorkflow.cancel_update, request
    )


async def status(client: Client, workflow_id: str) -> PipelineStatus:
    return await client.get_workflow_handle(workflow_id).query(PipelineWorkflow.status)


async def outputs(client: Client, workflow_id: str) -> dict[str, Any]:
    """The outputs of the steps completed so far."""
    return await client.get_workflow_handle(workflow_id).query(PipelineWorkflow.outputs)


# --- finding pipelines ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineSummary:
    """One pipeline as Temporal visibility knows it (no query to the workflow)."""

    workflow_id: str
    run_id: str | None
    pipeline: str | None
    status: str | None
    tenant: str | None
    providers: list[str]
    models: list[str]
    awaiting: list[str]
    started_at: datetime | None
    workflow_status: str | None


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def visibility_query(
    *,
    pipeline: str | None = None,
    status: str | None = None,
    tenant: str | None = None,
    provider: str | None = None,
    model: str | None = None,
    awaiting: str | bool | None = None,
    running: bool | None = None,
) -> str:
    """A visibility query over Kernelflow's search attributes; every value is quoted, so no filter
    can change the query's shape. ``awaiting=True`` finds pipelines waiting for any approval."""
    clauses = [f"WorkflowType = {_quote(PIPELINE_WORKFLOW)}"]
    for key, value in (
        (sa.PIPELINE, pipeline),
        (sa.STATUS, status),
        (sa.TENANT, tenant),
        (sa.PROVIDER, provider),
        (sa.MODELS, model),
    ):
        if value is not None:
            clauses.append(f"{key.name} = {_quote(value)}")
    if awaiting is True:
        clauses.append(f"{sa.AWAITING.name} IS NOT NULL")
    elif isinstance(awaiting, str):
        clauses.append(f"{sa.AWAITING.name} = {_quote(awaiting)}")
    if running is not None:
        clauses.append("ExecutionStatus = 'Running'" if running else "ExecutionStatus != 'Running'")
    return " AND ".join(clauses)


async def list_pipelines(
    client: Client,
    *,
    query: str | None = None,
    limit: int = 100,
    **filters: Any,
) -> list[PipelineSummary]:
    """Pipelines found through visibility: by ``filters`` (see ``visibility_query``) or a raw ``query``."""
    text = query if query is not None else visibility_query(**filters)
    found: list[PipelineSummary] = []
    async for execution in client.list_workflows(text, limit=limit):
        attrs = execution.typed_search_attributes
        found.append(
            PipelineSummary(
                workflow_id=execution.id,
                run_id=execution.run_id,
                pipeline=attrs.get(sa.PIPELINE),
                status=attrs.get(sa.STATUS),
                tenant=attrs.get(sa.TENANT),
                providers=list(attrs.get(sa.PROVIDER) or []),
                models=list(attrs.get(sa.MODELS) or []),
                awaiting=list(attrs.get(sa.AWAITING) or []),
                started_at=execution.start_time,
                workflow_status=execution.status.name if execution.status is not None else None,
            )
        )
    return found


# --- starting -------------------------------------------------------------------------------------


async def start_registered(
    client: Client,
    name: str,
    inputs: Mapping[str, Any],
    *,
    task_queue: str,
    version: int | None = None,
    workflow_id: str | None = None,
    tenant: str | None = None,
) -> WorkflowHandle[Any, PipelineResult]:
    """Start a pipeline registered on the worker by name. The worker holds the spec, so the inputs are
    checked there: an unknown name (listing the registered ones) or bad inputs fail the run at once."""
    request = PipelineRequest(
        pipeline_name=name, pipeline_version=version, inputs=dict(inputs), tenant=tenant
    )
    return await client.start_workflow(
        PipelineWorkflow.run,
        request,
        id=scoped_workflow_id(client, tenant, workflow_id, f"{name}-{uuid.uuid4().hex[:12]}"),
        task_queue=task_queue,
        static_summary=f"pipeline {name}" + (f" · tenant {tenant}" if tenant else ""),
    )


def _request(spec: PipelineSpec, inputs: Mapping[str, Any], tenant: str | None) -> PipelineRequest:
    spec.resolve_inputs(inputs)
    return PipelineRequest(
        pipeline=spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        inputs=dict(inputs),
        tenant=tenant,
    )


async def deliver_event(
    client: Client,
    workflow_id: str,
    spec: PipelineSpec,
    inputs: Mapping[str, Any],
    name: str,
    payload: Any = None,
    *,
    task_queue: str,
    tenant: str | None = None,
    event_id: str | None = None,
) -> WorkflowHandle[Any, PipelineResult]:
    """Signal-with-start, for a business system that does not know whether the pipeline runs yet:
    deliver event ``name`` to pipeline ``workflow_id``, starting it with ``spec`` and ``inputs`` first
    if it is not running. Either way the event is kept until a ``wait_event`` step takes it; with
    ``event_id``, a redelivered event is applied once."""
    return await client.start_workflow(
        PipelineWorkflow.run,
        _request(spec, inputs, tenant),
        id=scoped_workflow_id(client, tenant, workflow_id, workflow_id),
        task_queue=task_queue,
        start_signal=Signal.EVENT,
        start_signal_args=[EventRequest(name=name, payload=payload, id=event_id)],
        static_summary=f"pipeline {spec.name}" + (f" · tenant {tenant}" if tenant else ""),
    )


async def decide_with_start(
    client: Client,
    workflow_id: str,
    spec: PipelineSpec,
    inputs: Mapping[str, Any],
    step_id: str,
    *,
    approved: bool = True,
    by: str | None = None,
    comment: str | None = None,
    task_queue: str,
    tenant: str | None = None,
) -> ApprovalState:
    """Update-with-start: decide approval ``step_id`` of pipeline ``workflow_id``, starting it first if
    it is not running (a decision made before the step is reached is applied when it is). Returns the
    decision once the workflow has recorded it; a refused decision raises and changes nothing."""
    operation: WithStartWorkflowOperation[Any, PipelineResult] = WithStartWorkflowOperation(
        PipelineWorkflow.run,
        _request(spec, inputs, tenant),
        id=scoped_workflow_id(client, tenant, workflow_id, workflow_id),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        static_summary=f"pipeline {spec.name}" + (f" · tenant {tenant}" if tenant else ""),
    )
    decision = DecisionRequest(step_id=step_id, by=by, comment=comment)
    if approved:
        return await client.execute_update_with_start_workflow(
            _APPROVE, decision, start_workflow_operation=operation
        )
    return await client.execute_update_with_start_workflow(
        _REJECT, decision, start_workflow_operation=operation
    )

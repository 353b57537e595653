"""Starting and following pipelines from Python (what ``kernelflow run`` and business systems use)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from temporalio.client import Client, WithStartWorkflowOperation, WorkflowFailureError, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError

from kernel.errors import PipelineError, UnknownProvider
from kernel.pipeline import PipelineSpec
from kernel.registry import Registry
from workflows.contract import ApprovalState, DecisionRequest, EventRequest, RerouteRequest
from workflows.pipeline import PIPELINE_WORKFLOW, PipelineRequest, PipelineResult, PipelineStatus

__all__ = [
    "approve",
    "check_models",
    "decide_with_start",
    "deliver_event",
    "follow",
    "reject",
    "reroute",
    "send_event",
    "start_pipeline",
    "workflow_url",
]


def check_models(spec: PipelineSpec, registry: Registry) -> None:
    """Refuse, before start, a pipeline naming a provider no plugin serves. Aliases are the worker's
    business and are not checked here."""
    for model in spec.models():
        if "/" in model:
            try:
                registry.resolve_ref(model)
            except UnknownProvider as exc:
                raise PipelineError(f"pipeline {spec.name!r} uses model {model!r}: {exc}") from exc


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

    ``eager`` asks the server to hand the first workflow task straight back to a worker of this same
    client (request_eager_start), saving a round trip when client and worker share a process."""
    request = _request(spec, inputs, tenant)
    return await client.start_workflow(
        PIPELINE_WORKFLOW,
        request,
        id=workflow_id or f"{spec.name}-{uuid.uuid4().hex[:12]}",
        task_queue=task_queue,
        result_type=PipelineResult,
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
                    status = await handle.query("status", result_type=PipelineStatus)
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


async def approve(
    client: Client, workflow_id: str, step_id: str, *, by: str | None = None, comment: str | None = None
) -> ApprovalState:
    """Approve the pipeline's approval step ``step_id``. An unknown or already decided approval is
    refused (``WorkflowUpdateFailedError`` whose cause says why) and changes nothing."""
    handle = client.get_workflow_handle(workflow_id)
    decision = DecisionRequest(step_id=step_id, by=by, comment=comment)
    result: ApprovalState = await handle.execute_update("approve", decision, result_type=ApprovalState)
    return result


async def reject(
    client: Client, workflow_id: str, step_id: str, *, by: str | None = None, comment: str | None = None
) -> ApprovalState:
    handle = client.get_workflow_handle(workflow_id)
    decision = DecisionRequest(step_id=step_id, by=by, comment=comment)
    result: ApprovalState = await handle.execute_update("reject", decision, result_type=ApprovalState)
    return result


async def send_event(client: Client, workflow_id: str, name: str, payload: Any = None) -> None:
    """Deliver business event ``name`` to a running pipeline (kept until a ``wait_event`` takes it)."""
    await client.get_workflow_handle(workflow_id).signal("event", EventRequest(name=name, payload=payload))


async def reroute(
    client: Client, workflow_id: str, routes: Mapping[str, str], *, reason: str | None = None
) -> dict[str, str]:
    """Send the pipeline's later calls for each model in ``routes`` to its target; returns the routes
    in force. Model strings are checked by the workflow before anything changes."""
    request = RerouteRequest(routes=dict(routes), reason=reason)
    result: dict[str, str] = await client.get_workflow_handle(workflow_id).execute_update(
        "reroute", request, result_type=dict
    )
    return result


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
        PIPELINE_WORKFLOW,
        request,
        id=workflow_id or f"{name}-{uuid.uuid4().hex[:12]}",
        task_queue=task_queue,
        result_type=PipelineResult,
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
) -> WorkflowHandle[Any, PipelineResult]:
    """Signal-with-start, for a business system that does not know whether the pipeline runs yet:
    deliver event ``name`` to pipeline ``workflow_id``, starting it with ``spec`` and ``inputs`` first
    if it is not running. Either way the event is kept until a ``wait_event`` step takes it."""
    return await client.start_workflow(
        PIPELINE_WORKFLOW,
        _request(spec, inputs, tenant),
        id=workflow_id,
        task_queue=task_queue,
        result_type=PipelineResult,
        start_signal="event",
        start_signal_args=[EventRequest(name=name, payload=payload)],
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
        PIPELINE_WORKFLOW,
        _request(spec, inputs, tenant),
        id=workflow_id,
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        result_type=PipelineResult,
        static_summary=f"pipeline {spec.name}" + (f" · tenant {tenant}" if tenant else ""),
    )
    result: ApprovalState = await client.execute_update_with_start_workflow(
        "approve" if approved else "reject",
        DecisionRequest(step_id=step_id, by=by, comment=comment),
        start_workflow_operation=operation,
        result_type=ApprovalState,
    )
    return result

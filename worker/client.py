"""Starting and following pipelines from Python (what ``kernelflow run`` and business systems use)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.service import RPCError

from kernel.errors import PipelineError, UnknownProvider
from kernel.pipeline import PipelineSpec
from kernel.registry import Registry
from workflows.pipeline import PIPELINE_WORKFLOW, PipelineRequest, PipelineResult, PipelineStatus

__all__ = ["check_models", "follow", "start_pipeline", "workflow_url"]


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
    spec.resolve_inputs(inputs)
    request = PipelineRequest(
        pipeline=spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        inputs=dict(inputs),
        tenant=tenant,
    )
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

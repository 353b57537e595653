"""The interpreter's effects on Temporal: timers, conditions, activities, child workflows, search
attributes and the Web UI's current details. Deterministic workflow code (it only schedules).

Failures of activities and children become ``StepFailure`` here, once, with the message the step
reports; cancellation stays ``asyncio.CancelledError``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from activities.batch import BATCH_CANCEL, BATCH_RESULTS, BATCH_STATUS, BATCH_SUBMIT
    from activities.batcher import BATCH_ENQUEUE, BATCH_WITHDRAW
    from activities.embed import LLM_EMBED, EmbedCallInput, EmbedCallResult
    from activities.mcp import (
        MCP_CALL_TOOL,
        MCP_LIST_TOOLS,
        McpCallInput,
        McpCallResult,
        McpListInput,
        McpToolInfo,
    )
    from activities.tool import HTTP_TOOL, ToolCallInput, ToolCallResult
    from kernel.engine import (
        CallResult,
        ChildCall,
        ChildResult,
        EmbedCall,
        EmbedResult,
        LifecycleEvent,
        McpCall,
        McpList,
        ModelCall,
        SearchField,
        ToolCall,
        ToolResult,
    )
    from kernel.errors import FailureType
    from kernel.steps.base import StepFailure
    from kernel.steps.batching import BatchOp
    from workflows import search_attributes as sa
    from workflows.batcher import BATCH_RESULTS_SIGNAL, BatchDelivery
    from workflows.calls import AllModelsFailed, CallOptions, OverBudget, call_model, retry_policy
    from workflows.contract import (
        LOAD_PIPELINE,
        PIPELINE_WORKFLOW,
        LoadPipelineInput,
        PipelineRequest,
        PipelineResult,
    )
    from workflows.engine.outbox import Outbox
    from workflows.engine.shadow import Shadows

__all__ = ["TemporalEffects", "failure_cause"]

_SEARCH: dict[str, Any] = {
    "status": sa.STATUS,
    "providers": sa.PROVIDER,
    "awaiting": sa.AWAITING,
    "models": sa.MODELS,
}
_SINCE_V2 = frozenset({"awaiting", "models"})

BATCH_SUBMIT_CANCEL_PATCH = "batch-submit-cancel"
"""A submission cancelled in flight cancels the batches it made, found by their tag."""

_BATCH_ACTIVITIES = {
    "submit": BATCH_SUBMIT,
    "status": BATCH_STATUS,
    "results": BATCH_RESULTS,
    "cancel": BATCH_CANCEL,
    "enqueue": BATCH_ENQUEUE,
    "withdraw": BATCH_WITHDRAW,
}


class TemporalEffects:
    """``kernel.engine.Effects`` for ``PipelineWorkflow``. ``search_attributes`` is the request's
    switch; ``v2`` says whether this run records the search attributes added with the engine's
    second shape (runs that started before replay without them)."""

    def __init__(
        self, *, search_attributes: bool, v2: bool, continue_as_new_after: int | None = None
    ) -> None:
        self.search_attributes = search_attributes
        self.v2 = v2
        self.continue_as_new_after = continue_as_new_after
        self.lifecycle_events: list[LifecycleEvent] = []
        self.outbox: Outbox | None = None
        """Set for runs whose pipeline publishes lifecycle events."""
        self.shadows: Shadows | None = None
        """Set for runs that may shadow their model calls (``workflows.engine.shadow``)."""
        self.on_over_budget: OverBudget | None = None
        """What a model call its tenant's cost budget refuses does (the engine's ``tenant_budget``)."""
        self.tenant: str | None = None
        """The run's tenant (its start request's), whose limits its calls count against."""
        self._batch_inbox: dict[str, BatchDelivery] | None = None
        """Answers the shared batcher's runs signalled, by hand-over ticket (``kernelflow_batch_results``)."""

    def now(self) -> datetime:
        return workflow.now()

    def random(self) -> float:
        return workflow.random().random()

    async def sleep(self, seconds: float, *, summary: str) -> None:
        await workflow.sleep(timedelta(seconds=seconds), summary=summary)

    async def wait(self, condition: Callable[[], bool], *, timeout: float | None, summary: str) -> bool:  # noqa: ASYNC109
        if timeout is None:
            await workflow.wait_condition(condition)
            return True
        try:
            await workflow.wait_condition(condition, timeout=timeout, timeout_summary=summary)
        except TimeoutError:
            return False
        return True

    async def call_model(self, call: ModelCall) -> tuple[CallResult, Any]:
        options = CallOptions(
            timeout_s=call.timeout_s,
            heartbeat_timeout_s=call.heartbeat_timeout_s,
            retry=call.retry,
            local_activity=call.local_activity,
            stream=call.stream,
        )
        called: list[str] = []

        def on_attempt(model: str, number: int) -> None:
            called.append(model)
            if call.on_attempt is not None:
                call.on_attempt(model, number)

        try:
            result, output = await call_model(
                call.models,
                call.request,
                options=options,
                label=call.label,
                step_id=call.step_id,
                pipeline=call.pipeline,
                validate=call.validate,
                on_attempt=on_attempt,
                on_failure=call.on_failure,
                route=call.route,
                max_repairs=call.max_repairs,
                on_repair=call.on_repair,
                on_over_budget=self.on_over_budget,
                tenant=self.tenant,
            )
        except AllModelsFailed as exc:
            raise StepFailure(exc.message, FailureType.STEP_FAILED) from None
        except ApplicationError as exc:
            raise StepFailure(exc.message, exc.type or FailureType.STEP_FAILED) from None
        if self.shadows is not None:
            self.shadows.after_call(call, called[-1] if called else result.model_ref, result)
        return result, output

    async def embed(self, call: EmbedCall) -> EmbedResult:
        heartbeat = call.heartbeat_timeout_s
        try:
            result: EmbedCallResult = await workflow.execute_activity(
                LLM_EMBED,
                EmbedCallInput(
                    model=call.model, request=call.request, step_id=call.step_id, pipeline=call.pipeline
                ),
                result_type=EmbedCallResult,
                start_to_close_timeout=timedelta(seconds=call.timeout_s),
                heartbeat_timeout=timedelta(seconds=heartbeat) if heartbeat else None,
                retry_policy=retry_policy(call.retry),
                summary=call.summary,
            )
        except ActivityError as exc:
            raise StepFailure(f"step {call.step_id!r} failed: {failure_cause(exc)}") from None
        return result

    async def batch(self, op: BatchOp) -> dict[str, Any]:
        """One batch activity. Submission is idempotent (the provider is asked for the batch's tag
        first), so Temporal may retry every one of them. A submission cancelled while in flight (the
        pipeline was cancelled) may already have made the batch: it is looked up by its tag and
        cancelled before the cancellation goes on."""
        try:
            result: dict[str, Any] = await workflow.execute_activity(
                _BATCH_ACTIVITIES[op.op],
                op.payload,
                result_type=dict,
                start_to_close_timeout=timedelta(seconds=op.timeout_s),
                heartbeat_timeout=timedelta(seconds=op.heartbeat_timeout_s or 10),
                retry_policy=retry_policy(op.retry),
                summary=op.summary,
            )
        except ActivityError as exc:
            if isinstance(exc.cause, CancelledError) and op.op == "submit":
                await self._cancel_submitted(op)
            kind = _cause_type(exc)
            raise StepFailure(
                f"step {op.step_id!r} batch {op.op} failed: {failure_cause(exc)}", kind
            ) from None
        except asyncio.CancelledError:
            if op.op == "submit":
                await self._cancel_submitted(op)
            raise
        return result

    async def _cancel_submitted(self, op: BatchOp) -> None:
        """Cancel whatever batches a cancelled submission made, found by their tag; awaited to the end
        (the step is being cancelled: the cleanup runs as a task of its own)."""
        if not workflow.patched(BATCH_SUBMIT_CANCEL_PATCH):
            return
        cleanup = asyncio.ensure_future(
            workflow.execute_activity(
                BATCH_CANCEL,
                {"model": op.payload["model"], "ids": [], "tag": op.payload["tag"]},
                result_type=dict,
                start_to_close_timeout=timedelta(seconds=op.timeout_s),
                heartbeat_timeout=timedelta(seconds=op.heartbeat_timeout_s or 10),
                retry_policy=retry_policy(op.retry),
                summary=f"{op.summary}: cancelled, its batches too",
            )
        )
        while not cleanup.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(cleanup)
        with contextlib.suppress(ActivityError):
            cleanup.result()

    def expect_batch(self, ticket: str) -> None:
        if self._batch_inbox is None:
            self._batch_inbox = {}
            workflow.set_signal_handler(BATCH_RESULTS_SIGNAL, self._on_batch_delivery)
        self._batch_inbox.setdefault(ticket, BatchDelivery(ticket=ticket))

    def _on_batch_delivery(self, raw: Any) -> None:
        try:
            delivery = BatchDelivery.model_validate(raw)
        except ValueError as exc:
            workflow.logger.warning("batch results refused: %s", exc)
            return
        inbox = self._batch_inbox if self._batch_inbox is not None else {}
        held = inbox.get(delivery.ticket)
        if held is None:
            return  # a hand-over no longer waited for (its deadline passed)
        known = {str(r["custom_id"]) for r in held.results}
        held.results += [r for r in delivery.results if str(r["custom_id"]) not in known]
        held.jobs = [
            *(j for j in held.jobs if j["id"] not in {d["id"] for d in delivery.jobs}),
            *delivery.jobs,
        ]
        held.model_ref = delivery.model_ref or held.model_ref
        held.provider = delivery.provider or held.provider

    async def batch_delivery(
        self, ticket: str, custom_ids: list[str], *, within: float | None, summary: str
    ) -> dict[str, Any]:
        self.expect_batch(ticket)
        inbox = self._batch_inbox if self._batch_inbox is not None else {}
        wanted = set(custom_ids)

        def answered() -> bool:
            return wanted <= {str(r["custom_id"]) for r in inbox[ticket].results}

        await self.wait(answered, timeout=within, summary=summary)
        delivery = inbox.pop(ticket)
        return delivery.model_dump()

    async def tool(self, call: ToolCall) -> ToolResult:
        heartbeat = call.heartbeat_timeout_s
        try:
            result: ToolCallResult = await workflow.execute_activity(
                HTTP_TOOL,
                ToolCallInput(
                    url=call.url,
                    method=call.method,
                    headers=call.headers,
                    query=call.query,
                    body=call.body,
                    timeout_s=call.timeout_s,
                    step_id=call.step_id,
                ),
                result_type=ToolCallResult,
                start_to_close_timeout=timedelta(seconds=call.timeout_s + 5),
                heartbeat_timeout=timedelta(seconds=heartbeat) if heartbeat else None,
                retry_policy=retry_policy(call.retry),
                summary=call.summary,
            )
        except ActivityError as exc:
            kind = _cause_type(exc)
            raise StepFailure(f"step {call.step_id!r} failed: {failure_cause(exc)}", kind) from None
        return result

    async def child(self, call: ChildCall) -> ChildResult:
        request = PipelineRequest.model_validate(
            {**call.request, "search_attributes": self.search_attributes}
        )
        try:
            result: PipelineResult = await workflow.execute_child_workflow(
                PIPELINE_WORKFLOW,
                request,
                id=call.workflow_id,
                result_type=PipelineResult,
                static_summary=call.summary,
            )
        except ChildWorkflowError as exc:
            raise StepFailure(
                f"step {call.step_id!r}: sub-pipeline {call.name!r} failed: {failure_cause(exc)}"
            ) from None
        return result

    async def mcp_tools(self, call: McpList) -> list[dict[str, Any]]:
        try:
            tools: list[McpToolInfo] = await workflow.execute_activity(
                MCP_LIST_TOOLS,
                McpListInput(server=call.server, step_id=call.step_id),
                result_type=list[McpToolInfo],
                start_to_close_timeout=timedelta(seconds=60),
                heartbeat_timeout=timedelta(seconds=20),
                retry_policy=retry_policy(call.retry),
                summary=call.summary,
            )
        except ActivityError as exc:
            raise StepFailure(
                f"step {call.step_id!r}: listing the tools of MCP server {call.server!r} failed: "
                f"{failure_cause(exc)}",
                _cause_type(exc),
            ) from None
        return [tool.model_dump() for tool in tools]

    async def mcp_call(self, call: McpCall) -> tuple[str, bool]:
        heartbeat = call.heartbeat_timeout_s
        try:
            result: McpCallResult = await workflow.execute_activity(
                MCP_CALL_TOOL,
                McpCallInput(
                    server=call.server,
                    tool=call.tool,
                    arguments=call.arguments,
                    step_id=call.step_id,
                    call_id=call.call_id,
                ),
                result_type=McpCallResult,
                start_to_close_timeout=timedelta(seconds=call.timeout_s),
                heartbeat_timeout=timedelta(seconds=heartbeat) if heartbeat else None,
                retry_policy=retry_policy(call.retry),
                summary=call.summary,
            )
        except ActivityError as exc:
            raise StepFailure(failure_cause(exc), _cause_type(exc)) from None
        return result.text, result.is_error

    async def pipeline_problem(self, name: str, version: int | None) -> str | None:
        try:
            await workflow.execute_local_activity(
                LOAD_PIPELINE,
                LoadPipelineInput(name=name, version=version),
                result_type=dict,
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=RetryPolicy(maximum_attempts=3),
                summary=f"check pipeline {name}",
            )
        except ActivityError as exc:
            return failure_cause(exc)
        except ApplicationError as exc:  # a local activity's failure may arrive unwrapped
            return f"{exc.type}: {exc.message}" if exc.type else exc.message
        return None

    def continue_as_new_suggested(self) -> bool:
        info = workflow.info()
        limit = self.continue_as_new_after or 10_000
        return info.is_continue_as_new_suggested() or info.get_current_history_length() >= limit

    def search(self, updates: Mapping[SearchField, str | list[str]]) -> None:
        if not self.search_attributes:
            return
        chosen = [
            _SEARCH[name].value_set(value)
            for name, value in updates.items()
            if self.v2 or name not in _SINCE_V2
        ]
        if chosen:
            workflow.upsert_search_attributes(chosen)

    def details(self, text: str) -> None:
        workflow.set_current_details(text)

    def lifecycle(self, event: LifecycleEvent) -> None:
        self.lifecycle_events.append(event)
        del self.lifecycle_events[:-100]
        if self.outbox is not None:
            self.outbox.add(event)


def _cause_type(exc: ActivityError) -> str:
    cause = exc.cause
    return cause.type if isinstance(cause, ApplicationError) and cause.type else FailureType.STEP_FAILED


def failure_cause(exc: BaseException) -> str:
    """The innermost reason of an activity or child failure, as ``Type: message``."""
    cause = exc.cause if isinstance(exc, ActivityError | ChildWorkflowError) else None
    while isinstance(cause, ChildWorkflowError | ActivityError) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, ApplicationError):
        return f"{cause.type}: {cause.message}" if cause.type else cause.message
    return str(cause or exc)

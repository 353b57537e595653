"""The batcher: one entity workflow per (tenant, key, model),
``[tenant/<tenant>/]kernelflow-batcher/<key>/<model>``, that gathers the same batch-mode step's calls from
many pipelines within a window and submits them as one provider batch. Deterministic workflow code.

Pipelines hand their items over with the ``add_items`` update (through the ``llm_batch_enqueue``
activity, which update-with-starts this workflow); an item id taken once is never taken again, so a
retried activity or a replayed pipeline adds nothing twice. The window closes ``window_s`` after its
first item arrived (the shortest window any of its items asked for), or at once when ``max_items`` are
waiting. The items then go to a ``BatchRunWorkflow`` child (started abandoned, so the batcher may
continue as new while batches run), which submits them, waits on durable timers, reads the results and
signals each pipeline its own answers (``kernelflow_batch_results``). Items waiting in a window are the
batcher's state, carried across continue-as-new; nothing lives in a worker's memory only.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, Field
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from activities.batch import BATCH_RESULTS, BATCH_STATUS, BATCH_SUBMIT
    from kernel.batch import BatchJob, batch_tag

__all__ = [
    "BATCHER_WORKFLOW",
    "BATCH_RESULTS_SIGNAL",
    "BATCH_RUN_WORKFLOW",
    "AddAnswer",
    "AddItems",
    "BatchDelivery",
    "BatchRunInput",
    "BatchRunWorkflow",
    "BatcherInput",
    "BatcherSettings",
    "BatcherWorkflow",
    "SharedItem",
    "Withdraw",
    "batcher_id",
]

BATCHER_WORKFLOW = "kernelflow.batcher"
BATCH_RUN_WORKFLOW = "kernelflow.batch_run"
BATCH_RESULTS_SIGNAL = "kernelflow_batch_results"
"""Sent by a batch run to each pipeline whose items it answered."""

_SEEN_KEPT = 50_000
"""Item ids remembered across continue-as-new (a retry comes minutes after its first attempt, not
50,000 items later)."""


def batcher_id(model: str, key: str, tenant: str) -> str:
    """A tenant's batcher lives under ``tenant/<tenant>/`` so that, with per-tenant keys, the items it
    holds (prompts) and its batch runs are encrypted under the tenant's own key."""
    if tenant:
        return f"tenant/{tenant}/kernelflow-batcher/{key}/{model}"
    return f"kernelflow-batcher/{key}/{model}"


class SharedItem(BaseModel):
    id: str = Field(description="Unique across pipelines: the batcher takes an id once.")
    ticket: str = Field(description="The pipeline's hand-over this item came with.")
    requester: str = Field(description="Workflow id to signal the answer to.")
    custom_id: str = Field(description="The requester's own id of the item.")
    request: dict[str, Any]


class AddItems(BaseModel):
    items: list[SharedItem] = Field(min_length=1)
    window_s: float = Field(gt=0, le=86400)
    max_items: int = Field(gt=0)


class AddAnswer(BaseModel):
    accepted: int
    duplicates: int
    pending: int
    closes_at: float | None


class Withdraw(BaseModel):
    ticket: str


class BatcherSettings(BaseModel):
    model: str
    key: str
    tenant: str = ""
    poll_s: float = 30.0
    poll_max_s: float = 600.0
    timeout_s: float = 300.0
    max_attempts: int = 10


class BatcherInput(BaseModel):
    settings: BatcherSettings
    pending: list[SharedItem] = Field(default_factory=list)
    seen: list[str] = Field(default_factory=list)
    closes_at: float | None = None
    max_items: int | None = None
    started: int = 0
    events_per_run: int = Field(default=2000, gt=0, description="Continue as new after this many events.")
    idle_s: float = Field(
        default=3600.0,
        gt=0,
        description="End after this long with nothing waiting (the next item starts a new one).",
    )


class BatchRunInput(BaseModel):
    settings: BatcherSettings
    tag: str
    items: list[SharedItem]


class BatchDelivery(BaseModel):
    """One pipeline's answers from one provider batch (a pipeline's items may span two)."""

    ticket: str
    model_ref: str = ""
    provider: str = ""
    jobs: list[dict[str, Any]] = Field(default_factory=list)
    results: list[dict[str, Any]] = Field(default_factory=list)


@workflow.defn(name=BATCHER_WORKFLOW)
class BatcherWorkflow:
    @workflow.init
    def __init__(self, request: BatcherInput) -> None:
        self.pending: list[SharedItem] = list(request.pending)
        self.seen: dict[str, None] = dict.fromkeys(request.seen)
        self.closes_at = request.closes_at
        self.max_items = request.max_items
        self.started = request.started
        self.changed = False

    @workflow.update(name="add_items")
    def add_items(self, request: AddItems) -> AddAnswer:
        accepted = 0
        for item in request.items:
            if item.id in self.seen:
                continue
            self.seen[item.id] = None
            self.pending.append(item)
            accepted += 1
        if accepted:
            closes = workflow.now().timestamp() + request.window_s
            self.closes_at = closes if self.closes_at is None else min(self.closes_at, closes)
            self.max_items = min(self.max_items or request.max_items, request.max_items)
            self.changed = True
        return AddAnswer(
            accepted=accepted,
            duplicates=len(request.items) - accepted,
            pending=len(self.pending),
            closes_at=self.closes_at,
        )

    @workflow.update(name="withdraw")
    def withdraw(self, request: Withdraw) -> int:
        """Drop a pipeline's items still waiting in the window (it stopped waiting for them)."""
        before = len(self.pending)
        self.pending = [item for item in self.pending if item.ticket != request.ticket]
        self.changed = True
        return before - len(self.pending)

    @workflow.query(name="state")
    def state(self) -> dict[str, Any]:
        return {
            "pending": len(self.pending),
            "requesters": sorted({item.requester for item in self.pending}),
            "closes_at": self.closes_at,
            "max_items": self.max_items,
            "batches_started": self.started,
            "seen": len(self.seen),
        }

    def _now(self) -> float:
        return workflow.now().timestamp()

    def _full(self) -> bool:
        return self.max_items is not None and len(self.pending) >= self.max_items

    @workflow.run
    async def run(self, request: BatcherInput) -> None:
        settings = request.settings
        while True:
            info = workflow.info()
            if (
                info.get_current_history_length() >= request.events_per_run
                or info.is_continue_as_new_suggested()
            ):
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(
                    BatcherInput(
                        settings=settings,
                        pending=self.pending,
                        seen=list(self.seen)[-_SEEN_KEPT:],
                        closes_at=self.closes_at,
                        max_items=self.max_items,
                        started=self.started,
                        events_per_run=request.events_per_run,
                        idle_s=request.idle_s,
                    )
                )
            self.changed = False
            if not self.pending:
                self.closes_at, self.max_items = None, None
                workflow.set_current_details(f"{settings.model}: idle · {self.started} batches started")
                try:
                    await workflow.wait_condition(
                        lambda: bool(self.pending),
                        timeout=timedelta(seconds=request.idle_s),
                        timeout_summary="idle",
                    )
                except TimeoutError:
                    # Nothing came for a while: end, so an idle batcher (and a tenant's data in it) does not
                    # linger; the next item starts a new one.
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    if not self.pending:
                        return
                continue
            wait = (self.closes_at or self._now()) - self._now()
            if not self._full() and wait > 0:
                workflow.set_current_details(
                    f"{settings.model}: {len(self.pending)} items from "
                    f"{len({i.requester for i in self.pending})} pipelines, window closes in {wait:.0f} s"
                )
                with contextlib.suppress(TimeoutError):
                    await workflow.wait_condition(
                        lambda: self.changed or self._full(),
                        timeout=timedelta(seconds=wait),
                        timeout_summary="batch window",
                    )
                continue
            size = self.max_items or len(self.pending)
            taken, self.pending = self.pending[:size], self.pending[size:]
            if not self.pending:
                self.closes_at, self.max_items = None, None
            self.started += 1
            # The chain's first run tells apart a batcher started again after being terminated: its
            # batches never take the tag (or the child id) of a batch the old one made.
            chain = info.first_execution_run_id[:12]
            await workflow.start_child_workflow(
                BatchRunWorkflow.run,
                BatchRunInput(
                    settings=settings, tag=batch_tag(info.workflow_id, chain, str(self.started)), items=taken
                ),
                id=f"{info.workflow_id}/{chain}-batch-{self.started}",
                parent_close_policy=ParentClosePolicy.ABANDON,
                static_summary=f"batch of {len(taken)} items for {settings.model}",
            )


@workflow.defn(name=BATCH_RUN_WORKFLOW)
class BatchRunWorkflow:
    """One provider batch of a batcher's window: submit, wait on durable timers, read, deliver."""

    @workflow.run
    async def run(self, request: BatchRunInput) -> dict[str, Any]:
        by_custom_id = {f"k{n}": item for n, item in enumerate(request.items)}
        try:
            return await self._answer(request, _Activities(request.settings), by_custom_id)
        except ActivityError as exc:
            # The batch cannot be made or read: every pipeline hears so and answers its items another
            # way (realtime, or the next batch round) instead of waiting for answers that never come.
            cause = exc.cause
            error_type = (cause.type if isinstance(cause, ApplicationError) else None) or "UpstreamError"
            message = cause.message if isinstance(cause, ApplicationError) else str(exc)
            retryable = not (isinstance(cause, ApplicationError) and cause.non_retryable)
            failed = [
                {
                    "custom_id": cid,
                    "outcome": "errored",
                    "error_type": error_type,
                    "error_message": f"shared batch: {message}",
                    "retryable": retryable,
                }
                for cid in by_custom_id
            ]
            await _deliver(by_custom_id, failed, "", "", [])
            return {"answered": False, "error": message, "items": len(by_custom_id)}

    async def _answer(
        self, request: BatchRunInput, call: _Activities, by_custom_id: dict[str, SharedItem]
    ) -> dict[str, Any]:
        settings = request.settings
        submitted = await call(
            BATCH_SUBMIT,
            {
                "model": settings.model,
                "tag": request.tag,
                "items": [{"custom_id": cid, "request": item.request} for cid, item in by_custom_id.items()],
            },
            f"submit {len(by_custom_id)} items to {settings.model}",
        )
        jobs = [BatchJob.model_validate(j) for j in submitted["jobs"]]
        ids = [job.id for job in jobs]
        delay = settings.poll_s
        while not all(job.ended for job in jobs):
            workflow.set_current_details(f"{settings.model}: waiting on {', '.join(ids)}")
            await workflow.sleep(timedelta(seconds=delay), summary="provider working")
            delay = min(delay * 2, settings.poll_max_s)
            status = await call(BATCH_STATUS, {"model": settings.model, "ids": ids}, "status")
            jobs = [BatchJob.model_validate(j) for j in status["jobs"]]
        results = await call(
            BATCH_RESULTS, {"model": settings.model, "ids": ids, "parts": submitted["parts"]}, "results"
        )
        raw_jobs = [job.model_dump(mode="json") for job in jobs]
        await _deliver(
            by_custom_id,
            results["results"],
            str(submitted["model_ref"]),
            str(submitted["provider"]),
            raw_jobs,
        )
        return {"answered": True, "batches": ids, "items": len(by_custom_id)}


async def _deliver(
    by_custom_id: dict[str, SharedItem],
    results: list[dict[str, Any]],
    model_ref: str,
    provider: str,
    jobs: list[dict[str, Any]],
) -> None:
    """Signal each pipeline its items' results under its own ids."""
    deliveries: dict[tuple[str, str], BatchDelivery] = {}
    for raw in results:
        item = by_custom_id.get(str(raw["custom_id"]))
        if item is None:
            continue
        delivery = deliveries.setdefault(
            (item.requester, item.ticket),
            BatchDelivery(ticket=item.ticket, model_ref=model_ref, provider=provider, jobs=jobs),
        )
        delivery.results.append({**raw, "custom_id": item.custom_id})
    for (requester, _), delivery in deliveries.items():
        try:
            await workflow.get_external_workflow_handle(requester).signal(BATCH_RESULTS_SIGNAL, delivery)
        except Exception as exc:  # the pipeline is gone (finished, cancelled, terminated): nobody waits
            workflow.logger.warning("batch results not delivered to %s: %s", requester, exc)


class _Activities:
    def __init__(self, settings: BatcherSettings) -> None:
        self.settings = settings

    async def __call__(self, name: str, payload: dict[str, Any], summary: str) -> dict[str, Any]:
        result: dict[str, Any] = await workflow.execute_activity(
            name,
            payload,
            result_type=dict,
            start_to_close_timeout=timedelta(seconds=self.settings.timeout_s),
            heartbeat_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1),
                maximum_interval=timedelta(seconds=60),
                maximum_attempts=self.settings.max_attempts,
            ),
            summary=summary,
        )
        return result

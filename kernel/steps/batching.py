"""``mode: batch`` on an ``llm`` step inside a ``map``: the items' calls go to the provider as one batch
(split by its limits), the pipeline waits on durable timers and polls with backoff, then each item's
answer or error is put back in its place.

Every item of the map runs its steps as usual; when one reaches an ``llm`` step in batch mode it hands
its request to the map's ``BatchCollector`` (giving back its ``concurrency`` slot) and waits. When every
item has either arrived at that step or finished without it, one of them submits the batch for all.
Items whose answer failed are classified like realtime calls: ``retry_failed: realtime`` (default) asks
them again in realtime with the step's fallbacks and retries; ``batch`` sends them in the next batch
round (retryable errors and expired items to the same model, others to the next fallback), up to
``max_rounds``, then realtime. An answer that does not match ``output_schema`` is re-asked in realtime,
where ``max_repairs`` applies. ``deadline_s``: when the batch is not done that long after submission it
is cancelled and the missing items run in realtime. Cancelling the pipeline cancels the provider batch.

With ``window_s`` the items of a round go instead to the batcher of (tenant, key, model)
(``workflows/batcher.py``), which gathers many pipelines' items into one provider batch and signals each
pipeline its answers; a lone step outside any map then batches as a map of one item.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import Field, model_validator

from kernel.batch import BatchItemReport, BatchJob, BatchReport, batch_tag
from kernel.contracts import ChatResponse
from kernel.errors import FailureType
from kernel.run import ModelFailure, StepState
from kernel.steps.base import RetrySpec, StepFailure, StepSpec, _Spec
from kernel.steps.context import EngineView, ModelCall

__all__ = [
    "BatchAnswer",
    "BatchCollector",
    "BatchEffects",
    "BatchOp",
    "BatchOptions",
    "BatchSlot",
    "SharedBatchEffects",
    "uses_batch",
]


class BatchOptions(_Spec):
    """How an ``llm`` step in batch mode waits and what happens to items the batch does not answer."""

    deadline_s: float | None = Field(
        default=None, gt=0, le=86400, description="Cancel and answer the rest in realtime after this long."
    )
    poll_s: float = Field(default=30.0, gt=0, le=3600, description="First wait before asking for status.")
    poll_max_s: float = Field(default=600.0, gt=0, le=86400, description="Longest wait between polls.")
    retry_failed: Literal["realtime", "batch"] = "realtime"
    max_rounds: int = Field(default=3, ge=1, le=10, description="Batch rounds before the rest go realtime.")
    timeout_s: float = Field(default=300.0, gt=0, le=3600, description="Per submit, status or results call.")
    window_s: float | None = Field(
        default=None,
        gt=0,
        le=86400,
        description="Gather this step's calls from every pipeline (of the tenant, for the same model and "
        "key) within this window into one provider batch, by the batcher workflow.",
    )
    max_items: int | None = Field(
        default=None, gt=0, le=50000, description="With window_s: submit as soon as this many items wait."
    )
    key: str = Field(
        default="default",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="With window_s: pipelines naming the same key share batches.",
    )

    @model_validator(mode="after")
    def _shared_options(self) -> BatchOptions:
        if self.window_s is None:
            given = ["max_items"] if self.max_items is not None else []
            given += ["key"] if self.key != "default" else []
            if given:
                verb = "go" if len(given) > 1 else "goes"
                raise ValueError(
                    f"{' and '.join(given)} {verb} with window_s (batches shared across pipelines)"
                )
        return self


@dataclass
class BatchOp:
    """One batch activity: ``op`` is submit, status, results or cancel; ``payload`` its JSON input."""

    op: Literal["submit", "status", "results", "cancel", "enqueue", "withdraw"]
    step_id: str
    payload: dict[str, Any]
    timeout_s: float
    retry: RetrySpec
    summary: str
    heartbeat_timeout_s: float | None = None


@runtime_checkable
class BatchEffects(Protocol):
    """Effects that can run batch activities (``workflows/engine/effects.py``)."""

    async def batch(self, op: BatchOp) -> dict[str, Any]: ...


@runtime_checkable
class SharedBatchEffects(Protocol):
    """Effects that can wait for a shared batcher's answers to a hand-over (``ticket``)."""

    def expect_batch(self, ticket: str) -> None:
        """Ready to take the answers of ``ticket`` (before handing its items over)."""

    async def batch_delivery(
        self, ticket: str, custom_ids: list[str], *, within: float | None, summary: str
    ) -> dict[str, Any]:
        """The answers delivered for ``ticket`` once every one of ``custom_ids`` has one, or those
        delivered when ``within`` seconds have passed: ``results``, ``jobs``, ``model_ref``, ``provider``."""
        ...


@dataclass
class BatchAnswer:
    """An answer that came through a batch, shaped like a realtime call's result."""

    response: ChatResponse
    model_ref: str
    provider: str
    cost_usd: float | None


@dataclass
class _Pending:
    index: int
    call: ModelCall
    options: BatchOptions
    models: list[str]
    model_index: int = 0
    error: str = ""
    """The last failure in a batch, ``Type: message``."""


@dataclass
class BatchCollector:
    """One per map run with batch-mode steps: gathers the items' calls per step and answers them."""

    engine: EngineView
    map_state: StepState
    label: str
    expected: int
    limit: asyncio.Semaphore
    finished: int = 0
    groups: dict[str, list[_Pending]] = field(default_factory=dict)
    outcomes: dict[tuple[str, int], tuple[Any, Any] | StepFailure] = field(default_factory=dict)
    flushing: set[str] = field(default_factory=set)

    @property
    def report(self) -> BatchReport:
        if self.map_state.batch is None:
            self.map_state.batch = BatchReport()
        return self.map_state.batch

    def item_done(self) -> None:
        self.finished += 1

    async def ask(self, index: int, call: ModelCall, options: BatchOptions) -> tuple[Any, Any]:
        """The answer of item ``index`` to ``call``, through the step's batch."""
        step_id = call.step_id
        group = self.groups.setdefault(step_id, [])
        group.append(_Pending(index, call, options, list(call.models)))
        key = (step_id, index)
        effects = self.engine.effects

        def ready() -> bool:
            return key in self.outcomes or (
                step_id not in self.flushing
                and len(self.groups.get(step_id, [])) + self.finished >= self.expected
            )

        self.limit.release()  # the provider does the work: the item's concurrency slot is free meanwhile
        try:
            await effects.wait(ready, timeout=None, summary=f"batch {step_id}: gathering items")
            if key not in self.outcomes and step_id not in self.flushing:
                # The first item to see every item gathered submits for all of them.
                self.flushing.add(step_id)
                pending = sorted(self.groups.pop(step_id, []), key=lambda p: p.index)
                await self._answer(step_id, pending)
            await effects.wait(lambda: key in self.outcomes, timeout=None, summary=f"batch {step_id}")
        finally:
            await self.limit.acquire()
        outcome = self.outcomes.pop(key)
        if isinstance(outcome, StepFailure):
            raise outcome
        return outcome

    # --- one step's batch, for every item that reached it ----------------------------------------

    async def _answer(self, step_id: str, pending: list[_Pending]) -> None:
        effects = self.engine.effects
        if not isinstance(effects, BatchEffects):
            failure = StepFailure(
                f"step {step_id!r}: these effects cannot run batches (mode: batch)",
                FailureType.PIPELINE_ERROR,
            )
            for item in pending:
                self.outcomes[(step_id, item.index)] = failure
            return
        options = pending[0].options
        realtime: list[_Pending] = []
        todo = pending
        started = effects_now(self.engine)
        for round_number in range(options.max_rounds):
            if not todo:
                break
            by_model: dict[str, list[_Pending]] = {}
            for item in todo:
                if item.model_index >= len(item.models):
                    # Not retryable on any of the step's models: the item fails as a realtime call would.
                    self.outcomes[(step_id, item.index)] = StepFailure(
                        f"{item.call.label} failed on every model in batch mode ({item.error})",
                        FailureType.STEP_FAILED,
                    )
                    continue
                planned = item.models[item.model_index]
                model = item.call.route(planned) if item.call.route else planned
                by_model.setdefault(model, []).append(item)
            todo = []
            for model, items in by_model.items():
                one = self._shared_batch if options.window_s is not None else self._one_batch
                retry, to_realtime = await one(effects, step_id, model, items, options, round_number, started)
                todo.extend(retry)
                realtime.extend(to_realtime)
        realtime.extend(todo)
        if realtime:
            await asyncio.gather(*(self._realtime(step_id, item) for item in realtime))

    async def _one_batch(
        self,
        effects: BatchEffects,
        step_id: str,
        model: str,
        items: list[_Pending],
        options: BatchOptions,
        round_number: int,
        started: float,
    ) -> tuple[list[_Pending], list[_Pending]]:
        """Submit ``items`` to ``model`` as a batch, wait, read the results; answered items get their
        outcome. Returns (items for the next batch round, items for realtime)."""
        call = items[0].call
        op = _Ops(effects, step_id, call.retry, options.timeout_s, call.heartbeat_timeout_s)
        tag = batch_tag(self.engine.info.workflow_id, self.label, step_id, str(round_number), model)
        submitted = await op(
            "submit",
            {
                "model": model,
                "tag": tag,
                "items": [
                    {
                        "custom_id": f"i{item.index}",
                        "request": item.call.request.model_dump(mode="json", exclude_none=True),
                    }
                    for item in items
                ],
            },
            f"batch {step_id}: submit {len(items)} items to {model}",
        )
        jobs = [BatchJob.model_validate(j) for j in submitted["jobs"]]
        parts: list[list[str]] = submitted["parts"]
        model_ref, provider = str(submitted["model_ref"]), str(submitted["provider"])
        for job in jobs:
            self.report.note(job)
        self.engine.note_provider(provider)
        ids = [job.id for job in jobs]
        deadline = None if options.deadline_s is None else started + options.deadline_s
        delay = options.poll_s
        try:
            while not all(job.ended for job in jobs):
                now = effects_now(self.engine)
                if deadline is not None and now >= deadline:
                    cancelled = await op("cancel", {"model": model, "ids": ids}, f"batch {step_id}: deadline")
                    jobs = [BatchJob.model_validate(j) for j in cancelled["jobs"]]
                    break
                wait = delay if deadline is None else max(0.001, min(delay, deadline - now))
                self.map_state.detail = f"batch {step_id}: waiting on {len(ids)} {provider} batch(es)"
                await self.engine.effects.sleep(wait, summary=f"batch {step_id}: provider working")
                delay = min(delay * 2, options.poll_max_s)
                status = await op("status", {"model": model, "ids": ids}, f"batch {step_id}: status")
                jobs = [BatchJob.model_validate(j) for j in status["jobs"]]
        except asyncio.CancelledError:
            # The map cancels its items more than once: the cancellation of the provider batch runs
            # as a task of its own, awaited to the end.
            cleanup = asyncio.ensure_future(
                op("cancel", {"model": model, "ids": ids}, f"batch {step_id}: pipeline cancelled")
            )
            while not cleanup.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(cleanup)
            raise
        for job in jobs:
            self.report.note(job)
        results = await op(
            "results", {"model": model, "ids": ids, "parts": parts}, f"batch {step_id}: results"
        )
        missed_deadline = deadline is not None and effects_now(self.engine) >= deadline
        return self._take(step_id, items, results["results"], model_ref, provider, options, missed_deadline)

    async def _shared_batch(
        self,
        effects: BatchEffects,
        step_id: str,
        model: str,
        items: list[_Pending],
        options: BatchOptions,
        round_number: int,
        started: float,
    ) -> tuple[list[_Pending], list[_Pending]]:
        """Hand ``items`` to the batcher of (tenant, key, model), which gathers other pipelines' items
        of the window into one provider batch, then wait (durably) for it to signal their answers."""
        if not isinstance(effects, SharedBatchEffects):
            raise StepFailure(
                f"step {step_id!r}: these effects cannot share batches (batch.window_s)",
                FailureType.PIPELINE_ERROR,
            )
        call = items[0].call
        op = _Ops(effects, step_id, call.retry, options.timeout_s, call.heartbeat_timeout_s)
        info = self.engine.info
        # The time of the round tells apart two runs of the same step (a loop) in one pipeline.
        ticket = batch_tag(info.workflow_id, self.label, step_id, str(round_number), model, str(started))
        settings = {
            "model": model,
            "key": options.key,
            "tenant": info.tenant or "",
            "poll_s": options.poll_s,
            "poll_max_s": options.poll_max_s,
            "timeout_s": options.timeout_s,
            "max_attempts": call.retry.max_attempts or 10,
        }
        effects.expect_batch(ticket)
        added = await op(
            "enqueue",
            {
                "settings": settings,
                "ticket": ticket,
                "requester": info.workflow_id,
                "window_s": options.window_s,
                "max_items": options.max_items or 50_000,
                "items": [
                    {
                        "custom_id": f"i{item.index}",
                        "request": item.call.request.model_dump(mode="json", exclude_none=True),
                    }
                    for item in items
                ],
            },
            f"batch {step_id}: {len(items)} items to the {model} batcher",
        )
        self.map_state.detail = f"batch {step_id}: {len(items)} items with the batcher {added.get('batcher')}"
        deadline = None if options.deadline_s is None else started + options.deadline_s
        timeout = None if deadline is None else max(0.001, deadline - effects_now(self.engine))
        custom_ids = [f"i{item.index}" for item in items]
        try:
            delivered = await effects.batch_delivery(
                ticket, custom_ids, within=timeout, summary=f"batch {step_id}: shared batch"
            )
        except asyncio.CancelledError:
            # Items still in the window are taken back; a provider batch already made is shared, and runs on.
            cleanup = asyncio.ensure_future(_withdraw(op, settings, ticket, f"batch {step_id}: cancelled"))
            while not cleanup.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(cleanup)
            raise
        for raw_job in delivered["jobs"]:
            self.report.note(BatchJob.model_validate(raw_job))
        results = list(delivered["results"])
        missed_deadline = len(results) < len(items)
        if missed_deadline:
            await _withdraw(op, settings, ticket, f"batch {step_id}: deadline")
            answered = {str(r["custom_id"]) for r in results}
            results += [{"custom_id": cid, "outcome": "expired"} for cid in custom_ids if cid not in answered]
        provider = str(delivered.get("provider") or "")
        if provider:
            self.engine.note_provider(provider)
        model_ref = str(delivered.get("model_ref") or model)
        return self._take(step_id, items, results, model_ref, provider, options, missed_deadline)

    def _take(
        self,
        step_id: str,
        items: list[_Pending],
        results: list[dict[str, Any]],
        model_ref: str,
        provider: str,
        options: BatchOptions,
        missed_deadline: bool,
    ) -> tuple[list[_Pending], list[_Pending]]:
        """Each item's batch result: its outcome set, or the item returned for the next batch round or
        for realtime."""
        by_index = {item.index: item for item in items}
        next_round: list[_Pending] = []
        realtime: list[_Pending] = []
        for raw in results:
            item = by_index[int(str(raw["custom_id"])[1:])]
            outcome = str(raw["outcome"])
            if outcome == "succeeded":
                answer = BatchAnswer(
                    ChatResponse.model_validate(raw["response"]), model_ref, provider, raw.get("cost_usd")
                )
                report = BatchItemReport(
                    index=item.index,
                    step_id=step_id,
                    model=model_ref,
                    outcome="succeeded",
                    usage=answer.response.usage,
                    cost_usd=answer.cost_usd,
                    realtime_cost_usd=raw.get("realtime_cost_usd"),
                )
                try:
                    output = item.call.validate(answer) if item.call.validate else answer.response.text
                except ValueError:
                    report.outcome = "invalid"
                    self.report.add(report)
                    realtime.append(item)  # re-asked in realtime, where max_repairs applies
                    continue
                self.report.add(report)
                self.outcomes[(step_id, item.index)] = (answer, output)
                continue
            retryable = bool(raw.get("retryable")) or outcome in ("expired", "cancelled")
            item.error = (
                f"{model_ref}: {raw.get('error_type') or outcome}: {raw.get('error_message') or outcome}"
            )
            if item.call.on_failure is not None and outcome == "errored":
                item.call.on_failure(
                    ModelFailure(
                        model=model_ref,
                        error_type=str(raw.get("error_type") or "UpstreamError"),
                        message=f"in batch: {raw.get('error_message') or outcome}",
                    )
                )
            if options.retry_failed == "realtime" or missed_deadline:
                realtime.append(item)
            else:
                if not retryable:
                    item.model_index += 1
                next_round.append(item)
        return next_round, realtime

    async def _realtime(self, step_id: str, item: _Pending) -> None:
        models = item.models[item.model_index :] or item.models[-1:]
        call = replace(item.call, models=models)
        try:
            result, output = await self.engine.effects.call_model(call)
        except StepFailure as exc:
            self.outcomes[(step_id, item.index)] = exc
            return
        self.report.add(
            BatchItemReport(
                index=item.index,
                step_id=step_id,
                model=result.model_ref,
                via="realtime",
                outcome="succeeded",
                usage=result.response.usage,
                cost_usd=result.cost_usd,
                realtime_cost_usd=result.cost_usd,
            )
        )
        self.outcomes[(step_id, item.index)] = (result, output)


@dataclass
class BatchSlot:
    """What an item's scope carries: its map's collector and the item's position."""

    collector: BatchCollector
    index: int


@dataclass
class _Ops:
    effects: BatchEffects
    step_id: str
    retry: RetrySpec
    timeout_s: float
    heartbeat_timeout_s: float | None

    async def __call__(
        self,
        op: Literal["submit", "status", "results", "cancel", "enqueue", "withdraw"],
        payload: dict[str, Any],
        summary: str,
    ) -> dict[str, Any]:
        return await self.effects.batch(
            BatchOp(op, self.step_id, payload, self.timeout_s, self.retry, summary)
        )


async def _withdraw(op: _Ops, settings: dict[str, Any], ticket: str, summary: str) -> None:
    """Take a hand-over's items back from the batcher's window. Best effort: the items run in realtime
    (or the pipeline stops) either way, and the batcher's answers then reach no one waiting."""
    with contextlib.suppress(StepFailure):
        await op("withdraw", {"settings": settings, "ticket": ticket}, summary)


def effects_now(engine: EngineView) -> float:
    return engine.effects.now().timestamp()


def uses_batch(steps: list[StepSpec], is_batch: Callable[[StepSpec], bool]) -> bool:
    """Whether any of ``steps`` (not looking into nested maps, which batch on their own) is in batch mode."""
    for step in steps:
        if is_batch(step):
            return True
        if not step.scope_boundary and any(uses_batch(children, is_batch) for _, children in step.children()):
            return True
    return False

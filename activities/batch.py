"""The batch activities: submit a provider batch (split by the provider's limits, each part under its
own deterministic tag, found again rather than created twice), read the batches' state, read their
per-item results priced at the batch price, cancel them.

Each is short: the pipeline waits between them on durable timers, holding no worker slot while the
provider works. Payloads are JSON dicts (``kernel.steps.batching`` builds and reads them).
"""

from __future__ import annotations

import itertools
from typing import Any

import structlog
from pydantic import BaseModel, Field
from temporalio import activity

from activities.errors import to_application_error
from activities.live import LiveProviders, heartbeating
from kernel.batch import BatchCounts, BatchItem, BatchItemResult, BatchJob, batch_tag, split_batch
from kernel.errors import KernelflowError
from kernel.provider import Provider

__all__ = [
    "BATCH_CANCEL",
    "BATCH_RESULTS",
    "BATCH_STATUS",
    "BATCH_SUBMIT",
    "BatchActivities",
    "PricedResult",
]

BATCH_SUBMIT = "llm_batch_submit"
BATCH_STATUS = "llm_batch_status"
BATCH_RESULTS = "llm_batch_results"
BATCH_CANCEL = "llm_batch_cancel"
"""The activities' names: public API, never renamed."""

_log = structlog.get_logger("kernelflow.activity")
_UNSUBMITTED = "unsubmitted:"
"""The id of a part held back because it has fewer requests than the provider's minimum per batch: no
provider call is made for it, its items come back ``expired`` (so they are answered in realtime)."""


def _unsubmitted(provider: Provider, batch_id: str, count: int = 0, minimum: int = 0) -> BatchJob:
    why = f": {count} requests, fewer than its minimum of {minimum} per batch" if count else ""
    return BatchJob(
        id=batch_id,
        provider=provider.name,
        tag=batch_id.removeprefix(_UNSUBMITTED),
        state="expired",
        vendor_state=f"not submitted to {provider.name}{why}",
        counts=BatchCounts(total=count),
    )


class PricedResult(BatchItemResult):
    cost_usd: float | None = Field(default=None, description="At the provider's batch price.")
    realtime_cost_usd: float | None = Field(default=None, description="What a realtime call would cost.")


class _Resolved(BaseModel):
    provider: str
    model_ref: str


class BatchActivities:
    """Bound methods are the activities; they read the worker's live registry and prices."""

    def __init__(self, live: LiveProviders) -> None:
        self.live = live

    def all(self) -> list[Any]:
        return [self.submit, self.status, self.results, self.cancel]

    def _resolve(self, model: str) -> tuple[Provider, str]:
        return self.live.registry.resolve(model)

    async def _run(self, what: str, payload: dict[str, Any], work: Any) -> dict[str, Any]:
        try:
            result: dict[str, Any] = await heartbeating(work(payload))
            return result
        except KernelflowError as exc:
            _log.warning(f"batch {what} failed", error_type=type(exc).__name__, error=str(exc))
            raise to_application_error(exc) from exc

    @activity.defn(name=BATCH_SUBMIT)
    async def submit(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._run("submit", payload, self._submit)

    async def _submit(self, payload: dict[str, Any]) -> dict[str, Any]:
        provider, model_name = self._resolve(str(payload["model"]))
        items = [
            BatchItem(
                custom_id=raw["custom_id"],
                request=provider.prepare_chat(
                    BatchItem.model_validate(raw).request.model_copy(update={"model": model_name})
                ).request,
            )
            for raw in payload["items"]
        ]
        provider.check_batch(items[:1])  # the capability, before splitting
        assert provider.batch_limits is not None
        parts = split_batch(items, provider.batch_limits, provider.batch_item_size)
        jobs: list[BatchJob] = []
        minimum = provider.batch_min_requests()
        for number, part in enumerate(parts):
            tag = batch_tag(str(payload["tag"]), str(number))
            if len(part) < minimum:
                jobs.append(_unsubmitted(provider, _UNSUBMITTED + tag, len(part), minimum))
                continue
            jobs.append(await provider.batch_submit(tag, part))
        _log.info("batch submitted", provider=provider.name, batches=[j.id for j in jobs], items=len(items))
        return {
            "jobs": [j.model_dump(mode="json") for j in jobs],
            "parts": [[i.custom_id for i in part] for part in parts],
            "provider": provider.name,
            "model_ref": f"{provider.name}/{model_name}",
        }

    @activity.defn(name=BATCH_STATUS)
    async def status(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._run("status", payload, self._status)

    async def _status(self, payload: dict[str, Any]) -> dict[str, Any]:
        provider, _ = self._resolve(str(payload["model"]))
        jobs = [
            _unsubmitted(provider, str(batch_id))
            if str(batch_id).startswith(_UNSUBMITTED)
            else await provider.batch_status(str(batch_id))
            for batch_id in payload["ids"]
        ]
        return {"jobs": [j.model_dump(mode="json") for j in jobs]}

    @activity.defn(name=BATCH_RESULTS)
    async def results(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._run("results", payload, self._results)

    async def _results(self, payload: dict[str, Any]) -> dict[str, Any]:
        provider, model_name = self._resolve(str(payload["model"]))
        prices = self.live.prices
        out: list[dict[str, Any]] = []
        for batch_id, custom_ids in zip(payload["ids"], payload["parts"], strict=True):
            if str(batch_id).startswith(_UNSUBMITTED):
                held = _unsubmitted(provider, str(batch_id)).vendor_state
                for custom_id in custom_ids:
                    expired = BatchItemResult(custom_id=str(custom_id), outcome="expired", error_message=held)
                    out.append(expired.model_dump(mode="json", exclude_none=True))
                continue
            for result in await provider.batch_results(str(batch_id), list(custom_ids), model_name):
                priced = PricedResult.model_validate(result.model_dump())
                if result.response is not None:
                    usage = result.response.usage
                    priced.cost_usd = prices.batch_cost(provider.name, model_name, usage)
                    priced.realtime_cost_usd = prices.cost(provider.name, model_name, usage)
                out.append(priced.model_dump(mode="json", exclude_none=True))
        return {"results": out}

    @activity.defn(name=BATCH_CANCEL)
    async def cancel(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._run("cancel", payload, self._cancel)

    async def _cancel(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Cancel the batches ``ids`` names, and with ``tag`` those a submission under that tag made
        (its parts are numbered from 0, submitted in order)."""
        provider, _ = self._resolve(str(payload["model"]))
        ids = [str(batch_id) for batch_id in payload["ids"]]
        if payload.get("tag"):
            for number in itertools.count():
                found = await provider.batch_find(batch_tag(str(payload["tag"]), str(number)))
                if found is None:
                    break
                ids.append(found.id)
        jobs: list[BatchJob] = []
        for batch_id in ids:
            if batch_id.startswith(_UNSUBMITTED):
                jobs.append(_unsubmitted(provider, batch_id))
                continue
            job = await provider.batch_status(str(batch_id))
            jobs.append(job if job.ended else await provider.batch_cancel(str(batch_id)))
        return {"jobs": [j.model_dump(mode="json") for j in jobs]}

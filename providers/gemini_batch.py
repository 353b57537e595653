"""Gemini's batch mode with inline requests for the Gemini provider
(https://ai.google.dev/gemini-api/docs/batch-mode).

A batch is a long-running operation made by ``models/{model}:batchGenerateContent`` with the kernel's
tag as its display name, found again by listing batches. Each request carries its ``custom_id`` as
``metadata.key``; once done, the operation's ``response.inlinedResponses.inlinedResponses`` holds each
answer or error, classified like a realtime call's.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from kernel.batch import BatchCounts, BatchItem, BatchItemResult, BatchJob, BatchLimits, BatchState
from kernel.errors import MalformedResponse, ProviderError
from providers._batch import get_json, reading_batch_job
from providers._http import WireShapeError, as_list, as_object

if TYPE_CHECKING:
    from providers.gemini import GeminiProvider

__all__ = ["LIMITS", "batch_cancel", "batch_create", "batch_find", "batch_results", "batch_status", "payload"]

LIMITS = BatchLimits(max_requests=100_000, max_bytes=20 * 1024 * 1024)
"""Inline requests: at most 20 MB per batch (https://ai.google.dev/gemini-api/docs/batch-mode); larger
inputs need an uploaded file, which this provider does not use. The count bound is this provider's."""
_FIND_PAGES = 10
_STATES: dict[str, BatchState] = {
    "BATCH_STATE_PENDING": "in_progress",
    "BATCH_STATE_RUNNING": "in_progress",
    "BATCH_STATE_SUCCEEDED": "completed",
    "BATCH_STATE_FAILED": "failed",
    "BATCH_STATE_CANCELLED": "cancelled",
    "BATCH_STATE_EXPIRED": "expired",
}


def payload(provider: GeminiProvider, tag: str, items: list[BatchItem]) -> dict[str, Any]:
    requests = [
        {"request": provider._map_request(item.request), "metadata": {"key": item.custom_id}}
        for item in items
    ]
    return {"batch": {"display_name": tag, "input_config": {"requests": {"requests": requests}}}}


def _job(provider: GeminiProvider, data: Any) -> BatchJob:
    with reading_batch_job(provider.name):
        operation = as_object(data, "the batch operation")
        metadata = as_object(operation.get("metadata"), "metadata")
        state = str(metadata["state"])
        stats = as_object(metadata.get("batchStats"), "batchStats", optional=True)
        return BatchJob(
            id=str(operation.get("name") or metadata["name"]).removeprefix("batches/"),
            provider=provider.name,
            tag=str(metadata.get("displayName") or ""),
            state=_STATES[state],
            vendor_state=state,
            counts=BatchCounts(
                total=int(stats.get("requestCount") or 0),
                completed=int(stats.get("successfulRequestCount") or 0),
                failed=int(stats.get("failedRequestCount") or 0),
            ),
        )


async def batch_find(provider: GeminiProvider, tag: str) -> BatchJob | None:
    token = ""
    for _ in range(_FIND_PAGES):
        query = f"/{provider.api_version}/batches?pageSize=100{f'&pageToken={token}' if token else ''}"
        page = as_object(await get_json(provider, query), "the batch list")
        for raw in as_list(page.get("operations"), "operations", optional=True):
            metadata = as_object(as_object(raw, "a batch").get("metadata"), "metadata", optional=True)
            if metadata.get("displayName") == tag:
                return _job(provider, raw)
        token = str(page.get("nextPageToken") or "")
        if not token:
            return None
    return None


async def batch_create(provider: GeminiProvider, tag: str, items: list[BatchItem]) -> BatchJob:
    model = items[0].request.model
    path = provider._model_path(model, "batchGenerateContent")
    return _job(provider, await provider._post_json(path, payload(provider, tag, items), model=model))


async def batch_status(provider: GeminiProvider, batch_id: str) -> BatchJob:
    return _job(provider, await get_json(provider, f"/{provider.api_version}/batches/{batch_id}"))


async def batch_cancel(provider: GeminiProvider, batch_id: str) -> BatchJob:
    await provider._post_json(f"/{provider.api_version}/batches/{batch_id}:cancel", {}, model=None)
    return await batch_status(provider, batch_id)


async def batch_results(
    provider: GeminiProvider, batch_id: str, custom_ids: list[str], model: str
) -> list[BatchItemResult]:
    operation = as_object(
        await get_json(provider, f"/{provider.api_version}/batches/{batch_id}"), "the batch"
    )
    job = _job(provider, operation)
    try:
        response = as_object(operation.get("response"), "response", optional=True)
        inlined = as_object(response.get("inlinedResponses"), "inlinedResponses", optional=True)
        entries = as_list(inlined.get("inlinedResponses"), "inlinedResponses", optional=True)
        by_key = {
            str(as_object(e.get("metadata"), "metadata", optional=True).get("key")): e
            for e in (as_object(x, "an inlined response") for x in entries)
        }
    except WireShapeError as exc:
        raise MalformedResponse(
            f"{provider.name} sent malformed batch results: {exc}", provider=provider.name
        ) from exc
    missing = "cancelled" if job.state in ("cancelled", "cancelling") else "expired"
    results: list[BatchItemResult] = []
    for custom_id in custom_ids:
        entry = by_key.get(custom_id)
        if entry is None:
            results.append(BatchItemResult(custom_id=custom_id, outcome=missing))
        elif isinstance(entry.get("error"), dict):
            error = entry["error"]
            failure = provider._classify(
                int(error.get("code") or 500), {"error": error}, json.dumps(error), model
            )
            results.append(BatchItemResult.failed(custom_id, failure))
        else:
            try:
                answer = provider._parse_response(entry.get("response"), model)
            except ProviderError as exc:
                results.append(BatchItemResult.failed(custom_id, exc))
                continue
            results.append(BatchItemResult(custom_id=custom_id, outcome="succeeded", response=answer))
    return results

"""OpenAI's Batch API for the OpenAI provider (https://platform.openai.com/docs/api-reference/batch).

The items go up as one JSONL file (``purpose=batch``) of ``/v1/chat/completions`` requests, mapped
exactly as a realtime call's; the batch is created with the kernel's tag in its ``metadata`` and found
again by listing batches. Answers come back in the output file, failures and expired or cancelled items
in the error file, each line keyed by ``custom_id``; a failed item's status and error body are classified
like a realtime call's.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from kernel.batch import BatchCounts, BatchItem, BatchItemResult, BatchJob, BatchLimits, BatchState
from kernel.errors import MalformedResponse, ProviderError, error_from_status
from providers._batch import get_json, reading_batch_job
from providers._http import WireShapeError, as_list, as_object

if TYPE_CHECKING:
    from providers.openai import OpenAIProvider

__all__ = [
    "LIMITS",
    "TAG_KEY",
    "batch_cancel",
    "batch_create",
    "batch_find",
    "batch_results",
    "batch_status",
    "item_line",
]

TAG_KEY = "kernelflow_tag"
LIMITS = BatchLimits(max_requests=50_000, max_bytes=200 * 1024 * 1024)
"""https://platform.openai.com/docs/guides/batch: up to 50,000 requests and 200 MB per input file."""
CHAT_URL = "/v1/chat/completions"
_FIND_PAGES = 10
"""How many pages of 100 recent batches the tag is looked for in."""
_STATES: dict[str, BatchState] = {
    "validating": "in_progress",
    "in_progress": "in_progress",
    "finalizing": "in_progress",
    "completed": "completed",
    "expired": "expired",
    "cancelling": "cancelling",
    "cancelled": "cancelled",
    "failed": "failed",
}


def item_line(provider: OpenAIProvider, item: BatchItem) -> dict[str, Any]:
    return {
        "custom_id": item.custom_id,
        "method": "POST",
        "url": CHAT_URL,
        "body": provider._map_request(item.request, stream=False),
    }


def _job(provider: OpenAIProvider, data: Any) -> BatchJob:
    with reading_batch_job(provider.name):
        body = as_object(data, "the batch")
        status = str(body["status"])
        counts = as_object(body.get("request_counts"), "request_counts", optional=True)
        metadata = as_object(body.get("metadata"), "metadata", optional=True)
        return BatchJob(
            id=str(body["id"]),
            provider=provider.name,
            tag=str(metadata.get(TAG_KEY) or ""),
            state=_STATES[status],
            vendor_state=status,
            counts=BatchCounts(
                total=int(counts.get("total") or 0),
                completed=int(counts.get("completed") or 0),
                failed=int(counts.get("failed") or 0),
            ),
            created_at=int(body.get("created_at") or 0),
            expires_at=body.get("expires_at"),
        )


async def batch_find(provider: OpenAIProvider, tag: str) -> BatchJob | None:
    after: str | None = None
    for _ in range(_FIND_PAGES):
        query = f"/batches?limit=100{f'&after={after}' if after else ''}"
        page = as_object(await get_json(provider, query), "the batch list")
        data = as_list(page.get("data"), "data", optional=True)
        for raw in data:
            if (
                isinstance(raw, dict)
                and as_object(raw.get("metadata"), "metadata", optional=True).get(TAG_KEY) == tag
            ):
                return _job(provider, raw)
        if not page.get("has_more") or not data:
            return None
        after = str(data[-1].get("id"))
    return None


async def batch_create(provider: OpenAIProvider, tag: str, items: list[BatchItem]) -> BatchJob:
    content = "".join(json.dumps(item_line(provider, item), separators=(",", ":")) + "\n" for item in items)
    upload = provider.client.build_request(
        "POST",
        provider._url("/files"),
        headers=provider._auth_headers(),
        data={"purpose": "batch"},
        files={"file": (f"{tag}.jsonl", content.encode(), "application/jsonl")},
    )
    file = as_object(provider._json_body(await provider._send(upload, model=None), None), "the file")
    payload = {
        "input_file_id": file.get("id"),
        "endpoint": CHAT_URL,
        "completion_window": "24h",
        "metadata": {TAG_KEY: tag},
    }
    return _job(provider, await provider._post_json("/batches", payload, model=None))


async def batch_status(provider: OpenAIProvider, batch_id: str) -> BatchJob:
    return _job(provider, await get_json(provider, f"/batches/{batch_id}"))


async def batch_cancel(provider: OpenAIProvider, batch_id: str) -> BatchJob:
    return _job(provider, await provider._post_json(f"/batches/{batch_id}/cancel", {}, model=None))


async def _lines(provider: OpenAIProvider, file_id: Any) -> list[dict[str, Any]]:
    if not file_id:
        return []
    request = provider.client.build_request(
        "GET", provider._url(f"/files/{file_id}/content"), headers=provider._auth_headers()
    )
    response = await provider._send(request, model=None)
    try:
        return [
            as_object(json.loads(line), "a result line")
            for line in response.text.splitlines()
            if line.strip()
        ]
    except (ValueError, WireShapeError) as exc:
        raise MalformedResponse(
            f"{provider.name} sent a batch result file that is not JSONL: {exc}", provider=provider.name
        ) from exc


async def batch_results(
    provider: OpenAIProvider, batch_id: str, custom_ids: list[str], model: str
) -> list[BatchItemResult]:
    batch = as_object(await get_json(provider, f"/batches/{batch_id}"), "the batch")
    state = _STATES.get(str(batch.get("status")), "in_progress")
    lines = await _lines(provider, batch.get("output_file_id")) + await _lines(
        provider, batch.get("error_file_id")
    )
    by_id = {str(line.get("custom_id")): line for line in lines}
    missing = "cancelled" if state in ("cancelled", "cancelling") else "expired"
    results: list[BatchItemResult] = []
    for custom_id in custom_ids:
        line = by_id.get(custom_id)
        if line is None:
            results.append(BatchItemResult(custom_id=custom_id, outcome=missing))
            continue
        results.append(_result(provider, custom_id, model, line))
    return results


def _result(provider: OpenAIProvider, custom_id: str, model: str, line: dict[str, Any]) -> BatchItemResult:
    response = line.get("response")
    if not isinstance(response, dict):
        error = as_object(line.get("error"), "error", optional=True)
        code = str(error.get("code") or "")
        if code in ("batch_expired", "batch_cancelled"):
            outcome = "expired" if code == "batch_expired" else "cancelled"
            return BatchItemResult(custom_id=custom_id, outcome=outcome, error_message=error.get("message"))
        failure: ProviderError = error_from_status(
            500,
            str(error.get("message") or "the item failed"),
            provider=provider.name,
            model=model,
            code=code,
        )
        return BatchItemResult.failed(custom_id, failure)
    status = int(response.get("status_code") or 0)
    body = response.get("body")
    if status >= 400 or status == 0:
        message, vendor_code = provider._error_details(body, json.dumps(body))
        return BatchItemResult.failed(
            custom_id,
            error_from_status(status or 500, message, provider=provider.name, model=model, code=vendor_code),
        )
    try:
        answer = provider._parse_response(body, model)
    except ProviderError as exc:
        return BatchItemResult.failed(custom_id, exc)
    return BatchItemResult(custom_id=custom_id, outcome="succeeded", response=answer)

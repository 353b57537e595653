"""Gemini's batch mode with inline requests (https://ai.google.dev/gemini-api/docs/batch-mode):
`POST /v1beta/models/{model}:batchGenerateContent` (reached through the Gemini wire's model route),
`GET /v1beta/batches`, `GET /v1beta/batches/{id}`, `POST /v1beta/batches/{id}:cancel`.

Batches are long-running operations whose metadata carries the state (`BATCH_STATE_*`), the display
name and the counts; once done, `response.inlinedResponses.inlinedResponses` holds one entry per
request, in order, with its `metadata` and either a `response` or an `error`.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from simulator.app import run_offline
from simulator.batches import SimBatch
from simulator.core import Simulator
from simulator.gemini_wire import GeminiWire

__all__ = ["create", "routes"]

_STATES = {
    "in_progress": "BATCH_STATE_RUNNING",
    "completed": "BATCH_STATE_SUCCEEDED",
    "expired": "BATCH_STATE_EXPIRED",
    "cancelled": "BATCH_STATE_CANCELLED",
}
_BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
_OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"


def _error(code: int, status: str, message: str) -> Response:
    return JSONResponse({"error": {"code": code, "message": message, "status": status}}, status_code=code)


def _item_request(model: str) -> Request:
    """The request an item would have come in as, for the Gemini wire's parser (it reads the path)."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": f"/v1beta/models/{model}:generateContent",
        "path_params": {"target": f"{model}:generateContent"},
        "headers": [],
        "query_string": b"",
    }
    return Request(scope)


async def create(request: Request, sim: Simulator, wire: GeminiWire, model: str) -> Response:
    try:
        payload = json.loads(await request.body())
    except ValueError:
        return _error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
    batch = payload.get("batch") if isinstance(payload, dict) else None
    config = batch.get("input_config") or batch.get("inputConfig") if isinstance(batch, dict) else None
    requests = (config or {}).get("requests", {}).get("requests") if isinstance(config, dict) else None
    if not isinstance(batch, dict) or not isinstance(requests, list) or not requests:
        return _error(400, "INVALID_ARGUMENT", "batch.input_config.requests.requests is required.")
    items: list[tuple[str, Any]] = []
    for index, entry in enumerate(requests):
        if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
            return _error(400, "INVALID_ARGUMENT", f"requests[{index}].request is required.")
        key = str((entry.get("metadata") or {}).get("key") or index)
        items.append((key, entry["request"]))
    display = str(batch.get("display_name") or batch.get("displayName") or "")
    made = sim.batches.create("gemini", items, {"display_name": display}, prefix="", extra={"model": model})
    return JSONResponse(_operation(sim, wire, made))


def _operation(sim: Simulator, wire: GeminiWire, batch: SimBatch) -> dict[str, Any]:
    model = str(batch.extra["model"])

    def run(body: Any) -> tuple[int, Any]:
        return run_offline(sim, wire, wire.parse_generate, wire.generate_reply, body, _item_request(model))

    outcomes = sim.batches.settle(batch, run)
    state = batch.state()
    counts = batch.counts()
    name = f"batches/{batch.id}"
    metadata: dict[str, Any] = {
        "@type": _BATCH_TYPE,
        "name": name,
        "model": f"models/{model}",
        "displayName": batch.metadata.get("display_name", ""),
        "createTime": _time(batch.created_at),
        "updateTime": _time(batch.ended_at or batch.created_at),
        "state": _STATES[state],
        "batchStats": {
            "requestCount": str(counts["total"]),
            "successfulRequestCount": str(counts["succeeded"]),
            "failedRequestCount": str(counts["errored"]),
            "pendingRequestCount": str(counts["processing"]),
        },
    }
    operation: dict[str, Any] = {"name": name, "metadata": metadata, "done": outcomes is not None}
    if outcomes is not None:
        answers: list[dict[str, Any]] = []
        for outcome in outcomes:
            if outcome.kind not in ("succeeded", "errored"):
                continue  # expired and cancelled requests have no entry
            entry: dict[str, Any] = {"metadata": {"key": outcome.custom_id}}
            if outcome.kind == "succeeded":
                entry["response"] = outcome.body
            else:
                entry["error"] = (outcome.body or {}).get("error") or {
                    "code": outcome.status,
                    "message": "failed",
                }
            answers.append(entry)
        operation["response"] = {"@type": _OUTPUT_TYPE, "inlinedResponses": {"inlinedResponses": answers}}
    return operation


def _time(seconds: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def routes(sim: Simulator) -> list[BaseRoute]:
    wire = GeminiWire()

    def find(request: Request) -> SimBatch | None:
        return sim.batches.get(str(request.path_params["batch_id"]), "gemini")

    async def retrieve(request: Request) -> Response:
        refused = wire.key_error(request)
        if refused is not None:
            return JSONResponse(refused.body, status_code=refused.status)
        target = str(request.path_params["batch_id"])
        if request.method == "POST":
            batch_id, _, method = target.partition(":")
            batch = sim.batches.get(batch_id, "gemini")
            if method != "cancel" or batch is None:
                return _error(404, "NOT_FOUND", f"Batch {target} not found.")
            if batch.state() == "in_progress":
                sim.batches.cancel(batch)
            return JSONResponse({})
        batch = find(request)
        if batch is None:
            return _error(404, "NOT_FOUND", f"Batch {target} not found.")
        return JSONResponse(_operation(sim, wire, batch))

    async def listing(request: Request) -> Response:
        refused = wire.key_error(request)
        if refused is not None:
            return JSONResponse(refused.body, status_code=refused.status)
        size = int(request.query_params.get("pageSize", "50"))
        start = int(request.query_params.get("pageToken") or 0)
        batches = sim.batches.listing("gemini")
        page = batches[start : start + size]
        body: dict[str, Any] = {"operations": [_operation(sim, wire, b) for b in page]}
        if start + size < len(batches):
            body["nextPageToken"] = str(start + size)
        return JSONResponse(body)

    # v1beta only: Gemini's batch API lives there, and OpenAI's wire serves /v1/batches.
    return [
        Route("/v1beta/batches", listing, methods=["GET"]),
        Route("/v1beta/batches/{batch_id}", retrieve, methods=["GET", "POST"]),
    ]

"""OpenAI's Batch API: `/v1/files` (upload a JSONL of requests, read output files) and `/v1/batches`
(create, retrieve, list, cancel), as https://platform.openai.com/docs/api-reference/batch documents it.

Items are `/v1/chat/completions` requests run through the chat wire when the batch ends (see
`simulator.batches`); answers go to the output file, failed and expired items to the error file, one
JSON line each with the item's `custom_id`.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from simulator.app import run_offline
from simulator.batches import SimBatch
from simulator.core import Simulator
from simulator.openai_wire import OpenAIWire

__all__ = ["routes"]

CHAT_ENDPOINT = "/v1/chat/completions"
MAX_REQUESTS = 50_000
MAX_METADATA = 16
_EXPIRED = "This request could not be executed before the completion window expired."
_CANCELLED = "This request was not executed because the batch was cancelled."


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart body: name -> (filename, bytes)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.message_from_bytes(head + body, policy=email.policy.HTTP)
    fields: dict[str, tuple[str | None, bytes]] = {}
    if not message.is_multipart():
        return fields
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            payload = part.get_payload(decode=True)
            fields[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields


class OpenAIBatchWire:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.chat = OpenAIWire()

    # ---- files ------------------------------------------------------------------------------------

    async def upload(self, request: Request) -> Response:
        refused = self.chat.auth_error(request.headers)
        if refused is not None:
            return JSONResponse(refused.body, status_code=refused.status)
        fields = _multipart(request.headers.get("content-type", ""), await request.body())
        purpose = fields.get("purpose", (None, b""))[1].decode()
        if purpose != "batch":
            return _error(400, f"Invalid purpose {purpose!r}: this simulator takes 'batch'.", "purpose")
        if "file" not in fields:
            return _error(400, "Missing required parameter: 'file'.", "file")
        filename, content = fields["file"]
        file_id = self.sim.batches.put_file(content)
        return JSONResponse(self._file_object(file_id, filename or "input.jsonl", len(content), "batch"))

    def _file_object(self, file_id: str, filename: str, size: int, purpose: str) -> dict[str, Any]:
        return {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": 0,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }

    async def file_content(self, request: Request) -> Response:
        refused = self.chat.auth_error(request.headers)
        if refused is not None:
            return JSONResponse(refused.body, status_code=refused.status)
        content = self.sim.batches.file(request.path_params["file_id"])
        if content is None:
            return _error(404, f"No such File object: {request.path_params['file_id']}", "id")
        return Response(content, media_type="application/octet-stream")

    # ---- batches ----------------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        refused = self.chat.auth_error(request.headers)
        if refused is not None:
            return JSONResponse(refused.body, status_code=refused.status)
        try:
            payload = json.loads(await request.body())
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(payload, dict):
            return _error(400, "The request body must be a JSON object.")
        if payload.get("endpoint") != CHAT_ENDPOINT:
            return _error(400, f"This simulator batches only {CHAT_ENDPOINT}.", "endpoint")
        if payload.get("completion_window") != "24h":
            return _error(400, "Invalid completion_window: only '24h' is supported.", "completion_window")
        metadata = payload.get("metadata") or {}
        if (
            not isinstance(metadata, dict)
            or len(metadata) > MAX_METADATA
            or not all(isinstance(v, str) and len(v) <= 512 for v in metadata.values())
        ):
            return _error(
                400, "metadata takes at most 16 string pairs, values up to 512 characters.", "metadata"
            )
        content = self.sim.batches.file(str(payload.get("input_file_id")))
        if content is None:
            return _error(404, f"No such File object: {payload.get('input_file_id')}", "input_file_id")
        items: list[tuple[str, Any]] = []
        seen: set[str] = set()
        for number, line in enumerate(content.decode().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                return _error(400, f"Line {number} of the input file is not JSON.", "input_file_id")
            custom_id = entry.get("custom_id") if isinstance(entry, dict) else None
            if not isinstance(custom_id, str) or custom_id in seen:
                return _error(400, f"Line {number}: custom_id missing or repeated.", "input_file_id")
            if entry.get("method") != "POST" or entry.get("url") != CHAT_ENDPOINT:
                return _error(
                    400, f"Line {number}: method must be POST and url {CHAT_ENDPOINT}.", "input_file_id"
                )
            seen.add(custom_id)
            items.append((custom_id, entry.get("body")))
        if not items or len(items) > MAX_REQUESTS:
            return _error(
                400, f"A batch holds 1 to {MAX_REQUESTS} requests, got {len(items)}.", "input_file_id"
            )
        batch = self.sim.batches.create(
            "openai", items, metadata, prefix="batch_", extra={"input_file_id": payload["input_file_id"]}
        )
        if batch.control.hold_create_s > 0:
            await asyncio.sleep(batch.control.hold_create_s)
        return JSONResponse(self._render(batch, request))

    async def retrieve(self, request: Request) -> Response:
        refused = self.chat.auth_error(request.headers)
        if refused is not None:
            return JSONResponse(refused.body, status_code=refused.status)
        batch = self.sim.batches.get(request.path_params["batch_id"], "openai")
        if batch is None:
            return _error(404, f"No batch found with id '{request.path_params['batch_id']}'.", "batch_id")
        return JSONResponse(self._render(batch, request))

    async def cancel(self, request: Request) -> Response:
        refused = self.chat.auth_error(request.headers)
        if refused is not None:
            return JSONResponse(refused.body, status_code=refused.status)
        batch = self.sim.batches.get(request.path_params["batch_id"], "openai")
        if batch is None:
            return _error(404, f"No batch found with id '{request.path_params['batch_id']}'.", "batch_id")
        if batch.state() != "in_progress" and batch.cancelled_at is None:
            return _error(
                409, f"Cannot cancel a batch with status '{self._render(batch, request)['status']}'."
            )
        self.sim.batches.cancel(batch)
        return JSONResponse(self._render(batch, request))

    async def listing(self, request: Request) -> Response:
        refused = self.chat.auth_error(request.headers)
        if refused is not None:
            return JSONResponse(refused.body, status_code=refused.status)
        limit = int(request.query_params.get("limit", "20"))
        after = request.query_params.get("after")
        batches = self.sim.batches.listing("openai")
        if after is not None:
            ids = [b.id for b in batches]
            batches = batches[ids.index(after) + 1 :] if after in ids else []
        page = batches[: max(1, min(limit, 100))]
        data = [self._render(b, request) for b in page]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": len(batches) > len(page),
            }
        )

    # ---- rendering --------------------------------------------------------------------------------

    def _render(self, batch: SimBatch, request: Request) -> dict[str, Any]:
        def run(body: Any) -> tuple[int, Any]:
            return run_offline(self.sim, self.chat, self.chat.parse_chat, self.chat.chat_reply, body, request)

        outcomes = self.sim.batches.settle(batch, run)
        state = batch.state()
        if outcomes is not None and "output_file_id" not in batch.extra:
            self._write_files(batch)
        counts = batch.counts()
        created = int(batch.created_at)
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": CHAT_ENDPOINT,
            "errors": None,
            "input_file_id": batch.extra["input_file_id"],
            "completion_window": "24h",
            "status": state,
            "output_file_id": batch.extra.get("output_file_id"),
            "error_file_id": batch.extra.get("error_file_id"),
            "created_at": created,
            "in_progress_at": created,
            "expires_at": created + 86_400,
            "finalizing_at": int(batch.ended_at) if batch.ended_at and state == "completed" else None,
            "completed_at": int(batch.ended_at) if batch.ended_at and state == "completed" else None,
            "failed_at": None,
            "expired_at": int(batch.ended_at) if batch.ended_at and state == "expired" else None,
            "cancelling_at": int(batch.cancelled_at) if batch.cancelled_at else None,
            "cancelled_at": int(batch.cancelled_at) if batch.cancelled_at else None,
            "request_counts": {
                "total": counts["total"],
                "completed": counts["succeeded"],
                "failed": counts["errored"] + counts["expired"],
            },
            "metadata": batch.metadata,
        }

    def _write_files(self, batch: SimBatch) -> None:
        output: list[str] = []
        errors: list[str] = []
        for index, outcome in enumerate(batch.outcomes or []):
            line: dict[str, Any] = {"id": f"batch_req_{batch.id}_{index}", "custom_id": outcome.custom_id}
            if outcome.kind in ("succeeded", "errored"):
                line["response"] = {
                    "status_code": outcome.status,
                    "request_id": f"req_{batch.id}_{index}",
                    "body": outcome.body,
                }
                line["error"] = None
                (output if outcome.kind == "succeeded" else errors).append(json.dumps(line))
            else:
                code, message = (
                    ("batch_expired", _EXPIRED)
                    if outcome.kind == "expired"
                    else ("batch_cancelled", _CANCELLED)
                )
                line["response"] = None
                line["error"] = {"code": code, "message": message}
                errors.append(json.dumps(line))
        if output:
            batch.extra["output_file_id"] = self.sim.batches.put_file(("\n".join(output) + "\n").encode())
        if errors:
            batch.extra["error_file_id"] = self.sim.batches.put_file(("\n".join(errors) + "\n").encode())
        batch.extra.setdefault("output_file_id", None)


def routes(sim: Simulator) -> list[BaseRoute]:
    wire = OpenAIBatchWire(sim)
    return [
        Route("/v1/files", wire.upload, methods=["POST"]),
        Route("/v1/files/{file_id}/content", wire.file_content, methods=["GET"]),
        Route("/v1/batches", wire.create, methods=["POST"]),
        Route("/v1/batches", wire.listing, methods=["GET"]),
        Route("/v1/batches/{batch_id}", wire.retrieve, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", wire.cancel, methods=["POST"]),
    ]

"""A small in-house LLM gateway's wire format, served for the example plugin `kernelflow-plugin-echo`.

`POST /house/v1/generate` with an `x-house-key` header and `{"model", "prompt", "system"?,
"max_tokens"?, "stream"?}` answers `{"id", "model", "output", "stop", "tokens_in", "tokens_out"}`
(`stop` is `end` or `limit`). With `"stream": true` it answers NDJSON: `{"delta": "..."}` lines, then
`{"done": true, "stop", "tokens_in", "tokens_out"}`. Errors are `{"error": {"kind", "detail"}}`.
The gateway knows no tools, schemas, images or embeddings.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from simulator.app import ErrorReply, JSONReply, Reply, StreamReply, Wire, WireError, dump_json, exchange
from simulator.core import Admission, Fault, Message, SimRequest, Simulator, generate

__all__ = ["INVALID_KEY", "HouseWire", "routes"]

INVALID_KEY = "house-invalid"
_WORD = re.compile(r"\s*\S+|\s+")
# fault kind -> (status, error kind, detail)
_FAULTS: dict[str, tuple[int, str, str]] = {
    "400": (400, "bad_request", "simulated bad request"),
    "401": (401, "unauthorized", "the x-house-key is not valid"),
    "403": (403, "forbidden", "this key may not use the model"),
    "429": (429, "rate_limited", "too many requests for this key"),
    "500": (500, "internal", "the gateway failed"),
    "503": (503, "unavailable", "no backend is available, try again later"),
    "529": (529, "overloaded", "the gateway is overloaded"),
    "quota": (402, "payment_required", "the key's monthly budget is spent"),
    "context_length": (413, "prompt_too_long", "the prompt exceeds the context window of 8192 tokens"),
    "content_filter": (422, "content_policy", "the prompt was refused by the content_policy"),
}


def _error(status: int, kind: str, detail: str) -> ErrorReply:
    return ErrorReply(status, {"error": {"kind": kind, "detail": detail}})


class HouseWire(Wire):
    name: ClassVar[str] = "house"

    def auth_error(self, headers: Headers) -> ErrorReply | None:
        key = headers.get("x-house-key", "").strip()
        if not key:
            return _error(401, "unauthorized", "the x-house-key header is required")
        if key == INVALID_KEY:
            return _error(*_FAULTS["401"])
        return None

    def fault_reply(self, fault: Fault, request: SimRequest) -> ErrorReply:
        if fault.kind == "404":
            return self.unknown_model(request.model)
        return _error(*_FAULTS[fault.kind])

    def bad_request(self, message: str, *, param: str | None = None) -> ErrorReply:
        return _error(400, "bad_request", message)

    def unknown_model(self, model: str) -> ErrorReply:
        return _error(404, "unknown_model", f"no model named {model!r} behind this gateway")

    def malformed(self, request: SimRequest) -> tuple[bytes, str]:
        if request.stream:
            return b'{"delta": "Hi\n', "application/x-ndjson"
        return b'{"id": "house-malformed", "output": ', "application/json"

    def parse(self, payload: Any, request: Request) -> SimRequest:
        if not isinstance(payload, dict):
            raise WireError(self.bad_request("the body must be a JSON object"))
        model, prompt = payload.get("model"), payload.get("prompt")
        if not isinstance(model, str) or not model:
            raise WireError(self.bad_request("'model' is required"))
        if not isinstance(prompt, str) or not prompt:
            raise WireError(self.bad_request("'prompt' is required"))
        unknown = sorted(set(payload) - {"model", "prompt", "system", "max_tokens", "stream"})
        if unknown:
            raise WireError(self.bad_request(f"unknown fields: {', '.join(unknown)}"))
        max_tokens = payload.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise WireError(self.bad_request("'max_tokens' must be a positive integer"))
        messages = [Message("user", prompt)]
        if isinstance(payload.get("system"), str) and payload["system"]:
            messages.insert(0, Message("system", payload["system"]))
        return SimRequest(
            wire=self.name,
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            stream=bool(payload.get("stream")),
        )

    def reply(self, request: SimRequest, admission: Admission) -> Reply:
        completion = generate(request, admission)
        text = completion.text or ""
        final = {
            "stop": "limit" if completion.finish_reason == "length" else "end",
            "tokens_in": completion.usage.prompt_tokens,
            "tokens_out": completion.usage.completion_tokens,
        }
        if request.stream:
            lines = [dump_json({"delta": piece}) + b"\n" for piece in _WORD.findall(text)]
            lines.append(dump_json({"done": True, **final}) + b"\n")
            return StreamReply(lines, media_type="application/x-ndjson")
        return JSONReply({"id": f"house-{request.digest}", "model": request.model, "output": text, **final})

    def routes(self, sim: Simulator) -> list[BaseRoute]:
        async def generate_route(request: Request) -> Response:
            return await exchange(request, sim, self, self.parse, self.reply)

        return [Route("/house/v1/generate", generate_route, methods=["POST"])]


def routes(sim: Simulator) -> list[BaseRoute]:
    return HouseWire().routes(sim)

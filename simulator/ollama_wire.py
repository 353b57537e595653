"""Ollama's native wire format: `POST /api/chat` (JSON or NDJSON), `POST /api/embed`, `GET /api/tags`.

Ollama streams unless told `"stream": false`; each NDJSON line carries a `message` fragment and the
last one `done: true` with `done_reason` and the token counts (`prompt_eval_count`, `eval_count`).
Tool calls carry their arguments as a JSON object and no id; tool results come back as
`role: tool` messages. Errors are `{"error": "..."}`. A `:latest` tag names the untagged model.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, ClassVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from simulator.app import ErrorReply, JSONReply, Reply, StreamReply, Wire, WireError, dump_json, exchange
from simulator.catalog import models_for
from simulator.core import (
    Admission,
    Completion,
    Fault,
    Message,
    ResponseFormat,
    SimRequest,
    Simulator,
    Tool,
    count_tokens,
    generate,
)

__all__ = ["DEFAULT_EMBEDDING_DIMENSIONS", "OllamaWire", "routes"]

DEFAULT_EMBEDDING_DIMENSIONS = 768
_CREATED_AT = "2025-01-01T00:00:00.000000Z"
_WORD = re.compile(r"\s*\S+|\s+")
_FAULTS: dict[str, tuple[int, str]] = {
    "400": (400, "simulated bad request"),
    "401": (401, "unauthorized"),
    "403": (403, "forbidden"),
    "429": (429, "too many requests, please slow down"),
    "500": (500, "llama runner process has terminated: exit status 2"),
    "503": (503, "server busy, please try again.  maximum pending requests exceeded"),
    "529": (503, "server overloaded, please try again later"),
    "quota": (429, "too many requests, please slow down"),  # a local server has no account quota
    "context_length": (400, "the input length exceeds the context length"),
    "content_filter": (400, "the request was blocked by the content_filter policy"),
}


class OllamaWire(Wire):
    name: ClassVar[str] = "ollama"

    def fault_reply(self, fault: Fault, request: SimRequest) -> ErrorReply:
        if fault.kind == "404":
            return self.unknown_model(request.model)
        status, message = _FAULTS[fault.kind]
        return ErrorReply(status, {"error": message})

    def bad_request(self, message: str, *, param: str | None = None) -> ErrorReply:
        return ErrorReply(400, {"error": message})

    def unknown_model(self, model: str) -> ErrorReply:
        return ErrorReply(404, {"error": f"model '{model}' not found"})

    def malformed(self, request: SimRequest) -> tuple[bytes, str]:
        if request.stream:
            return (
                b'{"model":"' + request.model.encode() + b'","message":{"content":"Hi\n',
                "application/x-ndjson",
            )
        return b'{"model":"' + request.model.encode() + b'","message":', "application/json"

    def mistyped(self, request: SimRequest) -> tuple[bytes, str]:
        message = {"role": "assistant", "content": "Hi", "tool_calls": [{"function": "lookup"}]}
        if request.stream:
            first = {"model": request.model, "message": {"role": "assistant", "content": "Hi"}, "done": False}
            second = {"model": request.model, "message": message, "done": False}
            return dump_json(first) + b"\n" + dump_json(second) + b"\n", "application/x-ndjson"
        return dump_json({"model": request.model, "message": message, "done": True}), "application/json"

    # ---- chat --------------------------------------------------------------------------------------

    def parse_chat(self, payload: Any, request: Request) -> SimRequest:
        body = self._object(payload)
        model = self._model(body)
        raw_messages = body.get("messages")
        if not isinstance(raw_messages, list) or not raw_messages:
            raise WireError(self.bad_request("messages is required"))
        messages = [self._message(m) for m in raw_messages]
        tools = [
            Tool(name=f["name"], parameters=f.get("parameters") or {}, description=f.get("description") or "")
            for t in body.get("tools") or []
            if isinstance(t, dict) and isinstance(f := t.get("function"), dict) and "name" in f
        ]
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise WireError(self.bad_request("options must be an object"))
        num_predict = options.get("num_predict")
        return SimRequest(
            wire=self.name,
            model=model,
            messages=messages,
            tools=tools,
            response_format=self._format(body.get("format")),
            max_tokens=int(num_predict) if isinstance(num_predict, int) and num_predict > 0 else None,
            stream=body.get("stream", True) is not False,
        )

    def _object(self, payload: Any) -> dict[str, Any]:
        if not isinstance(payload, dict):
            raise WireError(self.bad_request("invalid request body: expected a JSON object"))
        return payload

    def _model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise WireError(self.bad_request("model is required"))
        return model.removesuffix(":latest")

    def _message(self, raw: Any) -> Message:
        if not isinstance(raw, dict) or raw.get("role") not in ("system", "user", "assistant", "tool"):
            raise WireError(self.bad_request("each message needs a role of system, user, assistant or tool"))
        content = raw.get("content")
        text = content if isinstance(content, str) else ""
        for call in raw.get("tool_calls") or []:
            function = call.get("function") or {} if isinstance(call, dict) else {}
            if not isinstance(function.get("arguments", {}), dict):
                raise WireError(self.bad_request("tool_calls[].function.arguments must be an object"))
        return Message(role=str(raw["role"]), text=text)

    def _format(self, raw: Any) -> ResponseFormat | None:
        if raw is None or raw == "":
            return None
        if raw == "json":
            return ResponseFormat("json_object")
        if isinstance(raw, dict):
            return ResponseFormat("json_schema", raw)
        raise WireError(
            self.bad_request(f'invalid format: {json.dumps(raw)}; expected "json" or a JSON schema')
        )

    def chat_reply(self, request: SimRequest, admission: Admission) -> Reply:
        completion = generate(request, admission)
        if request.stream:
            return StreamReply(self._lines(request, completion), media_type="application/x-ndjson")
        message: dict[str, Any] = {"role": "assistant", "content": completion.text or ""}
        if completion.tool_calls:
            message["tool_calls"] = _tool_calls(completion)
        return JSONReply({**self._head(request), "message": message, **self._final(request, completion)})

    def _head(self, request: SimRequest) -> dict[str, Any]:
        return {"model": request.model, "created_at": _CREATED_AT}

    def _final(self, request: SimRequest, completion: Completion) -> dict[str, Any]:
        usage = completion.usage
        return {
            "done_reason": "length" if completion.finish_reason == "length" else "stop",
            "done": True,
            "total_duration": 0,
            "load_duration": 0,
            "prompt_eval_count": usage.prompt_tokens,
            "prompt_eval_duration": 0,
            "eval_count": usage.completion_tokens,
            "eval_duration": 0,
        }

    def _lines(self, request: SimRequest, completion: Completion) -> list[bytes]:
        head = self._head(request)

        def line(message: dict[str, Any]) -> bytes:
            return dump_json({**head, "message": {"role": "assistant", **message}, "done": False}) + b"\n"

        lines: list[bytes] = []
        if completion.tool_calls:
            lines.append(line({"content": "", "tool_calls": _tool_calls(completion)}))
        else:
            lines.extend(line({"content": piece}) for piece in _WORD.findall(completion.text or ""))
        final = {**head, "message": {"role": "assistant", "content": ""}, **self._final(request, completion)}
        lines.append(dump_json(final) + b"\n")
        return lines

    # ---- embeddings --------------------------------------------------------------------------------

    def parse_embed(self, payload: Any, request: Request) -> SimRequest:
        body = self._object(payload)
        model = self._model(body)
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            raise WireError(self.bad_request("input must be a string or a non-empty list of strings"))
        dimensions = body.get("dimensions") or DEFAULT_EMBEDDING_DIMENSIONS
        if not isinstance(dimensions, int) or dimensions < 1:
            raise WireError(self.bad_request(f"invalid dimensions: {dimensions!r}"))
        return SimRequest(
            wire=self.name,
            model=model,
            messages=[Message("user", t) for t in inputs],
            extra={"dimensions": dimensions},
        )

    def embed_reply(self, request: SimRequest, admission: Admission) -> Reply:
        dimensions: int = request.extra["dimensions"]
        return JSONReply(
            {
                "model": request.model,
                "embeddings": [_embedding(m.text, dimensions) for m in request.messages],
                "total_duration": 0,
                "load_duration": 0,
                "prompt_eval_count": sum(count_tokens(m.text) for m in request.messages),
            }
        )

    # ---- routes ------------------------------------------------------------------------------------

    def routes(self, sim: Simulator) -> list[BaseRoute]:
        async def chat(request: Request) -> Response:
            return await exchange(request, sim, self, self.parse_chat, self.chat_reply)

        async def embed(request: Request) -> Response:
            return await exchange(request, sim, self, self.parse_embed, self.embed_reply)

        async def tags(request: Request) -> Response:
            names = models_for(self.name, sim.extra_models(self.name))
            return JSONResponse({"models": [_model_card(n) for n in names]})

        return [
            Route("/api/chat", chat, methods=["POST"]),
            Route("/api/embed", embed, methods=["POST"]),
            Route("/api/tags", tags, methods=["GET"]),
        ]


def routes(sim: Simulator) -> list[BaseRoute]:
    return OllamaWire().routes(sim)


def _tool_calls(completion: Completion) -> list[dict[str, Any]]:
    return [
        {"function": {"index": index, "name": call.name, "arguments": json.loads(call.arguments)}}
        for index, call in enumerate(completion.tool_calls)
    ]


def _model_card(name: str) -> dict[str, Any]:
    tagged = name if ":" in name else f"{name}:latest"
    digest = hashlib.sha256(tagged.encode()).hexdigest()
    return {
        "name": tagged,
        "model": tagged,
        "modified_at": _CREATED_AT,
        "size": 0,
        "digest": digest,
        "details": {
            "format": "gguf",
            "family": name.split(":")[0],
            "parameter_size": "",
            "quantization_level": "",
        },
    }


def _embedding(text: str, dimensions: int) -> list[float]:
    raw = hashlib.shake_256(text.encode()).digest(dimensions)
    values = [b - 127.5 for b in raw]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]

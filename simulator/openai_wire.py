"""OpenAI's wire format: `/v1/chat/completions`, `/v1/embeddings`, `/v1/models`.

A thin mapping between OpenAI JSON and the neutral `SimRequest` / `Completion` of `simulator.core`.
Azure OpenAI differs only in where the key and the model come from: a subclass overriding
`api_key` (the `api-key` header), `model_for` (the `{deployment}` path parameter) and `routes`
(`/openai/deployments/{deployment}/chat/completions`) serves it.
"""

from __future__ import annotations

import array
import base64
import hashlib
import re
import sys
import time
from functools import lru_cache
from typing import Any, ClassVar

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from simulator.app import ErrorReply, JSONReply, Reply, StreamReply, Wire, WireError, dump_json, exchange
from simulator.catalog import is_known_model, models_for
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
    is_reasoning_model,
    prompt_tokens,
)

__all__ = ["DEFAULT_EMBEDDING_DIMENSIONS", "OpenAIWire", "routes"]

DEFAULT_EMBEDDING_DIMENSIONS = 1536
INVALID_KEY = "sk-invalid"
_FINGERPRINT = "fp_sim0000001"
_WORD = re.compile(r"\s*\S+|\s+")
_ARGUMENT_FRAGMENT = 16
_ROLE_ALIASES = {"developer": "system", "function": "tool"}

# fault kind -> (message, type, code, param)
_FAULTS: dict[str, tuple[str, str, str | None, str | None]] = {
    "400": ("Simulated bad request.", "invalid_request_error", None, None),
    "401": ("Incorrect API key provided.", "authentication_error", "invalid_api_key", None),
    "403": ("You are not allowed to sample from this model.", "permission_error", "permission_denied", None),
    "429": (
        "Rate limit reached for {model} on requests per min (RPM). Please try again later.",
        "rate_limit_exceeded",
        "rate_limit_exceeded",
        None,
    ),
    "500": (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
        None,
    ),
    "503": (
        "The engine is currently overloaded, please try again later.",
        "server_error",
        "service_unavailable",
        None,
    ),
    "529": ("The server is overloaded, please try again later.", "server_error", "overloaded", None),
    # OpenAI's answer when the account is out of credit: a 429 that waiting cannot cure.
    "quota": (
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
        "insufficient_quota",
        "insufficient_quota",
        None,
    ),
    "context_length": (
        "This model's maximum context length is 128000 tokens. However, your messages resulted in "
        "{tokens} tokens. Please reduce the length of the messages.",
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    ),
    "content_filter": (
        "The response was filtered due to the prompt triggering content management policy.",
        "invalid_request_error",
        "content_filter",
        "prompt",
    ),
}


def _error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _unsupported(message: str, param: str, code: str) -> ErrorReply:
    return ErrorReply(400, _error_body(message, "invalid_request_error", code, param))


class OpenAIWire(Wire):
    name: ClassVar[str] = "openai"

    # ---- connection: where key and model come from ---------------------------------------------

    def api_key(self, headers: Headers) -> str | None:
        authorization = headers.get("authorization", "")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        return key.strip()

    def model_for(self, payload: dict[str, Any], request: Request) -> str:
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise WireError(self.bad_request("you must provide a model parameter", param="model"))
        return model

    # ---- errors ----------------------------------------------------------------------------------

    def auth_error(self, headers: Headers) -> ErrorReply | None:
        key = self.api_key(headers)
        if key is None:
            message = (
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
            return ErrorReply(401, _error_body(message, "authentication_error", None))
        if key == INVALID_KEY:
            message = (
                f"Incorrect API key provided: {key[:8]}****. You can find your API key in your dashboard."
            )
            return ErrorReply(401, _error_body(message, "authentication_error", "invalid_api_key"))
        return None

    def fault_reply(self, fault: Fault, request: SimRequest) -> ErrorReply:
        if fault.kind == "404":
            return self.unknown_model(request.model)
        message, type_, code, param = _FAULTS[fault.kind]
        message = message.format(model=request.model, tokens=prompt_tokens(request.messages))
        headers = {"x-request-id": f"req_{request.digest}"}
        return ErrorReply(fault.status, _error_body(message, type_, code, param), headers)

    def bad_request(self, message: str, *, param: str | None = None) -> ErrorReply:
        return ErrorReply(400, _error_body(message, "invalid_request_error", None, param))

    def unknown_model(self, model: str) -> ErrorReply:
        message = f"The model `{model}` does not exist or you do not have access to it."
        return ErrorReply(404, _error_body(message, "invalid_request_error", "model_not_found"))

    # ---- chat completions ------------------------------------------------------------------------

    def parse_chat(self, payload: Any, request: Request) -> SimRequest:
        if not isinstance(payload, dict):
            raise WireError(self.bad_request("The request body must be a JSON object."))
        model = self.model_for(payload, request)
        raw_messages = payload.get("messages")
        if not isinstance(raw_messages, list) or not raw_messages:
            raise WireError(self.bad_request("Missing required parameter: 'messages'.", param="messages"))
        messages = [self._message(m) for m in raw_messages]
        tools = [
            Tool(name=f["name"], parameters=f.get("parameters") or {}, description=f.get("description") or "")
            for t in payload.get("tools") or []
            if isinstance(t, dict) and isinstance(f := t.get("function"), dict) and "name" in f
        ]
        if is_reasoning_model(model):
            self._check_reasoning_parameters(model, payload)
        max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
        stream_options = payload.get("stream_options") or {}
        return SimRequest(
            wire=self.name,
            model=model,
            messages=messages,
            tools=tools,
            tool_choice=_tool_choice(payload.get("tool_choice")),
            response_format=_response_format(payload.get("response_format")),
            max_tokens=int(max_tokens) if max_tokens is not None else None,
            stream=bool(payload.get("stream")),
            extra={"include_usage": bool(stream_options.get("include_usage"))},
        )

    def _check_reasoning_parameters(self, model: str, payload: dict[str, Any]) -> None:
        """OpenAI's reasoning models refuse sampling parameters and ``max_tokens``, with these bodies."""
        temperature = payload.get("temperature")
        if temperature is not None and temperature != 1:
            message = (
                f"Unsupported value: 'temperature' does not support {temperature} with this model. "
                "Only the default (1) value is supported."
            )
            raise WireError(_unsupported(message, "temperature", "unsupported_value"))
        for name in ("top_p", "presence_penalty", "frequency_penalty", "logprobs"):
            if payload.get(name) is not None:
                message = f"Unsupported parameter: '{name}' is not supported with this model."
                raise WireError(_unsupported(message, name, "unsupported_parameter"))
        if payload.get("max_tokens") is not None:
            message = (
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead."
            )
            raise WireError(_unsupported(message, "max_tokens", "unsupported_parameter"))

    def _message(self, raw: Any) -> Message:
        if not isinstance(raw, dict) or "role" not in raw:
            raise WireError(self.bad_request("Each message needs a 'role'.", param="messages"))
        role = str(raw["role"])
        role = _ROLE_ALIASES.get(role, role)
        return Message(role=role, text=_content_text(raw.get("content")))

    def chat_reply(self, request: SimRequest, admission: Admission) -> Reply:
        completion = generate(request, admission)
        completion_id = f"chatcmpl-{request.digest}"
        headers = {"x-request-id": f"req_{request.digest}", "openai-processing-ms": "0"}
        if request.stream:
            return StreamReply(self._chunks(request, completion, completion_id), headers=headers)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": completion.text,
            "refusal": None,
            "annotations": [],
        }
        if completion.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in completion.tool_calls
            ]
        body = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": completion.finish_reason}
            ],
            "usage": _usage(completion),
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
        }
        return JSONReply(body, headers=headers)

    def _chunks(self, request: SimRequest, completion: Completion, completion_id: str) -> list[bytes]:
        include_usage = bool(request.extra.get("include_usage"))
        base: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": request.model,
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
        }
        if include_usage:
            base["usage"] = None

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return b"data: " + dump_json({**base, "choices": [choice]}) + b"\n\n"

        frames: list[bytes] = []
        if completion.tool_calls:
            frames.append(chunk({"role": "assistant", "content": None, "refusal": None}))
            for index, call in enumerate(completion.tool_calls):
                head = {"index": index, "id": call.id, "type": "function"}
                frames.append(
                    chunk({"tool_calls": [{**head, "function": {"name": call.name, "arguments": ""}}]})
                )
                for start in range(0, len(call.arguments), _ARGUMENT_FRAGMENT):
                    fragment = call.arguments[start : start + _ARGUMENT_FRAGMENT]
                    frames.append(
                        chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
                    )
        else:
            frames.append(chunk({"role": "assistant", "content": "", "refusal": None}))
            frames.extend(chunk({"content": piece}) for piece in _WORD.findall(completion.text or ""))
        frames.append(chunk({}, completion.finish_reason))
        if include_usage:
            frames.append(
                b"data: " + dump_json({**base, "choices": [], "usage": _usage(completion)}) + b"\n\n"
            )
        frames.append(b"data: [DONE]\n\n")
        return frames

    # ---- embeddings ------------------------------------------------------------------------------

    def parse_embeddings(self, payload: Any, request: Request) -> SimRequest:
        if not isinstance(payload, dict):
            raise WireError(self.bad_request("The request body must be a JSON object."))
        model = self.model_for(payload, request)
        raw = payload.get("input")
        if raw is None or raw == [] or raw == "":
            raise WireError(self.bad_request("'input' must not be empty.", param="input"))
        inputs = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else [raw]
        if inputs and all(isinstance(i, int) for i in inputs):
            inputs = [inputs]  # one pre-tokenized input
        texts = [i if isinstance(i, str) else str(i) for i in inputs]
        dimensions = payload.get("dimensions") or DEFAULT_EMBEDDING_DIMENSIONS
        if not isinstance(dimensions, int) or dimensions < 1:
            raise WireError(self.bad_request(f"Invalid 'dimensions': {dimensions!r}.", param="dimensions"))
        return SimRequest(
            wire=self.name,
            model=model,
            messages=[Message("user", t) for t in texts],
            extra={"dimensions": dimensions, "base64": payload.get("encoding_format") == "base64"},
        )

    def embeddings_reply(self, request: SimRequest, admission: Admission) -> Reply:
        dimensions: int = request.extra["dimensions"]
        as_base64: bool = request.extra["base64"]
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": _embedding_base64(m.text, dimensions)
                if as_base64
                else _embedding(m.text, dimensions),
            }
            for index, m in enumerate(request.messages)
        ]
        tokens = sum(count_tokens(m.text) for m in request.messages)
        body = {
            "object": "list",
            "data": data,
            "model": request.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return JSONReply(body, headers={"x-request-id": f"req_{request.digest}"})

    # ---- routes ----------------------------------------------------------------------------------

    def routes(self, sim: Simulator) -> list[BaseRoute]:
        async def chat_completions(request: Request) -> Response:
            return await exchange(request, sim, self, self.parse_chat, self.chat_reply)

        async def embeddings(request: Request) -> Response:
            return await exchange(request, sim, self, self.parse_embeddings, self.embeddings_reply)

        async def list_models(request: Request) -> Response:
            refused = self.auth_error(request.headers)
            if refused is not None:
                return JSONResponse(refused.body, status_code=refused.status)
            names = models_for(self.name, sim.extra_models(self.name))
            return JSONResponse({"object": "list", "data": [_model_card(n) for n in names]})

        async def retrieve_model(request: Request) -> Response:
            name: str = request.path_params["model"]
            refused = self.auth_error(request.headers)
            if refused is None and not is_known_model(self.name, name, sim.extra_models(self.name)):
                refused = self.unknown_model(name)
            if refused is not None:
                return JSONResponse(refused.body, status_code=refused.status)
            return JSONResponse(_model_card(name))

        return [
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        ]


def routes(sim: Simulator) -> list[BaseRoute]:
    return OpenAIWire().routes(sim)


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "openai"}


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text") or part.get("refusal") or "" for part in content if isinstance(part, dict)
        )
    return str(content)


def _tool_choice(raw: Any) -> str | None:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, dict):
        function = raw.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return str(function["name"])
    return None


def _response_format(raw: Any) -> ResponseFormat | None:
    if not isinstance(raw, dict):
        return None
    kind = raw.get("type")
    if kind == "json_schema":
        spec = raw.get("json_schema") or {}
        return ResponseFormat("json_schema", spec.get("schema") or {}, spec.get("name") or "response")
    if kind == "json_object":
        return ResponseFormat("json_object")
    return None


def _usage(completion: Completion) -> dict[str, Any]:
    usage = completion.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": usage.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


@lru_cache(maxsize=4096)
def _embedding_array(text: str, dimensions: int) -> array.array[float]:
    raw = array.array("h", hashlib.shake_256(text.encode()).digest(dimensions * 2))
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    return array.array("f", (v / norm for v in raw))


def _embedding(text: str, dimensions: int) -> list[float]:
    return _embedding_array(text, dimensions).tolist()


def _embedding_base64(text: str, dimensions: int) -> str:
    values = _embedding_array(text, dimensions)
    if sys.byteorder == "big":
        values = array.array("f", values)
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode()

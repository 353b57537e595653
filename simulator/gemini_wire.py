"""Google's Gemini API wire format (v1beta and v1): `models/{model}:generateContent`,
`:streamGenerateContent` (SSE with `alt=sse`, a JSON array without), `:batchEmbedContents`.

Errors use Google's shape, `{"error": {"code", "message", "status", "details"}}`. As the real
service does, a missing key answers 403 PERMISSION_DENIED and a wrong one 400 INVALID_ARGUMENT
with an `API_KEY_INVALID` reason; a safety block is a 200 whose `promptFeedback` names the reason.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from typing import Any, ClassVar

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from simulator.app import (
    ErrorReply,
    JSONReply,
    Reply,
    StreamReply,
    Wire,
    WireError,
    dump_json,
    exchange,
    sse_frame,
)
from simulator.core import (
    Admission,
    Completion,
    Fault,
    Message,
    ResponseFormat,
    SimRequest,
    Simulator,
    Tool,
    generate,
    prompt_tokens,
)

__all__ = ["INVALID_KEY", "MAX_INPUT_TOKENS", "GeminiWire", "routes", "thought_signature"]

INVALID_KEY = "AIza-invalid"
MAX_INPUT_TOKENS = 1_048_576
_DEFAULT_DIMENSIONS = {"text-embedding-004": 768, "gemini-embedding-001": 3072}
_FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "tool_calls": "STOP"}
_WORDS_PER_CHUNK = 4
_WORD = re.compile(r"\s*\S+|\s+")
_CAMEL_HUMP = re.compile(r"[A-Z]")
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_HELP = "https://ai.google.dev/gemini-api/docs/troubleshooting"
_SIGNING_MODELS = re.compile(r"^gemini-3")
"""Models that sign their function calls and refuse a current turn whose calls come back unsigned."""
_MISSING_SIGNATURE = (
    "Function call is missing a thought_signature in functionCall parts. This is required for tools to "
    "work correctly, and missing thought_signature may lead to degraded model performance. Additional "
    "data, function call `default_api:{name}` , position {position}. Please refer to "
    "https://ai.google.dev/gemini-api/docs/thought-signatures for more details."
)


def thought_signature(name: str, args: Any) -> str:
    """The simulator's signature of a function call (Gemini's are opaque; these can be checked)."""
    digest = hashlib.blake2b(f"{name}:{json.dumps(args, sort_keys=True)}".encode(), digest_size=24)
    return base64.b64encode(b"kf-sim-sig:" + digest.digest()).decode()


# fault kind -> (HTTP status, Google status, message)
_FAULTS: dict[str, tuple[int, str, str]] = {
    "400": (400, "INVALID_ARGUMENT", "Request contains an invalid argument."),
    "401": (
        401,
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
        "or other valid authentication credential.",
    ),
    "403": (403, "PERMISSION_DENIED", "The caller does not have permission"),
    "429": (
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    "500": (500, "INTERNAL", f"An internal error has occurred. Please retry or report in {_HELP}"),
    "503": (503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
    "quota": (
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    # Google has no 529; its overload answer is 503 UNAVAILABLE.
    "529": (503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
}


def _error_body(code: int, status: str, message: str, details: list[dict[str, Any]] | None = None) -> Any:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return {"error": error}


class GeminiWire(Wire):
    name: ClassVar[str] = "gemini"

    # ---- connection ------------------------------------------------------------------------------

    def key_error(self, request: Request) -> ErrorReply | None:
        """Google reads the key from `x-goog-api-key` or the `key` query parameter."""
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if not key:
            message = (
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API."
            )
            return ErrorReply(403, _error_body(403, "PERMISSION_DENIED", message))
        if key == INVALID_KEY:
            info = {
                "@type": _ERROR_INFO,
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
            message = "API key not valid. Please pass a valid API key."
            return ErrorReply(400, _error_body(400, "INVALID_ARGUMENT", message, [info]))
        return None

    def auth_error(self, headers: Headers) -> ErrorReply | None:
        return None  # checked by `key_error`, which also sees the query string

    # ---- errors ----------------------------------------------------------------------------------

    def fault_reply(self, fault: Fault, request: SimRequest) -> ErrorReply:
        if fault.kind == "404":
            return self.unknown_model(request.model)
        if fault.kind == "content_filter":
            return ErrorReply(200, self._blocked(request))
        if fault.kind == "context_length":
            tokens = MAX_INPUT_TOKENS + prompt_tokens(request.messages)
            message = (
                f"The input token count ({tokens}) exceeds the maximum number of tokens allowed "
                f"({MAX_INPUT_TOKENS})."
            )
            return ErrorReply(400, _error_body(400, "INVALID_ARGUMENT", message))
        status, google_status, message = _FAULTS[fault.kind]
        details: list[dict[str, Any]] = []
        delay = fault.retry_after if fault.retry_after is not None else None
        if delay is None and fault.retry_after_ms is not None:
            delay = fault.retry_after_ms / 1000
        if fault.kind == "429" and delay is not None:
            details.append({"@type": _RETRY_INFO, "retryDelay": f"{delay:g}s"})
        return ErrorReply(status, _error_body(status, google_status, message, details))

    def bad_request(self, message: str, *, param: str | None = None) -> ErrorReply:
        return ErrorReply(400, _error_body(400, "INVALID_ARGUMENT", message))

    def unknown_model(self, model: str) -> ErrorReply:
        message = (
            f"models/{model} is not found for API version v1beta, or is not supported for "
            "generateContent. Call ListModels to see the list of available models and their supported methods."
        )
        return ErrorReply(404, _error_body(404, "NOT_FOUND", message))

    def malformed(self, request: SimRequest) -> tuple[bytes, str]:
        if request.stream:
            return b'data: {"candidates": [{"content": {"parts": [\r\n\r\n', "text/event-stream"
        return b'{"candidates": [{"content": {"parts": [{"text": ', "application/json"

    def mistyped(self, request: SimRequest) -> tuple[bytes, str]:
        body = {"candidates": [{"content": [{"text": "Hi"}], "finishReason": "STOP"}]}
        if request.stream:
            return sse_frame(body), "text/event-stream"
        return dump_json(body), "application/json"

    # ---- generateContent -------------------------------------------------------------------------

    def parse_generate(self, payload: Any, request: Request) -> SimRequest:
        if not isinstance(payload, dict):
            raise WireError(self.bad_request("Invalid JSON payload received. Expected an object."))
        model, method = _target(request)
        raw_contents = payload.get("contents")
        if not isinstance(raw_contents, list) or not raw_contents:
            raise WireError(
                self.bad_request("* GenerateContentRequest.contents: contents is not specified\n")
            )
        messages: list[Message] = []
        system = _get(payload, "systemInstruction")
        if isinstance(system, dict):
            messages.append(Message("system", _parts_text(system.get("parts"))))
        for content in raw_contents:
            messages.extend(self._messages(content))
        if _SIGNING_MODELS.match(model):
            self._check_signatures(raw_contents)
        tools = [
            Tool(
                name=str(d["name"]),
                parameters=_json_schema(_get(d, "parametersJsonSchema") or d.get("parameters") or {}),
                description=str(d.get("description") or ""),
            )
            for group in payload.get("tools") or []
            if isinstance(group, dict)
            for d in _get(group, "functionDeclarations") or []
            if isinstance(d, dict) and "name" in d
        ]
        config = _get(payload, "generationConfig") or {}
        max_tokens = _get(config, "maxOutputTokens")
        return SimRequest(
            wire=self.name,
            model=model,
            messages=messages,
            tools=tools,
            tool_choice=_tool_choice(_get(payload, "toolConfig")),
            response_format=_response_format(config),
            max_tokens=int(max_tokens) if max_tokens is not None else None,
            stream=method == "streamGenerateContent",
            extra={"sse": request.query_params.get("alt") == "sse"},
        )

    def _check_signatures(self, contents: list[Any]) -> None:
        """Gemini 3's rule: in the current turn (everything after the last user content with standard
        parts), the first functionCall part of each model step carries the signature it was sent with."""
        start = 0
        for index, content in enumerate(contents):
            parts = content.get("parts") or [] if isinstance(content, dict) else []
            standard = any(isinstance(p, dict) and "functionResponse" not in p for p in parts)
            if isinstance(content, dict) and content.get("role", "user") == "user" and standard:
                start = index + 1
        position = 0
        for content in contents[start:]:
            if not isinstance(content, dict) or content.get("role") != "model":
                position += len(content.get("parts") or []) if isinstance(content, dict) else 0
                continue
            calls = [p for p in content.get("parts") or [] if isinstance(p, dict) and "functionCall" in p]
            if calls:
                first = calls[0]
                call = first["functionCall"]
                signature = _get(first, "thoughtSignature")
                if signature != thought_signature(str(call.get("name")), call.get("args") or {}):
                    message = _MISSING_SIGNATURE.format(name=call.get("name"), position=position + 1)
                    raise WireError(self.bad_request(message))
            position += len(content.get("parts") or [])

    def _messages(self, content: Any) -> list[Message]:
        if not isinstance(content, dict):
            raise WireError(self.bad_request("Invalid value at 'contents': expected a Content object."))
        role = content.get("role") or "user"
        if role not in ("user", "model", "function"):
            raise WireError(self.bad_request("Please use a valid role: user, model."))
        parts = [p for p in content.get("parts") or [] if isinstance(p, dict)]
        if not parts:
            raise WireError(
                self.bad_request(
                    "* GenerateContentRequest.contents.parts: contents.parts must not be empty.\n"
                )
            )
        messages: list[Message] = []
        for part in parts:
            response = _get(part, "functionResponse")
            if isinstance(response, dict):
                messages.append(Message("tool", _function_output(response.get("response"))))
        text = _parts_text(parts)
        if text or role == "model" or not messages:
            messages.insert(0, Message("assistant" if role == "model" else "user", text))
        return messages

    def generate_reply(self, request: SimRequest, admission: Admission) -> Reply:
        completion = generate(request, admission)
        response_id = base64.urlsafe_b64encode(bytes.fromhex(request.digest)).decode().rstrip("=")
        signing = bool(_SIGNING_MODELS.match(request.model))
        if not request.stream:
            parts = _parts(completion, signing=signing)
            return JSONReply(self._response(request, response_id, parts, completion, final=True))
        chunks: list[dict[str, Any]] = []
        if completion.tool_calls:
            parts = _parts(completion, signing=signing)
            chunks.append(self._response(request, response_id, parts, completion, final=True))
        else:
            words = _WORD.findall(completion.text or "") or [""]
            groups = [words[i : i + _WORDS_PER_CHUNK] for i in range(0, len(words), _WORDS_PER_CHUNK)]
            for index, group in enumerate(groups):
                final = index == len(groups) - 1
                part = [{"text": "".join(group)}]
                chunks.append(self._response(request, response_id, part, completion, final=final))
        if request.extra.get("sse"):
            return StreamReply([b"data: " + dump_json(c) + b"\r\n\r\n" for c in chunks])
        frames = [(b"[" if i == 0 else b",\r\n") + dump_json(c) for i, c in enumerate(chunks)]
        frames[-1] += b"]"
        return StreamReply(frames, media_type="application/json")

    def _response(
        self,
        request: SimRequest,
        response_id: str,
        parts: list[dict[str, Any]],
        completion: Completion,
        *,
        final: bool,
    ) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        usage = completion.usage
        metadata: dict[str, Any] = {
            "promptTokenCount": usage.prompt_tokens,
            "totalTokenCount": usage.prompt_tokens,
        }
        if final:
            candidate["finishReason"] = _FINISH.get(completion.finish_reason, "STOP")
            metadata = _usage_metadata(completion)
        if usage.cached_tokens:
            metadata["cachedContentTokenCount"] = usage.cached_tokens
        return {
            "candidates": [candidate],
            "usageMetadata": metadata,
            "modelVersion": request.model,
            "responseId": response_id,
        }

    def _blocked(self, request: SimRequest) -> dict[str, Any]:
        tokens = prompt_tokens(request.messages)
        ratings = [
            {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True},
            {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
        ]
        return {
            "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": ratings},
            "usageMetadata": {"promptTokenCount": tokens, "totalTokenCount": tokens},
            "modelVersion": request.model,
        }

    # ---- batchEmbedContents ----------------------------------------------------------------------

    def parse_embed(self, payload: Any, request: Request) -> SimRequest:
        model, _ = _target(request)
        entries = payload.get("requests") if isinstance(payload, dict) else None
        if not isinstance(entries, list) or not entries:
            raise WireError(
                self.bad_request("* BatchEmbedContentsRequest.requests: requests is not specified\n")
            )
        texts: list[str] = []
        dimensions: int | None = None
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("content"), dict):
                raise WireError(
                    self.bad_request(
                        "* BatchEmbedContentsRequest.requests[].content: content is not specified\n"
                    )
                )
            named = str(entry.get("model") or f"models/{model}").removeprefix("models/")
            if named != model:
                message = f"Model names should match: models/{model} != models/{named}"
                raise WireError(self.bad_request(message))
            texts.append(_parts_text(entry["content"].get("parts")))
            config = _get(entry, "embedContentConfig") or {}
            dimensions = (
                _get(entry, "outputDimensionality") or _get(config, "outputDimensionality") or dimensions
            )
        dimensions = int(dimensions or _DEFAULT_DIMENSIONS.get(model, 768))
        return SimRequest(
            wire=self.name,
            model=model,
            messages=[Message("user", t) for t in texts],
            extra={"dimensions": dimensions},
        )

    def embed_reply(self, request: SimRequest, admission: Admission) -> Reply:
        dimensions: int = request.extra["dimensions"]
        return JSONReply(
            {"embeddings": [{"values": _embedding(m.text, dimensions)} for m in request.messages]}
        )

    # ---- routes ----------------------------------------------------------------------------------

    def routes(self, sim: Simulator) -> list[BaseRoute]:
        async def model_method(request: Request) -> Response:
            refused = self.key_error(request)
            if refused is not None:
                return JSONResponse(refused.body, status_code=refused.status)
            _, method = _target(request)
            if method in ("generateContent", "streamGenerateContent"):
                response = await exchange(request, sim, self, self.parse_generate, self.generate_reply)
                if method == "streamGenerateContent" and _is_plain_json(response):
                    return _as_stream(response, sse=request.query_params.get("alt") == "sse")
                return response
            if method == "batchEmbedContents":
                return await exchange(request, sim, self, self.parse_embed, self.embed_reply)
            if method == "batchGenerateContent":
                from simulator import gemini_batch_wire

                return await gemini_batch_wire.create(request, sim, self, _target(request)[0])
            path = request.url.path
            return JSONResponse(_error_body(404, "NOT_FOUND", f"Method not found: {path}"), status_code=404)

        return [
            Route(f"/{version}/models/{{target}}", model_method, methods=["POST"])
            for version in ("v1beta", "v1")
        ]


def routes(sim: Simulator) -> list[BaseRoute]:
    return GeminiWire().routes(sim)


def _get(data: dict[str, Any], name: str) -> Any:
    """A field by its JSON name (`maxOutputTokens`) or its proto name (`max_output_tokens`): Google's
    JSON parser accepts both, and the official SDK sends some fields by their proto names."""
    if name in data:
        return data[name]
    return data.get(_CAMEL_HUMP.sub(lambda m: "_" + m.group(0).lower(), name))


def _target(request: Request) -> tuple[str, str]:
    model, _, method = str(request.path_params["target"]).partition(":")
    return model, method


def _is_plain_json(response: Response) -> bool:
    """A 200 JSON body on the stream route: a safety block, which Google sends as one stream event."""
    return response.status_code == 200 and response.media_type == "application/json" and bool(response.body)


def _as_stream(response: Response, *, sse: bool) -> Response:
    if sse:
        return Response(b"data: " + response.body + b"\r\n\r\n", media_type="text/event-stream")
    return Response(b"[" + response.body + b"]", media_type="application/json")


def _parts_text(parts: Any) -> str:
    if not isinstance(parts, list):
        return ""
    return "".join(
        p["text"]
        for p in parts
        if isinstance(p, dict) and isinstance(p.get("text"), str) and not p.get("thought")
    )


def _function_output(response: Any) -> str:
    if isinstance(response, dict) and set(response) <= {"output"} and isinstance(response.get("output"), str):
        return str(response["output"])
    return json.dumps(response, separators=(",", ":"), ensure_ascii=False)


def _parts(completion: Completion, *, signing: bool = False) -> list[dict[str, Any]]:
    """Gemini 3 gives each call an ``id`` and signs the first call of a step (parallel calls after
    it carry no signature)."""
    if completion.tool_calls:
        parts: list[dict[str, Any]] = []
        for index, call in enumerate(completion.tool_calls):
            args = json.loads(call.arguments)
            function: dict[str, Any] = {"name": call.name, "args": args}
            part: dict[str, Any] = {"functionCall": function}
            if signing:
                function["id"] = call.id.removeprefix("call_")[:8]
                if index == 0:
                    part["thoughtSignature"] = thought_signature(call.name, args)
            parts.append(part)
        return parts
    return [{"text": completion.text or ""}]


def _usage_metadata(completion: Completion) -> dict[str, Any]:
    """Gemini leaves thinking out of `candidatesTokenCount` and reports it as `thoughtsTokenCount`."""
    usage = completion.usage
    metadata: dict[str, Any] = {
        "promptTokenCount": usage.prompt_tokens,
        "candidatesTokenCount": usage.completion_tokens - usage.reasoning_tokens,
        "totalTokenCount": usage.total_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": usage.prompt_tokens}],
    }
    if usage.reasoning_tokens:
        metadata["thoughtsTokenCount"] = usage.reasoning_tokens
    return metadata


def _tool_choice(raw: Any) -> str | None:
    config = _get(raw, "functionCallingConfig") if isinstance(raw, dict) else None
    if not isinstance(config, dict):
        return None
    mode = str(config.get("mode") or "AUTO").upper()
    if mode == "NONE":
        return "none"
    if mode in ("ANY", "VALIDATED"):
        allowed = _get(config, "allowedFunctionNames") or []
        return str(allowed[0]) if len(allowed) == 1 else "required"
    return "auto"


def _response_format(config: Any) -> ResponseFormat | None:
    if not isinstance(config, dict) or _get(config, "responseMimeType") != "application/json":
        return None
    schema = _get(config, "responseJsonSchema") or _get(config, "responseSchema")
    if isinstance(schema, dict):
        return ResponseFormat("json_schema", _json_schema(schema))
    return ResponseFormat("json_object")


def _json_schema(schema: Any) -> Any:
    """OpenAPI-style `responseSchema` (`"type": "OBJECT"`) read as JSON Schema (lower-case types)."""
    if isinstance(schema, dict):
        return {
            k: (v.lower() if k == "type" and isinstance(v, str) else _json_schema(v))
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_json_schema(v) for v in schema]
    return schema


def _embedding(text: str, dimensions: int) -> list[float]:
    raw = struct.unpack(f"<{dimensions}h", hashlib.shake_256(text.encode()).digest(dimensions * 2))
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    return [v / norm for v in raw]

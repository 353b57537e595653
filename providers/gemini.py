"""Google's Gemini API (``generativelanguage.googleapis.com``, v1beta): chat, streaming, tools and
structured output through ``generateContent``, embeddings through ``batchEmbedContents``.

Gemini differs from the kernel's OpenAI shape in ways the mapping must bridge: the assistant is
``model``, system text travels as ``systemInstruction``, a tool result must name its function (which
is recovered from the assistant call it answers), function calls carry no ids (deterministic ones are
made), and ``candidatesTokenCount`` leaves out thinking tokens, which the kernel counts as completion.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import httpx

from kernel.batch import BatchItem, BatchItemResult, BatchJob, BatchLimits
from kernel.contracts import (
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    Choice,
    DeveloperMessage,
    DocumentPart,
    EmbedRequest,
    EmbedResponse,
    FinishReason,
    FunctionCall,
    ImagePart,
    NamedToolChoice,
    ProviderState,
    ProviderStateEvent,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    StreamDone,
    StreamEvent,
    StreamStart,
    SystemMessage,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolMessage,
    Usage,
    UserMessage,
    message_text,
)
from kernel.errors import (
    ContentFiltered,
    InvalidRequest,
    MalformedResponse,
    MissingCredentials,
    ProviderError,
    UnsupportedCapability,
    error_from_status,
)
from kernel.provider import Capabilities
from providers import gemini_batch
from providers._google import LEGACY_SCHEMA_MODELS, error_details, google_error, legacy_schema, retry_delay
from providers._http import (
    HttpProvider,
    WireShapeError,
    as_int,
    as_list,
    as_object,
    iter_sse,
    loads_object,
    required,
)

__all__ = ["GeminiProvider"]

_FINISH_REASONS: dict[str, FinishReason] = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "LANGUAGE": "error",
    "OTHER": "error",
    "MALFORMED_FUNCTION_CALL": "error",
    "UNEXPECTED_TOOL_CALL": "error",
    "TOO_MANY_TOOL_CALLS": "error",
    "FINISH_REASON_UNSPECIFIED": "stop",
}
_TOOL_MODES = {"auto": "AUTO", "required": "ANY", "none": "NONE"}
# Google's canonical status -> the HTTP status it stands for, for errors sent inside a stream.
_STATUS_CODES = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
_TOP_OPTIONS = frozenset({"safetySettings", "cachedContent", "labels"})
_CONFIG_OPTIONS = frozenset(
    {
        "topK",
        "candidateCount",
        "responseLogprobs",
        "logprobs",
        "mediaResolution",
        "responseModalities",
        "speechConfig",
    }
)
"""Keys accepted under ``provider_options.gemini``: request fields, and ``generationConfig`` fields
(https://ai.google.dev/api/generate-content)."""
_DATA_URL = re.compile(r"^data:([^;,]+)(?:;[^,]*)?;base64,(.*)$", re.DOTALL)


class GeminiProvider(HttpProvider):
    name = "gemini"
    version = "1.0.0"
    kernel_api = (1, 1)
    description = "Google Gemini API (generateContent, streamGenerateContent, batchEmbedContents)"
    capabilities = Capabilities(
        embeddings=True, vision=True, documents=True, json_schema_mode="native", batch=True
    )
    batch_limits: ClassVar[BatchLimits | None] = gemini_batch.LIMITS
    # Gemini 2.5 and later cache repeated prefixes on their own: the cache hints need no field.
    unsupported_options: ClassVar[frozenset[str]] = frozenset({"user", "parallel_tool_calls", "service_tier"})
    api_key_env: ClassVar[str | None] = "GEMINI_API_KEY"
    fallback_api_key_env: ClassVar[str] = "GOOGLE_API_KEY"
    base_url_env: ClassVar[str | None] = "GEMINI_BASE_URL"
    default_base_url: ClassVar[str | None] = "https://generativelanguage.googleapis.com"
    api_version: ClassVar[str] = "v1beta"

    # --- connection ------------------------------------------------------------------------------

    def has_credentials(self) -> bool:
        return bool(self._find_key())

    def api_key(self) -> str:
        key = self._find_key()
        if not key:
            raise MissingCredentials(
                f"provider {self.name!r} has no API key: set the environment variable "
                f"{self.api_key_env} on the worker (or api_key in the provider settings)",
                provider=self.name,
                env_var=self.api_key_env,
            )
        return key

    def _find_key(self) -> str | None:
        return (
            self.settings.api_key
            or self._environ.get(self.api_key_env or "")
            or self._environ.get(self.fallback_api_key_env)
        )

    def _auth_headers(self) -> dict[str, str]:
        return {"x-goog-api-key": self.api_key()}

    def _model_path(self, model: str, method: str) -> str:
        resource = model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"
        return f"/{self.api_version}/{resource}:{method}"

    # --- calls -----------------------------------------------------------------------------------

    async def chat(self, request: ChatRequest) -> ChatResponse:
        self.check_chat(request)
        payload = self._map_request(request)
        self.api_key()
        data = await self._post_json(
            self._model_path(request.model, "generateContent"), payload, model=request.model
        )
        return self._parse_response(data, request.model)

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        self.check_chat(request, stream=True)
        payload = self._map_request(request)
        self.api_key()
        return self._guard_stream(self._stream_events(request, payload), model=request.model)

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        self.check_embed(request)
        self.api_key()
        resource = request.model if request.model.startswith("models/") else f"models/{request.model}"
        entries: list[dict[str, Any]] = []
        for text in request.input:
            entry: dict[str, Any] = {"model": resource, "content": {"parts": [{"text": text}]}}
            if request.dimensions:
                entry["outputDimensionality"] = request.dimensions
            entries.append(entry)
        data = await self._post_json(
            self._model_path(request.model, "batchEmbedContents"), {"requests": entries}, model=request.model
        )
        try:
            vectors = [[float(x) for x in row["values"]] for row in data["embeddings"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise self._malformed(request.model, exc) from exc
        if len(vectors) != len(request.input):
            raise MalformedResponse(
                f"{self.name} returned {len(vectors)} embeddings for {len(request.input)} inputs",
                provider=self.name,
                model=request.model,
            )
        usage = data.get("usageMetadata") if isinstance(data, dict) else None
        prompt = int(usage.get("promptTokenCount") or 0) if isinstance(usage, dict) else 0
        return EmbedResponse(
            model=request.model, provider=self.name, embeddings=vectors, usage=Usage(prompt_tokens=prompt)
        )

    # --- batches (providers/gemini_batch.py) -------------------------------------------------------

    def batch_item_size(self, item: BatchItem) -> int:
        request = {"request": self._map_request(item.request), "metadata": {"key": item.custom_id}}
        return len(json.dumps(request, separators=(",", ":")).encode())

    async def batch_find(self, tag: str) -> BatchJob | None:
        return await gemini_batch.batch_find(self, tag)

    async def batch_create(self, tag: str, items: list[BatchItem]) -> BatchJob:
        return await gemini_batch.batch_create(self, tag, items)

    async def batch_status(self, batch_id: str) -> BatchJob:
        return await gemini_batch.batch_status(self, batch_id)

    async def batch_results(self, batch_id: str, custom_ids: list[str], model: str) -> list[BatchItemResult]:
        return await gemini_batch.batch_results(self, batch_id, custom_ids, model)

    async def batch_cancel(self, batch_id: str) -> BatchJob:
        return await gemini_batch.batch_cancel(self, batch_id)

    # --- errors ----------------------------------------------------------------------------------

    def _error_details(self, body: Any, text: str) -> tuple[str, str | None]:
        """Google's ``{"error": {"code", "message", "status"}}``, alone or wrapped in a list."""
        error = google_error(body)
        if error is None:
            return super()._error_details(body, text)
        message = str(error.get("message") or text[:300] or "(empty body)")
        status = error.get("status") or error.get("code")
        return message, None if status is None else str(status)

    def _status_error(self, response: httpx.Response, text: str, model: str | None) -> ProviderError:
        try:
            body: Any = json.loads(text) if text else None
        except ValueError:
            body = None
        return self._classify(response.status_code, body, text, model, response.headers)

    def _classify(
        self,
        status_code: int,
        body: Any,
        text: str,
        model: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> ProviderError:
        message, code = self._error_details(body, text)
        error = google_error(body) or {}
        reasons = {str(d.get("reason")) for d in error_details(error)}
        if "API_KEY_INVALID" in reasons or "API key not valid" in message:
            status_code = 401  # Google answers 400 INVALID_ARGUMENT for a wrong key
        exc = error_from_status(
            status_code,
            message,
            provider=self.name,
            model=model,
            code=code,
            headers=headers,
            body=text[:2000],
        )
        if exc.retry_after is None:
            exc.retry_after = retry_delay(error)
        return exc

    # --- mapping: request ------------------------------------------------------------------------

    def _map_request(self, request: ChatRequest) -> dict[str, Any]:
        legacy = bool(LEGACY_SCHEMA_MODELS.match(request.model))
        system: list[dict[str, Any]] = []
        contents: list[dict[str, Any]] = []
        call_names: dict[str, str] = {}
        vendor_ids: set[str] = set()
        for message in request.messages:
            if isinstance(message, SystemMessage | DeveloperMessage):
                system.append({"text": message_text(message)})
                continue
            if isinstance(message, UserMessage):
                role, parts = "user", self._user_parts(message)
            elif isinstance(message, AssistantMessage):
                role, parts = "model", self._model_parts(message)
                for call in message.tool_calls or []:
                    call_names[call.id] = call.function.name
                for part in parts:
                    vendor_id = (part.get("functionCall") or {}).get("id")
                    if vendor_id:
                        vendor_ids.add(str(vendor_id))
            else:
                role, parts = "user", [self._tool_result(message, call_names, vendor_ids)]
            if not parts:
                continue
            if contents and contents[-1]["role"] == role:
                contents[-1]["parts"].extend(parts)
            else:
                contents.append({"role": role, "parts": parts})
        if not contents:
            raise InvalidRequest(
                f"{self.name} needs at least one user or assistant message besides system messages",
                provider=self.name,
                model=request.model,
            )
        payload: dict[str, Any] = {"contents": contents}
        if system:
            payload["systemInstruction"] = {"parts": system}
        if request.tools:
            declarations = [self._declaration(tool.function, legacy=legacy) for tool in request.tools]
            payload["tools"] = [{"functionDeclarations": declarations}]
            if request.tool_choice is not None:
                payload["toolConfig"] = {"functionCallingConfig": _calling_config(request)}
        if request.cache is not None and request.cache.ttl is not None:
            raise UnsupportedCapability(
                f"{self.name} caches repeated prefixes on its own and has no cache ttl; remove cache.ttl "
                "(explicit cached content goes in provider_options.gemini.cachedContent)",
                provider=self.name,
                model=request.model,
            )
        config = self._generation_config(request, legacy=legacy)
        options = dict((request.provider_options or {}).get(self.name) or {})
        unknown = sorted(set(options) - _TOP_OPTIONS - _CONFIG_OPTIONS)
        if unknown:
            raise InvalidRequest(
                f"provider_options.{self.name}: {', '.join(unknown)} not accepted; it accepts "
                f"{', '.join(sorted(_TOP_OPTIONS | _CONFIG_OPTIONS))}",
                provider=self.name,
                model=request.model,
            )
        config.update({k: v for k, v in options.items() if k in _CONFIG_OPTIONS})
        payload.update({k: v for k, v in options.items() if k in _TOP_OPTIONS})
        if config:
            payload["generationConfig"] = config
        return payload

    def _user_parts(self, message: UserMessage) -> list[dict[str, Any]]:
        if isinstance(message.content, str):
            return [{"text": message.content}] if message.content else []
        parts: list[dict[str, Any]] = []
        for part in message.content:
            if isinstance(part, ImagePart):
                parts.append(_image_part(part.image_url.url))
            elif isinstance(part, DocumentPart):
                parts.append(_document_part(part))
            elif part.text:
                parts.append({"text": part.text})
        return parts

    def _model_parts(self, message: AssistantMessage) -> list[dict[str, Any]]:
        """The parts of a model turn: as Gemini sent them when this provider answered it (thought
        signatures must come back in the very part they arrived in), else built from the message."""
        state = message.state_for(self.name)
        stored = state.get("parts") if state else None
        if isinstance(stored, list) and stored:
            return [dict(part) for part in stored if isinstance(part, dict)]
        parts: list[dict[str, Any]] = []
        if message.content:
            parts.append({"text": message.content})
        for call in message.tool_calls or []:
            parts.append({"functionCall": {"name": call.function.name, "args": _call_args(call)}})
        return parts

    def _tool_result(
        self, message: ToolMessage, call_names: Mapping[str, str], vendor_ids: set[str]
    ) -> dict[str, Any]:
        name = call_names.get(message.tool_call_id)
        if name is None:
            raise InvalidRequest(
                f"tool message answers tool_call_id {message.tool_call_id!r}, but no earlier assistant "
                f"message made a call with that id ({self.name} needs the function's name)",
                provider=self.name,
            )
        text = message_text(message)
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        response = value if isinstance(value, dict) else {"output": value}
        result: dict[str, Any] = {"name": name, "response": response}
        if message.tool_call_id in vendor_ids:
            result["id"] = message.tool_call_id  # Gemini matches a result to its call by the id it gave
        return {"functionResponse": result}

    def _declaration(self, function: Any, *, legacy: bool) -> dict[str, Any]:
        declaration: dict[str, Any] = {"name": function.name}
        if function.description:
            declaration["description"] = function.description
        parameters: dict[str, Any] = function.parameters
        if parameters.get("properties"):
            if legacy:
                declaration["parameters"] = legacy_schema(parameters)
            else:
                declaration["parametersJsonSchema"] = parameters
        return declaration

    def _generation_config(self, request: ChatRequest, *, legacy: bool) -> dict[str, Any]:
        config: dict[str, Any] = {}
        for source, target in (
            ("temperature", "temperature"),
            ("top_p", "topP"),
            ("max_tokens", "maxOutputTokens"),
            ("stop", "stopSequences"),
            ("seed", "seed"),
            ("presence_penalty", "presencePenalty"),
            ("frequency_penalty", "frequencyPenalty"),
        ):
            value = getattr(request, source)
            if value is not None:
                config[target] = value
        thinking: dict[str, Any] = {}
        if request.thinking_budget is not None:
            thinking["thinkingBudget"] = request.thinking_budget
        if request.reasoning_effort == "none":
            thinking.setdefault("thinkingBudget", 0)
        elif request.reasoning_effort is not None:
            thinking["thinkingLevel"] = request.reasoning_effort
        if thinking:
            config["thinkingConfig"] = thinking
        response_format = request.response_format
        if isinstance(response_format, ResponseFormatJsonSchema):
            config["responseMimeType"] = "application/json"
            schema = response_format.json_schema.json_schema
            if legacy:
                config["responseSchema"] = legacy_schema(schema)
            else:
                config["responseJsonSchema"] = schema
        elif isinstance(response_format, ResponseFormatJsonObject):
            config["responseMimeType"] = "application/json"
        return config

    # --- mapping: response -----------------------------------------------------------------------

    def _map_usage(self, usage: Any) -> Usage:
        """Gemini counts thinking apart from ``candidatesTokenCount``; the kernel counts it inside."""
        if not isinstance(usage, dict):
            return Usage()
        prompt = as_int(
            usage.get("promptTokenCount"), "usageMetadata.promptTokenCount", optional=True
        ) + as_int(
            usage.get("toolUsePromptTokenCount"), "usageMetadata.toolUsePromptTokenCount", optional=True
        )
        thoughts = as_int(usage.get("thoughtsTokenCount"), "usageMetadata.thoughtsTokenCount", optional=True)
        completion = (
            as_int(usage.get("candidatesTokenCount"), "usageMetadata.candidatesTokenCount", optional=True)
            + thoughts
        )
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            cached_tokens=as_int(
                usage.get("cachedContentTokenCount"), "usageMetadata.cachedContentTokenCount", optional=True
            ),
            reasoning_tokens=thoughts,
        )

    def _parse_response(self, data: Any, model: str) -> ChatResponse:
        if not isinstance(data, dict):
            raise self._malformed(model, TypeError(f"expected a JSON object, got {type(data).__name__}"))
        self._check_blocked(data, model)
        try:
            candidates = data.get("candidates") or []
            if not candidates:
                raise MalformedResponse(
                    f"{self.name} answered without candidates", provider=self.name, model=model
                )
            candidate = as_object(candidates[0], "candidates[0]")
            text: list[str] = []
            calls: list[ToolCall] = []
            raw_parts = as_list(
                as_object(candidate.get("content"), "candidates[0].content", optional=True).get("parts"),
                "parts",
                optional=True,
            )
            for raw_part in raw_parts:
                part = as_object(raw_part, "parts[]")
                if "functionCall" in part:
                    calls.append(
                        self._tool_call(data, len(calls), as_object(part["functionCall"], "functionCall"))
                    )
                elif isinstance(part.get("text"), str) and not part.get("thought"):
                    text.append(part["text"])
            finish = _finish_reason(candidate.get("finishReason"), has_calls=bool(calls))
            content = "".join(text) or None
            if finish == "content_filter" and content is None and not calls:
                raise self._filtered(model, f"finishReason {candidate.get('finishReason')}")
            return ChatResponse(
                id=str(data.get("responseId") or ""),
                model=str(data.get("modelVersion") or model),
                provider=self.name,
                choices=[
                    Choice(
                        message=AssistantMessage(
                            content=content, tool_calls=calls or None, provider_state=self._state(raw_parts)
                        ),
                        finish_reason=finish,
                    )
                ],
                usage=self._map_usage(data.get("usageMetadata")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise self._malformed(model, exc) from exc

    def _tool_call(self, data: Mapping[str, Any], index: int, raw: Mapping[str, Any]) -> ToolCall:
        name = str(required(raw, "name", "functionCall"))
        arguments = json.dumps(raw.get("args") or {}, ensure_ascii=False)
        call_id = raw.get("id")
        if not call_id:
            seed = f"{data.get('responseId') or ''}:{index}:{name}:{arguments}"
            call_id = "call_" + hashlib.blake2b(seed.encode(), digest_size=12).hexdigest()
        return ToolCall(id=str(call_id), function=FunctionCall(name=name, arguments=arguments))

    def _state(self, parts: list[Any]) -> ProviderState | None:
        """The answer's parts, kept when they carry what Gemini needs back (a ``thoughtSignature`` or a
        call ``id``); answers without either leave no state."""
        if not any(
            isinstance(part, dict)
            and (part.get("thoughtSignature") or (part.get("functionCall") or {}).get("id"))
            for part in parts
        ):
            return None
        return ProviderState(provider=self.name, data={"parts": parts})

    def _check_blocked(self, data: Mapping[str, Any], model: str) -> None:
        feedback = data.get("promptFeedback")
        if isinstance(feedback, dict) and feedback.get("blockReason"):
            raise self._filtered(model, f"the prompt was blocked ({feedback['blockReason']})")

    def _filtered(self, model: str, why: str) -> ContentFiltered:
        return ContentFiltered(
            f"{self.name} model {model!r} refused to answer: {why}",
            provider=self.name,
            model=model,
            code="SAFETY",
        )

    async def _stream_events(
        self, request: ChatRequest, payload: dict[str, Any]
    ) -> AsyncIterator[StreamEvent]:
        path = self._model_path(request.model, "streamGenerateContent") + "?alt=sse"
        started = False
        calls = 0
        emitted = False
        finish: FinishReason | None = None
        raw_finish = ""
        usage = Usage()
        parts: list[dict[str, Any]] = []
        async with self._open_stream(path, payload, model=request.model) as response:
            async for sse in iter_sse(response):
                chunk = _loads(sse.data)
                if google_error(chunk) is not None:
                    error = google_error(chunk) or {}
                    code = as_int(error.get("code"), "error.code", optional=True) or 500
                    status = _STATUS_CODES.get(str(error.get("status")), code)
                    raise self._classify(status, chunk, sse.data, request.model)
                self._check_blocked(chunk, request.model)
                if chunk.get("usageMetadata"):
                    usage = self._map_usage(chunk["usageMetadata"])
                for raw_candidate in as_list(chunk.get("candidates"), "candidates", optional=True):
                    candidate = as_object(raw_candidate, "candidates[]")
                    if candidate.get("index", 0) != 0:
                        continue
                    deltas: list[StreamEvent] = []
                    content = as_object(candidate.get("content"), "candidates[].content", optional=True)
                    for raw_part in as_list(content.get("parts"), "parts", optional=True):
                        part = as_object(raw_part, "parts[]")
                        _keep_part(parts, part)
                        if "functionCall" in part:
                            call = self._tool_call(
                                chunk, calls, as_object(part["functionCall"], "functionCall")
                            )
                            deltas.append(
                                ToolCallDelta(
                                    index=calls,
                                    id=call.id,
                                    name=call.function.name,
                                    arguments=call.function.arguments,
                                )
                            )
                            calls += 1
                        elif isinstance(part.get("text"), str) and part["text"] and not part.get("thought"):
                            deltas.append(TextDelta(text=part["text"]))
                    if candidate.get("finishReason"):
                        raw_finish = str(candidate["finishReason"])
                        finish = _finish_reason(raw_finish, has_calls=calls > 0)
                    if deltas and not started:
                        started = True
                        yield self._start(chunk, request.model)
                    for delta in deltas:
                        emitted = True
                        yield delta
        if finish is None:
            return  # the guard reports a stream that ended without a finish reason
        if finish == "content_filter" and not emitted:
            raise self._filtered(request.model, f"finishReason {raw_finish}")
        if not started:
            yield self._start({}, request.model)
        state = self._state(parts)
        if state is not None:
            yield ProviderStateEvent(state=state)
        yield StreamDone(finish_reason=finish, usage=usage)

    def _start(self, chunk: Mapping[str, Any], model: str) -> StreamStart:
        return StreamStart(
            id=str(chunk.get("responseId") or ""),
            model=str(chunk.get("modelVersion") or model),
            provider=self.name,
        )

    def _malformed(self, model: str, exc: Exception) -> MalformedResponse:
        return MalformedResponse(
            f"{self.name} answered with an unexpected shape ({type(exc).__name__}: {exc})",
            provider=self.name,
            model=model,
        )


# --- helpers -------------------------------------------------------------------------------------


def _keep_part(parts: list[dict[str, Any]], part: Any) -> None:
    """Collect a streamed part; consecutive plain text pieces (no signature) become one part, since a
    part holding a signature must stay apart but plain text may be joined."""
    if not isinstance(part, dict):
        return
    plain = set(part) <= {"text", "thought"} and isinstance(part.get("text"), str)
    last = parts[-1] if parts else None
    if (
        plain
        and last is not None
        and set(last) <= {"text", "thought"}
        and isinstance(last.get("text"), str)
        and bool(last.get("thought")) == bool(part.get("thought"))
    ):
        last["text"] += part["text"]
    else:
        parts.append(dict(part))


def _finish_reason(raw: Any, *, has_calls: bool) -> FinishReason:
    finish = _FINISH_REASONS.get(str(raw), "stop") if raw else "stop"
    return "tool_calls" if finish == "stop" and has_calls else finish


def _calling_config(request: ChatRequest) -> dict[str, Any]:
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        return {"mode": "ANY", "allowedFunctionNames": [choice.function.name]}
    return {"mode": _TOOL_MODES[str(choice)]}


def _call_args(call: ToolCall) -> dict[str, Any]:
    try:
        args = call.function.parsed_arguments()
    except ValueError as exc:
        raise InvalidRequest(
            f"tool call {call.id!r} has arguments that are not JSON: {call.function.arguments[:80]!r}",
            provider="gemini",
        ) from exc
    return args if isinstance(args, dict) else {"value": args}


def _image_part(url: str) -> dict[str, Any]:
    match = _DATA_URL.match(url)
    if match:
        return {"inlineData": {"mimeType": match.group(1), "data": match.group(2)}}
    mime_type = mimetypes.guess_type(url.split("?", 1)[0])[0] or "image/jpeg"
    return {"fileData": {"mimeType": mime_type, "fileUri": url}}


def _document_part(part: DocumentPart) -> dict[str, Any]:
    source = part.file
    if source.file_data is not None:
        return {"inlineData": {"mimeType": source.media_type, "data": source.file_data.split(",", 1)[1]}}
    return {"fileData": {"mimeType": source.media_type, "fileUri": source.url or source.file_id}}


def _loads(data: str) -> dict[str, Any]:
    """A stream chunk: a JSON object, or (as some proxies send it) an array holding one."""
    if data.lstrip().startswith("["):
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise WireShapeError(f"a stream chunk is not JSON ({exc}): {data[:80]!r}") from exc
        if isinstance(value, list) and len(value) == 1:
            return as_object(value[0], "a stream chunk")
        raise WireShapeError(f"a stream chunk should be an object, got an array: {data[:80]!r}")
    return loads_object(data, "a stream chunk")

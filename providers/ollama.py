"""Ollama's native API: ``/api/chat`` (JSON or NDJSON stream) and ``/api/embed``.

No API key. The server is found through ``OLLAMA_HOST`` the way Ollama's own CLI reads it
(``host:port`` without a scheme means plain HTTP). Tool calls arrive with their arguments as a JSON
object and usually without ids, so ids are derived from the call itself: the same answer always carries
the same ids, streamed or not. Tool results go back as ``role: tool`` messages naming the tool.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from kernel.contracts import (
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    Choice,
    DeveloperMessage,
    EmbedRequest,
    EmbedResponse,
    FinishReason,
    FunctionCall,
    ImagePart,
    NamedToolChoice,
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
from kernel.errors import InvalidRequest, MalformedResponse, error_from_status
from kernel.provider import Capabilities
from providers._http import HttpProvider, as_int, as_list, as_object, iter_ndjson, required

__all__ = ["OllamaProvider", "parse_ollama_host"]

_FINISH_REASONS: dict[str | None, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "load": "stop",
    "unload": "stop",
    None: "stop",
}
_DEFAULT_PORT = "11434"
_THINK: dict[str, bool | str] = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
}
_MODEL_OPTIONS = frozenset(
    [
        "num_ctx",
        "num_keep",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "top_k",
        "min_p",
        "typical_p",
        "repeat_last_n",
        "repeat_penalty",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "penalize_newline",
        "numa",
        "use_mmap",
    ]
)
"""Model options (``options``) of Ollama's ``/api/chat`` the contract does not type."""


def parse_ollama_host(value: str) -> str:
    """A base URL from an ``OLLAMA_HOST`` value: ``host``, ``host:port`` or a full URL."""
    value = value.strip()
    scheme, sep, rest = value.partition("://")
    default_port = _DEFAULT_PORT
    if not sep:
        scheme, rest = "http", value
    elif scheme in ("http", "https"):
        default_port = "80" if scheme == "http" else "443"
    hostport, _, path = rest.partition("/")
    host, port = hostport, default_port
    if hostport.startswith("["):  # [ipv6]:port
        end = hostport.find("]")
        host, tail = hostport[: end + 1], hostport[end + 1 :]
        port = tail[1:] if tail.startswith(":") and tail[1:] else default_port
    elif hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
        port = port or default_port
    host = host or "127.0.0.1"
    suffix = f"/{path.strip('/')}" if path.strip("/") else ""
    return f"{scheme}://{host}:{port}{suffix}"


class OllamaProvider(HttpProvider):
    name = "ollama"
    version = "1.0.0"
    kernel_api = (1, 1)
    description = "Ollama's native chat and embeddings API (a local or remote Ollama server)"
    capabilities = Capabilities(embeddings=True, vision=True, json_schema_mode="native")
    api_key_env: ClassVar[str | None] = None
    base_url_env: ClassVar[str | None] = "OLLAMA_HOST"
    default_base_url: ClassVar[str | None] = "http://127.0.0.1:11434"
    unsupported_options: ClassVar[frozenset[str]] = frozenset(
        {"user", "parallel_tool_calls", "thinking_budget", "service_tier", "cache"}
    )
    chat_path: ClassVar[str] = "/api/chat"
    embed_path: ClassVar[str] = "/api/embed"

    @property
    def base_url(self) -> str:
        if self.settings.base_url:
            return self.settings.base_url.rstrip("/")
        host = self._environ.get("OLLAMA_HOST", "").strip()
        return parse_ollama_host(host) if host else str(self.default_base_url)

    def _auth_headers(self) -> dict[str, str]:
        return {}

    # --- calls -----------------------------------------------------------------------------------

    async def chat(self, request: ChatRequest) -> ChatResponse:
        self.check_chat(request)
        payload = self._map_request(request, stream=False)
        data = await self._post_json(self.chat_path, payload, model=request.model)
        if not isinstance(data, dict):
            raise self._malformed(request.model, TypeError(f"expected an object, got {type(data).__name__}"))
        return self._parse_response(data, request.model)

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        self.check_chat(request, stream=True)
        payload = self._map_request(request, stream=True)
        return self._guard_stream(self._stream_events(request, payload), model=request.model)

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        self.check_embed(request)
        payload: dict[str, Any] = {"model": request.model, "input": request.input}
        if request.dimensions:
            payload["dimensions"] = request.dimensions
        data = await self._post_json(self.embed_path, payload, model=request.model)
        try:
            vectors = [[float(x) for x in row] for row in data["embeddings"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise self._malformed(request.model, exc) from exc
        if len(vectors) != len(request.input):
            raise MalformedResponse(
                f"{self.name} returned {len(vectors)} embeddings for {len(request.input)} inputs",
                provider=self.name,
                model=request.model,
            )
        prompt = int(data.get("prompt_eval_count") or 0)
        return EmbedResponse(
            model=str(data.get("model") or request.model),
            provider=self.name,
            embeddings=vectors,
            usage=Usage(prompt_tokens=prompt),
        )

    # --- mapping ---------------------------------------------------------------------------------

    def _map_request(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": request.model,
            "messages": self._map_messages(request),
            "stream": stream,
        }
        tools = request.tools or []
        choice = request.tool_choice
        if isinstance(choice, NamedToolChoice):
            # Ollama cannot force a tool; offering only the named one is the closest it gets.
            tools = [t for t in tools if t.function.name == choice.function.name]
        if tools and choice != "none":
            payload["tools"] = [tool.model_dump(mode="json", exclude_none=True) for tool in tools]
        if isinstance(request.response_format, ResponseFormatJsonSchema):
            payload["format"] = request.response_format.json_schema.json_schema
        elif isinstance(request.response_format, ResponseFormatJsonObject):
            payload["format"] = "json"
        options: dict[str, Any] = {
            "temperature": request.temperature,
            "top_p": request.top_p,
            "num_predict": request.max_tokens,
            "stop": request.stop,
            "seed": request.seed,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
        }
        options = {key: value for key, value in options.items() if value is not None}
        extra = dict((request.provider_options or {}).get(self.name) or {})
        unknown = sorted(set(extra) - {"keep_alive", "options"})
        unknown += [f"options.{k}" for k in sorted(set(extra.get("options") or {}) - _MODEL_OPTIONS)]
        if unknown:
            raise InvalidRequest(
                f"provider_options.{self.name}: {', '.join(unknown)} not accepted; it accepts keep_alive and "
                f"options.{{{', '.join(sorted(_MODEL_OPTIONS))}}}",
                provider=self.name,
                model=request.model,
            )
        options.update(extra.pop("options", None) or {})
        payload.update(extra)
        if options:
            payload["options"] = options
        if request.reasoning_effort is not None:
            payload["think"] = _THINK[request.reasoning_effort]
        return payload

    def _map_messages(self, request: ChatRequest) -> list[dict[str, Any]]:
        tool_names: dict[str, str] = {}
        mapped: list[dict[str, Any]] = []
        for index, message in enumerate(request.messages):
            if isinstance(message, SystemMessage | DeveloperMessage):
                mapped.append({"role": "system", "content": message_text(message)})
            elif isinstance(message, UserMessage):
                entry: dict[str, Any] = {"role": "user", "content": message_text(message)}
                if not isinstance(message.content, str):
                    images = [
                        _image_base64(part.image_url.url, f"messages[{index}]")
                        for part in message.content
                        if isinstance(part, ImagePart)
                    ]
                    if images:
                        entry["images"] = images
                mapped.append(entry)
            elif isinstance(message, ToolMessage):
                entry = {"role": "tool", "content": message_text(message)}
                name = tool_names.get(message.tool_call_id)
                if name:
                    entry["tool_name"] = name
                mapped.append(entry)
            else:
                entry = {"role": "assistant", "content": message.content or ""}
                if message.tool_calls:
                    calls = []
                    for call in message.tool_calls:
                        tool_names[call.id] = call.function.name
                        try:
                            arguments = call.function.parsed_arguments()
                        except ValueError as exc:
                            raise InvalidRequest(
                                f"messages[{index}].tool_calls: the arguments of {call.function.name!r} "
                                f"are not valid JSON ({exc})",
                                provider=self.name,
                                model=request.model,
                            ) from exc
                        calls.append({"function": {"name": call.function.name, "arguments": arguments}})
                    entry["tool_calls"] = calls
                mapped.append(entry)
        return mapped

    def _map_usage(self, data: dict[str, Any]) -> Usage:
        return Usage(
            prompt_tokens=as_int(data.get("prompt_eval_count"), "prompt_eval_count", optional=True),
            completion_tokens=as_int(data.get("eval_count"), "eval_count", optional=True),
        )

    def _tool_calls(self, message: dict[str, Any], offset: int = 0) -> list[ToolCall]:
        calls: list[ToolCall] = []
        for position, raw in enumerate(
            as_list(message.get("tool_calls"), "tool_calls", optional=True), start=offset
        ):
            call = as_object(raw, "tool_calls[]")
            function = as_object(required(call, "function", "tool_calls[]"), "tool_calls[].function")
            name = str(required(function, "name", "tool_calls[].function"))
            arguments = function.get("arguments")
            text = arguments if isinstance(arguments, str) else _dumps(arguments or {})
            call_id = call.get("id") or _call_id(position, name, text)
            calls.append(ToolCall(id=str(call_id), function=FunctionCall(name=name, arguments=text)))
        return calls

    def _parse_response(self, data: dict[str, Any], model: str) -> ChatResponse:
        if data.get("error"):
            raise self._stream_error(str(data["error"]), model)
        try:
            message = as_object(data["message"], "message")
            calls = self._tool_calls(message)
            finish = "tool_calls" if calls else _FINISH_REASONS.get(data.get("done_reason"), "stop")
            return ChatResponse(
                id=_response_id(data, model),
                model=str(data.get("model") or model),
                provider=self.name,
                choices=[
                    Choice(
                        message=AssistantMessage(
                            content=message.get("content") or None, tool_calls=calls or None
                        ),
                        finish_reason=finish,
                    )
                ],
                usage=self._map_usage(data),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise self._malformed(model, exc) from exc

    async def _stream_events(
        self, request: ChatRequest, payload: dict[str, Any]
    ) -> AsyncIterator[StreamEvent]:
        started = False
        tool_count = 0
        async with self._open_stream(self.chat_path, payload, model=request.model) as response:
            async for line in iter_ndjson(response):
                chunk = as_object(line, "a stream line")
                if chunk.get("error"):
                    raise self._stream_error(str(chunk["error"]), request.model)
                if not started:
                    started = True
                    yield StreamStart(
                        id=_response_id(chunk, request.model),
                        model=str(chunk.get("model") or request.model),
                        provider=self.name,
                    )
                message = as_object(chunk.get("message"), "message", optional=True)
                if message.get("content"):
                    yield TextDelta(text=str(message["content"]))
                for call in self._tool_calls(message, offset=tool_count):
                    yield ToolCallDelta(
                        index=tool_count,
                        id=call.id,
                        name=call.function.name,
                        arguments=call.function.arguments,
                    )
                    tool_count += 1
                if chunk.get("done"):
                    reason = _FINISH_REASONS.get(str(chunk.get("done_reason")), "stop")
                    finish: FinishReason = "tool_calls" if tool_count else reason
                    yield StreamDone(finish_reason=finish, usage=self._map_usage(chunk))
                    return

    def _stream_error(self, message: str, model: str) -> Exception:
        status = 404 if "not found" in message.lower() else 500
        return error_from_status(status, message, provider=self.name, model=model)

    def _malformed(self, model: str, exc: Exception) -> MalformedResponse:
        return MalformedResponse(
            f"{self.name} answered with an unexpected shape ({type(exc).__name__}: {exc})",
            provider=self.name,
            model=model,
        )


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _call_id(position: int, name: str, arguments: str) -> str:
    digest = hashlib.blake2b(f"{position}:{name}:{arguments}".encode(), digest_size=12).hexdigest()
    return f"call_{digest}"


def _response_id(data: dict[str, Any], model: str) -> str:
    """Ollama sends no response id; its creation time and model name make a stable one."""
    seed = f"{data.get('model') or model}:{data.get('created_at') or ''}"
    return "ollama-" + hashlib.blake2b(seed.encode(), digest_size=8).hexdigest()


def _image_base64(url: str, where: str) -> str:
    if url.startswith("data:") and ";base64," in url:
        return url.partition(";base64,")[2]
    raise InvalidRequest(
        f"{where}: Ollama takes images as base64 data, so an image_url must be a data: URL "
        f"with base64 bytes, not {url[:60]!r}",
        provider="ollama",
    )

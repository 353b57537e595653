"""Anthropic's Messages API (``POST /v1/messages``).

The kernel speaks OpenAI's shape, so the mapping is real work: system messages move to the top-level
``system`` field, tool calls and tool results become ``tool_use`` / ``tool_result`` content blocks (tool
results travel in a user turn, consecutive ones merged), ``max_tokens`` is always sent because Anthropic
requires it, and usage is converted (Anthropic's ``input_tokens`` leaves out cache reads and writes).

Structured output is native: ``output_config.format`` with a JSON schema. Models that predate it get the
schema as a forced tool whose input is returned as the answer's text.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

from kernel.contracts import (
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    Choice,
    DeveloperMessage,
    DocumentPart,
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
    TextPart,
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
    ProviderError,
    UnsupportedCapability,
    error_from_status,
)
from kernel.provider import Capabilities
from providers._http import (
    HttpProvider,
    as_int,
    as_list,
    as_object,
    as_text,
    iter_sse,
    loads_object,
    required,
)

__all__ = ["AnthropicProvider"]

_FINISH_REASONS: dict[str | None, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    None: "stop",
}
# Anthropic's error types, for errors that arrive inside a stream without an HTTP status of their own.
_ERROR_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
# Models without ``output_config.format``: structured output goes through a forced tool instead.
_TOOL_SCHEMA_MODELS = re.compile(r"^claude-(3|instant|2|sonnet-4(-0|-\d{8}|$)|opus-4(-0|-1|-\d{8}|$))")
_DATA_URL = re.compile(r"^data:(?P<media>[\w/+.-]+);base64,(?P<data>.*)$", re.DOTALL)
_JSON_OBJECT_INSTRUCTION = "Answer with a single JSON object and nothing else."
ANTHROPIC_VERSION = "2023-06-01"
_MIN_THINKING_BUDGET = 1024
_SERVICE_TIERS = {"auto": "auto", "default": "standard_only"}
_PROVIDER_OPTIONS = frozenset({"top_k", "metadata", "container", "mcp_servers", "context_management"})
"""Messages API fields the contract does not type, accepted under ``provider_options.anthropic``
(https://docs.claude.com/en/api/messages)."""
_CONTENT_FILTER_WORDING = "content filtering policy"


class AnthropicProvider(HttpProvider):
    name = "anthropic"
    version = "1.0.0"
    kernel_api = (1, 1)
    description = "Anthropic Messages API (api.anthropic.com or any compatible base URL); no embeddings"
    capabilities = Capabilities(embeddings=False, vision=True, documents=True, json_schema_mode="native")
    batch_unsupported_reason: ClassVar[str | None] = (
        "Message Batches carry no metadata, so a batch cannot be found again by its tag and a worker "
        "killed after Anthropic accepted one would submit it twice"
    )
    # Anthropic caches by prefix, so cache.key needs no field; breakpoints and ttl become cache_control.
    unsupported_options: ClassVar[frozenset[str]] = frozenset(
        {"seed", "presence_penalty", "frequency_penalty", "reasoning_effort"}
    )
    option_ranges: ClassVar[Mapping[str, tuple[float | None, float | None]]] = {"temperature": (0, 1)}
    api_key_env: ClassVar[str | None] = "ANTHROPIC_API_KEY"
    base_url_env: ClassVar[str | None] = "ANTHROPIC_BASE_URL"
    default_base_url: ClassVar[str | None] = "https://api.anthropic.com"
    messages_path: ClassVar[str] = "/v1/messages"
    default_max_tokens: ClassVar[int] = 4096
    """Sent when the request gives no ``max_tokens`` (Anthropic refuses a request without one)."""

    # --- connection ------------------------------------------------------------------------------

    def _auth_headers(self) -> dict[str, str]:
        return {"x-api-key": self.api_key(), "anthropic-version": ANTHROPIC_VERSION}

    def _error_details(self, body: Any, text: str) -> tuple[str, str | None]:
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and isinstance(error.get("type"), str):
            message = str(error.get("message") or text[:300])
            # Anthropic refuses filtered output with a plain invalid_request_error; only the wording says so.
            if _CONTENT_FILTER_WORDING in message.lower():
                return message, "content_filter"
            return message, error["type"]
        return super()._error_details(body, text)

    # --- calls -----------------------------------------------------------------------------------

    async def chat(self, request: ChatRequest) -> ChatResponse:
        self.check_chat(request)
        payload = self._map_request(request, stream=False)
        data = await self._post_json(self.messages_path, payload, model=request.model)
        return self._parse_response(data, request)

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        self.check_chat(request, stream=True)
        payload = self._map_request(request, stream=True)
        return self._guard_stream(self._stream_events(request, payload), model=request.model)

    # --- request mapping -------------------------------------------------------------------------

    def _map_request(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        """The Messages API body. Raises ``InvalidRequest`` naming the field for what Anthropic refuses."""
        self.api_key()  # missing credentials are reported before anything else
        system, messages = self._map_messages(request)
        payload: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens or self.default_max_tokens,
            "messages": messages,
        }
        if request.temperature is not None:
            payload["temperature"] = request.temperature
        if request.top_p is not None:
            payload["top_p"] = request.top_p
        if request.stop:
            payload["stop_sequences"] = list(request.stop)
        if request.user:
            payload["metadata"] = {"user_id": request.user}
        self._map_thinking(request, payload)
        if request.service_tier is not None:
            tier = _SERVICE_TIERS.get(request.service_tier)
            if tier is None:
                raise InvalidRequest(
                    f"service_tier={request.service_tier!r}: {self.name} offers auto and default "
                    "(standard_only) only",
                    provider=self.name,
                    model=request.model,
                )
            payload["service_tier"] = tier
        tools = [
            {
                "name": tool.function.name,
                **({"description": tool.function.description} if tool.function.description else {}),
                "input_schema": tool.function.parameters,
                **({"strict": tool.function.strict} if tool.function.strict is not None else {}),
            }
            for tool in request.tools or []
        ]
        tool_choice = self._map_tool_choice(request) if tools else None
        response_format = request.response_format
        if isinstance(response_format, ResponseFormatJsonSchema):
            schema = response_format.json_schema
            if self._schema_via_tool(request.model):
                tools.append(
                    {
                        "name": schema.name,
                        "description": schema.description or "Record the answer in this exact shape.",
                        "input_schema": schema.json_schema,
                    }
                )
                tool_choice = {"type": "tool", "name": schema.name}
            else:
                payload["output_config"] = {"format": {"type": "json_schema", "schema": schema.json_schema}}
        elif isinstance(response_format, ResponseFormatJsonObject):
            if isinstance(system, list):
                system = [*system, {"type": "text", "text": _JSON_OBJECT_INSTRUCTION}]
            else:
                system = f"{system}\n\n{_JSON_OBJECT_INSTRUCTION}" if system else _JSON_OBJECT_INSTRUCTION
        if system:
            payload["system"] = system
        if tools:
            payload["tools"] = tools
        if tool_choice is not None:
            payload["tool_choice"] = tool_choice
        payload.update(self._provider_options(request, payload))
        if stream:
            payload["stream"] = True
        return payload

    def _map_thinking(self, request: ChatRequest, payload: dict[str, Any]) -> None:
        """``thinking_budget`` as extended thinking; ``max_tokens`` must leave room for the answer."""
        budget = request.thinking_budget
        if budget is None:
            return
        if budget == 0:
            payload["thinking"] = {"type": "disabled"}
            return
        if budget < _MIN_THINKING_BUDGET:
            raise InvalidRequest(
                f"thinking_budget={budget} is below {self.name}'s minimum of {_MIN_THINKING_BUDGET} tokens "
                "(0 turns thinking off)",
                provider=self.name,
                model=request.model,
            )
        if request.max_tokens is None:
            payload["max_tokens"] = budget + self.default_max_tokens
        elif request.max_tokens <= budget:
            raise InvalidRequest(
                f"max_tokens={request.max_tokens} must be above thinking_budget={budget} for {self.name} "
                "(the budget is part of max_tokens)",
                provider=self.name,
                model=request.model,
            )
        payload["thinking"] = {"type": "enabled", "budget_tokens": budget}

    def _provider_options(self, request: ChatRequest, payload: dict[str, Any]) -> dict[str, Any]:
        options = (request.provider_options or {}).get(self.name)
        if not options:
            return {}
        unknown = sorted(set(options) - _PROVIDER_OPTIONS)
        clash = sorted(set(options) & set(payload))
        if unknown or clash:
            problems = [
                f"{', '.join(unknown)} not accepted (it accepts {', '.join(sorted(_PROVIDER_OPTIONS))})"
            ]
            problems = problems if unknown else []
            if clash:
                problems.append(f"{', '.join(clash)} already set by the request")
            raise InvalidRequest(
                f"provider_options.{self.name}: {'; '.join(problems)}",
                provider=self.name,
                model=request.model,
            )
        return dict(options)

    def _schema_via_tool(self, model: str) -> bool:
        return bool(_TOOL_SCHEMA_MODELS.match(model))

    def _map_tool_choice(self, request: ChatRequest) -> dict[str, Any] | None:
        choice = request.tool_choice
        mapped: dict[str, Any]
        if isinstance(choice, NamedToolChoice):
            mapped = {"type": "tool", "name": choice.function.name}
        elif choice == "none":
            return {"type": "none"}
        elif choice == "required":
            mapped = {"type": "any"}
        elif choice == "auto" or request.parallel_tool_calls is False:
            mapped = {"type": "auto"}
        else:
            return None
        if request.parallel_tool_calls is False:
            mapped["disable_parallel_tool_use"] = True
        return mapped

    def _map_messages(self, request: ChatRequest) -> tuple[str | list[dict[str, Any]], list[dict[str, Any]]]:
        """(system, turns). Consecutive turns of one role are merged, so the tool results answering
        one assistant turn arrive together in a single user turn, as Anthropic requires. A cache
        breakpoint marks the last block of its message with ``cache_control`` (the system then goes as
        blocks, since only a block can carry the mark)."""
        system: list[dict[str, Any]] = []
        turns: list[dict[str, Any]] = []
        breakpoints = set(request.cache.breakpoints) if request.cache else set()
        mark: dict[str, Any] = {"type": "ephemeral"}
        if request.cache and request.cache.ttl:
            mark["ttl"] = request.cache.ttl

        def add(role: str, blocks: list[dict[str, Any]]) -> None:
            if not blocks:
                return
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"].extend(blocks)
            else:
                turns.append({"role": role, "content": blocks})

        for position, message in enumerate(request.messages):
            if isinstance(message, SystemMessage | DeveloperMessage):
                if message_text(message):
                    system.append({"type": "text", "text": message_text(message)})
                    if position in breakpoints:
                        system[-1]["cache_control"] = dict(mark)
                continue
            if isinstance(message, UserMessage):
                add("user", self._user_blocks(message, position, request.model))
            elif isinstance(message, ToolMessage):
                result: dict[str, Any] = {
                    "type": "tool_result",
                    "tool_use_id": message.tool_call_id,
                    "content": message_text(message),
                }
                add("user", [result])
            else:
                state = message.state_for(self.name)
                # Signed thinking blocks go back first and unchanged: Anthropic requires them on the
                # assistant turn of a tool use when thinking is on.
                blocks: list[dict[str, Any]] = [
                    dict(block) for block in (state or {}).get("thinking") or [] if isinstance(block, dict)
                ]
                if message.content:
                    blocks.append({"type": "text", "text": message.content})
                for call in message.tool_calls or []:
                    blocks.append(
                        {
                            "type": "tool_use",
                            "id": call.id,
                            "name": call.function.name,
                            "input": self._call_input(call, position, request.model),
                        }
                    )
                add("assistant", blocks)
            if position in breakpoints and turns and turns[-1]["content"]:
                turns[-1]["content"][-1]["cache_control"] = dict(mark)
        if any("cache_control" in block for block in system):
            return system, turns
        return "\n\n".join(block["text"] for block in system), turns

    def _user_blocks(self, message: UserMessage, position: int, model: str) -> list[dict[str, Any]]:
        if isinstance(message.content, str):
            return [{"type": "text", "text": message.content}] if message.content else []
        blocks: list[dict[str, Any]] = []
        for part in message.content:
            if isinstance(part, TextPart):
                if part.text:
                    blocks.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                blocks.append({"type": "image", "source": self._image_source(part, position, model)})
            elif isinstance(part, DocumentPart):
                blocks.append({"type": "document", "source": self._document_source(part, position, model)})
        return blocks

    def _document_source(self, part: DocumentPart, position: int, model: str) -> dict[str, Any]:
        source = part.file
        if source.file_data is not None:
            return {
                "type": "base64",
                "media_type": source.media_type,
                "data": source.file_data.split(",", 1)[1],
            }
        if source.url is not None:
            return {"type": "url", "url": source.url}
        raise UnsupportedCapability(
            f"messages[{position}]: {self.name} takes documents as file_data or url here; a file_id needs "
            "Anthropic's Files API beta",
            provider=self.name,
            model=model,
        )

    def _image_source(self, part: ImagePart, position: int, model: str) -> dict[str, Any]:
        url = part.image_url.url
        if url.startswith("data:"):
            match = _DATA_URL.match(url)
            if match is None:
                raise InvalidRequest(
                    f"messages[{position}] has an image data: URL that is not base64 "
                    f"('data:<media type>;base64,<bytes>' is required), got {url[:40]!r}",
                    provider=self.name,
                    model=model,
                )
            return {"type": "base64", "media_type": match["media"], "data": match["data"]}
        return {"type": "url", "url": url}

    def _call_input(self, call: ToolCall, position: int, model: str) -> dict[str, Any]:
        try:
            arguments = call.function.parsed_arguments()
        except ValueError as exc:
            raise InvalidRequest(
                f"messages[{position}].tool_calls id {call.id!r} has arguments that are not JSON: {exc}",
                provider=self.name,
                model=model,
            ) from exc
        if not isinstance(arguments, dict):
            raise InvalidRequest(
                f"messages[{position}].tool_calls id {call.id!r} has arguments that are not a JSON object "
                f"(Anthropic needs an object), got {call.function.arguments[:60]!r}",
                provider=self.name,
                model=model,
            )
        return arguments

    # --- response mapping ------------------------------------------------------------------------

    def _map_usage(self, usage: Any) -> Usage:
        """Anthropic counts cache reads and writes apart from ``input_tokens``; the kernel counts them in."""
        if not isinstance(usage, dict):
            return Usage()
        cache_read = as_int(
            usage.get("cache_read_input_tokens"), "usage.cache_read_input_tokens", optional=True
        )
        cache_write = as_int(
            usage.get("cache_creation_input_tokens"), "usage.cache_creation_input_tokens", optional=True
        )
        details = usage.get("output_tokens_details") or {}
        return Usage(
            prompt_tokens=as_int(usage.get("input_tokens"), "usage.input_tokens", optional=True)
            + cache_read
            + cache_write,
            completion_tokens=as_int(usage.get("output_tokens"), "usage.output_tokens", optional=True),
            cached_tokens=cache_read,
            cache_write_tokens=cache_write,
            reasoning_tokens=as_int(
                details.get("thinking_tokens"), "usage.output_tokens_details.thinking_tokens", optional=True
            )
            if isinstance(details, dict)
            else 0,
        )

    def _schema_tool_name(self, request: ChatRequest) -> str | None:
        """The forced tool carrying structured output, when that is how this request asks for it."""
        if isinstance(request.response_format, ResponseFormatJsonSchema) and self._schema_via_tool(
            request.model
        ):
            return request.response_format.json_schema.name
        return None

    def _parse_response(self, data: Any, request: ChatRequest) -> ChatResponse:
        model = request.model
        schema_tool = self._schema_tool_name(request)
        try:
            data = as_object(data, "the answer")
            if data.get("type") == "error":
                raise self._error_in_body(data, model)
            text: list[str] = []
            calls: list[ToolCall] = []
            thinking: list[dict[str, Any]] = []
            stop_reason = data.get("stop_reason")
            for raw_block in as_list(data["content"], "content"):
                block = as_object(raw_block, "content[]")
                kind = block["type"]
                if kind in ("thinking", "redacted_thinking"):
                    thinking.append(block)
                elif kind == "text":
                    text.append(block["text"])
                elif kind == "tool_use" and block["name"] == schema_tool:
                    text.append(json.dumps(block["input"], separators=(",", ":")))
                    stop_reason = "end_turn" if stop_reason == "tool_use" else stop_reason
                elif kind == "tool_use":
                    arguments = json.dumps(block["input"], separators=(",", ":"))
                    calls.append(
                        ToolCall(
                            id=block["id"], function=FunctionCall(name=block["name"], arguments=arguments)
                        )
                    )
            finish = _FINISH_REASONS.get(stop_reason, "stop")
            response = ChatResponse(
                id=str(data.get("id") or ""),
                model=str(data.get("model") or model),
                provider=self.name,
                choices=[
                    Choice(
                        message=AssistantMessage(
                            content="".join(text) or None,
                            tool_calls=calls or None,
                            provider_state=self._state(thinking),
                        ),
                        finish_reason=finish,
                    )
                ],
                usage=self._map_usage(data.get("usage")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise self._malformed(model, exc) from exc
        if response.finish_reason == "content_filter" and not response.text and not response.tool_calls:
            raise ContentFiltered(
                f"{self.name} refused to answer with model {model!r}", provider=self.name, model=model
            )
        return response

    async def _stream_events(
        self, request: ChatRequest, payload: dict[str, Any]
    ) -> AsyncIterator[StreamEvent]:
        schema_tool = self._schema_tool_name(request)
        usage: dict[str, Any] = {}
        stop_reason: str | None = None
        tool_index: dict[int, int] = {}  # content block index -> tool call ordinal
        schema_blocks: set[int] = set()  # content blocks whose JSON input is the answer's text
        sent_arguments: set[int] = set()
        thinking: dict[int, dict[str, Any]] = {}  # content block index -> thinking block being built
        async with self._open_stream(self.messages_path, payload, model=request.model) as response:
            async for sse in iter_sse(response):
                if sse.event == "ping":
                    continue
                event = loads_object(sse.data, f"the {sse.event} event")
                kind = event.get("type", sse.event)
                if kind == "error":
                    raise self._error_in_body(event, request.model)
                if kind == "message_start":
                    message = as_object(required(event, "message", kind), "message_start.message")
                    usage.update(as_object(message.get("usage"), "message.usage", optional=True))
                    yield StreamStart(
                        id=str(message.get("id") or ""),
                        model=str(message.get("model") or request.model),
                        provider=self.name,
                    )
                elif kind == "content_block_start":
                    index = as_int(required(event, "index", kind), f"{kind}.index")
                    block = as_object(required(event, "content_block", kind), f"{kind}.content_block")
                    block_type = block.get("type")
                    if block_type in ("thinking", "redacted_thinking"):
                        thinking[index] = dict(block)
                    elif block_type == "text" and block.get("text"):
                        yield TextDelta(text=as_text(block["text"], f"{kind}.content_block.text") or "")
                    elif block_type == "tool_use" and block.get("name") == schema_tool:
                        schema_blocks.add(index)
                    elif block_type == "tool_use":
                        tool_index[index] = len(tool_index)
                        where = f"{kind}.content_block"
                        yield ToolCallDelta(
                            index=tool_index[index],
                            id=str(required(block, "id", where)),
                            name=str(required(block, "name", where)),
                        )
                        if block.get("input"):
                            sent_arguments.add(index)
                            yield ToolCallDelta(
                                index=tool_index[index],
                                arguments=json.dumps(block["input"], separators=(",", ":")),
                            )
                elif kind == "content_block_delta":
                    index = as_int(required(event, "index", kind), f"{kind}.index")
                    delta = as_object(required(event, "delta", kind), f"{kind}.delta")
                    delta_type = delta.get("type")
                    if delta_type == "text_delta" and delta.get("text"):
                        yield TextDelta(text=as_text(delta["text"], "text_delta.text") or "")
                    elif delta_type == "thinking_delta" and index in thinking:
                        piece = as_text(
                            required(delta, "thinking", "thinking_delta"), "thinking_delta.thinking"
                        )
                        thinking[index]["thinking"] = str(thinking[index].get("thinking") or "") + (
                            piece or ""
                        )
                    elif delta_type == "signature_delta" and index in thinking:
                        thinking[index]["signature"] = required(delta, "signature", "signature_delta")
                    elif delta_type == "input_json_delta" and delta.get("partial_json"):
                        fragment = as_text(delta["partial_json"], "input_json_delta.partial_json") or ""
                        if index in schema_blocks:
                            yield TextDelta(text=fragment)
                        elif index in tool_index:
                            sent_arguments.add(index)
                            yield ToolCallDelta(index=tool_index[index], arguments=fragment)
                elif kind == "content_block_stop":
                    index = as_int(required(event, "index", kind), f"{kind}.index")
                    if index in tool_index and index not in sent_arguments:
                        yield ToolCallDelta(index=tool_index[index], arguments="{}")
                elif kind == "message_delta":
                    delta_usage = as_object(event.get("usage"), "message_delta.usage", optional=True)
                    usage.update({k: v for k, v in delta_usage.items() if v is not None})
                    delta = as_object(event.get("delta"), "message_delta.delta", optional=True)
                    stop_reason = (
                        as_text(delta.get("stop_reason"), "message_delta.delta.stop_reason") or stop_reason
                    )
                elif kind == "message_stop":
                    if schema_blocks and stop_reason == "tool_use":
                        stop_reason = "end_turn"
                    state = self._state([thinking[i] for i in sorted(thinking)])
                    if state is not None:
                        yield ProviderStateEvent(state=state)
                    yield StreamDone(
                        finish_reason=_FINISH_REASONS.get(stop_reason, "stop"),
                        usage=self._map_usage(usage),
                    )
                    return

    def _state(self, thinking: list[dict[str, Any]]) -> ProviderState | None:
        return ProviderState(provider=self.name, data={"thinking": thinking}) if thinking else None

    def _error_in_body(self, event: dict[str, Any], model: str) -> ProviderError:
        """An error that arrived in a 200 body or as a stream event, classified by its Anthropic type."""
        message, code = self._error_details(event, json.dumps(event)[:300])
        status = _ERROR_STATUS.get(str(code or ""), 500)
        return error_from_status(status, message, provider=self.name, model=model, code=code)

    def _malformed(self, model: str, exc: Exception) -> MalformedResponse:
        return MalformedResponse(
            f"{self.name} answered with an unexpected shape ({type(exc).__name__}: {exc})",
            provider=self.name,
            model=model,
        )

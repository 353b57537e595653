"""OpenAI's Responses API (``POST /v1/responses``) as a mode of the OpenAI provider
(``options: {api: responses}`` in its settings): the same contract, streaming, tools and structured
output, over the API where OpenAI ships new models and features first.

Stateless by default: ``store: false``, no ``previous_response_id``; the whole conversation is sent each
time, as with chat completions. A reasoning model's reasoning items come back encrypted
(``include: ["reasoning.encrypted_content"]``) and are kept as the answer's provider state, so they go
back with the tool results of the next turn, as the API asks for reasoning models calling tools.

Mapping: system and developer turns become input messages of those roles; an assistant turn becomes an
assistant message plus one ``function_call`` item per tool call; a tool turn becomes a
``function_call_output``; tools are flat ``{"type": "function", "name", ...}``; structured output is
``text.format``; ``max_tokens`` is ``max_output_tokens``; ``reasoning_effort`` is ``reasoning.effort``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

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
    ProviderError,
    error_from_status,
    status_for_error_code,
)
from providers._http import as_int, as_list, as_object, as_text, iter_sse, loads_object, required

if TYPE_CHECKING:
    from providers.openai import OpenAIProvider

__all__ = [
    "PROVIDER_OPTIONS",
    "RESPONSES_PATH",
    "UNSUPPORTED",
    "map_request",
    "parse_response",
    "stream_events",
]

RESPONSES_PATH = "/responses"
UNSUPPORTED = frozenset({"stop", "seed", "presence_penalty", "frequency_penalty", "thinking_budget"})
"""Chat-completions options the Responses API has no field for."""
PROVIDER_OPTIONS = frozenset(
    {"metadata", "truncation", "max_tool_calls", "top_logprobs", "prompt_cache_retention", "include"}
)
"""Responses fields the contract does not type, accepted under ``provider_options.openai`` in this mode
(https://platform.openai.com/docs/api-reference/responses/create)."""
_INCOMPLETE: dict[str, FinishReason] = {"max_output_tokens": "length", "content_filter": "content_filter"}


def map_request(provider: OpenAIProvider, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
    items: list[dict[str, Any]] = []
    for message in request.messages:
        items.extend(_items(provider, message))
    payload: dict[str, Any] = {"model": request.model, "input": items, "store": False}
    if request.tools:
        payload["tools"] = [
            {
                "type": "function",
                "name": tool.function.name,
                **({"description": tool.function.description} if tool.function.description else {}),
                "parameters": tool.function.parameters,
                "strict": bool(tool.function.strict),
            }
            for tool in request.tools
        ]
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        payload["tool_choice"] = {"type": "function", "name": choice.function.name}
    elif choice is not None:
        payload["tool_choice"] = choice
    if request.parallel_tool_calls is not None:
        payload["parallel_tool_calls"] = request.parallel_tool_calls
    response_format = request.response_format
    if isinstance(response_format, ResponseFormatJsonSchema):
        schema = response_format.json_schema
        text_format: dict[str, Any] = {
            "type": "json_schema",
            "name": schema.name,
            "schema": schema.json_schema,
        }
        if schema.description:
            text_format["description"] = schema.description
        if schema.strict is not None:
            text_format["strict"] = schema.strict
        payload["text"] = {"format": text_format}
    elif isinstance(response_format, ResponseFormatJsonObject):
        payload["text"] = {"format": {"type": "json_object"}}
    for source, target in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("max_tokens", "max_output_tokens"),
    ):
        value = getattr(request, source)
        if value is not None:
            payload[target] = value
    if request.user is not None:
        payload["safety_identifier"] = request.user
    if request.reasoning_effort is not None:
        payload["reasoning"] = {"effort": request.reasoning_effort}
    if request.service_tier is not None:
        payload["service_tier"] = request.service_tier
    if request.cache is not None and request.cache.key is not None:
        payload["prompt_cache_key"] = request.cache.key
    if _reasons(provider, request.model):
        payload["include"] = ["reasoning.encrypted_content"]
    if stream:
        payload["stream"] = True
    return payload


def _reasons(provider: OpenAIProvider, model: str) -> bool:
    facts = provider.model_facts(model)
    return facts.reasoning if facts is not None else model.startswith(("o1", "o3", "o4", "gpt-5"))


def _items(provider: OpenAIProvider, message: Any) -> list[dict[str, Any]]:
    if isinstance(message, SystemMessage | DeveloperMessage):
        return [{"role": message.role, "content": message_text(message)}]
    if isinstance(message, UserMessage):
        if isinstance(message.content, str):
            return [{"role": "user", "content": message.content}]
        return [{"role": "user", "content": [_input_part(part) for part in message.content]}]
    if isinstance(message, ToolMessage):
        return [
            {"type": "function_call_output", "call_id": message.tool_call_id, "output": message_text(message)}
        ]
    if not isinstance(message, AssistantMessage):
        raise TypeError(f"not a message: {type(message).__name__}")
    state = message.state_for(provider.name) or {}
    items: list[dict[str, Any]] = [
        dict(item) for item in state.get("reasoning") or [] if isinstance(item, dict)
    ]
    if message.content:
        items.append({"role": "assistant", "content": message.content})
    for call in message.tool_calls or []:
        items.append(
            {
                "type": "function_call",
                "call_id": call.id,
                "name": call.function.name,
                "arguments": call.function.arguments,
            }
        )
    return items


def _input_part(part: Any) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "input_text", "text": part.text}
    if isinstance(part, ImagePart):
        return {
            "type": "input_image",
            "image_url": part.image_url.url,
            "detail": part.image_url.detail or "auto",
        }
    if not isinstance(part, DocumentPart):
        raise TypeError(f"not a content part: {type(part).__name__}")
    source = part.file
    document: dict[str, Any] = {"type": "input_file"}
    if source.file_data is not None:
        document["file_data"] = source.file_data
    elif source.file_id is not None:
        document["file_id"] = source.file_id
    else:
        document["file_url"] = source.url
    if source.filename:
        document["filename"] = source.filename
    return document


# --- responses -----------------------------------------------------------------------------------


def parse_response(provider: OpenAIProvider, data: Any, model: str) -> ChatResponse:
    try:
        body = as_object(data, "the answer")
        if body.get("status") == "failed" or isinstance(body.get("error"), dict):
            raise _failed(provider, body, model)
        text, calls, reasoning, refusal = _read_output(as_list(body["output"], "output"))
        finish = _finish(body, bool(calls))
        usage = map_usage(body.get("usage"))
        header = (
            str(body.get("id") or ""),
            str(body.get("model") or model),
            int(body.get("created_at") or 0),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise provider._malformed(model, exc) from exc
    if finish == "content_filter" and not text and not calls:
        raise ContentFiltered(
            f"{provider.name} filtered the answer of model {model!r}", provider=provider.name, model=model
        )
    state = ProviderState(provider=provider.name, data={"reasoning": reasoning}) if reasoning else None
    message = AssistantMessage(
        content="".join(text) or None, tool_calls=calls or None, refusal=refusal, provider_state=state
    )
    response_id, answered_by, created = header
    return ChatResponse(
        id=response_id,
        model=answered_by,
        provider=provider.name,
        created=created,
        choices=[Choice(message=message, finish_reason=finish)],
        usage=usage,
    )


def _read_output(output: list[Any]) -> tuple[list[str], list[ToolCall], list[dict[str, Any]], str | None]:
    text: list[str] = []
    calls: list[ToolCall] = []
    reasoning: list[dict[str, Any]] = []
    refusal: str | None = None
    for position, raw in enumerate(output):
        item = as_object(raw, f"output[{position}]")
        kind = item.get("type")
        if kind == "message":
            for part in as_list(item.get("content"), f"output[{position}].content", optional=True):
                block = as_object(part, f"output[{position}].content[]")
                if block.get("type") == "output_text":
                    text.append(as_text(block.get("text"), "output_text.text") or "")
                elif block.get("type") == "refusal":
                    refusal = as_text(block.get("refusal"), "refusal.refusal")
        elif kind == "function_call":
            arguments = as_text(item.get("arguments"), "function_call.arguments") or "{}"
            calls.append(
                ToolCall(
                    id=str(item["call_id"]),
                    function=FunctionCall(name=str(item["name"]), arguments=arguments),
                )
            )
        elif kind == "reasoning" and item.get("encrypted_content"):
            reasoning.append(_reasoning_item(item))
    return text, calls, reasoning, refusal


def _reasoning_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """A reasoning item as it must go back: its id, summary and encrypted content (no status)."""
    return {
        "type": "reasoning",
        "id": required(item, "id", "reasoning"),
        "summary": list(as_list(item.get("summary") or [], "reasoning.summary")),
        "encrypted_content": item["encrypted_content"],
    }


def _finish(body: Mapping[str, Any], has_calls: bool) -> FinishReason:
    if body.get("status") == "incomplete":
        reason = as_object(body.get("incomplete_details"), "incomplete_details", optional=True).get("reason")
        return _INCOMPLETE.get(str(reason), "length")
    return "tool_calls" if has_calls else "stop"


def map_usage(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        return Usage()
    inputs = as_object(usage.get("input_tokens_details"), "usage.input_tokens_details", optional=True)
    outputs = as_object(usage.get("output_tokens_details"), "usage.output_tokens_details", optional=True)
    return Usage(
        prompt_tokens=as_int(usage.get("input_tokens"), "usage.input_tokens", optional=True),
        completion_tokens=as_int(usage.get("output_tokens"), "usage.output_tokens", optional=True),
        total_tokens=as_int(usage.get("total_tokens"), "usage.total_tokens", optional=True),
        cached_tokens=as_int(
            inputs.get("cached_tokens"), "usage.input_tokens_details.cached_tokens", optional=True
        ),
        reasoning_tokens=as_int(
            outputs.get("reasoning_tokens"), "usage.output_tokens_details.reasoning_tokens", optional=True
        ),
    )


def _failed(provider: OpenAIProvider, body: Mapping[str, Any], model: str) -> ProviderError:
    """A failure reported in a response body or an ``error`` / ``response.failed`` stream event,
    classified as the same error would be with its HTTP status."""
    error = body.get("error")
    if not isinstance(error, dict):
        response = body.get("response")
        error = response.get("error") if isinstance(response, dict) else None
    fields = error if isinstance(error, dict) else dict(body)
    message = str(fields.get("message") or "the response failed")
    code = fields.get("code") or fields.get("type")
    status = status_for_error_code(fields.get("status"), code, fields.get("type"))
    return error_from_status(
        status,
        message,
        provider=provider.name,
        model=model,
        code=None if code is None else str(code),
        body=json.dumps(body)[:2000],
    )


# --- streaming -----------------------------------------------------------------------------------


async def stream_events(
    provider: OpenAIProvider, request: ChatRequest, payload: Mapping[str, Any]
) -> AsyncIterator[StreamEvent]:
    calls: dict[int, int] = {}  # output index -> tool call ordinal
    reasoning: list[dict[str, Any]] = []
    async with provider._open_stream(RESPONSES_PATH, payload, model=request.model) as response:
        async for sse in iter_sse(response):
            event = loads_object(sse.data, f"the {sse.event} event")
            kind = event.get("type", sse.event)
            if kind in ("error", "response.failed"):
                raise _failed(provider, event, request.model)
            if kind == "response.created":
                created = as_object(event.get("response"), "response.created.response", optional=True)
                yield StreamStart(
                    id=str(created.get("id") or ""),
                    model=str(created.get("model") or request.model),
                    provider=provider.name,
                )
            elif kind == "response.output_text.delta" and event.get("delta"):
                yield TextDelta(text=as_text(event["delta"], "output_text.delta") or "")
            elif kind == "response.output_item.added":
                item = as_object(required(event, "item", kind), f"{kind}.item")
                if item.get("type") == "function_call":
                    index = as_int(required(event, "output_index", kind), f"{kind}.output_index")
                    calls[index] = len(calls)
                    yield ToolCallDelta(
                        index=calls[index],
                        id=str(required(item, "call_id", f"{kind}.item")),
                        name=str(required(item, "name", f"{kind}.item")),
                    )
            elif kind == "response.function_call_arguments.delta":
                index = as_int(required(event, "output_index", kind), f"{kind}.output_index")
                if index in calls and event.get("delta"):
                    yield ToolCallDelta(
                        index=calls[index], arguments=as_text(event["delta"], "arguments.delta") or ""
                    )
            elif kind == "response.output_item.done":
                item = as_object(required(event, "item", kind), f"{kind}.item")
                if item.get("type") == "reasoning" and item.get("encrypted_content"):
                    reasoning.append(_reasoning_item(item))
            elif kind in ("response.completed", "response.incomplete"):
                final = as_object(required(event, "response", kind), f"{kind}.response")
                if reasoning:
                    yield ProviderStateEvent(
                        state=ProviderState(provider=provider.name, data={"reasoning": reasoning})
                    )
                yield StreamDone(
                    finish_reason=_finish(final, bool(calls)), usage=map_usage(final.get("usage"))
                )
                return

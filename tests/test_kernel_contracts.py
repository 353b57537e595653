"""The request and response contracts: strict requests, discriminated messages, usage arithmetic."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from kernel.contracts import (
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    Choice,
    FunctionCall,
    ImagePart,
    Message,
    ResponseFormatJsonSchema,
    StreamDone,
    StreamEvent,
    SystemMessage,
    TextDelta,
    TextPart,
    ToolCall,
    ToolMessage,
    Usage,
    UserMessage,
    message_text,
)

_USER = [{"role": "user", "content": "hi"}]
_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def _request(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "gpt-4o", "messages": _USER, **fields})


def test_unknown_request_field_is_refused_by_name() -> None:
    with pytest.raises(ValidationError) as info:
        _request(temprature=0.2)
    assert "temprature" in str(info.value)
    assert any(e["type"] == "extra_forbidden" and e["loc"] == ("temprature",) for e in info.value.errors())


def test_unknown_field_inside_a_message_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        ChatRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "x", "contnet": 1}]}
        )
    assert "contnet" in str(info.value)


def test_messages_are_discriminated_by_role() -> None:
    request = ChatRequest.model_validate(
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                    ],
                },
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ],
        }
    )
    kinds = [type(m) for m in request.messages]
    assert kinds == [SystemMessage, UserMessage, AssistantMessage, ToolMessage]
    user = request.messages[1]
    assert isinstance(user, UserMessage) and not isinstance(user.content, str)
    assert isinstance(user.content[1], ImagePart)
    assert request.has_images


def test_unknown_role_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        TypeAdapter(Message).validate_python({"role": "wizard", "content": "x"})
    assert "wizard" in str(info.value)


def test_tool_message_needs_tool_call_id() -> None:
    with pytest.raises(ValidationError) as info:
        TypeAdapter(Message).validate_python({"role": "tool", "content": "x"})
    assert "tool_call_id" in str(info.value)


def test_tool_choice_naming_a_tool_not_offered_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        _request(tools=[_TOOL], tool_choice={"type": "function", "function": {"name": "get_time"}})
    message = str(info.value)
    assert "get_time" in message
    assert "get_weather" in message


def test_tool_choice_without_tools_is_refused() -> None:
    with pytest.raises(ValidationError, match="get_time"):
        _request(tool_choice={"type": "function", "function": {"name": "get_time"}})
    with pytest.raises(ValidationError, match="required"):
        _request(tool_choice="required")


def test_tool_choice_naming_an_offered_tool_is_accepted() -> None:
    request = _request(tools=[_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert request.needs_tools


def test_tool_choice_none_means_no_tools_needed() -> None:
    assert not _request(tools=[_TOOL], tool_choice="none").needs_tools
    assert not _request().needs_tools


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", 2.5), ("temperature", -0.1), ("top_p", 0), ("max_tokens", 0), ("stop", ["a"] * 5)],
)
def test_out_of_range_values_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        _request(**{field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_empty_messages_are_refused() -> None:
    with pytest.raises(ValidationError, match="messages"):
        ChatRequest(model="gpt-4o", messages=[])


def test_json_schema_format_accepts_the_wire_alias() -> None:
    request = _request(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
        }
    )
    assert request.needs_json_schema
    assert isinstance(request.response_format, ResponseFormatJsonSchema)
    assert request.response_format.json_schema.json_schema == {"type": "object"}
    dumped = request.model_dump(by_alias=True, exclude_none=True)
    assert dumped["response_format"]["json_schema"]["schema"] == {"type": "object"}


def test_tool_name_must_be_a_function_name() -> None:
    with pytest.raises(ValidationError, match="name"):
        _request(tools=[{"type": "function", "function": {"name": "get weather!"}}])


def test_message_text_joins_parts_and_skips_images() -> None:
    message = UserMessage(
        content=[TextPart(text="a"), ImagePart(image_url={"url": "https://x"}), TextPart(text="b")]  # type: ignore[arg-type]
    )
    assert message_text(message) == "ab"
    assert message_text(AssistantMessage()) == ""


# --- usage ------------------------------------------------------------------------------------------


def test_usage_total_is_filled_in() -> None:
    assert Usage(prompt_tokens=10, completion_tokens=5).total_tokens == 15


def test_usage_total_given_is_kept() -> None:
    assert Usage(prompt_tokens=10, completion_tokens=5, total_tokens=20).total_tokens == 20


def test_usage_addition() -> None:
    a = Usage(prompt_tokens=10, completion_tokens=5, cached_tokens=4, reasoning_tokens=1)
    b = Usage(prompt_tokens=3, completion_tokens=7, cached_tokens=1, reasoning_tokens=2)
    total = a + b
    assert total == Usage(
        prompt_tokens=13, completion_tokens=12, total_tokens=25, cached_tokens=5, reasoning_tokens=3
    )
    assert a + Usage() == a


# --- responses --------------------------------------------------------------------------------------


def _response(message: AssistantMessage, finish: Any = "stop") -> ChatResponse:
    return ChatResponse(
        id="r1", model="gpt-4o", provider="openai", choices=[Choice(message=message, finish_reason=finish)]
    )


def test_response_text_and_tool_calls() -> None:
    call = ToolCall(id="c1", function=FunctionCall(name="f", arguments='{"x": 1}'))
    response = _response(AssistantMessage(content=None, tool_calls=[call]), "tool_calls")
    assert response.text == ""
    assert response.tool_calls == [call]
    assert response.tool_calls[0].function.parsed_arguments() == {"x": 1}
    assert response.finish_reason == "tool_calls"

    plain = _response(AssistantMessage(content="hello"))
    assert plain.text == "hello"
    assert plain.tool_calls == []


def test_response_without_choices() -> None:
    empty = ChatResponse(id="r", model="m", provider="p", choices=[])
    assert (empty.text, empty.tool_calls, empty.finish_reason) == ("", [], "error")


def test_empty_arguments_parse_as_empty_object() -> None:
    assert FunctionCall(name="f", arguments="").parsed_arguments() == {}


def test_stream_events_are_discriminated() -> None:
    adapter: TypeAdapter[StreamEvent] = TypeAdapter(StreamEvent)
    assert isinstance(adapter.validate_python({"type": "text", "text": "x"}), TextDelta)
    done = adapter.validate_python({"type": "done", "finish_reason": "stop", "usage": {"prompt_tokens": 2}})
    assert isinstance(done, StreamDone)
    assert done.usage.total_tokens == 2
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "done", "finish_reason": "finished"})

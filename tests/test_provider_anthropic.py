"""AnthropicProvider: wire mapping over ``httpx.MockTransport``, whole conversations against the simulator."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from kernel.contracts import (
    AssistantMessage,
    ChatRequest,
    EmbedRequest,
    FunctionCall,
    FunctionDefinition,
    ImagePart,
    ImageURL,
    JsonSchemaFormat,
    ResponseFormatJsonSchema,
    StreamDone,
    StreamError,
    StreamEvent,
    StreamStart,
    SystemMessage,
    TextDelta,
    TextPart,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolMessage,
    UserMessage,
)
from kernel.errors import (
    AuthenticationFailed,
    ContentFiltered,
    ContextLengthExceeded,
    InvalidRequest,
    MalformedResponse,
    MissingCredentials,
    ModelNotFound,
    Overloaded,
    PermissionDenied,
    ProviderError,
    RateLimited,
    StreamInterrupted,
    UnsupportedCapability,
    UpstreamError,
)
from kernel.provider import ProviderSettings, collect_stream
from kernel.registry import Registry
from providers.anthropic import AnthropicProvider
from simulator.server import SimulatorServer

MODEL = "claude-sonnet-4-5"
WEATHER_TOOL = Tool(
    function=FunctionDefinition(
        name="get_weather",
        description="Weather for a city",
        parameters={
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city", "days"],
        },
    )
)
CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "population": {"type": "integer"},
        "landmarks": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "population", "landmarks"],
    "additionalProperties": False,
}


def _message_body(
    content: list[dict[str, Any]] | None = None, stop_reason: str = "end_turn", **usage: int
) -> dict[str, Any]:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "Hello!"}] if content is None else content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage or {"input_tokens": 10, "output_tokens": 3},
    }


class Recorder:
    """A MockTransport handler that keeps every request and answers with `reply`."""

    def __init__(self, reply: Callable[[httpx.Request], httpx.Response]) -> None:
        self.reply = reply
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.reply(request)

    @property
    def body(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.requests[-1].content)
        return value


def _mocked(
    reply: Callable[[httpx.Request], httpx.Response] | httpx.Response,
    *,
    environ: dict[str, str] | None = None,
    settings: ProviderSettings | None = None,
) -> tuple[AnthropicProvider, Recorder]:
    recorder = Recorder(reply if callable(reply) else lambda _request: reply)
    provider = AnthropicProvider(
        settings=settings,
        environ={"ANTHROPIC_API_KEY": "sk-ant-test"} if environ is None else environ,
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(recorder)),
    )
    return provider, recorder


def _request(*messages: Any, **kwargs: Any) -> ChatRequest:
    return ChatRequest(model=kwargs.pop("model", MODEL), messages=list(messages), **kwargs)


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


async def _events(stream: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    return [event async for event in stream]


# ---- request mapping ----------------------------------------------------------------------------


async def test_system_messages_go_to_the_top_level_system_field_with_auth_headers() -> None:
    provider, recorder = _mocked(httpx.Response(200, json=_message_body()))
    await provider.chat(
        _request(
            SystemMessage(content="You are terse."),
            UserMessage(content="Hi"),
            SystemMessage(content=[TextPart(text="Answer in English.")]),
        )
    )
    sent = recorder.requests[0]
    assert sent.url == "https://api.anthropic.com/v1/messages"
    assert sent.headers["x-api-key"] == "sk-ant-test"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers
    assert recorder.body["system"] == "You are terse.\n\nAnswer in English."
    assert recorder.body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert recorder.body["max_tokens"] == 4096  # Anthropic requires it; the request gave none


async def test_request_options_are_renamed_for_anthropic() -> None:
    provider, recorder = _mocked(httpx.Response(200, json=_message_body()))
    # claude-3-5-haiku takes temperature and top_p together; newer models take one of them.
    await provider.chat(
        _request(
            UserMessage(content="Hi"),
            model="claude-3-5-haiku-latest",
            max_tokens=50,
            temperature=0.2,
            top_p=0.9,
            stop=["END"],
            user="u-1",
        )
    )
    body = recorder.body
    assert body["max_tokens"] == 50
    assert body["temperature"] == 0.2
    assert body["top_p"] == 0.9
    assert body["stop_sequences"] == ["END"]
    assert body["metadata"] == {"user_id": "u-1"}
    assert "system" not in body and "stream" not in body


async def test_consecutive_tool_results_are_merged_into_one_user_turn() -> None:
    provider, recorder = _mocked(httpx.Response(200, json=_message_body()))
    calls = [
        ToolCall(
            id="toolu_a", function=FunctionCall(name="get_weather", arguments='{"city":"Oslo","days":1}')
        ),
        ToolCall(
            id="toolu_b", function=FunctionCall(name="get_weather", arguments='{"city":"Rome","days":2}')
        ),
    ]
    await provider.chat(
        _request(
            UserMessage(content="Weather in Oslo and Rome?"),
            AssistantMessage(content="Checking both.", tool_calls=calls),
            ToolMessage(tool_call_id="toolu_a", content="Oslo: snow"),
            ToolMessage(tool_call_id="toolu_b", content=[TextPart(text="Rome: sun")]),
            UserMessage(content="Summarise."),
            tools=[WEATHER_TOOL],
        )
    )
    messages = recorder.body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == [
        {"type": "text", "text": "Checking both."},
        {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Oslo", "days": 1}},
        {"type": "tool_use", "id": "toolu_b", "name": "get_weather", "input": {"city": "Rome", "days": 2}},
    ]
    assert messages[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_a", "content": "Oslo: snow"},
        {"type": "tool_result", "tool_use_id": "toolu_b", "content": "Rome: sun"},
        {"type": "text", "text": "Summarise."},
    ]
    assert recorder.body["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": WEATHER_TOOL.function.parameters,
        }
    ]


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            None,
            {"type": "tool", "name": "get_weather"},
        ),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        (None, None, None),
    ],
)
async def test_tool_choice_mapping(
    choice: Any, parallel: bool | None, expected: dict[str, Any] | None
) -> None:
    provider, recorder = _mocked(httpx.Response(200, json=_message_body()))
    await provider.chat(
        _request(
            UserMessage(content="Hi"), tools=[WEATHER_TOOL], tool_choice=choice, parallel_tool_calls=parallel
        )
    )
    assert recorder.body.get("tool_choice") == expected


async def test_images_become_base64_or_url_sources() -> None:
    provider, recorder = _mocked(httpx.Response(200, json=_message_body()))
    await provider.chat(
        _request(
            UserMessage(
                content=[
                    TextPart(text="Compare"),
                    ImagePart(image_url=ImageURL(url="data:image/png;base64,iVBORw0KGgo=")),
                    ImagePart(image_url=ImageURL(url="https://example.com/cat.jpg")),
                ]
            )
        )
    )
    assert recorder.body["messages"][0]["content"] == [
        {"type": "text", "text": "Compare"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


async def test_refusals_before_any_request() -> None:
    provider, recorder = _mocked(httpx.Response(200, json=_message_body()))
    with pytest.raises(InvalidRequest, match="temperature"):
        await provider.chat(_request(UserMessage(content="Hi"), temperature=1.5))
    bad_arguments = AssistantMessage(
        tool_calls=[ToolCall(id="toolu_x", function=FunctionCall(name="get_weather", arguments="[1, 2]"))]
    )
    with pytest.raises(InvalidRequest, match=r"messages\[1\]\.tool_calls"):
        await provider.chat(_request(UserMessage(content="Hi"), bad_arguments, tools=[WEATHER_TOOL]))
    with pytest.raises(UnsupportedCapability, match="embeddings"):
        await provider.embed(EmbedRequest(model=MODEL, input=["x"]))
    assert recorder.requests == []


async def test_missing_key_names_the_variable_and_sends_nothing() -> None:
    provider, recorder = _mocked(httpx.Response(200, json=_message_body()), environ={})
    with pytest.raises(MissingCredentials, match="ANTHROPIC_API_KEY") as caught:
        await provider.chat(_request(UserMessage(content="Hi")))
    assert caught.value.env_var == "ANTHROPIC_API_KEY"
    with pytest.raises(MissingCredentials, match="ANTHROPIC_API_KEY"):
        await _events(provider.stream(_request(UserMessage(content="Hi"))))
    assert recorder.requests == []
    assert provider.describe()["credentials_present"] is False


async def test_base_url_comes_from_the_environment() -> None:
    provider, recorder = _mocked(
        httpx.Response(200, json=_message_body()),
        environ={"ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": "http://gateway.local/anthropic/"},
    )
    await provider.chat(_request(UserMessage(content="Hi")))
    assert str(recorder.requests[0].url) == "http://gateway.local/anthropic/v1/messages"


# ---- response mapping ---------------------------------------------------------------------------


async def test_usage_counts_cache_reads_and_writes_as_prompt_tokens() -> None:
    body = _message_body(
        input_tokens=100, cache_read_input_tokens=50, cache_creation_input_tokens=20, output_tokens=30
    )
    provider, _ = _mocked(httpx.Response(200, json=body))
    response = await provider.chat(_request(UserMessage(content="Hi")))
    assert response.usage.prompt_tokens == 170
    assert response.usage.cached_tokens == 50
    assert response.usage.completion_tokens == 30
    assert response.usage.total_tokens == 200
    assert response.text == "Hello!"
    assert response.id == "msg_01" and response.provider == "anthropic"


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls")],
)
async def test_stop_reasons(stop_reason: str, finish: str) -> None:
    provider, _ = _mocked(httpx.Response(200, json=_message_body(stop_reason=stop_reason)))
    response = await provider.chat(_request(UserMessage(content="Hi")))
    assert response.finish_reason == finish


async def test_tool_use_blocks_become_tool_calls() -> None:
    content: list[dict[str, Any]] = [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo", "days": 3}},
    ]
    provider, _ = _mocked(httpx.Response(200, json=_message_body(content, "tool_use")))
    response = await provider.chat(_request(UserMessage(content="Weather?"), tools=[WEATHER_TOOL]))
    assert response.finish_reason == "tool_calls"
    assert response.text == "Let me check."
    [call] = response.tool_calls
    assert call.id == "toolu_1"
    assert call.function.name == "get_weather"
    assert call.function.parsed_arguments() == {"city": "Oslo", "days": 3}


async def test_a_refusal_without_text_is_content_filtered() -> None:
    provider, _ = _mocked(httpx.Response(200, json=_message_body([], "refusal")))
    with pytest.raises(ContentFiltered):
        await provider.chat(_request(UserMessage(content="Hi")))


async def test_structured_output_is_native_on_current_models() -> None:
    answer = '{"name":"Oslo","population":700000,"landmarks":["Opera"]}'
    provider, recorder = _mocked(httpx.Response(200, json=_message_body([{"type": "text", "text": answer}])))
    response = await provider.chat(_request(UserMessage(content="A city"), response_format=_city_format()))
    assert recorder.body["output_config"] == {"format": {"type": "json_schema", "schema": CITY_SCHEMA}}
    assert "tools" not in recorder.body
    assert json.loads(response.text)["name"] == "Oslo"
    assert provider.capabilities.json_schema_mode == "native"


async def test_structured_output_uses_a_forced_tool_on_older_models() -> None:
    content = [
        {"type": "tool_use", "id": "toolu_9", "name": "city", "input": {"name": "Oslo", "population": 1}}
    ]
    provider, recorder = _mocked(httpx.Response(200, json=_message_body(content, "tool_use")))
    response = await provider.chat(
        _request(
            UserMessage(content="A city"), response_format=_city_format(), model="claude-3-5-haiku-latest"
        )
    )
    assert recorder.body["tool_choice"] == {"type": "tool", "name": "city"}
    assert recorder.body["tools"][0]["input_schema"] == CITY_SCHEMA
    assert "output_config" not in recorder.body
    assert json.loads(response.text) == {"name": "Oslo", "population": 1}
    assert response.tool_calls == [] and response.finish_reason == "stop"


# ---- errors -------------------------------------------------------------------------------------


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_1"}
    return httpx.Response(status, json=body, headers=headers)


@pytest.mark.parametrize(
    ("status", "kind", "message", "expected"),
    [
        (529, "overloaded_error", "Overloaded", Overloaded),
        (500, "overloaded_error", "Overloaded", Overloaded),
        (429, "rate_limit_error", "Number of request tokens has exceeded your rate limit", RateLimited),
        (
            400,
            "invalid_request_error",
            "prompt is too long: 210000 tokens > 200000 maximum",
            ContextLengthExceeded,
        ),
        (400, "invalid_request_error", "messages.0.content: Field required", InvalidRequest),
        (401, "authentication_error", "invalid x-api-key", AuthenticationFailed),
        (403, "permission_error", "Your API key does not have permission", PermissionDenied),
        (404, "not_found_error", "model: claude-nope", ModelNotFound),
        (500, "api_error", "Internal server error", UpstreamError),
    ],
)
async def test_error_bodies_map_to_the_kernel_tree(
    status: int, kind: str, message: str, expected: type[ProviderError]
) -> None:
    provider, _ = _mocked(_error(status, kind, message))
    with pytest.raises(expected) as caught:
        await provider.chat(_request(UserMessage(content="Hi")))
    assert type(caught.value) is expected
    assert caught.value.code == kind
    assert message in str(caught.value)
    assert caught.value.status_code == status


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"x-ms-retry-after-ms": "250"}, 0.25),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
        ({}, None),
    ],
)
async def test_retry_after_variants(headers: dict[str, str], seconds: float | None) -> None:
    provider, _ = _mocked(_error(429, "rate_limit_error", "slow down", headers))
    with pytest.raises(RateLimited) as caught:
        await provider.chat(_request(UserMessage(content="Hi")))
    assert caught.value.retry_after == seconds


@pytest.mark.parametrize(
    "reply",
    [
        httpx.Response(200, content=b'{"id": "msg_01", "content": [{"type": '),
        httpx.Response(200, json={"id": "msg_01", "type": "message"}),
        httpx.Response(200, json=["not", "a", "message"]),
    ],
)
async def test_a_malformed_2xx_body_is_malformed_response(reply: httpx.Response) -> None:
    provider, _ = _mocked(reply)
    with pytest.raises(MalformedResponse):
        await provider.chat(_request(UserMessage(content="Hi")))


# ---- streaming over mocked bytes ----------------------------------------------------------------

_START = {
    "type": "message_start",
    "message": {
        "id": "msg_s",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "cache_read_input_tokens": 8, "output_tokens": 1},
    },
}


async def test_stream_events_map_text_tools_and_usage() -> None:
    raw = _sse(
        _START,
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": ""},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": '{"city"'},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": ':"Oslo"}'},
        },
        {"type": "content_block_stop", "index": 1},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 9},
        },
        {"type": "message_stop"},
    )
    provider, recorder = _mocked(
        httpx.Response(200, content=raw, headers={"content-type": "text/event-stream"})
    )
    events = await _events(provider.stream(_request(UserMessage(content="Weather?"), tools=[WEATHER_TOOL])))
    assert recorder.body["stream"] is True
    assert events[0] == StreamStart(id="msg_s", model=MODEL, provider="anthropic")
    assert events[1] == TextDelta(text="Checking")
    assert events[2] == ToolCallDelta(index=0, id="toolu_1", name="get_weather")
    assert [e.arguments for e in events[3:5] if isinstance(e, ToolCallDelta)] == ['{"city"', ':"Oslo"}']
    done = events[-1]
    assert isinstance(done, StreamDone)
    assert done.finish_reason == "tool_calls"
    assert (done.usage.prompt_tokens, done.usage.cached_tokens, done.usage.completion_tokens) == (20, 8, 9)


async def test_an_error_event_mid_stream_is_a_stream_error() -> None:
    raw = _sse(
        _START,
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    )
    provider, _ = _mocked(httpx.Response(200, content=raw, headers={"content-type": "text/event-stream"}))
    events = await _events(provider.stream(_request(UserMessage(content="Hi"))))
    error = events[-1]
    assert isinstance(error, StreamError)
    assert error.error_type == "Overloaded" and error.retryable
    assert not any(isinstance(e, StreamDone) for e in events)


async def test_an_error_status_before_the_stream_raises() -> None:
    provider, _ = _mocked(_error(529, "overloaded_error", "Overloaded", {"retry-after": "3"}))
    with pytest.raises(Overloaded) as caught:
        await _events(provider.stream(_request(UserMessage(content="Hi"))))
    assert caught.value.retry_after == 3.0


def _city_format() -> ResponseFormatJsonSchema:
    return ResponseFormatJsonSchema(
        json_schema=JsonSchemaFormat.model_validate({"name": "city", "schema": CITY_SCHEMA})
    )


# ---- against the simulator ----------------------------------------------------------------------


@pytest.fixture
async def provider(sim: SimulatorServer) -> AsyncIterator[AnthropicProvider]:
    registry = Registry(settings={"anthropic": ProviderSettings(base_url=sim.url, api_key="sk-ant-test")})
    registry.register(AnthropicProvider)
    instance, model = registry.resolve(f"anthropic/{MODEL}")
    assert isinstance(instance, AnthropicProvider) and model == MODEL
    yield instance
    await registry.aclose()


def _assert_matches_city_schema(value: Any) -> None:
    assert set(value) == set(CITY_SCHEMA["required"])
    assert isinstance(value["name"], str)
    assert isinstance(value["population"], int)
    assert isinstance(value["landmarks"], list) and all(isinstance(x, str) for x in value["landmarks"])


async def test_simulated_chat(provider: AnthropicProvider) -> None:
    response = await provider.chat(
        _request(SystemMessage(content="Be brief."), UserMessage(content="Hello there [[sim: cached=4]]"))
    )
    assert response.text == f"Simulated reply from {MODEL}: Hello there"
    assert response.id.startswith("msg_")
    assert response.finish_reason == "stop"
    assert response.usage.cached_tokens == 4
    assert response.usage.prompt_tokens > response.usage.cached_tokens
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


@pytest.mark.parametrize("tools", [False, True])
async def test_simulated_stream_collects_to_the_chat_answer(provider: AnthropicProvider, tools: bool) -> None:
    request = _request(
        SystemMessage(content="Be brief."),
        UserMessage(content="Tell me about the weather in Oslo [[sim: cached=2]]"),
        tools=[WEATHER_TOOL] if tools else None,
    )
    chat = await provider.chat(request)
    streamed = await collect_stream(provider.stream(request), provider=provider.name)
    assert streamed.text == chat.text
    # ids differ (the simulator derives them from the request body, which says `stream`)
    assert [c.function for c in streamed.tool_calls] == [c.function for c in chat.tool_calls]
    assert streamed.finish_reason == chat.finish_reason == ("tool_calls" if tools else "stop")
    assert streamed.usage == chat.usage
    assert streamed.model == chat.model


async def test_simulated_tool_round_trip(provider: AnthropicProvider) -> None:
    question = UserMessage(content="What is the weather in Oslo?")
    first = await provider.chat(_request(question, tools=[WEATHER_TOOL]))
    [call] = first.tool_calls
    assert call.id.startswith("toolu_")
    assert call.function.name == "get_weather"
    assert set(call.function.parsed_arguments()) == {"city", "days"}
    second = await provider.chat(
        _request(
            question,
            AssistantMessage(tool_calls=[call]),
            ToolMessage(tool_call_id=call.id, content="Snow, -3 C"),
            tools=[WEATHER_TOOL],
        )
    )
    assert second.finish_reason == "stop"
    assert second.tool_calls == []
    assert "Snow, -3 C" in second.text


@pytest.mark.parametrize("model", [MODEL, "claude-3-5-haiku-latest"])
async def test_simulated_structured_output(provider: AnthropicProvider, model: str) -> None:
    request = _request(UserMessage(content="Describe Oslo"), response_format=_city_format(), model=model)
    response = await provider.chat(request)
    _assert_matches_city_schema(json.loads(response.text))
    streamed = await collect_stream(provider.stream(request), provider=provider.name)
    assert json.loads(streamed.text) == json.loads(response.text)


async def test_simulated_errors(provider: AnthropicProvider) -> None:
    with pytest.raises(RateLimited) as limited:
        await provider.chat(_request(UserMessage(content="Hi [[sim: fault=429 retry_after=2]]")))
    assert limited.value.retry_after == 2.0
    with pytest.raises(Overloaded):
        await provider.chat(_request(UserMessage(content="Hi [[sim: fault=529]]")))
    with pytest.raises(ContextLengthExceeded, match="prompt is too long"):
        await provider.chat(_request(UserMessage(content="Hi [[sim: fault=context_length]]")))
    with pytest.raises(ContentFiltered):
        await provider.chat(_request(UserMessage(content="Hi [[sim: fault=content_filter]]")))
    with pytest.raises(ModelNotFound):
        await provider.chat(_request(UserMessage(content="Hi"), model="claude-nope"))
    with pytest.raises(MalformedResponse):
        await provider.chat(_request(UserMessage(content="Hi [[sim: fault=malformed]]")))


async def test_a_cut_stream_yields_a_stream_error_not_a_truncated_answer(provider: AnthropicProvider) -> None:
    request = _request(UserMessage(content="A fairly long question about many things [[sim: fault=cut]]"))
    events = await _events(provider.stream(request))
    assert isinstance(events[0], StreamStart)
    assert isinstance(events[-1], StreamError)
    assert events[-1].retryable
    assert not any(isinstance(e, StreamDone) for e in events)
    with pytest.raises(StreamInterrupted):
        await collect_stream(provider.stream(request), provider=provider.name)


class _TrackingTransport(httpx.AsyncBaseTransport):
    """Passes requests to a real transport and records whether each response stream was closed."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.closed: list[bool] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        index = len(self.closed)
        self.closed.append(False)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        inner_stream: httpx.AsyncByteStream = response.stream
        closed = self.closed

        class _Stream(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for chunk in inner_stream:
                    yield chunk

            async def aclose(self) -> None:
                closed[index] = True
                await inner_stream.aclose()

        return httpx.Response(
            response.status_code, headers=response.headers, stream=_Stream(), extensions=response.extensions
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_cancelling_a_stream_midway_closes_the_connection(sim: SimulatorServer) -> None:
    transport = _TrackingTransport()
    provider = AnthropicProvider(
        settings=ProviderSettings(base_url=sim.url, api_key="sk-ant-test"),
        http_client=httpx.AsyncClient(transport=transport),
    )
    first_text = asyncio.Event()
    seen: list[StreamEvent] = []

    async def consume() -> None:
        # A long answer sent slowly, so it is still streaming when it is cancelled.
        text = "word " * 200
        async for event in provider.stream(_request(UserMessage(content=f"{text}[[sim: token_delay=0.05]]"))):
            seen.append(event)
            if isinstance(event, TextDelta):
                first_text.set()

    task = asyncio.create_task(consume())
    await first_text.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert transport.closed == [True]
    assert not any(isinstance(e, StreamDone) for e in seen)
    await provider.aclose()

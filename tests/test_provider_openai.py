"""The OpenAI provider: wire mapping over httpx.MockTransport, whole conversations against the simulator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, ClassVar

import httpx
import pytest

from kernel.contracts import (
    AssistantMessage,
    ChatRequest,
    EmbedRequest,
    StreamDone,
    StreamError,
    StreamEvent,
    StreamStart,
    TextDelta,
    ToolCallDelta,
    ToolMessage,
    Usage,
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
from kernel.provider import Capabilities, ProviderSettings, collect_stream
from providers.openai import OpenAIProvider
from simulator.server import SimulatorServer

pytestmark = pytest.mark.timeout(60)

_BASE = "https://api.test/v1"

Handler = Callable[[httpx.Request], httpx.Response]


class _Recorder:
    """A MockTransport handler that records requests and answers with a fixed response."""

    def __init__(self, response: Callable[[httpx.Request], httpx.Response]) -> None:
        self.requests: list[httpx.Request] = []
        self._response = response

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self._response(request)

    @property
    def body(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.requests[-1].content)
        return value


def _provider(
    handler: Handler, *, api_key: str | None = "sk-test", cls: type[OpenAIProvider] = OpenAIProvider
) -> OpenAIProvider:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return cls(settings=ProviderSettings(api_key=api_key, base_url=_BASE), environ={}, http_client=client)


def _request(model: str = "gpt-4o", text: str = "hi", **fields: Any) -> ChatRequest:
    return ChatRequest.model_validate(
        {"model": model, "messages": [{"role": "user", "content": text}], **fields}
    )


def _completion(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }
    body.update(overrides)
    return body


def _ok(body: Any) -> Handler:
    return lambda request: httpx.Response(200, json=body)


def _sse(*chunks: Any) -> Handler:
    text = "".join(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks)
    return lambda request: httpx.Response(
        200, content=text.encode(), headers={"content-type": "text/event-stream"}
    )


_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city", "days"],
        },
    },
}


# --- request mapping --------------------------------------------------------------------------------


async def test_chat_request_goes_to_chat_completions_with_bearer_key() -> None:
    recorder = _Recorder(_ok(_completion()))
    provider = _provider(recorder)
    response = await provider.chat(_request(temperature=0.2, max_tokens=50, stop=["\n"], seed=7))
    [sent] = recorder.requests
    assert sent.method == "POST"
    assert str(sent.url) == f"{_BASE}/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-test"
    assert recorder.body == {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.2,
        "max_tokens": 50,
        "stop": ["\n"],
        "seed": 7,
    }
    assert response.text == "Hello!"
    assert response.provider == "openai"
    assert response.model == "gpt-4o-2024-08-06"
    assert response.finish_reason == "stop"


@pytest.mark.parametrize("model", ["o1", "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini-2025-08-07"])
async def test_reasoning_models_get_max_completion_tokens(model: str) -> None:
    recorder = _Recorder(_ok(_completion()))
    await _provider(recorder).chat(_request(model, max_tokens=100))
    assert recorder.body["max_completion_tokens"] == 100
    assert "max_tokens" not in recorder.body


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4.1-mini", "gpt-4o-mini-2024-07-18"])
async def test_other_models_get_max_tokens(model: str) -> None:
    recorder = _Recorder(_ok(_completion()))
    await _provider(recorder).chat(_request(model, max_tokens=100))
    assert recorder.body["max_tokens"] == 100
    assert "max_completion_tokens" not in recorder.body


async def test_no_max_tokens_sends_neither() -> None:
    recorder = _Recorder(_ok(_completion()))
    await _provider(recorder).chat(_request("o3"))
    assert "max_tokens" not in recorder.body and "max_completion_tokens" not in recorder.body


async def test_stream_request_asks_for_usage() -> None:
    recorder = _Recorder(_sse(_chunk({"content": "x"}, "stop"), "[DONE]"))
    events = [e async for e in _provider(recorder).stream(_request())]
    assert recorder.body["stream"] is True
    assert recorder.body["stream_options"] == {"include_usage": True}
    assert isinstance(events[-1], StreamDone)


async def test_stream_options_left_out_for_services_that_refuse_them() -> None:
    class NoStreamUsage(OpenAIProvider):
        stream_usage: ClassVar[bool] = False

    recorder = _Recorder(_sse(_chunk({"content": "x"}, "stop"), "[DONE]"))
    _ = [e async for e in _provider(recorder, cls=NoStreamUsage).stream(_request())]
    assert recorder.body["stream"] is True
    assert "stream_options" not in recorder.body


async def test_response_format_json_schema_is_sent_under_schema() -> None:
    recorder = _Recorder(_ok(_completion()))
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    request = _request(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "thing", "schema": schema, "strict": True},
        }
    )
    await _provider(recorder).chat(request)
    assert recorder.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "thing", "schema": schema, "strict": True},
    }


async def test_tools_and_tool_results_are_sent_as_is() -> None:
    recorder = _Recorder(_ok(_completion()))
    request = ChatRequest.model_validate(
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": "{}"}}],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
            "tools": [_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        }
    )
    await _provider(recorder).chat(request)
    body = recorder.body
    assert body["tools"] == [_TOOL]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["messages"][1]["tool_calls"][0] == {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": "{}"},
    }
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "c1", "content": "sunny"}


# --- response mapping -------------------------------------------------------------------------------


async def test_usage_maps_cached_and_reasoning_details() -> None:
    usage = {
        "prompt_tokens": 2000,
        "completion_tokens": 500,
        "total_tokens": 2500,
        "prompt_tokens_details": {"cached_tokens": 1536, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 320, "audio_tokens": 0},
    }
    response = await _provider(_ok(_completion(usage=usage))).chat(_request("o3"))
    assert response.usage == Usage(
        prompt_tokens=2000, completion_tokens=500, total_tokens=2500, cached_tokens=1536, reasoning_tokens=320
    )


async def test_usage_details_may_be_null() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": None}
    response = await _provider(_ok(_completion(usage=usage))).chat(_request())
    assert response.usage == Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7)


async def test_tool_call_response() -> None:
    choice = {
        "index": 0,
        "message": {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        "finish_reason": "tool_calls",
    }
    response = await _provider(_ok(_completion(choices=[choice]))).chat(_request(tools=[_TOOL]))
    assert response.finish_reason == "tool_calls"
    assert response.text == ""
    [call] = response.tool_calls
    assert (call.id, call.function.name, call.function.parsed_arguments()) == (
        "call_1",
        "get_weather",
        {"city": "Oslo"},
    )


@pytest.mark.parametrize(
    ("wire", "kernel"),
    [("stop", "stop"), ("length", "length"), ("tool_calls", "tool_calls"), ("function_call", "tool_calls")],
)
async def test_finish_reasons(wire: str, kernel: str) -> None:
    choice = {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": wire}
    response = await _provider(_ok(_completion(choices=[choice]))).chat(_request())
    assert response.finish_reason == kernel


async def test_filtered_empty_answer_is_content_filtered() -> None:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": None},
        "finish_reason": "content_filter",
    }
    with pytest.raises(ContentFiltered):
        await _provider(_ok(_completion(choices=[choice]))).chat(_request())


async def test_refusal_is_kept() -> None:
    message = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    response = await _provider(_ok(_completion(choices=[choice]))).chat(_request())
    assert response.choices[0].message.refusal == "I can't help with that."


# --- errors -----------------------------------------------------------------------------------------


def _error(
    status: int, message: str, type_: str = "invalid_request_error", code: str | None = None
) -> Handler:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return lambda request: httpx.Response(status, json=body)


@pytest.mark.parametrize(
    ("status", "message", "code", "expected"),
    [
        (400, "Invalid value for 'temperature'.", None, InvalidRequest),
        (401, "Incorrect API key provided: sk-xx****.", "invalid_api_key", AuthenticationFailed),
        (403, "You are not allowed to sample from this model", None, PermissionDenied),
        (
            404,
            "The model `gpt-9` does not exist or you do not have access to it.",
            "model_not_found",
            ModelNotFound,
        ),
        (429, "Rate limit reached for gpt-4o on requests per min (RPM).", "rate_limit_exceeded", RateLimited),
        (500, "The server had an error while processing your request.", None, UpstreamError),
        (502, "Bad gateway", None, UpstreamError),
        (503, "The engine is currently overloaded, please try again later.", None, Overloaded),
        (
            400,
            "This model's maximum context length is 128000 tokens. However, your messages resulted in 130000 tokens.",
            "context_length_exceeded",
            ContextLengthExceeded,
        ),
        (
            400,
            "The response was filtered due to the prompt triggering content management policy.",
            "content_filter",
            ContentFiltered,
        ),
        (
            400,
            "Your request was rejected as a result of our safety system.",
            "content_policy_violation",
            ContentFiltered,
        ),
    ],
)
async def test_error_statuses_and_bodies_map_into_the_tree(
    status: int, message: str, code: str | None, expected: type[ProviderError]
) -> None:
    recorder = _Recorder(_error(status, message, code=code))
    provider = _provider(recorder)
    with pytest.raises(ProviderError) as info:
        await provider.chat(_request())
    assert type(info.value) is expected
    assert info.value.status_code == status
    assert info.value.provider == "openai"
    assert info.value.model == "gpt-4o"
    assert message[:30] in str(info.value)
    with pytest.raises(expected):
        _ = [e async for e in provider.stream(_request())]
    with pytest.raises(expected):
        await provider.embed(EmbedRequest(model="text-embedding-3-small", input=["x"]))
    assert len(recorder.requests) == 3  # one per call, never a retry


async def test_error_body_that_is_not_json_is_still_classified() -> None:
    provider = _provider(lambda request: httpx.Response(502, text="<html>Bad Gateway</html>"))
    with pytest.raises(UpstreamError, match="Bad Gateway"):
        await provider.chat(_request())


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"Retry-After": "17"}, 17.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"x-ms-retry-after-ms": "250"}, 0.25),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
async def test_retry_after_headers_reach_the_error(headers: dict[str, str], expected: float | None) -> None:
    body = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}
    provider = _provider(lambda request: httpx.Response(429, json=body, headers=headers))
    with pytest.raises(RateLimited) as info:
        await provider.chat(_request())
    assert info.value.retry_after == expected
    with pytest.raises(RateLimited) as streamed:
        _ = [e async for e in provider.stream(_request())]
    assert streamed.value.retry_after == expected


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="<html>upstream proxy says hi</html>"),
        httpx.Response(200, text=""),
        httpx.Response(200, json={"id": "x"}),
        httpx.Response(200, json={"choices": []}),
        httpx.Response(200, json=["not", "an", "object"]),
        httpx.Response(200, json={"choices": [{"message": None}]}),
        httpx.Response(200, json={"choices": [{"message": "hello"}]}),
        httpx.Response(200, json={"choices": [{"message": {"content": 5}}]}),
        httpx.Response(200, json={"choices": [{"message": {"tool_calls": [{"id": "c"}]}}]}),
    ],
)
async def test_malformed_200_is_malformed_response(response: httpx.Response) -> None:
    provider = _provider(lambda request: response)
    with pytest.raises(MalformedResponse) as info:
        await provider.chat(_request())
    assert info.value.provider == "openai"
    assert not info.value.retryable


@pytest.mark.parametrize(
    "body",
    [{"data": "nope"}, {"data": [{"index": 0}]}, {"data": [{"index": 0, "embedding": ["a"]}]}, "text"],
)
async def test_malformed_embeddings_are_malformed_response(body: Any) -> None:
    with pytest.raises(MalformedResponse):
        await _provider(_ok(body)).embed(EmbedRequest(model="text-embedding-3-small", input=["x"]))


async def test_transport_failure_is_connection_failed() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    from kernel.errors import ConnectionFailed, UpstreamTimeout

    with pytest.raises(ConnectionFailed):
        await _provider(refuse).chat(_request())

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(UpstreamTimeout):
        await _provider(slow).chat(_request())


# --- refused before any request ---------------------------------------------------------------------


async def test_missing_key_raises_naming_the_env_var_with_no_request() -> None:
    recorder = _Recorder(_ok(_completion()))
    provider = _provider(recorder, api_key=None)
    with pytest.raises(MissingCredentials) as info:
        await provider.chat(_request())
    assert info.value.env_var == "OPENAI_API_KEY"
    assert "OPENAI_API_KEY" in str(info.value)
    with pytest.raises(MissingCredentials, match="OPENAI_API_KEY"):
        _ = [e async for e in provider.stream(_request())]
    with pytest.raises(MissingCredentials, match="OPENAI_API_KEY"):
        await provider.embed(EmbedRequest(model="text-embedding-3-small", input=["x"]))
    assert recorder.requests == []


async def test_key_is_read_from_the_environment() -> None:
    recorder = _Recorder(_ok(_completion()))
    client = httpx.AsyncClient(transport=httpx.MockTransport(recorder))
    provider = OpenAIProvider(
        settings=ProviderSettings(base_url=_BASE), environ={"OPENAI_API_KEY": "sk-env"}, http_client=client
    )
    await provider.chat(_request())
    assert recorder.requests[0].headers["authorization"] == "Bearer sk-env"


class _Limited(OpenAIProvider):
    name = "limited"
    capabilities = Capabilities(tools=False, json_schema=False, vision=False, stream=False, embeddings=False)


async def test_unsupported_capabilities_are_refused_with_no_request() -> None:
    recorder = _Recorder(_ok(_completion()))
    provider = _provider(recorder, cls=_Limited)
    schema_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    image = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    for request in (
        _request(tools=[_TOOL]),
        _request(response_format=schema_format),
        ChatRequest.model_validate({"model": "gpt-4o", "messages": [{"role": "user", "content": image}]}),
    ):
        with pytest.raises(UnsupportedCapability) as info:
            await provider.chat(request)
        assert "limited" in str(info.value)
    with pytest.raises(UnsupportedCapability, match="stream"):
        provider.stream(_request())
    with pytest.raises(UnsupportedCapability, match="embeddings"):
        await provider.embed(EmbedRequest(model="text-embedding-3-small", input=["x"]))
    assert recorder.requests == []


# --- streams over MockTransport ---------------------------------------------------------------------


def _chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


async def test_stream_events_in_order() -> None:
    usage = {
        "prompt_tokens": 4,
        "completion_tokens": 2,
        "total_tokens": 6,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    handler = _sse(
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Hel"}),
        _chunk({"content": "lo"}),
        _chunk({}, "stop"),
        {"id": "chatcmpl-s", "choices": [], "usage": usage},
        "[DONE]",
    )
    events = [e async for e in _provider(handler).stream(_request())]
    assert events == [
        StreamStart(id="chatcmpl-s", model="gpt-4o", provider="openai"),
        TextDelta(text="Hel"),
        TextDelta(text="lo"),
        StreamDone(finish_reason="stop", usage=Usage(prompt_tokens=4, completion_tokens=2, cached_tokens=2)),
    ]


async def test_stream_without_done_is_a_stream_error_not_a_finished_answer() -> None:
    handler = _sse(_chunk({"content": "Hel"}))
    events = [e async for e in _provider(handler).stream(_request())]
    assert isinstance(events[-1], StreamError)
    assert not any(isinstance(e, StreamDone) for e in events)
    with pytest.raises(StreamInterrupted):
        await collect_stream(_provider(handler).stream(_request()), provider="openai")


async def test_error_event_mid_stream_is_a_stream_error() -> None:
    handler = _sse(
        _chunk({"content": "Hel"}),
        {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}},
    )
    events = [e async for e in _provider(handler).stream(_request())]
    assert isinstance(events[-1], StreamError)
    assert events[-1].error_type == "RateLimited"
    assert events[-1].retryable


async def test_error_event_before_anything_is_raised() -> None:
    handler = _sse({"error": {"message": "The server had an error", "type": "server_error"}})
    with pytest.raises(UpstreamError):
        _ = [e async for e in _provider(handler).stream(_request())]


@pytest.mark.parametrize(
    "bad",
    ["{not json", '["a", "list"]', json.dumps({"choices": ["x"]}), json.dumps({"choices": [{"delta": "x"}]})],
)
async def test_malformed_chunk_after_start_is_a_stream_error(bad: str) -> None:
    handler = _sse(_chunk({"content": "Hel"}), bad, _chunk({}, "stop"), "[DONE]")
    events = [e async for e in _provider(handler).stream(_request())]
    assert isinstance(events[-1], StreamError)
    assert events[-1].error_type == "MalformedResponse"
    assert not any(isinstance(e, StreamDone) for e in events)


@pytest.mark.parametrize("bad", ["{not json", '["a", "list"]'])
async def test_malformed_first_chunk_raises(bad: str) -> None:
    with pytest.raises(MalformedResponse):
        _ = [e async for e in _provider(_sse(bad, "[DONE]")).stream(_request())]


async def test_streamed_tool_call_fragments() -> None:
    handler = _sse(
        _chunk({"role": "assistant", "content": None}),
        _chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
        ),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
        _chunk({}, "tool_calls"),
        "[DONE]",
    )
    events = [e async for e in _provider(handler).stream(_request(tools=[_TOOL]))]
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    assert deltas[0] == ToolCallDelta(index=0, id="call_1", name="get_weather", arguments="")
    response = await collect_stream(_provider(handler).stream(_request(tools=[_TOOL])), provider="openai")
    [call] = response.tool_calls
    assert call.function.parsed_arguments() == {"city": "Oslo"}
    assert response.finish_reason == "tool_calls"


# --- against the simulator --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorServer]:
    with SimulatorServer() as server:
        yield server


@pytest.fixture
def sim_url(simulator: SimulatorServer) -> str:
    simulator.reset()
    return simulator.url


@pytest.fixture
async def openai(sim_url: str) -> AsyncIterator[OpenAIProvider]:
    provider = OpenAIProvider(
        settings=ProviderSettings(api_key="sk-test", base_url=f"{sim_url}/v1"), environ={}
    )
    try:
        yield provider
    finally:
        await provider.aclose()


def _key() -> str:
    return uuid.uuid4().hex  # a fresh `times` budget


async def test_sim_chat(openai: OpenAIProvider) -> None:
    response = await openai.chat(_request("gpt-4o-mini", "Hello   world [[sim: cached=2]]"))
    assert response.text == "Simulated reply from gpt-4o-mini: Hello world"
    assert response.finish_reason == "stop"
    assert response.id.startswith("chatcmpl-")
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0
    assert response.usage.cached_tokens == 2
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


async def test_sim_reasoning_model_counts_reasoning_within_completion(openai: OpenAIProvider) -> None:
    response = await openai.chat(_request("o3", "think", max_tokens=500))
    assert 0 < response.usage.reasoning_tokens <= response.usage.completion_tokens


async def test_sim_length_finish(openai: OpenAIProvider) -> None:
    response = await openai.chat(_request("gpt-4o", "a long question " * 10, max_tokens=3))
    assert response.finish_reason == "length"


@pytest.mark.parametrize(
    "request_fields",
    [
        {"text": "Tell me a story [[sim: cached=1]]"},
        {"text": "weather in Oslo?", "tools": [_TOOL]},
    ],
)
async def test_sim_stream_collects_to_the_same_answer_as_chat(
    openai: OpenAIProvider, request_fields: dict[str, Any]
) -> None:
    request = _request("gpt-4o", **request_fields)
    chat = await openai.chat(request)
    events = [e async for e in openai.stream(request)]
    assert isinstance(events[0], StreamStart)
    assert isinstance(events[-1], StreamDone)

    async def replay() -> AsyncIterator[StreamEvent]:
        for event in events:
            yield event

    streamed = await collect_stream(replay(), provider="openai")
    assert streamed.text == chat.text
    assert streamed.finish_reason == chat.finish_reason
    assert streamed.usage == chat.usage
    assert [(c.function.name, c.function.parsed_arguments()) for c in streamed.tool_calls] == [
        (c.function.name, c.function.parsed_arguments()) for c in chat.tool_calls
    ]
    if "tools" in request_fields:
        assert streamed.tool_calls and all(c.id for c in streamed.tool_calls)
    else:
        assert len([e for e in events if isinstance(e, TextDelta)]) > 1


async def test_sim_tool_round_trip(openai: OpenAIProvider) -> None:
    first_request = _request("gpt-4o", "What is the weather in Oslo?", tools=[_TOOL])
    first = await openai.chat(first_request)
    assert first.finish_reason == "tool_calls"
    [call] = first.tool_calls
    assert call.function.name == "get_weather"
    arguments = call.function.parsed_arguments()
    assert isinstance(arguments["city"], str) and arguments["days"] >= 1

    second_request = first_request.model_copy(
        update={
            "messages": [
                *first_request.messages,
                AssistantMessage(tool_calls=first.tool_calls),
                ToolMessage(tool_call_id=call.id, content="Sunny, 21 degrees"),
            ]
        }
    )
    second = await openai.chat(second_request)
    assert second.finish_reason == "stop"
    assert "Sunny, 21 degrees" in second.text


async def test_sim_json_schema_output_matches_the_schema(openai: OpenAIProvider) -> None:
    schema = {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["bug", "question", "praise"]},
            "priority": {"type": "integer", "minimum": 1, "maximum": 5},
            "tags": {"type": "array", "items": {"type": "string"}},
            "urgent": {"type": "boolean"},
        },
        "required": ["label", "priority", "tags", "urgent"],
        "additionalProperties": False,
    }
    response = await openai.chat(
        _request(
            "gpt-4o",
            "classify: the app crashes",
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "triage", "schema": schema, "strict": True},
            },
        )
    )
    data = json.loads(response.text)
    assert set(data) == set(schema["required"])  # type: ignore[arg-type]
    assert data["label"] in ("bug", "question", "praise")
    assert isinstance(data["priority"], int) and 1 <= data["priority"] <= 5
    assert isinstance(data["tags"], list) and all(isinstance(t, str) for t in data["tags"])
    assert isinstance(data["urgent"], bool)


async def test_sim_embeddings(openai: OpenAIProvider) -> None:
    response = await openai.embed(
        EmbedRequest(model="text-embedding-3-small", input=["cat", "dog", "cat"], dimensions=64)
    )
    assert response.provider == "openai"
    assert len(response.embeddings) == 3
    assert all(len(v) == 64 for v in response.embeddings)
    assert response.embeddings[0] == response.embeddings[2]
    assert response.embeddings[0] != response.embeddings[1]
    assert sum(x * x for x in response.embeddings[0]) == pytest.approx(1.0, rel=1e-3)
    assert response.usage.prompt_tokens > 0


async def test_sim_cut_stream_yields_stream_error(openai: OpenAIProvider) -> None:
    request = _request("gpt-4o", "a fairly long answer please, with many words in it [[sim: fault=cut]]")
    events = [e async for e in openai.stream(request)]
    assert isinstance(events[0], StreamStart)
    assert isinstance(events[-1], StreamError)
    assert events[-1].retryable
    assert not any(isinstance(e, StreamDone) for e in events)
    with pytest.raises(StreamInterrupted):
        await collect_stream(openai.stream(request), provider="openai")


async def test_sim_malformed_body(openai: OpenAIProvider) -> None:
    with pytest.raises(MalformedResponse):
        await openai.chat(_request("gpt-4o", "[[sim: fault=malformed]]"))


async def test_sim_rate_limit_carries_retry_after(openai: OpenAIProvider, simulator: SimulatorServer) -> None:
    with pytest.raises(RateLimited) as info:
        await openai.chat(_request("gpt-4o", "hi [[sim: fault=429 retry_after=2]]"))
    assert info.value.retry_after == 2.0
    assert info.value.status_code == 429
    with pytest.raises(RateLimited) as streamed:
        _ = [e async for e in openai.stream(_request("gpt-4o", "hi [[sim: fault=429 retry_after_ms=1500]]"))]
    assert streamed.value.retry_after == 1.5
    assert simulator.stats()["requests"] == 2


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("401", AuthenticationFailed),
        ("403", PermissionDenied),
        ("404", ModelNotFound),
        ("500", UpstreamError),
        ("503", Overloaded),
        ("529", Overloaded),
        ("context_length", ContextLengthExceeded),
        ("content_filter", ContentFiltered),
    ],
)
async def test_sim_faults_map_into_the_tree(
    openai: OpenAIProvider, fault: str, expected: type[ProviderError]
) -> None:
    with pytest.raises(expected):
        await openai.chat(_request("gpt-4o", f"[[sim: fault={fault}]]"))


async def test_sim_invalid_key_and_unknown_model(openai: OpenAIProvider, sim_url: str) -> None:
    bad_key = OpenAIProvider(
        settings=ProviderSettings(api_key="sk-invalid", base_url=f"{sim_url}/v1"), environ={}
    )
    try:
        with pytest.raises(AuthenticationFailed):
            await bad_key.chat(_request())
    finally:
        await bad_key.aclose()
    with pytest.raises(ModelNotFound, match="gpt-9000"):
        await openai.chat(_request("gpt-9000"))


async def test_sim_exactly_one_request_per_call_even_on_500(
    openai: OpenAIProvider, simulator: SimulatorServer
) -> None:
    request = _request("gpt-4o", f"[[sim: fault=500 key={_key()}]]")
    with pytest.raises(UpstreamError):
        await openai.chat(request)
    assert simulator.stats()["requests"] == 1
    with pytest.raises(UpstreamError):
        _ = [e async for e in openai.stream(request)]
    assert simulator.stats()["requests"] == 2
    with pytest.raises(Overloaded):
        await openai.chat(_request("gpt-4o", "[[sim: fault=503 retry_after=1]]"))
    assert simulator.stats()["requests"] == 3


def _open_connections(client: httpx.AsyncClient) -> int:
    pool = client._transport._pool  # type: ignore[attr-defined]
    return len(pool.connections)


async def test_sim_cancelling_a_stream_consumer_closes_the_connection(sim_url: str) -> None:
    client = httpx.AsyncClient()
    provider = OpenAIProvider(
        settings=ProviderSettings(api_key="sk-test", base_url=f"{sim_url}/v1"), environ={}, http_client=client
    )
    first_text = asyncio.Event()
    received: list[StreamEvent] = []

    async def consume() -> None:
        request = _request("gpt-4o", "count " + "slowly " * 40 + "[[sim: token_delay=0.2]]")
        async for event in provider.stream(request):
            received.append(event)
            if isinstance(event, TextDelta):
                first_text.set()

    try:
        task = asyncio.create_task(consume())
        await asyncio.wait_for(first_text.wait(), timeout=30)
        assert _open_connections(client) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _open_connections(client) == 0
        assert not any(isinstance(e, StreamDone) for e in received)
        # the provider stays usable after the cancelled stream
        assert (await provider.chat(_request("gpt-4o", "still there?"))).text.endswith("still there?")
    finally:
        await client.aclose()


async def test_sim_breaking_out_of_a_stream_closes_the_connection(sim_url: str) -> None:
    client = httpx.AsyncClient()
    provider = OpenAIProvider(
        settings=ProviderSettings(api_key="sk-test", base_url=f"{sim_url}/v1"), environ={}, http_client=client
    )
    try:
        request = _request("gpt-4o", "count " + "slowly " * 40 + "[[sim: token_delay=0.2]]")
        async with contextlib.aclosing(provider.stream(request)) as events:  # type: ignore[type-var]
            async for event in events:
                if isinstance(event, TextDelta):
                    break
        assert _open_connections(client) == 0
    finally:
        await client.aclose()

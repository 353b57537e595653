"""Ollama provider mapping over `httpx.MockTransport`: request shapes, tool-call ids, usage, errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from kernel.contracts import (
    ChatRequest,
    EmbedRequest,
    StreamDone,
    StreamError,
    StreamEvent,
    StreamStart,
    TextDelta,
    ToolCallDelta,
)
from kernel.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    MalformedResponse,
    ModelNotFound,
    Overloaded,
    RateLimited,
    StreamInterrupted,
    UpstreamError,
)
from kernel.provider import collect_stream
from kernel.registry import Registry
from providers.ollama import OllamaProvider, parse_ollama_host

Handler = Callable[[httpx.Request], httpx.Response]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def provider(handler: Handler, environ: dict[str, str] | None = None) -> OllamaProvider:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return OllamaProvider(environ=environ or {}, http_client=client)


def final(message: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "model": "llama3.2",
        "created_at": "2025-01-01T00:00:00Z",
        "message": {"role": "assistant", **message},
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 12,
        "eval_count": 5,
        **extra,
    }


def ndjson(*lines: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def test_registers_through_the_registry() -> None:
    registry = Registry()
    registry.register(OllamaProvider)
    assert registry.provider_class("ollama") is OllamaProvider
    assert OllamaProvider(environ={}).describe()["credentials_present"] is True


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("gpu-box:11500", "http://gpu-box:11500"),
        ("gpu-box", "http://gpu-box:11434"),
        ("0.0.0.0", "http://0.0.0.0:11434"),
        ("https://ollama.example.com", "https://ollama.example.com:443"),
        ("http://10.1.2.3:8080/", "http://10.1.2.3:8080"),
        ("[::1]:9999", "http://[::1]:9999"),
    ],
)
def test_ollama_host_is_read_like_ollama_reads_it(value: str, expected: str) -> None:
    assert parse_ollama_host(value) == expected
    assert OllamaProvider(environ={"OLLAMA_HOST": value}).base_url == expected


def test_default_base_url() -> None:
    assert OllamaProvider(environ={}).base_url == "http://127.0.0.1:11434"


async def test_chat_maps_request_and_response() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=final({"content": "Paris."}))

    request = ChatRequest.model_validate(
        {
            "model": "llama3.2",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Where is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    ],
                },
            ],
            "temperature": 0.2,
            "top_p": 0.9,
            "max_tokens": 64,
            "stop": ["\n\n"],
            "seed": 7,
        }
    )
    response = await provider(handler).chat(request)
    [sent] = seen
    assert sent.url == "http://127.0.0.1:11434/api/chat"
    assert "authorization" not in sent.headers
    body = json.loads(sent.content)
    assert body["stream"] is False
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is this?", "images": ["iVBORw0KGgo="]},
    ]
    assert body["options"] == {
        "temperature": 0.2,
        "top_p": 0.9,
        "num_predict": 64,
        "stop": ["\n\n"],
        "seed": 7,
    }
    assert response.text == "Paris."
    assert response.finish_reason == "stop"
    assert response.provider == "ollama"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (
        12,
        5,
        17,
    )


async def test_length_finish_reason() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=final({"content": "Once upon"}, done_reason="length"))

    request = ChatRequest(model="llama3.2", messages=[{"role": "user", "content": "story"}], max_tokens=2)
    assert (await provider(handler).chat(request)).finish_reason == "length"


async def test_structured_output_sends_schema_as_format() -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=final({"content": '{"age": 22}'}))

    p = provider(handler)
    request = ChatRequest.model_validate(
        {
            "model": "llama3.1:8b",
            "messages": [{"role": "user", "content": "age?"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        }
    )
    response = await p.chat(request)
    assert bodies[0]["format"] == schema
    assert json.loads(response.text) == {"age": 22}
    json_mode = {**request.model_dump(by_alias=True), "response_format": {"type": "json_object"}}
    await p.chat(ChatRequest.model_validate(json_mode))
    assert bodies[1]["format"] == "json"


async def test_tool_calls_get_deterministic_ids_and_results_name_the_tool() -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        if len(bodies) <= 2:
            call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            return httpx.Response(200, json=final({"content": "", "tool_calls": [call]}))
        return httpx.Response(200, json=final({"content": "Sunny in Paris."}))

    p = provider(handler)
    request = ChatRequest.model_validate(
        {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [WEATHER_TOOL],
        }
    )
    first = await p.chat(request)
    again = await p.chat(request)
    [call] = first.tool_calls
    assert first.finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_") and call.id == again.tool_calls[0].id
    assert bodies[0]["tools"] == [WEATHER_TOOL]

    follow_up = ChatRequest.model_validate(
        {
            "model": "llama3.2",
            "tools": [WEATHER_TOOL],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
            ],
        }
    )
    answer = await p.chat(follow_up)
    assert answer.text == "Sunny in Paris."
    assistant, tool = bodies[2]["messages"][1:]
    assert assistant["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert tool == {"role": "tool", "content": "sunny", "tool_name": "get_weather"}


async def test_tool_choice_none_sends_no_tools() -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=final({"content": "ok"}))

    request = ChatRequest.model_validate(
        {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [WEATHER_TOOL],
            "tool_choice": "none",
        }
    )
    await provider(handler).chat(request)
    assert "tools" not in bodies[0]


async def test_stream_maps_ndjson_and_matches_chat() -> None:
    lines = [
        {
            "model": "llama3.2",
            "created_at": "t",
            "message": {"role": "assistant", "content": "Hel"},
            "done": False,
        },
        {
            "model": "llama3.2",
            "created_at": "t",
            "message": {"role": "assistant", "content": "lo"},
            "done": False,
        },
        final({"content": ""}, done_reason="stop"),
    ]
    sent: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, content=ndjson(*lines), headers={"content-type": "application/x-ndjson"})

    p = provider(handler)
    request = ChatRequest(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    events: list[StreamEvent] = [e async for e in p.stream(request)]
    assert sent[0]["stream"] is True
    assert isinstance(events[0], StreamStart)
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hel", "lo"]
    done = events[-1]
    assert isinstance(done, StreamDone)
    assert done.finish_reason == "stop" and done.usage.total_tokens == 17
    collected = await collect_stream(p.stream(request), provider="ollama")
    assert collected.text == "Hello"


async def test_stream_tool_calls_carry_the_same_ids_as_chat() -> None:
    call = {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    streamed = [
        {
            "model": "llama3.2",
            "created_at": "t",
            "message": {"role": "assistant", "content": "", "tool_calls": [call]},
            "done": False,
        },
        final({"content": ""}),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["stream"]:
            return httpx.Response(200, content=ndjson(*streamed))
        return httpx.Response(200, json=final({"content": "", "tool_calls": [call]}))

    p = provider(handler)
    request = ChatRequest.model_validate(
        {"model": "llama3.2", "messages": [{"role": "user", "content": "Oslo?"}], "tools": [WEATHER_TOOL]}
    )
    events = [e async for e in p.stream(request)]
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    assert len(deltas) == 1 and deltas[0].name == "get_weather"
    collected = await collect_stream(p.stream(request), provider="ollama")
    chat = await p.chat(request)
    assert collected.tool_calls == chat.tool_calls
    assert collected.finish_reason == chat.finish_reason == "tool_calls"


async def test_stream_broken_after_start_yields_stream_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = ndjson({"model": "llama3.2", "created_at": "t", "message": {"content": "Hi"}, "done": False})
        return httpx.Response(200, content=body)

    events = [
        e
        async for e in provider(handler).stream(
            ChatRequest(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
        )
    ]
    assert isinstance(events[0], StreamStart)
    assert isinstance(events[-1], StreamError) and events[-1].retryable
    with pytest.raises(StreamInterrupted):
        await collect_stream(
            provider(handler).stream(
                ChatRequest(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
            ),
            provider="ollama",
        )


async def test_error_line_inside_a_stream_becomes_stream_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = ndjson(
            {"model": "llama3.2", "created_at": "t", "message": {"content": "Hi"}, "done": False},
            {"error": "an error was encountered while running the model"},
        )
        return httpx.Response(200, content=body)

    events = [
        e
        async for e in provider(handler).stream(
            ChatRequest(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
        )
    ]
    assert isinstance(events[-1], StreamError)
    assert events[-1].error_type == "UpstreamError"


@pytest.mark.parametrize(
    ("status", "body", "headers", "error"),
    [
        (404, {"error": "model 'nope' not found, try pulling it first"}, {}, ModelNotFound),
        (400, {"error": 'invalid format: expected "json" or a JSON schema'}, {}, InvalidRequest),
        (400, {"error": "input is too long for the context window"}, {}, ContextLengthExceeded),
        (429, {"error": "too many requests"}, {"retry-after": "3"}, RateLimited),
        (503, {"error": "server busy, please try again. maximum pending requests exceeded"}, {}, Overloaded),
        (500, {"error": "llama runner process has terminated"}, {}, UpstreamError),
    ],
)
async def test_errors_map_into_the_kernel_tree(
    status: int, body: dict[str, Any], headers: dict[str, str], error: type[Exception]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body, headers=headers)

    request = ChatRequest(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(error) as caught:
        await provider(handler).chat(request)
    assert body["error"] in str(caught.value)
    if headers:
        assert getattr(caught.value, "retry_after", None) == 3.0
    with pytest.raises(error):
        [e async for e in provider(handler).stream(request)]


async def test_malformed_body_is_malformed_response() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'{"model": "llama3.2", "message": ')

    with pytest.raises(MalformedResponse):
        await provider(handler).chat(
            ChatRequest(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
        )


async def test_http_image_url_is_refused_before_any_call() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, json=final({"content": "x"}))

    request = ChatRequest.model_validate(
        {
            "model": "llava",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
                }
            ],
        }
    )
    with pytest.raises(InvalidRequest, match="data: URL"):
        await provider(handler).chat(request)
    assert calls == []


async def test_embed_maps_request_and_vectors() -> None:
    seen: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, json.loads(request.content)))
        return httpx.Response(
            200,
            json={
                "model": "nomic-embed-text",
                "embeddings": [[0.1, 0.2], [0.3, 0.4]],
                "prompt_eval_count": 6,
            },
        )

    response = await provider(handler).embed(
        EmbedRequest(model="nomic-embed-text", input=["a", "b"], dimensions=2)
    )
    assert seen == [("/api/embed", {"model": "nomic-embed-text", "input": ["a", "b"], "dimensions": 2})]
    assert response.embeddings == [[0.1, 0.2], [0.3, 0.4]]
    assert response.usage.prompt_tokens == 6

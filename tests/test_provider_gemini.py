"""GeminiProvider: wire mapping over ``httpx.MockTransport``, whole conversations against the simulator."""

from __future__ import annotations

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
    NamedToolChoice,
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
    ProviderError,
    RateLimited,
    UpstreamError,
)
from kernel.provider import ProviderSettings, collect_stream
from kernel.registry import Registry
from providers.gemini import GeminiProvider
from simulator.server import SimulatorServer

pytestmark = pytest.mark.timeout(60)

MODEL = "gemini-2.5-flash"
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
        "mayor": {"anyOf": [{"$ref": "#/$defs/person"}, {"type": "null"}]},
        "landmarks": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "population", "mayor", "landmarks"],
    "additionalProperties": False,
    "$defs": {"person": {"type": "object", "properties": {"name": {"type": ["string", "null"]}}}},
}
Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that records every request and answers with a fixed response."""

    def __init__(self, respond: Handler) -> None:
        self.requests: list[httpx.Request] = []
        self._respond = respond

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self._respond(request)

    @property
    def body(self) -> Any:
        return json.loads(self.requests[-1].content)


def mock_provider(
    respond: Handler, *, environ: dict[str, str] | None = None, api_key: str | None = "k-test"
) -> tuple[GeminiProvider, Recorder]:
    recorder = Recorder(respond)
    provider = GeminiProvider(
        settings=ProviderSettings(api_key=api_key),
        environ=environ or {},
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(recorder)),
    )
    return provider, recorder


def answer(parts: list[dict[str, Any]], finish: str = "STOP", **extra: Any) -> Handler:
    body = {
        "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15},
        "modelVersion": MODEL,
        "responseId": "resp-1",
        **extra,
    }
    return lambda request: httpx.Response(200, json=body)


def google_error(status: int, google_status: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "status": google_status, **extra}}


def chat(*messages: Any, **fields: Any) -> ChatRequest:
    return ChatRequest(model=fields.pop("model", MODEL), messages=list(messages), **fields)


# --- request mapping -----------------------------------------------------------------------------


async def test_request_maps_roles_system_instruction_config_and_auth_header() -> None:
    provider, recorder = mock_provider(answer([{"text": "ok"}]))
    request = chat(
        SystemMessage(content="Be terse."),
        UserMessage(
            content=[
                TextPart(text="What is this?"),
                ImagePart(image_url=ImageURL(url="data:image/png;base64,iVBORw0KGgo=")),
            ]
        ),
        AssistantMessage(content="A PNG."),
        UserMessage(content="Thanks"),
        temperature=0.3,
        top_p=0.9,
        max_tokens=64,
        stop=["END"],
        seed=7,
    )

    await provider.chat(request)

    sent = recorder.requests[0]
    assert sent.url.path == f"/v1beta/models/{MODEL}:generateContent"
    assert sent.headers["x-goog-api-key"] == "k-test"
    assert "authorization" not in sent.headers
    body = recorder.body
    assert body["systemInstruction"] == {"parts": [{"text": "Be terse."}]}
    assert body["contents"] == [
        {
            "role": "user",
            "parts": [
                {"text": "What is this?"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
            ],
        },
        {"role": "model", "parts": [{"text": "A PNG."}]},
        {"role": "user", "parts": [{"text": "Thanks"}]},
    ]
    assert body["generationConfig"] == {
        "temperature": 0.3,
        "topP": 0.9,
        "maxOutputTokens": 64,
        "stopSequences": ["END"],
        "seed": 7,
    }


async def test_tool_results_recover_the_function_name_from_the_earlier_call() -> None:
    provider, recorder = mock_provider(answer([{"text": "Sunny."}]))
    calls = [
        ToolCall(
            id="call_a", function=FunctionCall(name="get_weather", arguments='{"city": "Oslo", "days": 1}')
        ),
        ToolCall(id="call_b", function=FunctionCall(name="get_time", arguments='{"city": "Oslo"}')),
    ]
    request = chat(
        UserMessage(content="Weather and time in Oslo?"),
        AssistantMessage(tool_calls=calls),
        ToolMessage(tool_call_id="call_b", content="14:02"),
        ToolMessage(tool_call_id="call_a", content='{"sky": "sunny"}'),
        tools=[WEATHER_TOOL],
    )

    await provider.chat(request)

    contents = recorder.body["contents"]
    assert contents[1] == {
        "role": "model",
        "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Oslo", "days": 1}}},
            {"functionCall": {"name": "get_time", "args": {"city": "Oslo"}}},
        ],
    }
    # Parallel results travel together in one user turn, each named after the call it answers.
    assert contents[2] == {
        "role": "user",
        "parts": [
            {"functionResponse": {"name": "get_time", "response": {"output": "14:02"}}},
            {"functionResponse": {"name": "get_weather", "response": {"sky": "sunny"}}},
        ],
    }


async def test_tool_result_without_a_matching_call_is_refused_before_any_request() -> None:
    provider, recorder = mock_provider(answer([{"text": "unused"}]))
    request = chat(UserMessage(content="hi"), ToolMessage(tool_call_id="call_missing", content="42"))

    with pytest.raises(InvalidRequest, match="call_missing"):
        await provider.chat(request)
    assert recorder.requests == []


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        ("auto", {"mode": "AUTO"}),
        ("required", {"mode": "ANY"}),
        ("none", {"mode": "NONE"}),
        (
            NamedToolChoice.model_validate({"function": {"name": "get_weather"}}),
            {"mode": "ANY", "allowedFunctionNames": ["get_weather"]},
        ),
    ],
)
async def test_tool_choice_maps_to_function_calling_config(
    tool_choice: Any, expected: dict[str, Any]
) -> None:
    provider, recorder = mock_provider(answer([{"text": "ok"}]))

    await provider.chat(chat(UserMessage(content="hi"), tools=[WEATHER_TOOL], tool_choice=tool_choice))

    body = recorder.body
    assert body["toolConfig"] == {"functionCallingConfig": expected}
    declaration = body["tools"][0]["functionDeclarations"][0]
    assert declaration["name"] == "get_weather"
    assert declaration["parametersJsonSchema"] == WEATHER_TOOL.function.parameters


async def test_structured_output_sends_json_schema_to_current_models() -> None:
    provider, recorder = mock_provider(answer([{"text": "{}"}]))
    response_format = ResponseFormatJsonSchema(
        json_schema=JsonSchemaFormat(name="city", json_schema=CITY_SCHEMA)
    )

    await provider.chat(chat(UserMessage(content="A city"), response_format=response_format))

    config = recorder.body["generationConfig"]
    assert config == {"responseMimeType": "application/json", "responseJsonSchema": CITY_SCHEMA}


async def test_structured_output_converts_the_schema_for_gemini_2_0() -> None:
    provider, recorder = mock_provider(answer([{"text": "{}"}]))
    response_format = ResponseFormatJsonSchema(
        json_schema=JsonSchemaFormat(name="city", json_schema=CITY_SCHEMA)
    )

    await provider.chat(
        chat(UserMessage(content="A city"), model="gemini-2.0-flash", response_format=response_format)
    )

    config = recorder.body["generationConfig"]
    assert "responseJsonSchema" not in config
    assert config["responseSchema"] == {
        "type": "OBJECT",
        "properties": {
            "name": {"type": "STRING"},
            "population": {"type": "INTEGER"},
            "mayor": {
                "nullable": True,
                "type": "OBJECT",
                "properties": {"name": {"type": "STRING", "nullable": True}},
            },
            "landmarks": {"type": "ARRAY", "items": {"type": "STRING"}},
        },
        "required": ["name", "population", "mayor", "landmarks"],
    }


# --- response mapping ----------------------------------------------------------------------------


async def test_usage_counts_thoughts_as_completion_and_cache_inside_prompt() -> None:
    usage = {
        "promptTokenCount": 1000,
        "cachedContentTokenCount": 600,
        "candidatesTokenCount": 50,
        "thoughtsTokenCount": 200,
        "totalTokenCount": 1250,
    }
    provider, _ = mock_provider(answer([{"text": "Deep thought."}], usageMetadata=usage))

    response = await provider.chat(chat(UserMessage(content="think")))

    assert response.usage.prompt_tokens == 1000
    assert response.usage.cached_tokens == 600
    assert response.usage.completion_tokens == 250
    assert response.usage.reasoning_tokens == 200
    assert response.usage.total_tokens == 1250


async def test_thought_parts_are_not_part_of_the_answer() -> None:
    parts: list[dict[str, Any]] = [{"text": "Let me think...", "thought": True}, {"text": "42"}]
    provider, _ = mock_provider(answer(parts))

    response = await provider.chat(chat(UserMessage(content="answer?")))

    assert response.text == "42"


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("RECITATION", "content_filter"),
        ("SAFETY", "content_filter"),
        ("MALFORMED_FUNCTION_CALL", "error"),
    ],
)
async def test_finish_reasons_are_mapped(finish: str, expected: str) -> None:
    provider, _ = mock_provider(answer([{"text": "partial"}], finish=finish))

    response = await provider.chat(chat(UserMessage(content="hi")))

    assert response.finish_reason == expected
    assert response.text == "partial"


async def test_function_calls_finish_with_tool_calls_and_get_deterministic_ids() -> None:
    parts = [
        {"functionCall": {"name": "get_weather", "args": {"city": "Oslo", "days": 2}}},
        {"functionCall": {"name": "get_weather", "args": {"city": "Rome", "days": 2}}},
    ]
    provider, _ = mock_provider(answer(parts))
    request = chat(UserMessage(content="Weather?"), tools=[WEATHER_TOOL])

    first = await provider.chat(request)
    second = await provider.chat(request)

    assert first.finish_reason == "tool_calls"
    assert [c.function.parsed_arguments()["city"] for c in first.tool_calls] == ["Oslo", "Rome"]
    ids = [c.id for c in first.tool_calls]
    assert len(set(ids)) == 2 and all(ids)
    assert ids == [c.id for c in second.tool_calls]


@pytest.mark.parametrize(
    "body",
    [
        {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 9}},
        {"candidates": [{"finishReason": "SAFETY", "index": 0}]},
        {"candidates": [{"content": {"role": "model", "parts": []}, "finishReason": "PROHIBITED_CONTENT"}]},
    ],
)
async def test_safety_blocks_raise_content_filtered(body: dict[str, Any]) -> None:
    provider, _ = mock_provider(lambda request: httpx.Response(200, json=body))

    with pytest.raises(ContentFiltered):
        await provider.chat(chat(UserMessage(content="something unsafe")))


@pytest.mark.parametrize("body", [b"not json", b'{"candidates": []}', b'{"candidates": [{"content": 3}]}'])
async def test_a_malformed_success_body_is_malformed_response(body: bytes) -> None:
    provider, _ = mock_provider(lambda request: httpx.Response(200, content=body))

    with pytest.raises(MalformedResponse):
        await provider.chat(chat(UserMessage(content="hi")))


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "error_class"),
    [
        (429, google_error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota."), RateLimited),
        (
            400,
            google_error(
                400,
                "INVALID_ARGUMENT",
                "The input token count (1048600) exceeds the maximum number of tokens allowed (1048576).",
            ),
            ContextLengthExceeded,
        ),
        (
            400,
            google_error(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                details=[{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}],
            ),
            AuthenticationFailed,
        ),
        (400, google_error(400, "INVALID_ARGUMENT", "Request contains an invalid argument."), InvalidRequest),
        (
            404,
            google_error(404, "NOT_FOUND", "models/nope is not found for API version v1beta"),
            ModelNotFound,
        ),
        (500, google_error(500, "INTERNAL", "An internal error has occurred."), UpstreamError),
        (
            503,
            google_error(503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
            Overloaded,
        ),
        # streamGenerateContent without alt=sse wraps errors in a one-element array
        (429, [google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.")], RateLimited),
    ],
)
async def test_errors_are_classified_by_status_and_body(
    status: int, body: Any, error_class: type[ProviderError]
) -> None:
    provider, _ = mock_provider(lambda request: httpx.Response(status, json=body))

    with pytest.raises(error_class) as raised:
        await provider.chat(chat(UserMessage(content="hi")))

    assert type(raised.value) is error_class
    error = body[0]["error"] if isinstance(body, list) else body["error"]
    assert raised.value.code == error["status"]
    assert error["message"] in str(raised.value)


@pytest.mark.parametrize(
    ("headers", "details", "seconds"),
    [
        ({"retry-after": "3"}, [], 3.0),
        ({"retry-after-ms": "1500"}, [], 1.5),
        ({"x-ms-retry-after-ms": "250"}, [], 0.25),
        ({}, [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "31s"}], 31.0),
        ({}, [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.5s"}], 0.5),
        (
            {"retry-after": "2"},
            [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "9s"}],
            2.0,
        ),
        ({}, [], None),
    ],
)
async def test_rate_limits_carry_retry_after_from_headers_or_retry_info(
    headers: dict[str, str], details: list[dict[str, Any]], seconds: float | None
) -> None:
    body = google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", details=details)
    provider, _ = mock_provider(lambda request: httpx.Response(429, json=body, headers=headers))

    with pytest.raises(RateLimited) as raised:
        await provider.chat(chat(UserMessage(content="hi")))

    assert raised.value.retry_after == seconds


async def test_missing_key_names_gemini_api_key_and_sends_nothing() -> None:
    provider, recorder = mock_provider(answer([{"text": "unused"}]), api_key=None)

    with pytest.raises(MissingCredentials) as raised:
        await provider.chat(chat(UserMessage(content="hi")))
    with pytest.raises(MissingCredentials):
        provider.stream(chat(UserMessage(content="hi")))
    with pytest.raises(MissingCredentials):
        await provider.embed(EmbedRequest(model="text-embedding-004", input=["hi"]))

    assert raised.value.env_var == "GEMINI_API_KEY"
    assert "GEMINI_API_KEY" in str(raised.value)
    assert recorder.requests == []
    assert provider.describe()["credentials_present"] is False


async def test_google_api_key_is_the_fallback() -> None:
    provider, recorder = mock_provider(
        answer([{"text": "ok"}]), api_key=None, environ={"GOOGLE_API_KEY": "g-key"}
    )

    await provider.chat(chat(UserMessage(content="hi")))

    assert recorder.requests[0].headers["x-goog-api-key"] == "g-key"


async def test_base_url_comes_from_gemini_base_url() -> None:
    provider, recorder = mock_provider(
        answer([{"text": "ok"}]), environ={"GEMINI_BASE_URL": "http://proxy.local:9/"}
    )

    await provider.chat(chat(UserMessage(content="hi")))

    assert str(recorder.requests[0].url) == f"http://proxy.local:9/v1beta/models/{MODEL}:generateContent"


# --- streaming and embeddings over the mock ------------------------------------------------------


def sse(*chunks: dict[str, Any]) -> Handler:
    body = b"".join(b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n" for chunk in chunks)
    return lambda request: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})


async def events_of(stream: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    return [event async for event in stream]


async def test_stream_maps_chunks_to_typed_events() -> None:
    provider, recorder = mock_provider(
        sse(
            {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hel"}]}}], "responseId": "r1"},
            {
                "candidates": [
                    {
                        "content": {
                            "role": "model",
                            "parts": [
                                {"text": "lo"},
                                {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}},
                            ],
                        },
                        "finishReason": "STOP",
                    }
                ],
                "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 3, "thoughtsTokenCount": 4},
                "responseId": "r1",
            },
        )
    )

    events = await events_of(provider.stream(chat(UserMessage(content="hi"), tools=[WEATHER_TOOL])))

    assert str(recorder.requests[0].url).endswith(f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse")
    assert isinstance(events[0], StreamStart) and events[0].id == "r1"
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hel", "lo"]
    (call,) = [e for e in events if isinstance(e, ToolCallDelta)]
    assert call.name == "get_weather" and call.id and json.loads(call.arguments) == {"city": "Oslo"}
    done = events[-1]
    assert isinstance(done, StreamDone) and done.finish_reason == "tool_calls"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.reasoning_tokens) == (7, 7, 4)


async def test_a_blocked_stream_raises_before_any_event() -> None:
    provider, _ = mock_provider(sse({"promptFeedback": {"blockReason": "SAFETY"}}))

    with pytest.raises(ContentFiltered):
        await events_of(provider.stream(chat(UserMessage(content="unsafe"))))


async def test_an_error_event_after_text_becomes_a_stream_error() -> None:
    provider, _ = mock_provider(
        sse(
            {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hel"}]}}]},
            google_error(503, "UNAVAILABLE", "The model is overloaded."),
        )
    )

    events = await events_of(provider.stream(chat(UserMessage(content="hi"))))

    assert isinstance(events[-1], StreamError)
    assert events[-1].error_type == "Overloaded" and events[-1].retryable


async def test_embed_sends_batch_requests_with_dimensions() -> None:
    vectors = {"embeddings": [{"values": [0.1, 0.2]}, {"values": [0.3, 0.4]}]}
    provider, recorder = mock_provider(lambda request: httpx.Response(200, json=vectors))

    response = await provider.embed(
        EmbedRequest(model="gemini-embedding-001", input=["a", "b"], dimensions=2)
    )

    assert recorder.requests[0].url.path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert recorder.body == {
        "requests": [
            {
                "model": "models/gemini-embedding-001",
                "content": {"parts": [{"text": t}]},
                "outputDimensionality": 2,
            }
            for t in ("a", "b")
        ]
    }
    assert response.embeddings == [[0.1, 0.2], [0.3, 0.4]]


# --- whole conversations against the simulator ---------------------------------------------------


@pytest.fixture
async def live(sim: SimulatorServer) -> AsyncIterator[GeminiProvider]:
    registry = Registry(settings={"gemini": ProviderSettings(api_key="sim-key", base_url=sim.url)})
    registry.register(GeminiProvider)
    provider = registry.get("gemini")
    assert isinstance(provider, GeminiProvider)
    try:
        yield provider
    finally:
        await provider.aclose()


async def test_chat_against_the_simulator(live: GeminiProvider) -> None:
    response = await live.chat(chat(SystemMessage(content="Be brief."), UserMessage(content="Hello Gemini")))

    assert response.text == f"Simulated reply from {MODEL}: Hello Gemini"
    assert response.finish_reason == "stop"
    assert response.provider == "gemini" and response.id
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0


async def test_stream_collects_to_the_same_answer_as_chat(live: GeminiProvider) -> None:
    request = chat(UserMessage(content="Tell me about the northern lights over Tromsø in winter."))

    whole = await live.chat(request)
    streamed = await collect_stream(live.stream(request), provider="gemini")

    assert streamed.text == whole.text
    assert streamed.finish_reason == whole.finish_reason
    assert streamed.usage == whole.usage
    assert streamed.id == whole.id


async def test_tool_round_trip_against_the_simulator(live: GeminiProvider) -> None:
    question = UserMessage(content="Weather in Oslo for two days?")
    first = await live.chat(chat(question, tools=[WEATHER_TOOL], tool_choice="required"))
    streamed = await collect_stream(
        live.stream(chat(question, tools=[WEATHER_TOOL], tool_choice="required")), provider="gemini"
    )

    assert first.finish_reason == "tool_calls"
    (call,) = first.tool_calls
    assert call.function.name == "get_weather"
    assert call.function.parsed_arguments() == {"city": "sample city", "days": 1}
    assert streamed.tool_calls == first.tool_calls

    second = await live.chat(
        chat(
            question,
            AssistantMessage(tool_calls=first.tool_calls),
            ToolMessage(tool_call_id=call.id, content="Snow, -5 C"),
            tools=[WEATHER_TOOL],
        )
    )

    assert second.finish_reason == "stop"
    assert second.text == f"Simulated reply from {MODEL}: Snow, -5 C"


@pytest.mark.parametrize("model", [MODEL, "gemini-2.0-flash"])
async def test_structured_output_against_the_simulator(live: GeminiProvider, model: str) -> None:
    response_format = ResponseFormatJsonSchema(
        json_schema=JsonSchemaFormat(name="city", json_schema=CITY_SCHEMA)
    )

    response = await live.chat(
        chat(UserMessage(content="A city"), model=model, response_format=response_format)
    )

    data = json.loads(response.text)
    assert set(data) == {"name", "population", "mayor", "landmarks"}
    assert isinstance(data["population"], int) and isinstance(data["landmarks"], list)


async def test_embeddings_against_the_simulator(live: GeminiProvider) -> None:
    response = await live.embed(EmbedRequest(model="text-embedding-004", input=["one", "two", "one"]))
    small = await live.embed(EmbedRequest(model="gemini-embedding-001", input=["one"], dimensions=32))

    assert len(response.embeddings) == 3 and len(response.embeddings[0]) == 768
    assert response.embeddings[0] == response.embeddings[2] != response.embeddings[1]
    assert len(small.embeddings[0]) == 32


async def test_a_cut_stream_ends_in_a_stream_error(live: GeminiProvider) -> None:
    request = chat(
        UserMessage(content="A fairly long answer please, with many words in it [[sim: fault=cut]]")
    )

    events = await events_of(live.stream(request))

    assert isinstance(events[0], StreamStart)
    assert isinstance(events[-1], StreamError) and events[-1].retryable
    assert not any(isinstance(e, StreamDone) for e in events)


async def test_simulated_faults_map_into_the_error_tree(live: GeminiProvider) -> None:
    with pytest.raises(RateLimited) as limited:
        await live.chat(chat(UserMessage(content="hi [[sim: fault=429 retry_after=7]]")))
    with pytest.raises(ContextLengthExceeded):
        await live.chat(chat(UserMessage(content="hi [[sim: fault=context_length]]")))
    with pytest.raises(ContentFiltered):
        await live.chat(chat(UserMessage(content="hi [[sim: fault=content_filter]]")))
    with pytest.raises(ContentFiltered):
        await events_of(live.stream(chat(UserMessage(content="hi [[sim: fault=content_filter]]"))))
    with pytest.raises(Overloaded):
        await events_of(live.stream(chat(UserMessage(content="hi [[sim: fault=503]]"))))
    with pytest.raises(ModelNotFound):
        await live.chat(chat(UserMessage(content="hi"), model="gemini-0.1-imaginary"))
    with pytest.raises(MalformedResponse):
        await live.chat(chat(UserMessage(content="hi [[sim: fault=malformed]]")))

    assert limited.value.retry_after == 7.0

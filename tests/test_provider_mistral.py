"""Mistral: the parameter differences from OpenAI's wire (MockTransport), then whole conversations
against the simulator's OpenAI-shaped `/v1/chat/completions`, which Mistral shares."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from kernel.contracts import (
    ChatRequest,
    EmbedRequest,
    StreamDone,
    StreamStart,
    TextDelta,
    ToolCallDelta,
)
from kernel.errors import InvalidRequest, MissingCredentials
from kernel.provider import ProviderSettings, collect_stream
from kernel.registry import Registry
from providers.mistral import MistralProvider, mistral_tool_call_id
from simulator.core import SimulatorConfig
from simulator.server import SimulatorServer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
Handler = Callable[[httpx.Request], httpx.Response]


def _chat(text: str = "Bonjour", **fields: Any) -> ChatRequest:
    return ChatRequest.model_validate(
        {"model": "mistral-small-latest", "messages": [{"role": "user", "content": text}], **fields}
    )


def _completion(message: dict[str, Any], finish_reason: str = "stop") -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "chat.completion",
        "model": "mistral-small-latest",
        "choices": [
            {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish_reason}
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    }


def _provider(handler: Handler, *, environ: dict[str, str] | None = None) -> MistralProvider:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return MistralProvider(
        environ={"MISTRAL_API_KEY": "m-key"} if environ is None else environ, http_client=client
    )


def _recording(response: httpx.Response) -> tuple[list[dict[str, Any]], list[httpx.Request], Handler]:
    bodies: list[dict[str, Any]] = []
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        bodies.append(json.loads(request.content))
        return response

    return bodies, requests, handler


def _sse(chunks: list[dict[str, Any]]) -> httpx.Response:
    text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


# --- request mapping -------------------------------------------------------------------------------


async def test_request_uses_mistral_names_for_seed_tool_choice_and_token_limit() -> None:
    bodies, requests, handler = _recording(httpx.Response(200, json=_completion({"content": "Salut"})))
    request = _chat(seed=7, max_tokens=50, tools=[WEATHER_TOOL], tool_choice="required")
    response = await _provider(handler).chat(request)
    (body,) = bodies
    assert str(requests[0].url) == "https://api.mistral.ai/v1/chat/completions"
    assert requests[0].headers["authorization"] == "Bearer m-key"
    assert body["random_seed"] == 7 and "seed" not in body
    assert body["tool_choice"] == "any"
    assert body["max_tokens"] == 50
    assert response.text == "Salut"
    assert response.usage.total_tokens == 12


async def test_named_tool_choice_and_json_schema_pass_through() -> None:
    bodies, _, handler = _recording(httpx.Response(200, json=_completion({"content": "{}"})))
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    request = _chat(
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "out", "schema": schema, "strict": True},
        },
    )
    await _provider(handler).chat(request)
    assert bodies[0]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert bodies[0]["response_format"]["json_schema"]["schema"] == schema


async def test_foreign_tool_call_ids_are_rewritten_consistently_and_names_dropped() -> None:
    bodies, _, handler = _recording(httpx.Response(200, json=_completion({"content": "It is sunny"})))
    request = ChatRequest.model_validate(
        {
            "model": "mistral-large-latest",
            "tools": [WEATHER_TOOL],
            "messages": [
                {"role": "system", "content": "Be brief", "name": "policy"},
                {"role": "user", "content": "Weather?", "name": "alice"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "call_abc123def456", "function": {"name": "get_weather", "arguments": "{}"}},
                        {"id": "Ab3dE6gH9", "function": {"name": "get_weather", "arguments": "{}"}},
                    ],
                },
                {"role": "tool", "tool_call_id": "call_abc123def456", "content": "sunny"},
                {"role": "tool", "tool_call_id": "Ab3dE6gH9", "content": "warm"},
            ],
        }
    )
    await _provider(handler).chat(request)
    messages = bodies[0]["messages"]
    assert all("name" not in m for m in messages)
    rewritten, kept = (c["id"] for c in messages[2]["tool_calls"])
    assert len(rewritten) == 9 and rewritten.isalnum()
    assert kept == "Ab3dE6gH9"
    assert [messages[3]["tool_call_id"], messages[4]["tool_call_id"]] == [rewritten, kept]
    assert mistral_tool_call_id("call_abc123def456") == rewritten


async def test_stream_request_has_no_stream_options() -> None:
    bodies, _, handler = _recording(
        _sse(
            [
                {
                    "id": "s",
                    "model": "m",
                    "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}],
                }
            ]
        )
    )
    await collect_stream(_provider(handler).stream(_chat()), provider="mistral")
    assert bodies[0]["stream"] is True
    assert "stream_options" not in bodies[0]


async def test_missing_key_names_the_variable_before_any_call() -> None:
    def no_network(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request may be sent")

    with pytest.raises(MissingCredentials, match="MISTRAL_API_KEY"):
        await _provider(no_network, environ={}).chat(_chat())


# --- response mapping ------------------------------------------------------------------------------


async def test_model_length_finish_reason_is_length() -> None:
    _, _, handler = _recording(httpx.Response(200, json=_completion({"content": "cut"}, "model_length")))
    assert (await _provider(handler).chat(_chat())).finish_reason == "length"


async def test_content_as_chunks_keeps_the_text_and_drops_thinking() -> None:
    content = [
        {"type": "thinking", "thinking": [{"type": "text", "text": "Let me think"}]},
        {"type": "text", "text": "The answer "},
        {"type": "text", "text": "is 4."},
    ]
    _, _, handler = _recording(httpx.Response(200, json=_completion({"content": content})))
    assert (await _provider(handler).chat(_chat())).text == "The answer is 4."


async def test_tool_call_arguments_given_as_an_object_become_json_text() -> None:
    calls = [
        {
            "id": "Ab3dE6gH9",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Lyon"}},
        }
    ]
    _, _, handler = _recording(
        httpx.Response(200, json=_completion({"content": None, "tool_calls": calls}, "tool_calls"))
    )
    response = await _provider(handler).chat(_chat(tools=[WEATHER_TOOL]))
    assert response.finish_reason == "tool_calls"
    assert response.tool_calls[0].function.parsed_arguments() == {"city": "Lyon"}


async def test_validation_error_names_the_field() -> None:
    body = {
        "object": "error",
        "message": {
            "detail": [{"loc": ["body", "temperature"], "msg": "Input should be less than or equal to 1.5"}]
        },
        "type": "invalid_request_message_error",
        "code": None,
    }
    _, _, handler = _recording(httpx.Response(422, json=body))
    with pytest.raises(InvalidRequest, match=r"temperature: Input should be less than or equal to 1\.5"):
        await _provider(handler).chat(_chat())


async def test_stream_with_usage_in_the_last_chunk_and_unindexed_tool_calls() -> None:
    calls = [
        {"id": "AAAAAAAA1", "function": {"name": "get_weather", "arguments": '{"city": "Nice"}'}},
        {"id": "AAAAAAAA2", "function": {"name": "get_weather", "arguments": '{"city": "Metz"}'}},
    ]
    chunks = [
        {
            "id": "s1",
            "model": "mistral-small-latest",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        },
        {
            "id": "s1",
            "model": "mistral-small-latest",
            "choices": [{"index": 0, "delta": {"tool_calls": calls}}],
        },
        {
            "id": "s1",
            "model": "mistral-small-latest",
            "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30},
        },
    ]
    _, _, handler = _recording(_sse(chunks))
    response = await collect_stream(
        _provider(handler).stream(_chat(tools=[WEATHER_TOOL])), provider="mistral"
    )
    assert [c.function.parsed_arguments() for c in response.tool_calls] == [
        {"city": "Nice"},
        {"city": "Metz"},
    ]
    assert [c.id for c in response.tool_calls] == ["AAAAAAAA1", "AAAAAAAA2"]
    assert response.finish_reason == "tool_calls"
    assert response.usage.total_tokens == 30


async def test_embeddings_send_output_dimension() -> None:
    body = {
        "data": [{"index": 0, "embedding": [0.5, 0.5]}],
        "model": "mistral-embed",
        "usage": {"prompt_tokens": 2},
    }
    bodies, requests, handler = _recording(httpx.Response(200, json=body))
    result = await _provider(handler).embed(EmbedRequest(model="codestral-embed", input=["x"], dimensions=2))
    assert requests[0].url.path == "/v1/embeddings"
    assert bodies[0]["output_dimension"] == 2 and "dimensions" not in bodies[0]
    assert result.embeddings == [[0.5, 0.5]]


# --- end to end against the simulator --------------------------------------------------------------

MISTRAL_MODELS = ["mistral-small-latest", "mistral-large-latest", "mistral-embed"]


@pytest.fixture(scope="module")
def mistral_sim() -> Iterator[SimulatorServer]:
    with SimulatorServer(config=SimulatorConfig(extra_models={"openai": MISTRAL_MODELS})) as server:
        yield server


@pytest.fixture
async def mistral(mistral_sim: SimulatorServer) -> Any:
    registry = Registry(
        settings={"mistral": ProviderSettings(base_url=f"{mistral_sim.url}/v1")},
        environ={"MISTRAL_API_KEY": "sim-key"},
    )
    registry.register(MistralProvider)
    provider, model = registry.resolve("mistral/mistral-small-latest")
    assert model == "mistral-small-latest"
    yield provider
    await registry.aclose()


async def test_simulator_chat(mistral: MistralProvider) -> None:
    response = await mistral.chat(_chat("Quelle heure est-il ?", seed=3))
    assert response.text == "Simulated reply from mistral-small-latest: Quelle heure est-il ?"
    assert response.provider == "mistral"
    assert response.usage.completion_tokens > 0


async def test_simulator_stream(mistral: MistralProvider) -> None:
    events = [e async for e in mistral.stream(_chat("en continu"))]
    assert isinstance(events[0], StreamStart)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == (
        "Simulated reply from mistral-small-latest: en continu"
    )
    assert isinstance(events[-1], StreamDone)
    assert events[-1].finish_reason == "stop"


async def test_simulator_tools_with_any(mistral: MistralProvider) -> None:
    first = await mistral.chat(_chat("Météo à Paris ?", tools=[WEATHER_TOOL], tool_choice="required"))
    (call,) = first.tool_calls
    assert call.function.name == "get_weather"
    follow_up = ChatRequest.model_validate(
        {
            "model": "mistral-small-latest",
            "tools": [WEATHER_TOOL],
            "messages": [
                {"role": "user", "content": "Météo à Paris ?"},
                first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "ensoleillé"},
            ],
        }
    )
    assert (await mistral.chat(follow_up)).text.endswith("ensoleillé")
    streamed = [e async for e in mistral.stream(_chat("Météo ?", tools=[WEATHER_TOOL]))]
    assert any(isinstance(e, ToolCallDelta) and e.name == "get_weather" for e in streamed)
    assert isinstance(streamed[-1], StreamDone) and streamed[-1].finish_reason == "tool_calls"


async def test_simulator_embeddings(mistral: MistralProvider) -> None:
    result = await mistral.embed(EmbedRequest(model="mistral-embed", input=["un", "deux"]))
    assert len(result.embeddings) == 2

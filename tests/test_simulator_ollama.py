"""The Ollama provider against the simulator's Ollama wire over real HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from kernel.contracts import ChatRequest, EmbedRequest, StreamError, StreamStart
from kernel.errors import (
    ContentFiltered,
    ContextLengthExceeded,
    MalformedResponse,
    ModelNotFound,
    Overloaded,
    RateLimited,
    UpstreamError,
)
from kernel.provider import collect_stream
from providers.ollama import OllamaProvider
from simulator.server import SimulatorServer

pytestmark = pytest.mark.timeout(60)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorServer]:
    with SimulatorServer() as server:
        yield server


@pytest.fixture
async def ollama(sim: SimulatorServer) -> AsyncIterator[OllamaProvider]:
    host = sim.url.removeprefix("http://")  # OLLAMA_HOST is host:port without a scheme
    provider = OllamaProvider(environ={"OLLAMA_HOST": host})
    yield provider
    await provider.aclose()


def user(text: str, model: str = "llama3.2", **extra: object) -> ChatRequest:
    return ChatRequest.model_validate(
        {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    )


def without_id(response: object) -> dict[str, object]:
    data = response.model_dump()  # type: ignore[attr-defined]
    data.pop("id")
    return data  # type: ignore[no-any-return]


async def test_chat_and_stream_agree(ollama: OllamaProvider) -> None:
    request = user("Hello   there", max_tokens=200)
    chat = await ollama.chat(request)
    assert chat.text == "Simulated reply from llama3.2: Hello there"
    assert chat.finish_reason == "stop"
    assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens > 0
    streamed = await collect_stream(ollama.stream(request), provider="ollama")
    assert without_id(streamed) == without_id(chat)


async def test_latest_tag_and_length_limit(ollama: OllamaProvider) -> None:
    response = await ollama.chat(
        user("a fairly long question for a tiny budget", model="llama3.2:latest", max_tokens=2)
    )
    assert response.finish_reason == "length"
    assert len(response.text) <= 8


async def test_tool_round_trip(ollama: OllamaProvider) -> None:
    request = user("Weather in Oslo?", tools=[WEATHER_TOOL])
    first = await ollama.chat(request)
    [call] = first.tool_calls
    assert first.finish_reason == "tool_calls"
    assert json.loads(call.function.arguments) == {"city": "sample city"}
    streamed = await collect_stream(ollama.stream(request), provider="ollama")
    assert streamed.tool_calls == first.tool_calls
    follow_up = ChatRequest.model_validate(
        {
            "model": "llama3.2",
            "tools": [WEATHER_TOOL],
            "messages": [
                {"role": "user", "content": "Weather in Oslo?"},
                first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "rain, 4 degrees"},
            ],
        }
    )
    answer = await ollama.chat(follow_up)
    assert answer.text == "Simulated reply from llama3.2: rain, 4 degrees"


async def test_structured_output(ollama: OllamaProvider) -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}, "ok": {"type": "boolean"}}}
    request = user(
        "Age?", response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    )
    response = await ollama.chat(request)
    assert json.loads(response.text) == {"age": 0, "ok": True}
    streamed = await collect_stream(ollama.stream(request), provider="ollama")
    assert streamed.text == response.text


async def test_cut_stream_yields_stream_error(ollama: OllamaProvider) -> None:
    events = [e async for e in ollama.stream(user("a reply long enough to cut [[sim: fault=cut]]"))]
    assert isinstance(events[0], StreamStart)
    assert isinstance(events[-1], StreamError) and events[-1].retryable


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("429", RateLimited),
        ("503", Overloaded),
        ("500", UpstreamError),
        ("404", ModelNotFound),
        ("context_length", ContextLengthExceeded),
        ("content_filter", ContentFiltered),
        ("malformed", MalformedResponse),
    ],
)
async def test_faults_map_to_kernel_errors(
    ollama: OllamaProvider, fault: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await ollama.chat(user(f"hi [[sim: fault={fault}]]"))
    with pytest.raises(error):
        [e async for e in ollama.stream(user(f"hi [[sim: fault={fault}]]"))]


async def test_unknown_model(ollama: OllamaProvider) -> None:
    with pytest.raises(ModelNotFound, match="llama9"):
        await ollama.chat(user("hi", model="llama9"))


async def test_embeddings(ollama: OllamaProvider) -> None:
    response = await ollama.embed(EmbedRequest(model="nomic-embed-text", input=["a", "b"]))
    assert [len(v) for v in response.embeddings] == [768, 768]
    assert response.embeddings[0] != response.embeddings[1]
    assert response.usage.prompt_tokens == 2


async def test_tags_list_catalog_models(sim: SimulatorServer) -> None:
    async with httpx.AsyncClient() as client:
        tags = (await client.get(f"{sim.url}/api/tags")).json()
    names = {m["name"] for m in tags["models"]}
    assert {"llama3.2:latest", "llama3.1:8b", "nomic-embed-text:latest"} <= names

"""A provider's broken stream and a bug in our own reading code are told apart.

Vendor JSON is read through the shape readers (``providers._http``), whose ``WireShapeError`` alone
becomes ``MalformedResponse``. So a stream whose JSON parses but carries a mistyped field (the
simulator's ``mistyped`` fault, for every wire) is ``MalformedResponse`` naming that field, before the
first event or as the stream's typed ``StreamError`` after it; while a ``KeyError``, ``TypeError`` or
``ValueError`` raised by our own code inside a stream reader reaches the caller as itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from kernel.contracts import ChatRequest, StreamError, StreamEvent, StreamStart
from kernel.errors import MalformedResponse
from kernel.provider import Provider, ProviderSettings
from providers.anthropic import AnthropicProvider
from providers.bedrock import BedrockProvider
from providers.gemini import GeminiProvider
from providers.ollama import OllamaProvider
from providers.openai import OpenAIProvider
from simulator.server import SimulatorServer
from worker.app import simulator_settings

_AWS = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret"}


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorServer]:
    with SimulatorServer() as server:
        yield server


def _live(name: str, url: str) -> Provider:
    settings = simulator_settings(url)
    if name == "openai-responses":
        base = settings["openai"]
        return OpenAIProvider(settings=base.model_copy(update={"options": {"api": "responses"}}))
    if name == "bedrock":
        return BedrockProvider(settings=settings["bedrock"], environ=_AWS)
    classes: dict[str, type[Provider]] = {
        "openai": OpenAIProvider,
        "anthropic": AnthropicProvider,
        "gemini": GeminiProvider,
        "ollama": OllamaProvider,
    }
    return classes[name](settings=settings[name])


# provider, model, the field the simulator's mistyped stream gets wrong, whether that comes before
# the first event (then the stream raises) or after it (then it ends with a StreamError).
_MISTYPED_STREAMS = [
    ("openai", "gpt-4o", "delta.tool_calls[].index should be an integer", "after"),
    ("openai-responses", "gpt-4o", "response.output_item.added.output_index should be an integer", "after"),
    ("anthropic", "claude-3-5-haiku-latest", "message_start.message should be an object", "before"),
    ("gemini", "gemini-2.5-flash", "candidates[].content should be an object", "before"),
    ("ollama", "llama3.2", "tool_calls[].function should be an object", "after"),
    (
        "bedrock",
        "anthropic.claude-3-5-haiku-20241022-v1:0",
        "contentBlockStart.contentBlockIndex should be an integer",
        "after",
    ),
]


async def _events(stream: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    return [event async for event in stream]


@pytest.mark.parametrize(("name", "model", "field", "when"), _MISTYPED_STREAMS)
async def test_a_mistyped_stream_chunk_is_malformed_response_naming_the_field(
    simulator: SimulatorServer, name: str, model: str, field: str, when: str
) -> None:
    provider = _live(name, simulator.url)
    request = ChatRequest(model=model, messages=[{"role": "user", "content": "hi [[sim: fault=mistyped]]"}])
    try:
        if when == "before":
            with pytest.raises(MalformedResponse, match=field.replace("[", r"\[").replace("]", r"\]")):
                await _events(provider.stream(request))
        else:
            events = await _events(provider.stream(request))
            assert isinstance(events[0], StreamStart), events
            last = events[-1]
            assert isinstance(last, StreamError), events
            assert last.error_type == "MalformedResponse" and not last.retryable, last
            assert field in last.message, last.message
    finally:
        await provider.aclose()


@pytest.mark.parametrize(("name", "model"), [(n, m) for n, m, _, _ in _MISTYPED_STREAMS])
async def test_a_mistyped_body_is_malformed_response(
    simulator: SimulatorServer, name: str, model: str
) -> None:
    provider = _live(name, simulator.url)
    request = ChatRequest(model=model, messages=[{"role": "user", "content": "hi [[sim: fault=mistyped]]"}])
    try:
        with pytest.raises(MalformedResponse, match="should be"):
            await provider.chat(request)
    finally:
        await provider.aclose()


# --- a bug of ours inside a stream reader is not the vendor's malformed stream ----------------------


def _sse(*events: tuple[str, str]) -> httpx.MockTransport:
    body = "".join(f"event: {kind}\ndata: {data}\n\n" for kind, data in events).encode()
    return httpx.MockTransport(
        lambda request: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
    )


class _OpenAIWithBug(OpenAIProvider):
    def _call_arguments(self, arguments: Any) -> str:
        return {"not": "hashable"}[arguments]  # type: ignore[index]  # a KeyError of our own


class _AnthropicWithBug(AnthropicProvider):
    def _map_usage(self, usage: Any) -> Any:
        raise TypeError("a bug in our usage mapping")


class _OllamaWithBug(OllamaProvider):
    def _tool_calls(self, message: dict[str, Any], offset: int = 0) -> Any:
        raise KeyError("a bug in our tool call mapping")


@pytest.mark.parametrize("after_start", [False, True])
async def test_a_key_error_of_ours_in_the_openai_stream_reader_is_not_masked(after_start: bool) -> None:
    content = '{"id":"c","choices":[{"index":0,"delta":{"content":"Hi"}}]}'
    call = '{"id":"c","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"x","function":{"name":"f","arguments":"{}"}}]}}]}'
    chunks = [("message", content), ("message", call)] if after_start else [("message", call)]
    provider = _OpenAIWithBug(
        settings=ProviderSettings(api_key="k"),
        http_client=httpx.AsyncClient(transport=_sse(*chunks, ("message", "[DONE]"))),
    )
    request = ChatRequest(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(KeyError, match=r"\{\}"):
        await _events(provider.stream(request))


async def test_a_type_error_of_ours_in_the_anthropic_stream_reader_is_not_masked() -> None:
    start = '{"type":"message_start","message":{"id":"m","model":"claude-3-5-haiku-latest","usage":{}}}'
    provider = _AnthropicWithBug(
        settings=ProviderSettings(api_key="k"),
        http_client=httpx.AsyncClient(
            transport=_sse(
                ("message_start", start),
                (
                    "content_block_start",
                    '{"type":"content_block_start","index":0,"content_block":{"type":"text","text":"Hi"}}',
                ),
                (
                    "message_delta",
                    '{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":1}}',
                ),
                ("message_stop", '{"type":"message_stop"}'),
            )
        ),
    )
    request = ChatRequest(model="claude-3-5-haiku-latest", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(TypeError, match="a bug in our usage mapping"):
        await _events(provider.stream(request))


async def test_a_key_error_of_ours_in_the_ollama_stream_reader_is_not_masked() -> None:
    line = b'{"model":"llama3.2","message":{"role":"assistant","content":"Hi"},"done":false}\n'
    provider = _OllamaWithBug(
        http_client=httpx.AsyncClient(
            transport=httpx.MockTransport(lambda request: httpx.Response(200, content=line))
        ),
    )
    request = ChatRequest(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(KeyError, match="a bug in our tool call mapping"):
        await _events(provider.stream(request))

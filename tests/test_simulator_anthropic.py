"""The simulator speaks Anthropic's Messages API: the official ``anthropic`` SDK is the client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import MessageParam, ToolParam
from pydantic import BaseModel

from simulator.server import SimulatorServer

MODEL = "claude-sonnet-4-5"
# Newer SDKs warn about model retirement dates; the names here are simulator catalog entries.
pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")
WEATHER_TOOL: ToolParam = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
    },
}


@pytest.fixture
async def sdk(sim: SimulatorServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=sim.url, api_key="sk-ant-test", max_retries=0) as sdk:
        yield sdk


def _user(text: str) -> list[MessageParam]:
    return [{"role": "user", "content": text}]


def _texts(message: Any) -> list[str]:
    return [block.text for block in message.content if block.type == "text"]


async def test_create_answers_with_a_message(sdk: anthropic.AsyncAnthropic) -> None:
    message = await sdk.messages.create(
        model=MODEL, max_tokens=256, system="Be brief.", messages=_user("Hello there")
    )
    assert message.id.startswith("msg_")
    assert message.type == "message" and message.role == "assistant"
    assert message.model == MODEL
    assert _texts(message) == [f"Simulated reply from {MODEL}: Hello there"]
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert message.usage.cache_read_input_tokens == 0


async def test_cached_directive_reports_cache_reads_apart_from_input(
    sdk: anthropic.AsyncAnthropic,
) -> None:
    plain = await sdk.messages.create(
        model=MODEL, max_tokens=256, messages=_user("Same length [[sim: cached=0]]")
    )
    cached = await sdk.messages.create(
        model=MODEL, max_tokens=256, messages=_user("Same length [[sim: cached=5]]")
    )
    assert cached.usage.cache_read_input_tokens == 5
    assert cached.usage.input_tokens == plain.usage.input_tokens - 5


async def test_max_tokens_cuts_the_answer(sdk: anthropic.AsyncAnthropic) -> None:
    message = await sdk.messages.create(model=MODEL, max_tokens=3, messages=_user("a rather long question"))
    assert message.stop_reason == "max_tokens"
    assert len(_texts(message)[0]) <= 12


async def test_stream_final_message_equals_the_created_one(sdk: anthropic.AsyncAnthropic) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 256,
        "system": "Be brief.",
        "messages": _user("Tell me about streams [[sim: cached=3]]"),
    }
    created = await sdk.messages.create(**kwargs)
    async with sdk.messages.stream(**kwargs) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert len(pieces) > 1
    assert "".join(pieces) == _texts(created)[0]
    assert _texts(final) == _texts(created)
    assert final.usage == created.usage
    assert final.stop_reason == created.stop_reason


async def test_raw_stream_has_the_messages_event_sequence(
    sdk: anthropic.AsyncAnthropic, sim: SimulatorServer
) -> None:
    stream = await sdk.messages.create(model=MODEL, max_tokens=64, messages=_user("Two words"), stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    # The SDK hides pings; the bytes on the wire carry one after the first block starts.
    async with httpx.AsyncClient(base_url=sim.url) as raw:
        response = await raw.post(
            "/v1/messages",
            headers={"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"},
            json={"model": MODEL, "max_tokens": 64, "messages": _user("Two words"), "stream": True},
        )
    names = [
        line.removeprefix("event: ") for line in response.text.splitlines() if line.startswith("event: ")
    ]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert response.headers["content-type"].startswith("text/event-stream")


async def test_tool_use_round_trip(sdk: anthropic.AsyncAnthropic) -> None:
    question = _user("What is the weather in Oslo?")
    first = await sdk.messages.create(model=MODEL, max_tokens=256, messages=question, tools=[WEATHER_TOOL])
    assert first.stop_reason == "tool_use"
    [call] = [block for block in first.content if block.type == "tool_use"]
    assert call.id.startswith("toolu_")
    assert call.name == "get_weather"
    assert call.input == {"city": "sample city", "unit": "celsius"}
    second = await sdk.messages.create(
        model=MODEL,
        max_tokens=256,
        tools=[WEATHER_TOOL],
        messages=[
            *question,
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Snow, -3 C"}],
            },
        ],
    )
    assert second.stop_reason == "end_turn"
    assert "Snow, -3 C" in _texts(second)[0]


async def test_streamed_tool_input_matches_the_created_one(sdk: anthropic.AsyncAnthropic) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 256,
        "messages": _user("Weather?"),
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    created = await sdk.messages.create(**kwargs)
    async with sdk.messages.stream(**kwargs) as stream:
        final = await stream.get_final_message()
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [
        (b.name, b.input) for b in created.content if b.type == "tool_use"
    ]
    assert final.stop_reason == "tool_use"


class City(BaseModel):
    name: str
    population: int
    landmarks: list[str]


async def test_structured_output_parses(sdk: anthropic.AsyncAnthropic) -> None:
    message = await sdk.messages.parse(
        model=MODEL, max_tokens=256, messages=_user("Describe Oslo"), output_format=City
    )
    city = message.parsed_output
    assert isinstance(city, City)
    assert json.loads(_texts(message)[0]) == city.model_dump()


# ---- errors ---------------------------------------------------------------------------------------


async def test_rate_limit_error_carries_retry_after(sdk: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.RateLimitError) as caught:
        await sdk.messages.create(
            model=MODEL, max_tokens=16, messages=_user("Hi [[sim: fault=429 retry_after=7]]")
        )
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert caught.value.request_id is not None and caught.value.request_id.startswith("req_")


async def test_overloaded_is_529(sdk: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.OverloadedError) as caught:
        await sdk.messages.create(model=MODEL, max_tokens=16, messages=_user("Hi [[sim: fault=529]]"))
    assert isinstance(caught.value, anthropic.InternalServerError)
    assert caught.value.status_code == 529
    assert caught.value.body == {  # the SDK keeps the decoded error body
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
        "request_id": caught.value.request_id,
    }


async def test_prompt_too_long_is_a_bad_request(sdk: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match=r"prompt is too long: \d+ tokens > 200000 maximum"):
        await sdk.messages.create(
            model=MODEL, max_tokens=16, messages=_user("Hi [[sim: fault=context_length]]")
        )


async def test_unknown_model_is_not_found(sdk: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        await sdk.messages.create(model="claude-nope-9", max_tokens=16, messages=_user("Hi"))
    assert caught.value.body["error"] == {"type": "not_found_error", "message": "model: claude-nope-9"}  # type: ignore[index]


async def test_dated_snapshots_and_sim_models_are_known(sdk: anthropic.AsyncAnthropic) -> None:
    for model in ("claude-sonnet-4-5-20250929", "claude-3-5-haiku-latest", "sim-anything"):
        message = await sdk.messages.create(model=model, max_tokens=64, messages=_user("Hi"))
        assert message.model == model


async def test_refused_keys_are_authentication_errors(sim: SimulatorServer) -> None:
    async with anthropic.AsyncAnthropic(base_url=sim.url, api_key="sk-ant-invalid", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError):
            await bad.messages.create(model=MODEL, max_tokens=16, messages=_user("Hi"))
    async with httpx.AsyncClient(base_url=sim.url) as raw:
        response = await raw.post(
            "/v1/messages",
            headers={"anthropic-version": "2023-06-01"},
            json={"model": MODEL, "max_tokens": 16, "messages": _user("Hi")},
        )
    assert response.status_code == 401
    assert response.json()["error"] == {
        "type": "authentication_error",
        "message": "x-api-key header is required",
    }


async def test_requests_anthropic_refuses_are_bad_requests(sdk: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        await sdk.messages.create(model=MODEL, max_tokens=0, messages=_user("Hi"))


async def test_a_cut_stream_gives_no_final_message(sdk: anthropic.AsyncAnthropic) -> None:
    # The SDK lets the transport's own error through when a stream breaks after its headers.
    with pytest.raises(Exception, match=r"incomplete|closed"):
        async with sdk.messages.stream(
            model=MODEL, max_tokens=256, messages=_user("A question with several words [[sim: fault=cut]]")
        ) as stream:
            await stream.get_final_message()

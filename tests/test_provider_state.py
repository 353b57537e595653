"""Provider state that must survive a round trip: Gemini 3's thought signatures and call ids (against
the simulator, which refuses an unsigned current turn as Gemini 3 does), Anthropic's signed thinking
blocks (on a vendor-documented response, over ``httpx.MockTransport``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from kernel.contracts import (
    AssistantMessage,
    ChatRequest,
    FunctionDefinition,
    ProviderState,
    ProviderStateEvent,
    Tool,
    ToolMessage,
    UserMessage,
)
from kernel.errors import InvalidRequest
from kernel.provider import ProviderSettings, collect_stream
from providers.anthropic import AnthropicProvider
from providers.gemini import GeminiProvider
from simulator.server import SimulatorServer

pytestmark = pytest.mark.timeout(60)

WEATHER = Tool(
    function=FunctionDefinition(
        name="get_weather",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    )
)


@pytest.fixture
async def gemini(sim: SimulatorServer) -> AsyncIterator[GeminiProvider]:
    provider = GeminiProvider(settings=ProviderSettings(api_key="sim-key", base_url=sim.url))
    try:
        yield provider
    finally:
        await provider.aclose()


def _ask(model: str, *messages: Any) -> ChatRequest:
    return ChatRequest(model=model, messages=list(messages), tools=[WEATHER])


@pytest.mark.parametrize("streamed", [False, True], ids=["chat", "stream"])
async def test_gemini_3_tool_turn_round_trips_its_signature(gemini: GeminiProvider, streamed: bool) -> None:
    model = "gemini-3-pro-preview"
    question = UserMessage(content="Weather in Oslo?")
    request = _ask(model, question)
    first = (
        await collect_stream(gemini.stream(request), provider="gemini")
        if streamed
        else await gemini.chat(request)
    )
    answer = first.choices[0].message
    assert answer.tool_calls and answer.provider_state is not None
    assert answer.provider_state.provider == "gemini"
    (part,) = answer.provider_state.data["parts"]
    assert part["thoughtSignature"] and part["functionCall"]["id"] == answer.tool_calls[0].id

    # The answer goes through JSON (as it does through workflow history) and back into the next turn.
    kept = AssistantMessage.model_validate_json(answer.model_dump_json())
    result = ToolMessage(tool_call_id=answer.tool_calls[0].id, content='{"temp_c": 4}')
    second = await gemini.chat(_ask(model, question, kept, result))
    assert second.finish_reason == "stop" and second.text.endswith('{"temp_c":4}')

    sent = gemini._map_request(_ask(model, question, kept, result))
    assert sent["contents"][1]["parts"][0]["thoughtSignature"] == part["thoughtSignature"]
    assert sent["contents"][2]["parts"][0]["functionResponse"]["id"] == answer.tool_calls[0].id


async def test_gemini_3_refuses_a_tool_turn_without_its_signature(gemini: GeminiProvider) -> None:
    model = "gemini-3-pro-preview"
    question = UserMessage(content="Weather in Oslo?")
    first = await gemini.chat(_ask(model, question))
    stripped = first.choices[0].message.model_copy(update={"provider_state": None})
    result = ToolMessage(tool_call_id=stripped.tool_calls[0].id, content="4 C")  # type: ignore[index]
    with pytest.raises(InvalidRequest, match="missing a thought_signature"):
        await gemini.chat(_ask(model, question, stripped, result))


async def test_gemini_2_5_answers_leave_no_state(gemini: GeminiProvider) -> None:
    response = await gemini.chat(_ask("gemini-2.5-flash", UserMessage(content="Weather in Oslo?")))
    assert response.tool_calls and response.choices[0].message.provider_state is None


async def test_state_of_another_provider_is_ignored(gemini: GeminiProvider) -> None:
    foreign = AssistantMessage(
        content="Hello",
        provider_state=ProviderState(provider="anthropic", data={"thinking": [{"type": "thinking"}]}),
    )
    sent = gemini._map_request(
        ChatRequest(model="gemini-2.5-flash", messages=[UserMessage(content="Hi"), foreign])
    )
    assert sent["contents"][1] == {"role": "model", "parts": [{"text": "Hello"}]}


# --- Anthropic: extended thinking with tool use ----------------------------------------------------

# The shape of Anthropic's documented "extended thinking with tool use" response.
_THINKING_RESPONSE: dict[str, Any] = {
    "id": "msg_01Aq9w938a90dw8q",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [
        {
            "type": "thinking",
            "thinking": "The user wants the weather in Paris. I should call get_weather.",
            "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds...",
        },
        {
            "type": "redacted_thinking",
            "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpP",
        },
        {"type": "text", "text": "Let me check the weather."},
        {
            "type": "tool_use",
            "id": "toolu_01CswdEQBMshySk6Y9DFKrfq",
            "name": "get_weather",
            "input": {"city": "Paris"},
        },
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 412, "output_tokens": 190},
}


async def test_anthropic_thinking_blocks_come_back_first_and_unchanged() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=_THINKING_RESPONSE)

    provider = AnthropicProvider(
        settings=ProviderSettings(api_key="k"),
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )
    model = "claude-sonnet-4-5"
    question = UserMessage(content="Weather in Paris?")
    first = await provider.chat(_ask(model, question))
    answer = AssistantMessage.model_validate_json(first.choices[0].message.model_dump_json())
    assert answer.content == "Let me check the weather."
    assert answer.provider_state is not None
    assert [b["type"] for b in answer.provider_state.data["thinking"]] == ["thinking", "redacted_thinking"]

    result = ToolMessage(tool_call_id="toolu_01CswdEQBMshySk6Y9DFKrfq", content="18 C")
    await provider.chat(_ask(model, question, answer, result))
    assistant = bodies[1]["messages"][1]
    assert assistant["role"] == "assistant"
    assert assistant["content"][:2] == _THINKING_RESPONSE["content"][:2]
    assert [b["type"] for b in assistant["content"]] == ["thinking", "redacted_thinking", "text", "tool_use"]
    await provider.aclose()


async def test_anthropic_streamed_thinking_is_kept_with_its_signature() -> None:
    events = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {"id": "msg_1", "model": "claude-sonnet-4-5", "usage": {"input_tokens": 10}},
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "Let me think"},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Sunny."}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 20}},
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    body = "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    provider = AnthropicProvider(
        settings=ProviderSettings(api_key="k"),
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )
    request = ChatRequest(model="claude-sonnet-4-5", messages=[UserMessage(content="Weather?")])
    seen = [event async for event in provider.stream(request)]
    assert any(isinstance(e, ProviderStateEvent) for e in seen)
    response = await collect_stream(_replay(seen), provider="anthropic")
    state = response.choices[0].message.provider_state
    assert response.text == "Sunny."
    assert state is not None
    assert state.data["thinking"] == [
        {"type": "thinking", "thinking": "Let me think", "signature": "EqQBCgIYAhIM"}
    ]
    await provider.aclose()


async def _replay(events: list[Any]) -> AsyncIterator[Any]:
    for event in events:
        yield event


# --- Anthropic against the simulator, which requires signed thinking back as Anthropic does -------------


@pytest.fixture
async def anthropic(sim: SimulatorServer) -> AsyncIterator[AnthropicProvider]:
    provider = AnthropicProvider(settings=ProviderSettings(api_key="sim-key", base_url=sim.url))
    try:
        yield provider
    finally:
        await provider.aclose()


@pytest.mark.parametrize("streamed", [False, True], ids=["chat", "stream"])
async def test_anthropic_thinking_tool_loop_against_the_simulator(
    anthropic: AnthropicProvider, streamed: bool
) -> None:
    model = "claude-sonnet-4-5"
    question = UserMessage(content="Weather in Oslo?")
    request = ChatRequest(model=model, messages=[question], tools=[WEATHER], thinking_budget=2048)
    first = (
        await collect_stream(anthropic.stream(request), provider="anthropic")
        if streamed
        else await anthropic.chat(request)
    )
    answer = AssistantMessage.model_validate_json(first.choices[0].message.model_dump_json())
    assert answer.tool_calls and answer.provider_state is not None
    (block,) = answer.provider_state.data["thinking"]
    assert block["type"] == "thinking" and block["signature"]
    result = ToolMessage(tool_call_id=answer.tool_calls[0].id, content="4 C")
    follow_up = request.model_copy(update={"messages": [question, answer, result]})
    second = await anthropic.chat(follow_up)
    assert second.finish_reason == "stop" and second.text.endswith("4 C")

    stripped = answer.model_copy(update={"provider_state": None})
    with pytest.raises(InvalidRequest, match="must start with a thinking block"):
        await anthropic.chat(request.model_copy(update={"messages": [question, stripped, result]}))


async def test_simulator_refuses_temperature_with_top_p_for_recent_claude(
    anthropic: AnthropicProvider,
) -> None:
    request = ChatRequest(
        model="claude-sonnet-4-5", messages=[UserMessage(content="Hi")], temperature=0.2, top_p=0.9
    )
    body = anthropic._map_request(request, stream=False)  # what a provider without the catalog would send
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{anthropic.base_url}/v1/messages",
            json=body,
            headers={"x-api-key": "sim-key", "anthropic-version": "2023-06-01"},
        )
    assert response.status_code == 400
    assert response.json()["error"] == {
        "type": "invalid_request_error",
        "message": "`temperature` and `top_p` cannot both be specified for this model. Please use only one.",
    }


# --- Bedrock: Claude's reasoning through Converse -------------------------------------------------------

_CONVERSE_REASONING: dict[str, Any] = {
    "output": {
        "message": {
            "role": "assistant",
            "content": [
                {
                    "reasoningContent": {
                        "reasoningText": {"text": "I should call the tool.", "signature": "ErcBCkgIAhAB"}
                    }
                },
                {
                    "toolUse": {
                        "toolUseId": "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q",
                        "name": "get_weather",
                        "input": {"city": "Oslo"},
                    }
                },
            ],
        }
    },
    "stopReason": "tool_use",
    "usage": {"inputTokens": 400, "outputTokens": 120, "totalTokens": 520},
    "metrics": {"latencyMs": 1200},
}


async def test_bedrock_reasoning_blocks_go_back_first_with_thinking_enabled() -> None:
    from providers.bedrock import BedrockProvider
    from tests.oracles import bedrock_oracle

    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=_CONVERSE_REASONING)

    provider = BedrockProvider(
        environ={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_REGION": "us-east-1"},
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )
    model = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
    question = UserMessage(content="Weather in Oslo?")
    request = ChatRequest(model=model, messages=[question], tools=[WEATHER], thinking_budget=2048)
    first = await provider.chat(request)
    assert bodies[0]["additionalModelRequestFields"] == {
        "thinking": {"type": "enabled", "budget_tokens": 2048}
    }
    answer = AssistantMessage.model_validate_json(first.choices[0].message.model_dump_json())
    result = ToolMessage(tool_call_id=answer.tool_calls[0].id, content="4 C")  # type: ignore[index]
    await provider.chat(request.model_copy(update={"messages": [question, answer, result]}))
    assistant = bodies[1]["messages"][1]
    assert [next(iter(block)) for block in assistant["content"]] == ["reasoningContent", "toolUse"]
    assert assistant["content"][0] == _CONVERSE_REASONING["output"]["message"]["content"][0]
    bedrock_oracle(bodies[1], model=model)
    await provider.aclose()


async def test_bedrock_streamed_reasoning_is_kept_with_its_signature() -> None:
    from providers.bedrock import BedrockProvider
    from simulator.bedrock_wire import encode_event

    events = [
        ("messageStart", {"role": "assistant"}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": "Let me "}}}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": "think."}}}),
        (
            "contentBlockDelta",
            {"contentBlockIndex": 0, "delta": {"reasoningContent": {"signature": "ErcBCkgIAhAB"}}},
        ),
        ("contentBlockStop", {"contentBlockIndex": 0}),
        ("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": "Sunny."}}),
        ("contentBlockStop", {"contentBlockIndex": 1}),
        ("messageStop", {"stopReason": "end_turn"}),
        (
            "metadata",
            {"usage": {"inputTokens": 10, "outputTokens": 5, "totalTokens": 15}, "metrics": {"latencyMs": 1}},
        ),
    ]
    body = b"".join(encode_event(name, payload) for name, payload in events)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, content=body, headers={"content-type": "application/vnd.amazon.eventstream"}
        )

    provider = BedrockProvider(
        environ={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_REGION": "us-east-1"},
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )
    request = ChatRequest(
        model="us.anthropic.claude-sonnet-4-5-20250929-v1:0", messages=[UserMessage(content="Hi")]
    )
    response = await collect_stream(provider.stream(request), provider="bedrock")
    assert response.text == "Sunny."
    state = response.choices[0].message.provider_state
    assert state is not None
    assert state.data["reasoning"] == [
        {"reasoningContent": {"reasoningText": {"text": "Let me think.", "signature": "ErcBCkgIAhAB"}}}
    ]
    await provider.aclose()


async def test_gemini_streamed_text_keeps_the_signature_on_its_last_part() -> None:
    """Gemini 3 signs an answer without calls in its last part, often an empty text part of its own."""
    chunks = [
        {
            "candidates": [{"content": {"role": "model", "parts": [{"text": "Sunny "}]}, "index": 0}],
            "responseId": "r1",
        },
        {
            "candidates": [{"content": {"role": "model", "parts": [{"text": "in Oslo."}]}, "index": 0}],
            "responseId": "r1",
        },
        {
            "candidates": [
                {
                    "content": {"role": "model", "parts": [{"text": "", "thoughtSignature": "c2lnLXRleHQ="}]},
                    "finishReason": "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 4, "totalTokenCount": 9},
            "responseId": "r1",
        },
    ]
    body = "".join(f"data: {json.dumps(c)}\r\n\r\n" for c in chunks)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    provider = GeminiProvider(
        settings=ProviderSettings(api_key="k"),
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )
    request = ChatRequest(model="gemini-3-pro-preview", messages=[UserMessage(content="Weather?")])
    response = await collect_stream(provider.stream(request), provider="gemini")
    assert response.text == "Sunny in Oslo."
    message = response.choices[0].message
    assert message.provider_state is not None
    assert message.provider_state.data["parts"] == [
        {"text": "Sunny in Oslo."},
        {"text": "", "thoughtSignature": "c2lnLXRleHQ="},
    ]
    sent = provider._map_request(
        request.model_copy(update={"messages": [*request.messages, message, UserMessage(content="Thanks")]})
    )
    assert sent["contents"][1]["parts"][1] == {"text": "", "thoughtSignature": "c2lnLXRleHQ="}
    await provider.aclose()

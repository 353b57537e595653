"""Parsing and classification on the vendors' own examples, not only the simulator's: response and
error bodies shaped as the API references document them, and real bodies other projects recorded
(OpenRouter's tool call without ``arguments``, Groq's ``tool_use_failed`` inside a stream, OpenAI's
``insufficient_quota``). Also: a bug in our own parsing code surfaces as the bug it is, never as the
vendor's ``MalformedResponse`` (which would silently move a step to its fallback)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from kernel.contracts import ChatRequest, StreamError, StreamEvent, TextDelta, UserMessage
from kernel.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    Overloaded,
    ProviderError,
    QuotaExceeded,
    RateLimited,
    UpstreamError,
)
from kernel.provider import Provider, ProviderSettings
from providers.anthropic import AnthropicProvider
from providers.bedrock import BedrockProvider
from providers.gemini import GeminiProvider
from providers.openai import OpenAIProvider
from providers.presets import builtin_presets

Handler = Callable[[httpx.Request], httpx.Response]


def _client(handler: Handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def _preset(name: str, handler: Handler) -> Provider:
    (cls,) = [c for c in builtin_presets() if c.name == name]
    return cls(settings=ProviderSettings(api_key="k"), http_client=_client(handler))  # type: ignore[call-arg]


def _ask(model: str = "gpt-4o") -> ChatRequest:
    return ChatRequest(model=model, messages=[UserMessage(content="Hi")])


def _sse(*chunks: Any) -> httpx.Response:
    body = "".join(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks)
    return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})


async def _events(provider: Provider, request: ChatRequest) -> list[StreamEvent]:
    return [event async for event in provider.stream(request)]


# --- OpenAI ------------------------------------------------------------------------------------------

# The API reference's chat completion object with a tool call.
OPENAI_TOOL_ANSWER: dict[str, Any] = {
    "id": "chatcmpl-abc123",
    "object": "chat.completion",
    "created": 1699896916,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc123",
                        "type": "function",
                        "function": {
                            "name": "get_current_weather",
                            "arguments": '{\n"location": "Boston, MA"\n}',
                        },
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {
        "prompt_tokens": 82,
        "completion_tokens": 17,
        "total_tokens": 99,
        "completion_tokens_details": {"reasoning_tokens": 0},
    },
}


async def test_openai_documented_tool_call_answer() -> None:
    provider = OpenAIProvider(
        settings=ProviderSettings(api_key="k"),
        http_client=_client(lambda r: httpx.Response(200, json=OPENAI_TOOL_ANSWER)),
    )
    response = await provider.chat(_ask())
    (call,) = response.tool_calls
    assert call.id == "call_abc123" and call.function.parsed_arguments() == {"location": "Boston, MA"}
    assert response.finish_reason == "tool_calls" and response.usage.total_tokens == 99


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (
            429,
            {
                "message": "You exceeded your current quota, please check your plan and billing details. For more "
                "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
                "type": "insufficient_quota",
                "param": None,
                "code": "insufficient_quota",
            },
            QuotaExceeded,
        ),
        (
            429,
            {
                "message": "Request too large for gpt-4o in organization org-abc on tokens per min (TPM): Limit "
                "30000, Requested 48213. The input or output tokens must be reduced in order to run successfully. "
                "Visit https://platform.openai.com/account/rate-limits to learn more.",
                "type": "tokens",
                "param": None,
                "code": "rate_limit_exceeded",
            },
            QuotaExceeded,
        ),
        (
            429,
            {
                "message": "Rate limit reached for gpt-4o in organization org-abc on requests per min (RPM): Limit "
                "500, Used 500, Requested 1. Please try again in 120ms.",
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            },
            RateLimited,
        ),
        (
            400,
            {
                "message": "This model's maximum context length is 128000 tokens. However, your messages resulted "
                "in 130000 tokens. Please reduce the length of the messages.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            },
            ContextLengthExceeded,
        ),
    ],
    ids=["insufficient-quota", "request-above-tpm", "rpm-rate-limit", "context-length"],
)
async def test_openai_error_bodies_are_classified_with_and_without_streaming(
    status: int, error: dict[str, Any], expected: type[ProviderError]
) -> None:
    provider = OpenAIProvider(
        settings=ProviderSettings(api_key="k"),
        http_client=_client(lambda r: httpx.Response(status, json={"error": error})),
    )
    with pytest.raises(expected) as caught:
        await provider.chat(_ask())
    assert caught.value.retryable is expected.retryable
    with pytest.raises(expected):
        await _events(provider, _ask())
    # The same error sent inside a stream that has already started is classified the same way.
    streamed = OpenAIProvider(
        settings=ProviderSettings(api_key="k"),
        http_client=_client(
            lambda r: _sse(
                {"id": "c1", "model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": "Hel"}}]},
                {"error": error},
            )
        ),
    )
    events = await _events(streamed, _ask())
    assert isinstance(events[-1], StreamError)
    assert events[-1].error_type == expected.__name__ and events[-1].retryable is expected.retryable


# --- OpenAI-compatible services: real bodies recorded by others ---------------------------------------


async def test_openrouter_tool_call_without_arguments_parses_to_empty_arguments() -> None:
    answer = {
        "id": "gen-1741111111-abc",
        "provider": "Google",
        "model": "google/gemini-2.0-flash-001",
        "object": "chat.completion",
        "created": 1741111111,
        "choices": [
            {
                "logprobs": None,
                "finish_reason": "tool_calls",
                "native_finish_reason": "STOP",
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "",
                    "refusal": None,
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "tool_0_get_time",
                            "type": "function",
                            "function": {"name": "get_time"},
                        }
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45},
    }
    provider = _preset("openrouter", lambda r: httpx.Response(200, json=answer))
    response = await provider.chat(_ask("google/gemini-2.0-flash-001"))
    (call,) = response.tool_calls
    assert call.function.name == "get_time" and call.function.arguments == "{}"


async def test_a_tool_call_without_an_id_gets_a_stable_one() -> None:
    answer = json.loads(json.dumps(OPENAI_TOOL_ANSWER))
    del answer["choices"][0]["message"]["tool_calls"][0]["id"]
    provider = _preset("together", lambda r: httpx.Response(200, json=answer))
    first, second = await provider.chat(_ask()), await provider.chat(_ask())
    assert first.tool_calls[0].id.startswith("call_") and first.tool_calls[0].id == second.tool_calls[0].id


async def test_groq_tool_use_failed_inside_a_stream_is_not_retried() -> None:
    error = {
        "error": {
            "message": "Failed to call a function. Please adjust your prompt. See 'failed_generation' for more details.",
            "type": "invalid_request_error",
            "code": "tool_use_failed",
            "failed_generation": '<function=get_weather{"city": "Oslo"}</function>',
        }
    }
    provider = _preset("groq", lambda r: _sse(error))
    with pytest.raises(InvalidRequest) as caught:
        await _events(provider, _ask("llama-3.3-70b-versatile"))
    assert not caught.value.retryable and caught.value.code == "tool_use_failed"


@pytest.mark.parametrize(
    ("error", "expected", "retryable"),
    [
        (
            {
                "code": 400,
                "message": "This endpoint's maximum context length is 8192 tokens. However, you requested about "
                "9120 tokens (9120 of text input). Please reduce the length of either one.",
            },
            "ContextLengthExceeded",
            False,
        ),
        ({"code": "server_error", "message": "Provider disconnected unexpectedly"}, "UpstreamError", True),
        (
            {"code": 402, "message": "Insufficient credits. Add more using https://openrouter.ai/credits"},
            "QuotaExceeded",
            False,
        ),
    ],
    ids=["token-limit", "provider-disconnected", "out-of-credits"],
)
async def test_openrouter_errors_mid_stream_keep_their_class(
    error: dict[str, Any], expected: str, retryable: bool
) -> None:
    chunks = [
        {
            "id": "gen-1",
            "object": "chat.completion.chunk",
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "Hi"}}],
        },
        {
            "id": "gen-1",
            "object": "chat.completion.chunk",
            "model": "m",
            "error": error,
            "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
        },
    ]
    provider = _preset("openrouter", lambda r: _sse(*chunks))
    events = await _events(provider, _ask("m"))
    assert isinstance(events[1], TextDelta)
    assert isinstance(events[-1], StreamError)
    assert (events[-1].error_type, events[-1].retryable) == (expected, retryable)


# --- Anthropic -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, Overloaded),
        (
            400,
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "Your credit balance is too low to access the Anthropic API. Please go to Plans & "
                    "Billing to upgrade or purchase credits.",
                },
            },
            QuotaExceeded,
        ),
        (
            400,
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "prompt is too long: 208310 tokens > 200000 maximum",
                },
            },
            ContextLengthExceeded,
        ),
        (
            500,
            {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}},
            UpstreamError,
        ),
    ],
    ids=["overloaded", "credit-balance", "prompt-too-long", "api-error"],
)
async def test_anthropic_documented_error_bodies(
    status: int, body: dict[str, Any], expected: type[ProviderError]
) -> None:
    provider = AnthropicProvider(
        settings=ProviderSettings(api_key="k"),
        http_client=_client(lambda r: httpx.Response(status, json=body)),
    )
    with pytest.raises(expected):
        await provider.chat(_ask("claude-haiku-4-5"))


async def test_anthropic_documented_response_with_cache_usage() -> None:
    answer = {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "Hi! My name is Claude."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 2095,
            "cache_creation_input_tokens": 1000,
            "cache_read_input_tokens": 3000,
            "output_tokens": 503,
        },
    }
    provider = AnthropicProvider(
        settings=ProviderSettings(api_key="k"),
        http_client=_client(lambda r: httpx.Response(200, json=answer)),
    )
    response = await provider.chat(_ask("claude-sonnet-4-5"))
    usage = response.usage
    assert (usage.prompt_tokens, usage.cached_tokens, usage.cache_write_tokens) == (6095, 3000, 1000)


# --- Gemini --------------------------------------------------------------------------------------------


async def test_gemini_documented_signed_function_call_and_thinking_usage() -> None:
    answer = {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {
                            "functionCall": {"name": "check_flight", "args": {"flight": "AA100"}},
                            "thoughtSignature": "PFNpZ25hdHVyZSBBPg==",
                        }
                    ],
                },
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 60,
            "candidatesTokenCount": 20,
            "totalTokenCount": 160,
            "thoughtsTokenCount": 80,
        },
        "modelVersion": "gemini-3-pro-preview",
        "responseId": "resp-1",
    }
    provider = GeminiProvider(
        settings=ProviderSettings(api_key="k"),
        http_client=_client(lambda r: httpx.Response(200, json=answer)),
    )
    response = await provider.chat(_ask("gemini-3-pro-preview"))
    assert response.finish_reason == "tool_calls" and response.tool_calls[0].function.name == "check_flight"
    assert (response.usage.completion_tokens, response.usage.reasoning_tokens) == (100, 80)
    state = response.choices[0].message.provider_state
    assert state is not None and state.data["parts"][0]["thoughtSignature"] == "PFNpZ25hdHVyZSBBPg=="


async def test_gemini_per_minute_quota_is_a_rate_limit_with_its_retry_delay() -> None:
    body = {
        "error": {
            "code": 429,
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                        }
                    ],
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "31s"},
            ],
        }
    }
    provider = GeminiProvider(
        settings=ProviderSettings(api_key="k"), http_client=_client(lambda r: httpx.Response(429, json=body))
    )
    with pytest.raises(RateLimited) as caught:
        await provider.chat(_ask("gemini-2.5-flash"))
    assert caught.value.retry_after == 31


# --- Bedrock -------------------------------------------------------------------------------------------


async def test_bedrock_service_quota_exceeded_is_a_quota_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            400,
            json={"message": "Your request exceeds the service quota for your account."},
            headers={
                "x-amzn-errortype": "ServiceQuotaExceededException:http://internal.amazon.com/coral/com.amazon.bedrock/"
            },
        )

    provider = BedrockProvider(
        environ={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_REGION": "us-east-1"},
        http_client=_client(handler),
    )
    with pytest.raises(QuotaExceeded):
        await provider.chat(_ask("amazon.nova-lite-v1:0"))


# --- a bug of ours is not the vendor's malformed answer ---------------------------------------------


class _BuggyProvider(OpenAIProvider):
    name = "buggy"

    def _read_choice(self, raw: Any, where: str) -> Any:
        return self._no_such_helper(raw)  # type: ignore[attr-defined]

    def _delta_text(self, content: Any) -> str:
        return self._no_such_helper(content)  # type: ignore[attr-defined,no-any-return]


async def test_a_bug_in_our_parsing_code_is_not_a_malformed_response() -> None:
    provider = _BuggyProvider(
        settings=ProviderSettings(api_key="k"),
        http_client=_client(lambda r: httpx.Response(200, json=OPENAI_TOOL_ANSWER)),
    )
    with pytest.raises(AttributeError, match="_no_such_helper"):
        await provider.chat(_ask())
    streaming = _BuggyProvider(
        settings=ProviderSettings(api_key="k"),
        http_client=_client(
            lambda r: _sse({"id": "c", "choices": [{"index": 0, "delta": {"content": "x"}}]}, "[DONE]")
        ),
    )
    with pytest.raises(AttributeError, match="_no_such_helper"):
        await _events(streaming, _ask())


async def test_a_malformed_answer_is_still_a_malformed_response() -> None:
    from kernel.errors import MalformedResponse

    provider = OpenAIProvider(
        settings=ProviderSettings(api_key="k"),
        http_client=_client(
            lambda r: httpx.Response(200, json={"choices": [{"message": ["not", "an", "object"]}]})
        ),
    )
    with pytest.raises(MalformedResponse, match=r"choices\[0\]\.message should be an object"):
        await provider.chat(_ask())


# --- OpenAI Responses API ------------------------------------------------------------------------------

# The API reference's response object for a function call by a reasoning model (stateless: store false).
RESPONSES_ANSWER: dict[str, Any] = {
    "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
    "object": "response",
    "created_at": 1741476777,
    "status": "completed",
    "error": None,
    "incomplete_details": None,
    "model": "o4-mini-2025-04-16",
    "output": [
        {
            "type": "reasoning",
            "id": "rs_6820f383d7c08191846711c5df8233bc",
            "summary": [],
            "encrypted_content": "gAAAAABo...",
        },
        {
            "type": "function_call",
            "id": "fc_67ccd3aa8c1c8190b7c9e1e6f0b0d0a2",
            "call_id": "call_12345xyz",
            "name": "get_weather",
            "arguments": '{"location":"Paris, France"}',
            "status": "completed",
        },
    ],
    "parallel_tool_calls": True,
    "store": False,
    "usage": {
        "input_tokens": 291,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 23,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 314,
    },
}


def _responses(handler: Handler) -> OpenAIProvider:
    return OpenAIProvider(
        settings=ProviderSettings(api_key="k", options={"api": "responses"}), http_client=_client(handler)
    )


async def test_responses_documented_function_call_keeps_the_encrypted_reasoning() -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json=RESPONSES_ANSWER)

    provider = _responses(handler)
    response = await provider.chat(_ask("o4-mini"))
    (call,) = response.tool_calls
    assert (call.id, call.function.name, response.finish_reason) == (
        "call_12345xyz",
        "get_weather",
        "tool_calls",
    )
    assert response.usage.total_tokens == 314
    assert sent[0]["store"] is False and sent[0]["include"] == ["reasoning.encrypted_content"]
    # The reasoning item goes back before the call it led to, with the tool's output.
    from kernel.contracts import ToolMessage

    answer = response.choices[0].message
    follow_up = _ask("o4-mini").model_copy(
        update={
            "messages": [
                UserMessage(content="Hi"),
                answer,
                ToolMessage(tool_call_id="call_12345xyz", content="18 C"),
            ]
        }
    )
    await provider.chat(follow_up)
    kinds = [item.get("type", "message") for item in sent[1]["input"]]
    assert kinds == ["message", "reasoning", "function_call", "function_call_output"]
    assert sent[1]["input"][1]["encrypted_content"] == "gAAAAABo..."


async def test_responses_incomplete_for_max_output_tokens_is_length() -> None:
    answer = {
        **RESPONSES_ANSWER,
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "status": "incomplete",
                "content": [{"type": "output_text", "text": "Par", "annotations": []}],
            }
        ],
    }
    response = await _responses(lambda r: httpx.Response(200, json=answer)).chat(_ask())
    assert (response.text, response.finish_reason) == ("Par", "length")


async def test_responses_error_event_in_a_stream_keeps_its_class() -> None:
    body = (
        'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_1","model":"gpt-4o"}}\n\n'
        'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","output_index":0,"delta":"Hi"}\n\n'
        'event: error\ndata: {"type":"error","code":"insufficient_quota","message":"You exceeded your current quota, '
        'please check your plan and billing details.","param":null}\n\n'
    )
    provider = _responses(
        lambda r: httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})
    )
    events = await _events(provider, _ask())
    assert isinstance(events[-1], StreamError)
    assert (events[-1].error_type, events[-1].retryable) == ("QuotaExceeded", False)

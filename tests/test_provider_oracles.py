"""Every provider's request bodies, over a wide matrix of requests, validated against the vendor's own
published types (``tests/oracles.py``): OpenAI and Azure OpenAI against the OpenAI SDK, Anthropic
against the Anthropic SDK, Gemini against google-genai, Bedrock against botocore's validator and
serializer, Mistral against the mistralai package.

Each case runs as the ``llm_chat`` activity runs it: lenient preparation, the provider's own check,
then the mapping. A case a provider cannot serve must be refused before the call with a kernel error,
and only the refusals listed here are expected; every other body must pass the oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kernel.contracts import (
    AssistantMessage,
    ChatRequest,
    DeveloperMessage,
    DocumentPart,
    DocumentSource,
    FunctionCall,
    FunctionDefinition,
    ImagePart,
    ImageURL,
    ProviderState,
    SystemMessage,
    TextPart,
    Tool,
    ToolCall,
    ToolMessage,
    UserMessage,
)
from kernel.errors import KernelflowError
from kernel.provider import Provider, ProviderSettings
from providers.anthropic import AnthropicProvider
from providers.azure_openai import AzureOpenAIProvider
from providers.bedrock import BedrockProvider
from providers.gemini import GeminiProvider
from providers.mistral import MistralProvider
from providers.openai import OpenAIProvider
from providers.presets import builtin_presets
from tests.oracles import (
    anthropic_oracle,
    bedrock_oracle,
    gemini_oracle,
    mistral_oracle,
    openai_oracle,
    openai_responses_oracle,
)

PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGBgAAAABQABpfZFQAAAAABJRU5ErkJggg=="
PDF = "data:application/pdf;base64,JVBERi0xLjQKJcfsj6IKMSAwIG9iago8PD4+CmVuZG9iagp0cmFpbGVyCjw8Pj4KJSVFT0YK"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "City name"},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "units": {"type": "string", "enum": ["metric", "imperial"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["city", "days", "units", "tags"],
    "additionalProperties": False,
}
WEATHER = Tool(
    function=FunctionDefinition(name="get_weather", description="Weather for a city", parameters=SCHEMA)
)
CLOCK = Tool(function=FunctionDefinition(name="get_time", parameters={"type": "object", "properties": {}}))
CALLS = [
    ToolCall(id="call_a1", function=FunctionCall(name="get_weather", arguments='{"city":"Oslo","days":1}')),
    ToolCall(id="call_b2", function=FunctionCall(name="get_time", arguments="{}")),
]
TOOL_TURNS = [
    SystemMessage(content="You forecast weather."),
    UserMessage(content="Weather and time in Oslo?"),
    AssistantMessage(content="Checking.", tool_calls=CALLS),
    ToolMessage(tool_call_id="call_a1", content='{"temp_c": 4}'),
    ToolMessage(tool_call_id="call_b2", content="10:00"),
]
GEMINI_STATE = ProviderState(
    provider="gemini",
    data={
        "parts": [
            {
                "functionCall": {"name": "get_weather", "args": {"city": "Oslo"}, "id": "fc1"},
                "thoughtSignature": "c2ln",
            }
        ]
    },
)
ANTHROPIC_STATE = ProviderState(
    provider="anthropic",
    data={
        "thinking": [
            {"type": "thinking", "thinking": "Call the tool.", "signature": "EqQBCgIYAhIM"},
            {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3"},
        ]
    },
)


def _with_state(state: ProviderState, call_id: str) -> list[Any]:
    call = ToolCall(id=call_id, function=FunctionCall(name="get_weather", arguments='{"city":"Oslo"}'))
    return [
        UserMessage(content="Weather in Oslo?"),
        AssistantMessage(tool_calls=[call], provider_state=state),
        ToolMessage(tool_call_id=call_id, content="4 C"),
    ]


CASES: dict[str, dict[str, Any]] = {
    "plain": {"messages": [UserMessage(content="Hello")]},
    "system": {"messages": [SystemMessage(content="Be brief."), UserMessage(content="Hello")]},
    "system-parts": {
        "messages": [SystemMessage(content=[TextPart(text="Be brief.")]), UserMessage(content="Hi")]
    },
    "developer": {"messages": [DeveloperMessage(content="Answer in French."), UserMessage(content="Hello")]},
    "multi-turn": {
        "messages": [
            SystemMessage(content="Be brief."),
            UserMessage(content="Hi", name="ann"),
            AssistantMessage(content="Hello!"),
            UserMessage(content="How are you?"),
        ]
    },
    "tool-turns": {"messages": TOOL_TURNS, "tools": [WEATHER, CLOCK]},
    "tool-choice-auto": {
        "messages": [UserMessage(content="Weather?")],
        "tools": [WEATHER],
        "tool_choice": "auto",
    },
    "tool-choice-none": {
        "messages": [UserMessage(content="Weather?")],
        "tools": [WEATHER],
        "tool_choice": "none",
    },
    "tool-choice-none-after-tools": {
        "messages": TOOL_TURNS,
        "tools": [WEATHER, CLOCK],
        "tool_choice": "none",
    },
    "tool-choice-required": {
        "messages": [UserMessage(content="Weather?")],
        "tools": [WEATHER, CLOCK],
        "tool_choice": "required",
    },
    "tool-choice-named": {
        "messages": [UserMessage(content="Weather?")],
        "tools": [WEATHER, CLOCK],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    },
    "parallel-off": {
        "messages": [UserMessage(content="Weather?")],
        "tools": [WEATHER],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
    },
    "strict-tool": {
        "messages": [UserMessage(content="Weather?")],
        "tools": [Tool(function=FunctionDefinition(name="get_weather", parameters=SCHEMA, strict=True))],
    },
    "json-schema": {
        "messages": [UserMessage(content="Forecast")],
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "forecast",
                "schema": SCHEMA,
                "strict": True,
                "description": "A forecast",
            },
        },
    },
    "json-object": {
        "messages": [UserMessage(content="Forecast as JSON")],
        "response_format": {"type": "json_object"},
    },
    "image-data": {
        "messages": [
            UserMessage(
                content=[TextPart(text="What is this?"), ImagePart(image_url=ImageURL(url=PNG, detail="low"))]
            )
        ]
    },
    "image-url": {
        "messages": [
            UserMessage(
                content=[ImagePart(image_url=ImageURL(url="https://example.com/cat.png")), TextPart(text="?")]
            )
        ]
    },
    "document": {
        "messages": [
            UserMessage(
                content=[
                    DocumentPart(file=DocumentSource(file_data=PDF, filename="contract.pdf")),
                    TextPart(text="Summarise the contract."),
                ]
            )
        ]
    },
    "document-url": {
        "messages": [
            UserMessage(
                content=[
                    DocumentPart(file=DocumentSource(url="https://example.com/a.pdf")),
                    TextPart(text="Sum up"),
                ]
            )
        ]
    },
    "sampling": {
        "messages": [UserMessage(content="Hello")],
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 256,
        "stop": ["END", "STOP"],
        "seed": 42,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "user": "user-123",
    },
    "reasoning-effort": {
        "messages": [UserMessage(content="Think")],
        "reasoning_effort": "high",
        "max_tokens": 4096,
    },
    "thinking-budget": {
        "messages": [UserMessage(content="Think")],
        "thinking_budget": 2048,
        "max_tokens": 8192,
    },
    "service-tier": {"messages": [UserMessage(content="Hello")], "service_tier": "auto"},
    "service-tier-flex": {"messages": [UserMessage(content="Hello")], "service_tier": "flex"},
    "cache": {
        "messages": [SystemMessage(content="A long shared preamble."), UserMessage(content="Question")],
        "cache": {"key": "tenant-7", "breakpoints": [0], "ttl": "1h"},
    },
    "cache-key": {"messages": [UserMessage(content="Question")], "cache": {"key": "tenant-7"}},
    "gemini-state": {"messages": _with_state(GEMINI_STATE, "fc1"), "tools": [WEATHER]},
    "anthropic-state": {"messages": _with_state(ANTHROPIC_STATE, "toolu_1"), "tools": [WEATHER]},
}


def _options(provider: str) -> dict[str, Any]:
    return {
        "openai": {"openai": {"logprobs": True, "top_logprobs": 2, "metadata": {"run": "r1"}}},
        "openai_responses": {"openai": {"metadata": {"run": "r1"}, "truncation": "auto"}},
        "openrouter": {"openrouter": {"models": ["openai/gpt-4.1-mini"]}},
        "azure_openai": {"azure_openai": {"logprobs": True}},
        "anthropic": {"anthropic": {"top_k": 5}},
        "gemini": {
            "gemini": {
                "topK": 5,
                "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
            }
        },
        "bedrock": {
            "bedrock": {"additionalModelRequestFields": {"top_k": 5}, "requestMetadata": {"run": "r1"}}
        },
        "mistral": {"mistral": {"safe_prompt": True}},
    }[provider]


def _preset(name: str) -> Provider:
    (cls,) = [c for c in builtin_presets() if c.name == name]
    return cls(settings=ProviderSettings(api_key="k"))  # type: ignore[call-arg]


_OPENROUTER_EXTRAS: frozenset[str] = _preset("openrouter").provider_option_names  # type: ignore[attr-defined]


def _bedrock() -> BedrockProvider:
    return BedrockProvider(
        environ={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_REGION": "us-east-1"}
    )


# provider -> (factory, body of a request, oracle, general model, reasoning model)
Mapper = Callable[[Any, ChatRequest, bool], dict[str, Any]]
PROVIDERS: dict[
    str, tuple[Callable[[], Provider], Mapper, Callable[[dict[str, Any], ChatRequest], None], str, str]
] = {
    "openai": (
        lambda: OpenAIProvider(settings=ProviderSettings(api_key="k")),
        lambda p, r, s: p._map_request(r, stream=s),
        lambda body, r: openai_oracle(body),
        "gpt-4.1",
        "o4-mini",
    ),
    "openai_responses": (
        lambda: OpenAIProvider(settings=ProviderSettings(api_key="k", options={"api": "responses"})),
        lambda p, r, s: p._responses_payload(r, stream=s),
        lambda body, r: openai_responses_oracle(body),
        "gpt-4.1",
        "o4-mini",
    ),
    # An OpenAI-compatible preset, against OpenAI's own types (what "compatible" promises).
    "openrouter": (
        lambda: _preset("openrouter"),
        lambda p, r, s: p._map_request(r, stream=s),
        # OpenRouter's own fields (declared in its preset) are the only ones OpenAI's types may not know.
        lambda body, r: openai_oracle({k: v for k, v in body.items() if k not in _OPENROUTER_EXTRAS}),
        "openai/gpt-4.1",
        "openai/o4-mini",
    ),
    "azure_openai": (
        lambda: AzureOpenAIProvider(
            settings=ProviderSettings(
                api_key="k",
                base_url="https://r.openai.azure.com",
                options={"deployments": {"reasoner": "o4-mini"}},
            )
        ),
        lambda p, r, s: p._map_request(r, stream=s),
        lambda body, r: openai_oracle(body),
        "chat-deployment",
        "reasoner",
    ),
    "anthropic": (
        lambda: AnthropicProvider(settings=ProviderSettings(api_key="k")),
        lambda p, r, s: p._map_request(r, stream=s),
        lambda body, r: anthropic_oracle(body),
        "claude-sonnet-4-5",
        "claude-sonnet-4-5",
    ),
    "gemini": (
        lambda: GeminiProvider(settings=ProviderSettings(api_key="k")),
        lambda p, r, s: p._map_request(r),
        lambda body, r: gemini_oracle(body),
        "gemini-2.5-flash",
        "gemini-3-pro-preview",
    ),
    "bedrock": (
        _bedrock,
        lambda p, r, s: p._map_request(r),
        lambda body, r: bedrock_oracle(body, model=r.model),  # ConverseStream takes the same body
        "anthropic.claude-3-5-haiku-20241022-v1:0",
        "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
    ),
    "mistral": (
        lambda: MistralProvider(settings=ProviderSettings(api_key="k")),
        lambda p, r, s: p._map_request(r, stream=s),
        lambda body, r: mistral_oracle(body),
        "mistral-small-latest",
        "mistral-medium-latest",
    ),
}

# What each provider refuses before the call (with a kernel error naming why), by case.
REFUSED: dict[str, set[str]] = {
    "openai": {"document-url", "cache"},  # documents by bytes or file id only; no cache ttl
    "openai_responses": {"cache"},  # no cache ttl
    "openrouter": {"document", "document-url"},  # the preset declares no documents
    "azure_openai": {"document", "document-url"},
    "anthropic": {"service-tier-flex"},  # auto and standard_only only
    "gemini": {"cache"},  # no cache ttl
    # images and documents by bytes only; no way to forbid tool calls over a tool history
    "bedrock": {"tool-choice-none-after-tools", "document-url", "image-url", "service-tier"},  # no auto tier
    "mistral": {"document", "document-url", "cache", "service-tier-flex"},  # no documents here; no cache ttl
}
_REASONING_CASES = {"reasoning-effort", "thinking-budget"}


def _matrix() -> list[tuple[str, str, bool]]:
    return [(p, c, s) for p in PROVIDERS for c in [*CASES, "provider-options"] for s in (False, True)]


@pytest.mark.parametrize(
    ("provider_name", "case", "stream"),
    _matrix(),
    ids=[f"{p}-{c}-{'stream' if s else 'chat'}" for p, c, s in _matrix()],
)
def test_request_body_passes_the_vendors_own_types(provider_name: str, case: str, stream: bool) -> None:
    factory, mapper, oracle, general, reasoning = PROVIDERS[provider_name]
    provider = factory()
    fields = CASES.get(case) or {
        "messages": [UserMessage(content="Hi")],
        "provider_options": _options(provider_name),
    }
    model = reasoning if case in _REASONING_CASES else general
    request = ChatRequest(model=model, lenient=True, **fields)
    try:
        prepared = provider.prepare_chat(request)
        provider.check_chat(prepared.request, stream=stream)
        body = mapper(provider, prepared.request, stream)
    except KernelflowError as exc:
        assert case in REFUSED[provider_name], f"{provider_name} refused {case!r}: {exc}"
        return
    assert case not in REFUSED[provider_name], f"{provider_name} was expected to refuse {case!r}"
    oracle(body, prepared.request)


def test_the_matrix_reaches_every_feature_on_every_provider() -> None:
    """Lenient preparation must not hollow the matrix out: count what survives to the wire."""
    for name, (factory, mapper, _, general, reasoning) in PROVIDERS.items():
        provider = factory()
        sent = 0
        for case, fields in CASES.items():
            model = reasoning if case in _REASONING_CASES else general
            try:
                prepared = provider.prepare_chat(ChatRequest(model=model, lenient=True, **fields))
                mapper(provider, prepared.request, False)
            except KernelflowError:
                continue
            if not prepared.warnings:
                sent += 1
        assert sent >= len(CASES) * 0.6, f"{name}: only {sent} of {len(CASES)} cases went out whole"


# --- the oracles can fail ----------------------------------------------------------------------------

_USER_TEXT = {"role": "user", "content": [{"type": "text", "text": "Hi"}]}


@pytest.mark.parametrize(
    ("oracle", "good", "unknown_nested", "bad_role"),
    [
        (
            openai_oracle,
            {"model": "gpt-4o", "messages": [_USER_TEXT]},
            {
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "cache": 1}]}],
            },
            {"model": "gpt-4o", "messages": [{"role": "robot", "content": "Hi"}]},
        ),
        (
            anthropic_oracle,
            {"model": "m", "max_tokens": 5, "messages": [_USER_TEXT]},
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral", "x": 1}}
                        ],
                    }
                ],
            },
            {"model": "m", "max_tokens": 5, "messages": [{"role": "robot", "content": "Hi"}]},
        ),
        (
            gemini_oracle,
            {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]},
            {"contents": [{"role": "user", "parts": [{"text": "Hi", "thought_sig": "x"}]}]},
            {"contents": [{"role": "assistant", "parts": [{"text": "Hi"}]}]},
        ),
        (
            mistral_oracle,
            {"model": "m", "messages": [{"role": "user", "content": "Hi"}]},
            {
                "model": "m",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "x": 1}]}],
            },
            {"model": "m", "messages": [{"role": "developer", "content": "Hi"}]},
        ),
        (
            lambda body: bedrock_oracle(body, model="amazon.nova-lite-v1:0"),
            {"messages": [{"role": "user", "content": [{"text": "Hi"}]}]},
            {
                "messages": [{"role": "user", "content": [{"text": "Hi"}]}],
                "inferenceConfig": {"maxTokens": 5, "seed": 1},
            },
            {"messages": [{"role": "robot", "content": [{"text": "Hi"}]}]},
        ),
    ],
    ids=["openai", "anthropic", "gemini", "mistral", "bedrock"],
)
def test_each_oracle_refuses_an_unknown_nested_key_and_a_bad_role(
    oracle: Callable[[dict[str, Any]], None],
    good: dict[str, Any],
    unknown_nested: dict[str, Any],
    bad_role: dict[str, Any],
) -> None:
    oracle(good)
    with pytest.raises(AssertionError):
        oracle(unknown_nested)
    with pytest.raises(AssertionError):
        oracle(bad_role)


def test_the_openai_oracle_reads_iterables_as_lists_at_every_level() -> None:
    """A lazily checked ``Iterable`` would accept a wrong item without looking at it."""
    with pytest.raises(AssertionError, match="tool_calls"):
        openai_oracle(
            {
                "model": "gpt-4o",
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": 3}}],
                    }
                ],
            }
        )

"""Per-model and per-provider option rules: the model catalog, refusal before the call, lenient drops
recorded as warnings, provider ranges, and the ``llm_chat`` activity applying them against the
simulator (which answers reasoning models' refusals with OpenAI's own bodies)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.llm import LlmActivities, LlmCallInput
from kernel.catalog import REQUEST_OPTIONS, ModelFacts, apply_rules, default_catalog
from kernel.contracts import (
    AssistantMessage,
    ChatRequest,
    FunctionCall,
    FunctionDefinition,
    Tool,
    ToolCall,
    ToolMessage,
    UserMessage,
)
from kernel.errors import ConfigurationError, InvalidRequest, UnsupportedCapability
from kernel.pricing import DEFAULT_PRICES, PriceTable
from kernel.provider import Provider, ProviderSettings
from kernel.registry import Registry
from providers.anthropic import AnthropicProvider
from providers.azure_openai import AzureOpenAIProvider
from providers.bedrock import BedrockProvider
from providers.gemini import GeminiProvider
from providers.mistral import MistralProvider
from providers.ollama import OllamaProvider
from providers.openai import OpenAIProvider
from providers.presets import builtin_presets
from simulator.server import SimulatorServer

BUILT_IN: list[type[Provider]] = [
    OpenAIProvider,
    AnthropicProvider,
    GeminiProvider,
    AzureOpenAIProvider,
    MistralProvider,
    OllamaProvider,
    BedrockProvider,
    *builtin_presets(),
]
_VALUES: dict[str, Any] = {
    "temperature": 0.5,
    "top_p": 0.5,
    "max_tokens": 100,
    "stop": ["END"],
    "seed": 3,
    "presence_penalty": 0.1,
    "frequency_penalty": 0.1,
    "user": "u-1",
    "parallel_tool_calls": False,
    "reasoning_effort": "low",
    "thinking_budget": 2048,
    "service_tier": "auto",
    "cache": {"key": "k"},
    "provider_options": {"x": {}},
}
WEATHER = Tool(
    function=FunctionDefinition(name="get_weather", parameters={"type": "object", "properties": {}})
)


def _ask(model: str, **fields: Any) -> ChatRequest:
    return ChatRequest(model=model, messages=[UserMessage(content="Hi")], **fields)


# --- the catalog -----------------------------------------------------------------------------------


def test_every_catalog_fact_has_a_source_and_prices_are_the_default_table() -> None:
    catalog = default_catalog()
    assert {"openai", "anthropic", "gemini", "mistral", "bedrock"} <= set(catalog.vendors())
    for vendor in catalog.vendors():
        for facts in catalog.models(vendor):
            assert facts.sources, f"{vendor}/{facts.name} has no sources"
            if facts.price is not None:
                assert DEFAULT_PRICES[vendor][facts.name].input == facts.price.input
    assert DEFAULT_PRICES["anthropic"]["claude-sonnet-4-5"].cache_write_input == 3.75


def test_a_fact_without_a_source_is_refused() -> None:
    with pytest.raises(ValueError, match=r"context_window without a source"):
        ModelFacts(vendor="v", name="m", context_window=1000)
    with pytest.raises(ValueError, match=r"price without a source"):
        ModelFacts.model_validate({"vendor": "v", "name": "m", "price": {"input": 1, "output": 2}})
    with pytest.raises(ValueError, match=r"'temprature', which is not a request option"):
        ModelFacts(vendor="v", name="m", refuses=("temprature",), sources={"facts": "https://x"})


@pytest.mark.parametrize(
    ("vendor", "model", "expected"),
    [
        ("openai", "gpt-4o-2024-08-06", "gpt-4o"),
        ("openai", "gpt-4o-mini", "gpt-4o-mini"),
        ("openai", "gpt-5-2025-08-07", "gpt-5"),
        ("anthropic", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("bedrock", "us.anthropic.claude-sonnet-4-5-20250929-v1:0", "anthropic.claude-sonnet-4-5"),
        ("openai", "ft:gpt-4o-mini-2024-07-18:acme::abc123", None),
        ("openai", "gpt-6-preview", None),
        ("azure_openai", "prod-chat", None),
    ],
)
def test_lookup_by_snapshot_and_pass_through_for_unknown_models(
    vendor: str, model: str, expected: str | None
) -> None:
    facts = default_catalog().lookup(vendor, model)
    assert (facts.name if facts else None) == expected


def test_cache_writes_are_priced_at_the_cache_write_rate() -> None:
    from kernel.contracts import Usage

    usage = Usage(prompt_tokens=1_000_000, cached_tokens=200_000, cache_write_tokens=300_000)
    cost = PriceTable().cost("anthropic", "claude-sonnet-4-5", usage)
    # 500k uncached at 3.00, 200k reads at 0.30, 300k writes at 3.75
    assert cost == pytest.approx(1.5 + 0.06 + 1.125)


# --- per-model rules -------------------------------------------------------------------------------


def test_reasoning_model_refuses_temperature_before_the_call() -> None:
    provider = OpenAIProvider(settings=ProviderSettings(api_key="k"))
    with pytest.raises(UnsupportedCapability) as caught:
        provider.check_chat(_ask("gpt-5-mini", temperature=0.2, presence_penalty=0.5))
    message = str(caught.value)
    assert "temperature: model openai/gpt-5-mini refuses 'temperature'" in message
    assert "presence_penalty" in message and "set lenient" in message


def test_lenient_mode_drops_with_a_warning_and_keeps_the_rest() -> None:
    provider = OpenAIProvider(settings=ProviderSettings(api_key="k"))
    prepared = provider.prepare_chat(
        _ask("o4-mini", temperature=0.2, max_tokens=200_000, seed=4, lenient=True)
    )
    assert prepared.request.temperature is None and prepared.request.seed == 4
    assert prepared.request.max_tokens == 100_000
    assert prepared.warnings == (
        "dropped temperature: model openai/o4-mini refuses 'temperature'",
        "lowered max_tokens from 200000 to 100000, the output limit of openai/o4-mini",
    )
    provider.check_chat(prepared.request)  # what is left passes the strict check


def test_a_models_rules_are_worked_out_once_and_give_the_same_answers_every_call() -> None:
    looked_up: list[str] = []

    class Counting(OpenAIProvider):
        def model_facts(self, model: str) -> Any:
            looked_up.append(model)
            return super().model_facts(model)

    provider = Counting(settings=ProviderSettings(api_key="k"))
    for _ in range(3):
        with pytest.raises(UnsupportedCapability, match="model openai/o4-mini refuses 'temperature'"):
            provider.check_chat(_ask("o4-mini", temperature=0.2))
        assert provider.prepare_chat(_ask("o4-mini", temperature=0.2), lenient=True).warnings == (
            "dropped temperature: model openai/o4-mini refuses 'temperature'",
        )
        assert provider.prepare_chat(_ask("o4-mini", seed=1)).request.seed == 1
        provider.check_chat(_ask("gpt-4o", temperature=0.2))
    assert looked_up == ["o4-mini", "gpt-4o"]
    assert default_catalog().lookup("openai", "o4-mini-2025-04-16") is default_catalog().lookup(
        "openai", "o4-mini"
    )
    table = PriceTable()
    assert table.lookup("openai", "gpt-4o-2024-08-06") == table.lookup("openai", "gpt-4o")
    overridden = table.with_overrides({"openai": {"gpt-4o": {"input": 1.0, "output": 2.0}}})
    assert overridden.lookup("openai", "gpt-4o-2024-08-06") == overridden.lookup("openai", "gpt-4o")
    assert overridden.lookup("openai", "gpt-4o") != table.lookup("openai", "gpt-4o")


def test_unknown_models_and_fine_tunes_pass_through() -> None:
    provider = OpenAIProvider(settings=ProviderSettings(api_key="k"))
    for model in ("ft:o4-mini-2025-04-16:acme::x1", "my-new-model"):
        assert provider.prepare_chat(_ask(model, temperature=0.2)).warnings == ()


def test_reasoning_models_take_max_completion_tokens() -> None:
    provider = OpenAIProvider(settings=ProviderSettings(api_key="k"))
    assert "max_completion_tokens" in provider._map_request(_ask("gpt-5", max_tokens=10), stream=False)
    assert "max_tokens" in provider._map_request(_ask("gpt-4o", max_tokens=10), stream=False)
    assert "max_completion_tokens" in provider._map_request(
        _ask("o3-2025-04-16", max_tokens=10), stream=False
    )


def test_recent_claude_takes_one_of_temperature_and_top_p() -> None:
    provider = AnthropicProvider(settings=ProviderSettings(api_key="k"))
    with pytest.raises(UnsupportedCapability, match="takes only one of temperature, top_p"):
        provider.check_chat(_ask("claude-sonnet-4-5-20250929", temperature=0.2, top_p=0.9))
    prepared = provider.prepare_chat(_ask("claude-haiku-4-5", temperature=0.2, top_p=0.9, lenient=True))
    assert prepared.request.temperature == 0.2 and prepared.request.top_p is None
    provider.check_chat(_ask("claude-3-5-haiku-latest", temperature=0.2, top_p=0.9))


def test_reasoning_effort_needs_a_model_that_reasons() -> None:
    provider = OpenAIProvider(settings=ProviderSettings(api_key="k"))
    with pytest.raises(UnsupportedCapability, match="gpt-4o has no reasoning_effort"):
        provider.check_chat(_ask("gpt-4o", reasoning_effort="high"))
    body = provider._map_request(_ask("o3", reasoning_effort="high"), stream=False)
    assert body["reasoning_effort"] == "high"


def test_azure_deployments_are_checked_as_their_base_model() -> None:
    settings = ProviderSettings(
        api_key="k",
        base_url="https://x.openai.azure.com",
        options={"deployments": {"prod-reasoner": "o4-mini"}},
    )
    provider = AzureOpenAIProvider(settings=settings)
    with pytest.raises(UnsupportedCapability, match="refuses 'temperature'"):
        provider.check_chat(_ask("prod-reasoner", temperature=0.3))
    provider.check_chat(_ask("other-deployment", temperature=0.3))
    with pytest.raises(ConfigurationError, match=r"options\.deployments must map"):
        AzureOpenAIProvider(settings=ProviderSettings(api_key="k", options={"deployments": ["o4-mini"]}))


def test_apply_rules_is_usable_without_a_provider() -> None:
    facts = default_catalog().lookup("openai", "gpt-5")
    with pytest.raises(UnsupportedCapability, match="top_p"):
        apply_rules(_ask("gpt-5", top_p=0.5), provider="openai", facts=facts)


# --- per-provider: nothing is dropped silently ------------------------------------------------------


def _cases() -> list[tuple[type[Provider], str]]:
    return [(cls, name) for cls in BUILT_IN for name in sorted(cls.unsupported_options)]


@pytest.mark.parametrize(("cls", "option"), _cases(), ids=[f"{c.name}-{o}" for c, o in _cases()])
def test_an_option_a_provider_cannot_honour_is_refused_or_dropped_with_a_warning(
    cls: type[Provider], option: str
) -> None:
    assert option in REQUEST_OPTIONS
    provider = cls(settings=ProviderSettings(api_key="k", base_url="https://example.invalid"))
    request = _ask("some-model", **{option: _VALUES[option]})
    with pytest.raises(UnsupportedCapability, match=f"{option}: {cls.name} has no equivalent"):
        provider.check_chat(request)
    prepared = provider.prepare_chat(request.model_copy(update={"lenient": True}))
    assert getattr(prepared.request, option) is None
    assert prepared.warnings == (f"dropped {option}: {cls.name} has no equivalent of {option!r}",)


@pytest.mark.parametrize(
    ("cls", "silently_dropped_before"),
    [
        (AnthropicProvider, ["seed", "presence_penalty", "frequency_penalty"]),
        (GeminiProvider, ["user", "parallel_tool_calls"]),
        (MistralProvider, ["user"]),
        (BedrockProvider, ["seed", "presence_penalty", "frequency_penalty", "user", "parallel_tool_calls"]),
        (OllamaProvider, ["user", "parallel_tool_calls"]),
    ],
)
def test_options_once_dropped_silently_are_declared(
    cls: type[Provider], silently_dropped_before: list[str]
) -> None:
    assert set(silently_dropped_before) <= cls.unsupported_options


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": 1.6}, "temperature=1.6 is out of range for mistral: it accepts 0 to 1.5"),
        ({"seed": -1}, "seed=-1 is out of range for mistral: it accepts 0 to inf"),
    ],
)
def test_mistral_ranges(fields: dict[str, Any], message: str) -> None:
    provider = MistralProvider(settings=ProviderSettings(api_key="k"))
    with pytest.raises(InvalidRequest) as caught:
        provider.check_chat(_ask("mistral-small-latest", **fields))
    assert str(caught.value) == message
    provider.check_chat(_ask("mistral-small-latest", temperature=1.5, seed=0))


def test_anthropic_temperature_range() -> None:
    provider = AnthropicProvider(settings=ProviderSettings(api_key="k"))
    with pytest.raises(
        InvalidRequest, match=r"temperature=1\.2 is out of range for anthropic: it accepts 0 to 1"
    ):
        provider.check_chat(_ask("claude-3-5-haiku-latest", temperature=1.2))


def test_bedrock_refuses_tool_choice_none_over_a_tool_history() -> None:
    provider = BedrockProvider(
        environ={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_REGION": "x"}
    )
    call = ToolCall(id="t1", function=FunctionCall(name="get_weather", arguments="{}"))
    history = [
        UserMessage(content="Weather?"),
        AssistantMessage(tool_calls=[call]),
        ToolMessage(tool_call_id="t1", content="sunny"),
    ]
    request = ChatRequest(
        model="amazon.nova-lite-v1:0", messages=history, tools=[WEATHER], tool_choice="none"
    )
    with pytest.raises(UnsupportedCapability, match="cannot forbid tool calls"):
        provider._map_request(request)
    fresh = request.model_copy(update={"messages": history[:1]})
    assert "toolConfig" not in provider._map_request(fresh)


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        (OpenAIProvider, {"openai": {"logprobs": True, "temperature": 1}}, "temperature not accepted"),
        (AnthropicProvider, {"anthropic": {"top_k": 5, "topK": 5}}, "topK not accepted"),
        (GeminiProvider, {"gemini": {"top_k": 5}}, "top_k not accepted"),
        (BedrockProvider, {"bedrock": {"inferenceConfig": {}}}, "inferenceConfig not accepted"),
        (OllamaProvider, {"ollama": {"options": {"temperature": 1}}}, "options.temperature not accepted"),
    ],
)
def test_provider_options_are_checked_against_what_the_provider_accepts(
    cls: type[Provider], options: dict[str, Any], message: str
) -> None:
    provider = cls(
        settings=ProviderSettings(api_key="k"),
        environ={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_REGION": "x"},
    )
    request = _ask("claude-3-5-haiku-latest", provider_options=options)
    with pytest.raises(InvalidRequest, match=message):
        provider._map_request(
            request, **({"stream": False} if cls not in (GeminiProvider, BedrockProvider) else {})
        )  # type: ignore[attr-defined]


def test_provider_options_reach_the_wire_and_other_providers_entries_are_ignored() -> None:
    provider = AnthropicProvider(settings=ProviderSettings(api_key="k"))
    body = provider._map_request(
        _ask("claude-3-5-haiku-latest", provider_options={"anthropic": {"top_k": 5}, "gemini": {"topK": 1}}),
        stream=False,
    )
    assert body["top_k"] == 5 and "topK" not in body


# --- the activity applies it, against the simulator ---------------------------------------------------


@pytest.fixture
async def activities(sim: SimulatorServer) -> AsyncIterator[LlmActivities]:
    registry = Registry(settings={"openai": ProviderSettings(api_key="sim-key", base_url=f"{sim.url}/v1")})
    registry.register(OpenAIProvider)
    try:
        yield LlmActivities(registry)
    finally:
        await registry.aclose()


async def test_activity_refuses_a_reasoning_model_temperature_without_calling(
    activities: LlmActivities, sim: SimulatorServer
) -> None:
    call = LlmCallInput(model="openai/o4-mini", request=_ask("x", temperature=0.2))
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(activities.chat, call)
    assert caught.value.type == "UnsupportedCapability" and caught.value.non_retryable
    assert sim.stats()["requests"] == 0


async def test_activity_in_lenient_mode_records_what_it_dropped(
    activities: LlmActivities, sim: SimulatorServer
) -> None:
    call = LlmCallInput(
        model="openai/o4-mini", request=_ask("x", temperature=0.2, max_tokens=50, lenient=True)
    )
    result = await ActivityEnvironment().run(activities.chat, call)
    assert result.response.text.startswith("Simulated reply from o4-mini")
    assert result.response.warnings == ["dropped temperature: model openai/o4-mini refuses 'temperature'"]


async def test_simulator_answers_a_sent_temperature_with_openais_body(sim: SimulatorServer) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{sim.url}/v1/chat/completions",
            headers={"authorization": "Bearer sim-key"},
            json={"model": "gpt-5", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.2},
        )
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "Unsupported value: 'temperature' does not support 0.2 with this model. "
        "Only the default (1) value is supported.",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": "unsupported_value",
    }


def test_bedrock_cross_region_profiles_are_priced_as_their_model() -> None:
    price = PriceTable().lookup("bedrock", "us.anthropic.claude-sonnet-4-5-20250929-v1:0")
    assert price is not None and price == DEFAULT_PRICES["bedrock"]["anthropic.claude-sonnet-4-5"]

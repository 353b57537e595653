"""OpenAI-compatible presets as data: every built-in builds with its URL and key variable, declared
quirks change the request as declared, user presets come from a config mapping (typos refused by
name), and a preset pointed at the simulator holds a whole conversation."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from kernel.contracts import ChatRequest, EmbedRequest, StreamDone, TextDelta
from kernel.errors import ConfigurationError, MissingCredentials, UnsupportedCapability
from kernel.provider import Provider, ProviderSettings, collect_stream
from kernel.registry import Registry
from providers.openai import OpenAIProvider
from providers.presets import PresetProvider, builtin_presets, user_presets
from simulator.core import SimulatorConfig
from simulator.server import SimulatorServer

Handler = Callable[[httpx.Request], httpx.Response]
EXPECTED = {
    "groq": ("https://api.groq.com/openai/v1", "GROQ_API_KEY"),
    "together": ("https://api.together.ai/v1", "TOGETHER_API_KEY"),
    "deepseek": ("https://api.deepseek.com/v1", "DEEPSEEK_API_KEY"),
    "openrouter": ("https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
    "fireworks": ("https://api.fireworks.ai/inference/v1", "FIREWORKS_API_KEY"),
    "xai": ("https://api.x.ai/v1", "XAI_API_KEY"),
    "vllm": ("http://localhost:8000/v1", None),
    "lmstudio": ("http://localhost:1234/v1", None),
}
COMPLETION = {
    "id": "c1",
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
}
STREAM = (
    'data: {"id":"s","model":"m","choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":"stop"}]}\n\n'
    "data: [DONE]\n\n"
)


def _classes() -> dict[str, type[Provider]]:
    return {cls.name: cls for cls in builtin_presets()}


def _chat(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate(
        {"model": "some-model", "messages": [{"role": "user", "content": "hi", "name": "alice"}], **fields}
    )


def _provider(
    name: str,
    handler: Handler,
    *,
    environ: dict[str, str] | None = None,
    settings: ProviderSettings | None = None,
) -> OpenAIProvider:
    cls = _classes()[name]
    assert issubclass(cls, OpenAIProvider)
    key_env = cls.api_key_env
    env = environ if environ is not None else ({key_env: "the-key"} if key_env else {})
    return cls(
        settings=settings, environ=env, http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler))
    )


def _recording(response: httpx.Response) -> tuple[list[httpx.Request], Handler]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return response

    return seen, handler


def _no_network(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"no request may be sent, but {request.url} was")


# --- built-ins -------------------------------------------------------------------------------------


def test_every_builtin_preset_builds_with_its_url_and_key_variable() -> None:
    classes = _classes()
    assert set(classes) == set(EXPECTED)
    registry = Registry(environ={})
    for name, cls in classes.items():
        registry.register(cls)
        assert issubclass(cls, PresetProvider)
        assert (cls.default_base_url, cls.api_key_env) == EXPECTED[name]
        assert cls.base_url_env != "OPENAI_BASE_URL"
        assert cls.description
    assert registry.names == sorted(EXPECTED)
    described = {row["name"]: row for row in registry.describe()}
    assert described["deepseek"]["json_schema_mode"] == "none"
    assert "embeddings" in described["together"]["capabilities"]
    assert described["vllm"]["credentials_present"] is True
    assert described["groq"]["credentials_present"] is False


async def test_each_keyed_preset_posts_to_its_url_with_a_bearer_key() -> None:
    for name, (base_url, key_env) in EXPECTED.items():
        if key_env is None:
            continue
        seen, handler = _recording(httpx.Response(200, json=COMPLETION))
        response = await _provider(name, handler).chat(_chat())
        assert str(seen[0].url) == f"{base_url}/chat/completions"
        assert seen[0].headers["authorization"] == "Bearer the-key"
        assert response.provider == name


async def test_missing_key_names_the_presets_variable_before_any_call() -> None:
    with pytest.raises(MissingCredentials, match="GROQ_API_KEY"):
        await _provider("groq", _no_network, environ={}).chat(_chat())


async def test_local_servers_send_no_authorization_unless_a_key_is_configured() -> None:
    seen, handler = _recording(httpx.Response(200, json=COMPLETION))
    await _provider("vllm", handler).chat(_chat())
    await _provider("vllm", handler, settings=ProviderSettings(api_key="vllm-secret")).chat(_chat())
    assert "authorization" not in seen[0].headers
    assert seen[1].headers["authorization"] == "Bearer vllm-secret"


async def test_local_server_url_comes_from_its_variable() -> None:
    seen, handler = _recording(httpx.Response(200, json=COMPLETION))
    await _provider("vllm", handler, environ={"VLLM_BASE_URL": "http://10.1.2.3:9000/v1"}).chat(_chat())
    assert str(seen[0].url) == "http://10.1.2.3:9000/v1/chat/completions"


async def test_stream_usage_false_sends_no_stream_options() -> None:
    seen, handler = _recording(
        httpx.Response(200, text=STREAM, headers={"content-type": "text/event-stream"})
    )
    await collect_stream(_provider("lmstudio", handler).stream(_chat()), provider="lmstudio")
    await collect_stream(_provider("vllm", handler).stream(_chat()), provider="vllm")
    lmstudio, vllm = (json.loads(r.content) for r in seen)
    assert "stream_options" not in lmstudio
    assert vllm["stream_options"] == {"include_usage": True}


async def test_groq_drops_message_names_and_others_keep_them() -> None:
    seen, handler = _recording(httpx.Response(200, json=COMPLETION))
    await _provider("groq", handler).chat(_chat())
    await _provider("together", handler).chat(_chat())
    groq, together = (json.loads(r.content)["messages"][0] for r in seen)
    assert "name" not in groq
    assert together["name"] == "alice"


async def test_token_limit_goes_in_max_tokens_even_for_reasoning_looking_models() -> None:
    seen, handler = _recording(httpx.Response(200, json=COMPLETION))
    await _provider("openrouter", handler).chat(_chat(model="o3-mini", max_tokens=64))
    body = json.loads(seen[0].content)
    assert body["max_tokens"] == 64 and "max_completion_tokens" not in body


async def test_deepseek_refuses_json_schema_before_any_call_and_counts_cache_hits() -> None:
    schema_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    with pytest.raises(UnsupportedCapability, match="json_schema"):
        await _provider("deepseek", _no_network).chat(_chat(response_format=schema_format))
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 5,
        "prompt_cache_hit_tokens": 64,
        "prompt_cache_miss_tokens": 36,
    }
    _, handler = _recording(httpx.Response(200, json={**COMPLETION, "usage": usage}))
    response = await _provider("deepseek", handler).chat(_chat(response_format={"type": "json_object"}))
    assert response.usage.cached_tokens == 64
    assert response.usage.prompt_tokens == 100


async def test_embeddings_only_where_declared() -> None:
    with pytest.raises(UnsupportedCapability, match="embeddings"):
        await _provider("groq", _no_network).embed(EmbedRequest(model="e", input=["x"]))
    body = {"data": [{"index": 0, "embedding": [1.0]}], "model": "e", "usage": {"prompt_tokens": 1}}
    seen, handler = _recording(httpx.Response(200, json=body))
    result = await _provider("fireworks", handler).embed(EmbedRequest(model="e", input=["x"]))
    assert str(seen[0].url) == "https://api.fireworks.ai/inference/v1/embeddings"
    assert result.embeddings == [[1.0]]


async def test_openrouter_attribution_header_can_be_overridden_in_settings() -> None:
    seen, handler = _recording(httpx.Response(200, json=COMPLETION))
    await _provider("openrouter", handler).chat(_chat())
    assert seen[0].headers["x-title"] == "Kernelflow"
    settings = ProviderSettings(headers={"X-Title": "My App", "HTTP-Referer": "https://example.com"})
    cls = _classes()["openrouter"]
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler), headers=settings.headers)
    provider = cls(settings=settings, environ={"OPENROUTER_API_KEY": "k"}, http_client=client)
    await provider.chat(_chat())
    assert seen[1].headers.get_list("x-title") == ["My App"]
    assert seen[1].headers["http-referer"] == "https://example.com"


# --- user presets ----------------------------------------------------------------------------------


async def test_user_preset_from_config_mapping() -> None:
    config = {
        "corp-llm": {
            "base_url": "https://llm.corp.example/v1/",
            "api_key_env": "CORP_LLM_KEY",
            "stream_usage": False,
            "max_tokens_field": "max_completion_tokens",
            "json_schema": "none",
            "headers": {"X-Team": "search"},
        }
    }
    (cls,) = user_presets(config)
    assert cls.name == "corp-llm"
    assert cls.default_base_url == "https://llm.corp.example/v1"
    assert cls.capabilities.json_schema is False
    registry = Registry(environ={"CORP_LLM_KEY": "corp-key"})
    registry.register(cls)
    seen, handler = _recording(httpx.Response(200, json=COMPLETION))
    provider = cls(
        environ={"CORP_LLM_KEY": "corp-key"},
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )
    assert isinstance(provider, OpenAIProvider)
    await provider.chat(_chat(max_tokens=10))
    body = json.loads(seen[0].content)
    assert str(seen[0].url) == "https://llm.corp.example/v1/chat/completions"
    assert seen[0].headers["x-team"] == "search"
    assert seen[0].headers["authorization"] == "Bearer corp-key"
    assert body["max_completion_tokens"] == 10


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"base_url": "http://x/v1", "api_key_env": None, "stream_usge": False},
            r"presets\.local\.stream_usge: unknown field",
        ),
        (
            {"base_url": "http://x/v1", "api_key_env": None, "json_schema": "tool"},
            r"presets\.local\.json_schema: .*'tool'",
        ),
        ({"base_url": "x.example/v1", "api_key_env": None}, r"presets\.local\.base_url: .*http"),
        ({"base_url": "http://x/v1"}, r"presets\.local\.api_key_env: required field missing"),
    ],
)
def test_user_preset_errors_name_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        user_presets({"local": fields})


def test_user_preset_name_must_be_usable_in_model_strings() -> None:
    with pytest.raises(ConfigurationError, match=r"presets\.My/LLM\.name"):
        user_presets({"My/LLM": {"base_url": "http://x/v1", "api_key_env": None}})


# --- end to end against the simulator --------------------------------------------------------------


@pytest.fixture(scope="module")
def preset_sim() -> Iterator[SimulatorServer]:
    with SimulatorServer(
        config=SimulatorConfig(extra_models={"openai": ["llama-3.3-70b-versatile"]})
    ) as server:
        yield server


async def test_groq_preset_pointed_at_the_simulator(preset_sim: SimulatorServer) -> None:
    registry = Registry(
        settings={"groq": ProviderSettings(base_url=f"{preset_sim.url}/v1")},
        environ={"GROQ_API_KEY": "sim-key"},
    )
    for cls in builtin_presets():
        registry.register(cls)
    try:
        provider, model = registry.resolve("groq/llama-3.3-70b-versatile")
        request = ChatRequest.model_validate(
            {"model": model, "messages": [{"role": "user", "content": "fast please", "name": "bob"}]}
        )
        response = await provider.chat(request)
        assert response.text == "Simulated reply from llama-3.3-70b-versatile: fast please"
        events = [e async for e in provider.stream(request)]
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == response.text
        assert isinstance(events[-1], StreamDone) and events[-1].usage.total_tokens > 0
    finally:
        await registry.aclose()

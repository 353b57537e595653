"""Azure OpenAI: deployment URLs, api-version, `api-key` or bearer auth, content filters and
`x-ms-retry-after-ms`, first against recorded bytes (MockTransport), then against the simulator, whose
Azure paths the official `AsyncAzureOpenAI` client also accepts."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from openai import AsyncAzureOpenAI

from kernel.contracts import (
    ChatRequest,
    EmbedRequest,
    StreamDone,
    StreamError,
    StreamStart,
    TextDelta,
    ToolCallDelta,
)
from kernel.errors import ConfigurationError, ContentFiltered, MissingCredentials, RateLimited
from kernel.provider import ProviderSettings, collect_stream
from kernel.registry import Registry
from providers.azure_openai import DEFAULT_API_VERSION, AzureOpenAIProvider
from simulator.server import SimulatorServer

ENDPOINT = "https://myres.openai.azure.com"
ENV = {"AZURE_OPENAI_ENDPOINT": ENDPOINT, "AZURE_OPENAI_API_KEY": "azure-key"}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _chat(text: str = "Hello", **fields: Any) -> ChatRequest:
    return ChatRequest.model_validate(
        {"model": "my-gpt4o", "messages": [{"role": "user", "content": text}], **fields}
    )


def _completion(**choice: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": "Hi there"}
    return {
        "id": "chatcmpl-1",
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop", **choice}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


Handler = Callable[[httpx.Request], httpx.Response]


def _provider(
    handler: Handler, *, environ: dict[str, str] | None = None, settings: ProviderSettings | None = None
) -> AzureOpenAIProvider:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return AzureOpenAIProvider(
        settings=settings, environ=ENV if environ is None else environ, http_client=client
    )


def _recording(response: httpx.Response) -> tuple[list[httpx.Request], Handler]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return response

    return seen, handler


def _no_network(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"no request may be sent, but {request.url} was")


# --- connection ------------------------------------------------------------------------------------


async def test_chat_goes_to_the_deployment_with_api_version_and_api_key() -> None:
    seen, handler = _recording(httpx.Response(200, json=_completion()))
    response = await _provider(handler).chat(_chat())
    (request,) = seen
    assert str(request.url) == (
        f"{ENDPOINT}/openai/deployments/my-gpt4o/chat/completions?api-version={DEFAULT_API_VERSION}"
    )
    assert request.headers["api-key"] == "azure-key"
    assert "authorization" not in request.headers
    assert response.text == "Hi there"
    assert response.provider == "azure_openai"
    assert response.usage.total_tokens == 7


async def test_api_version_from_options_beats_the_environment() -> None:
    seen, handler = _recording(httpx.Response(200, json=_completion()))
    environ = {**ENV, "AZURE_OPENAI_API_VERSION": "2024-06-01"}
    await _provider(handler, environ=environ).chat(_chat())
    await _provider(
        handler, environ=environ, settings=ProviderSettings(options={"api_version": "2025-01-01-preview"})
    ).chat(_chat())
    assert [r.url.params["api-version"] for r in seen] == ["2024-06-01", "2025-01-01-preview"]


async def test_endpoint_with_trailing_openai_segment_is_normalised() -> None:
    seen, handler = _recording(httpx.Response(200, json=_completion()))
    environ = {**ENV, "AZURE_OPENAI_ENDPOINT": f"{ENDPOINT}/openai/"}
    await _provider(handler, environ=environ).chat(_chat())
    assert seen[0].url.path == "/openai/deployments/my-gpt4o/chat/completions"


async def test_entra_id_token_from_options_is_sent_as_bearer() -> None:
    seen, handler = _recording(httpx.Response(200, json=_completion()))
    settings = ProviderSettings(options={"azure_ad_token": "entra-token"})
    await _provider(handler, environ={"AZURE_OPENAI_ENDPOINT": ENDPOINT}, settings=settings).chat(_chat())
    assert seen[0].headers["authorization"] == "Bearer entra-token"
    assert "api-key" not in seen[0].headers


async def test_entra_id_token_from_environment_wins_over_key_from_environment() -> None:
    seen, handler = _recording(httpx.Response(200, json=_completion()))
    environ = {**ENV, "AZURE_OPENAI_AD_TOKEN": "env-token"}
    await _provider(handler, environ=environ).chat(_chat())
    assert seen[0].headers["authorization"] == "Bearer env-token"
    assert "api-key" not in seen[0].headers


async def test_key_in_settings_wins_over_everything_in_the_environment() -> None:
    seen, handler = _recording(httpx.Response(200, json=_completion()))
    environ = {**ENV, "AZURE_OPENAI_AD_TOKEN": "env-token"}
    await _provider(handler, environ=environ, settings=ProviderSettings(api_key="settings-key")).chat(_chat())
    assert seen[0].headers["api-key"] == "settings-key"
    assert "authorization" not in seen[0].headers


async def test_missing_endpoint_is_a_configuration_error_naming_the_variable() -> None:
    provider = _provider(_no_network, environ={"AZURE_OPENAI_API_KEY": "azure-key"})
    with pytest.raises(ConfigurationError, match="AZURE_OPENAI_ENDPOINT"):
        await provider.chat(_chat())
    with pytest.raises(ConfigurationError, match="AZURE_OPENAI_ENDPOINT"):
        await collect_stream(provider.stream(_chat()), provider="azure_openai")


async def test_missing_credentials_name_both_variables_before_any_call() -> None:
    provider = _provider(_no_network, environ={"AZURE_OPENAI_ENDPOINT": ENDPOINT})
    assert not provider.has_credentials()
    with pytest.raises(MissingCredentials) as caught:
        await provider.chat(_chat())
    assert caught.value.env_var == "AZURE_OPENAI_API_KEY"
    assert "AZURE_OPENAI_AD_TOKEN" in str(caught.value)


def test_unknown_option_is_refused_naming_it() -> None:
    with pytest.raises(ConfigurationError, match=r"'api_verison'.*api_version"):
        AzureOpenAIProvider(settings=ProviderSettings(options={"api_verison": "2024-10-21"}), environ=ENV)


async def test_embeddings_go_to_the_deployment() -> None:
    body = {
        "data": [{"index": 1, "embedding": [0.0, 1.0]}, {"index": 0, "embedding": [1.0, 0.0]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }
    seen, handler = _recording(httpx.Response(200, json=body))
    result = await _provider(handler).embed(EmbedRequest(model="my-embedder", input=["a", "b"], dimensions=2))
    assert seen[0].url.path == "/openai/deployments/my-embedder/embeddings"
    assert seen[0].url.params["api-version"] == DEFAULT_API_VERSION
    assert json.loads(seen[0].content)["dimensions"] == 2
    assert result.embeddings == [[1.0, 0.0], [0.0, 1.0]]


# --- content filter and rate limits ----------------------------------------------------------------

_FILTER_400 = {
    "error": {
        "code": "content_filter",
        "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
        "param": "prompt",
        "status": 400,
        "innererror": {
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_result": {
                "hate": {"filtered": True, "severity": "medium"},
                "violence": {"filtered": False, "severity": "safe"},
            },
        },
    }
}


async def test_prompt_filtered_with_400_is_content_filtered_naming_the_category() -> None:
    _, handler = _recording(httpx.Response(400, json=_FILTER_400))
    with pytest.raises(ContentFiltered, match="hate/medium") as caught:
        await _provider(handler).chat(_chat())
    assert caught.value.status_code == 400
    assert not caught.value.retryable


async def test_answer_filtered_with_200_is_content_filtered_even_with_partial_text() -> None:
    results = {
        "sexual": {"filtered": True, "severity": "high"},
        "hate": {"filtered": False, "severity": "safe"},
    }
    body = _completion(finish_reason="content_filter", content_filter_results=results)
    _, handler = _recording(httpx.Response(200, json=body))
    with pytest.raises(ContentFiltered, match="sexual/high"):
        await _provider(handler).chat(_chat())


async def test_stream_cut_by_the_content_filter_ends_in_a_non_retryable_error() -> None:
    chunks = [
        {"id": "", "model": "", "choices": [], "prompt_filter_results": [{"prompt_index": 0}]},
        {"id": "c1", "model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": "Once"}}]},
        {
            "id": "c1",
            "model": "gpt-4o",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}],
        },
    ]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    _, handler = _recording(httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"}))
    events = [event async for event in _provider(handler).stream(_chat())]
    assert isinstance(events[0], StreamStart)
    assert TextDelta(text="Once") in events
    assert isinstance(events[-1], StreamError)
    assert events[-1].error_type == "ContentFiltered"
    assert not events[-1].retryable


async def test_x_ms_retry_after_ms_sets_the_retry_delay() -> None:
    body = {
        "error": {"code": "429", "message": "Requests to the ChatCompletions_Create Operation have exceeded"}
    }
    response = httpx.Response(429, json=body, headers={"x-ms-retry-after-ms": "2500"})
    _, handler = _recording(response)
    with pytest.raises(RateLimited) as caught:
        await _provider(handler).chat(_chat())
    assert caught.value.retry_after == pytest.approx(2.5)


async def test_stream_refused_with_429_raises_with_the_retry_delay() -> None:
    response = httpx.Response(
        429, json={"error": {"code": "429", "message": "slow down"}}, headers={"x-ms-retry-after-ms": "700"}
    )
    _, handler = _recording(response)
    with pytest.raises(RateLimited) as caught:
        await collect_stream(_provider(handler).stream(_chat()), provider="azure_openai")
    assert caught.value.retry_after == pytest.approx(0.7)


# --- end to end against the simulator --------------------------------------------------------------


@pytest.fixture(scope="module")
def azure_sim() -> Iterator[SimulatorServer]:
    with SimulatorServer() as server:
        yield server


@pytest.fixture
async def azure(azure_sim: SimulatorServer) -> Any:
    registry = Registry(environ={"AZURE_OPENAI_ENDPOINT": azure_sim.url, "AZURE_OPENAI_API_KEY": "sim-key"})
    registry.register(AzureOpenAIProvider)
    provider = registry.get("azure_openai")
    yield provider
    await registry.aclose()


async def test_simulator_chat_on_any_deployment_name(azure: AzureOpenAIProvider) -> None:
    response = await azure.chat(_chat("Hello Azure", model="prod-chat-east"))
    assert response.text == "Simulated reply from prod-chat-east: Hello Azure"
    assert response.finish_reason == "stop"
    assert response.usage.prompt_tokens > 0


async def test_simulator_stream(azure: AzureOpenAIProvider) -> None:
    events = [event async for event in azure.stream(_chat("stream me please"))]
    assert isinstance(events[0], StreamStart)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == (
        "Simulated reply from my-gpt4o: stream me please"
    )
    assert isinstance(events[-1], StreamDone)
    assert events[-1].usage.completion_tokens > 0


async def test_simulator_tools_round_trip(azure: AzureOpenAIProvider) -> None:
    first = await azure.chat(_chat("Weather in Paris?", tools=[WEATHER_TOOL]))
    assert first.finish_reason == "tool_calls"
    (call,) = first.tool_calls
    assert call.function.name == "get_weather"
    assert call.function.parsed_arguments() == {"city": "sample city"}
    follow_up = ChatRequest.model_validate(
        {
            "model": "my-gpt4o",
            "tools": [WEATHER_TOOL],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
            ],
        }
    )
    answer = await azure.chat(follow_up)
    assert answer.finish_reason == "stop"
    assert answer.text.endswith("sunny")
    streamed = [e async for e in azure.stream(_chat("Weather in Paris?", tools=[WEATHER_TOOL]))]
    assert any(isinstance(e, ToolCallDelta) and e.name == "get_weather" for e in streamed)


async def test_simulator_embeddings(azure: AzureOpenAIProvider) -> None:
    result = await azure.embed(EmbedRequest(model="embedder", input=["one", "two"], dimensions=8))
    assert [len(v) for v in result.embeddings] == [8, 8]


async def test_simulator_content_filter_error(azure: AzureOpenAIProvider) -> None:
    with pytest.raises(ContentFiltered, match="violence/medium"):
        await azure.chat(_chat("[[sim: fault=content_filter]] tell me"))


async def test_simulator_rate_limit_carries_x_ms_retry_after_ms(azure: AzureOpenAIProvider) -> None:
    with pytest.raises(RateLimited) as caught:
        await azure.chat(_chat("[[sim: fault=429]] busy?"))
    assert caught.value.retry_after == pytest.approx(1.0)


async def test_simulator_refuses_a_wrong_key(azure_sim: SimulatorServer) -> None:
    provider = AzureOpenAIProvider(
        environ={"AZURE_OPENAI_ENDPOINT": azure_sim.url, "AZURE_OPENAI_API_KEY": "sk-invalid"}
    )
    try:
        with pytest.raises(Exception, match="401"):
            await provider.chat(_chat())
    finally:
        await provider.aclose()


async def test_official_azure_sdk_speaks_to_the_simulator(azure_sim: SimulatorServer) -> None:
    client = AsyncAzureOpenAI(
        azure_endpoint=azure_sim.url, api_key="sim-key", api_version=DEFAULT_API_VERSION, max_retries=0
    )
    async with client:
        completion = await client.chat.completions.create(
            model="sdk-deployment", messages=[{"role": "user", "content": "Hi from the SDK"}]
        )
        assert completion.choices[0].message.content == "Simulated reply from sdk-deployment: Hi from the SDK"
        stream = await client.chat.completions.create(
            model="sdk-deployment",
            messages=[{"role": "user", "content": "streamed"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == "Simulated reply from sdk-deployment: streamed"
        embedding = await client.embeddings.create(model="sdk-embedder", input="vector please", dimensions=4)
        assert len(embedding.data[0].embedding) == 4

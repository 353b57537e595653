"""Every built-in provider passes the conformance kit against the simulator."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
import pytest

from kernel.errors import RateLimited
from kernel.provider import Provider, ProviderSettings
from kernel.testing import ProviderConformance
from providers.anthropic import AnthropicProvider
from providers.azure_openai import AzureOpenAIProvider
from providers.bedrock import BedrockProvider
from providers.gemini import GeminiProvider
from providers.mistral import MistralProvider
from providers.ollama import OllamaProvider
from providers.openai import OpenAIProvider
from providers.presets import builtin_presets
from simulator.server import SimulatorServer


class _OnSessionSimulator(ProviderConformance):
    """Points the kit at the session's simulator instead of starting another one."""

    @pytest.fixture(autouse=True)
    def _session_simulator(self, simulator_server: SimulatorServer) -> None:
        self.simulator_url = simulator_server.url  # type: ignore[misc]


def _settings(base_url: str, api_key: str | None, **options: Any) -> ProviderSettings:
    return ProviderSettings(base_url=base_url, api_key=api_key, options=options)


class TestOpenAIConformance(_OnSessionSimulator):
    chat_model = "gpt-4o-mini"
    embed_model = "text-embedding-3-small"
    catalog_model = "o4-mini"

    def make_provider(
        self, base_url: str, *, api_key: str | None, http_client: httpx.AsyncClient
    ) -> Provider:
        return OpenAIProvider(
            settings=_settings(f"{base_url}/v1", api_key), environ={}, http_client=http_client
        )


class TestOpenAIResponsesConformance(TestOpenAIConformance):
    """The OpenAI provider in Responses API mode, against the simulator's /v1/responses."""

    def make_provider(
        self, base_url: str, *, api_key: str | None, http_client: httpx.AsyncClient
    ) -> Provider:
        return OpenAIProvider(
            settings=_settings(f"{base_url}/v1", api_key, api="responses"),
            environ={},
            http_client=http_client,
        )


class TestOpenAIResponsesReasoningConformance(TestOpenAIResponsesConformance):
    """A reasoning model: encrypted reasoning items go back with the tool results."""

    chat_model = "o4-mini"


class TestAnthropicConformance(_OnSessionSimulator):
    chat_model = "claude-haiku-4-5"
    catalog_model = "claude-sonnet-4-5"

    def make_provider(
        self, base_url: str, *, api_key: str | None, http_client: httpx.AsyncClient
    ) -> Provider:
        return AnthropicProvider(settings=_settings(base_url, api_key), environ={}, http_client=http_client)


class TestGeminiConformance(_OnSessionSimulator):
    chat_model = "gemini-2.5-flash"
    embed_model = "text-embedding-004"
    # Google answers an exhausted quota with the same 429 RESOURCE_EXHAUSTED as a per-minute limit.
    quota_error = RateLimited

    def make_provider(
        self, base_url: str, *, api_key: str | None, http_client: httpx.AsyncClient
    ) -> Provider:
        return GeminiProvider(settings=_settings(base_url, api_key), environ={}, http_client=http_client)


class TestGemini3Conformance(TestGeminiConformance):
    """Gemini 3 signs its function calls and refuses a tool turn sent back without the signature."""

    chat_model = "gemini-3-pro-preview"


class TestAzureOpenAIConformance(_OnSessionSimulator):
    chat_model = "kf-chat-deployment"
    embed_model = "kf-embedding-deployment"

    def make_provider(
        self, base_url: str, *, api_key: str | None, http_client: httpx.AsyncClient
    ) -> Provider:
        return AzureOpenAIProvider(settings=_settings(base_url, api_key), environ={}, http_client=http_client)


class TestMistralConformance(_OnSessionSimulator):
    chat_model = "sim-mistral-small-latest"
    embed_model = "sim-mistral-embed"
    # Mistral puts usage in its last chunk unasked; the simulator's OpenAI wire, which serves Mistral
    # here, sends it only for stream_options.include_usage, which Mistral refuses and so is not sent.
    stream_reports_usage = False

    def make_provider(
        self, base_url: str, *, api_key: str | None, http_client: httpx.AsyncClient
    ) -> Provider:
        return MistralProvider(
            settings=_settings(f"{base_url}/v1", api_key), environ={}, http_client=http_client
        )


class TestOllamaConformance(_OnSessionSimulator):
    chat_model = "llama3.2"
    embed_model = "nomic-embed-text"
    quota_error = RateLimited  # a local server has no account to run out of; its 429 is a rate limit

    def make_provider(
        self, base_url: str, *, api_key: str | None, http_client: httpx.AsyncClient
    ) -> Provider:
        return OllamaProvider(settings=_settings(base_url, api_key), environ={}, http_client=http_client)


class TestBedrockConformance(_OnSessionSimulator):
    chat_model = "amazon.nova-lite-v1:0"
    embed_model = "amazon.titan-embed-text-v2:0"

    @pytest.fixture(autouse=True)
    def _s3(self, moto_s3: str) -> None:
        """Batch inference's input and output go through a real S3 stand-in, in a bucket of its own."""
        import boto3

        bucket = f"kf-conformance-{uuid.uuid4().hex[:8]}"
        boto3.client(
            "s3",
            endpoint_url=moto_s3,
            region_name="us-east-1",
            aws_access_key_id="k",
            aws_secret_access_key="s",
        ).create_bucket(Bucket=bucket)
        self.batch_options = {  # type: ignore[misc]
            "batch_bucket": bucket,
            "batch_role_arn": "arn:aws:iam::123456789012:role/kernelflow-batch",
            "s3_endpoint": moto_s3,
            "batch_min_records": "1",  # the kit's batch holds 3 items; Bedrock's default minimum is 100
        }

    def make_provider(
        self, base_url: str, *, api_key: str | None, http_client: httpx.AsyncClient
    ) -> Provider:
        environ = (
            {} if api_key is None else {"AWS_ACCESS_KEY_ID": api_key, "AWS_SECRET_ACCESS_KEY": "sim-secret"}
        )
        options = getattr(self, "batch_options", {})
        return BedrockProvider(
            settings=_settings(base_url, None, region="us-east-1", **options),
            environ=environ,
            http_client=http_client,
        )


def _preset_suite(cls: type[Provider]) -> type[ProviderConformance]:
    def make_provider(
        self: ProviderConformance, base_url: str, *, api_key: str | None, http_client: httpx.AsyncClient
    ) -> Provider:
        return cls(settings=_settings(f"{base_url}/v1", api_key), environ={}, http_client=http_client)  # type: ignore[call-arg]

    stream_usage = bool(getattr(cls, "stream_usage", True))
    title = "".join(part.capitalize() for part in re.split(r"[-_]", cls.name))
    return type(
        f"Test{title}PresetConformance",
        (_OnSessionSimulator,),
        {
            "chat_model": "sim-preset-chat",
            "embed_model": "sim-preset-embed",
            "stream_reports_usage": stream_usage,
            "make_provider": make_provider,
            "__module__": __name__,
        },
    )


for _preset in builtin_presets():
    _suite = _preset_suite(_preset)
    globals()[_suite.__name__] = _suite
del _preset, _suite

"""Azure OpenAI: OpenAI's wire format behind per-deployment URLs, ``api-key`` auth and content filters.

Connection: ``{endpoint}/openai/deployments/{deployment}/chat/completions?api-version=...`` where the
kernel's model string is the deployment name. Credentials come from the settings first (``api_key`` →
``api-key`` header, ``options.azure_ad_token`` → bearer token), then the environment, where (as in the
official SDK) ``AZURE_OPENAI_AD_TOKEN`` is preferred over ``AZURE_OPENAI_API_KEY``.

Mapping: OpenAI's, plus Azure's content filter, which refuses either with a 400 whose ``code`` is
``content_filter`` or with a 200 whose choice finished with ``content_filter``; both become
``ContentFiltered`` naming the categories that tripped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, ClassVar
from urllib.parse import quote

import httpx

from kernel.catalog import ModelFacts, default_catalog
from kernel.contracts import ChatRequest, ChatResponse, StreamDone, StreamEvent
from kernel.errors import (
    ConfigurationError,
    ContentFiltered,
    MissingCredentials,
    ProviderError,
    error_from_status,
)
from kernel.provider import Capabilities, ProviderSettings
from providers.openai import OpenAIProvider

__all__ = ["DEFAULT_API_VERSION", "AzureOpenAIProvider"]

DEFAULT_API_VERSION = "2024-10-21"
"""The newest generally available dated version of Azure OpenAI's data-plane inference API."""

_ENDPOINT_ENV = "AZURE_OPENAI_ENDPOINT"
_API_VERSION_ENV = "AZURE_OPENAI_API_VERSION"
_AD_TOKEN_ENV = "AZURE_OPENAI_AD_TOKEN"
_OPTIONS = frozenset({"api_version", "azure_ad_token", "deployments"})


class AzureOpenAIProvider(OpenAIProvider):
    name = "azure_openai"
    version = "1.0.0"
    kernel_api = (1, 1)
    description = (
        "Azure OpenAI deployments (chat completions and embeddings; the model is the deployment name)"
    )
    capabilities = Capabilities(embeddings=True, vision=True, json_schema_mode="native")
    api_key_env: ClassVar[str | None] = "AZURE_OPENAI_API_KEY"
    base_url_env: ClassVar[str | None] = _ENDPOINT_ENV
    default_base_url: ClassVar[str | None] = None
    unsupported_options: ClassVar[frozenset[str]] = frozenset(
        {"reasoning_effort", "thinking_budget", "service_tier", "cache"}
    )

    def __init__(
        self,
        *,
        settings: ProviderSettings | None = None,
        environ: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(settings=settings, environ=environ, http_client=http_client)
        unknown = sorted(set(self.settings.options) - _OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"provider {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {', '.join(sorted(_OPTIONS))}"
            )
        deployments = self.settings.options.get("deployments", {})
        if not isinstance(deployments, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in deployments.items()
        ):
            raise ConfigurationError(
                f"provider {self.name!r}: options.deployments must map deployment names to the OpenAI model "
                f"each one serves (e.g. {{prod-chat: gpt-4o}}), got {deployments!r}"
            )
        self.deployments: dict[str, str] = dict(deployments)

    def model_facts(self, model: str) -> ModelFacts | None:
        """A deployment is checked as the OpenAI model that ``options.deployments`` says it serves;
        deployments not listed there pass through unchecked."""
        base = self.deployments.get(model)
        return default_catalog().lookup("openai", base) if base else None

    # --- connection ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        endpoint = self.settings.base_url or self._environ.get(_ENDPOINT_ENV)
        if not endpoint:
            raise ConfigurationError(
                f"provider {self.name!r} has no endpoint: set the environment variable {_ENDPOINT_ENV} "
                "on the worker (for example https://myresource.openai.azure.com) or base_url in the "
                "provider settings"
            )
        return endpoint.rstrip("/").removesuffix("/openai")

    @property
    def api_version(self) -> str:
        configured = self.settings.options.get("api_version") or self._environ.get(_API_VERSION_ENV)
        return str(configured or DEFAULT_API_VERSION)

    def has_credentials(self) -> bool:
        return self._credential() is not None

    def _credential(self) -> tuple[str, str] | None:
        """(header, value) from the settings, then the environment; ``None`` when there is none."""
        if self.settings.api_key:
            return "api-key", self.settings.api_key
        token = self.settings.options.get("azure_ad_token")
        if token:
            return "Authorization", f"Bearer {token}"
        if self._environ.get(_AD_TOKEN_ENV):
            return "Authorization", f"Bearer {self._environ[_AD_TOKEN_ENV]}"
        if self.api_key_env and self._environ.get(self.api_key_env):
            return "api-key", self._environ[self.api_key_env]
        return None

    def _auth_headers(self) -> dict[str, str]:
        credential = self._credential()
        if credential is None:
            raise MissingCredentials(
                f"provider {self.name!r} has no credentials: set the environment variable "
                f"{self.api_key_env} (or {_AD_TOKEN_ENV} for a Microsoft Entra ID token) on the worker, "
                "or api_key (or options.azure_ad_token) in the provider settings",
                provider=self.name,
                env_var=self.api_key_env,
            )
        header, value = credential
        return {header: value}

    def _deployment_url(self, path: str, deployment: str | None) -> str:
        if not deployment:
            raise ConfigurationError(f"provider {self.name!r} needs a deployment name as the model")
        return (
            f"{self.base_url}/openai/deployments/{quote(deployment, safe='')}{path}"
            f"?api-version={quote(self.api_version, safe='')}"
        )

    async def _post_json(
        self,
        path: str,
        payload: Mapping[str, Any],
        *,
        model: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        url = self._deployment_url(path, model)
        return await super()._post_json(url, payload, model=model, headers=headers)

    @asynccontextmanager
    async def _open_stream(
        self,
        path: str,
        payload: Mapping[str, Any],
        *,
        model: str | None,
        headers: Mapping[str, str] | None = None,
        method: str = "POST",
    ) -> AsyncIterator[httpx.Response]:
        url = self._deployment_url(path, model)
        async with super()._open_stream(
            url, payload, model=model, headers=headers, method=method
        ) as response:
            yield response

    # --- mapping ---------------------------------------------------------------------------------

    def _error_details(self, body: Any, text: str) -> tuple[str, str | None]:
        message, code = super()._error_details(body, text)
        error = body.get("error") if isinstance(body, dict) else None
        inner = error.get("innererror") if isinstance(error, dict) else None
        if isinstance(inner, dict):
            categories = _filtered_categories(inner.get("content_filter_result"))
            if categories:
                message = f"{message} (filtered: {categories})"
        return message, code

    def _map_request(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        payload = super()._map_request(request, stream=stream)
        for message in payload["messages"]:
            if message.get("role") == "developer":
                message["role"] = "system"  # the GA api-version predates the developer role
        return payload

    def _parse_response(self, data: Any, model: str) -> ChatResponse:
        if isinstance(data, dict):
            for choice in data.get("choices") or []:
                if isinstance(choice, dict) and choice.get("finish_reason") == "content_filter":
                    raise self._filtered(model, choice.get("content_filter_results"))
        return super()._parse_response(data, model)

    async def _stream_events(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        # Closed explicitly: a consumer that stops early must release the HTTP connection at once.
        events = super()._stream_events(request)
        try:
            async for event in events:
                if isinstance(event, StreamDone) and event.finish_reason == "content_filter":
                    raise self._filtered(request.model, None)
                yield event
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()

    def _stream_error(self, chunk: Mapping[str, Any], text: str, model: str) -> ProviderError:
        message, code = self._error_details(chunk, text)
        if code == "content_filter":
            return error_from_status(400, message, provider=self.name, model=model, code=code)
        return super()._stream_error(chunk, text, model)

    def _filtered(self, model: str, results: Any) -> ContentFiltered:
        categories = _filtered_categories(results)
        detail = f" (filtered: {categories})" if categories else ""
        return ContentFiltered(
            f"{self.name} deployment {model!r}: Azure's content filter withheld the answer{detail}",
            provider=self.name,
            model=model,
            code="content_filter",
        )


def _filtered_categories(results: Any) -> str:
    """``hate/medium, violence/high`` from a ``content_filter_result(s)`` object."""
    if not isinstance(results, dict):
        return ""
    found = []
    for category, verdict in results.items():
        if isinstance(verdict, dict) and verdict.get("filtered"):
            severity = verdict.get("severity")
            found.append(f"{category}/{severity}" if severity else str(category))
    return ", ".join(found)

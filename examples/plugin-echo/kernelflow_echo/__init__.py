"""``echo``: a Kernelflow provider for a small in-house LLM gateway.

The gateway takes ``POST {base_url}/house/v1/generate`` with an ``x-house-key`` header and
``{"model", "prompt", "system"?, "max_tokens"?, "stream"?}``; it answers
``{"id", "model", "output", "stop", "tokens_in", "tokens_out"}``, or NDJSON lines ``{"delta"}`` then
``{"done": true, ...}`` when streaming, and ``{"error": {"kind", "detail"}}`` on failure.
It has no tools, JSON schemas, images or embeddings, and the capabilities below say so: the kernel
refuses such requests before any network call.

The plugin depends on Kernelflow's public kernel only (``kernel.contracts``, ``kernel.errors``,
``kernel.provider``) and on httpx.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import httpx

from kernel.contracts import (
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    Choice,
    FinishReason,
    StreamDone,
    StreamError,
    StreamEvent,
    StreamStart,
    SystemMessage,
    TextDelta,
    Usage,
    UserMessage,
    message_text,
)
from kernel.errors import (
    ConnectionFailed,
    InvalidRequest,
    MalformedResponse,
    ProviderError,
    StreamInterrupted,
    UpstreamTimeout,
    error_from_status,
)
from kernel.provider import Capabilities, Provider, ProviderSettings

__all__ = ["EchoProvider"]

_FINISH_REASONS: dict[str, FinishReason] = {"end": "stop", "limit": "length"}
_GENERATE_PATH = "/house/v1/generate"


class EchoProvider(Provider):
    name = "echo"
    version = "0.1.0"
    kernel_api = (1, 1)
    description = "In-house LLM gateway (example plugin kernelflow-plugin-echo); chat and streaming only"
    capabilities = Capabilities(
        chat=True, stream=True, tools=False, json_schema=False, json_schema_mode="none", embeddings=False
    )
    api_key_env: ClassVar[str | None] = "ECHO_API_KEY"
    base_url_env: ClassVar[str] = "ECHO_BASE_URL"
    default_base_url: ClassVar[str | None] = "http://127.0.0.1:8090"

    def __init__(
        self,
        *,
        settings: ProviderSettings | None = None,
        environ: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(settings=settings, environ=environ)
        self._client = http_client
        self._owns_client = http_client is None

    # --- connection ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if not self.settings.base_url and self._environ.get(self.base_url_env):
            return self._environ[self.base_url_env].rstrip("/")
        return super().base_url

    @property
    def client(self) -> httpx.AsyncClient:
        # httpx never retries on its own; Temporal owns retries, so nothing here adds any.
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.settings.timeout, connect=self.settings.connect_timeout),
                headers=self.settings.headers,
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._owns_client:
            await self._client.aclose()
        self._client = None

    def _request(self, payload: dict[str, Any]) -> httpx.Request:
        headers = {"x-house-key": self.api_key()}  # MissingCredentials before anything is sent
        return self.client.build_request(
            "POST", f"{self.base_url}{_GENERATE_PATH}", json=payload, headers=headers
        )

    async def _send(self, payload: dict[str, Any], model: str, *, stream: bool) -> httpx.Response:
        request = self._request(payload)
        try:
            response = await self.client.send(request, stream=stream)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(
                f"{self.name} did not answer in time", provider=self.name, model=model
            ) from exc
        except httpx.HTTPError as exc:
            raise ConnectionFailed(
                f"cannot reach {self.name} at {self.base_url}: {type(exc).__name__}",
                provider=self.name,
                model=model,
            ) from exc
        if response.status_code >= 400:
            text = (await response.aread()).decode("utf-8", "replace")
            await response.aclose()
            raise self._status_error(response, text, model)
        return response

    def _status_error(self, response: httpx.Response, text: str, model: str) -> ProviderError:
        try:
            error = json.loads(text).get("error") or {}
        except (ValueError, AttributeError):
            error = {}
        kind = error.get("kind") if isinstance(error, dict) else None
        detail = error.get("detail") if isinstance(error, dict) else None
        return error_from_status(
            response.status_code,
            str(detail or text[:300] or "(empty body)"),
            provider=self.name,
            model=model,
            code=str(kind) if kind else None,
            headers=response.headers,
            body=text[:2000],
        )

    # --- calls -----------------------------------------------------------------------------------

    async def chat(self, request: ChatRequest) -> ChatResponse:
        self.check_chat(request)
        payload = self._map_request(request, stream=False)
        response = await self._send(payload, request.model, stream=False)
        try:
            return self._parse_response(response.json(), request.model)
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedResponse(
                f"{self.name} answered with an unexpected body ({type(exc).__name__}: {exc})",
                provider=self.name,
                model=request.model,
            ) from exc

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        self.check_chat(request, stream=True)
        return self._stream_events(request, self._map_request(request, stream=True))

    async def _stream_events(
        self, request: ChatRequest, payload: dict[str, Any]
    ) -> AsyncIterator[StreamEvent]:
        """Failures before the first event raise; after it they end the stream as ``StreamError``."""
        response = await self._send(payload, request.model, stream=True)
        started = False
        try:
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                chunk = json.loads(line)
                if not started:
                    started = True
                    yield StreamStart(id=f"echo-{id(response):x}", model=request.model, provider=self.name)
                if chunk.get("done"):
                    yield StreamDone(
                        finish_reason=_FINISH_REASONS.get(chunk.get("stop"), "stop"), usage=_usage(chunk)
                    )
                    return
                if chunk.get("delta"):
                    yield TextDelta(text=str(chunk["delta"]))
            error: ProviderError = StreamInterrupted(
                f"{self.name} stream ended without its final line", provider=self.name, model=request.model
            )
        except httpx.HTTPError as exc:
            error = StreamInterrupted(
                f"{self.name} stream broke off: {type(exc).__name__}", provider=self.name, model=request.model
            )
        except (ValueError, AttributeError) as exc:
            error = MalformedResponse(
                f"{self.name} sent a malformed stream line: {exc}", provider=self.name, model=request.model
            )
        finally:
            await response.aclose()  # at once, also when the consumer stops early
        if not started:
            raise error
        yield StreamError(error_type=type(error).__name__, message=str(error), retryable=error.retryable)

    # --- mapping ---------------------------------------------------------------------------------

    def _map_request(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        """The gateway takes one prompt: system text goes to ``system``, the conversation to ``prompt``
        (a single user turn as is, several turns as a transcript)."""
        system = "\n".join(message_text(m) for m in request.messages if isinstance(m, SystemMessage))
        turns = [m for m in request.messages if not isinstance(m, SystemMessage)]
        if any(m.role == "tool" for m in turns):
            raise InvalidRequest(
                f"provider {self.name!r} has no tools, so a conversation may not hold tool messages",
                provider=self.name,
                model=request.model,
            )
        if len(turns) == 1 and isinstance(turns[0], UserMessage):
            prompt = message_text(turns[0])
        else:
            prompt = "\n".join(f"{m.role.capitalize()}: {message_text(m)}" for m in turns)
        payload: dict[str, Any] = {"model": request.model, "prompt": prompt, "stream": stream}
        if system:
            payload["system"] = system
        if request.max_tokens is not None:
            payload["max_tokens"] = request.max_tokens
        return payload

    def _parse_response(self, data: Any, model: str) -> ChatResponse:
        output = data["output"]
        if not isinstance(output, str):
            raise TypeError(f"'output' is {type(output).__name__}, not a string")
        return ChatResponse(
            id=str(data.get("id") or ""),
            model=str(data.get("model") or model),
            provider=self.name,
            choices=[
                Choice(
                    message=AssistantMessage(content=output),
                    finish_reason=_FINISH_REASONS.get(data.get("stop"), "stop"),
                )
            ],
            usage=_usage(data),
        )


def _usage(data: Mapping[str, Any]) -> Usage:
    return Usage(
        prompt_tokens=int(data.get("tokens_in") or 0), completion_tokens=int(data.get("tokens_out") or 0)
    )

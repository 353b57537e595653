"""``echo``: a Kernelflow provider for a small in-house LLM gateway.

The gateway takes ``POST {base_url}/house/v1/generate`` with an ``x-house-key`` header and
``{"model", "prompt", "system"?, "max_tokens"?, "stream"?}``; it answers
``{"id", "model", "output", "stop", "tokens_in", "tokens_out"}``, or NDJSON lines ``{"delta"}`` then
``{"done": true, ...}`` when streaming, and ``{"error": {"kind", "detail"}}`` on failure.
It has no tools, JSON schemas, images or embeddings, and the capabilities below say so: the kernel
refuses such requests before any network call.

The plugin depends only on Kernelflow's public facade (``import kernelflow``): it subclasses
``kernelflow.HttpProvider``, which owns the connection (base URL, the pooled httpx client, errors
by status, streams that fail cleanly), and writes only the mapping.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

from kernelflow import (
    AssistantMessage,
    Capabilities,
    ChatRequest,
    ChatResponse,
    Choice,
    FinishReason,
    HttpProvider,
    InvalidRequest,
    MalformedResponse,
    StreamDone,
    StreamEvent,
    StreamStart,
    SystemMessage,
    TextDelta,
    Usage,
    UserMessage,
    message_text,
)

__all__ = ["EchoProvider"]

_FINISH_REASONS: dict[str, FinishReason] = {"end": "stop", "limit": "length"}
_GENERATE_PATH = "/house/v1/generate"


class EchoProvider(HttpProvider):
    name = "echo"
    version = "0.1.0"
    kernel_api = (1, 1)
    description = "In-house LLM gateway (example plugin kernelflow-plugin-echo); chat and streaming only"
    capabilities = Capabilities(
        chat=True, stream=True, tools=False, json_schema=False, json_schema_mode="none", embeddings=False
    )
    api_key_env: ClassVar[str | None] = "ECHO_API_KEY"
    base_url_env: ClassVar[str | None] = "ECHO_BASE_URL"
    default_base_url: ClassVar[str | None] = "http://127.0.0.1:8090"

    # --- connection: what differs from HttpProvider's defaults ------------------------------------

    def _auth_headers(self) -> dict[str, str]:
        return {"x-house-key": self.api_key()}  # MissingCredentials before anything is sent

    def _error_details(self, body: Any, text: str) -> tuple[str, str | None]:
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            kind = error.get("kind")
            return str(error.get("detail") or text[:300]), str(kind) if kind else None
        return text[:300] or "(empty body)", None

    # --- calls -----------------------------------------------------------------------------------

    async def chat(self, request: ChatRequest) -> ChatResponse:
        self.check_chat(request)
        data = await self._post_json(
            _GENERATE_PATH, self._map_request(request, stream=False), model=request.model
        )
        return self._parse_response(data, request.model)

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        self.check_chat(request, stream=True)
        payload = self._map_request(request, stream=True)
        return self._guard_stream(self._stream_events(request, payload), model=request.model)

    async def _stream_events(
        self, request: ChatRequest, payload: dict[str, Any]
    ) -> AsyncIterator[StreamEvent]:
        """NDJSON lines: ``{"delta"}`` … then ``{"done": true, …}``. A stream that ends before its final
        line, breaks off, or sends a malformed line is turned into the right error by ``_guard_stream``."""
        async with self._open_stream(_GENERATE_PATH, payload, model=request.model) as response:
            started = False
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
        output = data.get("output") if isinstance(data, dict) else None
        if not isinstance(output, str):
            raise MalformedResponse(
                f"{self.name} answered without a text 'output' ({type(output).__name__})",
                provider=self.name,
                model=model,
            )
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

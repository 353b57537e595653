"""Mistral's chat completions and embeddings (``api.mistral.ai/v1``).

The wire is OpenAI's with a handful of differences, and only those are code here:
``random_seed`` for ``seed``; ``tool_choice`` ``any`` for ``required``; tool call ids of exactly nine
letters or digits (ids from other providers are rewritten consistently in the history); no ``user``,
no message ``name`` outside tool messages (``user`` is refused before the call) and no ``stream_options`` (the last chunk carries usage
anyway); ``model_length`` and ``error`` finish reasons; message content that may be a list of chunks
(text and, for reasoning models, thinking); ``output_dimension`` for embedding dimensions; and 422
validation errors whose ``message`` is an object.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from kernel.contracts import (
    ChatRequest,
    ChatResponse,
    FinishReason,
)
from kernel.errors import InvalidRequest
from kernel.provider import Capabilities
from providers.openai import OpenAIProvider

__all__ = ["MistralProvider", "mistral_tool_call_id"]

_FINISH_REASONS: dict[str | None, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "model_length": "length",
    "tool_calls": "tool_calls",
    "error": "error",
    None: "stop",
}
_TOOL_CHOICES = {"required": "any"}
_SERVICE_TIERS = {"auto": "auto", "default": "standard_only"}
_TOOL_CALL_ID = re.compile(r"^[A-Za-z0-9]{9}$")
_ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def mistral_tool_call_id(call_id: str) -> str:
    """``call_id`` itself when Mistral accepts it, else a stable nine-character id derived from it,
    so an assistant's tool call and the tool result that answers it still match."""
    if _TOOL_CALL_ID.match(call_id):
        return call_id
    number = int.from_bytes(hashlib.blake2b(call_id.encode(), digest_size=8).digest(), "big")
    chars = []
    for _ in range(9):
        number, digit = divmod(number, len(_ID_ALPHABET))
        chars.append(_ID_ALPHABET[digit])
    return "".join(chars)


class MistralProvider(OpenAIProvider):
    name = "mistral"
    version = "1.0.0"
    kernel_api = (1, 1)
    description = "Mistral AI chat completions and embeddings (api.mistral.ai)"
    capabilities = Capabilities(embeddings=True, vision=True, json_schema_mode="native")
    api_key_env: ClassVar[str | None] = "MISTRAL_API_KEY"
    base_url_env: ClassVar[str | None] = None
    default_base_url: ClassVar[str | None] = "https://api.mistral.ai/v1"
    stream_usage: ClassVar[bool] = False
    finish_reasons: ClassVar[Mapping[str | None, FinishReason]] = _FINISH_REASONS
    dimensions_field: ClassVar[str] = "output_dimension"
    unsupported_options: ClassVar[frozenset[str]] = frozenset({"user", "thinking_budget"})
    option_ranges: ClassVar[Mapping[str, tuple[float | None, float | None]]] = {
        "temperature": (0, 1.5),
        "seed": (0, None),
    }
    """From Mistral's API reference: temperature 0 to 1.5, random_seed a non-negative integer."""
    provider_option_names: ClassVar[frozenset[str]] = frozenset(
        {"safe_prompt", "prediction", "prompt_mode", "n"}
    )

    # --- mapping ---------------------------------------------------------------------------------

    def _map_request(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        payload = super()._map_request(request, stream=stream)
        if "max_completion_tokens" in payload:
            payload["max_tokens"] = payload.pop("max_completion_tokens")
        if "seed" in payload:
            payload["random_seed"] = payload.pop("seed")
        if request.service_tier is not None:
            tier = _SERVICE_TIERS.get(request.service_tier)
            if tier is None:
                raise InvalidRequest(
                    f"service_tier={request.service_tier!r}: {self.name} offers auto and default "
                    "(standard_only) only",
                    provider=self.name,
                    model=request.model,
                )
            payload["service_tier"] = tier
        choice = payload.get("tool_choice")
        if isinstance(choice, str):
            payload["tool_choice"] = _TOOL_CHOICES.get(choice, choice)
        for message in payload["messages"]:
            if message.get("role") == "developer":
                message["role"] = "system"  # Mistral has no developer role
            if message.get("role") != "tool":
                message.pop("name", None)
            for call in message.get("tool_calls") or []:
                call["id"] = mistral_tool_call_id(call["id"])
            if "tool_call_id" in message:
                message["tool_call_id"] = mistral_tool_call_id(message["tool_call_id"])
        return payload

    def _parse_response(self, data: Any, model: str) -> ChatResponse:
        if isinstance(data, dict) and isinstance(data.get("choices"), list):
            for choice in data["choices"]:
                message = choice.get("message") if isinstance(choice, dict) else None
                if isinstance(message, dict):
                    if isinstance(message.get("content"), list):
                        message["content"] = _chunks_text(message["content"]) or None
                    for call in message.get("tool_calls") or []:
                        function = call.get("function") if isinstance(call, dict) else None
                        if isinstance(function, dict):
                            function["arguments"] = self._call_arguments(function.get("arguments"))
        return super()._parse_response(data, model)

    def _delta_text(self, content: Any) -> str:
        return _chunks_text(content) if isinstance(content, list) else super()._delta_text(content)

    def _error_details(self, body: Any, text: str) -> tuple[str, str | None]:
        if isinstance(body, dict) and isinstance(body.get("message"), dict | list):
            code = body.get("code") or body.get("type")
            return _validation_message(body["message"]), None if code is None else str(code)
        return super()._error_details(body, text)


def _chunks_text(chunks: list[Any]) -> str:
    """The text of a list of content chunks; thinking chunks are not part of the answer."""
    return "".join(
        str(chunk.get("text") or "")
        for chunk in chunks
        if isinstance(chunk, dict) and chunk.get("type") == "text"
    )


def _validation_message(message: Any) -> str:
    detail = message.get("detail") if isinstance(message, dict) else message
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                location = ".".join(str(p) for p in item.get("loc") or [] if p != "body")
                parts.append(f"{location}: {item.get('msg')}" if location else str(item.get("msg")))
        if parts:
            return "; ".join(parts)
    return json.dumps(message)[:300]

"""OpenAI-compatible services as data: a preset names a base URL, a key variable and declared quirks.

``presets.yaml`` beside this module lists the built-in ones; a worker's config file may add its own
under ``presets:``. Each preset becomes a subclass of ``PresetProvider`` (itself an
``OpenAIProvider``) whose class attributes come from the data, so no service has hand-written code.
``builtin_presets`` is published through the ``kernelflow.providers`` entry-point group.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kernel.catalog import REQUEST_OPTIONS
from kernel.contracts import ChatRequest, Usage
from kernel.errors import ConfigurationError
from kernel.provider import Capabilities, Provider
from providers._http import as_int
from providers.openai import OpenAIProvider

__all__ = [
    "PresetProvider",
    "PresetSpec",
    "builtin_presets",
    "load_builtin_specs",
    "preset_class",
    "user_presets",
]

_NAME = r"^[a-z][a-z0-9_-]{0,63}$"


class PresetSpec(BaseModel):
    """One OpenAI-compatible service. Unknown fields are refused, so a typo names itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME, description="Provider name, the part before '/' in model strings.")
    description: str = ""
    base_url: str = Field(description="Base URL ending before '/chat/completions', e.g. .../v1.")
    base_url_env: str | None = Field(default=None, description="Environment variable overriding base_url.")
    api_key_env: str | None = Field(description="Key variable; null for local servers that take no key.")
    stream_usage: bool = Field(default=True, description="false where stream_options is refused.")
    max_tokens_field: Literal["max_tokens", "max_completion_tokens", "auto"] = Field(
        default="max_tokens", description="Field the token limit is sent in; auto follows OpenAI's models."
    )
    json_schema: Literal["native", "none"] = Field(default="native", description="Structured output.")
    tools: bool = True
    vision: bool = False
    embeddings: bool = False
    message_names: bool = Field(default=True, description="false where messages[].name is refused.")
    usage_cached_tokens: str | None = Field(
        default=None, description="Usage key counting cached prompt tokens, if not OpenAI's own."
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers on every request.")
    unsupported: list[str] = Field(
        default_factory=lambda: ["reasoning_effort", "thinking_budget", "service_tier", "cache"],
        description="Request options the service cannot honour: refused, or dropped in lenient mode.",
    )
    provider_options: list[str] = Field(
        default_factory=list, description="Fields accepted under provider_options.<name> (vendor extras)."
    )

    @field_validator("unsupported")
    @classmethod
    def _known_options(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(REQUEST_OPTIONS))
        if unknown:
            raise ValueError(f"{', '.join(unknown)} is not a request option ({', '.join(REQUEST_OPTIONS)})")
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")

    def capabilities(self) -> Capabilities:
        native = self.json_schema == "native"
        return Capabilities(
            tools=self.tools,
            vision=self.vision,
            embeddings=self.embeddings,
            json_schema=native,
            json_schema_mode="native" if native else "none",
        )


class PresetProvider(OpenAIProvider):
    """OpenAI's mapping with a preset's quirks applied; subclasses carry the preset as class data."""

    name = "openai_compatible"
    version = "1.0.0"
    base_url_env: ClassVar[str | None] = None
    preset: ClassVar[PresetSpec | None] = None
    max_tokens_field: ClassVar[str] = "max_tokens"
    message_names: ClassVar[bool] = True
    usage_cached_tokens: ClassVar[str | None] = None
    extra_headers: ClassVar[Mapping[str, str]] = {}

    def _auth_headers(self) -> dict[str, str]:
        configured = {name.lower() for name in self.settings.headers}
        headers = {k: v for k, v in self.extra_headers.items() if k.lower() not in configured}
        if self.api_key_env is None and not self.settings.api_key:
            return headers  # a local server that takes no key: send no Authorization header
        headers["Authorization"] = f"Bearer {self.api_key()}"
        return headers

    def _map_request(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        payload = super()._map_request(request, stream=stream)
        if self.max_tokens_field != "auto":
            limit = payload.pop("max_completion_tokens", None)
            limit = payload.pop("max_tokens", limit)
            if limit is not None:
                payload[self.max_tokens_field] = limit
        if not self.message_names:
            for message in payload["messages"]:
                message.pop("name", None)
        return payload

    def _map_usage(self, usage: Any) -> Usage:
        mapped = super()._map_usage(usage)
        key = self.usage_cached_tokens
        if key and isinstance(usage, dict) and usage.get(key) is not None:
            mapped.cached_tokens = as_int(usage[key], f"usage.{key}")
        return mapped


def preset_class(spec: PresetSpec, *, source: str = "built-in") -> type[Provider]:
    """A ``PresetProvider`` subclass whose class attributes come from ``spec``."""
    class_name = "".join(part.capitalize() for part in re.split(r"[-_]", spec.name)) + "PresetProvider"
    attributes: dict[str, Any] = {
        "__module__": __name__,
        "__qualname__": class_name,
        "__doc__": f"{spec.description or spec.name} ({source} preset).",
        "name": spec.name,
        "description": spec.description or f"OpenAI-compatible service {spec.name!r}",
        "preset": spec,
        "capabilities": spec.capabilities(),
        "api_key_env": spec.api_key_env,
        "base_url_env": spec.base_url_env,
        "default_base_url": spec.base_url,
        "stream_usage": spec.stream_usage,
        "max_tokens_field": spec.max_tokens_field,
        "message_names": spec.message_names,
        "usage_cached_tokens": spec.usage_cached_tokens,
        "extra_headers": dict(spec.headers),
        "unsupported_options": frozenset(spec.unsupported),
        "provider_option_names": frozenset(spec.provider_options),
    }
    return type(class_name, (PresetProvider,), attributes)


@cache
def load_builtin_specs() -> tuple[PresetSpec, ...]:
    text = resources.files(__package__ or "providers").joinpath("presets.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    if not isinstance(raw, list):
        raise ConfigurationError("providers/presets.yaml must be a list of presets")
    return tuple(_spec(entry, where=f"built-in preset #{index + 1}") for index, entry in enumerate(raw))


def builtin_presets() -> list[type[Provider]]:
    """One provider class per built-in preset (the entry point ``presets`` names this)."""
    return [preset_class(spec) for spec in load_builtin_specs()]


def user_presets(config: Mapping[str, Any]) -> list[type[Provider]]:
    """Provider classes for the ``presets:`` section of a worker's config file: a mapping of preset
    name to its fields. A wrong field or value raises ``ConfigurationError`` naming it."""
    if not isinstance(config, Mapping):
        raise ConfigurationError(
            f"presets must be a mapping of preset name to its fields, got {type(config).__name__}"
        )
    classes: list[type[Provider]] = []
    for name, fields in config.items():
        where = f"presets.{name}"
        if not isinstance(fields, Mapping):
            raise ConfigurationError(f"{where} must be a mapping of fields, got {type(fields).__name__}")
        if "name" in fields and fields["name"] != name:
            raise ConfigurationError(f"{where}.name is {fields['name']!r}; leave it out or make it {name!r}")
        classes.append(preset_class(_spec({**fields, "name": name}, where=where), source="user"))
    return classes


def _spec(entry: Any, *, where: str) -> PresetSpec:
    if not isinstance(entry, Mapping):
        raise ConfigurationError(f"{where} must be a mapping of fields, got {type(entry).__name__}")
    try:
        return PresetSpec.model_validate(dict(entry))
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            if error["type"] == "extra_forbidden":
                allowed = ", ".join(PresetSpec.model_fields)
                problems.append(f"{where}.{field}: unknown field (allowed: {allowed})")
            elif error["type"] == "missing":
                problems.append(f"{where}.{field}: required field missing")
            else:
                problems.append(f"{where}.{field}: {error['msg']} (got {error.get('input')!r})")
        raise ConfigurationError("; ".join(problems)) from exc

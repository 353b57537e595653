"""Models each simulated vendor knows, so an unknown name fails the way the real cloud fails.

Each wire module looks its vendor up in `KNOWN_MODELS`; a vendor's list is filled in alongside
its wire module. Any name starting with `sim-` is known to every vendor, and a known name
followed by a dated snapshot suffix (`gpt-4o-2024-08-06`) is known too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["KNOWN_MODELS", "SIM_MODEL_PREFIX", "is_known_model", "models_for"]

SIM_MODEL_PREFIX = "sim-"


class _AnyName(frozenset[str]):
    """Contains every name (and lists none): for vendors whose model names are user-chosen."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str)


KNOWN_MODELS: dict[str, frozenset[str]] = {
    "openai": frozenset(
        {
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-4.1-mini",
            "gpt-4.1-nano",
            "gpt-5",
            "gpt-5-mini",
            "o3",
            "o4-mini",
            "text-embedding-3-small",
            "text-embedding-3-large",
        }
    ),
    # Filled in together with simulator/anthropic_wire.py, gemini_wire.py and ollama_wire.py.
    # Anthropic dates its snapshots without dashes (`-20250929`), so they are listed by name.
    "anthropic": frozenset(
        {
            "claude-opus-4-1",
            "claude-opus-4-1-20250805",
            "claude-sonnet-4-5",
            "claude-sonnet-4-5-20250929",
            "claude-sonnet-4",
            "claude-sonnet-4-0",
            "claude-sonnet-4-20250514",
            "claude-haiku-4-5",
            "claude-haiku-4-5-20251001",
            "claude-3-5-haiku-latest",
            "claude-3-5-haiku-20241022",
        }
    ),
    "gemini": frozenset(
        {
            "gemini-3-pro-preview",
            "gemini-3-flash-preview",
            "gemini-2.5-pro",
            "gemini-2.5-flash",
            "gemini-2.5-flash-lite",
            "gemini-2.0-flash",
            "text-embedding-004",
            "gemini-embedding-001",
        }
    ),
    "ollama": frozenset({"llama3.2", "llama3.1:8b", "qwen2.5", "mistral", "nomic-embed-text"}),
    "bedrock": frozenset(
        {
            "anthropic.claude-3-5-haiku-20241022-v1:0",
            "anthropic.claude-sonnet-4-5-20250929-v1:0",
            "amazon.nova-pro-v1:0",
            "amazon.nova-lite-v1:0",
            "amazon.titan-embed-text-v2:0",
        }
    ),
    # The in-house gateway of the example plugin (simulator/house_wire.py).
    "house": frozenset({"house-small", "house-large"}),
    # Azure deployments are named by their owner, so every deployment name is known.
    "azure_openai": _AnyName(),
}

_SNAPSHOT_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")


def is_known_model(vendor: str, model: str, extra: Iterable[str] = ()) -> bool:
    """Whether `vendor` serves `model`; `extra` adds names configured at start."""
    if model.startswith(SIM_MODEL_PREFIX):
        return True
    known = KNOWN_MODELS.get(vendor, frozenset())
    extra_names = frozenset(extra)
    base = _SNAPSHOT_SUFFIX.sub("", model)
    return model in known or model in extra_names or base in known or base in extra_names


def models_for(vendor: str, extra: Iterable[str] = ()) -> list[str]:
    """The sorted model names listed by a vendor's models endpoint."""
    return sorted(KNOWN_MODELS.get(vendor, frozenset()) | frozenset(extra))

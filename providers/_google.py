"""Google-specific pieces of the Gemini mapping: the OpenAPI-subset schema older models take, and
Google's error envelope (``{"error": {"code", "message", "status", "details"}}``) with its retry hint."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["LEGACY_SCHEMA_MODELS", "error_details", "google_error", "legacy_schema", "retry_delay"]

LEGACY_SCHEMA_MODELS = re.compile(r"^(models/)?gemini-(1\.0|1\.5|2\.0|pro\b)")
"""Models older than Gemini 2.5 accept only the OpenAPI-subset ``responseSchema``/``parameters``."""
_LEGACY_KEYWORDS = (
    "type format title description nullable enum items properties required minItems maxItems minProperties "
    "maxProperties minLength maxLength pattern minimum maximum anyOf propertyOrdering default example"
)
_LEGACY_SCHEMA_KEYS = frozenset(_LEGACY_KEYWORDS.split())
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


def legacy_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """JSON Schema -> the OpenAPI subset of ``responseSchema``: local ``$ref`` inlined, ``null``
    types turned into ``nullable``, ``const`` into a one-value enum, unknown keywords dropped."""
    return _convert(schema, schema, 0)


def _convert(schema: Mapping[str, Any], root: Mapping[str, Any], depth: int) -> dict[str, Any]:
    if depth > 16:
        return {"type": "OBJECT"}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        node: Any = root
        for key in ref[2:].split("/"):
            node = node.get(key, {}) if isinstance(node, Mapping) else {}
        return _convert(node, root, depth + 1)
    out: dict[str, Any] = {k: v for k, v in schema.items() if k in _LEGACY_SCHEMA_KEYS}
    if "const" in schema:
        out["enum"] = [schema["const"]]
    if "enum" in out and not all(isinstance(v, str) for v in out["enum"]):
        del out["enum"]
    kind = schema.get("type")
    if isinstance(kind, list):
        out["nullable"] = "null" in kind or None
        kind = next((k for k in kind if k != "null"), None)
    if isinstance(kind, str):
        out["type"] = kind.upper()
    if "enum" in out:
        out["type"] = "STRING"
    branches = [b for b in schema.get("anyOf") or schema.get("oneOf") or [] if isinstance(b, Mapping)]
    if branches:
        real = [b for b in branches if b.get("type") != "null"]
        if len(real) < len(branches):
            out["nullable"] = True
        out.pop("anyOf", None)
        if len(real) == 1:
            out.update(_convert(real[0], root, depth + 1))
        elif real:
            out["anyOf"] = [_convert(b, root, depth + 1) for b in real]
    if isinstance(schema.get("properties"), Mapping):
        out["properties"] = {k: _convert(v, root, depth + 1) for k, v in schema["properties"].items()}
        out["required"] = [k for k in schema.get("required") or [] if k in out["properties"]] or None
    if isinstance(schema.get("items"), Mapping):
        out["items"] = _convert(schema["items"], root, depth + 1)
    return {k: v for k, v in out.items() if v is not None}


def google_error(body: Any) -> dict[str, Any] | None:
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else None


def error_details(error: Mapping[str, Any]) -> list[dict[str, Any]]:
    details = error.get("details")
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def retry_delay(error: Mapping[str, Any]) -> float | None:
    """``google.rpc.RetryInfo.retryDelay`` (``"30s"``, ``"1.5s"``) from an error's details."""
    for detail in error_details(error):
        if str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None

"""Converse content blocks that need more than a rename: images and documents as bytes, prompt-cache
points, and Claude's reasoning blocks assembled from a stream."""

from __future__ import annotations

import re
from typing import Any

from kernel.contracts import ChatRequest, DocumentPart
from kernel.errors import InvalidRequest, UnsupportedCapability

__all__ = ["add_reasoning", "breakpoints", "cache_point", "document_block", "image_block"]

_IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}
_DOCUMENT_FORMATS = {
    "application/pdf": "pdf",
    "text/csv": "csv",
    "application/msword": "doc",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "application/vnd.ms-excel": "xls",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
    "text/html": "html",
    "text/plain": "txt",
    "text/markdown": "md",
}
_DOCUMENT_NAME = re.compile(r"[^A-Za-z0-9\-()\[\] ]+")


def cache_point(request: ChatRequest) -> dict[str, Any] | None:
    """The ``cachePoint`` placed after each breakpoint (a cache key needs no field: Bedrock caches by
    prefix)."""
    if request.cache is None or not request.cache.breakpoints:
        return None
    point: dict[str, Any] = {"type": "default"}
    if request.cache.ttl is not None:
        point["ttl"] = request.cache.ttl
    return point


def breakpoints(request: ChatRequest) -> set[int]:
    return set(request.cache.breakpoints) if request.cache is not None else set()


def add_reasoning(block: dict[str, Any], delta: dict[str, Any]) -> None:
    """Fold a streamed ``reasoningContent`` delta (text, signature or redacted bytes) into its block."""
    if "redactedContent" in delta:
        block["redactedContent"] = delta["redactedContent"]
        return
    text = block.setdefault("reasoningText", {})
    if "text" in delta:
        text["text"] = text.get("text", "") + str(delta["text"])
    if "signature" in delta:
        text["signature"] = str(delta["signature"])


def document_block(part: DocumentPart, position: int, where: str, model: str) -> dict[str, Any]:
    source = part.file
    fmt = _DOCUMENT_FORMATS.get(source.media_type)
    if source.file_data is None or fmt is None:
        raise UnsupportedCapability(
            f"{where}: bedrock takes documents as file_data of a known type "
            f"({', '.join(sorted(_DOCUMENT_FORMATS))}), not by url or file_id or as {source.media_type}",
            provider="bedrock",
            model=model,
        )
    stem = (source.filename or f"document {position + 1}").rsplit(".", 1)[0]
    name = " ".join(_DOCUMENT_NAME.sub(" ", stem).split()) or f"document {position + 1}"
    return {"format": fmt, "name": name, "source": {"bytes": source.file_data.split(",", 1)[1]}}


def image_block(url: str, where: str, model: str) -> dict[str, Any]:
    media_type, sep, data = url.partition(";base64,")
    image_format = _IMAGE_FORMATS.get(media_type.removeprefix("data:").lower()) if sep else None
    if not url.startswith("data:") or image_format is None:
        raise InvalidRequest(
            f"{where}: Bedrock takes images as base64 bytes, so an image_url must be a data: URL of a "
            f"png, jpeg, gif or webp image, not {url[:60]!r}",
            provider="bedrock",
            model=model,
        )
    return {"format": image_format, "source": {"bytes": data}}

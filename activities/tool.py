"""The ``http_tool`` activity: one HTTP call to an endpoint on the worker's allow-list.

The allow-list belongs to the worker (``KERNELFLOW_TOOL_ALLOWLIST``: comma-separated URL prefixes such
as ``https://crm.internal/api/``), never to the pipeline, so a pipeline spec cannot reach a host the
operator did not allow. A URL matches a prefix when scheme, host and port are equal and its path's
segments (in one canonical encoding) start with the prefix's; encoded dot segments and encoded slashes
are refused, since the server would decode them after the check. Refusals, 4xx answers and bad URLs are not retried; 5xx, 429 and connection
failures are (Temporal's retry policy of the step).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any, Literal
from urllib.parse import quote, unquote

import httpx
from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.live import heartbeating
from kernel.errors import FailureType, parse_retry_after

__all__ = ["HTTP_TOOL", "ToolActivities", "ToolCallInput", "ToolCallResult", "parse_allow_list"]

HTTP_TOOL = "http_tool"
"""The activity's name: public API, never renamed."""

_MAX_BODY = 1_000_000


class ToolCallInput(BaseModel):
    url: str
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    query: dict[str, str] = Field(default_factory=dict)
    body: Any = None
    timeout_s: float = 30.0
    step_id: str = ""


class ToolCallResult(BaseModel):
    status_code: int
    body: Any
    content_type: str | None = None


def parse_allow_list(raw: str | Iterable[str] | None) -> list[str]:
    """URL prefixes from a comma-separated string or a list; blanks dropped."""
    if raw is None:
        return []
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    return [item.strip() for item in items if item.strip()]


_PCHAR_SAFE = "!$&'()*+,;=:@-._~"


def _segments(raw_path: bytes | str) -> list[str] | str:
    """The path's segments in one canonical percent-encoding, or why the path is refused.

    Servers decode and normalise paths their own way, so a check that reads one form while another is
    sent can be walked around (``/public/%2e%2e/secret``). Encoded dot segments and encoded slashes
    or backslashes are refused outright; literal dot segments are already resolved by httpx, and the
    URL that is checked is the URL that is sent."""
    text = raw_path.decode("ascii", "replace") if isinstance(raw_path, bytes) else raw_path
    text = text.split("?", 1)[0]
    segments = []
    for segment in text.split("/")[1:]:
        decoded = unquote(segment)
        if decoded != segment and decoded in (".", ".."):
            return f"the path has an encoded dot segment ({segment!r})"
        if "/" in decoded or "\\" in decoded:
            return f"the path has an encoded slash or backslash ({segment!r})"
        if decoded in (".", ".."):
            return f"the path has a dot segment ({segment!r})"
        segments.append(quote(decoded, safe=_PCHAR_SAFE))
    return segments


def _allowed(url: httpx.URL, prefixes: Sequence[str]) -> bool:
    """Scheme, host and port equal to a prefix's, and the path's segments start with the prefix's."""
    path = _segments(url.raw_path)
    if isinstance(path, str):
        return False
    for raw in prefixes:
        prefix = httpx.URL(raw)
        if (url.scheme, url.host, url.port) != (prefix.scheme, prefix.host, prefix.port):
            continue
        base = _segments(prefix.raw_path)
        if isinstance(base, str):
            continue
        while base and base[-1] == "":
            base = base[:-1]
        if path[: len(base)] == base:
            return True
    return False


class ToolActivities:
    """Holds the allow-list and an HTTP client; its bound method is the activity."""

    def __init__(self, allow: Sequence[str] = (), *, client: httpx.AsyncClient | None = None) -> None:
        self.allow = list(allow)
        self._client = client

    @activity.defn(name=HTTP_TOOL)
    async def call(self, call: ToolCallInput) -> ToolCallResult:
        try:
            url = httpx.URL(call.url)
        except httpx.InvalidURL as exc:
            raise ApplicationError(
                f"step {call.step_id!r}: {call.url!r} is not a valid URL: {exc}",
                type=FailureType.TOOL_REQUEST_INVALID,
                non_retryable=True,
            ) from exc
        refused = _segments(url.raw_path)
        if isinstance(refused, str):
            raise ApplicationError(
                f"step {call.step_id!r}: {call.url!r} is refused: {refused}",
                type=FailureType.TOOL_REQUEST_INVALID,
                non_retryable=True,
            )
        if url.scheme not in ("http", "https") or not _allowed(url, self.allow):
            allowed = ", ".join(self.allow) or "nothing (set KERNELFLOW_TOOL_ALLOWLIST on the worker)"
            raise ApplicationError(
                f"step {call.step_id!r}: {call.method} {url.copy_with(query=None)} is not on the worker's "
                f"tool allow-list; allowed: {allowed}",
                type=FailureType.TOOL_NOT_ALLOWED,
                non_retryable=True,
            )
        client = self._client or httpx.AsyncClient()
        try:
            response = await heartbeating(
                client.request(
                    call.method,
                    url,
                    params=call.query or None,
                    headers=call.headers,
                    json=call.body if call.body is not None else None,
                    timeout=call.timeout_s,
                )
            )
        except httpx.HTTPError as exc:
            raise ApplicationError(
                f"step {call.step_id!r}: {call.method} {url.host} failed: {type(exc).__name__}: {exc}",
                type=FailureType.TOOL_CONNECTION_FAILED,
            ) from exc
        finally:
            if self._client is None:
                await client.aclose()
        return _result(call, response)


def _result(call: ToolCallInput, response: httpx.Response) -> ToolCallResult:
    if response.status_code >= 400:
        retryable = response.status_code == 429 or response.status_code >= 500
        delay = parse_retry_after(response.headers) if retryable else None
        raise ApplicationError(
            f"step {call.step_id!r}: {call.method} {response.url.copy_with(query=None)} answered HTTP "
            f"{response.status_code}: {response.text[:300]}",
            {"status_code": response.status_code},
            type=FailureType.TOOL_REQUEST_FAILED,
            non_retryable=not retryable,
            next_retry_delay=timedelta(seconds=delay) if delay is not None else None,
        )
    content_type = response.headers.get("content-type")
    text = response.text[:_MAX_BODY]
    body: Any = text
    if content_type and "json" in content_type:
        try:
            body = json.loads(text)
        except ValueError:
            body = text
    return ToolCallResult(status_code=response.status_code, body=body, content_type=content_type)

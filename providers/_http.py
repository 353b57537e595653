"""What every HTTP provider shares: an injectable ``httpx.AsyncClient`` that never retries, mapping of
transport failures and HTTP errors into the kernel's error tree, SSE and NDJSON readers, the shape
readers for vendor JSON, and a guard that turns a stream broken after its first event into a typed
``StreamError`` event.

Vendor JSON is read through the shape readers (``as_object``, ``as_list``, ``as_text``, ``as_int``,
``required``, ``loads_object``), which raise ``WireShapeError`` naming the field. In a stream that error
and a ``json.JSONDecodeError`` (a plugin parsing lines itself) alone become ``MalformedResponse``: a
``KeyError``, ``TypeError`` or ``ValueError`` in our own code stays what it is.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from kernel.contracts import StreamDone, StreamError, StreamEvent
from kernel.errors import (
    ConnectionFailed,
    MalformedResponse,
    ProviderError,
    StreamInterrupted,
    UpstreamTimeout,
    error_from_status,
)
from kernel.provider import Provider, ProviderSettings

__all__ = [
    "HttpProvider",
    "ServerSentEvent",
    "WireShapeError",
    "as_int",
    "as_list",
    "as_object",
    "as_text",
    "iter_ndjson",
    "iter_sse",
    "loads_object",
    "required",
]


class WireShapeError(ValueError):
    """A vendor's JSON is not shaped as its API documents. Raised by the readers below, and turned
    into ``MalformedResponse`` by the code reading the vendor's answer: only there, so a bug in our
    own code is never mistaken for a broken upstream."""


def as_object(value: Any, where: str, *, optional: bool = False) -> dict[str, Any]:
    """``value`` when it is a JSON object; with ``optional``, ``None`` (an omitted field) reads as ``{}``."""
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise WireShapeError(f"{where} should be an object, got {type(value).__name__}")
    return value


def as_list(value: Any, where: str, *, optional: bool = False) -> list[Any]:
    """``value`` when it is a JSON array; with ``optional``, ``None`` (an omitted field) reads as ``[]``."""
    if value is None and optional:
        return []
    if not isinstance(value, list):
        raise WireShapeError(f"{where} should be an array, got {type(value).__name__}")
    return value


def as_text(value: Any, where: str) -> str | None:
    """``value`` when it is a string; ``None`` stays ``None``."""
    if value is not None and not isinstance(value, str):
        raise WireShapeError(f"{where} should be a string, got {type(value).__name__}")
    return value


def as_int(value: Any, where: str, *, optional: bool = False) -> int:
    """``value`` as an integer (a count may come as a number or a numeric string); with ``optional``,
    an omitted or empty field reads as ``0``."""
    if type(value) is int:
        return value
    if optional and not value:
        return 0
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return int(value)
        except ValueError:
            pass
    raise WireShapeError(f"{where} should be an integer, got {value!r:.60}")


def required(body: Mapping[str, Any], key: str, where: str) -> Any:
    """``body[key]`` for a field the API always sends."""
    if key not in body:
        raise WireShapeError(f"{where}.{key} is missing")
    return body[key]


def loads_object(data: str | bytes, where: str) -> dict[str, Any]:
    """A JSON object read from a vendor's text (a stream chunk, a line, an event payload)."""
    try:
        value = json.loads(data)
    except ValueError as exc:  # not JSON, or bytes that are not UTF-8
        raise WireShapeError(f"{where} is not JSON ({exc}): {data[:80]!r}") from exc
    if not isinstance(value, dict):
        raise WireShapeError(f"{where} should be an object, got {type(value).__name__}: {data[:80]!r}")
    return value


@dataclass(slots=True)
class ServerSentEvent:
    event: str
    data: str


async def iter_sse(response: httpx.Response) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events per the HTML spec: ``event:``/``data:`` fields, dispatched on a blank line."""
    event: str = "message"
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield ServerSentEvent(event, "\n".join(data))
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
    if data:
        yield ServerSentEvent(event, "\n".join(data))


async def iter_ndjson(response: httpx.Response) -> AsyncIterator[Any]:
    """One JSON value per non-empty line; a line that is not JSON raises ``WireShapeError``."""
    async for line in response.aiter_lines():
        if line.strip():
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise WireShapeError(f"a stream line is not JSON ({exc}): {line[:80]!r}") from exc
            yield value


class HttpProvider(Provider):
    """A provider speaking HTTP through httpx. Subclasses supply ``_auth_headers`` and the mapping."""

    base_url_env: ClassVar[str | None] = None
    """Environment variable that overrides ``default_base_url`` (settings win over both)."""
    max_connections: ClassVar[int] = 200

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

    @property
    def base_url(self) -> str:
        if not self.settings.base_url and self.base_url_env and self._environ.get(self.base_url_env):
            return self._environ[self.base_url_env].rstrip("/")
        return super().base_url

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.settings.timeout, connect=self.settings.connect_timeout),
                limits=httpx.Limits(
                    max_connections=self.max_connections, max_keepalive_connections=self.max_connections
                ),
                headers=self.settings.headers,
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._owns_client:
            await self._client.aclose()
        self._client = None

    # --- hooks -----------------------------------------------------------------------------------

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key()}"}

    def _error_details(self, body: Any, text: str) -> tuple[str, str | None]:
        """(message, code) from an error body. The default reads ``{"error": {"message", "code"}}``."""
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            message = str(error.get("message") or text[:300])
            code = error.get("code") or error.get("type") or error.get("status")
            return message, None if code is None else str(code)
        if isinstance(error, str):
            return error, None
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            return body["message"], body.get("code") or body.get("type")
        return text[:300] or "(empty body)", None

    # --- plumbing --------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else f"{self.base_url}{path}"

    def _transport_error(self, exc: httpx.HTTPError, model: str | None) -> ProviderError:
        where = (
            f"{self.name} at {self.base_url}"
            if (self.settings.base_url or self.default_base_url)
            else self.name
        )
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamTimeout(
                f"{where} did not answer in time ({type(exc).__name__})", provider=self.name, model=model
            )
        return ConnectionFailed(
            f"cannot reach {where}: {type(exc).__name__}: {exc}", provider=self.name, model=model
        )

    def _status_error(self, response: httpx.Response, text: str, model: str | None) -> ProviderError:
        try:
            body: Any = json.loads(text) if text else None
        except ValueError:
            body = None
        message, code = self._error_details(body, text)
        return error_from_status(
            response.status_code,
            message,
            provider=self.name,
            model=model,
            code=code,
            headers=response.headers,
            body=text[:2000],
        )

    async def _post_json(
        self,
        path: str,
        payload: Mapping[str, Any],
        *,
        model: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        request_headers = {**self._auth_headers(), **(headers or {})}
        request = self.client.build_request("POST", self._url(path), json=payload, headers=request_headers)
        return self._json_body(await self._send(request, model=model), model)

    async def _send(self, request: httpx.Request, *, model: str | None) -> httpx.Response:
        """Send a built request; transport failures and HTTP errors become kernel errors."""
        try:
            response = await self.client.send(request)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, model) from exc
        if response.status_code >= 400:
            raise self._status_error(response, response.text, model)
        return response

    def _json_body(self, response: httpx.Response, model: str | None) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise MalformedResponse(
                f"{self.name} answered HTTP {response.status_code} with a body that is not JSON: {response.text[:200]!r}",
                provider=self.name,
                model=model,
                status_code=response.status_code,
            ) from exc

    def _open_stream(
        self,
        path: str,
        payload: Mapping[str, Any],
        *,
        model: str | None,
        headers: Mapping[str, str] | None = None,
        method: str = "POST",
    ) -> AbstractAsyncContextManager[httpx.Response]:
        """A streaming response whose status has been checked; error bodies become kernel errors."""
        request_headers = {**self._auth_headers(), **(headers or {})}
        request = self.client.build_request(method, self._url(path), json=payload, headers=request_headers)
        return self._send_stream(request, model=model)

    @asynccontextmanager
    async def _send_stream(
        self, request: httpx.Request, *, model: str | None
    ) -> AsyncIterator[httpx.Response]:
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, model) from exc
        try:
            if response.status_code >= 400:
                try:
                    text = (await response.aread()).decode("utf-8", "replace")
                except httpx.HTTPError:
                    text = ""
                raise self._status_error(response, text, model)
            yield response
        finally:
            await response.aclose()

    async def _guard_stream(
        self, events: AsyncIterator[StreamEvent], *, model: str
    ) -> AsyncIterator[StreamEvent]:
        """Before the first event, failures raise (so the call can be retried or fall back); after it they
        become a ``StreamError`` event; a stream that stops without ``StreamDone`` is an error too."""
        started = False
        try:
            try:
                async for event in events:
                    started = True
                    yield event
                    if isinstance(event, StreamDone | StreamError):
                        return
            except ProviderError as exc:
                if not started:
                    raise
                yield StreamError(error_type=type(exc).__name__, message=str(exc), retryable=exc.retryable)
                return
            except httpx.HTTPError as exc:
                error = self._transport_error(exc, model)
                if not started:
                    raise error from exc
                interrupted = StreamInterrupted(
                    f"{self.name} stream broke off: {error}", provider=self.name, model=model
                )
                yield StreamError(
                    error_type=type(interrupted).__name__, message=str(interrupted), retryable=True
                )
                return
            except (WireShapeError, json.JSONDecodeError) as exc:  # the vendor's bytes, never our own bugs
                malformed = MalformedResponse(
                    f"{self.name} sent a malformed stream chunk: {exc}", provider=self.name, model=model
                )
                if not started:
                    raise malformed from exc
                yield StreamError(
                    error_type=type(malformed).__name__, message=str(malformed), retryable=False
                )
                return
            if not started:
                raise StreamInterrupted(
                    f"{self.name} closed the stream before sending anything", provider=self.name, model=model
                )
            yield StreamError(
                error_type="StreamInterrupted",
                message=f"{self.name} stream ended without a finish reason (the answer is incomplete)",
                retryable=True,
            )
        finally:
            # Closing the inner generator now (not at garbage collection) releases the HTTP connection
            # when the consumer stops early.
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()

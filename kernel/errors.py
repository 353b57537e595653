"""Every error Kernelflow raises, classified once.

    KernelflowError
    ├── ConfigurationError                 bad set-up; never retried
    │   ├── PluginError                    incompatible or duplicate provider plugin
    │   ├── UnknownProvider                provider name or alias not registered
    │   └── PipelineError                  a pipeline spec or its inputs are invalid
    └── ProviderError                      a call to an upstream model failed
        ├── RetryableError                 Temporal retries these (same model)
        │   ├── RateLimited                429; carries ``retry_after``
        │   ├── Overloaded                 503/529 "overloaded"; may carry ``retry_after``
        │   ├── UpstreamError              other 5xx
        │   ├── UpstreamTimeout            no answer in time
        │   ├── ConnectionFailed           could not reach the upstream
        │   └── StreamInterrupted          a stream broke after it had started
        └── NonRetryableError              retrying the same model cannot help
            ├── AuthenticationFailed       401
            ├── PermissionDenied           403
            ├── InvalidRequest             400/422
            │   ├── ContextLengthExceeded  prompt too long for the model
            │   └── UnsupportedCapability  the provider lacks a feature the request needs
            ├── QuotaExceeded              out of credit or quota, or a request above a per-minute
            │                              limit: waiting cannot help (429 insufficient_quota)
            ├── ContentFiltered            refused by the provider's safety system
            ├── ModelNotFound              404 / unknown model
            ├── MissingCredentials         no API key; names the environment variable
            ├── MalformedResponse          the upstream answered something unparseable
            └── CircuitOpen                the worker's circuit breaker refuses the model for now

Errors are picklable (they cross process and Temporal boundaries): every attribute is a constructor
keyword and ``__reduce__`` rebuilds from them.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import time
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar

__all__ = [
    "AuthenticationFailed",
    "CircuitOpen",
    "ConfigurationError",
    "ConnectionFailed",
    "ContentFiltered",
    "ContextLengthExceeded",
    "FailureType",
    "InvalidRequest",
    "KernelflowError",
    "MalformedResponse",
    "MissingCredentials",
    "ModelNotFound",
    "NonRetryableError",
    "Overloaded",
    "PermissionDenied",
    "PipelineError",
    "PluginError",
    "ProviderError",
    "QuotaExceeded",
    "RateLimited",
    "RetryableError",
    "StreamInterrupted",
    "UnknownProvider",
    "UnsupportedCapability",
    "UpstreamError",
    "UpstreamTimeout",
    "error_from_status",
    "error_type",
    "parse_retry_after",
    "status_for_error_code",
]


def _rebuild(cls: type[KernelflowError], message: str, attrs: dict[str, Any]) -> KernelflowError:
    return cls(message, **attrs)


class KernelflowError(Exception):
    """Base of every Kernelflow error."""

    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def _attrs(self) -> dict[str, Any]:
        return {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self._attrs()))

    def __str__(self) -> str:
        return self.message


class ConfigurationError(KernelflowError):
    """Kernelflow or a plugin is set up wrongly."""


class PluginError(ConfigurationError):
    """A provider plugin cannot be loaded: incompatible kernel API, duplicate name, broken entry point."""


class UnknownProvider(ConfigurationError):
    """A model string names a provider or alias that is not registered."""


class PipelineError(ConfigurationError):
    """A pipeline spec or its inputs are invalid. ``location`` names the step and field."""

    def __init__(self, message: str, *, location: str | None = None) -> None:
        super().__init__(message)
        self.location = location

    def _attrs(self) -> dict[str, Any]:
        return {"location": self.location}


class ProviderError(KernelflowError):
    """A call to an upstream model failed."""

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        model: str | None = None,
        status_code: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.model = model
        self.status_code = status_code
        self.code = code
        self.retry_after = retry_after

    def _attrs(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "status_code": self.status_code,
            "code": self.code,
            "retry_after": self.retry_after,
        }


class RetryableError(ProviderError):
    """Trying the same model again later may succeed."""

    retryable = True


class RateLimited(RetryableError):
    """The upstream refused the call for its rate limits (HTTP 429)."""


class Overloaded(RetryableError):
    """The upstream is temporarily overloaded (HTTP 503 or 529)."""


class UpstreamError(RetryableError):
    """The upstream failed with a server error (HTTP 5xx)."""


class UpstreamTimeout(RetryableError):
    """The upstream did not answer in time."""


class ConnectionFailed(RetryableError):
    """The upstream could not be reached."""


class StreamInterrupted(RetryableError):
    """A streamed answer broke off after it had started; the partial answer is discarded."""


class NonRetryableError(ProviderError):
    """Trying the same model again cannot succeed; a fallback model may."""


class AuthenticationFailed(NonRetryableError):
    """The API key was refused (HTTP 401)."""


class PermissionDenied(NonRetryableError):
    """The API key may not use this model or feature (HTTP 403)."""


class InvalidRequest(NonRetryableError):
    """The upstream refused the request as malformed (HTTP 400/422)."""


class ContextLengthExceeded(InvalidRequest):
    """The prompt plus the requested completion exceed the model's context window."""


class UnsupportedCapability(InvalidRequest):
    """The request needs a capability the provider does not declare; raised before any network call."""


class QuotaExceeded(NonRetryableError):
    """The account is out of credit or quota, or the request alone is larger than a per-minute token
    limit. It arrives as a 429 like a rate limit, but waiting cannot help, so it is not retried and the
    step moves straight to its fallback."""


class ContentFiltered(NonRetryableError):
    """The provider's safety system refused the prompt or the answer."""


class ModelNotFound(NonRetryableError):
    """The provider does not know the model (HTTP 404)."""


class MissingCredentials(NonRetryableError):
    """No API key is configured for the provider; ``env_var`` names where it is looked up."""

    def __init__(self, message: str, *, env_var: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.env_var = env_var

    def _attrs(self) -> dict[str, Any]:
        return {**super()._attrs(), "env_var": self.env_var}


class MalformedResponse(NonRetryableError):
    """The upstream answered with something that is not a valid response of its API."""


class CircuitOpen(NonRetryableError):
    """The worker stopped calling this model after repeated retryable failures; refused before any
    network call so the step moves on to its next fallback at once. ``open_until`` is a Unix time."""

    def __init__(self, message: str, *, open_until: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.open_until = open_until

    def _attrs(self) -> dict[str, Any]:
        return {**super()._attrs(), "open_until": self.open_until}


_STATUS_CLASSES: dict[int, type[ProviderError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    402: QuotaExceeded,
    403: PermissionDenied,
    404: ModelNotFound,
    408: UpstreamTimeout,
    409: UpstreamError,
    413: ContextLengthExceeded,
    422: InvalidRequest,
    429: RateLimited,
    503: Overloaded,
    529: Overloaded,
}

_CONTEXT_MARKERS = (
    "context_length_exceeded",
    "context length",
    "context window",
    "maximum context",
    "prompt is too long",
    "too many tokens",
    "input is too long",
    "exceeds the maximum number of tokens",
    "string_above_max_length",
)
_QUOTA_MARKERS = (
    "insufficient_quota",
    "billing_hard_limit",
    "billing_not_active",
    "credit balance is too low",
    "insufficient credits",
    "request too large for",
)
"""OpenAI's ``insufficient_quota`` code and its "Request too large for <model> ... on tokens per min
(TPM)" wording, OpenRouter's and Anthropic's out-of-credit messages. Not "exceeded your current quota"
alone: Google words its per-minute 429s that way, and those pass with time."""
_CONTENT_MARKERS = (
    "content_filter",
    "content_policy",
    "responsibleaipolicyviolation",
    "safety system",
    "blocked by safety",
)


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait, from ``retry-after-ms``, ``x-ms-retry-after-ms`` or ``retry-after``.

    ``retry-after`` may be seconds or an HTTP date. Header names are matched case-insensitively.
    Returns ``None`` when no usable header is present.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        value = lowered.get(name)
        if value is not None:
            try:
                ms = float(value)
            except ValueError:
                continue
            if math.isfinite(ms) and ms >= 0:
                return ms / 1000.0
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (ValueError, TypeError, IndexError, OverflowError):
            return None
        if parsed.tzinfo is None:  # an HTTP date is always GMT
            parsed = parsed.replace(tzinfo=datetime.UTC)
        seconds = parsed.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def error_from_status(
    status_code: int,
    message: str,
    *,
    provider: str | None = None,
    model: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
    body: str = "",
) -> ProviderError:
    """Classify an upstream HTTP failure. The body and code are read too, so a 400 that is really a
    context-length or content-filter refusal is recognised whatever status the vendor chose."""
    haystack = f"{code or ''} {message} {body}".lower()
    cls: type[ProviderError]
    if status_code in (400, 413, 422) and any(marker in haystack for marker in _CONTEXT_MARKERS):
        cls = ContextLengthExceeded
    elif status_code in (400, 403, 422) and any(marker in haystack for marker in _CONTENT_MARKERS):
        cls = ContentFiltered
    elif status_code in _STATUS_CLASSES:
        cls = _STATUS_CLASSES[status_code]
    elif status_code >= 500:
        cls = UpstreamError
    elif status_code >= 400:
        cls = InvalidRequest
    else:
        cls = MalformedResponse
    if status_code in (400, 402, 403, 429) and any(marker in haystack for marker in _QUOTA_MARKERS):
        cls = QuotaExceeded
    if "overloaded" in haystack and cls is UpstreamError:
        cls = Overloaded
    retry_after = parse_retry_after(headers) if headers else None
    label = f"{provider or 'provider'}"
    if model:
        label += f" model {model!r}"
    return cls(
        f"{label} answered HTTP {status_code}: {message}",
        provider=provider,
        model=model,
        status_code=status_code,
        code=code,
        retry_after=retry_after,
    )


# Error ``type``/``code`` strings vendors put in bodies, for errors that arrive without an HTTP status of
# their own (inside a stream, or in a 200 body): the status a non-streamed answer would have had.
_CODE_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "invalid_request": 400,
    "bad_request": 400,
    "tool_use_failed": 400,
    "json_validate_failed": 400,
    "context_length_exceeded": 400,
    "string_above_max_length": 400,
    "invalid_api_key": 401,
    "authentication_error": 401,
    "unauthorized": 401,
    "billing_error": 402,
    "permission_error": 403,
    "permission_denied": 403,
    "not_found_error": 404,
    "model_not_found": 404,
    "not_found": 404,
    "request_too_large": 413,
    "insufficient_quota": 429,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "tokens": 429,
    "requests": 429,
    "api_error": 500,
    "server_error": 500,
    "internal_error": 500,
    "timeout_error": 504,
    "service_unavailable": 503,
    "overloaded_error": 529,
}


def status_for_error_code(*codes: object, default: int = 500) -> int:
    """The HTTP status an error would have had without streaming, from the first of ``codes`` that says:
    a number in 400 to 599 (OpenRouter puts the status in ``error.code``) or a known ``type``/``code``."""
    for code in codes:
        if code is None or isinstance(code, bool):
            continue
        if isinstance(code, int) or (isinstance(code, str) and code.isdigit()):
            number = int(code)
            if 400 <= number <= 599:
                return number
            continue
        status = _CODE_STATUS.get(str(code).lower())
        if status is not None:
            return status
    return default


def error_type(exc: BaseException) -> str:
    """The stable type name an error travels under (e.g. in a Temporal ``ApplicationError``)."""
    return type(exc).__name__


class FailureType(StrEnum):
    """The ``type`` of every failure that crosses the Temporal boundary from Kernelflow's own code: a
    pipeline's failure, a refused update or signal, a tool call. Clients and the CLI match these
    values; provider errors travel under their class names (``error_type``) beside them."""

    PIPELINE_ERROR = "PipelineError"
    """The spec, its inputs or the start request are invalid (a template that cannot render too)."""
    UNKNOWN_PIPELINE = "UnknownPipeline"
    STEP_FAILED = "StepFailed"
    BUDGET_EXCEEDED = "BudgetExceeded"
    TENANT_BUDGET_EXCEEDED = "TenantBudgetExceeded"
    """A model call would pass its tenant's cost budget (worker config ``limits.tenants``)."""
    APPROVAL_REJECTED = "ApprovalRejected"
    EVENT_TIMEOUT = "EventTimeout"
    INVALID_OUTPUT = "InvalidOutput"
    INVALID_REROUTE = "InvalidReroute"
    INVALID_INPUT = "InvalidInput"
    UNKNOWN_APPROVAL = "UnknownApproval"
    NOT_AN_APPROVER = "NotAnApprover"
    ALREADY_DECIDED = "AlreadyDecided"
    NOT_RUNNING = "NotRunning"
    TOOL_REQUEST_INVALID = "ToolRequestInvalid"
    TOOL_NOT_ALLOWED = "ToolNotAllowed"
    TOOL_CONNECTION_FAILED = "ToolConnectionFailed"
    TOOL_REQUEST_FAILED = "ToolRequestFailed"
    PAYLOAD_TOO_LARGE = "PayloadTooLarge"

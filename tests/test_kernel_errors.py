"""The error tree: classification of upstream failures, retry-after headers, picklability."""

from __future__ import annotations

import email.utils
import pickle
from typing import Any

import pytest

from kernel import errors
from kernel.errors import (
    AuthenticationFailed,
    CircuitOpen,
    ConfigurationError,
    ConnectionFailed,
    ContentFiltered,
    ContextLengthExceeded,
    InvalidRequest,
    KernelflowError,
    MalformedResponse,
    MissingCredentials,
    ModelNotFound,
    NonRetryableError,
    Overloaded,
    PermissionDenied,
    PipelineError,
    PluginError,
    ProviderError,
    QuotaExceeded,
    RateLimited,
    RetryableError,
    StreamInterrupted,
    UnknownProvider,
    UnsupportedCapability,
    UpstreamError,
    UpstreamTimeout,
    error_from_status,
    error_type,
    parse_retry_after,
)

# --- error_from_status: by status ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, InvalidRequest),
        (401, AuthenticationFailed),
        (403, PermissionDenied),
        (404, ModelNotFound),
        (408, UpstreamTimeout),
        (409, UpstreamError),
        (413, ContextLengthExceeded),
        (422, InvalidRequest),
        (429, RateLimited),
        (500, UpstreamError),
        (502, UpstreamError),
        (503, Overloaded),
        (504, UpstreamError),
        (529, Overloaded),
        (418, InvalidRequest),
        (451, InvalidRequest),
        (200, MalformedResponse),
    ],
)
def test_status_classification(status: int, expected: type[ProviderError]) -> None:
    error = error_from_status(status, "something went wrong", provider="openai", model="gpt-4o")
    assert type(error) is expected
    assert error.status_code == status
    assert error.provider == "openai"
    assert error.model == "gpt-4o"
    assert f"HTTP {status}" in str(error)
    assert "something went wrong" in str(error)
    assert "gpt-4o" in str(error)


def test_code_is_kept() -> None:
    error = error_from_status(401, "bad key", code="invalid_api_key")
    assert error.code == "invalid_api_key"


def test_500_saying_overloaded_is_overloaded() -> None:
    error = error_from_status(500, "The server is overloaded, please try again later.")
    assert type(error) is Overloaded
    assert error.retryable


# --- error_from_status: by body ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 413, 422])
@pytest.mark.parametrize(
    ("message", "code", "body"),
    [
        ("This model's maximum context length is 128000 tokens.", None, ""),
        ("Invalid request", "context_length_exceeded", ""),
        ("bad request", None, '{"error": {"message": "prompt is too long: 210000 tokens > 200000 maximum"}}'),
        ("Input is too long for requested model.", None, ""),
        ("The input token count exceeds the maximum number of tokens allowed.", None, ""),
    ],
)
def test_context_length_recognised_by_body_whatever_the_status(
    status: int, message: str, code: str | None, body: str
) -> None:
    error = error_from_status(status, message, code=code, body=body)
    assert type(error) is ContextLengthExceeded
    assert not error.retryable
    assert isinstance(error, InvalidRequest)


@pytest.mark.parametrize("status", [400, 403, 422])
@pytest.mark.parametrize(
    ("message", "code", "body"),
    [
        (
            "The response was filtered due to the prompt triggering content management policy.",
            "content_filter",
            "",
        ),
        ("bad request", None, '{"error": {"code": "content_policy_violation"}}'),
        ("bad request", "ResponsibleAIPolicyViolation", ""),
        ("Request blocked by safety settings", None, ""),
    ],
)
def test_content_filter_recognised_by_body(status: int, message: str, code: str | None, body: str) -> None:
    error = error_from_status(status, message, code=code, body=body)
    assert type(error) is ContentFiltered
    assert not error.retryable


def test_plain_400_stays_invalid_request() -> None:
    error = error_from_status(
        400, "Unrecognized request argument supplied: foo", code="invalid_request_error"
    )
    assert type(error) is InvalidRequest


def test_retry_after_header_reaches_the_error() -> None:
    error = error_from_status(429, "slow down", headers={"Retry-After": "7"})
    assert isinstance(error, RateLimited)
    assert error.retry_after == 7.0
    overloaded = error_from_status(503, "busy", headers={"retry-after-ms": "1500"})
    assert overloaded.retry_after == 1.5


def test_no_headers_no_retry_after() -> None:
    assert error_from_status(429, "slow down").retry_after is None
    assert error_from_status(429, "slow down", headers={}).retry_after is None


def test_garbage_retry_after_does_not_break_classification() -> None:
    error = error_from_status(429, "slow down", headers={"retry-after": "soon, maybe"})
    assert type(error) is RateLimited
    assert error.retry_after is None


# --- parse_retry_after ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"Retry-After": "30"}, 30.0),
        ({"RETRY-AFTER": "4"}, 4.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After-Ms": "1000"}, 1.0),
        ({"x-ms-retry-after-ms": "1200"}, 1.2),
        ({"X-MS-Retry-After-MS": "50"}, 0.05),
        ({"retry-after": "-5"}, 0.0),
        ({}, None),
        ({"x-ratelimit-reset-requests": "1s"}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_milliseconds_header_wins_over_seconds() -> None:
    assert parse_retry_after({"retry-after": "10", "retry-after-ms": "500"}) == 0.5
    assert parse_retry_after({"retry-after": "10", "x-ms-retry-after-ms": "2000"}) == 2.0


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "soon"},
        {"retry-after": ""},
        {"retry-after": "   "},
        {"retry-after": "nan"},
        {"retry-after": "inf"},
        {"retry-after-ms": "abc"},
        {"retry-after-ms": "-10"},
        {"x-ms-retry-after-ms": "nan"},
        {"retry-after": "Mon, 99 Foo 2024 25:61:00 GMT"},
    ],
)
def test_garbage_retry_after_gives_none(headers: dict[str, str]) -> None:
    assert parse_retry_after(headers) is None


def test_garbage_milliseconds_fall_back_to_seconds() -> None:
    assert parse_retry_after({"retry-after-ms": "abc", "retry-after": "3"}) == 3.0


def test_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 120, usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now=now) == pytest.approx(120.0)


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now - 60, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == 0.0


def test_retry_after_accepts_httpx_headers() -> None:
    import httpx

    assert parse_retry_after(httpx.Headers({"Retry-After-Ms": "300"})) == 0.3


# --- the tree ---------------------------------------------------------------------------------------

_RETRYABLE = [RateLimited, Overloaded, UpstreamError, UpstreamTimeout, ConnectionFailed, StreamInterrupted]
_NON_RETRYABLE = [
    AuthenticationFailed,
    PermissionDenied,
    InvalidRequest,
    ContextLengthExceeded,
    UnsupportedCapability,
    ContentFiltered,
    ModelNotFound,
    MissingCredentials,
    MalformedResponse,
    CircuitOpen,
    QuotaExceeded,
]
_CONFIGURATION = [ConfigurationError, PluginError, UnknownProvider, PipelineError]


@pytest.mark.parametrize("cls", _RETRYABLE)
def test_retryable_classes(cls: type[ProviderError]) -> None:
    assert issubclass(cls, RetryableError)
    assert cls.retryable is True
    assert cls("x").retryable is True


@pytest.mark.parametrize("cls", _NON_RETRYABLE)
def test_non_retryable_classes(cls: type[ProviderError]) -> None:
    assert issubclass(cls, NonRetryableError)
    assert not issubclass(cls, RetryableError)
    assert cls("x").retryable is False


@pytest.mark.parametrize("cls", _CONFIGURATION)
def test_configuration_errors_are_never_retried(cls: type[KernelflowError]) -> None:
    assert issubclass(cls, ConfigurationError)
    assert not issubclass(cls, ProviderError)
    assert cls("x").retryable is False


def test_every_exported_error_is_in_the_tree() -> None:
    exported = {
        getattr(errors, name)
        for name in errors.__all__
        if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), BaseException)
    }
    covered = {KernelflowError, ProviderError, RetryableError, NonRetryableError}
    covered |= {*_RETRYABLE, *_NON_RETRYABLE, *_CONFIGURATION}
    assert exported == covered
    for cls in exported:
        assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} is missing from the docstring tree"


def test_subclass_relations_in_the_docstring() -> None:
    assert issubclass(ContextLengthExceeded, InvalidRequest)
    assert issubclass(UnsupportedCapability, InvalidRequest)
    assert issubclass(PluginError, ConfigurationError)


# --- pickling ---------------------------------------------------------------------------------------

_PROVIDER_ATTRS: dict[str, Any] = {
    "provider": "openai",
    "model": "gpt-4o",
    "status_code": 429,
    "code": "rate_limit_exceeded",
    "retry_after": 2.5,
}


@pytest.mark.parametrize(
    "cls", [ProviderError, RetryableError, NonRetryableError, *_RETRYABLE, *_NON_RETRYABLE]
)
def test_provider_errors_pickle_with_attributes(cls: type[ProviderError]) -> None:
    error = cls("the message", **_PROVIDER_ATTRS)
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is cls
    assert str(clone) == "the message"
    assert clone.message == "the message"
    for name, value in _PROVIDER_ATTRS.items():
        assert getattr(clone, name) == value
    assert clone.retryable == error.retryable
    assert error_type(clone) == cls.__name__


def test_missing_credentials_pickles_env_var() -> None:
    error = MissingCredentials("no key", provider="openai", env_var="OPENAI_API_KEY")
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is MissingCredentials
    assert clone.env_var == "OPENAI_API_KEY"
    assert clone.provider == "openai"


def test_pipeline_error_pickles_location() -> None:
    error = PipelineError("bad step", location="steps[2].model")
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is PipelineError
    assert clone.location == "steps[2].model"
    assert str(clone) == "bad step"


@pytest.mark.parametrize("cls", [KernelflowError, *_CONFIGURATION])
def test_configuration_errors_pickle(cls: type[KernelflowError]) -> None:
    clone = pickle.loads(pickle.dumps(cls("broken set-up")))
    assert type(clone) is cls
    assert str(clone) == "broken set-up"


def test_classified_error_pickles() -> None:
    error = error_from_status(
        429, "slow down", provider="openai", model="gpt-4o", code="rate", headers={"retry-after": "3"}
    )
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is RateLimited
    assert (clone.status_code, clone.retry_after, clone.code, str(clone)) == (429, 3.0, "rate", str(error))


def test_retry_after_http_date_without_zone_is_gmt() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 90, usegmt=True).replace(" GMT", " -0000")
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(90.0)

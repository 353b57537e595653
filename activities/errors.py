"""Kernel errors become Temporal ``ApplicationError``s here, and only here.

The error's class name travels as the ``type`` (so workflows and operators can match on it), its
retryability as ``non_retryable``, a provider's Retry-After as ``next_retry_delay``, and the
structured attributes (provider, model, status, env var) as details. Nothing secret is included.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio.exceptions import ApplicationError

from kernel.errors import KernelflowError, MissingCredentials, ProviderError, error_type

__all__ = ["to_application_error"]


def to_application_error(exc: KernelflowError) -> ApplicationError:
    details: dict[str, Any] = {}
    delay: timedelta | None = None
    if isinstance(exc, ProviderError):
        details = {
            "provider": exc.provider,
            "model": exc.model,
            "status_code": exc.status_code,
            "code": exc.code,
        }
        if exc.retry_after is not None and exc.retryable:
            delay = timedelta(seconds=exc.retry_after)
    if isinstance(exc, MissingCredentials):
        details["env_var"] = exc.env_var
    return ApplicationError(
        str(exc),
        {k: v for k, v in details.items() if v is not None},
        type=error_type(exc),
        non_retryable=not exc.retryable,
        next_retry_delay=delay,
    )

"""With encryption on, error messages stay out of the worker's logs.

An upstream error can quote the prompt ("unknown parameter in: <the customer's text>"), and logs are
data at rest too. The failure itself is kept, encrypted, in the history: read it in the Web UI or with
``temporal workflow show`` through the codec server. The logs keep what an operator needs to find it:
the event, the error type, the workflow and activity ids, the step and the model.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["REDACTED", "redact_error_logs"]

REDACTED = "[redacted: encryption is on; read the failure in the history through the codec server]"
_FIELDS = ("error", "exception")


def _redact_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in _FIELDS:
        if name in event:
            event[name] = REDACTED
    if event.get("exc_info"):
        event["exc_info"] = False
        event["exception"] = REDACTED
    return event


class _RedactTracebacks(logging.Filter):
    """The SDK's own warnings ("Completing activity as failed", "Failed activation") carry the exception:
    keep its type chain, drop its text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            chain: list[str] = []
            error: BaseException | None = record.exc_info[1]
            while error is not None and len(chain) < 5:
                chain.append(type(error).__name__)
                error = error.__cause__
            record.msg = f"{record.getMessage()} [{' <- '.join(chain)}: {REDACTED}]"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


_FILTER = _RedactTracebacks()


def redact_error_logs() -> None:
    """Install the redaction in structlog's processors (before rendering) and on the root log handlers.
    Call once, after logging is configured and before the first log line."""
    processors = list(structlog.get_config()["processors"])
    if _redact_event not in processors:
        processors.insert(max(len(processors) - 1, 0), _redact_event)
        structlog.configure(processors=processors)
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)

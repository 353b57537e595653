"""structlog set-up: readable lines on a terminal, JSON lines everywhere else.

Every line a process writes to stderr goes through one handler and one renderer: Kernelflow's own
events, the standard ``logging`` records of libraries (the Temporal SDK's Python side, httpx), the
Temporal SDK core's logs (forwarded by the runtime built in ``worker.telemetry``), uncaught
exceptions (``sys.excepthook``, threads, asyncio) and warnings. With JSON output every line is one
JSON object; a traceback is the ``exception`` field of its line.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import types
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

__all__ = ["CORE_LOGGER", "configure_logging", "log_fatal"]

CORE_LOGGER = "temporalio.core"
"""The stdlib logger the Temporal SDK core's logs are forwarded to (see ``worker.telemetry``)."""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_configured_json = False


def _core_fields(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The SDK core's target and structured fields, as fields of the line (not text in the message)."""
    record = event_dict.get("_record")
    core = getattr(record, "temporal_log", None)
    if core is not None:
        event_dict["target"] = core.target
        fields = getattr(core, "fields", None) or {}
        for key, value in dict(fields).items():
            event_dict.setdefault(str(key), value if isinstance(value, int | float | bool) else str(value))
    event = event_dict.get("event")
    if isinstance(event, str) and "\x1b" in event:
        event_dict["event"] = _ANSI.sub("", event)
    return event_dict


def _trace_context(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """``trace_id`` and ``span_id`` of the current OpenTelemetry span, when one is recording."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return event_dict
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict


def configure_logging(
    fmt: Literal["auto", "json", "console"] = "auto", level: str = "info", *, stream: TextIO | None = None
) -> None:
    """Render every line to ``stream`` (stderr by default)."""
    global _configured_json
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    _configured_json = as_json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.add_logger_name,
        _trace_context,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _core_fields],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if as_json else _keep_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries speak from warnings up; Kernelflow's own events and the SDK core's at the chosen level.
    root.setLevel(max(numeric, logging.WARNING))
    logging.getLogger("kernelflow").setLevel(numeric)
    logging.getLogger(CORE_LOGGER).setLevel(numeric)
    logging.captureWarnings(True)
    _install_exception_hooks()


def _keep_exc_info(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return event_dict  # the console renderer prints the traceback itself


def _install_exception_hooks() -> None:
    log = logging.getLogger("kernelflow.uncaught")

    def excepthook(kind: type[BaseException], value: BaseException, tb: types.TracebackType | None) -> None:
        log.critical("uncaught exception", exc_info=(kind, value, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        thread = args.thread.name if args.thread is not None else "?"
        log.error(
            "uncaught exception in thread %s",
            thread,
            exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
        )

    sys.excepthook = excepthook
    threading.excepthook = thread_hook


def log_fatal(message: str) -> bool:
    """Report an error that ends the process through the log when JSON logging is on (so the line
    parses); returns whether it did (otherwise the caller prints it)."""
    if not _configured_json:
        return False
    structlog.get_logger("kernelflow").error(message)
    return True

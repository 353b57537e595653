"""Publishing a streamed answer to the calling workflow's stream, so it can be watched while produced.

The ``llm_chat`` activity feeds each provider stream event to a ``TokenPublisher``; the publisher
coalesces deltas and sends them to the workflow's ``WorkflowStream`` (``temporalio.contrib``) in batches,
one signal per ``batch_interval`` rather than one per token. Each step has its own topic
(``tokens:<step id>``). Every event names the step, the activity attempt and the model, so a retried
attempt or a fallback model opens with a ``restart`` event and a watcher discards what it showed before.

Publishing is best effort: a workflow that hosts no stream, a local activity, or a signal that cannot be
delivered never fails or slows the model call itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal

import structlog
from pydantic import BaseModel
from temporalio import activity
from temporalio.client import (
    Client,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
)
from temporalio.contrib.workflow_streams import PollInput, PollResult, WorkflowStreamClient
from temporalio.service import RPCError

from kernel.contracts import StreamDone, StreamError, StreamEvent, TextDelta, ToolCallDelta, Usage
from kernel.errors import KernelflowError, error_type

__all__ = [
    "DEFAULT_BATCH_INTERVAL",
    "TOKENS_TOPIC",
    "TokenEvent",
    "TokenKind",
    "TokenPublisher",
    "is_tokens_topic",
    "step_of_topic",
    "tokens_topic",
]

TOKENS_TOPIC = "tokens"
"""Topic prefix of streamed answers: ``tokens:<step id>`` (public API, never renamed)."""

DEFAULT_BATCH_INTERVAL = 0.5
"""Seconds between two publishing signals while an answer streams (history grows per signal)."""

TokenKind = Literal["text", "tool_call", "restart", "done", "error"]

# The stream's own retained-items query: it tells whether the workflow hosts a stream at all, and
# whether this step already published output that a new attempt must void.
_STREAM_POLL_QUERY = "__temporal_workflow_stream_poll"
_log = structlog.get_logger("kernelflow.streaming")


class TokenEvent(BaseModel):
    """One event of a streamed step. ``text`` and ``tool_call`` deltas are coalesced per batch."""

    kind: TokenKind
    step_id: str
    attempt: int
    model: str
    text: str | None = None
    tool_call: ToolCallDelta | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    error_type: str | None = None
    message: str | None = None
    retryable: bool | None = None


def tokens_topic(step_id: str) -> str:
    return f"{TOKENS_TOPIC}:{step_id}" if step_id else TOKENS_TOPIC


def is_tokens_topic(topic: str) -> bool:
    return topic == TOKENS_TOPIC or topic.startswith(TOKENS_TOPIC + ":")


def step_of_topic(topic: str) -> str:
    return topic.partition(":")[2]


class TokenPublisher:
    """Publishes one activity attempt's stream events; use as an async context manager.

    Before the first batch it asks the workflow (a query: nothing in history) whether it hosts a stream
    and whether the step already has events; if so, or on a retry, the attempt opens with ``restart``.
    On exit the last batch is sent, with an ``error`` event when the attempt failed.
    """

    def __init__(
        self,
        handle: WorkflowHandle[Any, Any] | None,
        *,
        client: Client | None = None,
        step_id: str,
        attempt: int,
        model: str,
        batch_interval: float = DEFAULT_BATCH_INTERVAL,
        probe_timeout: float = 5.0,
        close_timeout: float = 10.0,
    ) -> None:
        self.step_id = step_id
        self.attempt = attempt
        self.model = model
        self.batches_sent = 0
        self._handle = handle
        self._topic_name = tokens_topic(step_id)
        self._stream = (
            WorkflowStreamClient(handle, client=client, max_retry_duration=timedelta(seconds=60))
            if handle is not None
            else None
        )
        self._batch_interval = batch_interval
        self._probe_timeout = probe_timeout
        self._close_timeout = close_timeout
        self._pending: list[TokenEvent] = []
        self._hosted: bool | None = None
        self._content_seen = False
        self._ended = False
        self._closing = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_current_activity(
        cls, *, step_id: str, model: str, batch_interval: float = DEFAULT_BATCH_INTERVAL
    ) -> TokenPublisher:
        """A publisher to the workflow that scheduled the running activity; a silent one for a local
        activity (its workflow task stays open while it runs, so a signal would only queue up)."""
        info = activity.info()
        if info.is_local or not info.workflow_id:
            return cls(None, step_id=step_id, attempt=info.attempt, model=model)
        client = activity.client()
        handle = client.get_workflow_handle(info.workflow_id, run_id=info.workflow_run_id)
        return cls(
            handle,
            client=client,
            step_id=step_id,
            attempt=info.attempt,
            model=model,
            batch_interval=batch_interval,
        )

    # --- feeding ----------------------------------------------------------------------------------

    def feed(self, event: StreamEvent) -> None:
        """Record one provider stream event; never blocks."""
        if self._stream is None or self._hosted is False or self._ended:
            return
        if isinstance(event, TextDelta):
            if not event.text:
                return
            last = self._pending[-1] if self._pending else None
            if last is not None and last.kind == "text":
                last.text = (last.text or "") + event.text
            else:
                self._pending.append(self._event("text", text=event.text))
            self._first_content()
        elif isinstance(event, ToolCallDelta):
            last = self._pending[-1] if self._pending else None
            if last is not None and last.tool_call is not None and last.tool_call.index == event.index:
                merged = last.tool_call
                merged.id = merged.id or event.id
                merged.name = merged.name or event.name
                merged.arguments += event.arguments
            else:
                self._pending.append(self._event("tool_call", tool_call=event.model_copy()))
            self._first_content()
        elif isinstance(event, StreamDone):
            self._end(self._event("done", finish_reason=event.finish_reason, usage=event.usage))
        elif isinstance(event, StreamError):
            self._end(
                self._event(
                    "error", error_type=event.error_type, message=event.message, retryable=event.retryable
                )
            )

    def fail(self, exc: BaseException) -> None:
        """Record that the attempt failed (unless its stream already said so)."""
        if isinstance(exc, KernelflowError):
            kind, retryable = error_type(exc), exc.retryable
        elif isinstance(exc, asyncio.CancelledError):
            kind, retryable = "Cancelled", True
        else:
            kind, retryable = type(exc).__name__, True
        message = str(exc) or kind
        if self._stream is not None and self._hosted is not False and not self._ended:
            self._end(self._event("error", error_type=kind, message=message, retryable=retryable))

    def _event(self, kind: TokenKind, **fields: Any) -> TokenEvent:
        return TokenEvent(kind=kind, step_id=self.step_id, attempt=self.attempt, model=self.model, **fields)

    def _first_content(self) -> None:
        if not self._content_seen:
            self._content_seen = True
            self._wake.set()

    def _end(self, event: TokenEvent) -> None:
        self._ended = True
        self._pending.append(event)
        self._wake.set()

    # --- sending ----------------------------------------------------------------------------------

    async def __aenter__(self) -> TokenPublisher:
        if self._stream is not None:
            self._task = asyncio.create_task(self._run(), name=f"publish {self._topic_name}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.fail(exc)
        task, self._task = self._task, None
        if task is None:
            return
        self._closing = True
        self._wake.set()
        done, _ = await asyncio.wait({task}, timeout=self._close_timeout)
        if not done:
            _log.warning("token stream not flushed in time", topic=self._topic_name, attempt=self.attempt)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif not task.cancelled() and task.exception() is not None:
            _log.warning("token stream publisher failed", error=repr(task.exception()))

    async def _run(self) -> None:
        opens_with_restart = await self._probe()
        self._hosted = opens_with_restart is not None
        if not self._hosted:
            self._pending.clear()
            return
        if opens_with_restart:
            self._pending.insert(0, self._event("restart"))
        while True:
            self._wake.clear()
            if self._pending or self._closing:
                await self._send()
            if self._closing and not self._pending:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._batch_interval)

    async def _probe(self) -> bool | None:
        """``None`` when the workflow hosts no stream; else whether this attempt must open with a
        ``restart`` (a retry, or a fallback model after the step's earlier output)."""
        if self._handle is None:
            return None
        try:
            earlier: PollResult = await self._handle.query(
                _STREAM_POLL_QUERY,
                PollInput(topics=[self._topic_name], from_offset=0),
                result_type=PollResult,
                rpc_timeout=timedelta(seconds=self._probe_timeout),
            )
        except (WorkflowQueryFailedError, WorkflowQueryRejectedError, RPCError) as exc:
            _log.info("workflow hosts no token stream; not publishing", reason=str(exc))
            return None
        return self.attempt > 1 or bool(earlier.items)

    async def _send(self) -> None:
        """Hand the coalesced events to the stream client and signal them as one batch. A failed
        signal stays with the client and goes out (deduplicated) with the next flush."""
        stream = self._stream
        if stream is None:
            return
        batch, self._pending = self._pending, []
        topic = stream.topic(self._topic_name, type=TokenEvent)
        for event in batch:
            topic.publish(event)
        try:
            await stream.flush()
        except (RPCError, TimeoutError) as exc:
            _log.warning("token batch not delivered yet", topic=self._topic_name, error=str(exc))
        else:
            if batch:
                self.batches_sent += 1

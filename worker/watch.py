"""Watching a running pipeline: streamed answers as they are produced, step by step, until it ends.

Two sources are merged into one ordered story. The workflow's stream (``tokens:<step id>`` topics,
replayed from offset 0, so a watch started late misses nothing) carries the answers; the ``status``
query carries each step's start and end. A step's end is shown only once the stream has been read up to
the offset it had when the end was seen, and a step's output waits until the steps before it have ended,
so text never lands under the wrong step. A ``restart`` event voids the step's text of earlier attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.common import RawValue
from temporalio.contrib.workflow_streams import WorkflowStreamClient
from temporalio.exceptions import ApplicationError, CancelledError, TerminatedError, TimeoutError
from temporalio.service import RPCError, RPCStatusCode

from activities.streaming import TokenEvent, is_tokens_topic
from workflows.pipeline import PipelineResult, PipelineStatus, StepState

__all__ = ["PipelineWatch", "WatchError"]

_TERMINAL = ("completed", "failed", "cancelled")


class WatchError(Exception):
    """The workflow cannot be watched (it does not exist, or the server cannot be reached)."""


@dataclass
class _Step:
    id: str
    status: str = "pending"
    model: str | None = None
    started: bool = False
    end_offset: int | None = None
    end_state: StepState | None = None
    attempt: tuple[str, int] | None = None
    text: str = ""
    line_open: bool = False
    held: list[str] = field(default_factory=list)


class PipelineWatch:
    """Follow one pipeline run; ``run()`` prints to ``out`` and returns the final status.

    After ``run()``, ``texts`` holds each streamed step's text as the watcher ended up with it (earlier
    attempts discarded), ``events`` every token event read, in stream order.
    """

    def __init__(
        self,
        client: Client,
        workflow_id: str,
        *,
        out: TextIO | None = None,
        as_json: bool = False,
        every: float = 0.25,
    ) -> None:
        self.client = client
        self.workflow_id = workflow_id
        self.out = out or sys.stdout
        self.as_json = as_json
        self.every = every
        self.events: list[TokenEvent] = []
        self.status: str = "running"
        self.reason: str | None = None
        self._steps: dict[str, _Step] = {}
        self._order: list[str] = []
        self._cursor = 0
        self._consumed = 0
        self._stream_done = False
        self._finished = False
        self._stream = WorkflowStreamClient.create(client, workflow_id)

    @property
    def texts(self) -> dict[str, str]:
        return {s.id: s.text for s in self._steps.values() if s.attempt is not None}

    async def run(self) -> str:
        handle: WorkflowHandle[Any, PipelineResult] = self.client.get_workflow_handle(
            self.workflow_id, result_type=PipelineResult
        )
        try:
            await handle.describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise WatchError(f"no workflow with id {self.workflow_id!r}") from exc
            raise WatchError(f"cannot describe workflow {self.workflow_id!r}: {exc}") from exc
        reader = asyncio.create_task(self._read_stream())
        result = asyncio.ensure_future(handle.result())
        try:
            while not result.done():
                await self._poll_status(handle)
                await asyncio.wait({result}, timeout=self.every)
            final = self._final(result)
            if final is not None:
                self._on_status(final, None)
            else:
                await self._poll_status(handle)
            await asyncio.wait({reader}, timeout=30)
        finally:
            for task in (reader, result):
                if not task.done():
                    task.cancel()
            await asyncio.gather(reader, result, return_exceptions=True)
        self._stream_done = self._finished = True
        self._advance()
        self._emit_final(final)
        return self.status

    # --- sources ----------------------------------------------------------------------------------

    async def _read_stream(self) -> None:
        converter = self.client.data_converter.payload_converter
        try:
            async for item in self._stream.subscribe(None, from_offset=0, result_type=RawValue):
                if is_tokens_topic(item.topic):
                    try:
                        event = converter.from_payload(item.data.payload, TokenEvent)
                    except Exception:  # an event of a newer, unknown shape is skipped, not fatal
                        event = None
                    if event is not None:
                        self.events.append(event)
                        self._on_token(event, item.offset)
                self._consumed = max(self._consumed, item.offset + 1)
                self._advance()
        finally:
            self._stream_done = True
            self._advance()

    async def _poll_status(self, handle: WorkflowHandle[Any, PipelineResult]) -> None:
        try:
            status = await handle.query("status", result_type=PipelineStatus)
        except (RPCError, WorkflowFailureError):
            return
        ending = [
            s
            for s in status.steps
            if s.status in _TERMINAL and (s.id not in self._steps or self._steps[s.id].end_state is None)
        ]
        offset: int | None = None
        if ending:
            with contextlib.suppress(RPCError, WorkflowFailureError):
                offset = await self._stream.get_offset()
        self._on_status(status, offset)

    def _final(self, result: asyncio.Future[PipelineResult]) -> PipelineResult | None:
        error = result.exception()
        if error is None:
            final = result.result()
            self.status, self.reason = final.status, final.reason
            return final
        cause = error.cause if isinstance(error, WorkflowFailureError) else error
        if isinstance(cause, CancelledError):
            self.status = "cancelled"
        elif isinstance(cause, TerminatedError):
            self.status = "terminated"
        elif isinstance(cause, TimeoutError):
            self.status = "timed out"
        else:
            self.status = "failed"
        self.reason = cause.message if isinstance(cause, ApplicationError) else str(cause or error)
        return None

    # --- merging ----------------------------------------------------------------------------------

    def _step(self, step_id: str) -> _Step:
        if step_id not in self._steps:
            self._steps[step_id] = _Step(step_id)
        return self._steps[step_id]

    def _on_status(self, status: PipelineStatus | PipelineResult, end_offset: int | None) -> None:
        """``end_offset``: the stream's length when these ends were seen (``None``: its very end)."""
        if status.steps and not self._order:
            self._order = [s.id for s in status.steps]
        for state in status.steps:
            step = self._step(state.id)
            if state.status == "running" and not step.started:
                step.model = state.model
                self._start(step)
            if state.status in _TERMINAL and step.end_state is None:
                step.end_state = state
                step.end_offset = end_offset
            step.status = state.status
        self._advance()

    def _start(self, step: _Step, model: str | None = None) -> None:
        step.started = True
        model = step.model or model
        if self.as_json:
            self._write(
                step, self._json({"kind": "step", "step_id": step.id, "status": "running", "model": model})
            )
        else:
            self._write(step, f"▸ {step.id}" + (f" · {model}" if model else "") + "\n")

    def _on_token(self, event: TokenEvent, offset: int) -> None:
        step = self._step(event.step_id)
        if not step.started:
            self._start(step, event.model)
        key = (event.model, event.attempt)
        if self.as_json:
            self._write(step, self._json({"kind": event.kind, "offset": offset, **_fields(event)}))
        if event.kind == "restart":
            discarded = len(step.text)
            step.attempt, step.text = key, ""
            if not self.as_json:
                self._end_line(step)
                note = f"the {discarded} characters above are discarded" if discarded else "nothing shown yet"
                self._write(
                    step, f"  ↻ {step.id}: attempt {event.attempt} on {event.model} starts over ({note})\n"
                )
            return
        if step.attempt is None:
            step.attempt = key
        elif step.attempt != key:
            return  # a late event of an attempt that has since been restarted
        if event.kind == "text" and event.text:
            step.text += event.text
            if not self.as_json:
                self._write(step, event.text)
                step.line_open = True
        elif event.kind == "tool_call" and event.tool_call is not None and not self.as_json:
            call = event.tool_call
            head = f"[tool call {call.name}] " if call.name else ""
            self._write(step, head + call.arguments)
            step.line_open = True
        elif event.kind == "error" and not self.as_json:
            self._end_line(step)
            self._write(
                step,
                f"  ! {step.id}: attempt {event.attempt} on {event.model} broke off: "
                f"{event.error_type}: {event.message}\n",
            )
        elif event.kind == "done" and not self.as_json:
            self._end_line(step)

    def _advance(self) -> None:
        """Close the step under the cursor once its end has been read, then show the next one."""
        if self._finished:
            self._order += [s for s in self._steps if s not in self._order]
        while self._cursor < len(self._order):
            step = self._step(self._order[self._cursor])
            held, step.held = step.held, []
            for text in held:
                self._print(text)
            ended = step.end_state is not None and (
                self._stream_done or (step.end_offset is not None and self._consumed >= step.end_offset)
            )
            skipped = self._finished and step.end_state is None
            if not (ended or skipped):
                return
            if ended:
                self._close(step)
            self._cursor += 1

    def _close(self, step: _Step) -> None:
        state = step.end_state
        if state is None:
            return
        self._end_line(step)
        if self.as_json:
            fields = state.model_dump(
                mode="json", include={"status", "model", "usage", "cost_usd", "error"}, exclude_none=True
            )
            self._write(step, self._json({"kind": "step", "step_id": step.id, **fields}))
        elif state.status == "completed":
            cost = "price unknown" if state.cost_usd is None else f"${state.cost_usd:.6f}"
            self._write(step, f"✓ {step.id} · {state.model} · {state.usage.total_tokens} tokens · {cost}\n")
        else:
            self._write(
                step, f"✗ {step.id} {state.status}" + (f": {state.error}" if state.error else "") + "\n"
            )

    def _emit_final(self, final: PipelineResult | None) -> None:
        if self.as_json:
            record: dict[str, Any] = {"kind": "pipeline", "status": self.status, "reason": self.reason}
            if final is not None:
                record.update(
                    pipeline=final.pipeline,
                    usage=final.usage.model_dump(mode="json"),
                    cost_usd=final.cost_usd,
                    outputs=final.outputs,
                )
            self._print(self._json({k: v for k, v in record.items() if v is not None}))
            return
        line = f"pipeline {final.pipeline if final else self.workflow_id}: {self.status}"
        if self.reason:
            line += f" ({self.reason})"
        if final is not None:
            line += f" · {final.usage.total_tokens} tokens · ${final.cost_usd:.6f}"
        self._print(line + "\n")

    # --- output -----------------------------------------------------------------------------------

    def _write(self, step: _Step, text: str) -> None:
        if self._cursor < len(self._order) and self._order[self._cursor] == step.id:
            self._print(text)
        else:
            step.held.append(text)

    def _end_line(self, step: _Step) -> None:
        if step.line_open:
            step.line_open = False
            self._write(step, "\n")

    def _print(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    @staticmethod
    def _json(record: dict[str, Any]) -> str:
        return json.dumps(record, ensure_ascii=False) + "\n"


def _fields(event: TokenEvent) -> dict[str, Any]:
    data = event.model_dump(mode="json", exclude_none=True)
    data.pop("kind", None)
    return data

"""Lifecycle events out of a pipeline: the engine's ``lifecycle`` hook hands each event here, and one
``publish_events`` local activity at a time carries everything queued so far to the broker (in sequence
order, deduplicated there by ``<workflow id>:<sequence>``).

A workflow task is not completed while a local activity it started runs, so a batch sent at once would
hold back the commands of that task (the first step's activity, the close). Runs that record the
``kernelflow-lifecycle-linger`` patch therefore let their first events wait up to ``LINGER`` (one timer
per run) for the ones that follow: a pipeline finishing within ``LINGER`` of its first event publishes
all its events in the one local activity that drains the outbox before the close; a longer one
publishes what has gathered when the timer fires, in a workflow task of its own, and each later batch
at once as before. So a run's history grows by at most five events (the timer's two, a workflow task's three), and
an event leaves at most ``LINGER`` after it happened (its ``time`` says when it did).

A bus outage never fails or stalls the pipeline: steps go on while a batch is retried, and a batch
the activity gives up on (after ``PUBLISH_RETRY_SPAN``) is dropped with a warning. The pipeline
drains the outbox before it closes or continues as new, so its final events are sent (a close waits
at most ``PUBLISH_RETRY_SPAN`` during an outage).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.events import (
        PUBLISH_ATTEMPT_TIMEOUT,
        PUBLISH_EVENTS,
        PUBLISH_RETRY,
        PUBLISH_RETRY_SPAN,
        LifecycleRecord,
        PublishEventsInput,
    )
    from kernel.engine import LifecycleEvent
    from kernel.pipeline import EventsSpec

__all__ = ["LIFECYCLE_EVENTS_PATCH", "LIFECYCLE_LINGER_PATCH", "LINGER", "Outbox"]

LIFECYCLE_EVENTS_PATCH = "kernelflow-lifecycle-events"
"""Patch marker of runs that publish lifecycle events (only pipelines that opt in record it)."""

LIFECYCLE_LINGER_PATCH = "kernelflow-lifecycle-linger"
"""Patch marker of runs whose outbox lingers (see the module's docstring); earlier runs send at once."""

LINGER = timedelta(seconds=1)
"""The longest a run's first events wait for others to join their batch before they are sent."""

_BATCH = 100


class Outbox:
    def __init__(
        self,
        spec: EventsSpec,
        *,
        pipeline: str,
        tenant: str | None,
        content: Callable[[LifecycleEvent], Any] | None = None,
    ) -> None:
        self.spec = spec
        self._content = content
        """With ``events.content``: the outputs an event carries (None for events without)."""
        self.pipeline = pipeline
        self.tenant = tenant
        self.given_up = 0
        """Events dropped after the publisher's retry span (a long bus outage)."""
        self._pending: list[LifecycleRecord] = []
        self._sending = False
        self._traceparent: str | None = None
        self._traced = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._linger = workflow.patched(LIFECYCLE_LINGER_PATCH)

    def add(self, event: LifecycleEvent) -> None:
        if not self.spec.wants(event.type):
            return
        info = workflow.info()
        if not self._traced:  # the start's memo: set by the bridge from the triggering event
            self._traced = True
            memo = workflow.memo_value("traceparent", None)
            self._traceparent = memo if isinstance(memo, str) else None
        self._pending.append(
            LifecycleRecord(
                type=event.type,
                sequence=event.sequence,
                workflow_id=info.workflow_id,
                run_id=info.run_id,
                pipeline=self.pipeline,
                tenant=self.tenant,
                step_id=event.step_id,
                time=event.time,
                data=event.data,
                traceparent=self._traceparent,
                content=self._content(event) if self.spec.content and self._content is not None else None,
            )
        )
        if self._task is None:
            self._task = asyncio.ensure_future(self._send_forever())

    async def drain(self) -> None:
        """Send what is queued now and return once everything has been published or given up on."""
        self._closing = True
        await workflow.wait_condition(lambda: not self._pending and not self._sending)

    async def _send_forever(self) -> None:
        while True:
            await workflow.wait_condition(lambda: bool(self._pending))
            if self._linger and not self._closing:
                self._linger = False  # the first batch only
                with contextlib.suppress(TimeoutError):  # on time out, what has gathered goes
                    await workflow.wait_condition(
                        lambda: self._closing or len(self._pending) >= _BATCH,
                        timeout=LINGER,
                        timeout_summary="lifecycle events gather",
                    )
            batch, self._pending = self._pending[:_BATCH], self._pending[_BATCH:]
            self._sending = True
            try:
                # A local activity: no round trip through the server's task queue, so draining the
                # final events costs a pipeline's close a few milliseconds, not a scheduled activity.
                await workflow.execute_local_activity(
                    PUBLISH_EVENTS,
                    PublishEventsInput(events=batch),
                    schedule_to_close_timeout=PUBLISH_RETRY_SPAN,
                    start_to_close_timeout=PUBLISH_ATTEMPT_TIMEOUT,
                    retry_policy=PUBLISH_RETRY,
                    summary=", ".join(sorted({r.type for r in batch})),
                )
            except (
                ActivityError,
                ApplicationError,
            ) as exc:  # a local activity's refusal may arrive unwrapped
                self.given_up += len(batch)
                workflow.logger.warning(
                    "lifecycle events %s..%s not published: %s",
                    batch[0].sequence,
                    batch[-1].sequence,
                    exc.cause or exc,
                )
            finally:
                self._sending = False

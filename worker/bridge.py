"""The bridge: business events on the broker start and drive pipelines (``kernelflow bridge``).

Each event is handled once to the end before it is acknowledged:

- decoded as a CloudEvent (structured or binary mode) and matched against the triggers;
- turned into one Temporal call: start (workflow id from the business key, a duplicate-rejecting id
  reuse policy, so the same key never runs twice, even after its pipeline closed), signal (the
  ``event`` signal carries ``source#id``, which the workflow applies once), update (update id =
  ``source#id``) or signal-with-start;
- acked only once Temporal accepted the call. Temporal unreachable: the event is given back and
  redelivered after ``retry_delay_s`` (no ack, nothing lost). A signal or update for a pipeline that
  does not run (yet) is retried ``missing_retries`` times, so an event that overtook the one that
  starts the pipeline still lands;
- an event that can never succeed (not a CloudEvent, a template that fails, an unknown pipeline,
  invalid inputs, an update the workflow refuses) is published with its original bytes and headers
  plus ``Kernelflow-Dead-Letter-*`` headers to ``<dead_letter_subject>.<subject>`` and rejected, so it
  is never retried forever.

At most ``max_in_flight`` events are handled at once (the consumer's ``max_ack_pending`` is the same
bound), so a slow Temporal slows consumption instead of growing memory. Several bridges share the
durable consumer; each event goes to one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Literal

import structlog
from temporalio.client import (
    Client,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode

from kernel.broker import Broker, BrokerUnavailable, Delivery, Subscription
from kernel.cloudevents import InvalidEvent, decode_event
from kernel.errors import PipelineError
from kernel.triggers import Action, EventsConfig, MappingFailed, match_trigger
from worker.pipelines import PipelineCatalog
from workflows.contract import PIPELINE_WORKFLOW, PipelineRequest

__all__ = ["Bridge", "Outcome"]

_log = structlog.get_logger("kernelflow.bridge")

_RETRYABLE_RPC = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.ABORTED,
        RPCStatusCode.INTERNAL,
        RPCStatusCode.UNKNOWN,
        RPCStatusCode.CANCELLED,
    }
)


@dataclass(frozen=True)
class Outcome:
    """What became of one delivery."""

    result: Literal["started", "signalled", "updated", "duplicate", "unmatched", "dead_lettered", "retry"]
    detail: str = ""
    workflow_id: str | None = None
    delay_s: float = 0.0
    trigger: str | None = None


class Bridge:
    def __init__(
        self,
        client: Client,
        broker: Broker,
        config: EventsConfig,
        *,
        task_queue: str,
        catalog: PipelineCatalog | None = None,
    ) -> None:
        self.client = client
        self.broker = broker
        self.config = config
        self.task_queue = task_queue
        self.catalog = catalog
        self.stats: Counter[str] = Counter()
        """Outcomes so far (started, signalled, updated, duplicate, unmatched, dead_lettered, retry)."""
        self.in_flight = 0
        self.peak_in_flight = 0
        self.ready = asyncio.Event()
        runtime = client.service_client.config.runtime or Runtime.default()
        meter = runtime.metric_meter  # exported with the SDK's own metrics when the runtime has an exporter
        self._outcomes = meter.create_counter(
            "kernelflow_bridge_events", "Events the bridge handled, by outcome and trigger", "1"
        )
        self._in_flight_gauge = meter.create_gauge("kernelflow_bridge_in_flight", "Events being handled", "1")
        self._slots = asyncio.Semaphore(config.max_in_flight)
        self._rpc_timeout = timedelta(seconds=config.temporal_timeout_s)
        self._tasks: set[asyncio.Task[None]] = set()

    async def setup(self) -> Subscription:
        """Streams (inbound, dead letters) and the shared consumer."""
        await self.broker.ensure_stream(self.config.stream, self.config.inbound_subjects())
        await self.broker.ensure_stream(
            self.config.dead_letter_stream, [self.config.dead_letter_subject + ".>"]
        )
        return await self.broker.subscribe(
            self.config.stream,
            self.config.consumer,
            subjects=self.config.inbound_subjects(),
            max_in_flight=self.config.max_in_flight,
            ack_wait_s=self.config.ack_wait_s,
        )

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Consume until ``stop`` is set (or cancelled); events in hand are finished first."""
        stop = stop or asyncio.Event()
        subscription = await self.setup()
        self.ready.set()
        _log.info(
            "bridge consuming",
            stream=self.config.stream,
            subjects=self.config.inbound_subjects(),
            consumer=self.config.consumer,
            triggers=[t.name for t in self.config.triggers],
        )
        try:
            while not stop.is_set():
                await self._slots.acquire()
                free = 1
                while free < self.config.max_in_flight and not self._slots.locked():
                    await self._slots.acquire()
                    free += 1
                try:
                    deliveries = await subscription.fetch(free, timeout_s=1.0)
                except BrokerUnavailable as exc:
                    _log.warning("broker unavailable; retrying", error=str(exc))
                    deliveries = []
                    await _wait(stop, self.config.retry_delay_s)
                for _ in range(free - len(deliveries)):
                    self._slots.release()
                for delivery in deliveries:
                    task = asyncio.create_task(self._handle(delivery))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await subscription.close()

    async def _handle(self, delivery: Delivery) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self._in_flight_gauge.set(self.in_flight)
        try:
            outcome = await self.dispatch(
                delivery.subject, delivery.data, delivery.headers, attempt=delivery.attempt
            )
            if outcome.result == "dead_lettered":
                outcome = await self._dead_letter(delivery, outcome)
            await self._settle(delivery, outcome)
        except Exception:  # a bug here must not kill the bridge; the event comes back after ack_wait
            _log.exception("event handling failed", subject=delivery.subject)
        finally:
            self.in_flight -= 1
            self._in_flight_gauge.set(self.in_flight)
            self._slots.release()

    async def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        self.stats[outcome.result] += 1
        self._outcomes.add(1, {"outcome": outcome.result, "trigger": outcome.trigger or "none"})
        log = _log.warning if outcome.result in ("dead_lettered", "retry") else _log.debug
        log(
            "event " + outcome.result,
            subject=delivery.subject,
            attempt=delivery.attempt,
            workflow_id=outcome.workflow_id,
            detail=outcome.detail,
        )
        try:
            if outcome.result == "retry":
                await delivery.retry(outcome.delay_s)
            elif outcome.result == "dead_lettered":
                await delivery.reject()
            else:
                await delivery.ack()
        except BrokerUnavailable as exc:
            # Not settled: the broker redelivers after ack_wait; every action is idempotent.
            _log.warning("could not settle event", subject=delivery.subject, error=str(exc))

    async def _dead_letter(self, delivery: Delivery, outcome: Outcome) -> Outcome:
        headers = dict(delivery.headers)
        headers.update(
            {
                "Kernelflow-Dead-Letter-Reason": _header_safe(outcome.detail),
                "Kernelflow-Dead-Letter-Subject": delivery.subject,
                "Kernelflow-Dead-Letter-Attempts": str(delivery.attempt),
                "Kernelflow-Dead-Letter-Time": str(int(time.time())),
            }
        )
        digest = hashlib.sha256(delivery.subject.encode() + b"\0" + delivery.data).hexdigest()
        try:
            await self.broker.publish(
                f"{self.config.dead_letter_subject}.{delivery.subject}",
                delivery.data,
                headers=headers,
                dedup_id=f"dlq-{digest}",
            )
        except BrokerUnavailable as exc:
            return Outcome(
                "retry", f"dead-letter publication failed: {exc}", delay_s=self.config.retry_delay_s
            )
        return outcome

    # --- one event -------------------------------------------------------------------------------

    async def dispatch(
        self, subject: str, data: bytes, headers: Mapping[str, str], *, attempt: int = 1
    ) -> Outcome:
        """Decode, match and send one event to Temporal; says what happened (nothing is acked here)."""
        try:
            event = decode_event(data, headers)
            matched = match_trigger(self.config.triggers, subject, event, headers)
        except (InvalidEvent, MappingFailed) as exc:
            return Outcome("dead_lettered", str(exc))
        if matched is None:
            return Outcome("unmatched", f"no trigger for subject {subject!r} and type {event.type!r}")
        _, action = matched
        return replace(await self._dispatch_action(action, attempt), trigger=action.trigger)

    async def _dispatch_action(self, action: Action, attempt: int) -> Outcome:
        try:
            return await self._send(action, attempt)
        except PipelineError as exc:
            return Outcome("dead_lettered", f"trigger {action.trigger!r}: {exc}", action.workflow_id)
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause or exc
            return Outcome(
                "dead_lettered",
                f"trigger {action.trigger!r}: update {action.name!r} refused: {cause}",
                action.workflow_id,
            )
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND and action.kind in ("signal", "update"):
                if attempt <= action.missing_retries:
                    delay = min(self.config.retry_delay_s * attempt, 30.0)
                    return Outcome("retry", "no running pipeline yet", action.workflow_id, delay_s=delay)
                return Outcome(
                    "dead_lettered",
                    f"trigger {action.trigger!r}: no running pipeline {action.workflow_id!r} "
                    f"after {attempt} deliveries",
                    action.workflow_id,
                )
            if exc.status in _RETRYABLE_RPC:
                return Outcome(
                    "retry",
                    f"Temporal: {exc.status.name}: {exc.message}",
                    action.workflow_id,
                    self.config.retry_delay_s,
                )
            return Outcome(
                "dead_lettered",
                f"trigger {action.trigger!r}: Temporal refused: {exc.message}",
                action.workflow_id,
            )
        except (RuntimeError, OSError, TimeoutError) as exc:
            return Outcome("retry", f"Temporal: {exc}", action.workflow_id, self.config.retry_delay_s)

    async def _send(self, action: Action, attempt: int) -> Outcome:
        if action.kind in ("start", "signal_with_start"):
            return await self._start(action)
        handle: WorkflowHandle[Any, Any] = self.client.get_workflow_handle(action.workflow_id)
        if action.kind == "signal":
            await handle.signal(action.name or "event", action.args, rpc_timeout=self._rpc_timeout)
            return Outcome("signalled", action.name or "event", action.workflow_id)
        await handle.execute_update(
            action.name or "", action.args, id=_update_id(action.event_key), rpc_timeout=self._rpc_timeout
        )
        return Outcome("updated", action.name or "", action.workflow_id)

    async def _start(self, action: Action) -> Outcome:
        assert action.pipeline is not None
        if self.catalog is not None:
            spec = self.catalog.get(action.pipeline, action.version)
            spec.resolve_inputs(action.inputs)
        request = PipelineRequest(
            pipeline_name=action.pipeline,
            pipeline_version=action.version,
            inputs=action.inputs,
            tenant=action.tenant,
        )
        options: dict[str, Any] = {}
        if action.traceparent:
            options["memo"] = {"traceparent": action.traceparent}  # lifecycle events join the event's trace
        with_signal = action.kind == "signal_with_start"
        # A signal-with-start signals the running pipeline; a plain start of a running key is a duplicate.
        conflict = WorkflowIDConflictPolicy.USE_EXISTING if with_signal else WorkflowIDConflictPolicy.FAIL
        if with_signal:
            options.update(start_signal=action.name or "event", start_signal_args=[action.args])
        try:
            await self.client.start_workflow(
                PIPELINE_WORKFLOW,
                request,
                id=action.workflow_id,
                task_queue=self.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=conflict,
                rpc_timeout=self._rpc_timeout,
                static_summary=f"pipeline {action.pipeline} · event {action.event_key}"[:400],
                **options,
            )
        except WorkflowAlreadyStartedError:
            return Outcome("duplicate", "the business key's pipeline already ran or runs", action.workflow_id)
        return Outcome("signalled" if with_signal else "started", action.kind, action.workflow_id)


def _update_id(event_key: str) -> str:
    return "event-" + hashlib.sha256(event_key.encode()).hexdigest()[:32]


def _header_safe(text: str) -> str:
    return " ".join(text.split())[:1000]


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)

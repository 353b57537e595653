"""The ``publish_events`` activity: pipelines' lifecycle events out to the broker and to webhooks.

Each lifecycle event becomes a CloudEvent (structured JSON):

- ``id`` = ``<workflow id>:<sequence>`` (the sequence counts per workflow id, across continue-as-new),
  also the JetStream ``Nats-Msg-Id``: a retried activity or a replayed workflow publishes nothing twice;
- ``type`` = ``kernelflow.<type>`` (``kernelflow.pipeline.completed``...), ``source`` =
  ``<outbound.source>/<pipeline>``, ``subject`` = the workflow id;
- extensions ``kftenant``, ``kfpipeline``, ``kfrunid``, ``kfstep`` and, when the pipeline carries one,
  the W3C ``traceparent``;
- broker subject ``<subject_prefix>.<tenant or _>.<pipeline>.<type>``, e.g.
  ``kernelflow.events.acme.order-flow.pipeline.completed`` (``kernelflow.events.*.order-flow.>``
  follows one pipeline for every tenant).

Deduplication holds only within the stream's duplicate window, so the activity's whole retry span
(``PUBLISH_RETRY_SPAN``: the schedule-to-close timeout workflows use) must fit inside it; the
publisher refuses a window that is shorter. Once the span is over the activity gives up and the
pipeline goes on: a bus outage never fails a pipeline.

Outbound webhooks receive the same structured CloudEvent, signed with Standard Webhooks
(``webhook-id`` = the event id, stable across retries so subscribers can deduplicate); a failed
delivery fails the attempt and Temporal retries it with backoff (the broker side is deduplicated).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import httpx
from google.protobuf import json_format
from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.common import RetryPolicy
from temporalio.converter import DataConverter
from temporalio.exceptions import ApplicationError

from kernel.broker import Broker, BrokerError, BrokerUnavailable
from kernel.cloudevents import CloudEvent, encode_structured
from kernel.errors import ConfigurationError
from kernel.triggers import OutboundConfig, WebhookSubscriber
from kernel.webhooks import signature_headers

__all__ = [
    "PUBLISH_ATTEMPT_TIMEOUT",
    "PUBLISH_EVENTS",
    "PUBLISH_RETRY",
    "PUBLISH_RETRY_SPAN",
    "EventPublisher",
    "LifecycleRecord",
    "PublishEventsInput",
    "PublishEventsResult",
    "publish_events_unconfigured",
    "to_cloudevent",
]

PUBLISH_EVENTS = "publish_events"
"""The activity's name: public API, never renamed."""

PUBLISH_RETRY_SPAN = timedelta(minutes=15)
"""Schedule-to-close of ``publish_events``: the longest a bus outage can hold an event (and delay the
close of a pipeline that drains its final events). Must be shorter than the duplicate window."""

PUBLISH_ATTEMPT_TIMEOUT = timedelta(seconds=30)
"""Start-to-close of one attempt."""

PUBLISH_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0, maximum_interval=timedelta(seconds=60)
)

_TOKEN = re.compile(r"[^A-Za-z0-9_-]")


class LifecycleRecord(BaseModel):
    """One lifecycle event as the workflow hands it over (references and summaries, never prompts or
    outputs unless the pipeline opted in)."""

    type: str
    sequence: int = Field(ge=0)
    workflow_id: str
    run_id: str | None = None
    pipeline: str
    tenant: str | None = None
    step_id: str | None = None
    time: datetime
    data: dict[str, Any] = Field(default_factory=dict)
    traceparent: str | None = None
    content: Any = Field(default=None, description="Outputs, when the pipeline opted in (events.content).")


class PublishEventsInput(BaseModel):
    events: list[LifecycleRecord] = Field(min_length=1)


class PublishEventsResult(BaseModel):
    published: int = 0
    duplicates: int = 0
    webhooks: int = 0


def _token(value: str | None) -> str:
    return _TOKEN.sub("_", value) if value else "_"


def to_cloudevent(record: LifecycleRecord, *, source: str) -> CloudEvent:
    extensions: dict[str, Any] = {"kfpipeline": record.pipeline, "kfsequence": record.sequence}
    if record.tenant:
        extensions["kftenant"] = record.tenant
    if record.run_id:
        extensions["kfrunid"] = record.run_id
    if record.step_id:
        extensions["kfstep"] = record.step_id
    if record.traceparent:
        extensions["traceparent"] = record.traceparent
    return CloudEvent(
        id=f"{record.workflow_id}:{record.sequence}",
        source=f"{source}/{record.pipeline}",
        type=f"kernelflow.{record.type}",
        subject=record.workflow_id,
        time=record.time,
        datacontenttype="application/json",
        data=record.data,
        **extensions,
    )


def subject_for(record: LifecycleRecord, prefix: str) -> str:
    return f"{prefix}.{_token(record.tenant)}.{_token(record.pipeline)}.{record.type}"


class EventPublisher:
    """Holds the broker connection and HTTP client; its bound ``publish_events`` is the activity."""

    def __init__(
        self,
        broker: Broker,
        config: OutboundConfig,
        *,
        environ: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
        retry_span: timedelta = PUBLISH_RETRY_SPAN,
        close_broker: bool = False,
    ) -> None:
        if config.duplicate_window_s < retry_span.total_seconds():
            raise ConfigurationError(
                f"events.outbound.duplicate_window_s is {config.duplicate_window_s:g}s, shorter than the "
                f"publisher's retry span of {retry_span.total_seconds():g}s: a retry after the window "
                "would publish twice; raise it to at least that"
            )
        self.broker = broker
        self.config = config
        self.environ = os.environ if environ is None else environ
        self._http = http_client
        self._stream_ready = False
        self._close_broker = close_broker
        self.data_converter: DataConverter | None = None
        """Encodes opted-in content like any payload (set by ``build_worker`` to the client's)."""

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        if self._close_broker:
            await self.broker.close()

    async def _ensure_stream(self) -> None:
        if not self._stream_ready:
            await self.broker.connect()
            await self.broker.ensure_stream(
                self.config.stream,
                [self.config.subject_prefix + ".>"],
                duplicate_window_s=self.config.duplicate_window_s,
            )
            self._stream_ready = True

    @activity.defn(name=PUBLISH_EVENTS)
    async def publish_events(self, request: PublishEventsInput) -> PublishEventsResult:
        result = PublishEventsResult()
        try:
            await self._ensure_stream()
            for record in request.events:
                record = await self._with_content(record)
                event = to_cloudevent(record, source=self.config.source)
                body, headers = encode_structured(event)
                if record.traceparent:
                    headers["traceparent"] = record.traceparent
                published = await self.broker.publish(
                    subject_for(record, self.config.subject_prefix), body, headers=headers, dedup_id=event.id
                )
                result.duplicates += published.duplicate
                result.published += not published.duplicate
        except BrokerUnavailable as exc:
            raise ApplicationError(str(exc), type="BrokerUnavailable") from exc
        except BrokerError as exc:
            raise ApplicationError(str(exc), type="BrokerError") from exc
        for subscriber in self.config.webhooks:
            result.webhooks += await self._deliver(subscriber, request.events)
        return result

    async def _with_content(self, record: LifecycleRecord) -> LifecycleRecord:
        """Opted-in content goes out as a Temporal payload in proto JSON, through the worker's codec:
        ciphertext when the worker encrypts (the codec server's /decode reads it)."""
        if record.content is None:
            return record
        if self.data_converter is None:
            raise ApplicationError(
                "events.content needs the worker's data converter",
                type="ConfigurationError",
                non_retryable=True,
            )
        (payload,) = await self.data_converter.encode([record.content])
        content = json_format.MessageToDict(payload)
        return record.model_copy(update={"data": {**record.data, "content": content}, "content": None})

    async def _deliver(self, subscriber: WebhookSubscriber, records: list[LifecycleRecord]) -> int:
        secret = self.environ.get(subscriber.secret_env)
        if not secret:
            raise ApplicationError(
                f"webhook {subscriber.url}: the secret variable {subscriber.secret_env} is not set",
                type="ConfigurationError",
            )
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=10.0)
        sent = 0
        for record in records:
            event = to_cloudevent(record, source=self.config.source)
            if (
                subscriber.types
                and event.type not in subscriber.types
                and record.type not in subscriber.types
            ):
                continue
            body, headers = encode_structured(event)
            headers.update(signature_headers(secret, event.id, body))
            try:
                answer = await self._http.post(subscriber.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                raise ApplicationError(f"webhook {subscriber.url}: {exc!r}", type="WebhookFailed") from exc
            if answer.status_code >= 300:
                raise ApplicationError(
                    f"webhook {subscriber.url} answered {answer.status_code}", type="WebhookFailed"
                )
            sent += 1
        return sent


@activity.defn(name=PUBLISH_EVENTS)
async def publish_events_unconfigured(request: PublishEventsInput) -> PublishEventsResult:
    """What a worker without an ``events:`` section answers: a refusal, not retried, so a pipeline
    that opted in goes on without waiting out the retry span."""
    raise ApplicationError(
        f"this worker publishes no lifecycle events ({len(request.events)} dropped): add an events: section "
        "with a broker to its config file",
        type="EventsNotConfigured",
        non_retryable=True,
    )

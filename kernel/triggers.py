"""Triggers: which business events start or drive which pipelines (the ``events:`` section of the
worker config), and the pure mapping from a CloudEvent to one Temporal action.

    events:
      broker: nats://127.0.0.1:4222
      triggers:
        - name: order-paid
          subject: shop.orders.paid            # broker subject; * and > wildcards
          type: com.shop.order.paid            # CloudEvents type
          filter: "data.amount > 0"            # optional expression, same language as `transform`
          start:
            pipeline: order-fulfilment         # registered on the worker
            workflow_id: "order-{{ data.order_id }}"
            inputs: {order_id: "{{ data.order_id }}", amount: "{{ data.amount }}"}
        - name: order-shipped
          subject: shop.orders.shipped
          type: com.shop.order.shipped
          signal:
            workflow_id: "order-{{ data.order_id }}"
            event: order.shipped               # the name a wait_event step waits for

Templates and filters see ``event`` (every CloudEvents attribute, extensions too), ``data`` (the
event's data) and ``message`` (``subject`` and ``headers`` of the broker message).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kernel.cloudevents import CloudEvent
from kernel.errors import KernelflowError, PipelineError
from kernel.expressions import evaluate, expression_refs, render_value, value_refs

__all__ = [
    "Action",
    "EventsConfig",
    "IngressConfig",
    "MappingFailed",
    "OutboundConfig",
    "SignalAction",
    "StartAction",
    "TriggerSpec",
    "UpdateAction",
    "WebhookSubscriber",
    "match_trigger",
]

_ROOTS = frozenset({"event", "data", "message"})
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


class MappingFailed(KernelflowError):
    """An event matched a trigger but could not be mapped to an action (a template or filter failed)."""


def _check_template(value: Any, location: str) -> None:
    for refs in value_refs(value, location=location):
        unknown = refs.variables - _ROOTS
        if unknown:
            raise ValueError(
                f"{location} reads {', '.join(sorted(unknown))}; templates see only event, data and message"
            )


class StartAction(BaseModel):
    """Start a pipeline registered on the worker. The same workflow id is never started twice (the
    id reuse policy refuses duplicates, also after the first run closed)."""

    model_config = ConfigDict(extra="forbid")

    pipeline: str = Field(min_length=1, description="Name of a pipeline registered on the worker.")
    version: int | None = None
    workflow_id: str = Field(min_length=1, description="Template over the event: the business key.")
    inputs: dict[str, Any] = Field(default_factory=dict, description="Input name -> template.")
    tenant: str | None = None
    signal: str | None = Field(
        default=None,
        description="With a signal name: signal-with-start (deliver the event, start if needed).",
    )
    event: str | None = Field(
        default=None, description="With signal 'event': the event name (default: type)."
    )
    payload: Any = "{{ data }}"

    @model_validator(mode="after")
    def _templates(self) -> StartAction:
        for name in ("workflow_id", "inputs", "tenant", "event", "payload"):
            _check_template(getattr(self, name), name)
        return self


class SignalAction(BaseModel):
    """Signal a running pipeline. The ``event`` signal carries the CloudEvent's source and id, so a
    redelivered event is applied once."""

    model_config = ConfigDict(extra="forbid")

    workflow_id: str = Field(min_length=1)
    name: str = Field(default="event", min_length=1, description="Signal name.")
    event: str | None = Field(
        default=None, description="For the event signal: the event name (default: type)."
    )
    payload: Any = "{{ data }}"
    missing_retries: int = Field(
        default=20,
        ge=0,
        description="Deliveries to try while no pipeline runs under the id (it may start later), "
        "before the event is dead-lettered.",
    )

    @model_validator(mode="after")
    def _templates(self) -> SignalAction:
        for name in ("workflow_id", "event", "payload"):
            _check_template(getattr(self, name), name)
        return self


class UpdateAction(BaseModel):
    """Send an update (``approve``, ``reject``, ``reroute``...) to a running pipeline; the update id
    is the event's, so a redelivered event is applied once."""

    model_config = ConfigDict(extra="forbid")

    workflow_id: str = Field(min_length=1)
    name: str = Field(min_length=1, description="Update name.")
    args: Any = "{{ data }}"
    missing_retries: int = Field(default=20, ge=0)

    @model_validator(mode="after")
    def _templates(self) -> UpdateAction:
        for name in ("workflow_id", "args"):
            _check_template(getattr(self, name), name)
        return self


class TriggerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1)
    subject: str = Field(min_length=1, description="Broker subject pattern (* one token, > the rest).")
    type: str | None = Field(default=None, description="CloudEvents type to match (default: any).")
    filter: str | None = Field(default=None, description="Expression over event, data, message.")
    start: StartAction | None = None
    signal_with_start: StartAction | None = None
    signal: SignalAction | None = None
    update: UpdateAction | None = None

    @field_validator("filter")
    @classmethod
    def _filter(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                refs = expression_refs(value, location="filter")
            except PipelineError as exc:
                raise ValueError(str(exc)) from exc
            unknown = refs.variables - _ROOTS
            if unknown:
                raise ValueError(
                    f"filter reads {', '.join(sorted(unknown))}; filters see only event, data and message"
                )
        return value

    @model_validator(mode="after")
    def _one_action(self) -> TriggerSpec:
        given = [
            k for k in ("start", "signal_with_start", "signal", "update") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"trigger {self.name!r} needs exactly one action of start, signal_with_start, signal, update; "
                f"got {', '.join(given) or 'none'}"
            )
        if self.signal_with_start is not None and self.signal_with_start.signal is None:
            self.signal_with_start.signal = "event"
        if self.start is not None and self.start.signal is not None:
            raise ValueError(f"trigger {self.name!r}: start takes no signal; use signal_with_start")
        return self

    @property
    def action(self) -> StartAction | SignalAction | UpdateAction:
        action = self.start or self.signal_with_start or self.signal or self.update
        assert action is not None  # guaranteed by _one_action
        return action


class IngressConfig(BaseModel):
    """The HTTP webhook ingress (``POST /events/<subject>``), authenticated with Standard Webhooks."""

    model_config = ConfigDict(extra="forbid")

    listen: str = Field(default="127.0.0.1:8787", description="host:port")
    secret_env: str = Field(default="KERNELFLOW_WEBHOOK_SECRET", description="Env var holding whsec_...")
    tolerance_s: int = Field(default=300, gt=0, description="Accepted clock skew of webhook-timestamp.")
    subject_prefix: str = Field(default="", description="Prepended to the path's subject.")


class WebhookSubscriber(BaseModel):
    """An HTTP endpoint receiving outbound lifecycle events (signed like the ingress expects)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://")
    secret_env: str
    types: list[str] = Field(default_factory=list, description="Event types to send (default: all).")


class OutboundConfig(BaseModel):
    """Lifecycle events published by pipelines."""

    model_config = ConfigDict(extra="forbid")

    default: bool = Field(default=False, description="Publish for pipelines whose spec says nothing.")
    stream: str = "KERNELFLOW_LIFECYCLE"
    subject_prefix: str = "kernelflow.events"
    source: str = "kernelflow"
    duplicate_window_s: float = Field(
        default=1800.0,
        gt=0,
        description="JetStream deduplication window: must cover the publisher's whole retry span.",
    )
    webhooks: list[WebhookSubscriber] = Field(default_factory=list)


class EventsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    broker: str = Field(
        default="nats://127.0.0.1:4222", description="Broker URL; its scheme picks the plugin."
    )
    stream: str = Field(default="KERNELFLOW_INBOUND", description="Stream holding the inbound subjects.")
    subjects: list[str] = Field(default_factory=list, description="Stream subjects (default: the triggers').")
    consumer: str = Field(default="kernelflow-bridge", description="Durable consumer shared by the bridges.")
    dead_letter_stream: str = "KERNELFLOW_DLQ"
    dead_letter_subject: str = "kernelflow.dlq"
    max_in_flight: int = Field(default=64, gt=0, description="Events handled at once by one bridge.")
    ack_wait_s: float = Field(default=30.0, gt=0)
    retry_delay_s: float = Field(
        default=1.0, gt=0, description="Redelivery delay while Temporal is unreachable."
    )
    temporal_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Per Temporal call; keep it below ack_wait_s, or a slow call is redelivered.",
    )
    triggers: list[TriggerSpec] = Field(default_factory=list)
    ingress: IngressConfig | None = None
    outbound: OutboundConfig = Field(default_factory=OutboundConfig)

    @model_validator(mode="after")
    def _names(self) -> EventsConfig:
        seen: set[str] = set()
        for trigger in self.triggers:
            if trigger.name in seen:
                raise ValueError(f"two triggers are named {trigger.name!r}")
            seen.add(trigger.name)
        return self

    def inbound_subjects(self) -> list[str]:
        return self.subjects or sorted({t.subject for t in self.triggers})


# --- mapping -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """What one event asks of Temporal, rendered and ready to send."""

    kind: Literal["start", "signal_with_start", "signal", "update"]
    trigger: str
    workflow_id: str
    event_key: str
    pipeline: str | None = None
    version: int | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    tenant: str | None = None
    name: str | None = None
    """Signal or update name."""
    args: Any = None
    """The signal's or update's argument."""
    missing_retries: int = 0
    traceparent: str | None = None
    """The event's W3C trace context (CloudEvents distributed-tracing extension), if any."""


def _context(event: CloudEvent, subject: str, headers: Mapping[str, str]) -> dict[str, Any]:
    return {
        "event": event.context(),
        "data": event.data,
        "message": {"subject": subject, "headers": dict(headers)},
    }


def _render(value: Any, context: Mapping[str, Any], location: str) -> Any:
    try:
        return render_value(value, context, location=location)
    except PipelineError as exc:
        raise MappingFailed(str(exc)) from exc


def _text(value: Any, context: Mapping[str, Any], location: str) -> str:
    rendered = _render(value, context, location)
    text = str(rendered).strip() if rendered is not None else ""
    if not text:
        raise MappingFailed(f"{location}: the template {value!r} rendered empty")
    return text


def match_trigger(
    triggers: list[TriggerSpec], subject: str, event: CloudEvent, headers: Mapping[str, str]
) -> tuple[TriggerSpec, Action] | None:
    """The first trigger whose subject, type and filter accept the event, and its rendered action.
    ``None`` when no trigger wants the event; ``MappingFailed`` when the one that does cannot map it."""
    from kernel.broker import subject_matches

    context = _context(event, subject, headers)
    for trigger in triggers:
        if not subject_matches(trigger.subject, subject):
            continue
        if trigger.type is not None and trigger.type != event.type:
            continue
        location = f"trigger {trigger.name!r}"
        if trigger.filter is not None:
            try:
                wanted = bool(evaluate(trigger.filter, context, location=f"{location}.filter"))
            except PipelineError as exc:
                raise MappingFailed(str(exc)) from exc
            if not wanted:
                continue
        return trigger, _action(trigger, event, context, location)
    return None


def _action(trigger: TriggerSpec, event: CloudEvent, context: Mapping[str, Any], location: str) -> Action:
    spec = trigger.action
    workflow_id = _text(spec.workflow_id, context, f"{location}.workflow_id")
    if isinstance(spec, StartAction):
        inputs = _render(spec.inputs, context, f"{location}.inputs")
        tenant = _text(spec.tenant, context, f"{location}.tenant") if spec.tenant else None
        args = None
        if spec.signal is not None:
            args = _signal_args(spec.signal, spec.event, spec.payload, event, context, location)
        return Action(
            kind="signal_with_start" if spec.signal else "start",
            trigger=trigger.name,
            workflow_id=workflow_id,
            event_key=event.key,
            pipeline=spec.pipeline,
            version=spec.version,
            inputs=inputs,
            tenant=tenant,
            name=spec.signal,
            args=args,
            traceparent=_traceparent(event),
        )
    if isinstance(spec, SignalAction):
        return Action(
            kind="signal",
            trigger=trigger.name,
            workflow_id=workflow_id,
            event_key=event.key,
            name=spec.name,
            args=_signal_args(spec.name, spec.event, spec.payload, event, context, location),
            missing_retries=spec.missing_retries,
        )
    return Action(
        kind="update",
        trigger=trigger.name,
        workflow_id=workflow_id,
        event_key=event.key,
        name=spec.name,
        args=_render(spec.args, context, f"{location}.args"),
        missing_retries=spec.missing_retries,
    )


def _traceparent(event: CloudEvent) -> str | None:
    value = event.extensions.get("traceparent")
    return value if isinstance(value, str) and _TRACEPARENT.match(value) else None


def _signal_args(
    signal: str, name: str | None, payload: Any, event: CloudEvent, context: Mapping[str, Any], location: str
) -> Any:
    rendered = _render(payload, context, f"{location}.payload")
    if signal != "event":
        return rendered
    # The business event id rides along so the workflow applies a redelivered event once.
    return {
        "name": _text(name, context, f"{location}.event") if name else event.type,
        "payload": rendered,
        "id": _event_id(event.key),
    }


def _event_id(key: str) -> str:
    """The ``event`` signal's id holds at most 200 characters; longer keys are shortened to a digest."""
    return key if len(key) <= 200 else "sha256:" + hashlib.sha256(key.encode()).hexdigest()

"""``kernelflow bridge`` and ``kernelflow events publish|tail``, and the events part of ``kernelflow dev``.

The broker URL comes from ``--broker``, else ``KERNELFLOW_BROKER_URL``, else ``events.broker`` in the
config file (default ``nats://127.0.0.1:4222``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kernel.broker import Broker, BrokerError
from kernel.cloudevents import CloudEvent, InvalidEvent, decode_event, encode_binary, encode_structured
from kernel.errors import ConfigurationError
from kernel.triggers import EventsConfig
from worker.config import KernelflowConfig, WorkerSettings, load_config

__all__ = ["add_commands", "dev_events", "run_command"]

BROKER_ENV = "KERNELFLOW_BROKER_URL"


def add_commands(sub: Any, temporal_options: Callable[[argparse.ArgumentParser], None]) -> None:
    bridge = sub.add_parser(
        "bridge", help="turn business events on the broker into pipeline starts, signals and updates"
    )
    temporal_options(bridge)
    bridge.add_argument("--broker", help=f"broker URL (env {BROKER_ENV}, else events.broker in the config)")
    bridge.add_argument("--log-level", default="info")

    events = sub.add_parser("events", help="publish or follow CloudEvents on the broker (debugging triggers)")
    verbs = events.add_subparsers(dest="events_command", required=True, metavar="VERB")
    publish = verbs.add_parser("publish", help="publish one CloudEvent")
    publish.add_argument("subject")
    publish.add_argument("--type", required=True, help="CloudEvents type, e.g. com.shop.order.paid")
    publish.add_argument("--data", default="null", help="the event's data as JSON")
    publish.add_argument("--source", default="kernelflow-cli", help="CloudEvents source")
    publish.add_argument("--id", help="CloudEvents id (default: random); the same id+source is one event")
    publish.add_argument(
        "--binary", action="store_true", help="binary mode (ce-* headers) instead of structured"
    )
    tail = verbs.add_parser("tail", help="print events on a subject as they arrive (* and > wildcards)")
    tail.add_argument("subject")
    tail.add_argument("--all", action="store_true", help="from the start of the stream, not only new ones")
    tail.add_argument("--count", type=int, help="stop after this many")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    from worker.ops_cli import add_dlq_parser

    dlq = add_dlq_parser(verbs)
    for verb in (publish, tail, dlq):
        verb.add_argument("--broker", help=f"broker URL (env {BROKER_ENV}, else events.broker in the config)")
        verb.add_argument("--config", help="YAML config file (env KERNELFLOW_CONFIG)")


def _events_config(config: KernelflowConfig, broker_url: str | None) -> EventsConfig:
    events = config.events or EventsConfig()
    url = broker_url or os.environ.get(BROKER_ENV)
    return events.model_copy(update={"broker": url}) if url else events


def _broker(url: str) -> Broker:
    from brokers import broker_for_url

    return broker_for_url(url)


async def run_command(args: argparse.Namespace) -> int:
    if args.command == "bridge":
        return await _cmd_bridge(args)
    if args.events_command == "publish":
        return await _cmd_publish(args)
    if args.events_command == "dlq":
        from worker.ops_cli import dlq_command

        return await dlq_command(args, _events_config(load_config(_config_path(args)), args.broker), _broker)
    return await _cmd_tail(args)


async def _cmd_bridge(args: argparse.Namespace) -> int:
    from worker.bridge import Bridge
    from worker.cli import _client, _on_signals, _overrides
    from worker.logs import configure_logging
    from worker.pipelines import load_catalog, pipelines_dir
    from worker.webhook_ingress import WebhookIngress

    settings = WorkerSettings.from_env(**_overrides(args))
    configure_logging(settings.log_format, args.log_level)
    config = load_config(settings.config_file)
    events = _events_config(config, args.broker)
    if not events.triggers:
        raise ConfigurationError(
            "the bridge has no triggers: add events.triggers to the config file (KERNELFLOW_CONFIG); see docs/events.md"
        )
    folder = pipelines_dir(config.pipelines_dir)
    catalog = load_catalog(folder) if folder is not None else None
    # The connection profile (TLS, API key) and payload settings (storage, keys) of every other command.
    client = await _client(settings)
    stop = asyncio.Event()
    _on_signals(stop)
    async with _broker(events.broker) as broker:
        bridge = Bridge(client, broker, events, task_queue=settings.task_queue, catalog=catalog)
        ingress = WebhookIngress(broker, events) if events.ingress is not None else None
        if ingress is not None:
            await ingress.start()
            print(f"webhook ingress on {ingress.url}/events/<subject>", file=sys.stderr, flush=True)
        try:
            await bridge.run(stop)
        finally:
            if ingress is not None:
                await ingress.stop()
    print(f"bridge stopped: {dict(bridge.stats)}", file=sys.stderr)
    return 0


async def _cmd_publish(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        raise ConfigurationError(f"--data is not valid JSON: {exc}") from exc
    try:
        event = CloudEvent(
            id=args.id or uuid.uuid4().hex,
            source=args.source,
            type=args.type,
            time=datetime.now(tz=UTC),
            datacontenttype="application/json",
            data=data,
        )
    except ValueError as exc:
        raise ConfigurationError(f"not a valid CloudEvent: {exc}") from exc
    events = _events_config(load_config(_config_path(args)), args.broker)
    body, headers = encode_binary(event) if args.binary else encode_structured(event)
    async with _broker(events.broker) as broker:
        try:
            published = await broker.publish(args.subject, body, headers=headers, dedup_id=event.key)
        except BrokerError as exc:
            raise ConfigurationError(
                f"{exc}. Subjects are stored once a bridge (or `kernelflow dev`) has created the stream for its "
                "triggers' subjects"
            ) from exc
    note = " (duplicate: already stored, nothing appended)" if published.duplicate else ""
    print(
        f"published {event.type} id={event.id} to {args.subject} (stream {published.stream}, seq {published.sequence}){note}"
    )
    return 0


async def _cmd_tail(args: argparse.Namespace) -> int:
    events = _events_config(load_config(_config_path(args)), args.broker)
    seen = 0
    async with _broker(events.broker) as broker:
        async for subject, body, headers in broker.watch(args.subject, from_start=args.all):
            print(_describe(subject, body, headers, as_json=args.json), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    return 0


def _describe(subject: str, body: bytes, headers: dict[str, str], *, as_json: bool) -> str:
    try:
        event = decode_event(body, headers)
    except InvalidEvent as exc:
        if as_json:
            return json.dumps(
                {"subject": subject, "invalid": str(exc), "body": body.decode(errors="replace")}
            )
        return f"{subject}  (not a CloudEvent: {exc})  {body[:200]!r}"
    if as_json:
        return json.dumps({"subject": subject, "event": event.model_dump(mode="json", exclude_none=True)})
    data = json.dumps(event.data, ensure_ascii=False) if event.data_base64 is None else f"<{len(body)} bytes>"
    return f"{subject}  {event.type}  id={event.id} source={event.source}  {data}"


def _config_path(args: argparse.Namespace) -> Path | None:
    raw = getattr(args, "config", None) or os.environ.get("KERNELFLOW_CONFIG")
    return Path(raw) if raw else None


# --- kernelflow dev ------------------------------------------------------------------------------


@dataclass
class DevEvents:
    """What ``kernelflow dev`` runs for events: a NATS server, and a bridge when triggers exist."""

    broker_url: str
    publisher: Any = None
    """The worker's ``publish_events`` publisher, on the embedded server."""
    lines: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def dev_events(
    client: Any, config: KernelflowConfig, *, state_dir: str, port: int, task_queue: str, catalog: Any
) -> AsyncIterator[DevEvents]:
    from worker.bridge import Bridge
    from worker.nats_server import NatsServer
    from worker.webhook_ingress import WebhookIngress

    with NatsServer(state_dir=state_dir, port=port) as server:
        from worker.app import event_publisher

        events = (config.events or EventsConfig()).model_copy(update={"broker": server.url})
        catalog.events_default = events.outbound.default
        info = DevEvents(broker_url=server.url, publisher=event_publisher(config, broker_url=server.url))
        info.lines.append(
            f"NATS       {server.url}  (JetStream; `kernelflow events tail '>' --broker {server.url}`)"
        )
        async with _broker(server.url) as broker:
            stop = asyncio.Event()
            task: asyncio.Task[None] | None = None
            ingress = None
            if events.triggers:
                bridge = Bridge(client, broker, events, task_queue=task_queue, catalog=catalog)
                task = asyncio.create_task(bridge.run(stop))
                await asyncio.wait(
                    {task, asyncio.ensure_future(bridge.ready.wait())}, return_when="FIRST_COMPLETED"
                )
                if task.done():
                    task.result()
                info.lines.append(f"Bridge     triggers: {', '.join(t.name for t in events.triggers)}")
                if events.ingress is not None:
                    ingress = WebhookIngress(broker, events)
                    await ingress.start()
                    info.lines.append(f"Webhooks   {ingress.url}/events/<subject>")
            else:
                info.lines.append("Bridge     off: no events.triggers in the config file")
            try:
                yield info
            finally:
                stop.set()
                if ingress is not None:
                    await ingress.stop()
                if task is not None:
                    await asyncio.gather(task, return_exceptions=True)
                await info.publisher.aclose()

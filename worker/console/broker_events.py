"""The Events page's reader over the event broker (``events:`` of the worker config): the triggers,
recent inbound and outbound events, and the dead letters, read from the start of their streams
without acknowledging anything; a replay publishes a dead letter's original bytes and headers to its
original subject again. The broker contract has no delete, so a replayed letter stays in its stream
(the page marks none as replayed)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from kernel.broker import Broker
from kernel.triggers import EventsConfig
from worker.console.sources import DeadLetter, EventRecord

__all__ = ["BrokerEvents"]

_DEAD = "Kernelflow-Dead-Letter-"


class BrokerEvents:
    connected = True

    def __init__(self, broker: Broker, config: EventsConfig, *, idle_s: float = 0.5) -> None:
        self.broker = broker
        self.config = config
        self.idle_s = idle_s

    async def triggers(self) -> list[dict[str, Any]]:
        rows = []
        for t in self.config.triggers:
            kind = next(
                k for k in ("start", "signal_with_start", "signal", "update") if getattr(t, k) is not None
            )
            rows.append({"subject": t.subject, "pipeline": f"{t.name} ({kind.replace('_', ' ')})"})
        return rows

    async def recent(self, limit: int = 50) -> list[EventRecord]:
        records: list[EventRecord] = []
        inbound = self.config.subjects or [t.subject for t in self.config.triggers]
        for subject in inbound:
            records += [_record("in", *m) for m in await self._read(subject, limit)]
        out = f"{self.config.outbound.subject_prefix}.>"
        records += [_record("out", *m) for m in await self._read(out, limit)]
        return records[-limit:]

    async def dead_letters(self, limit: int = 50) -> list[DeadLetter]:
        letters = []
        for subject, body, headers in await self._read(f"{self.config.dead_letter_subject}.>", limit):
            letters.append(
                DeadLetter(
                    id=_letter_id(subject, body, headers),
                    subject=headers.get(_DEAD + "Subject"),
                    reason=headers.get(_DEAD + "Reason", "no reason recorded"),
                    time=_when(headers.get(_DEAD + "Time")),
                    attempts=int(headers.get(_DEAD + "Attempts", "0") or 0),
                )
            )
        return letters

    async def replay(self, letter_id: str, *, by: str) -> str:
        for subject, body, headers in await self._read(f"{self.config.dead_letter_subject}.>", 1000):
            if _letter_id(subject, body, headers) != letter_id:
                continue
            original = headers.get(_DEAD + "Subject")
            if not original:
                raise LookupError(f"dead letter {letter_id} does not name its original subject")
            kept = {k: v for k, v in headers.items() if not k.startswith(_DEAD) and not k.startswith("Nats-")}
            await self.broker.publish(original, body, headers={**kept, "Kernelflow-Replayed-By": by})
            return f"replayed dead letter {letter_id} to {original}"
        raise LookupError(f"no dead letter {letter_id!r} (it may have aged out of the stream)")

    async def _read(self, subject: str, limit: int) -> list[tuple[str, bytes, dict[str, str]]]:
        """What the stream holds on ``subject``: read until nothing comes for ``idle_s``."""
        found: list[tuple[str, bytes, dict[str, str]]] = []
        messages = self.broker.watch(subject, from_start=True)
        try:
            while True:
                try:
                    found.append(await asyncio.wait_for(anext(messages), self.idle_s))
                except (TimeoutError, StopAsyncIteration):
                    break
        finally:
            with contextlib.suppress(Exception):
                await messages.aclose()  # type: ignore[attr-defined]
        return found[-limit:]


def _letter_id(subject: str, body: bytes, headers: dict[str, str]) -> str:
    key = json.dumps([subject, headers.get(_DEAD + "Time"), headers.get(_DEAD + "Subject")]).encode() + body
    return hashlib.sha256(key).hexdigest()[:16]


def _when(value: str | None) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(value), UTC) if value else None
    except ValueError:
        return None


def _record(direction: str, subject: str, body: bytes, headers: dict[str, str]) -> EventRecord:
    try:
        event = json.loads(body)
    except ValueError:
        event = {}
    if not isinstance(event, dict):
        event = {}
    time = None
    with contextlib.suppress(ValueError, TypeError):
        time = datetime.fromisoformat(str(event.get("time") or headers.get("ce-time") or ""))
    data = event.get("data")
    return EventRecord(
        direction=direction,
        type=str(event.get("type") or headers.get("ce-type") or "?"),
        subject=subject,
        time=time,
        workflow_id=(data or {}).get("workflow_id") if isinstance(data, dict) else None,
    )

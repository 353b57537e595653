"""Provider batches, wire-agnostic: what a batch holds, when it ends and how each item came out.

A wire module turns its vendor's batch requests into `BatchStore.create` calls and renders `SimBatch`
objects and item outcomes in the vendor's shapes. Time is controlled through `/_sim/batches`
(`BatchControl`): how long a batch stays in progress, whether it expires (and how many of its items were
answered before it did). Each item runs through the ordinary request flow when the batch ends, so
`[[sim: fault=...]]` directives in an item's messages make that item fail the way a realtime call would.
The store counts the batches created, which tells a test whether a submission was repeated.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["BatchControl", "BatchStore", "ItemOutcome", "SimBatch"]

State = Literal["in_progress", "completed", "expired", "cancelled"]


@dataclass(frozen=True, slots=True)
class BatchControl:
    """How the next batches behave. ``complete_after_s``: seconds in progress before they end;
    ``expire``: they end expired, with only the first ``expire_keep`` items answered; ``hold_create_s``:
    the create call answers that late, the batch already made (a client that dies meanwhile never
    hears that it was accepted)."""

    complete_after_s: float = 0.0
    expire: bool = False
    expire_keep: int = 0
    hold_create_s: float = 0.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> BatchControl:
        allowed = {"complete_after_s", "expire", "expire_keep", "hold_create_s"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown batch control keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(
            complete_after_s=float(data.get("complete_after_s", 0.0)),
            expire=bool(data.get("expire", False)),
            expire_keep=int(data.get("expire_keep", 0)),
            hold_create_s=float(data.get("hold_create_s", 0.0)),
        )


@dataclass(slots=True)
class ItemOutcome:
    """One item as the batch ended: ``status`` and ``body`` are what a realtime call would have answered
    (``succeeded`` and ``errored``); ``expired`` and ``cancelled`` items never ran."""

    custom_id: str
    kind: Literal["succeeded", "errored", "expired", "cancelled"]
    status: int = 0
    body: Any = None


Runner = Callable[[Any], tuple[int, Any]]
"""Runs one item's vendor request body: (HTTP status, JSON body) as a realtime call would answer."""


@dataclass(slots=True)
class SimBatch:
    id: str
    wire: str
    items: list[tuple[str, Any]]
    metadata: dict[str, str]
    control: BatchControl
    created_at: float
    extra: dict[str, Any] = field(default_factory=dict)
    cancelled_at: float | None = None
    ended_at: float | None = None
    outcomes: list[ItemOutcome] | None = None

    @property
    def due_at(self) -> float:
        return self.created_at + self.control.complete_after_s

    def state(self) -> State:
        if self.cancelled_at is not None:
            return "cancelled"
        if time.time() < self.due_at:
            return "in_progress"
        return "expired" if self.control.expire else "completed"

    def counts(self) -> dict[str, int]:
        outcomes = Counter(o.kind for o in self.outcomes or [])
        return {
            "total": len(self.items),
            "succeeded": outcomes["succeeded"],
            "errored": outcomes["errored"],
            "expired": outcomes["expired"],
            "cancelled": outcomes["cancelled"],
            "processing": 0 if self.outcomes is not None else len(self.items),
        }


class BatchStore:
    """Every batch the simulator holds, with the control for new ones and the counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: dict[str, SimBatch] = {}
        self._files: dict[str, bytes] = {}
        self._control = BatchControl()
        self._ids = itertools.count(1)
        self._created: Counter[str] = Counter()
        self._cancelled: Counter[str] = Counter()

    # --- control and counts -----------------------------------------------------------------------

    def set_control(self, control: BatchControl) -> None:
        with self._lock:
            self._control = control

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "created": sum(self._created.values()),
                "by_wire": dict(self._created),
                "cancelled": sum(self._cancelled.values()),
                "held": len(self._batches),
                "control": asdict(self._control),
            }

    def reset(self) -> None:
        with self._lock:
            self._batches.clear()
            self._files.clear()
            self._control = BatchControl()
            self._created.clear()
            self._cancelled.clear()

    # --- files (OpenAI's input and output files) --------------------------------------------------

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):08d}{int(time.time() * 1000) % 10**6:06d}"

    def put_file(self, content: bytes, prefix: str = "file-") -> str:
        file_id = self.new_id(prefix)
        with self._lock:
            self._files[file_id] = content
        return file_id

    def file(self, file_id: str) -> bytes | None:
        with self._lock:
            return self._files.get(file_id)

    # --- batches -----------------------------------------------------------------------------------

    def create(
        self,
        wire: str,
        items: list[tuple[str, Any]],
        metadata: Mapping[str, str],
        *,
        prefix: str,
        extra: Mapping[str, Any] | None = None,
    ) -> SimBatch:
        with self._lock:
            batch = SimBatch(
                id=f"{prefix}{next(self._ids):08d}{int(time.time() * 1000) % 10**6:06d}",
                wire=wire,
                items=list(items),
                metadata=dict(metadata),
                control=self._control,
                created_at=time.time(),
                extra=dict(extra or {}),
            )
            self._batches[batch.id] = batch
            self._created[wire] += 1
        return batch

    def get(self, batch_id: str, wire: str) -> SimBatch | None:
        with self._lock:
            batch = self._batches.get(batch_id)
        return batch if batch is not None and batch.wire == wire else None

    def listing(self, wire: str) -> list[SimBatch]:
        """The wire's batches, newest first (as the vendors list them)."""
        with self._lock:
            found = [b for b in self._batches.values() if b.wire == wire]
        return sorted(found, key=lambda b: b.created_at, reverse=True)

    def cancel(self, batch: SimBatch) -> None:
        with self._lock:
            if batch.cancelled_at is None and batch.outcomes is None:
                batch.cancelled_at = time.time()
                self._cancelled[batch.wire] += 1

    def settle(self, batch: SimBatch, run: Runner) -> list[ItemOutcome] | None:
        """The item outcomes once the batch has ended (computed once), else ``None``."""
        state = batch.state()
        if state == "in_progress":
            return None
        if batch.outcomes is not None:
            return batch.outcomes
        outcomes: list[ItemOutcome] = []
        for index, (custom_id, body) in enumerate(batch.items):
            if state == "cancelled":
                outcomes.append(ItemOutcome(custom_id, "cancelled"))
            elif state == "expired" and index >= batch.control.expire_keep:
                outcomes.append(ItemOutcome(custom_id, "expired"))
            else:
                status, answer = run(body)
                kind: Literal["succeeded", "errored"] = "succeeded" if status < 400 else "errored"
                outcomes.append(ItemOutcome(custom_id, kind, status, answer))
        with self._lock:
            if batch.outcomes is None:
                batch.outcomes = outcomes
                batch.ended_at = time.time()
            return batch.outcomes

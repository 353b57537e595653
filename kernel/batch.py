"""The contract of a provider batch: many chat requests submitted at once, answered within a window at
the provider's batch price.

A batch is created under a deterministic ``tag`` (derived from who asks and what): a provider looks the
tag up among its batches before creating one, so a submission repeated after a crash (the provider
accepted, the caller never heard) finds the batch it already made instead of paying twice.

Results are per item, in the caller's order: each item's answer, or its error classified like a realtime
call's (the same ``kernel.errors`` type and ``retryable`` flag), or ``expired`` / ``cancelled`` when the
batch ended before the item ran.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kernel.contracts import ChatRequest, ChatResponse, Usage
from kernel.errors import ProviderError

__all__ = [
    "BATCH_STATES",
    "BatchCounts",
    "BatchItem",
    "BatchItemReport",
    "BatchItemResult",
    "BatchJob",
    "BatchLimits",
    "BatchReport",
    "BatchState",
    "batch_tag",
    "split_batch",
]

BatchState = Literal["in_progress", "completed", "expired", "cancelling", "cancelled", "failed"]
"""Every vendor's states, mapped onto these: ``in_progress`` covers validating and finalizing."""
BATCH_STATES: tuple[BatchState, ...] = (
    "in_progress",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
    "failed",
)
_ENDED: frozenset[str] = frozenset({"completed", "expired", "cancelled", "failed"})
_CUSTOM_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class BatchLimits(BaseModel):
    """What one batch of a provider may hold: requests and bytes of the encoded input."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_requests: int = Field(gt=0)
    max_bytes: int = Field(gt=0)


class BatchItem(BaseModel):
    """One request of a batch. ``custom_id`` is unique within the batch and maps the answer back; every
    vendor accepts 1 to 64 characters of letters, digits, ``_`` and ``-``."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str
    request: ChatRequest

    @field_validator("custom_id")
    @classmethod
    def _custom_id(cls, value: str) -> str:
        if not 1 <= len(value) <= 64 or not set(value) <= _CUSTOM_ID_CHARS:
            raise ValueError(
                f"custom_id {value!r} must be 1 to 64 characters of letters, digits, '_' and '-'"
            )
        return value


class BatchCounts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchJob(BaseModel):
    """A provider batch as last seen."""

    model_config = ConfigDict(extra="forbid")

    id: str
    provider: str
    tag: str
    state: BatchState
    vendor_state: str = Field(description="The state as the vendor names it.")
    counts: BatchCounts = Field(default_factory=BatchCounts)
    created_at: int = 0
    expires_at: int | None = None

    @property
    def ended(self) -> bool:
        """No more answers will come: results (possibly partial) can be read."""
        return self.state in _ENDED


class BatchItemResult(BaseModel):
    """One item's outcome. ``outcome`` is ``succeeded`` (``response`` set), ``errored`` (``error_type``
    is a ``kernel.errors`` class name, ``retryable`` as a realtime call's), ``expired`` or ``cancelled``
    (the item never ran; it can run again)."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str
    outcome: Literal["succeeded", "errored", "expired", "cancelled"]
    response: ChatResponse | None = None
    error_type: str | None = None
    error_message: str | None = None
    retryable: bool = False

    @classmethod
    def failed(cls, custom_id: str, error: ProviderError) -> BatchItemResult:
        """An item that failed as a realtime call with ``error`` would have."""
        return cls(
            custom_id=custom_id,
            outcome="errored",
            error_type=type(error).__name__,
            error_message=str(error),
            retryable=error.retryable,
        )


class BatchItemReport(BaseModel):
    """How one item of a map in batch mode was answered, for the ``status`` query."""

    index: int
    step_id: str
    model: str | None = None
    via: Literal["batch", "realtime"] = "batch"
    outcome: str = "pending"
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float | None = None
    realtime_cost_usd: float | None = Field(default=None, description="What a realtime call would cost.")


class BatchReport(BaseModel):
    """A map step's batches: the provider batches made, each item's usage and cost, and the saving
    against what the same answers would have cost in realtime."""

    batches: list[BatchJob] = Field(default_factory=list)
    items: list[BatchItemReport] = Field(default_factory=list)
    cost_usd: float = 0.0
    realtime_cost_usd: float = 0.0
    saving_usd: float = 0.0

    def add(self, item: BatchItemReport) -> None:
        self.items.append(item)
        self.items.sort(key=lambda i: (i.index, i.step_id))
        if item.cost_usd is not None:
            self.cost_usd = round(self.cost_usd + item.cost_usd, 10)
        realtime = item.realtime_cost_usd if item.realtime_cost_usd is not None else item.cost_usd
        if realtime is not None:
            self.realtime_cost_usd = round(self.realtime_cost_usd + realtime, 10)
        self.saving_usd = round(self.realtime_cost_usd - self.cost_usd, 10)

    def note(self, job: BatchJob) -> None:
        self.batches = [*(b for b in self.batches if b.id != job.id), job]


def batch_tag(*parts: str) -> str:
    """A deterministic tag for a batch from what identifies it (e.g. workflow id, step id, part number):
    the same parts give the same tag on every attempt and every worker."""
    digest = hashlib.sha256(json.dumps(list(parts), separators=(",", ":")).encode()).hexdigest()
    return f"kf-{digest[:40]}"


def split_batch(
    items: Sequence[BatchItem], limits: BatchLimits, size_of: Callable[[BatchItem], int]
) -> list[list[BatchItem]]:
    """``items`` in order, cut into consecutive parts each within ``limits``. ``size_of`` is an item's
    encoded size on the provider's wire. An item larger than a whole batch may hold is refused."""
    parts: list[list[BatchItem]] = []
    current: list[BatchItem] = []
    current_bytes = 0
    for item in items:
        size = size_of(item)
        if size > limits.max_bytes:
            raise ValueError(
                f"batch item {item.custom_id!r} takes {size} bytes; one batch holds at most "
                f"{limits.max_bytes} bytes"
            )
        if current and (len(current) >= limits.max_requests or current_bytes + size > limits.max_bytes):
            parts.append(current)
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += size
    if current:
        parts.append(current)
    return parts

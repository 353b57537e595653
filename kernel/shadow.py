"""Shadow traffic and comparisons: what a candidate model answered next to the primary.

Pure: the records and the store's contract. A ``ShadowPair`` holds one model input (the request the
primary answered, without its model) and both sides' answers, usage, cost, latency and error. Pairs come
from two sources: ``shadow`` (a sampled fraction of live calls, also sent to the candidate after the
primary answered) and ``compare`` (recorded runs' inputs re-run offline against a candidate). They live
outside pipelines' histories, in a ``ShadowStore`` (``worker/shadow_store.py``: SQLite by default,
PostgreSQL for several hosts).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["PairSource", "ShadowPair", "ShadowSide", "ShadowStore", "request_digest"]

PairSource = Literal["shadow", "compare"]


class ShadowSide(BaseModel):
    """One model's answer to the pair's request (or the error it gave)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="provider/model that answered (after aliases).")
    output: str | None = Field(default=None, description="The answer's text.")
    structured: Any = Field(default=None, description="The parsed answer when the step has an output schema.")
    valid: bool | None = Field(
        default=None, description="Whether the answer matched the output schema; None without a schema."
    )
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None,
        description="Tool calls the model asked for (recorded, never executed by a shadow call).",
    )
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None
    error_type: str | None = Field(default=None, description="The classified failure type (FailureType).")
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None


class ShadowPair(BaseModel):
    """A primary's answer and a candidate's answer to the same model input."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Unique and deterministic: storing a pair twice keeps one.")
    source: PairSource
    recorded_at: datetime
    pipeline: str
    step_id: str
    workflow_id: str
    run_id: str = ""
    tenant: str | None = None
    request_digest: str = Field(description="sha256 of the request without its model (request_digest()).")
    request: dict[str, Any] | None = Field(
        default=None, description="The ChatRequest without its model; sealed at rest when encryption is on."
    )
    output_schema: dict[str, Any] | None = None
    primary: ShadowSide
    candidate: ShadowSide


def request_digest(request: dict[str, Any]) -> str:
    """A stable digest of a model input, independent of the model it was sent to."""
    body = {key: value for key, value in request.items() if key != "model"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ShadowStore(Protocol):
    """Where pairs are kept. Implementations are synchronous and safe to call from a thread."""

    def add(self, pairs: Iterable[ShadowPair]) -> int:
        """Store pairs; a pair whose id is already stored is skipped. Returns how many were new."""
        ...

    def pairs(
        self,
        *,
        pipeline: str | None = None,
        step_id: str | None = None,
        candidate: str | None = None,
        source: PairSource | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[ShadowPair]:
        """Pairs matching every given filter, oldest first."""
        ...

    def close(self) -> None: ...

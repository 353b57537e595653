"""What the pairs say: per pipeline step, how a candidate model compares with the primary.

Pure computation over ``ShadowPair`` records (``kernel/shadow.py``), for ``kernelflow report``:

- agreement: the share of pairs both sides answered whose texts are equal (exact match); for
  structured outputs, field by field (top-level fields of the parsed answers, each field's share of
  equal values, and their mean); optionally the mean cosine similarity of the two answers' embeddings
  (computed outside, by the caller, and passed in by pair id);
- for each side: the share of valid structured outputs (among the answers checked against a schema),
  the error rate and the errors by class, latency p50 and p95 (linear interpolation between ranks),
  cost per call (mean of the calls whose price is known);
- calls per day (pairs over the observed window, at least one day) and the monthly (30 days) cost of
  each side at that rate, and their difference (candidate minus primary).

``judge_output`` is the one check of an answer against its request's structured-output format, used
when pairs are made.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field

from kernel.schema import schema_errors
from kernel.shadow import ShadowPair, ShadowSide

__all__ = [
    "DAYS_PER_MONTH",
    "ShadowReport",
    "SideStats",
    "StepReport",
    "build_report",
    "cosine",
    "field_agreement",
    "judge_output",
    "output_schema_of",
    "percentile",
]

DAYS_PER_MONTH = 30
_MISSING = object()


class SideStats(BaseModel):
    """One side's figures over a step's pairs."""

    model: str = Field(description="provider/model; several joined by ', ' when the step used several.")
    calls: int
    errors: int
    error_rate: float
    errors_by_type: dict[str, int]
    checked: int = Field(description="Answers checked against a structured-output schema.")
    valid_share: float | None = Field(description="Share of valid structured outputs among the checked.")
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    cost_per_call_usd: float | None = Field(description="Mean cost of the calls whose price is known.")
    cost_unknown: int = Field(description="Answered calls whose price is unknown.")
    monthly_cost_usd: float | None
    latencies_ms: list[float] = Field(description="Every known latency, for distributions.")
    costs_usd: list[float] = Field(description="Every known cost, for distributions.")


class StepReport(BaseModel):
    """A pipeline step's comparison with one candidate model."""

    pipeline: str
    step_id: str
    candidate: str
    pairs: int
    sources: list[str]
    both_answered: int = Field(description="Pairs where neither side failed: what agreement is computed on.")
    exact_match: float | None
    structured_pairs: int = Field(description="Answered pairs whose both sides parsed as structured output.")
    field_agreement: float | None = Field(description="Mean over fields of the share of equal values.")
    fields: dict[str, float] = Field(description="Each top-level field's share of equal values.")
    similarity: float | None = Field(description="Mean cosine similarity of the answers (when computed).")
    similarity_pairs: int = 0
    first: datetime
    last: datetime
    days: float = Field(description="The observed window in days (at least one).")
    calls_per_day: float
    monthly_cost_difference_usd: float | None = Field(description="Candidate minus primary, per 30 days.")
    primary: SideStats
    candidate_side: SideStats


class ShadowReport(BaseModel):
    pairs: int
    since: datetime | None
    until: datetime | None
    steps: list[StepReport]


# --- building blocks ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two vectors of the same length (0.0 when either is all zeros)."""
    if len(a) != len(b):
        raise ValueError(f"vectors of different lengths ({len(a)} and {len(b)})")
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def output_schema_of(request: Mapping[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """The structured-output format a request asked for: ``("text", None)``, ``("json_object", None)``
    or ``("json_schema", schema)``."""
    response_format = (request or {}).get("response_format") or {}
    kind = response_format.get("type", "text")
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", spec.get("json_schema"))
        return "json_schema", schema if isinstance(schema, dict) else {}
    return ("json_object", None) if kind == "json_object" else ("text", None)


def judge_output(text: str | None, request: Mapping[str, Any] | None) -> tuple[Any, bool | None]:
    """The parsed answer and whether it is a valid structured output for ``request``'s format
    (``(None, None)`` for a text request: nothing to check)."""
    kind, schema = output_schema_of(request)
    if kind == "text":
        return None, None
    try:
        value = json.loads(text or "")
    except ValueError:
        return None, False
    if kind == "json_object":
        return value, isinstance(value, dict)
    return value, not schema_errors(value, schema or {})


def field_agreement(primary: Any, candidate: Any) -> dict[str, bool]:
    """Field by field: each top-level field of either answer, and whether both hold the same value
    (an answer that is not an object is one field, ``$``)."""
    if isinstance(primary, dict) and isinstance(candidate, dict):
        keys = sorted(set(primary) | set(candidate))
        return {key: primary.get(key, _MISSING) == candidate.get(key, _MISSING) for key in keys}
    return {"$": primary == candidate}


# --- the report ---------------------------------------------------------------------------------------


def _side_stats(sides: Sequence[ShadowSide], calls_per_day: float) -> SideStats:
    errors: dict[str, int] = {}
    for side in sides:
        if not side.ok:
            kind = side.error_type or "Error"
            errors[kind] = errors.get(kind, 0) + 1
    failed = sum(errors.values())
    checked = [side.valid for side in sides if side.ok and side.valid is not None]
    latencies = [side.latency_ms for side in sides if side.latency_ms is not None]
    costs = [side.cost_usd for side in sides if side.ok and side.cost_usd is not None]
    per_call = sum(costs) / len(costs) if costs else None
    models = sorted({side.model for side in sides})
    return SideStats(
        model=", ".join(models),
        calls=len(sides),
        errors=failed,
        error_rate=failed / len(sides) if sides else 0.0,
        errors_by_type=dict(sorted(errors.items())),
        checked=len(checked),
        valid_share=sum(checked) / len(checked) if checked else None,
        latency_p50_ms=percentile(latencies, 50),
        latency_p95_ms=percentile(latencies, 95),
        cost_per_call_usd=per_call,
        cost_unknown=sum(1 for side in sides if side.ok and side.cost_usd is None),
        monthly_cost_usd=per_call * calls_per_day * DAYS_PER_MONTH if per_call is not None else None,
        latencies_ms=latencies,
        costs_usd=costs,
    )


def _step_report(
    key: tuple[str, str, str],
    pairs: Sequence[ShadowPair],
    similarities: Mapping[str, float],
    since: datetime | None,
    until: datetime | None,
) -> StepReport:
    pipeline, step_id, candidate = key
    first = min(pair.recorded_at for pair in pairs)
    last = max(pair.recorded_at for pair in pairs)
    window = (until or last) - (since or first)
    days = max(window / timedelta(days=1), 1.0)
    calls_per_day = len(pairs) / days
    answered = [pair for pair in pairs if pair.primary.ok and pair.candidate.ok]
    exact = [pair.primary.output == pair.candidate.output for pair in answered]
    per_field: dict[str, list[bool]] = {}
    structured = 0
    for pair in answered:
        if pair.primary.structured is None or pair.candidate.structured is None:
            continue
        structured += 1
        for name, same in field_agreement(pair.primary.structured, pair.candidate.structured).items():
            per_field.setdefault(name, []).append(same)
    fields = {name: sum(values) / len(values) for name, values in sorted(per_field.items())}
    similar = [similarities[pair.id] for pair in answered if pair.id in similarities]
    primary = _side_stats([pair.primary for pair in pairs], calls_per_day)
    candidate_side = _side_stats([pair.candidate for pair in pairs], calls_per_day)
    difference = (
        candidate_side.monthly_cost_usd - primary.monthly_cost_usd
        if candidate_side.monthly_cost_usd is not None and primary.monthly_cost_usd is not None
        else None
    )
    return StepReport(
        pipeline=pipeline,
        step_id=step_id,
        candidate=candidate,
        pairs=len(pairs),
        sources=sorted({pair.source for pair in pairs}),
        both_answered=len(answered),
        exact_match=sum(exact) / len(exact) if exact else None,
        structured_pairs=structured,
        field_agreement=sum(fields.values()) / len(fields) if fields else None,
        fields=fields,
        similarity=sum(similar) / len(similar) if similar else None,
        similarity_pairs=len(similar),
        first=first,
        last=last,
        days=days,
        calls_per_day=calls_per_day,
        monthly_cost_difference_usd=difference,
        primary=primary,
        candidate_side=candidate_side,
    )


def build_report(
    pairs: Iterable[ShadowPair],
    *,
    similarities: Mapping[str, float] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> ShadowReport:
    """Group ``pairs`` by pipeline, step and candidate model and compute each group's figures.

    ``since``/``until`` bound the observed window used for calls per day (default: the first and last
    pair of each group); ``similarities`` maps pair ids to the cosine similarity of their answers."""
    groups: dict[tuple[str, str, str], list[ShadowPair]] = {}
    total = 0
    for pair in pairs:
        total += 1
        groups.setdefault((pair.pipeline, pair.step_id, pair.candidate.model), []).append(pair)
    steps = [_step_report(key, groups[key], similarities or {}, since, until) for key in sorted(groups)]
    return ShadowReport(pairs=total, since=since, until=until, steps=steps)

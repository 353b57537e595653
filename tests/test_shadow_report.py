"""The report's figures over hand-made pairs, each computed here another way."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kernel.shadow import ShadowPair, ShadowSide
from kernel.shadow_report import build_report, cosine, field_agreement, judge_output, percentile
from worker.report import render_html, render_table

T0 = datetime(2026, 11, 1, tzinfo=UTC)
SCHEMA_REQUEST: dict[str, Any] = {
    "messages": [{"role": "user", "content": "x"}],
    "response_format": {
        "type": "json_schema",
        "json_schema": {
            "name": "triage",
            "schema": {
                "type": "object",
                "required": ["category", "urgency"],
                "properties": {"category": {"type": "string"}, "urgency": {"type": "string"}},
            },
        },
    },
}


def _side(model: str, text: str | None = None, **fields: Any) -> ShadowSide:
    structured, valid = judge_output(text, SCHEMA_REQUEST) if text is not None else (None, None)
    return ShadowSide(model=model, output=text, structured=structured, valid=valid, **fields)


def _pair(
    n: int, primary: ShadowSide, candidate: ShadowSide, *, step: str = "classify", hours: float = 0
) -> ShadowPair:
    return ShadowPair(
        id=f"p{n}", source="compare", recorded_at=T0 + timedelta(hours=hours), pipeline="triage",
        step_id=step, workflow_id=f"wf{n}", request_digest="d", request=SCHEMA_REQUEST,
        primary=primary, candidate=candidate,
    )  # fmt: skip


def test_percentile_interpolates_between_ranks_like_the_statistics_module() -> None:
    values = [12.0, 3.0, 7.5, 40.0, 9.0, 18.0, 22.0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    assert percentile(values, 50) == pytest.approx(cuts[49])
    assert percentile(values, 95) == pytest.approx(cuts[94])
    assert percentile([5.0], 95) == 5.0
    assert percentile([], 50) is None


def test_structured_outputs_are_judged_against_the_requests_schema() -> None:
    assert judge_output('{"category": "bug", "urgency": "low"}', SCHEMA_REQUEST) == (
        {"category": "bug", "urgency": "low"},
        True,
    )
    assert judge_output('{"category": "bug"}', SCHEMA_REQUEST)[1] is False  # urgency missing
    assert judge_output("not json", SCHEMA_REQUEST) == (None, False)
    assert judge_output("hello", {"messages": []}) == (None, None)
    assert field_agreement({"a": 1, "b": 2}, {"a": 1, "c": 2}) == {"a": True, "b": False, "c": False}
    assert field_agreement([1], [1]) == {"$": True}
    assert cosine([1.0, 0.0], [1.0, 0.0]) == pytest.approx(1.0)
    assert cosine([1.0, 0.0], [0.0, 1.0]) == pytest.approx(0.0)


def test_a_steps_figures_follow_from_its_pairs() -> None:
    a = '{"category": "billing", "urgency": "high"}'
    b = '{"category": "billing", "urgency": "low"}'
    pairs = [
        _pair(1, _side("openai/gpt-4o-mini", a, latency_ms=100, cost_usd=0.001),
              _side("anthropic/claude", a, latency_ms=300, cost_usd=0.004)),
        _pair(2, _side("openai/gpt-4o-mini", a, latency_ms=200, cost_usd=0.003),
              _side("anthropic/claude", b, latency_ms=500, cost_usd=0.002), hours=24),
        _pair(3, _side("openai/gpt-4o-mini", a, latency_ms=150, cost_usd=0.002),
              _side("anthropic/claude", '{"category": 1}', latency_ms=400, cost_usd=0.003), hours=48),
        _pair(4, _side("openai/gpt-4o-mini", a, latency_ms=120, cost_usd=0.002),
              ShadowSide(model="anthropic/claude", error_type="ServerError", error="500", latency_ms=50), hours=72),
    ]  # fmt: skip
    report = build_report(pairs, similarities={"p1": 1.0, "p2": 0.5, "p4": 0.1})
    (step,) = report.steps
    assert (step.pipeline, step.step_id, step.candidate, step.pairs) == (
        "triage",
        "classify",
        "anthropic/claude",
        4,
    )
    assert step.both_answered == 3
    assert step.exact_match == pytest.approx(1 / 3)
    # fields over the three answered pairs: category equal in 2 of 3 (p3 has 1), urgency in 1 of 3
    assert step.fields == pytest.approx({"category": 2 / 3, "urgency": 1 / 3})
    assert step.field_agreement == pytest.approx(0.5)
    assert step.similarity == pytest.approx(0.75)  # p4 failed: not an answered pair
    assert step.primary.valid_share == 1.0 and step.candidate_side.valid_share == pytest.approx(2 / 3)
    assert step.candidate_side.errors_by_type == {"ServerError": 1}
    assert step.candidate_side.error_rate == 0.25 and step.primary.error_rate == 0.0
    assert step.candidate_side.latency_p50_ms == pytest.approx(statistics.median([300, 500, 400, 50]))
    assert step.primary.cost_per_call_usd == pytest.approx(0.002)
    assert step.candidate_side.cost_per_call_usd == pytest.approx(
        0.003
    )  # the failed call costs nothing known
    assert step.days == pytest.approx(3.0) and step.calls_per_day == pytest.approx(4 / 3)
    assert step.monthly_cost_difference_usd == pytest.approx((0.003 - 0.002) * 4 / 3 * 30)


def test_pairs_group_by_step_and_candidate_and_a_short_window_counts_as_a_day() -> None:
    text = '{"category": "bug", "urgency": "low"}'
    pairs = [
        _pair(1, _side("m/p", text), _side("m/c", text), step="draft"),
        _pair(2, _side("m/p", text), _side("m/c", text), step="classify", hours=0.1),
        _pair(3, _side("m/p", text), _side("m/d", text), step="classify", hours=0.2),
    ]
    report = build_report(pairs)
    assert [(s.step_id, s.candidate, s.pairs) for s in report.steps] == [
        ("classify", "m/c", 1), ("classify", "m/d", 1), ("draft", "m/c", 1),
    ]  # fmt: skip
    assert all(s.days == 1.0 and s.calls_per_day == 1.0 for s in report.steps)
    assert report.steps[0].primary.cost_per_call_usd is None
    assert report.steps[0].monthly_cost_difference_usd is None


def test_the_html_and_table_of_an_empty_store_and_of_a_candidate_that_always_failed() -> None:
    empty = build_report([])
    assert "No pairs match" in render_html(empty) and "<svg" not in render_html(empty)
    assert "no pairs match" in render_table(empty)
    failed = ShadowSide(model="m/c", error_type="RateLimited", error="429", latency_ms=3)
    page = render_html(build_report([_pair(1, _side("m/p", '{"category": "a", "urgency": "b"}'), failed)]))
    assert page.count('class="chart"') == 3  # agreement, latency, cost
    assert "no data" in page  # no cost known on either side: the cost chart says so
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert 'data-metric="exact_match" data-value=""' in page

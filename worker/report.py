"""``kernelflow report``: the stored pairs as a table per step, as JSON, or as one shareable HTML file.

The figures come from ``kernel.shadow_report``. The HTML page is self-contained: styles inline, charts
drawn here as inline SVG (latency and cost distributions of each step, agreement by step), no script
and nothing fetched from the network. Every figure on the page carries its raw value in ``data-value``.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kernel.contracts import EmbedRequest
from kernel.errors import ConfigurationError, KernelflowError
from kernel.registry import Registry
from kernel.shadow import ShadowPair
from kernel.shadow_report import ShadowReport, SideStats, StepReport, build_report, cosine

__all__ = ["embed_similarities", "render_html", "render_table", "report_command"]

_PRIMARY = "#4c6ef5"
_CANDIDATE = "#f08c00"


# --- formatting -----------------------------------------------------------------------------------


def fmt_share(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def fmt_ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} ms"


def fmt_usd(value: float | None, places: int = 6) -> str:
    if value is None:
        return "—"
    return f"-${-value:.{places}f}" if value < 0 else f"${value:.{places}f}"


def fmt_errors(side: SideStats) -> str:
    if not side.errors:
        return "0%"
    kinds = ", ".join(f"{kind} {count}" for kind, count in side.errors_by_type.items())
    return f"{side.error_rate * 100:.1f}% ({kinds})"


def _rows(step: StepReport) -> list[tuple[str, str, Any, str, Any, str]]:
    """(label, metric, primary value, primary text, candidate value, candidate text) for each figure."""
    p, c = step.primary, step.candidate_side
    return [
        ("model", "model", p.model, p.model, c.model, c.model),
        ("valid structured", "valid_share", p.valid_share, fmt_share(p.valid_share), c.valid_share,
         fmt_share(c.valid_share)),
        ("errors", "error_rate", p.error_rate, fmt_errors(p), c.error_rate, fmt_errors(c)),
        ("latency p50", "latency_p50_ms", p.latency_p50_ms, fmt_ms(p.latency_p50_ms), c.latency_p50_ms,
         fmt_ms(c.latency_p50_ms)),
        ("latency p95", "latency_p95_ms", p.latency_p95_ms, fmt_ms(p.latency_p95_ms), c.latency_p95_ms,
         fmt_ms(c.latency_p95_ms)),
        ("cost per call", "cost_per_call_usd", p.cost_per_call_usd, fmt_usd(p.cost_per_call_usd),
         c.cost_per_call_usd, fmt_usd(c.cost_per_call_usd)),
        ("monthly cost", "monthly_cost_usd", p.monthly_cost_usd, fmt_usd(p.monthly_cost_usd, 2),
         c.monthly_cost_usd, fmt_usd(c.monthly_cost_usd, 2)),
    ]  # fmt: skip


def _agreement(step: StepReport) -> list[tuple[str, str, float | None, str]]:
    return [
        ("exact match", "exact_match", step.exact_match, fmt_share(step.exact_match)),
        ("fields agree", "field_agreement", step.field_agreement, fmt_share(step.field_agreement)),
        (
            "similarity",
            "similarity",
            step.similarity,
            "—" if step.similarity is None else f"{step.similarity:.3f}",
        ),
    ]


# --- terminal -------------------------------------------------------------------------------------


def render_table(report: ShadowReport) -> str:
    if not report.steps:
        return "no pairs match: run `kernelflow compare`, or shadow a step (docs/shadow.md)"
    lines: list[str] = []
    for step in report.steps:
        lines.append(
            f"{step.pipeline} · {step.step_id} → {step.candidate}   {step.pairs} pairs "
            f"({', '.join(step.sources)}), {step.both_answered} answered by both, "
            f"{step.calls_per_day:.1f} calls/day"
        )
        agreement = "   ".join(f"{label} {text}" for label, _, _, text in _agreement(step))
        lines.append(f"  agreement: {agreement}")
        if step.fields:
            lines.append("  by field:  " + ", ".join(f"{k} {fmt_share(v)}" for k, v in step.fields.items()))
        cells = [("", "primary", "candidate")] + [(label, pt, ct) for label, _, _, pt, _, ct in _rows(step)]
        widths = [max(len(row[i]) for row in cells) for i in range(3)]
        for n, row in enumerate(cells):
            lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
            if n == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        lines.append(
            f"  monthly cost difference (candidate - primary): {fmt_usd(step.monthly_cost_difference_usd, 2)}"
        )
        lines.append("")
    return "\n".join(lines).rstrip()


# --- HTML -----------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _histogram(
    name: str, title: str, series: Sequence[tuple[str, str, Sequence[float]]], unit: Callable[[float], str]
) -> str:
    """Two (or more) distributions on shared bins, bars side by side."""
    width, height, left, bottom, top = 520, 220, 48, 40, 28
    values = [v for _, _, vs in series for v in vs]
    bins = 10
    if not values:
        return _empty_chart(name, title, width, height)
    low, high = min(values), max(values)
    span = (high - low) or max(abs(high), 1e-9)
    counts = []
    for _, _, vs in series:
        row = [0] * bins
        for v in vs:
            row[min(int((v - low) / span * bins), bins - 1)] += 1
        counts.append(row)
    peak = max(max(row) for row in counts) or 1
    plot_w, plot_h = width - left - 12, height - bottom - top
    slot = plot_w / bins
    bar = (slot - 4) / len(series)
    parts = [
        f'<svg class="chart" data-chart="{_e(name)}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
        f'<text x="{left}" y="16" class="title">{_e(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 12}" y2="{top + plot_h}" class="axis"/>',
        f'<text x="{left - 6}" y="{top + 8}" class="tick" text-anchor="end">{peak}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" class="tick" text-anchor="end">0</text>',
    ]
    for s, (label, colour, _) in enumerate(series):
        for b, count in enumerate(counts[s]):
            if not count:
                continue
            h = plot_h * count / peak
            x = left + b * slot + 2 + s * bar
            parts.append(
                f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{colour}"><title>{_e(label)}: {count}</title></rect>'
            )
        parts.append(
            f'<rect x="{width - 190 + s * 90}" y="6" width="10" height="10" fill="{colour}"/>'
            f'<text x="{width - 176 + s * 90}" y="15" class="tick">{_e(label)}</text>'
        )
    parts.append(f'<text x="{left}" y="{height - 12}" class="tick">{_e(unit(low))}</text>')
    parts.append(
        f'<text x="{width - 12}" y="{height - 12}" class="tick" text-anchor="end">{_e(unit(high))}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _empty_chart(name: str, title: str, width: int, height: int) -> str:
    return (
        f'<svg class="chart" data-chart="{_e(name)}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">'
        f'<text x="12" y="16" class="title">{_e(title)}</text>'
        f'<text x="12" y="{height // 2}" class="tick">no data</text></svg>'
    )


def _agreement_chart(steps: Sequence[StepReport]) -> str:
    colours = {"exact_match": "#2b8a3e", "field_agreement": "#1971c2", "similarity": "#ae3ec9"}
    row_h, left, width = 18, 200, 640
    rows: list[str] = []
    y = 34
    for step in steps:
        rows.append(f'<text x="8" y="{y + 12}" class="label">{_e(step.pipeline)} · {_e(step.step_id)}</text>')
        for _, metric, value, text in _agreement(step):
            if value is None:
                continue
            w = (width - left - 70) * max(0.0, min(value, 1.0))
            rows.append(
                f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{row_h - 4}" fill="{colours[metric]}">'
                f"<title>{_e(metric)}: {_e(text)}</title></rect>"
                f'<text x="{left + w + 6:.1f}" y="{y + 11}" class="tick">{_e(text)}</text>'
            )
            y += row_h
        y += 10
    height = max(y + 8, 80)
    legend = "".join(
        f'<rect x="{left + i * 130}" y="8" width="10" height="10" fill="{colour}"/>'
        f'<text x="{left + 14 + i * 130}" y="17" class="tick">{label}</text>'
        for i, (label, colour) in enumerate(
            [("exact match", colours["exact_match"]), ("fields agree", colours["field_agreement"]),
             ("similarity", colours["similarity"])]
        )
    )  # fmt: skip
    return (
        f'<svg class="chart" data-chart="agreement" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="agreement by step">'
        f'<text x="8" y="17" class="title">Agreement by step</text>{legend}{"".join(rows)}</svg>'
    )


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#212529;background:#f8f9fa}
main{max-width:1120px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
.meta{color:#495057;margin:0 0 16px}
section{background:#fff;border:1px solid #dee2e6;border-radius:8px;padding:16px;margin:16px 0}
table{border-collapse:collapse;margin:8px 0;width:100%;max-width:720px}
th,td{text-align:left;padding:4px 10px;border-bottom:1px solid #e9ecef;vertical-align:top}
th{color:#495057;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:12px}
svg.chart{max-width:100%;height:auto;background:#fff}
svg .title{font:600 13px system-ui,sans-serif;fill:#212529} svg .tick{font:11px system-ui,sans-serif;fill:#495057}
svg .label{font:12px system-ui,sans-serif;fill:#212529} svg .axis{stroke:#adb5bd}
.diff-neg{color:#2b8a3e} .diff-pos{color:#c92a2a}
td{overflow-wrap:anywhere}
@media (max-width:600px){main{padding:10px}section{padding:10px}th,td{padding:4px 6px}}
"""


def render_html(report: ShadowReport, *, title: str = "Kernelflow comparison report") -> str:
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    window = "all stored pairs"
    if report.since is not None:
        window = f"pairs since {report.since.strftime('%Y-%m-%d %H:%M UTC')}"
    body: list[str] = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">Generated {generated} from <span data-metric="pairs" data-value="{report.pairs}">'
        f"{report.pairs}</span> pairs ({_e(window)}). Monthly figures are 30 days at the observed calls "
        "per day.</p>",
    ]
    if report.steps:
        body.append(f"<section>{_agreement_chart(report.steps)}</section>")
    else:
        body.append("<section><p>No pairs match.</p></section>")
    for step in report.steps:
        key = f"{step.pipeline}/{step.step_id}/{step.candidate}"
        body.append(f'<section class="step" data-step="{_e(key)}">')
        body.append(f"<h2>{_e(step.pipeline)} · {_e(step.step_id)} → {_e(step.candidate)}</h2>")
        body.append(
            f'<p class="meta"><span data-metric="pairs" data-value="{step.pairs}">{step.pairs}</span> pairs '
            f"({_e(', '.join(step.sources))}), "
            f'<span data-metric="both_answered" data-value="{step.both_answered}">{step.both_answered}</span> '
            f'answered by both, <span data-metric="calls_per_day" data-value="{step.calls_per_day}">'
            f"{step.calls_per_day:.1f}</span> calls per day.</p>"
        )
        body.append("<table><tr><th>agreement</th><th></th></tr>")
        for label, metric, value, text in _agreement(step):
            raw = "" if value is None else value
            body.append(
                f'<tr><td>{label}</td><td data-metric="{metric}" data-value="{raw}">{_e(text)}</td></tr>'
            )
        for name, share in step.fields.items():
            body.append(
                f'<tr><td>field {_e(name)}</td><td data-metric="field:{_e(name)}" data-value="{share}">'
                f"{fmt_share(share)}</td></tr>"
            )
        body.append("</table>")
        body.append("<table><tr><th></th><th>primary</th><th>candidate</th></tr>")
        for label, metric, pv, pt, cv, ct in _rows(step):
            body.append(
                f'<tr><td>{label}</td><td data-side="primary" data-metric="{metric}" '
                f'data-value="{_e("" if pv is None else pv)}">{_e(pt)}</td>'
                f'<td data-side="candidate" data-metric="{metric}" data-value="{_e("" if cv is None else cv)}">'
                f"{_e(ct)}</td></tr>"
            )
        diff = step.monthly_cost_difference_usd
        css = "" if diff is None else ("diff-neg" if diff < 0 else "diff-pos")
        body.append(
            f'<tr><td>monthly difference</td><td colspan="2" class="{css}" data-metric="monthly_cost_difference_usd"'
            f' data-value="{"" if diff is None else diff}">{_e(fmt_usd(diff, 2))} (candidate - primary)</td></tr>'
        )
        body.append('</table><div class="charts">')
        series = [
            ("primary", _PRIMARY, step.primary.latencies_ms),
            ("candidate", _CANDIDATE, step.candidate_side.latencies_ms),
        ]
        body.append(_histogram(f"latency:{key}", "Latency (ms)", series, lambda v: f"{v:.0f} ms"))
        series = [
            ("primary", _PRIMARY, step.primary.costs_usd),
            ("candidate", _CANDIDATE, step.candidate_side.costs_usd),
        ]
        body.append(_histogram(f"cost:{key}", "Cost per call (USD)", series, lambda v: f"${v:.6f}"))
        body.append("</div></section>")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>{''.join(body)}</main></body></html>\n"
    )


# --- similarity -----------------------------------------------------------------------------------


async def embed_similarities(registry: Registry, model: str, pairs: Sequence[ShadowPair]) -> dict[str, float]:
    """Cosine similarity of both answers of every pair both sides answered, through ``model``."""
    provider, model_name = registry.resolve(model)
    answered = [p for p in pairs if p.primary.ok and p.candidate.ok]
    scores: dict[str, float] = {}
    for start in range(0, len(answered), 64):
        batch = answered[start : start + 64]
        texts = [t for p in batch for t in (p.primary.output or " ", p.candidate.output or " ")]
        response = await provider.embed(EmbedRequest(model=model_name, input=texts))
        vectors = response.embeddings
        for n, pair in enumerate(batch):
            scores[pair.id] = cosine(vectors[2 * n], vectors[2 * n + 1])
    return scores


# --- the command ----------------------------------------------------------------------------------


async def report_command(args: argparse.Namespace) -> int:
    from worker.app import build_registry
    from worker.compare import open_shadow_store, parse_since, payload_codec
    from worker.config import WorkerSettings, load_config
    from worker.ops_cli import _overrides

    since = parse_since(args.since)
    start = datetime.now(UTC) - since if since is not None else None
    settings = WorkerSettings.from_env(**_overrides(args))
    registry: Registry | None = None
    if args.embed_model:
        registry = build_registry(load_config(settings.config_file))
        try:
            registry.resolve_ref(args.embed_model)
        except KernelflowError as exc:
            raise ConfigurationError(f"--embed-model {args.embed_model!r}: {exc}") from exc
    store = open_shadow_store(args.store, payload_codec(settings.config_file))
    try:
        pairs = await asyncio.to_thread(
            store.pairs, pipeline=args.pipeline, step_id=args.step, candidate=args.candidate,
            source=args.source, since=start,
        )  # fmt: skip
    finally:
        store.close()
    similarities: dict[str, float] = {}
    if registry is not None:
        try:
            similarities = await embed_similarities(registry, args.embed_model, pairs)
        except KernelflowError as exc:
            print(f"kernelflow: similarity left out: {args.embed_model} failed: {exc}", file=sys.stderr)
        finally:
            await registry.aclose()
    report = build_report(
        pairs, similarities=similarities, since=start, until=datetime.now(UTC) if start else None
    )
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print(render_table(report))
    if args.html:
        written = await asyncio.to_thread(_write, Path(args.html), render_html(report))
        print(f"HTML report: {written}", file=sys.stderr)
    return 0


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path.resolve()

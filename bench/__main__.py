"""`python -m bench [--quick | --smoke] [--only 1,2] [--out PATH]`: measure, print the table, write JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench._common import Mode, Result, machine_info, not_measured
from worker.logs import configure_logging

__all__ = ["FIGURES", "main", "render_table"]

DEFAULT_OUT = Path(__file__).parent / "results" / "latest.json"


def _figure(module: str) -> Callable[[Mode], Awaitable[list[Result]]]:
    async def run(mode: Mode) -> list[Result]:
        from importlib import import_module

        figure: Any = import_module(f"bench.{module}")
        results: list[Result] = await figure.run(mode)
        return results

    return run


FIGURES: dict[str, tuple[str, Callable[[Mode], Awaitable[list[Result]]], list[tuple[str, str]]]] = {
    "1": ("kernel overhead", _figure("kernel_overhead"), [("1. kernel overhead", "us/call")]),
    "2": ("durable latency", _figure("durable_latency"), [("2. durable latency", "ms")]),
    "3": (
        "durable throughput",
        _figure("durable_throughput"),
        [("3. durable throughput, c=100", "workflows/s")],
    ),
    "4": ("history growth", _figure("history_growth"), [("4. history growth", "MB")]),
    "5": ("worker memory", _figure("worker_memory"), [("5. worker memory per waiting pipeline", "KiB")]),
    "6": ("encryption", _figure("encryption"), [("6. encryption: durable latency p50", "ms")]),
    "7": (
        "observability overhead",
        _figure("observability_overhead"),
        [
            ("7. observability on/off, per model call", "us/call"),
            ("7. observability on/off, durable latency p50", "ms"),
        ],
    ),
    "8": (
        "worker processes",
        _figure("worker_scaling"),
        [("8. throughput, 1 worker process", "workflows/s")],
    ),
    "9": ("agent loop", _figure("agent_loop"), [("9. agent loop, time per turn, p50", "ms")]),
    "10": (
        "events bridge",
        _figure("events_bridge"),
        [("10. events -> started pipelines through the bridge", "events/s")],
    ),
    "11": (
        "events outbound",
        _figure("events_outbound"),
        [("11. pipeline latency with lifecycle events", "ms")],
    ),
    "12": (
        "admission control",
        _figure("admission"),
        [("12. admitted rate / limit, 1 worker process", "req/s")],
    ),
    "13": ("batch mode", _figure("batch_cost"), [("13. batch mode: cost batch/realtime", "ratio")]),
}


def _quiet_worker_logs() -> None:
    """Log as a production worker does (JSON lines at info), but into /dev/null so the progress stays
    readable; the cost of rendering each line is still paid."""
    configure_logging("json", "info", stream=open(os.devnull, "w"))  # noqa: SIM115


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _headline(machine: dict[str, Any], mode: str) -> str:
    return (
        f"{machine['cpu_model']} · {machine['cores']} cores · Python {machine['python']} · "
        f"temporalio {machine['temporalio']} · {machine['date']} · mode {mode} · "
        f"load average {machine['load_average_at_start'][0]:.1f} at start, "
        f"{machine['load_average_at_end'][0]:.1f} at end"
    )


def render_table(results: list[dict[str, Any]]) -> str:
    header = ("figure", "value", "unit", "baseline", "baseline value", "ratio", "target", "met")
    rows = [header]
    for r in results:
        if r.get("not_measured"):
            rows.append((r["name"], r["not_measured"], r["unit"], "", "", "", r.get("target") or "", "-"))
            continue
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        rows.append(
            (
                r["name"],
                _fmt(r["value"]),
                r["unit"],
                r.get("baseline") or "",
                _fmt(r.get("baseline_value")),
                "-" if r.get("ratio") is None else f"{r['ratio']:.3f}",
                r.get("target") or "",
                met,
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = [
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


async def _run(mode: Mode, only: list[str]) -> list[Result]:
    results: list[Result] = []
    for key in only:
        title, run, placeholders = FIGURES[key]
        print(f"figure {key}: {title} ({mode})", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            results += await run(mode)
        except Exception as exc:  # one broken figure must not hide the others
            traceback.print_exc()
            results += [
                not_measured(name, unit, f"the run failed: {type(exc).__name__}: {exc}")
                for name, unit in placeholders
            ]
        print(f"figure {key} done in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small counts, about a minute or two")
    size.add_argument("--smoke", action="store_true", help="tiny counts: proves every figure runs")
    parser.add_argument("--only", default=",".join(FIGURES), help="figures to run, e.g. 1,3")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    parser.add_argument(
        "--show", type=Path, metavar="RESULTS", help="print the table of a results file and exit"
    )
    args = parser.parse_args(argv)
    if args.show is not None:
        shown = json.loads(args.show.read_text())
        print(_headline(shown["machine"], shown["mode"]))
        print(render_table(shown["results"]))
        return 0
    mode: Mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    only = [key.strip() for key in args.only.split(",") if key.strip()]
    unknown = [key for key in only if key not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    # The temporal CLI lives next to the interpreter; make it findable when the venv is not activated.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    _quiet_worker_logs()

    machine = machine_info()
    machine["load_average_at_start"] = list(os.getloadavg())
    started = time.monotonic()
    results = asyncio.run(_run(mode, only))
    machine["load_average_at_end"] = list(os.getloadavg())
    rows = [r.to_json() for r in results]
    document = {
        "mode": mode,
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print()
    print(
        f"{machine['cpu_model']} · {machine['cores']} cores · Python {machine['python']} · "
        f"temporalio {machine['temporalio']} · {machine['date']} · mode {mode}"
    )
    print(render_table(rows))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What every figure shares: the result record, statistics, progress lines and machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = [
    "Mode",
    "Progress",
    "Result",
    "machine_info",
    "not_measured",
    "percentile",
    "proc_cpu_seconds",
    "rss_kib",
    "summary_us",
]

Mode = Literal["full", "quick", "smoke"]


@dataclass
class Result:
    """One figure: ``value`` for Kernelflow, ``baseline_value`` for the baseline named in ``baseline``,
    ``ratio`` = value / baseline_value. ``met`` is None when there is no target or nothing was measured."""

    name: str
    value: float | None
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None
    params: dict[str, Any] = field(default_factory=dict)
    not_measured: str | None = None

    def __post_init__(self) -> None:
        if self.ratio is None and self.value is not None and self.baseline_value:
            self.ratio = self.value / self.baseline_value

    def check(
        self,
        *,
        ratio_at_most: float | None = None,
        ratio_at_least: float | None = None,
        value_at_most: float | None = None,
    ) -> Result:
        """Set ``target`` and ``met`` from one bound."""
        if ratio_at_most is not None:
            self.target = f"ratio <= {ratio_at_most:g}"
            self.met = None if self.ratio is None else self.ratio <= ratio_at_most
        elif ratio_at_least is not None:
            self.target = f"ratio >= {ratio_at_least:g}"
            self.met = None if self.ratio is None else self.ratio >= ratio_at_least
        elif value_at_most is not None:
            self.target = f"value <= {value_at_most:g} {self.unit}"
            self.met = None if self.value is None else self.value <= value_at_most
        return self

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("value", "baseline_value", "ratio"):
            if isinstance(data[key], float):
                data[key] = round(data[key], 4)
        return data


def not_measured(name: str, unit: str, reason: str, *, target: str | None = None, **params: Any) -> Result:
    return Result(
        name=name, value=None, unit=unit, target=target, params=params, not_measured=f"not measured: {reason}"
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_us(seconds: Sequence[float]) -> dict[str, float]:
    """Mean, p50 and p99 of durations given in seconds, in microseconds."""
    return {
        "mean_us": round(statistics.fmean(seconds) * 1e6, 1),
        "p50_us": round(percentile(seconds, 50) * 1e6, 1),
        "p99_us": round(percentile(seconds, 99) * 1e6, 1),
    }


class Progress:
    """One line per step on stderr: which figure, n done of total."""

    def __init__(self, figure: str) -> None:
        self.figure = figure
        self._last = 0.0

    def step(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done in (0, total) or now - self._last >= 1.0:
            self._last = now
            print(f"  [{self.figure}] {what}: {done}/{total}", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        print(f"  [{self.figure}] {message}", file=sys.stderr, flush=True)


def rss_kib(pid: int) -> int:
    """Resident set size of a process from /proc/<pid>/status (VmRSS, in KiB)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_mib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "temporalio": _version("temporalio"),
        "httpx": _version("httpx"),
        "pydantic": _version("pydantic"),
        "litellm": _version("litellm"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }

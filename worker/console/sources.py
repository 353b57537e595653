"""Where the console reads figures and events from: two small interfaces and their implementations.

Metrics: the Prometheus HTTP API when ``KERNELFLOW_PROMETHEUS_URL`` is set (figures over the last
hour), else the workers' ``/metrics`` endpoints listed in ``KERNELFLOW_METRICS_URLS`` scraped directly
(figures since each worker started), else none. The names read are the workers' published metrics
(``kernelflow_model_calls`` by provider and outcome, ``gen_ai_client_operation_duration``,
``kernelflow_model_cost``, ``kernelflow_circuit_breaker_state``).

Events: an ``EventsReader`` gives recent inbound and outbound events and the dead letters, and
replays one. Without an event broker configured the console uses ``NoEvents`` and says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import httpx

__all__ = [
    "BREAKER_STATES",
    "DeadLetter",
    "EventRecord",
    "EventsReader",
    "MetricsReader",
    "NoEvents",
    "NoMetrics",
    "PrometheusMetrics",
    "ProviderFigures",
    "Sample",
    "ScrapedMetrics",
    "parse_exposition",
]

CALLS = "kernelflow_model_calls"
DURATION = "gen_ai_client_operation_duration"
COST = "kernelflow_model_cost"
BREAKER = "kernelflow_circuit_breaker_state"
BREAKER_STATES = {0: "closed", 1: "half-open", 2: "open"}


@dataclass
class ProviderFigures:
    """One provider's calls, error ratio, mean latency and cost, and its breakers by model."""

    provider: str
    calls: float = 0.0
    errors: float = 0.0
    latency_s: float | None = None
    cost_usd: float = 0.0
    breakers: dict[str, str] = field(default_factory=dict)

    @property
    def error_ratio(self) -> float | None:
        return self.errors / self.calls if self.calls else None


class MetricsReader(Protocol):
    """Figures per provider; ``window`` says what they cover (e.g. "last hour")."""

    @property
    def window(self) -> str: ...

    async def providers(self) -> dict[str, ProviderFigures]: ...


class NoMetrics:
    window = "not configured"

    async def providers(self) -> dict[str, ProviderFigures]:
        return {}


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text: str) -> list[Sample]:
    """Samples of the Prometheus text exposition format (comments and malformed lines skipped)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            continue
        name, _, raw_labels, raw_value = match.groups()
        try:
            value = float(raw_value)
        except ValueError:
            continue
        labels = {
            k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
            for k, v in _LABEL.findall(raw_labels or "")
        }
        samples.append(Sample(name, labels, value))
    return samples


def _base(name: str) -> str:
    return name.removesuffix("_total")


def figures_from_samples(samples: Sequence[Sample]) -> dict[str, ProviderFigures]:
    out: dict[str, ProviderFigures] = {}
    duration_sum: dict[str, float] = {}
    duration_count: dict[str, float] = {}

    def of(provider: str) -> ProviderFigures:
        return out.setdefault(provider, ProviderFigures(provider))

    for s in samples:
        name = _base(s.name)
        if name == CALLS and "provider" in s.labels:
            row = of(s.labels["provider"])
            row.calls += s.value
            if s.labels.get("outcome", "ok") != "ok":
                row.errors += s.value
        elif name in (f"{DURATION}_sum", f"{DURATION}_seconds_sum") and "gen_ai_provider_name" in s.labels:
            p = s.labels["gen_ai_provider_name"]
            duration_sum[p] = duration_sum.get(p, 0.0) + s.value
        elif (
            name in (f"{DURATION}_count", f"{DURATION}_seconds_count") and "gen_ai_provider_name" in s.labels
        ):
            p = s.labels["gen_ai_provider_name"]
            duration_count[p] = duration_count.get(p, 0.0) + s.value
        elif name == f"{COST}_sum" and "provider" in s.labels:
            of(s.labels["provider"]).cost_usd += s.value
        elif name == BREAKER and "provider" in s.labels:
            state = BREAKER_STATES.get(int(s.value), str(s.value))
            of(s.labels["provider"]).breakers[s.labels.get("model", "*")] = state
    for provider, count in duration_count.items():
        if count:
            of(provider).latency_s = duration_sum.get(provider, 0.0) / count
    return out


class ScrapedMetrics:
    """Reads each worker's ``/metrics`` text and adds the figures up (counters since start)."""

    window = "since the workers started"

    def __init__(self, urls: Sequence[str], *, timeout: float = 3.0) -> None:
        self.urls = list(urls)
        self.timeout = timeout
        self.unreachable: list[str] = []

    async def providers(self) -> dict[str, ProviderFigures]:
        samples: list[Sample] = []
        self.unreachable = []
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            for url in self.urls:
                try:
                    response = await http.get(url)
                    response.raise_for_status()
                except httpx.HTTPError as exc:
                    self.unreachable.append(f"{url}: {exc.__class__.__name__}")
                    continue
                samples += parse_exposition(response.text)
        return figures_from_samples(samples)


class PrometheusMetrics:
    """Asks a Prometheus server for the last hour (``increase`` of the counters)."""

    window = "last hour"

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    async def providers(self) -> dict[str, ProviderFigures]:
        queries = {
            "calls": f"sum by (provider, outcome) (increase({CALLS}_total[1h]) or increase({CALLS}[1h]))",
            "dsum": f"sum by (gen_ai_provider_name) (increase({DURATION}_sum[1h]))",
            "dcount": f"sum by (gen_ai_provider_name) (increase({DURATION}_count[1h]))",
            "cost": f"sum by (provider) (increase({COST}_sum[1h]))",
            "breaker": f"max by (provider, model) ({BREAKER})",
        }
        names = {
            "calls": CALLS,
            "dsum": f"{DURATION}_sum",
            "dcount": f"{DURATION}_count",
            "cost": f"{COST}_sum",
            "breaker": BREAKER,
        }
        samples: list[Sample] = []
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            for key, query in queries.items():
                response = await http.get(f"{self.url}/api/v1/query", params={"query": query})
                response.raise_for_status()
                for item in response.json().get("data", {}).get("result", []):
                    value = float(item["value"][1])
                    if not math.isnan(value):
                        samples.append(Sample(names[key], dict(item.get("metric", {})), value))
        return figures_from_samples(samples)


# --- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventRecord:
    direction: str  # "in" or "out"
    type: str
    subject: str | None
    time: datetime | None
    workflow_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeadLetter:
    id: str
    subject: str | None
    reason: str
    time: datetime | None
    attempts: int = 0


class EventsReader(Protocol):
    @property
    def connected(self) -> bool: ...

    async def triggers(self) -> list[dict[str, Any]]: ...

    async def recent(self, limit: int = 50) -> list[EventRecord]: ...

    async def dead_letters(self, limit: int = 50) -> list[DeadLetter]: ...

    async def replay(self, letter_id: str, *, by: str) -> str: ...


class NoEvents:
    """No event broker configured: the Events page says so and lists nothing."""

    connected = False

    async def triggers(self) -> list[dict[str, Any]]:
        return []

    async def recent(self, limit: int = 50) -> list[EventRecord]:
        return []

    async def dead_letters(self, limit: int = 50) -> list[DeadLetter]:
        return []

    async def replay(self, letter_id: str, *, by: str) -> str:
        raise LookupError("no event broker is configured, so there is no dead letter to replay")

"""Which live calls are shadowed, to which candidate, and how much shadowing a candidate may take.

Pure. A ``ShadowSpec`` is written on an ``llm`` step (``shadow: {model: ..., rate: 0.25}``) or, by
primary model or alias, in the worker's config (``ShadowConfig``, the ``shadow:`` section). A call is
shadowed when its step or its model has a rule, its tenant did not opt out, and ``sampled`` says so: a
hash of the workflow, run, step and call number (never the run's seeded random, whose draws the
pipeline's own choices depend on). ``HourlyBudget`` is the fleet-wide cap of one candidate, kept by
the shadow budget workflow.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kernel.routing import BreakerSettings
from kernel.steps.base import MODEL_PATTERN

__all__ = [
    "DEFAULT_SHADOW_STORE",
    "HourlyBudget",
    "ShadowConfig",
    "ShadowSpec",
    "sampled",
]

DEFAULT_SHADOW_STORE = "sqlite:///.state/shadow.db"

_HOUR = 3600.0


class ShadowSpec(BaseModel):
    """Send a sampled fraction of a step's (or a model's) answered calls to a candidate model too."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=MODEL_PATTERN, description="The candidate: provider/model or a worker alias.")
    rate: float = Field(default=1.0, gt=0, le=1, description="Fraction of calls shadowed (0 < rate <= 1).")
    per_hour: int | None = Field(
        default=None,
        gt=0,
        description="At most this many shadow calls to the candidate per hour (fleet-wide).",
    )
    max_cost_usd_per_hour: float | None = Field(
        default=None, gt=0, description="Stop shadowing to the candidate for the hour once it cost this much."
    )
    timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=600,
        description="Per attempt; a candidate slower than this is recorded as timed out.",
    )
    max_attempts: int = Field(
        default=2, ge=1, le=5, description="Attempts of a retryable candidate failure before it is recorded."
    )


class ShadowConfig(BaseModel):
    """The worker config's ``shadow:`` section::

        shadow:
          store: sqlite:///.state/shadow.db        # or postgresql://user@host/db; KERNELFLOW_SHADOW_STORE wins
          models:                                  # by the primary model (provider/model) or alias called
            openai/gpt-4o-mini: {model: anthropic/claude-sonnet-4-5, rate: 0.25, per_hour: 100}
          opt_out_tenants: [acme]                  # their pipelines are never shadowed
          breaker: {failure_threshold: 5, cooldown_s: 60}
          close_wait_s: 2                          # a closing run waits at most this for its shadow calls

    Every worker of a task queue should have the same section (a run records each shadow decision in
    its history, so a different section only changes decisions still to come)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="false: no call is shadowed, whatever the steps say.")
    store: str | None = Field(default=None, description=f"Where pairs go (default {DEFAULT_SHADOW_STORE}).")
    models: dict[str, ShadowSpec] = Field(
        default_factory=dict, description="Primary model or alias -> its candidate and sampling."
    )
    opt_out_tenants: list[str] = Field(
        default_factory=list, description="Tenants whose pipelines are never shadowed (their data stays put)."
    )
    breaker: BreakerSettings = Field(
        default_factory=lambda: BreakerSettings(failure_threshold=5, cooldown_s=60.0),
        description="Per candidate: consecutive failed shadow calls that stop shadowing to it for a while.",
    )
    scope: str | None = Field(
        default=None, description="Workers sharing the hourly caps (default: their task queue)."
    )
    close_wait_s: float = Field(
        default=2.0,
        ge=0,
        le=60,
        description="How long a closing (or continuing) run waits for its shadow calls still running; "
        "a call still running then keeps running on its worker and records its pair itself.",
    )

    def rule_for(self, *models: str) -> ShadowSpec | None:
        """The rule of the first of ``models`` (as called, then as resolved) that has one."""
        for model in models:
            if model in self.models:
                return self.models[model]
        return None

    def opted_out(self, tenant: str | None) -> bool:
        return tenant is not None and tenant in self.opt_out_tenants


def sampled(rate: float, *parts: str) -> bool:
    """Whether the call named by ``parts`` is in the shadowed fraction: the same answer on every
    worker and on replay, spread evenly over calls."""
    if rate >= 1:
        return True
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


class _Spend(BaseModel):
    id: str
    at: float
    cost_usd: float = 0.0


class HourlyBudget(BaseModel):
    """One candidate's shadow calls over the last hour: how many started and what they cost. A call
    is admitted while fewer than ``per_hour`` started in the hour and their reported cost is under
    ``max_cost_usd_per_hour``; calls in flight count by number only (their cost arrives after), so the
    cost cap may be passed by what the calls in flight then cost."""

    spends: list[_Spend] = Field(default_factory=list)
    admitted: int = 0
    refused: int = 0

    def prune(self, now: float) -> None:
        self.spends = [s for s in self.spends if s.at > now - _HOUR]

    def take(
        self, call_id: str, now: float, *, per_hour: int | None, max_cost_usd_per_hour: float | None
    ) -> tuple[bool, Literal["admitted", "per_hour", "cost"]]:
        """Admit ``call_id`` now or say which cap refuses it; the same id twice is admitted once."""
        self.prune(now)
        if any(s.id == call_id for s in self.spends):
            return True, "admitted"
        if per_hour is not None and len(self.spends) >= per_hour:
            self.refused += 1
            return False, "per_hour"
        if max_cost_usd_per_hour is not None and self.cost() >= max_cost_usd_per_hour:
            self.refused += 1
            return False, "cost"
        self.spends.append(_Spend(id=call_id, at=now))
        self.admitted += 1
        return True, "admitted"

    def spent(self, call_id: str, cost_usd: float) -> None:
        for spend in self.spends:
            if spend.id == call_id:
                spend.cost_usd = cost_usd

    def cost(self) -> float:
        return sum(s.cost_usd for s in self.spends)

    def next_expiry(self) -> float | None:
        return min((s.at + _HOUR for s in self.spends), default=None)

"""Admission control: rate limits per provider or model, shared by every worker.

Pure: the ``Ledger`` decides which waiting calls may start given the time it is told; the limiter
workflow (``workflows/limiter.py``) owns one ledger per key and feeds it the clock and the requests.

A reservation is made from an estimate (prompt tokens estimated from the text, plus ``max_tokens`` or
the model's output allowance from the catalog) and reconciled with the usage the provider reported. A
reservation is a lease: one never released is dropped when it expires, so a terminated or reset
workflow cannot hold capacity forever.

Windows are sliding and counted so that the provider's own windows hold, whatever the delay between
admission and the request reaching the provider: a call counts against ``requests_per_*`` and
``tokens_per_*`` from the moment it is admitted (or, granted ahead to a caller that holds its request,
from its ``not_before``) until one period after it was released, or after the
earlier moment its answer was in when the worker reports it (the request reached the provider in
between). A call is admitted only when fewer than the limit count now; then any window of the period
at the provider holds at most the limit (docs/limits.md has the argument). The price: each call
occupies its slot for the period plus the time from its admission to its answer.

Tenant cost budgets (``cost_per_day_usd``, ``cost_per_month_usd``, UTC calendar periods) live in the
same ledger: a call is refused (``BudgetRefusal``) when the period's spend, plus what calls admitted
or waiting have reserved, plus its own estimated cost would pass the budget. Its actual cost replaces
the estimate when it is released; a lease that runs out settles at the estimate. A raised budget
(``TenantBudgetRaise``, from a resumed or approved pipeline) holds for the current period only.
"""

from __future__ import annotations

import zlib
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kernel.contracts import ChatRequest

__all__ = [
    "DEFAULT_LEASE_S",
    "GRANT_AHEAD_S",
    "BudgetPeriod",
    "BudgetRefusal",
    "Grant",
    "Ledger",
    "LimitsConfig",
    "RateLimit",
    "TenantBudgetRaise",
    "Waiting",
    "budget_periods",
    "estimate_prompt_tokens",
    "estimate_tokens",
    "tenant_limit_key",
]

DEFAULT_LEASE_S = 600.0
"""How long a reservation lasts when the call never reports back (a terminated or reset workflow)."""

_SEEN_LIMIT = 4096
GRANT_AHEAD_S = 2.0
"""How far ahead a call whose caller holds its request until ``not_before`` may be granted: enough
for the grant to reach the worker and the activity to be dispatched before its slot opens."""
_PERIODS_KEPT = 64
_COST_FIELDS = ("cost_per_day_usd", "cost_per_month_usd")

BudgetPeriod = Literal["day", "month"]


class RateLimit(BaseModel):
    """The limits of one key (a provider, or a provider/model). Each field is optional; at least one
    is set. Per-second and per-minute limits may be combined; each holds on its own window."""

    model_config = ConfigDict(extra="forbid")

    requests_per_second: float | None = Field(default=None, gt=0)
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_second: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    concurrent: int | None = Field(default=None, gt=0)
    output_tokens: int | None = Field(
        default=None, gt=0, description="Output allowance reserved for calls without max_tokens."
    )
    margin_s: float = Field(
        default=0.0,
        ge=0,
        description="Added to each window: room for clock differences between the workers and the provider.",
    )
    cost_per_day_usd: float | None = Field(
        default=None, gt=0, description="A tenant's spend per UTC day (tenants only)."
    )
    cost_per_month_usd: float | None = Field(
        default=None, gt=0, description="A tenant's spend per UTC calendar month (tenants only)."
    )
    shards: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Limiters sharing the key, each with 1/shards of every limit (a hot key: docs/limits.md).",
    )

    @model_validator(mode="after")
    def _shardable(self) -> RateLimit:
        if self.shards > 1 and self.budgets():
            raise ValueError("a cost budget is kept by one limiter: shards must be 1 with cost_per_*_usd")
        if self.shards > 1 and self.concurrent is not None and self.concurrent < self.shards:
            raise ValueError(
                f"concurrent ({self.concurrent}) must be at least shards ({self.shards}): each shard "
                "holds a whole share"
            )
        return self

    def shard(self, request_id: str) -> tuple[int, RateLimit] | None:
        """The shard a request counts in (picked from its id) and that shard's share of the limits;
        None when the key is not sharded."""
        if self.shards == 1:
            return None
        number = zlib.crc32(request_id.encode()) % self.shards
        share = {
            name: value / self.shards
            for name in (
                "requests_per_second",
                "requests_per_minute",
                "tokens_per_second",
                "tokens_per_minute",
            )
            if (value := getattr(self, name)) is not None
        }
        if self.concurrent is not None:
            share["concurrent"] = self.concurrent // self.shards
        return number, self.model_copy(update={**share, "shards": 1})

    @model_validator(mode="after")
    def _some_limit(self) -> RateLimit:
        if not self.windows() and self.concurrent is None and not self.budgets():
            raise ValueError(
                "a rate limit needs at least one of requests_per_second, requests_per_minute, "
                "tokens_per_second, tokens_per_minute, concurrent (a tenant's also cost_per_day_usd, "
                "cost_per_month_usd)"
            )
        return self

    def budgets(self) -> dict[BudgetPeriod, float]:
        """The cost budgets that are set, by period."""
        found: dict[BudgetPeriod, float] = {}
        if self.cost_per_day_usd is not None:
            found["day"] = self.cost_per_day_usd
        if self.cost_per_month_usd is not None:
            found["month"] = self.cost_per_month_usd
        return found

    def windows(self) -> list[tuple[float, float | None, float | None]]:
        """``(period_s, requests, tokens)`` for each window that has a limit."""
        found: list[tuple[float, float | None, float | None]] = []
        if self.requests_per_second is not None or self.tokens_per_second is not None:
            found.append((1.0, self.requests_per_second, self.tokens_per_second))
        if self.requests_per_minute is not None or self.tokens_per_minute is not None:
            found.append((60.0, self.requests_per_minute, self.tokens_per_minute))
        return found

    def describe(self) -> str:
        parts = [
            f"{value:g} {name.replace('_', ' ')}"
            for name, value in self.model_dump(
                exclude={"margin_s", "output_tokens", "shards", *_COST_FIELDS}
            ).items()
            if value is not None
        ]
        parts.extend(f"${amount:g} per {period}" for period, amount in self.budgets().items())
        return ", ".join(parts)


class LimitsConfig(BaseModel):
    """The worker config's ``limits:`` section::

        limits:
          lease_s: 600
          models:
            openai/gpt-4.1: {requests_per_minute: 500, tokens_per_minute: 30000, concurrent: 50}
            anthropic: {requests_per_second: 5}      # a provider: every model of it, one key

    Keys are ``provider/model`` (that model only) or ``provider`` (all its models share the limit).
    Every worker of a task queue must have the same ``limits`` section.
    """

    model_config = ConfigDict(extra="forbid")

    models: dict[str, RateLimit] = Field(default_factory=dict)
    tenants: dict[str, RateLimit] = Field(
        default_factory=dict,
        description="Per tenant (workflow ids tenant/<name>/...): its calls over every model share this limit.",
    )
    lease_s: float = Field(
        default=DEFAULT_LEASE_S,
        gt=0,
        description="Longest a reservation is held without a release (a call's own lease, its timeout "
        "times its attempts, is used when shorter).",
    )
    scope: str | None = Field(
        default=None,
        description="Workers sharing one limiter per key: the same scope (default: their task queue).",
    )
    default_output_tokens: int = Field(
        default=1024,
        gt=0,
        description="Output allowance assumed for a model the catalog does not know, without max_tokens.",
    )

    @model_validator(mode="after")
    def _budgets_are_per_tenant(self) -> LimitsConfig:
        for name, limit in self.tenants.items():
            if limit.shards > 1:
                raise ValueError(f"limits.tenants.{name}.shards: only a model's limit is sharded")
        for key, limit in self.models.items():
            for name in _COST_FIELDS:
                if getattr(limit, name) is not None:
                    raise ValueError(
                        f"limits.models.{key}.{name}: cost budgets are per tenant; put them under "
                        f"limits.tenants.<name>.{name}"
                    )
        return self

    def key_for(self, model_ref: str) -> str | None:
        """The limited key ``model_ref`` (``provider/model``) counts against, or None."""
        if model_ref in self.models:
            return model_ref
        provider = model_ref.split("/", 1)[0]
        return provider if provider in self.models else None


def tenant_limit_key(tenant: str) -> str:
    """The limiter key of a tenant's own limit."""
    return f"tenant:{tenant}"


def estimate_prompt_tokens(request: ChatRequest) -> int:
    """About four characters a token, over the messages, tools and response schema as sent."""
    text = request.model_dump_json(include={"messages", "tools", "response_format"})
    return max(1, len(text) // 4)


def estimate_tokens(request: ChatRequest, output_allowance: int) -> int:
    """Prompt estimate plus ``max_tokens`` when the request sets it, else ``output_allowance``."""
    output = request.max_tokens if request.max_tokens is not None else output_allowance
    return estimate_prompt_tokens(request) + output


def budget_periods(at: float) -> dict[BudgetPeriod, str]:
    """The UTC day and month ``at`` (seconds since the epoch) falls in: ``{"day": "2026-11-29",
    "month": "2026-11"}``."""
    moment = datetime.fromtimestamp(at, tz=UTC)
    return {"day": moment.strftime("%Y-%m-%d"), "month": moment.strftime("%Y-%m")}


class TenantBudgetRaise(BaseModel):
    """New cost budgets of a tenant for the current UTC day and/or month (what a ``resume`` or an
    approval carries). A raise below the configured budget changes nothing."""

    model_config = ConfigDict(extra="forbid")

    cost_per_day_usd: float | None = Field(default=None, gt=0)
    cost_per_month_usd: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _some_budget(self) -> TenantBudgetRaise:
        if self.cost_per_day_usd is None and self.cost_per_month_usd is None:
            raise ValueError("a budget raise needs cost_per_day_usd or cost_per_month_usd")
        return self

    def by_period(self) -> dict[BudgetPeriod, float]:
        found: dict[BudgetPeriod, float] = {}
        if self.cost_per_day_usd is not None:
            found["day"] = self.cost_per_day_usd
        if self.cost_per_month_usd is not None:
            found["month"] = self.cost_per_month_usd
        return found


def _usd(amount: float) -> str:
    """Dollars with cents, and up to six decimals for small amounts: $50.00, $0.03, $0.000034."""
    whole, _, cents = f"{amount:.6f}".rstrip("0").partition(".")
    return f"${whole}.{cents.ljust(2, '0')}"


class BudgetRefusal(BaseModel):
    """A call refused because its tenant's cost budget for a period would be passed."""

    tenant: str
    period: BudgetPeriod
    period_id: str = Field(description="The UTC day (2026-11-29) or month (2026-11).")
    budget_usd: float
    spent_usd: float = Field(description="Settled spend of the period.")
    reserved_usd: float = Field(description="Estimated cost of calls admitted or waiting, not settled yet.")
    estimate_usd: float = Field(description="This call's estimated cost.")

    def message(self) -> str:
        return (
            f"tenant {self.tenant!r} is over its cost budget per {self.period}: "
            f"{_usd(self.budget_usd)} for {self.period_id} (UTC), {_usd(self.spent_usd)} spent and "
            f"{_usd(self.reserved_usd)} reserved; this call needs about {_usd(self.estimate_usd)}"
        )

    def covering(self) -> TenantBudgetRaise:
        """The smallest raise of the refused period that lets this call through."""
        needed = self.spent_usd + self.reserved_usd + self.estimate_usd
        return TenantBudgetRaise.model_validate({f"cost_per_{self.period}_usd": needed})


class Waiting(BaseModel):
    id: str
    requester: str
    tenant: str = ""
    tokens: int = Field(ge=0)
    lease_s: float = Field(default=DEFAULT_LEASE_S, gt=0)
    since: float
    cost_usd: float = Field(default=0.0, ge=0, description="Estimated cost, reserved against budgets.")
    periods: list[str] = Field(default_factory=list, description="Budget periods the cost counts in.")
    schedules: bool = Field(
        default=False,
        description="The caller holds its request until a grant's not_before: it may be granted ahead.",
    )


class Grant(BaseModel):
    id: str
    requester: str
    tenant: str = ""
    tokens: int = Field(ge=0)
    at: float
    expires: float
    released_at: float | None = None
    answered_at: float | None = Field(
        default=None, description="When the provider had answered (reported at release), if known."
    )
    cost_usd: float = Field(default=0.0, ge=0)
    periods: list[str] = Field(default_factory=list)
    not_before: float | None = Field(
        default=None, description="Granted ahead: the request is not sent before this instant."
    )

    @property
    def released(self) -> bool:
        return self.released_at is not None

    @property
    def starts(self) -> float:
        """Where the call starts counting: its admission, or the later instant it may send from."""
        return self.at if self.not_before is None else self.not_before

    @property
    def counted_from(self) -> float | None:
        """Where the call's trailing window starts: its release, or the earlier moment the provider had
        answered (the request had reached the provider by then). None while it is held."""
        if self.released_at is None:
            return None
        if self.answered_at is None:
            return self.released_at
        return min(self.released_at, self.answered_at)


class Ledger(BaseModel):
    """Reservations of one key: who waits (FIFO per tenant, tenants in turn), what was granted and
    when. Carried across the limiter's continue-as-new. Times are seconds since the epoch."""

    limit: RateLimit
    waiting: list[Waiting] = Field(default_factory=list)
    grants: list[Grant] = Field(default_factory=list)
    seen: list[str] = Field(default_factory=list, description="Recent request ids (deduplication).")
    blocked_until: float = 0.0
    last_tenant: str = ""
    admitted: int = 0
    expired: int = 0
    spend: dict[str, float] = Field(
        default_factory=dict, description="Settled cost (USD) per budget period (2026-11-29, 2026-11)."
    )
    raised: dict[str, float] = Field(default_factory=dict, description="Raised budgets per period.")

    def request(self, item: Waiting) -> bool:
        """Queue ``item``; False (and nothing changes) when its id was seen already."""
        if item.id in self.seen:
            return False
        self.seen.append(item.id)
        del self.seen[:-_SEEN_LIMIT]
        self.waiting.append(item)
        return True

    def release(
        self,
        request_id: str,
        used_tokens: int | None,
        now: float,
        cost_usd: float | None = None,
        answered_at: float | None = None,
    ) -> bool:
        """End a reservation; ``used_tokens`` (reported usage) replaces the estimate in the windows,
        ``cost_usd`` (the actual cost; None keeps the estimate) is settled in the budget periods. A
        release of a request still waiting withdraws it. False when nothing matched."""
        for grant in self.grants:
            if grant.id == request_id and not grant.released:
                grant.released_at = now
                grant.answered_at = answered_at
                if used_tokens is not None:
                    grant.tokens = used_tokens
                self._settle(grant, grant.cost_usd if cost_usd is None else cost_usd)
                return True
        before = len(self.waiting)
        self.waiting = [w for w in self.waiting if w.id != request_id]
        return len(self.waiting) != before

    def back_off(self, until: float) -> None:
        """A provider answered 429 with Retry-After: admit nothing before ``until``."""
        self.blocked_until = max(self.blocked_until, until)

    def expire(self, now: float) -> list[Grant]:
        """Drop reservations whose lease ran out (their window counts stay)."""
        gone = [g for g in self.grants if not g.released and g.expires <= now]
        for grant in gone:
            grant.released_at = grant.expires
            self._settle(grant, grant.cost_usd)  # never reported: the estimate stands
        self.expired += len(gone)
        return gone

    def _settle(self, grant: Grant, cost_usd: float) -> None:
        for period in grant.periods:
            self.spend[period] = round(self.spend.get(period, 0.0) + cost_usd, 10)
        if len(self.spend) > _PERIODS_KEPT:
            for period in sorted(self.spend)[:-_PERIODS_KEPT]:
                del self.spend[period]

    def raise_budget(self, raised: TenantBudgetRaise, now: float) -> None:
        """New budgets for the current periods (the larger of this and the configured one holds)."""
        periods = budget_periods(now)
        for period, amount in raised.by_period().items():
            self.raised[periods[period]] = amount
        if len(self.raised) > _PERIODS_KEPT:
            for old in sorted(self.raised)[:-_PERIODS_KEPT]:
                del self.raised[old]

    def reserved_usd(self, period_id: str) -> float:
        pending = [w.cost_usd for w in self.waiting if period_id in w.periods]
        held = [g.cost_usd for g in self.grants if not g.released and period_id in g.periods]
        return round(sum(pending) + sum(held), 10)

    def budget_refusal(
        self, limit: RateLimit, tenant: str, cost_usd: float, now: float
    ) -> BudgetRefusal | None:
        """Why a call of estimated ``cost_usd`` may not be admitted under ``limit``'s budgets, or None."""
        periods = budget_periods(now)
        for period, configured in limit.budgets().items():
            period_id = periods[period]
            budget = max(configured, self.raised.get(period_id, 0.0))
            spent = self.spend.get(period_id, 0.0)
            reserved = self.reserved_usd(period_id)
            if spent + reserved + cost_usd > budget + 1e-12:
                return BudgetRefusal(
                    tenant=tenant,
                    period=period,
                    period_id=period_id,
                    budget_usd=budget,
                    spent_usd=spent,
                    reserved_usd=reserved,
                    estimate_usd=cost_usd,
                )
        return None

    def _prune(self, now: float) -> None:
        longest = max((period for period, _, _ in self.limit.windows()), default=0.0) + self.limit.margin_s
        self.grants = [g for g in self.grants if g.released_at is None or g.released_at > now - longest]

    def _fits_at(self, item: Waiting, at: float) -> bool:
        """Whether ``item`` counting from ``at`` (until it ends) keeps every window within the limit
        at every instant from ``at`` on: a sweep over the other calls' counting intervals (a call held
        or not yet ended counts for ever)."""
        for period, requests, tokens in self.limit.windows():
            span = period + self.limit.margin_s
            count, total = 0, 0
            events: list[tuple[float, int, int]] = []  # (instant, 0 = ends / 1 = starts, tokens)
            for grant in self.grants:
                since = grant.counted_from
                end = None if since is None else since + span
                if end is not None and (end <= at or end <= grant.starts):
                    continue  # over, or empty (an answer stamped before its start by a clock behind)
                if grant.starts <= at:
                    count, total = count + 1, total + grant.tokens
                else:
                    events.append((grant.starts, 1, grant.tokens))
                if end is not None:
                    events.append((end, 0, grant.tokens))
            events.sort()
            index = 0
            while True:
                if requests is not None and count + 1 > requests:
                    return False
                # A call larger than the whole window is admitted alone rather than never.
                if tokens is not None and count and total + item.tokens > tokens:
                    return False
                if index == len(events):
                    break
                instant = events[index][0]
                while index < len(events) and events[index][0] == instant:
                    _, starts, weight = events[index]
                    step = 1 if starts else -1
                    count, total = count + step, total + step * weight
                    index += 1
        return True

    def _start_for(self, item: Waiting, now: float) -> float | None:
        """The earliest instant ``item`` may start counting, now or (for a caller that holds its
        request) up to ``GRANT_AHEAD_S`` later, when windows of calls already answered end; None when
        it must wait."""
        if now < self.blocked_until and not item.schedules:
            return None
        if self.limit.concurrent is not None:
            active = sum(1 for g in self.grants if not g.released)
            if active >= self.limit.concurrent:
                return None
        first = max(now, self.blocked_until)
        candidates = [first]
        if item.schedules:
            for period, _, _ in self.limit.windows():
                span = period + self.limit.margin_s
                candidates.extend(
                    since + span
                    for g in self.grants
                    if (since := g.counted_from) is not None and since + span > first
                )
        for at in sorted(set(candidates)):
            if at - now > (GRANT_AHEAD_S if item.schedules else 0.0):
                return None
            if self._fits_at(item, at):
                return at
        return None

    def _next_in_turn(self) -> Waiting | None:
        """The oldest waiting call of the tenant after the last one served (tenants in turn)."""
        if not self.waiting:
            return None
        tenants = list(dict.fromkeys(w.tenant for w in self.waiting))
        ordered = sorted(tenants)
        after = [t for t in ordered if t > self.last_tenant] + [t for t in ordered if t <= self.last_tenant]
        tenant = after[0]
        return next(w for w in self.waiting if w.tenant == tenant)

    def admit(self, now: float) -> list[Grant]:
        """Grant every waiting call that fits now, in turn; stops at the first that does not fit."""
        self.expire(now)
        self._prune(now)
        granted: list[Grant] = []
        while (item := self._next_in_turn()) is not None and (
            start := self._start_for(item, now)
        ) is not None:
            self.waiting.remove(item)
            grant = Grant(
                id=item.id,
                requester=item.requester,
                tenant=item.tenant,
                tokens=item.tokens,
                at=now,
                expires=start + item.lease_s,
                cost_usd=item.cost_usd,
                periods=item.periods,
                not_before=start if start > now else None,
            )
            self.grants.append(grant)
            self.last_tenant = item.tenant
            self.admitted += 1
            granted.append(grant)
        return granted

    def next_change(self, now: float) -> float | None:
        """When admitting may next succeed without a new event (a window slides, a lease expires)."""
        times: list[float] = [g.expires for g in self.grants if not g.released]
        if self.waiting:
            if now < self.blocked_until:
                times.append(self.blocked_until)
            for period, _, _ in self.limit.windows():
                times.extend(
                    since + period + self.limit.margin_s
                    for g in self.grants
                    if (since := g.counted_from) is not None
                )
        if any(w.schedules for w in self.waiting):  # a slot that opens soon may be granted ahead
            times.extend([t - GRANT_AHEAD_S for t in times])
        later = [t for t in times if t > now]
        return min(later) if later else None

    def summary(self) -> dict[str, Any]:
        return {
            "waiting": len(self.waiting),
            "active": sum(1 for g in self.grants if not g.released),
            "admitted": self.admitted,
            "expired": self.expired,
            "blocked_until": self.blocked_until,
            "spend_usd": dict(self.spend),
            "raised_usd": dict(self.raised),
        }

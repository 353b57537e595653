"""Routing policy: circuit breakers per model, weighted load balancing, and reroute tables.

Pure: no Temporal, no HTTP, the clock is injected. The worker's ``llm_chat`` activity asks a
``BreakerBoard`` before each upstream call and tells it how the call ended; workflows order a step's
models with ``weighted_order`` (fed by ``workflow.random()``, so the pick is replay-safe) and apply an
operator's reroutes with ``apply_routes``.

Breakers are kept per resolved ``provider/model``, not per provider: outages and overload are most
often one model's capacity (one deployment, one region), and fallbacks are often another model of the
same provider, which a provider-wide breaker would refuse too. A provider-wide outage still trips every
model's breaker after ``failure_threshold`` failures each.

A breaker's states::

    closed ──(failure_threshold consecutive retryable failures)──▶ open
    open ──(cooldown_s elapsed; the next call is let through as the probe)──▶ half_open
    half_open ──(probe succeeds)──▶ closed
    half_open ──(probe fails with a retryable error)──▶ open (another cool-down)

Only retryable upstream failures (rate limit, overload, 5xx, timeout, connection, broken stream) count.
A refused request (400, 401, content filter, ...) says nothing about the upstream's health: it neither
counts nor resets, and a probe that ends that way hands the probe to the next call.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from kernel.errors import CircuitOpen, RetryableError

__all__ = [
    "Balance",
    "BreakerBoard",
    "BreakerSettings",
    "BreakerState",
    "BreakerStatus",
    "CircuitBreaker",
    "Permit",
    "WeightedModel",
    "apply_routes",
    "check_routes",
    "counts_against_breaker",
    "weighted_order",
]

BreakerState = Literal["closed", "open", "half_open"]
Clock = Callable[[], float]
_MODEL = r"^[A-Za-z0-9_.:-]+(/[^\s]+)?$"


# --- circuit breakers ----------------------------------------------------------------------------


class BreakerSettings(BaseModel):
    """Thresholds of every breaker on a worker (the ``routing.breaker`` section of its config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    failure_threshold: int = Field(
        default=5, ge=1, le=1000, description="Consecutive retryable failures that open the circuit."
    )
    cooldown_s: float = Field(
        default=30.0, gt=0, le=86400, description="How long an open circuit refuses calls before a probe."
    )


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one call; hand it back to ``settle``. ``epoch`` ties it to the breaker state it
    was issued in, so an outcome arriving after the state moved on is ignored."""

    key: str
    epoch: int
    probe: bool = False


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    key: str
    state: BreakerState
    consecutive_failures: int
    open_until: float | None = None
    reason: str | None = None


def counts_against_breaker(error: BaseException) -> bool:
    """Only failures that retrying later might cure say something about the upstream's health."""
    return isinstance(error, RetryableError)


Listener = Callable[[BreakerStatus, BreakerState], None]
"""Called after a transition with the new status and the state it left."""


class CircuitBreaker:
    """One model's breaker. Safe to share between the threads and tasks of one worker process."""

    def __init__(
        self,
        provider: str,
        model: str,
        *,
        settings: BreakerSettings | None = None,
        clock: Clock = time.time,
        listener: Listener | None = None,
    ) -> None:
        self.provider = provider
        self.model = model
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._listener = listener
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._epoch = 0
        self._failures = 0
        self._open_until: float | None = None
        self._reason: str | None = None
        self._probe_deadline: float | None = None

    @property
    def key(self) -> str:
        return f"{self.provider}/{self.model}"

    def status(self) -> BreakerStatus:
        with self._lock:
            return self._status()

    def admit(self) -> Permit:
        """A permit for one call, or ``CircuitOpen`` saying why and until when calls are refused."""
        with self._lock:
            now = self._clock()
            left = self._state
            if self._state == "open" and self._open_until is not None and now >= self._open_until:
                self._move("half_open")
            if self._state == "half_open":
                if self._probe_deadline is None or now >= self._probe_deadline:
                    # No probe in flight, or the last one never reported back (its worker task died).
                    self._epoch += 1
                    self._probe_deadline = now + self.settings.cooldown_s
                    permit = Permit(self.key, self._epoch, probe=True)
                else:
                    raise self._refusal(now, self._probe_deadline, probing=True)
            elif self._state == "open":
                raise self._refusal(now, self._open_until or now, probing=False)
            else:
                permit = Permit(self.key, self._epoch)
            status = self._status()
        self._notify(status, left)
        return permit

    def settle(self, permit: Permit, error: BaseException | None = None) -> None:
        """Report how the permitted call ended: ``None`` for an answer, else the error it raised."""
        with self._lock:
            left = self._state
            if permit.epoch != self._epoch:
                return
            if error is None:
                if self._state == "half_open" and permit.probe:
                    self._failures = 0
                    self._reason = None
                    self._move("closed")
                elif self._state == "closed":
                    self._failures = 0
            elif counts_against_breaker(error):
                reason = f"{type(error).__name__}: {error}"
                if self._state == "half_open" and permit.probe:
                    self._failures += 1
                    self._trip(f"the probe call failed ({reason})", getattr(error, "retry_after", None))
                elif self._state == "closed":
                    self._failures += 1
                    if self._failures >= self.settings.failure_threshold:
                        self._trip(
                            f"{self._failures} consecutive retryable failures (last: {reason})",
                            getattr(error, "retry_after", None),
                        )
            elif self._state == "half_open" and permit.probe:
                self._probe_deadline = None  # no verdict on health: the next call probes
            status = self._status()
        if status.state != left:
            self._notify(status, left)

    def _trip(self, reason: str, retry_after: float | None) -> None:
        cooldown = max(self.settings.cooldown_s, retry_after or 0.0)
        self._open_until = self._clock() + cooldown
        self._reason = reason
        self._move("open")

    def _move(self, state: BreakerState) -> None:
        self._state = state
        self._epoch += 1
        self._probe_deadline = None
        if state == "closed":
            self._open_until = None

    def _status(self) -> BreakerStatus:
        open_until = self._open_until if self._state != "closed" else None
        return BreakerStatus(self.key, self._state, self._failures, open_until, self._reason)

    def _refusal(self, now: float, until: float, *, probing: bool) -> CircuitOpen:
        when = datetime.datetime.fromtimestamp(until, datetime.UTC).isoformat(timespec="seconds")
        wait = f"until {when} (in {max(0.0, until - now):.1f} s)"
        if probing:
            detail = f"a probe call is testing it; other calls are refused until it answers, at most {wait}"
        else:
            detail = f"calls are refused {wait}, then one probe call is let through"
        return CircuitOpen(
            f"circuit open for {self.key} on this worker: {self._reason}; {detail}",
            provider=self.provider,
            model=self.model,
            retry_after=max(0.0, until - now),
            open_until=until,
        )

    def _notify(self, status: BreakerStatus, left: BreakerState) -> None:
        if self._listener is not None and status.state != left:
            self._listener(status, left)


class BreakerBoard:
    """The breakers of one worker process, by ``provider/model``, shared by all its pipelines."""

    def __init__(
        self,
        settings: BreakerSettings | None = None,
        *,
        clock: Clock = time.time,
        listener: Listener | None = None,
    ) -> None:
        self._settings = settings or BreakerSettings()
        self._clock = clock
        self._listener = listener
        self._lock = threading.Lock()
        self._breakers: dict[str, CircuitBreaker] = {}

    @property
    def settings(self) -> BreakerSettings:
        return self._settings

    def configure(self, settings: BreakerSettings) -> None:
        """New thresholds for every breaker, current and future; their states are kept."""
        with self._lock:
            self._settings = settings
            for breaker in self._breakers.values():
                breaker.settings = settings

    def breaker(self, provider: str, model: str) -> CircuitBreaker:
        key = f"{provider}/{model}"
        with self._lock:
            breaker = self._breakers.get(key)
            if breaker is None:
                breaker = CircuitBreaker(
                    provider, model, settings=self._settings, clock=self._clock, listener=self._listener
                )
                self._breakers[key] = breaker
            return breaker

    def admit(self, provider: str, model: str) -> Permit | None:
        """A permit for one call (``None`` when breakers are disabled), or ``CircuitOpen``."""
        if not self._settings.enabled:
            return None
        return self.breaker(provider, model).admit()

    def settle(self, permit: Permit | None, error: BaseException | None = None) -> None:
        if permit is None:
            return
        with self._lock:
            breaker = self._breakers.get(permit.key)
        if breaker is not None:
            breaker.settle(permit, error)

    def snapshot(self) -> list[BreakerStatus]:
        with self._lock:
            breakers = list(self._breakers.values())
        return sorted((b.status() for b in breakers), key=lambda s: s.key)


# --- weighted load balancing ---------------------------------------------------------------------


def _check_balance(choices: list[WeightedModel]) -> list[WeightedModel]:
    models = [c.model for c in choices]
    duplicates = sorted({m for m in models if models.count(m) > 1})
    if duplicates:
        raise ValueError(f"each model may appear once in 'balance'; repeated: {duplicates}")
    if not any(c.weight > 0 for c in choices):
        raise ValueError("at least one model in 'balance' needs a weight above 0")
    return choices


class WeightedModel(BaseModel):
    """One of several equivalent models a step spreads its calls over; ``weight`` is relative.
    A weight of 0 keeps a model as a standby that is only tried as a fallback."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(pattern=_MODEL)
    weight: float = Field(default=1.0, ge=0, le=1_000_000)


Balance = Annotated[list[WeightedModel], Field(min_length=1, max_length=10), AfterValidator(_check_balance)]
"""The type of a step's ``balance`` field: unique models, at least one with a positive weight."""


def weighted_order(choices: Sequence[WeightedModel], rand: float) -> list[str]:
    """All models of ``choices``: first one picked by weight with ``rand`` (uniform in [0, 1)), then the
    others in their listed order as fallbacks. The same ``rand`` always gives the same order."""
    if not 0.0 <= rand < 1.0:
        raise ValueError(f"rand must be in [0, 1), got {rand!r}")
    _check_balance(list(choices))
    total = sum(c.weight for c in choices)
    target = rand * total
    first = next((c for c in choices if c.weight > 0), choices[0])
    cumulative = 0.0
    for choice in choices:
        cumulative += choice.weight
        if choice.weight > 0 and target < cumulative:
            first = choice
            break
    else:  # rounding put target at the very top: the last positively weighted model
        first = [c for c in choices if c.weight > 0][-1]
    return [first.model, *(c.model for c in choices if c is not first)]


# --- reroutes ------------------------------------------------------------------------------------


def check_routes(routes: Mapping[str, str]) -> None:
    """Refuse a reroute table that sends a model to itself or round in a loop, naming the loop."""
    for source, target in routes.items():
        if not source or not target:
            raise ValueError(f"reroute {source!r} -> {target!r}: both sides must name a model or alias")
        apply_routes(source, routes)


def apply_routes(model: str, routes: Mapping[str, str]) -> str:
    """The model to call instead of ``model`` (matched exactly, as written in the step: a
    ``provider/model`` or an alias). Chains are followed (``a -> b``, ``b -> c`` gives ``c``); a loop
    raises ``ValueError`` naming it."""
    seen = [model]
    current = model
    while current in routes:
        current = routes[current]
        if current in seen:
            raise ValueError(f"reroutes loop: {' -> '.join([*seen, current])}")
        seen.append(current)
    return current

"""Routing policy: the breaker state machine on a fake clock, weighted ordering, reroute tables."""

from __future__ import annotations

import pickle
from collections import Counter

import pytest
from pydantic import TypeAdapter, ValidationError

from kernel.errors import (
    CircuitOpen,
    ConnectionFailed,
    InvalidRequest,
    NonRetryableError,
    Overloaded,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
)
from kernel.pipeline import LlmStep, parse_pipeline
from kernel.routing import (
    Balance,
    BreakerBoard,
    BreakerSettings,
    BreakerStatus,
    CircuitBreaker,
    WeightedModel,
    apply_routes,
    check_routes,
    weighted_order,
)


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _overloaded() -> Overloaded:
    return Overloaded("openai model 'gpt-4.1' answered HTTP 503: busy", provider="openai", model="gpt-4.1")


def _breaker(clock: FakeClock, *, threshold: int = 3, cooldown: float = 30.0) -> CircuitBreaker:
    settings = BreakerSettings(failure_threshold=threshold, cooldown_s=cooldown)
    return CircuitBreaker("openai", "gpt-4.1", settings=settings, clock=clock)


def _fail(breaker: CircuitBreaker, error: BaseException | None = None, times: int = 1) -> None:
    for _ in range(times):
        breaker.settle(breaker.admit(), error or _overloaded())


# --- breaker -------------------------------------------------------------------------------------


def test_defaults_are_five_failures_and_thirty_seconds() -> None:
    assert BreakerSettings().failure_threshold == 5
    assert BreakerSettings().cooldown_s == 30.0


def test_opens_after_threshold_consecutive_retryable_failures() -> None:
    clock = FakeClock()
    breaker = _breaker(clock)
    _fail(breaker, times=2)
    assert breaker.status().state == "closed"
    _fail(breaker)
    status = breaker.status()
    assert status.state == "open"
    assert status.open_until == clock.now + 30
    with pytest.raises(CircuitOpen):
        breaker.admit()


def test_a_success_resets_the_count() -> None:
    breaker = _breaker(FakeClock())
    _fail(breaker, times=2)
    breaker.settle(breaker.admit(), None)
    _fail(breaker, times=2)
    assert breaker.status().state == "closed"
    assert breaker.status().consecutive_failures == 2


@pytest.mark.parametrize(
    "error",
    [
        RateLimited("429"),
        Overloaded("503"),
        UpstreamError("500"),
        UpstreamTimeout("timeout"),
        ConnectionFailed("refused"),
    ],
)
def test_retryable_upstream_failures_count(error: BaseException) -> None:
    breaker = _breaker(FakeClock(), threshold=1)
    _fail(breaker, error)
    assert breaker.status().state == "open"


@pytest.mark.parametrize(
    "error", [InvalidRequest("400"), NonRetryableError("content filter"), ValueError("bug")]
)
def test_refused_requests_and_bugs_do_not_count(error: BaseException) -> None:
    breaker = _breaker(FakeClock(), threshold=1)
    _fail(breaker, error, times=5)
    assert breaker.status() == BreakerStatus("openai/gpt-4.1", "closed", 0)


def test_refusal_names_provider_reason_and_until_when() -> None:
    clock = FakeClock(1_700_000_000.0)
    breaker = _breaker(clock)
    _fail(breaker, times=3)
    clock.advance(12)
    with pytest.raises(CircuitOpen) as info:
        breaker.admit()
    error = info.value
    assert error.provider == "openai" and error.model == "gpt-4.1"
    assert error.open_until == 1_700_000_030.0
    assert "openai/gpt-4.1" in error.message
    assert "3 consecutive retryable failures" in error.message and "Overloaded" in error.message
    assert "2023-11-14T22:13:50+00:00" in error.message and "18.0 s" in error.message
    assert not error.retryable
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.message, copy.open_until, copy.model) == (error.message, error.open_until, error.model)


def test_after_cooldown_one_probe_goes_through_and_success_closes() -> None:
    clock = FakeClock()
    breaker = _breaker(clock)
    _fail(breaker, times=3)
    clock.advance(30)
    probe = breaker.admit()
    assert probe.probe and breaker.status().state == "half_open"
    with pytest.raises(CircuitOpen, match="probe call is testing it"):
        breaker.admit()
    breaker.settle(probe, None)
    assert breaker.status().state == "closed"
    assert not breaker.admit().probe


def test_failed_probe_opens_again_for_another_cooldown() -> None:
    clock = FakeClock()
    breaker = _breaker(clock)
    _fail(breaker, times=3)
    clock.advance(31)
    breaker.settle(breaker.admit(), _overloaded())
    status = breaker.status()
    assert status.state == "open" and status.open_until == clock.now + 30
    assert status.reason is not None and "probe call failed" in status.reason
    clock.advance(29)
    with pytest.raises(CircuitOpen):
        breaker.admit()


def test_probe_without_verdict_hands_the_probe_to_the_next_call() -> None:
    clock = FakeClock()
    breaker = _breaker(clock)
    _fail(breaker, times=3)
    clock.advance(30)
    breaker.settle(breaker.admit(), InvalidRequest("400"))
    assert breaker.status().state == "half_open"
    assert breaker.admit().probe


def test_a_lost_probe_is_replaced_after_a_cooldown() -> None:
    clock = FakeClock()
    breaker = _breaker(clock)
    _fail(breaker, times=3)
    clock.advance(30)
    lost = breaker.admit()
    clock.advance(30)
    replacement = breaker.admit()
    assert replacement.probe
    breaker.settle(lost, None)  # too late: its answer no longer decides
    assert breaker.status().state == "half_open"
    breaker.settle(replacement, None)
    assert breaker.status().state == "closed"


def test_outcomes_of_calls_started_before_the_trip_are_ignored() -> None:
    clock = FakeClock()
    breaker = _breaker(clock)
    slow = breaker.admit()
    _fail(breaker, times=3)
    breaker.settle(slow, None)
    assert breaker.status().state == "open"


def test_retry_after_longer_than_cooldown_keeps_it_open_longer() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, threshold=1)
    _fail(breaker, RateLimited("429", retry_after=120))
    assert breaker.status().open_until == clock.now + 120


def test_board_keeps_one_breaker_per_model_and_reports_transitions() -> None:
    clock = FakeClock()
    seen: list[tuple[str, str, str]] = []
    board = BreakerBoard(
        BreakerSettings(failure_threshold=1, cooldown_s=5),
        clock=clock,
        listener=lambda status, left: seen.append((status.key, left, status.state)),
    )
    board.settle(board.admit("openai", "gpt-4.1"), _overloaded())
    with pytest.raises(CircuitOpen):
        board.admit("openai", "gpt-4.1")
    assert board.admit("openai", "gpt-4o-mini") is not None  # another model of the same provider
    clock.advance(5)
    board.settle(board.admit("openai", "gpt-4.1"), None)
    assert seen == [
        ("openai/gpt-4.1", "closed", "open"),
        ("openai/gpt-4.1", "open", "half_open"),
        ("openai/gpt-4.1", "half_open", "closed"),
    ]
    assert [s.key for s in board.snapshot()] == ["openai/gpt-4.1", "openai/gpt-4o-mini"]


def test_board_configure_changes_thresholds_and_can_disable() -> None:
    board = BreakerBoard(BreakerSettings(failure_threshold=5), clock=FakeClock())
    board.settle(board.admit("openai", "m"), _overloaded())
    board.configure(BreakerSettings(failure_threshold=2))
    board.settle(board.admit("openai", "m"), _overloaded())
    with pytest.raises(CircuitOpen):
        board.admit("openai", "m")
    board.configure(BreakerSettings(enabled=False))
    assert board.admit("openai", "m") is None
    board.settle(None, _overloaded())


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(ValidationError, match="failure_threshold"):
        BreakerSettings(failure_threshold=0)
    with pytest.raises(ValidationError, match="cooldown\n  Extra inputs"):
        BreakerSettings.model_validate({"cooldown_s": 30, "cooldown": 5})


# --- weighted ordering ---------------------------------------------------------------------------


def _choices(*pairs: tuple[str, float]) -> list[WeightedModel]:
    return [WeightedModel(model=m, weight=w) for m, w in pairs]


def test_first_pick_follows_the_weights_and_the_rest_keep_their_order() -> None:
    choices = _choices(("openai/a", 1), ("openai/b", 3), ("openai/c", 0))
    assert weighted_order(choices, 0.0) == ["openai/a", "openai/b", "openai/c"]
    assert weighted_order(choices, 0.2499) == ["openai/a", "openai/b", "openai/c"]
    assert weighted_order(choices, 0.25) == ["openai/b", "openai/a", "openai/c"]
    assert weighted_order(choices, 0.999999) == ["openai/b", "openai/a", "openai/c"]


def test_ordering_is_deterministic_and_spreads_by_weight() -> None:
    choices = _choices(("x/light", 1), ("x/heavy", 3), ("x/standby", 0))
    firsts = Counter(weighted_order(choices, i / 1000)[0] for i in range(1000))
    assert firsts == {"x/light": 250, "x/heavy": 750}
    assert all(weighted_order(choices, 0.61) == weighted_order(choices, 0.61) for _ in range(10))


def test_every_model_appears_once() -> None:
    choices = _choices(("p/a", 2), ("p/b", 2), ("p/c", 1))
    for i in range(100):
        assert sorted(weighted_order(choices, i / 100)) == ["p/a", "p/b", "p/c"]


def test_rand_outside_unit_interval_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        weighted_order(_choices(("p/a", 1)), 1.0)


def test_balance_refuses_duplicates_and_all_zero_weights() -> None:
    adapter: TypeAdapter[list[WeightedModel]] = TypeAdapter(Balance)
    with pytest.raises(ValidationError, match="repeated"):
        adapter.validate_python([{"model": "p/a"}, {"model": "p/a", "weight": 2}])
    with pytest.raises(ValidationError, match="weight above 0"):
        adapter.validate_python([{"model": "p/a", "weight": 0}])
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        adapter.validate_python([{"model": "p/a", "weight": -1}])


def test_a_step_takes_a_balance() -> None:
    spec = parse_pipeline(
        {
            "name": "balanced",
            "steps": [
                {
                    "id": "ask",
                    "model": "openai/gpt-4o-mini",
                    "balance": [
                        {"model": "openai/gpt-4o-mini", "weight": 3},
                        {"model": "openai/gpt-4.1-nano"},
                    ],
                    "prompt": "hi",
                }
            ],
        }
    )
    step = spec.steps[0]
    assert isinstance(step, LlmStep)
    assert step.balance == _choices(("openai/gpt-4o-mini", 3), ("openai/gpt-4.1-nano", 1))


# --- reroutes ------------------------------------------------------------------------------------


def test_apply_routes_matches_exactly_and_follows_chains() -> None:
    routes = {"openai/gpt-4.1": "smart", "smart": "anthropic/claude-sonnet-4", "fast": "openai/gpt-4o-mini"}
    assert apply_routes("openai/gpt-4.1", routes) == "anthropic/claude-sonnet-4"
    assert apply_routes("fast", routes) == "openai/gpt-4o-mini"
    assert apply_routes("openai/gpt-4.1-mini", routes) == "openai/gpt-4.1-mini"
    assert apply_routes("openai/gpt-4.1", {}) == "openai/gpt-4.1"


def test_loops_are_refused_naming_the_loop() -> None:
    routes = {"a": "b", "b": "c", "c": "a"}
    with pytest.raises(ValueError, match="a -> b -> c -> a"):
        apply_routes("a", routes)
    with pytest.raises(ValueError, match="x -> x"):
        check_routes({"x": "x"})
    with pytest.raises(ValueError, match="both sides"):
        check_routes({"x": ""})
    check_routes({"openai/gpt-4.1": "fast", "fast": "openai/gpt-4o-mini"})

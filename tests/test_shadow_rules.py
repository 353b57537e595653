"""Shadow rules without a server: sampling is stable and even, the hourly budget admits by number and
cost over a sliding hour, worker rules match by model or alias, and sealed bodies hold no clear text."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.api.common.v1 import Payload

from kernel.errors import ConfigurationError
from kernel.shadow_rules import HourlyBudget, ShadowConfig, ShadowSpec, sampled
from worker.codec import KernelflowCodec
from worker.keys import FileKeyProvider, format_ring, generate_key
from worker.shadow_sealer import CodecSealer


def test_sampling_is_the_same_every_time_and_close_to_the_rate() -> None:
    picks = [sampled(0.25, "wf", "run", "classify", str(n)) for n in range(4000)]
    assert picks == [sampled(0.25, "wf", "run", "classify", str(n)) for n in range(4000)]
    assert 0.22 < sum(picks) / len(picks) < 0.28
    assert all(sampled(1.0, "wf", "run", "s", str(n)) for n in range(100))
    assert picks != [sampled(0.25, "wf", "run", "draft", str(n)) for n in range(4000)]  # per step


def test_the_budget_admits_by_number_then_frees_a_slot_an_hour_later() -> None:
    budget = HourlyBudget()
    assert budget.take("a", 1000.0, per_hour=2, max_cost_usd_per_hour=None) == (True, "admitted")
    assert budget.take("b", 1001.0, per_hour=2, max_cost_usd_per_hour=None) == (True, "admitted")
    assert budget.take("c", 1002.0, per_hour=2, max_cost_usd_per_hour=None) == (False, "per_hour")
    assert budget.take("a", 1003.0, per_hour=2, max_cost_usd_per_hour=None) == (
        True,
        "admitted",
    )  # asked twice
    assert budget.next_expiry() == 4600.0
    assert budget.take("c", 4600.5, per_hour=2, max_cost_usd_per_hour=None) == (True, "admitted")
    assert (budget.admitted, budget.refused) == (3, 1)


def test_the_budget_stops_once_the_hour_cost_the_cap() -> None:
    budget = HourlyBudget()
    assert budget.take("a", 0.0, per_hour=None, max_cost_usd_per_hour=0.01)[0]
    assert budget.take("b", 1.0, per_hour=None, max_cost_usd_per_hour=0.01)[0]  # a's cost not reported yet
    budget.spent("a", 0.008)
    budget.spent("b", 0.004)
    assert budget.take("c", 2.0, per_hour=None, max_cost_usd_per_hour=0.01) == (False, "cost")
    assert budget.cost() == pytest.approx(0.012)
    assert budget.take("c", 3601.5, per_hour=None, max_cost_usd_per_hour=0.01) == (True, "admitted")


def test_worker_rules_match_the_model_asked_then_the_model_that_answered() -> None:
    rule = ShadowSpec(model="anthropic/claude-sonnet-4-5", rate=0.5)
    config = ShadowConfig(models={"fast": rule}, opt_out_tenants=["acme"])
    assert config.rule_for("fast", "openai/gpt-4o-mini") is rule
    assert config.rule_for("openai/gpt-4o-mini") is None
    assert config.opted_out("acme") and not config.opted_out("globex") and not config.opted_out(None)


def test_sealed_bodies_unseal_with_any_key_of_the_ring_and_refuse_tampering(tmp_path: Path) -> None:
    keys = FileKeyProvider(dir=tmp_path / "keys")
    keys.ring_path().parent.mkdir(parents=True)
    keys.ring_path().write_text(format_ring([generate_key("k-old")]))
    sealer = CodecSealer(KernelflowCodec(provider=keys, compress_min_bytes=0))
    sealed_old = sealer.seal(b'{"prompt": "secret secret secret"}')
    assert b"secret" not in sealed_old and b"k-old" in sealed_old
    keys.add_key()  # rotation: a new key seals, the old one still unseals
    sealed_new = sealer.seal(b"fresh")
    assert b"k-old" not in sealed_new
    assert (
        sealer.unseal(sealed_old) == b'{"prompt": "secret secret secret"}'
        and sealer.unseal(sealed_new) == b"fresh"
    )
    payload = Payload.FromString(sealed_new)
    payload.data = payload.data[:-1] + bytes([payload.data[-1] ^ 1])
    with pytest.raises(ConfigurationError, match="failed authentication"):
        sealer.unseal(payload.SerializeToString())
    keys.ring_path().write_text(format_ring([generate_key("k-other")]))
    with pytest.raises(ConfigurationError, match="no key 'k-old'"):
        sealer.unseal(sealed_old)
    assert CodecSealer.of(KernelflowCodec(provider=None)) is None  # encryption off: nothing to seal with


async def test_a_sealer_works_from_a_thread_with_a_running_loop(tmp_path: Path) -> None:
    keys = FileKeyProvider(dir=tmp_path / "keys")
    keys.ring_path().parent.mkdir(parents=True)
    keys.ring_path().write_text(format_ring([generate_key("k1")]))
    sealer = CodecSealer(KernelflowCodec(provider=keys))
    assert sealer.unseal(sealer.seal(b"inside a loop")) == b"inside a loop"

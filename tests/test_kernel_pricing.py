"""Prices: exact and dated-snapshot lookup, cached tokens at the cached rate, unknown is None."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kernel.contracts import Usage
from kernel.pricing import DEFAULT_PRICES, Price, PriceTable

_TABLE = PriceTable()


def test_exact_lookup() -> None:
    assert _TABLE.lookup("openai", "gpt-4o") == DEFAULT_PRICES["openai"]["gpt-4o"]
    assert _TABLE.lookup("openai", "gpt-4o-mini") == DEFAULT_PRICES["openai"]["gpt-4o-mini"]


@pytest.mark.parametrize(
    ("model", "priced_as"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-5-2025-08-07", "gpt-5"),
    ],
)
def test_dated_snapshot_prices_as_its_base_model(model: str, priced_as: str) -> None:
    assert _TABLE.lookup("openai", model) == DEFAULT_PRICES["openai"][priced_as]


def test_a_bedrock_model_id_with_its_version_prices_as_its_model() -> None:
    assert (
        _TABLE.lookup("bedrock", "amazon.nova-lite-v1:0") == DEFAULT_PRICES["bedrock"]["amazon.nova-lite-v1"]
    )
    assert _TABLE.lookup("bedrock", "amazon.nova-lite-v10") is None


def test_prefix_must_end_at_a_dash() -> None:
    assert _TABLE.lookup("openai", "gpt-4omega") is None


def test_unknown_model_and_provider_cost_none_not_zero() -> None:
    usage = Usage(prompt_tokens=1000, completion_tokens=1000)
    assert _TABLE.lookup("openai", "my-finetune") is None
    assert _TABLE.cost("openai", "my-finetune", usage) is None
    assert _TABLE.cost("nowhere", "gpt-4o", usage) is None


def test_local_providers_are_free() -> None:
    assert _TABLE.cost("ollama", "llama3.2", Usage(prompt_tokens=10, completion_tokens=10)) == 0.0


def test_cost_of_a_plain_call() -> None:
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=500_000)
    assert _TABLE.cost("openai", "gpt-4o", usage) == pytest.approx(2.50 + 5.00)


def test_cached_tokens_are_billed_at_the_cached_rate() -> None:
    # 1M prompt tokens of which 400k cached: 600k at 2.50 + 400k at 1.25, plus 100k output at 10.00.
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=100_000, cached_tokens=400_000)
    assert _TABLE.cost("openai", "gpt-4o-2024-08-06", usage) == pytest.approx(1.50 + 0.50 + 1.00)


def test_cached_tokens_without_a_cached_rate_cost_the_input_rate() -> None:
    price = Price(input=2.0, output=6.0)
    usage = Usage(prompt_tokens=1_000_000, cached_tokens=500_000)
    assert price.cost(usage) == pytest.approx(2.0)


def test_cached_count_beyond_the_prompt_is_capped() -> None:
    price = Price(input=2.0, output=0.0, cached_input=1.0)
    assert price.cost(Usage(prompt_tokens=1_000_000, cached_tokens=5_000_000)) == pytest.approx(1.0)


def test_reasoning_tokens_are_part_of_the_completion() -> None:
    with_reasoning = Usage(prompt_tokens=0, completion_tokens=1_000_000, reasoning_tokens=800_000)
    assert _TABLE.cost("openai", "o3", with_reasoning) == pytest.approx(8.00)


def test_overrides_price_a_private_model_and_replace_a_list_price() -> None:
    table = _TABLE.with_overrides(
        {
            "openai": {"gpt-4o": {"input": 1.0, "output": 2.0}},
            "azure_openai": {"my-deployment": {"input": 3.0, "output": 4.0, "cached_input": 0.5}},
        }
    )
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000)
    assert table.cost("openai", "gpt-4o", usage) == pytest.approx(3.0)
    assert table.cost("openai", "gpt-4o-2024-08-06", usage) == pytest.approx(3.0)
    assert table.cost("azure_openai", "my-deployment", usage) == pytest.approx(7.0)
    # the original table is untouched
    assert _TABLE.cost("openai", "gpt-4o", usage) == pytest.approx(12.5)
    assert _TABLE.lookup("azure_openai", "my-deployment") is None
    assert DEFAULT_PRICES["openai"]["gpt-4o"].input == 2.50


def test_bad_override_is_refused() -> None:
    with pytest.raises(ValidationError):
        _TABLE.with_overrides({"openai": {"gpt-4o": {"input": -1, "output": 2}}})
    with pytest.raises(ValidationError):
        _TABLE.with_overrides({"openai": {"gpt-4o": {"inptu": 1, "output": 2}}})

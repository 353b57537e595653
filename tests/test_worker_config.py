"""The worker's configuration file: aliases, user presets, prices, and clear errors for typos."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel.contracts import Usage
from kernel.errors import ConfigurationError
from kernel.pricing import PriceTable
from worker.app import build_registry
from worker.config import WorkerSettings, load_config

CONFIG = """
aliases:
  fast: openai/gpt-4o-mini
  house: intranet/llama-3-70b
providers:
  openai: {timeout: 30}
prices:
  intranet: {llama-3-70b: {input: 0.5, output: 1.5}}
presets:
  intranet: {base_url: "http://llm.corp.example/v1", api_key_env: CORP_LLM_KEY}
tool_allow: ["https://crm.example/api/"]
"""


def test_config_file_sets_aliases_presets_and_prices(tmp_path: Path) -> None:
    path = tmp_path / "kernelflow.yaml"
    path.write_text(CONFIG)
    config = load_config(path)
    registry = build_registry(config, environ={})
    provider, model = registry.resolve("house")
    assert (provider.name, model) == ("intranet", "llama-3-70b")
    assert provider.base_url == "http://llm.corp.example/v1"
    assert provider.describe()["credentials_env"] == "CORP_LLM_KEY" and not provider.has_credentials()
    assert registry.resolve_ref("fast").provider == "openai"
    assert registry.get("openai").settings.timeout == 30
    assert config.tool_allow == ["https://crm.example/api/"]
    prices = PriceTable().with_overrides({p: dict(m) for p, m in config.prices.items()})
    assert (
        prices.cost("intranet", "llama-3-70b", Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000))
        == 2.0
    )


def test_a_typo_in_the_config_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "kernelflow.yaml"
    path.write_text("aliasses:\n  fast: openai/gpt-4o-mini\n")
    with pytest.raises(ConfigurationError, match=r"config\.aliasses: unknown field"):
        load_config(path)


def test_a_typo_in_a_preset_names_the_preset_and_field(tmp_path: Path) -> None:
    path = tmp_path / "kernelflow.yaml"
    path.write_text("presets:\n  intranet: {base_url: 'http://x/v1', stream_usge: false}\n")
    with pytest.raises(ConfigurationError, match=r"presets\.intranet\.stream_usge"):
        build_registry(load_config(path), environ={})


def test_settings_come_from_the_environment_and_refuse_bad_values() -> None:
    settings = WorkerSettings.from_env(
        {"TEMPORAL_ADDRESS": "temporal:7233", "KERNELFLOW_TASK_QUEUE": "triage"}
    )
    assert (settings.temporal_address, settings.task_queue, settings.namespace) == (
        "temporal:7233",
        "triage",
        "default",
    )
    with pytest.raises(ConfigurationError, match="log_format"):
        WorkerSettings.from_env({"KERNELFLOW_LOG_FORMAT": "xml"})


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")

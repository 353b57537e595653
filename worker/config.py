"""Worker configuration: where Temporal is, and how providers are set up.

Process settings come from the environment (``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE``,
``KERNELFLOW_TASK_QUEUE``, ``KERNELFLOW_CONFIG``, ``KERNELFLOW_LOG_FORMAT``, ``KERNELFLOW_LOG_LEVEL``).
Provider set-up comes from an optional YAML file (``KERNELFLOW_CONFIG``)::

    providers:
      openai: {base_url: "http://localhost:8400/v1", timeout: 120}
    aliases:
      fast: openai/gpt-4o-mini
    prices:
      openai: {my-finetune: {input: 0.3, output: 1.2}}
    presets:
      - {name: intranet, base_url: "https://llm.corp/v1", api_key_env: CORP_LLM_KEY}

API keys belong in the environment, not in this file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kernel.errors import ConfigurationError
from kernel.pipeline import format_validation_error
from kernel.pricing import Price
from kernel.provider import ProviderSettings

__all__ = ["KernelflowConfig", "WorkerSettings", "load_config"]


class KernelflowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    providers: dict[str, ProviderSettings] = Field(default_factory=dict)
    aliases: dict[str, str] = Field(default_factory=dict)
    prices: dict[str, dict[str, Price]] = Field(default_factory=dict)
    presets: list[dict[str, Any]] = Field(default_factory=list)
    pipelines_dir: Path | None = Field(
        default=None, description="Folder of YAML pipelines to register by name."
    )


class WorkerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temporal_address: str = "localhost:7233"
    namespace: str = "default"
    task_queue: str = "kernelflow"
    config_file: Path | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "info"
    max_concurrent_activities: int = Field(default=200, gt=0)
    max_concurrent_workflow_tasks: int = Field(default=100, gt=0)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            "temporal_address": env.get("TEMPORAL_ADDRESS"),
            "namespace": env.get("TEMPORAL_NAMESPACE"),
            "task_queue": env.get("KERNELFLOW_TASK_QUEUE"),
            "config_file": env.get("KERNELFLOW_CONFIG"),
            "log_format": env.get("KERNELFLOW_LOG_FORMAT"),
            "log_level": env.get("KERNELFLOW_LOG_LEVEL"),
        }
        values.update(overrides)
        try:
            return cls.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            raise ConfigurationError(format_validation_error(exc, prefix="settings")) from exc


def load_config(path: Path | None) -> KernelflowConfig:
    """The YAML config file, validated; ``None`` gives the defaults."""
    if path is None:
        return KernelflowConfig()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {str(path)!r}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    try:
        config = KernelflowConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigurationError(f"{path}: " + format_validation_error(exc, prefix="config")) from exc
    if config.pipelines_dir is not None and not config.pipelines_dir.is_absolute():
        config.pipelines_dir = (path.parent / config.pipelines_dir).resolve()
    return config

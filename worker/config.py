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
      intranet: {base_url: "https://llm.corp/v1", api_key_env: CORP_LLM_KEY}
    payloads:
      storage: filesystem        # or "off", or "driver" with driver: "my_pkg.storage:make_s3_driver"
      dir: .state/payloads       # shared by the client and every worker (a shared volume in compose)
      threshold_bytes: 65536     # payloads at least this large are stored outside the history

API keys belong in the environment, not in this file. ``KERNELFLOW_PAYLOADS_STORAGE`` and
``KERNELFLOW_PAYLOADS_DIR`` override ``payloads.storage`` and ``payloads.dir``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kernel.errors import ConfigurationError
from kernel.pipeline import format_validation_error
from kernel.pricing import Price
from kernel.provider import ProviderSettings

__all__ = [
    "KernelflowConfig",
    "PayloadSettings",
    "WorkerSettings",
    "load_config",
    "payload_settings_from_env",
]


TEMPORAL_PAYLOAD_LIMIT = 2 * 1024 * 1024
"""Temporal's default per-payload limit (``limit.blobSize.error``)."""


class PayloadSettings(BaseModel):
    """Where large payloads (conversations, long answers) live instead of the workflow history.

    The client that starts workflows and every worker must use the same settings: a payload stored
    by one is read back by the others through the reference left in the history.
    """

    model_config = ConfigDict(extra="forbid")

    storage: Literal["filesystem", "driver", "off"] = Field(
        default="filesystem",
        description="filesystem: a content-addressed directory; driver: a StorageDriver factory; "
        "off: everything inline, and a payload over limit_bytes fails at once.",
    )
    dir: Path = Field(default=Path(".state/payloads"), description="The filesystem store's directory.")
    driver: str | None = Field(
        default=None,
        description="'module:callable' returning a temporalio StorageDriver (e.g. S3 or GCS), "
        "called with the keyword arguments in driver_options.",
    )
    driver_options: dict[str, Any] = Field(default_factory=dict)
    threshold_bytes: int = Field(default=64 * 1024, ge=0, description="Store payloads at least this large.")
    limit_bytes: int = Field(
        default=TEMPORAL_PAYLOAD_LIMIT,
        gt=0,
        description="The server's per-payload limit; with storage off, larger payloads are refused.",
    )

    @model_validator(mode="after")
    def _driver_named(self) -> PayloadSettings:
        if self.storage == "driver" and not self.driver:
            raise ValueError("payloads.storage is 'driver' but payloads.driver names no 'module:callable'")
        return self


class KernelflowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    providers: dict[str, ProviderSettings] = Field(default_factory=dict)
    aliases: dict[str, str] = Field(default_factory=dict)
    prices: dict[str, dict[str, Price]] = Field(default_factory=dict)
    presets: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="OpenAI-compatible services: name -> base_url, api_key_env, quirks."
    )
    pipelines_dir: Path | None = Field(
        default=None, description="Folder of YAML pipelines to register by name."
    )
    payloads: PayloadSettings = Field(default_factory=PayloadSettings)


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
    if "dir" in config.payloads.model_fields_set and not config.payloads.dir.is_absolute():
        config.payloads.dir = (path.parent / config.payloads.dir).resolve()
    return config


def payload_settings_from_env(environ: Mapping[str, str] | None = None) -> PayloadSettings:
    """The ``payloads:`` section of ``KERNELFLOW_CONFIG`` (defaults without one), with the
    ``KERNELFLOW_PAYLOADS_STORAGE`` and ``KERNELFLOW_PAYLOADS_DIR`` overrides applied."""
    env = os.environ if environ is None else environ
    config_file = env.get("KERNELFLOW_CONFIG")
    payloads = load_config(Path(config_file) if config_file else None).payloads
    overrides: dict[str, Any] = {}
    if env.get("KERNELFLOW_PAYLOADS_STORAGE"):
        overrides["storage"] = env["KERNELFLOW_PAYLOADS_STORAGE"]
    if env.get("KERNELFLOW_PAYLOADS_DIR"):
        overrides["dir"] = env["KERNELFLOW_PAYLOADS_DIR"]
    if not overrides:
        return payloads
    try:
        return PayloadSettings.model_validate({**payloads.model_dump(exclude_unset=True), **overrides})
    except ValidationError as exc:
        raise ConfigurationError(format_validation_error(exc, prefix="payloads")) from exc

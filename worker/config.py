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
      encryption:                # payloads encrypted at rest (docs/encryption.md)
        enabled: true
        provider: file           # or env (KERNELFLOW_ENCRYPTION_KEYS), or a kernelflow.key_providers plugin
        options: {dir: /etc/kernelflow/keys}
        tenant_keys: false       # per-tenant keys for workflow ids "tenant/<tenant>/..."
      compression: {enabled: true, min_bytes: 1024}   # zlib before encryption
    routing:
      breaker: {failure_threshold: 5, cooldown_s: 30}   # per provider/model; enabled: false turns off
    events:                        # the bridge's triggers and outbound lifecycle events: docs/events.md
      broker: nats://127.0.0.1:4222
    limits:                      # admission control shared by every worker (docs/limits.md)
      models:
        openai/gpt-4.1: {requests_per_minute: 500, tokens_per_minute: 30000, concurrent: 50}
      tenants:
        acme: {tokens_per_minute: 20000, cost_per_day_usd: 50, cost_per_month_usd: 1000}
    shadow:                      # shadow traffic to candidate models (docs/shadow.md)
      models: {openai/gpt-4o-mini: {model: anthropic/claude-sonnet-4-5, rate: 0.25, per_hour: 100}}

A running worker re-reads the file when it changes (polled) or on SIGHUP: ``aliases``, ``providers``,
``presets``, ``prices``, ``routing`` and ``limits`` apply to the following model calls, including the
next steps of pipelines already running; other sections need a restart.

API keys belong in the environment, not in this file. ``KERNELFLOW_PAYLOADS_STORAGE`` and
``KERNELFLOW_PAYLOADS_DIR`` override ``payloads.storage`` and ``payloads.dir``; ``KERNELFLOW_ENCRYPTION``
(on/off), ``KERNELFLOW_ENCRYPTION_KEYS_DIR`` (the file provider's directory), ``KERNELFLOW_ENCRYPTION_TENANT_KEYS``
(on/off) and ``KERNELFLOW_COMPRESSION`` (on/off) override ``payloads.encryption`` and ``payloads.compression``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from activities.mcp import McpServerConfig
from kernel.errors import ConfigurationError, KernelflowError
from kernel.limits import LimitsConfig
from kernel.pipeline import format_validation_error
from kernel.pricing import Price
from kernel.provider import ProviderSettings
from kernel.routing import BreakerSettings
from kernel.shadow_rules import ShadowConfig
from kernel.triggers import EventsConfig

__all__ = [
    "CompressionSettings",
    "ConfigWatcher",
    "EncryptionSettings",
    "KernelflowConfig",
    "PayloadSettings",
    "RoutingConfig",
    "WorkerSettings",
    "config_changes",
    "describe_payload_store",
    "load_config",
    "payload_settings",
    "payload_settings_from_env",
]


TEMPORAL_PAYLOAD_LIMIT = 2 * 1024 * 1024
"""Temporal's default per-payload limit (``limit.blobSize.error``)."""


class EncryptionSettings(BaseModel):
    """AES-256-GCM encryption of every payload this process writes (see docs/encryption.md)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="Encrypt payloads; reading encrypted ones needs it too.")
    provider: str = Field(
        default="env", description="A kernelflow.key_providers entry point: env, file, or a plugin (a KMS)."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the provider (file: dir, create_tenant_keys)."
    )
    tenant_keys: bool = Field(
        default=False,
        description="Workflow ids 'tenant/<tenant>/...' (and their children) use the tenant's own keys.",
    )
    allow_plaintext: bool = Field(
        default=True,
        description="Read payloads written without encryption (histories from before it was turned on).",
    )
    redact_logs: bool = Field(
        default=True,
        description="Keep error messages (which may quote a prompt) out of the worker's logs.",
    )


class CompressionSettings(BaseModel):
    """zlib compression of large payloads, before encryption."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    min_bytes: int = Field(default=1024, ge=0, description="Compress payloads at least this large.")
    level: int = Field(default=6, ge=1, le=9)


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
    encryption: EncryptionSettings = Field(default_factory=EncryptionSettings)
    compression: CompressionSettings = Field(default_factory=CompressionSettings)

    @model_validator(mode="after")
    def _driver_named(self) -> PayloadSettings:
        if self.storage == "driver" and not self.driver:
            raise ValueError("payloads.storage is 'driver' but payloads.driver names no 'module:callable'")
        return self


class RoutingConfig(BaseModel):
    """How the worker routes model calls: circuit breaker thresholds."""

    model_config = ConfigDict(extra="forbid")

    breaker: BreakerSettings = Field(default_factory=BreakerSettings)


class KernelflowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    providers: dict[str, ProviderSettings] = Field(default_factory=dict)
    aliases: dict[str, str] = Field(default_factory=dict)
    prices: dict[str, dict[str, Price]] = Field(default_factory=dict)
    presets: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="OpenAI-compatible services: name -> base_url, api_key_env, quirks."
    )
    tool_allow: list[str] = Field(
        default_factory=list,
        description="URL prefixes `tool` steps may call (plus KERNELFLOW_TOOL_ALLOWLIST).",
    )
    pipelines_dir: Path | None = Field(
        default=None, description="Folder of YAML pipelines to register by name."
    )
    mcp_servers: dict[str, McpServerConfig] = Field(
        default_factory=dict,
        description="MCP servers agent steps may use, by name (plus KERNELFLOW_MCP_SERVERS, which wins).",
    )
    payloads: PayloadSettings = Field(default_factory=PayloadSettings)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    events: EventsConfig | None = Field(
        default=None, description="Broker, triggers, webhook ingress, lifecycle events (docs/events.md)."
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    shadow: ShadowConfig | None = Field(
        default=None, description="Shadow traffic to candidate models and where pairs go (docs/shadow.md)."
    )


class WorkerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temporal_address: str = "localhost:7233"
    """Used when set explicitly (flag or ``TEMPORAL_ADDRESS``); otherwise the profile's (see
    ``worker.connection``)."""
    namespace: str = "default"
    profile: str | None = Field(default=None, description="Temporal connection profile (TOML), as the CLI's.")
    task_queue: str = "kernelflow"
    config_file: Path | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "info"
    max_concurrent_activities: int = Field(default=200, gt=0)
    max_concurrent_workflow_tasks: int = Field(default=100, gt=0)
    max_cached_workflows: int = Field(default=1000, ge=0)
    shutdown_grace_s: float = Field(
        default=20.0, ge=0, description="After SIGTERM: how long in-flight activities may take to finish."
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="HTTP port for /metrics, /healthz and /readyz; off without."
    )
    metrics_host: str = Field(default="0.0.0.0", description="Address the metrics/health port binds to.")
    metrics_labels: list[Literal["pipeline", "tenant"]] = Field(
        default=["pipeline"],
        description="Optional metric labels with user-chosen values (bounded by what you name).",
    )
    provider_queues: list[str] = Field(
        default_factory=list,
        description="Providers whose model calls get a task queue (and activity slots) of their own.",
    )
    approvals_poll_s: float = Field(
        default=15.0, gt=0, description="How often the approvals-waiting gauge is read from visibility."
    )
    tracing: bool = Field(
        default=False, description="OpenTelemetry traces, exported over OTLP (OTEL_* vars)."
    )
    trace_content: bool = Field(default=False, description="Record prompt and completion text on spans.")

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
            "profile": env.get("TEMPORAL_PROFILE"),
            "max_concurrent_activities": env.get("KERNELFLOW_MAX_CONCURRENT_ACTIVITIES"),
            "max_concurrent_workflow_tasks": env.get("KERNELFLOW_MAX_CONCURRENT_WORKFLOW_TASKS"),
            "max_cached_workflows": env.get("KERNELFLOW_MAX_CACHED_WORKFLOWS"),
            "shutdown_grace_s": env.get("KERNELFLOW_SHUTDOWN_GRACE_S"),
            "metrics_port": env.get("KERNELFLOW_METRICS_PORT"),
            "metrics_host": env.get("KERNELFLOW_METRICS_HOST"),
            "metrics_labels": _split(env.get("KERNELFLOW_METRICS_LABELS")),
            "approvals_poll_s": env.get("KERNELFLOW_APPROVALS_POLL_S"),
            "provider_queues": _split(env.get("KERNELFLOW_PROVIDER_QUEUES")),
            "tracing": env.get("KERNELFLOW_TRACING"),
            "trace_content": env.get("KERNELFLOW_TRACE_CONTENT"),
        }
        values.update(overrides)
        try:
            return cls.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            raise ConfigurationError(format_validation_error(exc, prefix="settings")) from exc


def _split(value: str | None) -> list[str] | None:
    """A comma-separated list; ``none`` (or an empty value) for an empty list."""
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip() and part.strip() != "none"]


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
    keys_dir = config.payloads.encryption.options.get("dir")
    if isinstance(keys_dir, str) and not Path(keys_dir).is_absolute():
        config.payloads.encryption.options["dir"] = str((path.parent / keys_dir).resolve())
    return config


def payload_settings(config: KernelflowConfig, environ: Mapping[str, str] | None = None) -> PayloadSettings:
    """``config.payloads`` with the environment's overrides: the one path by which clients and workers
    choose their payload store and encryption (see ``payloads_with_env``)."""
    return payloads_with_env(config.payloads, os.environ if environ is None else environ)


def payload_settings_from_env(
    environ: Mapping[str, str] | None = None,
    *,
    config_file: Path | None = None,
    base: PayloadSettings | None = None,
) -> PayloadSettings:
    """The payload settings of ``base``, else of ``config_file`` (default: ``KERNELFLOW_CONFIG``;
    defaults without one), with the environment overrides applied."""
    env = os.environ if environ is None else environ
    if base is not None:
        return payloads_with_env(base, env)
    if config_file is None and env.get("KERNELFLOW_CONFIG"):
        config_file = Path(env["KERNELFLOW_CONFIG"])
    return payload_settings(load_config(config_file), env)


def describe_payload_store(settings: PayloadSettings) -> str:
    """Where this process keeps large payloads, in words for its start-up message."""
    if settings.storage == "off":
        return f"off (payloads inline; over {settings.limit_bytes} bytes refused)"
    where = (
        f"directory {settings.dir.resolve()}"
        if settings.storage == "filesystem"
        else f"driver {settings.driver}"
    )
    return f"{where} (payloads of {settings.threshold_bytes} bytes or more)"


def payloads_with_env(payloads: PayloadSettings, env: Mapping[str, str]) -> PayloadSettings:
    """``payloads`` with the ``KERNELFLOW_PAYLOADS_*``, ``KERNELFLOW_ENCRYPTION*`` and
    ``KERNELFLOW_COMPRESSION`` overrides."""
    overrides: dict[str, Any] = {}
    if env.get("KERNELFLOW_PAYLOADS_STORAGE"):
        overrides["storage"] = env["KERNELFLOW_PAYLOADS_STORAGE"]
    if env.get("KERNELFLOW_PAYLOADS_DIR"):
        overrides["dir"] = env["KERNELFLOW_PAYLOADS_DIR"]
    encryption = _encryption_overrides(env, payloads.encryption)
    if encryption is not None:
        overrides["encryption"] = encryption
    if env.get("KERNELFLOW_COMPRESSION"):
        overrides["compression"] = {
            **payloads.compression.model_dump(exclude_unset=True),
            "enabled": _switch(env, "KERNELFLOW_COMPRESSION"),
        }
    if not overrides:
        return payloads
    try:
        return PayloadSettings.model_validate({**payloads.model_dump(exclude_unset=True), **overrides})
    except ValidationError as exc:
        raise ConfigurationError(format_validation_error(exc, prefix="payloads")) from exc


def _switch(env: Mapping[str, str], name: str) -> bool:
    value = env[name].strip().lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ConfigurationError(f"{name}={env[name]!r}: use on or off")


def _encryption_overrides(env: Mapping[str, str], current: EncryptionSettings) -> dict[str, Any] | None:
    """``payloads.encryption`` with the environment's overrides, or ``None`` when none is set.
    ``KERNELFLOW_ENCRYPTION_KEYS_DIR`` selects the file provider; ``KERNELFLOW_ENCRYPTION_KEYS`` alone
    (no config) turns encryption on with the env provider."""
    values = current.model_dump(exclude_unset=True)
    changed = False
    if env.get("KERNELFLOW_ENCRYPTION_KEYS_DIR"):
        values["provider"] = "file"
        values["options"] = {**current.options, "dir": env["KERNELFLOW_ENCRYPTION_KEYS_DIR"]}
        changed = True
    if env.get("KERNELFLOW_ENCRYPTION_TENANT_KEYS"):
        values["tenant_keys"] = _switch(env, "KERNELFLOW_ENCRYPTION_TENANT_KEYS")
        changed = True
    if env.get("KERNELFLOW_ENCRYPTION"):
        values["enabled"] = _switch(env, "KERNELFLOW_ENCRYPTION")
        changed = True
    elif changed or (env.get("KERNELFLOW_ENCRYPTION_KEYS") and "enabled" not in values):
        values["enabled"] = True
        changed = True
    return values if changed else None


_log = structlog.get_logger("kernelflow.config")

_RELOADED = ("providers", "presets", "prices", "routing", "limits")
"""Sections a running worker applies on reload (``aliases`` too, reported one by one)."""


def config_changes(old: KernelflowConfig, new: KernelflowConfig) -> tuple[list[str], list[str]]:
    """What differs, in words: changes a reload applies, and changes that need a restart."""
    applied: list[str] = []
    for alias in sorted(old.aliases.keys() | new.aliases.keys()):
        before, after = old.aliases.get(alias), new.aliases.get(alias)
        if before == after:
            continue
        if before is None:
            applied.append(f"alias {alias!r} added: {after!r}")
        elif after is None:
            applied.append(f"alias {alias!r} removed (was {before!r})")
        else:
            applied.append(f"alias {alias!r}: {before!r} -> {after!r}")
    for section in _RELOADED:
        if getattr(old, section) != getattr(new, section):
            applied.append(f"{section} changed")
    restart = [
        f"{name} changed (restart the worker to apply)"
        for name in type(new).model_fields
        if name not in (*_RELOADED, "aliases") and getattr(old, name) != getattr(new, name)
    ]
    return applied, restart


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class ConfigWatcher:
    """Re-reads the config file when it changes (its mtime, size or inode, polled every ``interval``
    seconds and applied once unchanged for one more poll, so a half-written file is not read) or at
    once when ``request_reload`` is called (the worker's SIGHUP). A changed, valid config goes to
    ``apply``; an unreadable or invalid file, or an ``apply`` that refuses it, is logged and the
    worker keeps the config it runs with."""

    def __init__(
        self,
        path: Path,
        current: KernelflowConfig,
        apply: Callable[[KernelflowConfig], Awaitable[None]],
        *,
        interval: float = 2.0,
    ) -> None:
        self.path = path
        self.current = current
        self.interval = interval
        self.reloads = 0
        """How many changed configs were applied."""
        self._apply = apply
        self._seen = _signature(path)
        self._pending: tuple[int, int, int] | None = None
        self._wake = asyncio.Event()

    def request_reload(self) -> None:
        """Read the file at the next opportunity, changed on disk or not (safe from a signal handler)."""
        self._wake.set()

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
            except TimeoutError:
                signature = _signature(self.path)
                if signature == self._seen:
                    self._pending = None
                    continue
                if signature != self._pending:
                    self._pending = signature  # changed: read it once it holds still for a poll
                    continue
            self._wake.clear()
            await self.reload()

    async def reload(self) -> bool:
        """Read the file now; apply it if it differs from the running config. Returns whether it did."""
        self._seen, self._pending = _signature(self.path), None
        try:
            new = load_config(self.path)
        except ConfigurationError as exc:
            return self._refused(exc)
        applied, restart = config_changes(self.current, new)
        if restart:
            _log.warning("config changes need a restart", path=str(self.path), changes=restart)
        if not applied:
            return False
        try:
            await self._apply(new)
        except KernelflowError as exc:
            return self._refused(exc)
        self.current = new
        self.reloads += 1
        _log.info("config reloaded", path=str(self.path), changes=applied)
        return True

    def _refused(self, exc: KernelflowError) -> bool:
        _log.error("config reload refused; keeping the running config", path=str(self.path), error=str(exc))
        return False

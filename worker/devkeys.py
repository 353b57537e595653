"""Encryption in the local set-up: ``kernelflow dev`` and ``kernelflow demo`` encrypt by default with a
key generated under their state folder, and the commands run beside them find it.

Production stays explicit: a worker encrypts only when ``payloads.encryption`` (or its environment
variables) says so, and says at start when it does not.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from worker.config import EncryptionSettings, PayloadSettings
from worker.keys import FileKeyProvider, format_ring, generate_key

__all__ = [
    "check_encryption",
    "describe_encryption",
    "dev_payload_settings",
    "discover_dev_keys",
    "log_encryption_state",
]

DEV_KEYS = "keys"
"""The key directory's name under a state folder."""

_log = structlog.get_logger("kernelflow.encryption")


def dev_payload_settings(
    base: PayloadSettings, state_dir: str | Path, *, encrypt: bool = True
) -> PayloadSettings:
    """``base`` as ``kernelflow dev``/``demo`` use it: unless encryption was configured explicitly (or
    ``encrypt`` is false), encryption on with the file provider under ``<state_dir>/keys``, whose first
    key is generated now. Tenants get their keys on first use."""
    if not encrypt or "encryption" in base.model_fields_set:
        return base
    keys_dir = Path(state_dir) / DEV_KEYS
    provider = FileKeyProvider(dir=keys_dir)
    ring = provider.ring_path()
    if not ring.exists():
        ring.parent.mkdir(parents=True, exist_ok=True)
        ring.parent.chmod(0o700)
        ring.write_text(format_ring([generate_key()]), encoding="utf-8")
        ring.chmod(0o600)
    encryption = EncryptionSettings(
        enabled=True, provider="file", options={"dir": str(keys_dir.resolve()), "create_tenant_keys": True}
    )
    return base.model_copy(update={"encryption": encryption})


def discover_dev_keys(base: PayloadSettings, state_dir: str | Path = ".state") -> PayloadSettings:
    """For ``kernelflow run``/``watch``: when encryption is not configured and ``kernelflow dev``'s key
    exists under ``state_dir`` (``.state`` of the current folder, where ``payloads.dir`` points by
    default too), use it; otherwise ``base`` as it is."""
    if "encryption" in base.model_fields_set:
        return base
    if not (Path(state_dir) / DEV_KEYS / "default.keys").is_file():
        return base
    return dev_payload_settings(base, state_dir)


def describe_encryption(settings: PayloadSettings) -> str:
    encryption = settings.encryption
    if not encryption.enabled:
        return "off"
    where = encryption.options.get("dir") if encryption.provider == "file" else None
    tenants = ", per-tenant keys" if encryption.tenant_keys else ""
    compressed = ", compression on" if settings.compression.enabled else ""
    return (
        f"on (AES-256-GCM, {encryption.provider} keys{f' in {where}' if where else ''}{tenants}{compressed})"
    )


def log_encryption_state(settings: PayloadSettings) -> None:
    """What a worker says at start about encryption: a warning when it is off."""
    if settings.encryption.enabled:
        _log.info("payload encryption on", detail=describe_encryption(settings))
    else:
        _log.warning(
            "payload encryption is OFF: prompts, inputs and answers are stored in clear in Temporal and the "
            "payload store; set payloads.encryption or KERNELFLOW_ENCRYPTION_KEYS (docs/encryption.md)"
        )


async def check_encryption(settings: PayloadSettings) -> None:
    """Fail at start, not at the first payload, when encryption is on but there is no key to encrypt with."""
    encryption = settings.encryption
    if not encryption.enabled:
        return
    from kernel.errors import ConfigurationError
    from worker.keys import load_key_provider

    provider = load_key_provider(encryption.provider, encryption.options)
    try:
        ring = await provider.keys()
    finally:
        await provider.aclose()
    if not ring:
        where = f" in {encryption.options['dir']}" if encryption.options.get("dir") else ""
        raise ConfigurationError(
            f"encryption is on but the {encryption.provider} key provider has no key{where}: create one "
            "(kernelflow keys init) or set KERNELFLOW_ENCRYPTION_KEYS; see docs/encryption.md"
        )

"""Encryption keys and the ``KeyProvider`` plugin interface.

A key provider hands out key rings: an ordered list of 256-bit keys, newest first. The newest key
encrypts new payloads; every key of the ring decrypts, so a key can be rotated without downtime
(add a new key in front, keep the old ones until no history needs them). A ring either belongs to
the deployment (``tenant=None``) or to one tenant (per-tenant keys, for crypto-shredding).

Providers are plugins of the ``kernelflow.key_providers`` entry-point group; the built-ins
(``env``, ``file`` in ``worker/keys.py``) are registered the same way. A KMS plugin implements
``keys`` (and ``create_tenant_key`` if tenants may be created on first use)::

    class VaultKeys(KeyProvider):
        def __init__(self, *, url: str, role: str) -> None: ...
        async def keys(self, tenant: str | None = None) -> Sequence[Key]: ...

This module is pure: no I/O, no Temporal.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from kernel.errors import ConfigurationError

__all__ = [
    "KEY_BYTES",
    "TENANT_PATTERN",
    "Key",
    "KeyProvider",
    "KeyUnavailable",
    "check_tenant",
]

KEY_BYTES = 32
"""AES-256: every key is 32 bytes."""

_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""What a tenant name may be when tenants have their own keys (it names files and workflow ids)."""


class KeyUnavailable(ConfigurationError):
    """A payload needs a key this process does not have (never configured, or destroyed)."""

    def __init__(self, message: str, *, key_id: str | None = None, tenant: str | None = None) -> None:
        super().__init__(message)
        self.key_id = key_id
        self.tenant = tenant

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_unavailable, (str(self), self.key_id, self.tenant))


def _rebuild_unavailable(message: str, key_id: str | None, tenant: str | None) -> KeyUnavailable:
    return KeyUnavailable(message, key_id=key_id, tenant=tenant)


def check_tenant(tenant: str) -> str:
    """``tenant`` if it is a valid tenant name, else a ``ConfigurationError`` saying what is allowed."""
    if not TENANT_PATTERN.match(tenant):
        raise ConfigurationError(
            f"tenant {tenant!r} is not a valid tenant name for per-tenant keys: use 1-64 letters, digits, "
            "'_', '.' or '-', starting with a letter or digit"
        )
    return tenant


@dataclass(frozen=True)
class Key:
    """One AES-256 key. ``id`` is written, in clear, into every payload it encrypts."""

    id: str
    material: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not _KEY_ID.match(self.id):
            raise ConfigurationError(
                f"key id {self.id!r} is not allowed: use 1-64 letters, digits, '_', '.', ':' or '-', "
                "starting with a letter or digit"
            )
        if len(self.material) != KEY_BYTES:
            raise ConfigurationError(
                f"key {self.id!r} is {len(self.material)} bytes long; AES-256 needs exactly {KEY_BYTES} "
                "bytes (44 characters of base64)"
            )


class KeyProvider(ABC):
    """Where keys come from. Implementations may cache, but a destroyed key must stop being handed
    out soon: crypto-shredding relies on it."""

    @abstractmethod
    async def keys(self, tenant: str | None = None) -> Sequence[Key]:
        """The ring, newest first: ``[0]`` encrypts, every key decrypts. An empty ring means no keys
        (for a tenant: none were made, or they were destroyed)."""

    async def create_tenant_key(self, tenant: str) -> Key:
        """Make the first key of ``tenant`` (called when a tenant's pipeline writes its first payload).
        Providers that do not create keys refuse, and the tenant's keys must be made beforehand."""
        raise KeyUnavailable(
            f"tenant {tenant!r} has no encryption key and the {type(self).__name__} key provider does not "
            "create keys: create the tenant's key before starting its pipelines",
            tenant=tenant,
        )

    async def aclose(self) -> None:
        """Release connections (a KMS client); nothing by default."""

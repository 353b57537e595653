"""The built-in key providers (``env``, ``file``) and the loader for ``kernelflow.key_providers`` plugins.

A ring is written as text, one key per line or comma, newest first: ``<key id>=<base64 of 32 bytes>``.

- ``env``: the deployment's ring in ``KERNELFLOW_ENCRYPTION_KEYS``. No tenant keys.
- ``file``: a directory. ``<dir>/default.keys`` is the deployment's ring; ``<dir>/tenants/<tenant>.keys``
  is a tenant's. With ``create_tenant_keys`` a tenant's first key is made when its first payload is
  written. Deleting a tenant's file destroys its keys (crypto-shredding): files are re-read when they
  change, so every process stops decrypting that tenant within one read.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import os
import secrets
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kernel.errors import ConfigurationError
from kernel.keys import KEY_BYTES, Key, KeyProvider, KeyUnavailable, check_tenant

__all__ = [
    "ENTRY_POINT_GROUP",
    "KEYS_ENV",
    "EnvKeyProvider",
    "FileKeyProvider",
    "format_ring",
    "generate_key",
    "load_key_provider",
    "parse_ring",
]

ENTRY_POINT_GROUP = "kernelflow.key_providers"
KEYS_ENV = "KERNELFLOW_ENCRYPTION_KEYS"


def generate_key(key_id: str | None = None) -> Key:
    """A new random key; its id defaults to the UTC date and a random suffix (unique across rings)."""
    return Key(
        key_id or f"{time.strftime('%Y%m%d', time.gmtime())}-{secrets.token_hex(4)}", os.urandom(KEY_BYTES)
    )


def parse_ring(text: str, *, source: str) -> list[Key]:
    """Keys from ``id=base64`` entries separated by newlines or commas (``#`` starts a comment)."""
    keys: list[Key] = []
    entries = [part for line in text.splitlines() for part in line.split("#", 1)[0].split(",")]
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        key_id, sep, encoded = entry.partition("=")
        if not sep:
            raise ConfigurationError(f"{source}: key entries are '<id>=<base64 key>', got {entry[:12]!r}…")
        try:
            material = base64.b64decode(encoded.strip() + "=" * (-len(encoded.strip()) % 4), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigurationError(f"{source}: key {key_id.strip()!r} is not valid base64") from exc
        keys.append(Key(key_id.strip(), material))
    ids = [key.id for key in keys]
    if len(set(ids)) != len(ids):
        raise ConfigurationError(f"{source}: a key id appears twice in {ids}")
    return keys


def format_ring(keys: Sequence[Key]) -> str:
    return "".join(f"{key.id}={base64.b64encode(key.material).decode()}\n" for key in keys)


class EnvKeyProvider(KeyProvider):
    """The deployment's ring from an environment variable (``KERNELFLOW_ENCRYPTION_KEYS``)."""

    def __init__(self, *, variable: str = KEYS_ENV, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.variable = variable
        self._ring = parse_ring(env.get(variable, ""), source=f"${variable}")

    async def keys(self, tenant: str | None = None) -> Sequence[Key]:
        return self._ring if tenant is None else ()

    async def create_tenant_key(self, tenant: str) -> Key:
        raise KeyUnavailable(
            f"tenant {tenant!r} has no key: the env key provider holds only the deployment's ring "
            f"(${self.variable}); per-tenant keys need the file provider or a KMS plugin",
            tenant=tenant,
        )


class FileKeyProvider(KeyProvider):
    """Rings in a directory; see the module docstring."""

    def __init__(self, *, dir: str | os.PathLike[str], create_tenant_keys: bool = False) -> None:
        self.dir = Path(dir)
        self.create_tenant_keys = create_tenant_keys
        self._cache: dict[Path, tuple[tuple[int, int, int], list[Key]]] = {}

    def ring_path(self, tenant: str | None = None) -> Path:
        if tenant is None:
            return self.dir / "default.keys"
        return self.dir / "tenants" / f"{check_tenant(tenant)}.keys"

    async def keys(self, tenant: str | None = None) -> Sequence[Key]:
        return self._read(self.ring_path(tenant))

    async def create_tenant_key(self, tenant: str) -> Key:
        if not self.create_tenant_keys:
            return await super().create_tenant_key(tenant)
        path = self.ring_path(tenant)
        key = generate_key()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: two workers creating the same tenant's key at once agree on the first one.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return self._read(path)[0]
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(format_ring([key]))
            file.flush()
            os.fsync(file.fileno())
        return key

    def add_key(self, tenant: str | None = None) -> Key:
        """Rotate: a new key in front of the ring (written atomically); older keys keep decrypting."""
        path = self.ring_path(tenant)
        key = generate_key()
        _write_atomically(path, format_ring([key, *self._read(path)]))
        return key

    def destroy(self, tenant: str) -> bool:
        """Delete ``tenant``'s ring: its payloads become unreadable everywhere. Whether there was one."""
        path = self.ring_path(tenant)
        self._cache.pop(path, None)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def _read(self, path: Path) -> list[Key]:
        try:
            stat = path.stat()
        except FileNotFoundError:
            self._cache.pop(path, None)
            return []
        signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        keys = parse_ring(text, source=str(path))
        self._cache[path] = (signature, keys)
        return keys


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_key_provider(name: str, options: Mapping[str, Any] | None = None) -> KeyProvider:
    """The provider registered as ``name`` in the ``kernelflow.key_providers`` entry-point group,
    constructed with ``options`` as keyword arguments."""
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        raise ConfigurationError(
            f"encryption.provider {name!r} is not a key provider; installed: {', '.join(sorted(found)) or 'none'}"
        )
    factory = found[name].load()
    try:
        provider = factory(**dict(options or {}))
    except TypeError as exc:
        raise ConfigurationError(
            f"key provider {name!r} refused its options {dict(options or {})}: {exc}"
        ) from exc
    if not isinstance(provider, KeyProvider):
        raise ConfigurationError(f"key provider {name!r} built {type(provider).__name__}, not a KeyProvider")
    return provider

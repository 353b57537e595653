"""Sealing shadow pairs at rest with the worker's encryption keys: AES-256-GCM, like payloads.

A sealed body is ``KFS1 | key id length (1 byte) | key id | 12-byte nonce | ciphertext | tag``; the
header is bound to the ciphertext as associated data. The ring's first key seals; any key of the ring
unseals (rotation keeps old pairs readable while their key stays in the ring). The deployment's ring
is used (per-tenant keys are not: see docs/shadow.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kernel.errors import ConfigurationError
from kernel.keys import Key, KeyProvider, KeyUnavailable

__all__ = ["KeyRingSealer", "sealer_for"]

_MAGIC = b"KFS1"
_NONCE = 12


class KeyRingSealer:
    """A ``worker.shadow_store.Sealer`` over a key ring (``refresh`` takes a rotated ring)."""

    def __init__(self, keys: Sequence[Key]) -> None:
        self.refresh(keys)

    def refresh(self, keys: Sequence[Key]) -> None:
        if not keys:
            raise KeyUnavailable(
                "encryption is on but the key ring is empty: shadow pairs cannot be sealed "
                "(set KERNELFLOW_ENCRYPTION_KEYS or the key directory, docs/encryption.md)"
            )
        self._keys = list(keys)
        self._ciphers = {key.id: AESGCM(key.material) for key in self._keys}

    def seal(self, data: bytes) -> bytes:
        key = self._keys[0]
        key_id = key.id.encode()
        header = _MAGIC + bytes([len(key_id)]) + key_id
        nonce = os.urandom(_NONCE)
        return header + nonce + self._ciphers[key.id].encrypt(nonce, data, header)

    def unseal(self, data: bytes) -> bytes:
        if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 1:
            raise ConfigurationError("a sealed shadow pair has an unknown format (no KFS1 header)")
        length = data[len(_MAGIC)]
        end = len(_MAGIC) + 1 + length
        header, key_id = data[:end], data[len(_MAGIC) + 1 : end].decode(errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            held = ", ".join(self._ciphers) or "none"
            raise KeyUnavailable(
                f"no key {key_id!r} to unseal a shadow pair; this process holds keys [{held}]", key_id=key_id
            )
        try:
            return cipher.decrypt(data[end : end + _NONCE], data[end + _NONCE :], header)
        except InvalidTag:
            raise ConfigurationError(
                f"a shadow pair sealed with key {key_id!r} failed authentication: another key under that id, "
                "or altered bytes"
            ) from None


async def sealer_for(provider: KeyProvider | None) -> KeyRingSealer | None:
    """The sealer of ``provider``'s deployment ring, or None when encryption is off."""
    if provider is None:
        return None
    return KeyRingSealer(await provider.keys(None))

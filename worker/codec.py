"""The payload codec: optional zlib compression, then AES-256-GCM encryption of every payload.

An encrypted payload keeps only what is needed to decrypt it in clear::

    metadata  encoding: binary/encrypted
              encryption-key-id: <id of the key>           (which key of the ring)
              encryption-cipher: AES-256-GCM
              kernelflow-tenant: <tenant>                  (only with per-tenant keys)
              kernelflow-compression: zlib                 (only when compressed)
    data      12-byte nonce || ciphertext || 16-byte tag   of the whole original Payload (metadata too)

The clear metadata is bound to the ciphertext as associated data: moving a payload to another key id or
tenant, or flipping the compression flag, fails authentication instead of decrypting to garbage.

Per-tenant keys. The codec only knows the namespace and workflow id of the payload it encodes, so the
tenant comes from the workflow id: ``tenant/<tenant>/<rest>`` belongs to ``<tenant>``. Child workflows
are named ``<parent id>/<step>`` and continue-as-new keeps the id, so a pipeline's whole tree is under one
tenant. Any other id uses the deployment's ring. Decoding needs no workflow id: the key id and tenant
are in the payload.

Always installed, even with encryption off: a process that cannot decrypt says so (naming the key id)
instead of handing ciphertext to the JSON converter.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import zlib
from collections.abc import Sequence
from typing import Any

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.api.failure.v1 import Failure
from temporalio.converter import (
    ActivitySerializationContext,
    DefaultFailureConverter,
    PayloadCodec,
    PayloadConverter,
    SerializationContext,
    WithSerializationContext,
    WorkflowSerializationContext,
)

from kernel.errors import ConfigurationError
from kernel.keys import Key, KeyProvider, KeyUnavailable, check_tenant

__all__ = [
    "ENCODING_COMPRESSED",
    "ENCODING_ENCRYPTED",
    "TENANT_ID_PREFIX",
    "ChainedCodec",
    "EncryptedFailureConverter",
    "EncryptionMismatch",
    "KernelflowCodec",
    "PayloadDecryptError",
    "PlaintextRefused",
    "scoped_workflow_id",
    "tenant_of",
    "tenant_workflow_id",
]

ENCODING_ENCRYPTED = b"binary/encrypted"
ENCODING_COMPRESSED = b"binary/zlib"
_META_KEY_ID = "encryption-key-id"
_META_CIPHER = "encryption-cipher"
_META_TENANT = "kernelflow-tenant"
_META_COMPRESSION = "kernelflow-compression"
_CIPHER = b"AES-256-GCM"
_NONCE_BYTES = 12
_REFERENCE_MARKER = "__temporal_external_storage_reference"

TENANT_ID_PREFIX = "tenant/"
"""Workflow ids ``tenant/<tenant>/...`` belong to ``<tenant>`` (see the module docstring)."""

_log = structlog.get_logger("kernelflow.encryption")


class EncryptionMismatch(ConfigurationError):
    """An encrypted payload reached a process with encryption off."""


class PlaintextRefused(ConfigurationError):
    """A plaintext payload reached a process that requires encryption (``allow_plaintext: false``)."""


class PayloadDecryptError(ConfigurationError):
    """An encrypted payload failed authentication: another key under the same id, or altered bytes."""


def tenant_of(workflow_id: str | None) -> str | None:
    """The tenant a workflow id belongs to under per-tenant keys, or ``None`` (the deployment's ring)."""
    if not workflow_id or not workflow_id.startswith(TENANT_ID_PREFIX):
        return None
    tenant, sep, _ = workflow_id[len(TENANT_ID_PREFIX) :].partition("/")
    return tenant if sep and tenant else None


def tenant_workflow_id(tenant: str, rest: str) -> str:
    """The workflow id that puts a pipeline under ``tenant``'s keys: ``tenant/<tenant>/<rest>``."""
    return f"{TENANT_ID_PREFIX}{check_tenant(tenant)}/{rest}"


def scoped_workflow_id(client: Any, tenant: str | None, workflow_id: str | None, default: str) -> str:
    """The id to start a pipeline under. When ``client`` encrypts with per-tenant keys, a tenant's
    pipeline gets ``tenant/<tenant>/<default>``, and a given id must already name the tenant: the id
    is all the codec sees, so an id naming no tenant would put the tenant's data under shared keys."""
    codec = getattr(getattr(client, "data_converter", None), "payload_codec", None)
    if tenant is None or not (isinstance(codec, KernelflowCodec) and codec.encrypting and codec.tenant_keys):
        return workflow_id or default
    if workflow_id is None:
        return tenant_workflow_id(tenant, default)
    if tenant_of(workflow_id) != tenant:
        raise ConfigurationError(
            f"workflow id {workflow_id!r} does not belong to tenant {tenant!r}: with per-tenant keys a "
            f"tenant's workflow id must start with {TENANT_ID_PREFIX}{tenant}/ (e.g. "
            f"{tenant_workflow_id(tenant, workflow_id)!r}), or be left out"
        )
    return workflow_id


@dataclasses.dataclass(frozen=True)
class _Settings:
    provider: KeyProvider | None
    tenant_keys: bool
    allow_plaintext: bool
    compress_min_bytes: int | None
    compress_level: int


class KernelflowCodec(PayloadCodec, WithSerializationContext):
    """Compress (optional) and encrypt (optional) on encode; the reverse on decode.

    ``provider=None`` is encryption off: payloads pass through (compressed if asked), and an encrypted
    payload is refused with ``EncryptionMismatch``."""

    def __init__(
        self,
        *,
        provider: KeyProvider | None,
        tenant_keys: bool = False,
        allow_plaintext: bool = True,
        compress_min_bytes: int | None = None,
        compress_level: int = 6,
    ) -> None:
        self._settings = _Settings(provider, tenant_keys, allow_plaintext, compress_min_bytes, compress_level)
        self._workflow_id: str | None = None
        self._ciphers: dict[tuple[str, bytes], AESGCM] = {}
        self._warned: collections.OrderedDict[str, None] = collections.OrderedDict()

    @property
    def encrypting(self) -> bool:
        return self._settings.provider is not None

    @property
    def tenant_keys(self) -> bool:
        return self._settings.tenant_keys

    @property
    def provider(self) -> KeyProvider | None:
        return self._settings.provider

    def with_context(self, context: SerializationContext) -> KernelflowCodec:
        workflow_id: str | None = None
        if isinstance(context, WorkflowSerializationContext | ActivitySerializationContext):
            workflow_id = context.workflow_id
        if workflow_id == self._workflow_id:
            return self
        clone = object.__new__(KernelflowCodec)
        clone.__dict__.update(self.__dict__)  # shares the cipher cache and the warning memory
        clone._workflow_id = workflow_id
        return clone

    # --- encode ----------------------------------------------------------------------------------

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        settings = self._settings
        if settings.provider is None and settings.compress_min_bytes is None:
            return list(payloads)
        key: Key | None = None
        tenant: str | None = None
        if settings.provider is not None:
            tenant = tenant_of(self._workflow_id) if settings.tenant_keys else None
            key = await self._encrypting_key(settings.provider, tenant)
        return [self._encode_one(payload, key, tenant) for payload in payloads]

    def _encode_one(self, payload: Payload, key: Key | None, tenant: str | None) -> Payload:
        if _REFERENCE_MARKER in payload.metadata:
            return payload
        blob = payload.SerializeToString(deterministic=True)
        compressed = False
        min_bytes = self._settings.compress_min_bytes
        if min_bytes is not None and len(blob) >= min_bytes:
            packed = zlib.compress(blob, self._settings.compress_level)
            if len(packed) < len(blob):
                blob, compressed = packed, True
        if key is None:
            if not compressed:
                return payload
            return Payload(metadata={"encoding": ENCODING_COMPRESSED}, data=blob)
        metadata = {
            "encoding": ENCODING_ENCRYPTED,
            _META_KEY_ID: key.id.encode(),
            _META_CIPHER: _CIPHER,
        }
        if tenant is not None:
            metadata[_META_TENANT] = tenant.encode()
        if compressed:
            metadata[_META_COMPRESSION] = b"zlib"
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._cipher(key).encrypt(nonce, blob, _associated_data(metadata))
        return Payload(metadata=metadata, data=nonce + sealed)

    async def _encrypting_key(self, provider: KeyProvider, tenant: str | None) -> Key:
        ring = await provider.keys(tenant)
        if ring:
            return ring[0]
        if tenant is not None:
            return await provider.create_tenant_key(tenant)
        raise KeyUnavailable(
            f"encryption is on but the {type(provider).__name__} key provider has no key to encrypt with; "
            "set KERNELFLOW_ENCRYPTION_KEYS or the key directory (docs/encryption.md)"
        )

    # --- decode ----------------------------------------------------------------------------------

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        decoded = []
        for payload in payloads:
            encoding = payload.metadata.get("encoding", b"")
            if encoding == ENCODING_ENCRYPTED:
                decoded.append(await self._decrypt(payload))
            elif encoding == ENCODING_COMPRESSED:
                decoded.append(Payload.FromString(zlib.decompress(payload.data)))
            else:
                self._plaintext(payload)
                decoded.append(payload)
        return decoded

    async def _decrypt(self, payload: Payload) -> Payload:
        key_id = payload.metadata.get(_META_KEY_ID, b"").decode(errors="replace")
        raw_tenant = payload.metadata.get(_META_TENANT)
        tenant = raw_tenant.decode(errors="replace") if raw_tenant is not None else None
        whose = f" of tenant {tenant!r}" if tenant is not None else ""
        provider = self._settings.provider
        if provider is None:
            raise EncryptionMismatch(
                f"a payload is encrypted with key {key_id!r}{whose}, but encryption is off in this process: "
                "a client or worker with encryption on wrote it. Turn encryption on here with the same keys "
                "(payloads.encryption in KERNELFLOW_CONFIG, or KERNELFLOW_ENCRYPTION_KEYS / "
                "KERNELFLOW_ENCRYPTION_KEYS_DIR); every client and worker must share them"
            )
        ring = await provider.keys(tenant)
        key = next((k for k in ring if k.id == key_id), None)
        if key is None:
            held = ", ".join(k.id for k in ring) or "none"
            raise KeyUnavailable(
                f"no key {key_id!r}{whose} to decrypt a payload; this process holds keys [{held}]"
                + (
                    f". Tenant {tenant!r}'s keys may have been destroyed"
                    if tenant is not None and not ring
                    else ". Add the key to this process's ring (older keys must stay until no history needs them)"
                ),
                key_id=key_id,
                tenant=tenant,
            )
        metadata = dict(payload.metadata)
        data = payload.data
        try:
            blob = self._cipher(key).decrypt(
                data[:_NONCE_BYTES], data[_NONCE_BYTES:], _associated_data(metadata)
            )
        except InvalidTag:
            raise PayloadDecryptError(
                f"a payload encrypted with key {key_id!r}{whose} failed authentication: the key under that "
                "id differs from the one that wrote it, or the stored bytes were altered"
            ) from None
        if metadata.get(_META_COMPRESSION) == b"zlib":
            blob = zlib.decompress(blob)
        return Payload.FromString(blob)

    def _plaintext(self, payload: Payload) -> None:
        if self._settings.provider is None or _REFERENCE_MARKER in payload.metadata:
            return
        if payload.metadata.get("encoding") == b"json/external-storage-reference":
            return
        if not self._settings.allow_plaintext:
            raise PlaintextRefused(
                f"a payload of workflow {self._workflow_id!r} is not encrypted, and this process requires "
                "encryption (payloads.encryption.allow_plaintext: false): a client or worker with encryption "
                "off wrote it. Turn encryption on there with the same keys"
            )
        where = self._workflow_id or "(no workflow)"
        if where not in self._warned:
            self._warned[where] = None
            if len(self._warned) > 1000:
                self._warned.popitem(last=False)
            _log.warning(
                "read a payload that is not encrypted: written before encryption was on, or by a client or "
                "worker with encryption off",
                workflow_id=where,
            )

    def _cipher(self, key: Key) -> AESGCM:
        cache_key = (key.id, key.material)
        cipher = self._ciphers.get(cache_key)
        if cipher is None:
            cipher = self._ciphers[cache_key] = AESGCM(key.material)
        return cipher


class EncryptedFailureConverter(DefaultFailureConverter):
    """Failure messages and stack traces go into an encoded (so encrypted) payload: a prompt quoted in
    an error is not stored in clear. Except the codec's own errors, which name only key ids and tenants:
    they stay readable, so a worker lacking a key says which one in the history and the UI."""

    def __init__(self) -> None:
        super().__init__(encode_common_attributes=True)
        self._clear = DefaultFailureConverter()

    def to_failure(
        self, exception: BaseException, payload_converter: PayloadConverter, failure: Failure
    ) -> None:
        if isinstance(exception, _CLEAR_ERRORS):
            self._clear.to_failure(exception, payload_converter, failure)
        else:
            super().to_failure(exception, payload_converter, failure)


_CLEAR_ERRORS = (KeyUnavailable, EncryptionMismatch, PlaintextRefused, PayloadDecryptError)


class ChainedCodec(PayloadCodec, WithSerializationContext):
    """``inner`` (a user's own codec) then ``outer`` (Kernelflow's encryption) on encode; the reverse on
    decode. Encryption goes last: what a user's codec does (compression, signatures) is encrypted too."""

    def __init__(self, inner: PayloadCodec, outer: PayloadCodec) -> None:
        self.inner = inner
        self.outer = outer

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return await self.outer.encode(await self.inner.encode(payloads))

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return await self.inner.decode(await self.outer.decode(payloads))

    @property
    def encrypting(self) -> bool:
        return bool(getattr(self.outer, "encrypting", False))

    def with_context(self, context: SerializationContext) -> ChainedCodec:
        inner = (
            self.inner.with_context(context)
            if isinstance(self.inner, WithSerializationContext)
            else self.inner
        )
        outer = (
            self.outer.with_context(context)
            if isinstance(self.outer, WithSerializationContext)
            else self.outer
        )
        return self if inner is self.inner and outer is self.outer else ChainedCodec(inner, outer)


def _associated_data(metadata: dict[str, bytes]) -> bytes:
    return b"\x00".join(
        metadata.get(name, b"") for name in (_META_KEY_ID, _META_CIPHER, _META_TENANT, _META_COMPRESSION)
    )

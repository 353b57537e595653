"""Large payloads live outside the workflow history; oversized inline payloads fail at once.

A 200k-token conversation re-sent at every model call would otherwise be copied into the history
at every step, until Temporal terminates the workflow at its 50 MB history limit. With storage on,
the SDK's ``ExternalStorage`` hands every payload of at least ``threshold_bytes`` to a storage
driver and the history keeps only a small reference. The default driver is
``FileSystemPayloadStore``: a directory shared by the client and every worker, where each payload
is a file named by the SHA-256 of its bytes (the same payload stored twice is one file, written
once). Any other ``temporalio`` ``StorageDriver`` (``temporalio.contrib.aws.s3driver``,
``temporalio.contrib.gcp.gcsdriver``) is configured through ``payloads.driver``.

With storage off, a payload over Temporal's per-payload limit is refused before it is sent, with
``PayloadTooLarge`` (non-retryable): an activity result that big fails the activity at once instead
of being retried (and the model paid for) again, and a workflow input that big never starts.

Every process must use the same settings: a worker without the store cannot read a history whose
payloads were stored (the SDK reports ``TMPRL1105``).

Encryption and compression (``settings.encryption``, ``settings.compression``; ``worker/codec.py``) are
the converter's payload codec. The SDK runs the codec before external storage on the way out and after
it on the way in, so the store only ever holds encrypted payloads. With encryption on, the failure
converter moves failure messages and stack traces into an encoded payload, so a prompt quoted in an
error is encrypted too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverter,
    ExternalStorage,
    StorageDriver,
    StorageDriverClaim,
    StorageDriverRetrieveContext,
    StorageDriverStoreContext,
)
from temporalio.exceptions import ApplicationError

from kernel.errors import ConfigurationError, FailureType
from worker.codec import EncryptedFailureConverter, KernelflowCodec
from worker.config import PayloadSettings

__all__ = [
    "FILESYSTEM_DRIVER",
    "SIZE_GUARD_DRIVER",
    "FileSystemPayloadStore",
    "PayloadStoreError",
    "PayloadTooLarge",
    "build_codec",
    "build_data_converter",
    "build_storage_driver",
]

FILESYSTEM_DRIVER = "kernelflow.filesystem"
"""The filesystem driver's name, written into every reference: never renamed."""

SIZE_GUARD_DRIVER = "kernelflow.size-guard"

_FIX = (
    "enable payload storage (payloads.storage: filesystem, or a driver, in the KERNELFLOW_CONFIG file; "
    "or KERNELFLOW_PAYLOADS_STORAGE=filesystem) so large payloads are kept outside the workflow history"
)


class PayloadTooLarge(ApplicationError):
    """A payload over Temporal's per-payload limit with payload storage off. Not retryable: the same
    payload would be refused again."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"payload of {size} bytes exceeds Temporal's per-payload limit of {limit} bytes "
            f"and payload storage is off; {_FIX}",
            {"size_bytes": size, "limit_bytes": limit},
            type=FailureType.PAYLOAD_TOO_LARGE,
            non_retryable=True,
        )
        self.size = size
        self.limit = limit


class PayloadStoreError(RuntimeError):
    """A stored payload is missing or does not match its hash."""


class FileSystemPayloadStore(StorageDriver):
    """Content-addressed payloads in a directory: ``<root>/<h[:2]>/<h>`` where ``h`` is the SHA-256
    of the serialized payload.

    Writes go to a temporary file in the same directory and are renamed into place, so a reader
    never sees a partial file and concurrent writers of the same payload are harmless. Every read is
    checked against its hash. The directory must be shared by the client and all workers.
    """

    def __init__(self, root: str | os.PathLike[str], *, name: str = FILESYSTEM_DRIVER) -> None:
        self.root = Path(root)
        self._name = name

    def name(self) -> str:
        return self._name

    def type(self) -> str:
        return "kernelflow.filesystem"

    def path_for(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    async def store(
        self, context: StorageDriverStoreContext, payloads: Sequence[Payload]
    ) -> list[StorageDriverClaim]:
        blobs = [payload.SerializeToString(deterministic=True) for payload in payloads]
        return await asyncio.to_thread(self._store_all, blobs)

    async def retrieve(
        self, context: StorageDriverRetrieveContext, claims: Sequence[StorageDriverClaim]
    ) -> list[Payload]:
        return await asyncio.to_thread(self._retrieve_all, list(claims))

    def _store_all(self, blobs: list[bytes]) -> list[StorageDriverClaim]:
        claims = []
        for blob in blobs:
            digest = hashlib.sha256(blob).hexdigest()
            path = self.path_for(digest)
            if not path.exists():
                self._write_atomically(path, blob)
            claims.append(StorageDriverClaim(claim_data={"sha256": digest, "size": str(len(blob))}))
        return claims

    @staticmethod
    def _write_atomically(path: Path, blob: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=f"-{path.name[:12]}")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(blob)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _retrieve_all(self, claims: list[StorageDriverClaim]) -> list[Payload]:
        payloads = []
        for claim in claims:
            digest = claim.claim_data.get("sha256", "")
            if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                raise PayloadStoreError(
                    f"payload reference has no valid sha256 (claim {dict(claim.claim_data)})"
                )
            path = self.path_for(digest)
            try:
                blob = path.read_bytes()
            except FileNotFoundError:
                raise PayloadStoreError(
                    f"stored payload {digest} is missing from {self.root}: is payloads.dir the same "
                    "directory (or shared volume) for the client and every worker?"
                ) from None
            actual = hashlib.sha256(blob).hexdigest()
            if actual != digest:
                raise PayloadStoreError(
                    f"stored payload {path} is corrupt: its SHA-256 is {actual}, expected {digest}"
                )
            payload = Payload()
            payload.ParseFromString(blob)
            payloads.append(payload)
        return payloads


class _SizeGuard(StorageDriver):
    """Selected only for payloads over the limit when storage is off; refuses them clearly."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def name(self) -> str:
        return SIZE_GUARD_DRIVER

    async def store(
        self, context: StorageDriverStoreContext, payloads: Sequence[Payload]
    ) -> list[StorageDriverClaim]:
        raise PayloadTooLarge(max(p.ByteSize() for p in payloads), self.limit)

    async def retrieve(
        self, context: StorageDriverRetrieveContext, claims: Sequence[StorageDriverClaim]
    ) -> list[Payload]:
        raise PayloadStoreError(
            "this history holds stored payloads but payload storage is off in this process; "
            "configure the same payloads settings as the process that wrote them"
        )


def build_storage_driver(settings: PayloadSettings) -> StorageDriver | None:
    """The driver ``settings`` ask for, or ``None`` when storage is off."""
    if settings.storage == "off":
        return None
    if settings.storage == "filesystem":
        return FileSystemPayloadStore(settings.dir)
    if not settings.driver:
        raise ConfigurationError(
            "payloads.storage is 'driver' but payloads.driver names no 'module:callable'"
        )
    module_name, _, attribute = settings.driver.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(
            f"payloads.driver {settings.driver!r} cannot be loaded ('module:callable' expected): {exc}"
        ) from exc
    driver = factory(**settings.driver_options)
    if not isinstance(driver, StorageDriver):
        raise ConfigurationError(
            f"payloads.driver {settings.driver!r} returned {type(driver).__name__}, not a StorageDriver"
        )
    return driver


def build_codec(settings: PayloadSettings) -> KernelflowCodec:
    """The payload codec ``settings`` ask for: encryption with the configured key provider, and
    compression. Installed with encryption off too, to explain an encrypted payload it cannot read."""
    from worker.keys import load_key_provider

    encryption = settings.encryption
    provider = load_key_provider(encryption.provider, encryption.options) if encryption.enabled else None
    return KernelflowCodec(
        provider=provider,
        tenant_keys=encryption.tenant_keys,
        allow_plaintext=encryption.allow_plaintext,
        compress_min_bytes=settings.compression.min_bytes if settings.compression.enabled else None,
        compress_level=settings.compression.level,
    )


def build_data_converter(settings: PayloadSettings | None = None) -> DataConverter:
    """Kernelflow's converter (pydantic) with payload storage, or the size guard when storage is off,
    and the payload codec (encryption, compression). The client and every worker must be built from
    the same ``settings``."""
    settings = settings or PayloadSettings()
    codec = build_codec(settings)
    driver = build_storage_driver(settings)
    if driver is None:
        # Payloads of exactly the limit still pass; only larger ones reach the guard.
        storage = ExternalStorage(
            drivers=[_SizeGuard(settings.limit_bytes)], payload_size_threshold=settings.limit_bytes + 1
        )
    else:
        storage = ExternalStorage(drivers=[driver], payload_size_threshold=settings.threshold_bytes)
    return dataclasses.replace(
        pydantic_data_converter,
        external_storage=storage,
        payload_codec=codec,
        failure_converter_class=(EncryptedFailureConverter if codec.encrypting else DefaultFailureConverter),
    )

"""The worker's side of shadow traffic: where pairs are written (``shadow.store`` in the config, or
``KERNELFLOW_SHADOW_STORE``, default ``sqlite:///.state/shadow.db``), sealed with the worker's
encryption keys when encryption is on, and the start-up check of the config's rules."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kernel.errors import ConfigurationError, KernelflowError
from kernel.registry import Registry
from kernel.shadow import ShadowPair, ShadowStore
from kernel.shadow_rules import DEFAULT_SHADOW_STORE, ShadowConfig
from worker.shadow_sealer import CodecSealer
from worker.shadow_store import open_store

__all__ = [
    "SHADOW_STORE_ENV",
    "StoreWriter",
    "check_shadow_rules",
    "open_configured_store",
    "shadow_store_url",
]

SHADOW_STORE_ENV = "KERNELFLOW_SHADOW_STORE"


def shadow_store_url(config: ShadowConfig | None, environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get(SHADOW_STORE_ENV) or (config.store if config else None) or DEFAULT_SHADOW_STORE


class StoreWriter:
    """Writes pairs to the store, opened at the first pair; with ``codec`` (the worker's payload codec,
    when it encrypts) every body is sealed like a payload, under the ring's current key."""

    def __init__(self, url: str, *, codec: Any = None) -> None:
        self.url = url
        self.codec = codec
        self._store: ShadowStore | None = None
        self._lock = asyncio.Lock()

    async def __call__(self, pair: ShadowPair) -> None:
        async with self._lock:
            if self._store is None:
                self._store = await asyncio.to_thread(open_store, self.url, sealer=CodecSealer.of(self.codec))
            store = self._store
        await asyncio.to_thread(store.add, [pair])

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


async def open_configured_store(config: Any = None, environ: Mapping[str, str] | None = None) -> ShadowStore:
    """The store a worker with ``config`` (a ``KernelflowConfig``; default: ``KERNELFLOW_CONFIG``'s)
    writes to, able to read sealed pairs when its encryption is on: what a report reads."""
    from worker.config import load_config, payload_settings
    from worker.storage import build_codec

    env = os.environ if environ is None else environ
    if config is None:
        path = env.get("KERNELFLOW_CONFIG")
        config = load_config(Path(path) if path else None)
    settings = payload_settings(config, env)
    if (
        environ is not None and settings.encryption.provider == "env"
    ):  # the env provider reads ``environ`` too
        options = {**settings.encryption.options, "environ": environ}
        settings = settings.model_copy(
            update={"encryption": settings.encryption.model_copy(update={"options": options})}
        )
    sealer = CodecSealer.of(build_codec(settings))
    return await asyncio.to_thread(open_store, shadow_store_url(config.shadow, env), sealer=sealer)


def check_shadow_rules(config: ShadowConfig, registry: Registry) -> None:
    """Every rule's primary and candidate resolve on this worker, or a ``ConfigurationError`` naming
    the rule and what is known."""
    problems: list[str] = []
    for primary, rule in config.models.items():
        for field, model in (("", primary), (".model", rule.model)):
            try:
                registry.resolve_ref(model)
            except KernelflowError as exc:
                problems.append(f"shadow.models[{primary!r}]{field}: {model!r}: {exc}")
    if problems:
        raise ConfigurationError("; ".join(problems))

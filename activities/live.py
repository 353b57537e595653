"""The worker's live provider set: one object holding the registry, prices and circuit breakers that
every activity reads, so a config reload reaches chat and embeddings alike."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from temporalio import activity

from kernel.pricing import PriceTable
from kernel.registry import Registry
from kernel.routing import BreakerBoard

__all__ = ["HEARTBEAT_EVERY", "LiveProviders", "heartbeating"]

HEARTBEAT_EVERY = 2.0
"""Seconds between heartbeats of a call in flight (at most a third of its heartbeat timeout)."""

_T = TypeVar("_T")


class LiveProviders:
    """``registry`` and ``prices`` may be replaced while the worker runs (config reload); each call
    reads them once when it starts, so a call in flight finishes on the registry it began with."""

    def __init__(
        self, registry: Registry, *, prices: PriceTable | None = None, breakers: BreakerBoard | None = None
    ) -> None:
        self.registry = registry
        self.prices = prices or PriceTable()
        self.breakers = breakers


async def heartbeating(work: Awaitable[_T], *, every: float = HEARTBEAT_EVERY) -> _T:
    """Await ``work`` while heartbeating, so a lost worker is noticed within the heartbeat timeout and
    a cancelled workflow cancels the call (closing its connection). Local activities do not heartbeat."""
    task = asyncio.ensure_future(work)
    info = activity.info()
    if info.is_local:
        return await task
    interval = every
    if info.heartbeat_timeout:
        interval = min(interval, info.heartbeat_timeout.total_seconds() / 3)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval)
            if done:
                return task.result()
            activity.heartbeat()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

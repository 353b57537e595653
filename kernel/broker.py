"""The broker contract: what Kernelflow needs from an event streaming platform, and nothing more.

A broker plugin is one class registered in the ``kernelflow.brokers`` entry-point group (NATS
JetStream is built in, registered the same way). It offers:

- ``ensure_stream``: a durable, replayed log over some subjects, deduplicating publications that carry
  the same ``dedup_id`` within ``duplicate_window_s``;
- ``publish``: append bytes + headers, acknowledged by the broker once stored (``Published.duplicate``
  says the id was seen before and nothing was appended);
- ``subscribe``: a shared, durable consumer group; ``fetch`` hands out at most ``max_in_flight``
  unacknowledged deliveries per subscriber, and each delivery ends in one of ``ack`` (done),
  ``retry`` (give it back, redeliver after a delay) or ``reject`` (never redeliver). A delivery
  neither acked nor rejected within ``ack_wait_s`` is redelivered (a crashed consumer loses nothing).

Subjects are dot-separated tokens; ``*`` matches one token and ``>`` the rest (NATS syntax, mapped to
topics by other plugins). The conformance kit (``kernel.testing.brokers``) checks these semantics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from kernel.errors import KernelflowError

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "Delivery",
    "Published",
    "Subscription",
    "subject_matches",
]


class BrokerError(KernelflowError):
    """The broker refused an operation (bad stream settings, unknown subject...)."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached now; the same operation may succeed later."""


@dataclass(frozen=True)
class Published:
    stream: str
    sequence: int
    duplicate: bool = False


class Delivery(ABC):
    """One message handed to a consumer, until it is acked, retried or rejected."""

    subject: str
    data: bytes
    headers: Mapping[str, str]
    attempt: int
    """1 on the first delivery, then one more on each redelivery."""

    @abstractmethod
    async def ack(self) -> None: ...

    @abstractmethod
    async def retry(self, delay_s: float = 0.0) -> None:
        """Give the message back; it is delivered again (to any subscriber) after ``delay_s``."""

    @abstractmethod
    async def reject(self) -> None:
        """Never deliver this message again (it has been dead-lettered or is not wanted)."""


class Subscription(ABC):
    @abstractmethod
    async def fetch(self, max_messages: int, timeout_s: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, waiting at most ``timeout_s`` for the first one;
        an empty list when none came."""

    @abstractmethod
    async def close(self) -> None: ...


class Broker(ABC):
    name: ClassVar[str]
    """The entry-point name and the URL scheme the broker serves (``nats://...``)."""

    @abstractmethod
    async def connect(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ensure_stream(
        self,
        name: str,
        subjects: Sequence[str],
        *,
        duplicate_window_s: float = 120.0,
        max_age_s: float | None = None,
    ) -> None:
        """Create the stream, or update its subjects and duplicate window if it exists."""

    @abstractmethod
    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        dedup_id: str | None = None,
        timeout_s: float = 5.0,
    ) -> Published:
        """Store one message; raises ``BrokerUnavailable`` when it could not be stored."""

    @abstractmethod
    async def subscribe(
        self,
        stream: str,
        group: str,
        *,
        subjects: Sequence[str] = (),
        max_in_flight: int = 64,
        ack_wait_s: float = 30.0,
    ) -> Subscription:
        """Join consumer group ``group`` on ``stream`` (created if missing), restricted to ``subjects``
        when given. Subscribers of one group share its messages; each message goes to one of them."""

    def watch(
        self, subject: str, *, from_start: bool = False
    ) -> AsyncIterator[tuple[str, bytes, dict[str, str]]]:
        """Messages on ``subject`` as they come (from the start of the stream holding it when
        ``from_start``), without acknowledging anything: for people debugging (``kernelflow events
        tail``). Optional for plugins."""
        raise BrokerError(f"the {self.name} broker cannot tail subjects")

    async def __aenter__(self) -> Broker:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether ``subject`` falls under ``pattern`` (``*`` one token, ``>`` one or more at the end)."""
    want, have = pattern.split("."), subject.split(".")
    for index, token in enumerate(want):
        if token == ">":
            return len(have) > index
        if index >= len(have) or (token != "*" and token != have[index]):
            return False
    return len(want) == len(have)

"""Broker plugins: event streaming platforms behind ``kernel.broker.Broker``.

Every broker, the built-in NATS JetStream one too, is found through the ``kernelflow.brokers``
entry-point group; a URL's scheme names the plugin (``nats://127.0.0.1:4222``).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from urllib.parse import urlsplit

from kernel.broker import Broker
from kernel.errors import ConfigurationError

__all__ = ["ENTRY_POINT_GROUP", "available_brokers", "broker_for_url"]

ENTRY_POINT_GROUP = "kernelflow.brokers"


def available_brokers() -> dict[str, type[Broker]]:
    """Broker classes by name, as installed."""
    found: dict[str, type[Broker]] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry.load()
        if not (isinstance(loaded, type) and issubclass(loaded, Broker)):
            raise ConfigurationError(
                f"entry point {entry.name!r} in {ENTRY_POINT_GROUP} is {loaded!r}, not a kernel.broker.Broker subclass"
            )
        found[entry.name] = loaded
    return found


def broker_for_url(url: str) -> Broker:
    """A (not yet connected) broker for ``url``; its scheme picks the plugin."""
    scheme = urlsplit(url).scheme
    brokers = available_brokers()
    if scheme not in brokers:
        raise ConfigurationError(
            f"broker URL {url!r}: no broker plugin for scheme {scheme!r}; installed: {', '.join(sorted(brokers)) or 'none'}"
        )
    return brokers[scheme](url)  # type: ignore[call-arg]

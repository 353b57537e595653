"""The built-in NATS JetStream broker passes the broker conformance kit, on a real server."""

from __future__ import annotations

import pytest

from brokers import available_brokers, broker_for_url
from brokers.nats import NatsBroker
from kernel.broker import Broker, subject_matches
from kernel.errors import ConfigurationError
from kernel.testing import BrokerConformance


class TestNatsConformance(BrokerConformance):
    @pytest.fixture
    def broker_url(self, nats_server: str) -> str:
        return nats_server

    def make_broker(self, url: str) -> Broker:
        return broker_for_url(url)  # through the entry point, as a third-party plugin is found


def test_the_builtin_broker_is_registered_like_a_plugin() -> None:
    assert available_brokers()["nats"] is NatsBroker
    with pytest.raises(ConfigurationError, match="no broker plugin for scheme 'kafka'; installed: nats"):
        broker_for_url("kafka://localhost:9092")


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("shop.orders.paid", "shop.orders.paid", True),
        ("shop.*.paid", "shop.orders.paid", True),
        ("shop.>", "shop.orders.paid", True),
        ("shop.>", "shop", False),
        ("shop.*", "shop.orders.paid", False),
        ("shop.orders", "shop.orders.paid", False),
    ],
)
def test_subject_patterns(pattern: str, subject: str, matches: bool) -> None:
    assert subject_matches(pattern, subject) is matches

"""Test tooling for plugins: the conformance kits every provider and every broker must pass.

``ProviderConformance`` is a pytest base class; subclass it in a test module, set the models and
implement ``make_provider``. It talks to the simulator (``simulator_url`` or one it starts itself)
and needs pytest and pytest-asyncio; nothing here imports Temporal.
"""

from __future__ import annotations

from kernel.testing._simulator import requests_tagged, shared_simulator_url
from kernel.testing.brokers import BrokerConformance
from kernel.testing.conformance import FAULT_EXPECTATIONS, ConformanceRun, ProviderConformance

__all__ = [
    "FAULT_EXPECTATIONS",
    "BrokerConformance",
    "ConformanceRun",
    "ProviderConformance",
    "requests_tagged",
    "shared_simulator_url",
]

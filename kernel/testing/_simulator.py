"""The simulator the conformance kit talks to: one given by URL, or one the kit starts itself.

Everything goes through the simulator's admin HTTP routes (``/_sim/stats``), so a simulator in
this process, in a subprocess or in a container serves equally well. Requests of one check are
counted through a unique ``[[sim: tag=...]]`` directive, so checks never reset a simulator that
other tests share.
"""

from __future__ import annotations

import atexit
import threading
from typing import Any

import httpx

__all__ = ["requests_tagged", "shared_simulator_url"]

_lock = threading.Lock()
_server: Any = None


def shared_simulator_url() -> str:
    """The URL of a simulator started by the kit on first use (in a background thread of this
    process) and stopped when the process exits."""
    global _server
    with _lock:
        if _server is None:
            from simulator.server import SimulatorServer  # test tooling: imported only when needed

            server = SimulatorServer()
            server.start()
            atexit.register(server.stop)
            _server = server
        url: str = _server.url
        return url


async def requests_tagged(simulator_url: str, tag: str) -> int:
    """How many requests the simulator has served that carried ``[[sim: tag=<tag>]]``."""
    async with httpx.AsyncClient(timeout=10.0) as admin:
        response = await admin.get(f"{simulator_url.rstrip('/')}/_sim/stats")
        response.raise_for_status()
        by_tag: dict[str, int] = response.json().get("by_tag") or {}
        return int(by_tag.get(tag, 0))

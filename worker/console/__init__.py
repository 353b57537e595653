"""The operator console (``kernelflow console``): pipelines, approvals, routing, providers, events."""

from __future__ import annotations

from worker.console.app import ConsoleSettings, create_app

__all__ = ["ConsoleSettings", "create_app"]

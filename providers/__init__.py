"""Built-in provider plugins, one module per LLM service. Each is published through the
``kernelflow.providers`` entry-point group, exactly like a third-party plugin."""

from __future__ import annotations

__all__: list[str] = []

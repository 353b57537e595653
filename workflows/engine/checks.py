"""The worker's own checks that update validators may ask for.

A validator runs when an update arrives, never on replay, so it may read the worker's live state:
here, whether the worker can resolve a model (``provider/model`` or alias) to a provider. The
worker installs the check when it starts (``worker.plugin``); without one, only the syntax of a
model string is checked.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["check_model", "install_model_check"]

_model_check: Callable[[str], str | None] | None = None


def install_model_check(check: Callable[[str], str | None] | None) -> None:
    """``check(model)`` returns why the worker cannot call ``model``, or None when it can."""
    global _model_check
    _model_check = check


def check_model(model: str) -> str | None:
    return _model_check(model) if _model_check is not None else None

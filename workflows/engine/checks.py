"""The worker's own checks that update validators may ask for.

A validator runs when an update arrives, never on replay, so it may read the worker's live state:
here, whether the worker can resolve a model (``provider/model`` or alias) to a provider. The
worker installs the check when it starts (``worker.plugin``); without one, only the syntax of a
model string is checked.

The spec check (whether each batch-mode step's provider takes batches) is read by ``PipelineWorkflow``
on its first workflow task, when not replaying; its verdict is kept in the history as a marker, so a
replay never asks the worker's state again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["check_model", "check_spec", "install_model_check", "install_spec_check"]

_model_check: Callable[[str], str | None] | None = None
_spec_check: Callable[[Any], str | None] | None = None


def install_model_check(check: Callable[[str], str | None] | None) -> None:
    """``check(model)`` returns why the worker cannot call ``model``, or None when it can."""
    global _model_check
    _model_check = check


def check_model(model: str) -> str | None:
    return _model_check(model) if _model_check is not None else None


def install_spec_check(check: Callable[[Any], str | None] | None) -> Callable[[Any], str | None] | None:
    """``check(spec)`` (a ``PipelineSpec``) returns why this worker cannot run it, or None. Returns the
    check installed before."""
    global _spec_check
    previous, _spec_check = _spec_check, check
    return previous


def check_spec(spec: Any) -> str | None:
    return _spec_check(spec) if _spec_check is not None else None

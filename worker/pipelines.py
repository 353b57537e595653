"""Registered pipelines: a folder of YAML files the worker loads at start, served by name.

``PipelineRequest.pipeline_name`` (and optionally ``pipeline_version``) names one; the workflow reads
it through the ``load_pipeline`` local activity, so the spec it ran is recorded in its history and a
replay never reads the folder again. Without a version the highest one is served. Every file is
validated at load: a broken file stops the worker with its path and the problem.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from kernel.errors import ConfigurationError, FailureType, PipelineError
from kernel.pipeline import PipelineSpec, load_pipeline
from workflows.contract import LoadPipelineInput
from workflows.pipeline import LOAD_PIPELINE

__all__ = ["PIPELINES_DIR_ENV", "PipelineCatalog", "load_catalog", "pipelines_dir"]

PIPELINES_DIR_ENV = "KERNELFLOW_PIPELINES_DIR"


class PipelineCatalog:
    """Pipelines by name and version; its bound ``load`` method is the ``load_pipeline`` activity."""

    def __init__(self, specs: Iterable[PipelineSpec] = (), *, events_default: bool = False) -> None:
        self.events_default = events_default
        """Publish lifecycle events for pipelines whose spec has no ``events:`` field."""
        self._specs: dict[str, dict[int, PipelineSpec]] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: PipelineSpec, *, source: str | None = None) -> None:
        versions = self._specs.setdefault(spec.name, {})
        if spec.version in versions:
            where = f" ({source})" if source else ""
            raise ConfigurationError(
                f"pipeline {spec.name!r} version {spec.version} is registered twice{where}"
            )
        versions[spec.version] = spec

    @property
    def names(self) -> list[str]:
        return sorted(self._specs)

    def describe(self) -> dict[str, list[int]]:
        return {name: sorted(versions) for name, versions in sorted(self._specs.items())}

    def get(self, name: str, version: int | None = None) -> PipelineSpec:
        versions = self._specs.get(name)
        if not versions:
            known = ", ".join(f"{n} (v{', v'.join(map(str, v))})" for n, v in self.describe().items())
            raise PipelineError(
                f"no pipeline {name!r} is registered on this worker; registered: {known or 'none'}"
            )
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise PipelineError(
                f"pipeline {name!r} has no version {version}; registered versions: {sorted(versions)}"
            )
        return versions[version]

    @activity.defn(name=LOAD_PIPELINE)
    async def load(self, request: LoadPipelineInput) -> dict[str, Any]:
        try:
            spec = self.get(request.name, request.version)
        except PipelineError as exc:
            raise ApplicationError(str(exc), type=FailureType.UNKNOWN_PIPELINE, non_retryable=True) from exc
        data = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
        if self.events_default and spec.events is None:
            data["events"] = {"enabled": True}  # recorded in the history with the rest of the spec
        return data


def load_catalog(folder: Path | str | None, *, events_default: bool = False) -> PipelineCatalog:
    """Every ``*.yaml`` / ``*.yml`` / ``*.json`` file in ``folder`` (not recursive)."""
    catalog = PipelineCatalog(events_default=events_default)
    if folder is None:
        return catalog
    path = Path(folder)
    if not path.is_dir():
        raise ConfigurationError(f"pipelines folder {str(path)!r} does not exist or is not a folder")
    for file in sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json")):
        catalog.add(load_pipeline(file), source=str(file))
    return catalog


def pipelines_dir(configured: Path | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """``KERNELFLOW_PIPELINES_DIR`` wins over the config file's ``pipelines_dir``."""
    raw = (os.environ if environ is None else environ).get(PIPELINES_DIR_ENV)
    return Path(raw) if raw else configured

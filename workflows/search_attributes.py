"""Typed search attributes Kernelflow sets on every pipeline, so the Web UI list can filter by them.

They must exist in the namespace before a workflow upserts them: `kernelflow worker` and `kernelflow dev`
register them (idempotently); docker-compose registers them with the admin tools.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

PIPELINE = SearchAttributeKey.for_keyword("KernelflowPipeline")
STATUS = SearchAttributeKey.for_keyword("KernelflowStatus")
PROVIDER = SearchAttributeKey.for_keyword_list("KernelflowProvider")
TENANT = SearchAttributeKey.for_keyword("KernelflowTenant")

ALL = (PIPELINE, STATUS, PROVIDER, TENANT)

__all__ = ["ALL", "PIPELINE", "PROVIDER", "STATUS", "TENANT"]

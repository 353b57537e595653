"""Typed search attributes Kernelflow sets on every pipeline, so the Web UI list, the console and
business systems can find pipelines by them.

They must exist in the namespace before a workflow upserts them: `kernelflow worker` and `kernelflow dev`
register them (idempotently); docker-compose registers them with the admin tools.

- ``KernelflowPipeline``: the pipeline's name.
- ``KernelflowStatus``: Running, Paused, WaitingForApproval, WaitingForEvent, Completed, Failed, Cancelled.
- ``KernelflowProvider``: the providers that answered so far.
- ``KernelflowTenant``: the tenant the pipeline was started for.
- ``KernelflowAwaiting``: ids of the approval steps waiting for a decision now (the approvals inbox).
- ``KernelflowModels``: the models the pipeline may still call, after reroutes (so running work can be
  found, and moved, by model).
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

PIPELINE = SearchAttributeKey.for_keyword("KernelflowPipeline")
STATUS = SearchAttributeKey.for_keyword("KernelflowStatus")
PROVIDER = SearchAttributeKey.for_keyword_list("KernelflowProvider")
TENANT = SearchAttributeKey.for_keyword("KernelflowTenant")
AWAITING = SearchAttributeKey.for_keyword_list("KernelflowAwaiting")
MODELS = SearchAttributeKey.for_keyword_list("KernelflowModels")

ALL = (PIPELINE, STATUS, PROVIDER, TENANT, AWAITING, MODELS)

__all__ = ["ALL", "AWAITING", "MODELS", "PIPELINE", "PROVIDER", "STATUS", "TENANT"]

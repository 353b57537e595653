"""The batcher's activities: hand a pipeline's batch-mode items to the batcher of their (tenant, key,
model) — starting it when none runs — and take back items still waiting in its window.

``llm_batch_enqueue`` update-with-starts ``BatcherWorkflow``; item ids are unique per pipeline, step,
round and item, and the batcher takes an id once, so a retried activity adds nothing twice.
"""

from __future__ import annotations

from typing import Any

from temporalio import activity
from temporalio.client import WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError

from workflows.batcher import (
    AddItems,
    BatcherInput,
    BatcherSettings,
    BatcherWorkflow,
    SharedItem,
    Withdraw,
    batcher_id,
)

__all__ = ["BATCH_ENQUEUE", "BATCH_WITHDRAW", "BatcherActivities"]

BATCH_ENQUEUE = "llm_batch_enqueue"
BATCH_WITHDRAW = "llm_batch_withdraw"
"""The activities' names: public API, never renamed."""


class BatcherActivities:
    def all(self) -> list[Any]:
        return [self.enqueue, self.withdraw]

    @activity.defn(name=BATCH_ENQUEUE)
    async def enqueue(self, payload: dict[str, Any]) -> dict[str, Any]:
        settings = BatcherSettings.model_validate(payload["settings"])
        workflow_id = batcher_id(settings.model, settings.key, settings.tenant)
        start = WithStartWorkflowOperation(
            BatcherWorkflow.run,
            BatcherInput(settings=settings),
            id=workflow_id,
            task_queue=activity.info().task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=f"batcher for {settings.model} ({settings.key})",
        )
        items = [
            SharedItem(
                id=f"{payload['ticket']}-{raw['custom_id']}",
                ticket=str(payload["ticket"]),
                requester=str(payload["requester"]),
                custom_id=str(raw["custom_id"]),
                request=raw["request"],
            )
            for raw in payload["items"]
        ]
        answer = await activity.client().execute_update_with_start_workflow(
            BatcherWorkflow.add_items,
            AddItems(items=items, window_s=float(payload["window_s"]), max_items=int(payload["max_items"])),
            start_workflow_operation=start,
        )
        return {"batcher": workflow_id, **answer.model_dump()}

    @activity.defn(name=BATCH_WITHDRAW)
    async def withdraw(self, payload: dict[str, Any]) -> dict[str, Any]:
        settings = BatcherSettings.model_validate(payload["settings"])
        workflow_id = batcher_id(settings.model, settings.key, settings.tenant)
        handle = activity.client().get_workflow_handle(workflow_id)
        try:
            removed = await handle.execute_update(
                BatcherWorkflow.withdraw, Withdraw(ticket=str(payload["ticket"]))
            )
        except RPCError:
            removed = 0  # no batcher runs: nothing waits in a window
        return {"batcher": workflow_id, "withdrawn": removed}

"""A code-defined workflow running the agent loop through ``kernelflow.agent`` (a module of its own so
the sandbox imports it cleanly)."""

from __future__ import annotations

from typing import Any

from temporalio import workflow

import kernelflow

__all__ = ["OrderDesk"]


@workflow.defn(name="OrderDesk")
class OrderDesk:
    @workflow.run
    async def run(self, prompt: str) -> dict[str, Any]:
        result = await kernelflow.agent(
            model="openai/gpt-4o-mini",
            instructions="You answer questions about orders.",
            prompt=prompt,
            tools=[{"type": "mcp", "server": "orders", "tools": ["lookup_order"]}],
            max_turns=4,
        )
        return {"output": result.output, "turns": result.turns, "tool_calls": result.tool_calls}

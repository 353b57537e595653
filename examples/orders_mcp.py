"""An order-desk MCP server, built with the ``mcp`` SDK's server API (``MCPServer``), for the agent
example (``examples/refund-agent.yaml``) and the agent tests.

Run it over streamable HTTP or stdio::

    python -m examples.orders_mcp --http 8765        # http://127.0.0.1:8765/mcp
    python -m examples.orders_mcp                    # stdio (a worker starts it per call)

Every tool call is appended as one JSON line to the file named by ``ORDERS_MCP_LOG`` (when set), with
the call id Kernelflow sends in ``_meta``, so a test can count calls across processes. ``issue_refund``
answers a call id it has seen with its first answer: a retried call refunds once. ``hold`` answers only once the file named by its ``gate``
argument exists: a call that stays in flight while a test kills a worker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

__all__ = ["ORDERS", "server"]

ORDERS: dict[str, dict[str, Any]] = {
    "A100": {"order_id": "A100", "customer": "Ada", "item": "kettle", "total": 42.0, "status": "delivered"},
    "B200": {
        "order_id": "B200",
        "customer": "Brian",
        "item": "lamp",
        "total": 18.5,
        "status": "lost in transit",
    },
}

server = MCPServer("orders", log_level="WARNING")


CALL_ID_META = "io.kernelflow/call-id"
"""Kernelflow sends each tool call's id in ``_meta``, the same on every attempt of the call."""

_refunds: dict[str, str] = {}


def _call_id(ctx: Context | None) -> str | None:
    meta = ctx.request_context.meta if ctx is not None else None
    return str(meta.get(CALL_ID_META)) if meta and meta.get(CALL_ID_META) else None


def _log(tool: str, arguments: dict[str, Any], call_id: str | None = None) -> None:
    path = os.environ.get("ORDERS_MCP_LOG")
    if path:
        with Path(path).open("a", encoding="utf-8") as log:
            log.write(json.dumps({"tool": tool, "arguments": arguments, "call_id": call_id}) + "\n")


@server.tool()
def lookup_order(order_id: str) -> dict[str, Any]:
    """Look an order up by its id: customer, item, total and delivery status."""
    _log("lookup_order", {"order_id": order_id})
    order = ORDERS.get(order_id)
    if order is None:
        raise ToolError(f"no order {order_id!r}")
    return order


@server.tool()
def shipping_status(order_id: str) -> str:
    """Where the parcel of an order is."""
    _log("shipping_status", {"order_id": order_id})
    order = ORDERS.get(order_id)
    return f"order {order_id}: {order['status'] if order else 'unknown'}"


@server.tool()
def issue_refund(order_id: str, amount: float, reason: str, ctx: Context) -> str:
    """Refund an amount of an order to the customer."""
    call_id = _call_id(ctx)
    if call_id is not None and call_id in _refunds:  # the same call again (a retry): refund once
        return _refunds[call_id]
    _log("issue_refund", {"order_id": order_id, "amount": amount, "reason": reason}, call_id)
    answer = f"refunded {amount:.2f} on order {order_id}"
    if call_id is not None:
        _refunds[call_id] = answer
    return answer


@server.tool()
async def hold(gate: str, ctx: Context) -> str:
    """Answer once the file ``gate`` exists."""
    _log("hold:start", {"gate": gate}, _call_id(ctx))
    while not Path(gate).exists():  # noqa: ASYNC110, ASYNC240 - another process creates the gate file
        await asyncio.sleep(0.05)
    _log("hold", {"gate": gate})
    return "released"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", type=int, metavar="PORT", help="serve streamable HTTP on 127.0.0.1:PORT")
    args = parser.parse_args()
    if args.http:
        server.run("streamable-http", host="127.0.0.1", port=args.http)
    else:
        server.run("stdio")


if __name__ == "__main__":
    main()

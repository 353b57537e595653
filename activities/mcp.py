"""MCP activities: list the tools of an MCP server and call one, through the official ``mcp`` SDK.

The servers belong to the worker, never to the pipeline: ``KERNELFLOW_MCP_SERVERS`` is a JSON object
of name to either ``{"url": "http://127.0.0.1:8000/mcp"}`` (streamable HTTP)
or ``{"command": "python", "args": [...], "env": {...}, "cwd": "..."}`` (stdio, a process started
per call). A pipeline names a server; an unknown name is refused with the names configured.

Listing goes through an activity so the listing is in the workflow's history: replay never asks a
live server. A call that reaches the server and comes back with ``is_error`` is a tool error (not
retried, given to the model); a server that cannot be reached is a connection failure (retried by
the step's policy, then given to the model).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field, model_validator
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.live import heartbeating
from kernel.errors import FailureType

__all__ = [
    "CALL_ID_META",
    "MCP_CALL_TOOL",
    "MCP_LIST_TOOLS",
    "McpActivities",
    "McpCallInput",
    "McpCallResult",
    "McpListInput",
    "McpServerConfig",
    "McpToolInfo",
    "mcp_servers_from_env",
]

MCP_LIST_TOOLS = "mcp_list_tools"
MCP_CALL_TOOL = "mcp_call_tool"
"""Activity names: public API, never renamed."""

CALL_ID_META = "io.kernelflow/call-id"
"""The ``_meta`` key of a tool call's id, the same on every attempt of the call: a server with side
effects can answer a repeated call (a retry after a lost worker) without acting twice."""

_MAX_RESULT = 200_000


class McpServerConfig(BaseModel):
    """One MCP server the worker may reach: ``url`` (streamable HTTP) or ``command`` (stdio)."""

    url: str | None = None
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] | None = None
    cwd: str | None = None
    timeout_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerConfig:
        if (self.url is None) == (self.command is None):
            raise ValueError(
                "an MCP server needs exactly one of 'url' (streamable HTTP) or 'command' (stdio)"
            )
        return self


def mcp_servers_from_env(environ: Mapping[str, str] | None = None) -> dict[str, McpServerConfig]:
    """The servers in ``KERNELFLOW_MCP_SERVERS`` (a JSON object of name to server)."""
    raw = (os.environ if environ is None else environ).get("KERNELFLOW_MCP_SERVERS", "").strip()
    if not raw:
        return {}
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError(f"KERNELFLOW_MCP_SERVERS must be a JSON object of name to server, got {raw[:80]!r}")
    return {str(name): McpServerConfig.model_validate(value) for name, value in data.items()}


class McpListInput(BaseModel):
    server: str
    step_id: str = ""


class McpToolInfo(BaseModel):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class McpCallInput(BaseModel):
    server: str
    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    step_id: str = ""
    call_id: str = Field(default="", description="Sent as _meta io.kernelflow/call-id.")


class McpCallResult(BaseModel):
    text: str
    structured: Any = None
    is_error: bool = False


class McpActivities:
    """Holds the worker's MCP servers; its bound methods are the activities."""

    def __init__(self, servers: Mapping[str, McpServerConfig] | None = None) -> None:
        self.servers = dict(servers) if servers is not None else mcp_servers_from_env()

    def _server(self, name: str, step_id: str) -> McpServerConfig:
        server = self.servers.get(name)
        if server is None:
            known = ", ".join(sorted(self.servers)) or "none (set KERNELFLOW_MCP_SERVERS on the worker)"
            raise ApplicationError(
                f"step {step_id!r}: MCP server {name!r} is not configured on this worker; configured: {known}",
                type=FailureType.TOOL_NOT_ALLOWED,
                non_retryable=True,
            )
        return server

    def _client(self, server: McpServerConfig) -> Any:
        from mcp import Client, StdioServerParameters

        if server.url is not None:
            return Client(server.url, read_timeout_seconds=server.timeout_s, cache=None)
        params = StdioServerParameters(
            command=server.command or "", args=server.args, env=server.env, cwd=server.cwd
        )
        return Client(params, read_timeout_seconds=server.timeout_s, cache=None)

    @activity.defn(name=MCP_LIST_TOOLS)
    async def list_tools(self, request: McpListInput) -> list[McpToolInfo]:
        server = self._server(request.server, request.step_id)

        async def listing() -> list[McpToolInfo]:
            tools: list[McpToolInfo] = []
            async with self._client(server) as client:
                cursor: str | None = None
                while True:
                    page = await client.list_tools(cursor=cursor)
                    tools.extend(
                        McpToolInfo(name=t.name, description=t.description, input_schema=t.input_schema)
                        for t in page.tools
                    )
                    cursor = page.next_cursor
                    if not cursor:
                        return tools

        try:
            return await heartbeating(listing())
        except ApplicationError:
            raise
        except Exception as exc:
            raise _unreachable(request.step_id, request.server, exc) from exc

    @activity.defn(name=MCP_CALL_TOOL)
    async def call_tool(self, request: McpCallInput) -> McpCallResult:
        server = self._server(request.server, request.step_id)

        async def call() -> McpCallResult:
            async with self._client(server) as client:
                meta: Any = {CALL_ID_META: request.call_id} if request.call_id else None
                result = await client.call_tool(request.tool, request.arguments, meta=meta)
            texts = [getattr(block, "text", None) for block in result.content]
            text = "\n".join(t for t in texts if t is not None)
            if not text and result.structured_content is not None:
                text = json.dumps(result.structured_content)
            return McpCallResult(
                text=text[:_MAX_RESULT], structured=result.structured_content, is_error=result.is_error
            )

        try:
            return await heartbeating(call())
        except ApplicationError:
            raise
        except Exception as exc:
            raise _unreachable(request.step_id, request.server, exc) from exc


def _unreachable(step_id: str, server: str, exc: BaseException) -> ApplicationError:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return ApplicationError(
        f"step {step_id!r}: MCP server {server!r} failed: {type(exc).__name__}: {exc}"[:1000],
        type=FailureType.TOOL_CONNECTION_FAILED,
    )

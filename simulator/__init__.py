"""An LLM-cloud simulator: a real HTTP server speaking vendor wire formats.

It answers deterministically from the request, reports usage, injects faults on demand
(`[[sim: fault=429 times=1]]` in a message, the `x-sim-fault` header, or configured rules)
and counts the calls it served (`GET /_sim/stats`).
"""

from __future__ import annotations

from simulator.app import ErrorReply, JSONReply, StreamReply, Wire, WireError, create_app, exchange
from simulator.core import (
    Admission,
    Completion,
    Directive,
    DirectiveError,
    Fault,
    Message,
    ResponseFormat,
    SimRequest,
    Simulator,
    SimulatorConfig,
    Tool,
    ToolCall,
    Usage,
    generate,
    parse_directives,
    schema_instance,
    strip_directives,
)
from simulator.server import SimulatorProcess, SimulatorServer

__all__ = [
    "Admission",
    "Completion",
    "Directive",
    "DirectiveError",
    "ErrorReply",
    "Fault",
    "JSONReply",
    "Message",
    "ResponseFormat",
    "SimRequest",
    "Simulator",
    "SimulatorConfig",
    "SimulatorProcess",
    "SimulatorServer",
    "StreamReply",
    "Tool",
    "ToolCall",
    "Usage",
    "Wire",
    "WireError",
    "create_app",
    "exchange",
    "generate",
    "parse_directives",
    "schema_instance",
    "strip_directives",
]

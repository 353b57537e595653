"""Temporal activities: the only place where Kernelflow does I/O on a workflow's behalf."""

from __future__ import annotations

from activities.errors import to_application_error
from activities.llm import LLM_CHAT, LlmActivities, LlmCallInput, LlmCallResult

__all__ = ["LLM_CHAT", "LlmActivities", "LlmCallInput", "LlmCallResult", "to_application_error"]

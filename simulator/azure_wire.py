"""Azure OpenAI's wire: OpenAI's bodies under `/openai/deployments/{deployment}/...?api-version=...`.

Differences from `openai_wire`: the key arrives in the `api-key` header (or as an Entra ID bearer
token), the model is the deployment in the path, `api-version` is required, errors carry Azure's
codes (`content_filter` with `innererror.content_filter_result`, `DeploymentNotFound`), a 429 says
when to retry in `x-ms-retry-after-ms`, and answers carry (all-clear) content-filter results.
"""

from __future__ import annotations

from typing import Any, ClassVar

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from simulator.app import ErrorReply, JSONReply, Reply, WireError, exchange
from simulator.core import Admission, Fault, SimRequest, Simulator
from simulator.openai_wire import INVALID_KEY, OpenAIWire

__all__ = ["DEFAULT_RETRY_AFTER_MS", "AzureOpenAIWire", "routes"]

DEFAULT_RETRY_AFTER_MS = 1000
_CATEGORIES = ("hate", "self_harm", "sexual", "violence")


def _clear() -> dict[str, Any]:
    return {category: {"filtered": False, "severity": "safe"} for category in _CATEGORIES}


def _azure_error(status: int, code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status, **extra}}


class AzureOpenAIWire(OpenAIWire):
    name: ClassVar[str] = "azure_openai"

    def api_key(self, headers: Headers) -> str | None:
        key = headers.get("api-key", "").strip()
        return key or super().api_key(headers)

    def model_for(self, payload: dict[str, Any], request: Request) -> str:
        if not request.query_params.get("api-version"):
            raise WireError(
                ErrorReply(
                    404,
                    _azure_error(
                        404, "404", "Resource not found: the api-version query parameter is required"
                    ),
                )
            )
        deployment: str = request.path_params["deployment"]
        return deployment

    def auth_error(self, headers: Headers) -> ErrorReply | None:
        key = self.api_key(headers)
        if key is None or key == INVALID_KEY:
            message = (
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
                "provide a valid key for an active subscription and use a correct regional API endpoint "
                "for your resource."
            )
            return ErrorReply(401, _azure_error(401, "401", message))
        return None

    def fault_reply(self, fault: Fault, request: SimRequest) -> ErrorReply:
        if fault.kind == "content_filter":
            message = (
                "The response was filtered due to the prompt triggering Azure OpenAI's content management "
                "policy. Please modify your prompt and retry."
            )
            result = {**_clear(), "violence": {"filtered": True, "severity": "medium"}}
            body = _azure_error(
                400,
                "content_filter",
                message,
                param="prompt",
                innererror={"code": "ResponsibleAIPolicyViolation", "content_filter_result": result},
            )
            return ErrorReply(400, body, {"apim-request-id": request.digest})
        reply = super().fault_reply(fault, request)
        if fault.kind != "429":
            return reply
        if fault.retry_after_ms is not None:
            wait_ms = fault.retry_after_ms
        elif fault.retry_after is not None:
            wait_ms = int(fault.retry_after * 1000)
        else:
            wait_ms = DEFAULT_RETRY_AFTER_MS
        headers = {**reply.headers, "x-ms-retry-after-ms": str(wait_ms)}
        return ErrorReply(reply.status, reply.body, headers)

    def unknown_model(self, model: str) -> ErrorReply:
        message = (
            "The API deployment for this resource does not exist. If you created the deployment within the "
            "last 5 minutes, please wait a moment and try again."
        )
        return ErrorReply(404, _azure_error(404, "DeploymentNotFound", message))

    def chat_reply(self, request: SimRequest, admission: Admission) -> Reply:
        reply = super().chat_reply(request, admission)
        if not isinstance(reply, JSONReply):
            return reply
        body = dict(reply.body)
        body["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": _clear()}]
        body["choices"] = [{**choice, "content_filter_results": _clear()} for choice in body["choices"]]
        return JSONReply(body, reply.status, reply.headers)

    def routes(self, sim: Simulator) -> list[BaseRoute]:
        async def chat_completions(request: Request) -> Response:
            return await exchange(request, sim, self, self.parse_chat, self.chat_reply)

        async def embeddings(request: Request) -> Response:
            return await exchange(request, sim, self, self.parse_embeddings, self.embeddings_reply)

        prefix = "/openai/deployments/{deployment}"
        return [
            Route(f"{prefix}/chat/completions", chat_completions, methods=["POST"]),
            Route(f"{prefix}/embeddings", embeddings, methods=["POST"]),
        ]


def routes(sim: Simulator) -> list[BaseRoute]:
    return AzureOpenAIWire().routes(sim)

"""The operator console: a Starlette application of server-rendered pages over the client helpers.

Every page reads Temporal (visibility and the pipeline's queries); every action is one of the client
helpers, sent with ``by`` set to the signed-in user and logged. Forms work without JavaScript; the
small script in ``static/`` only refreshes the page of a running pipeline.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.client import Client, WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.common import RawValue
from temporalio.contrib.workflow_streams import WorkflowStreamClient
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from activities.streaming import TokenEvent, is_tokens_topic
from kernel.pipeline import parse_pipeline
from worker import client as kf
from worker.client import PipelineSummary
from worker.console.auth import ROLES, Role, Session, SessionSigner, User, Users
from worker.console.oidc import OidcClient, OidcError, OidcSettings, pkce_pair
from worker.console.sources import EventsReader, MetricsReader, NoEvents, NoMetrics
from workflows.contract import PipelineStatus

__all__ = ["ConsoleSettings", "create_app"]

_log = structlog.get_logger("kernelflow.console")
_HERE = Path(__file__).parent
_COOKIE = "kf_session"
_LOGIN_COOKIE = "kf_login"
_OIDC_COOKIE = "kf_oidc"
_MAX_FORM_BYTES = 64 * 1024
_CONCURRENCY = 16
"""Queries and updates sent at once by one page (the inbox, moving running work)."""


@dataclass
class ConsoleSettings:
    """What the console needs besides a Temporal client."""

    users: Users
    secret: bytes
    namespace: str = "default"
    task_queue: str = "kernelflow"
    ui_url: str | None = None
    describe_providers: Callable[[], list[dict[str, Any]]] = list
    aliases: Callable[[], dict[str, str]] = dict
    metrics: MetricsReader = field(default_factory=NoMetrics)
    events: EventsReader = field(default_factory=NoEvents)
    secure_cookies: bool = False
    check_timeout_s: float = 60.0
    oidc: OidcSettings | None = None


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def create_app(client: Client, settings: ConsoleSettings) -> Starlette:
    signer = SessionSigner(settings.secret)
    oidc = OidcClient(settings.oidc) if settings.oidc is not None else None
    templates = Jinja2Templates(directory=str(_HERE / "templates"))
    templates.env.filters["ago"] = _ago
    templates.env.filters["money"] = _money
    templates.env.globals["role_names"] = ("viewer", "operator", "approver")

    def signed_in(request: Request) -> tuple[User, Session] | None:
        session = signer.load(request.cookies.get(_COOKIE))
        if session is None:
            return None
        if session.roles is not None:  # signed in through the OIDC provider
            return User(name=session.user, roles=session.roles), session
        user = settings.users.find(session.user)
        return (user, session) if user is not None else None

    def page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
        who = signed_in(request)
        context = {
            "user": who[0] if who else None,
            "csrf": who[1].csrf if who else "",
            "nav": name.split(".")[0],
            "ui_url": settings.ui_url,
            "oidc": oidc is not None,
            **context,
        }
        return templates.TemplateResponse(request, name, context, status_code=status)

    async def form(request: Request) -> dict[str, str]:
        body = await request.body()
        if len(body) > _MAX_FORM_BYTES:
            raise _Refused(413, f"the form is larger than {_MAX_FORM_BYTES} bytes")
        if request.headers.get("content-type", "").split(";")[0].strip() not in (
            "application/x-www-form-urlencoded",
            "",
        ):
            raise _Refused(415, "forms are sent as application/x-www-form-urlencoded")
        parsed = urllib.parse.parse_qs(body.decode(errors="replace"), keep_blank_values=True)
        return {k: v[-1].strip() for k, v in parsed.items()}

    async def action(request: Request, role: Role) -> tuple[User, dict[str, str]]:
        """The signed-in user holding ``role``, and the form, whose CSRF token must match."""
        who = signed_in(request)
        if who is None:
            raise _Refused(401, "sign in first")
        user, session = who
        data = await form(request)
        if not _same(data.get("csrf", ""), session.csrf):
            _log.warning("console.csrf_refused", by=user.name, path=request.url.path)
            raise _Refused(
                403,
                "this form was not sent from the console (CSRF token missing or wrong); reload the page and try again",
            )
        if not user.can(role):
            _log.warning("console.role_refused", by=user.name, path=request.url.path, needs=role)
            raise _Refused(
                403, f"{user.name} lacks the {role} role this action needs (has {', '.join(user.roles)})"
            )
        return user, data

    def guarded(
        handler: Callable[[Request, User], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            who = signed_in(request)
            if who is None:
                if request.method == "GET":
                    return RedirectResponse(f"/login?next={urllib.parse.quote(str(request.url.path))}", 303)
                return refused(request, _Refused(401, "sign in first"))
            try:
                return await handler(request, who[0])
            except _Refused as exc:
                return refused(request, exc)

        return endpoint

    def refused(request: Request, exc: _Refused) -> Response:
        if "text/html" not in request.headers.get("accept", "") or signed_in(request) is None:
            return PlainTextResponse(exc.message + "\n", status_code=exc.status)
        return page(request, "refused.html", {"message": exc.message}, exc.status)

    # --- sign-in ----------------------------------------------------------------------------------

    async def login_form(request: Request) -> Response:
        token = request.cookies.get(_LOGIN_COOKIE) or uuid.uuid4().hex
        response = page(
            request, "login.html", {"login_csrf": token, "next": request.query_params.get("next", "")}
        )
        response.set_cookie(
            _LOGIN_COOKIE, token, httponly=True, samesite="strict", secure=settings.secure_cookies
        )
        return response

    async def login(request: Request) -> Response:
        try:
            data = await form(request)
        except _Refused as exc:
            return PlainTextResponse(exc.message, exc.status)
        expected = request.cookies.get(_LOGIN_COOKIE, "")
        if not expected or not _same(data.get("csrf", ""), expected):
            return PlainTextResponse(
                "this form was not sent from the console (CSRF token missing or wrong)\n", 403
            )
        name, password = data.get("username", ""), data.get("password", "")
        errors = {}
        if not name:
            errors["username"] = "enter your user name"
        if not password:
            errors["password"] = "enter your password"
        user = None if errors else await asyncio.to_thread(settings.users.authenticate, name, password)
        if user is None:
            errors = errors or {"password": "unknown user or wrong password"}
            _log.warning("console.sign_in_refused", user=name)
            return page(
                request,
                "login.html",
                {"login_csrf": expected, "errors": errors, "username": name, "next": data.get("next", "")},
                400,
            )
        _log.info("console.signed_in", by=user.name, roles=user.roles)
        target = data.get("next", "")
        if not target.startswith("/") or target.startswith("//"):
            target = "/pipelines"
        response = RedirectResponse(target, 303)
        response.set_cookie(
            _COOKIE, signer.dump(signer.new(user.name)), max_age=int(signer.max_age_s), httponly=True,
            samesite="lax", secure=settings.secure_cookies,
        )  # fmt: skip
        response.delete_cookie(_LOGIN_COOKIE)
        return response

    def start_session(target: str, name: str, roles: list[Role] | None) -> Response:
        if not target.startswith("/") or target.startswith("//"):
            target = "/pipelines"
        response = RedirectResponse(target, 303)
        response.set_cookie(
            _COOKIE, signer.dump(signer.new(name, roles)), max_age=int(signer.max_age_s), httponly=True,
            samesite="lax", secure=settings.secure_cookies,
        )  # fmt: skip
        response.delete_cookie(_LOGIN_COOKIE)
        return response

    async def oidc_start(request: Request) -> Response:
        if oidc is None:
            return PlainTextResponse("sign-in through an OIDC provider is not configured\n", 404)
        try:
            data = await form(request)
        except _Refused as exc:
            return PlainTextResponse(exc.message, exc.status)
        expected = request.cookies.get(_LOGIN_COOKIE, "")
        if not expected or not _same(data.get("csrf", ""), expected):
            return PlainTextResponse(
                "this form was not sent from the console (CSRF token missing or wrong)\n", 403
            )
        verifier, challenge = pkce_pair()
        state, nonce = uuid.uuid4().hex, uuid.uuid4().hex
        try:
            url = await oidc.authorize_url(_callback(request), state=state, nonce=nonce, challenge=challenge)
        except OidcError as exc:
            return PlainTextResponse(f"the sign-in provider cannot be used: {exc}\n", 502)
        response = RedirectResponse(url, 303)
        flow = {
            "state": state,
            "nonce": nonce,
            "verifier": verifier,
            "next": data.get("next", ""),
            "at": time.time(),
        }
        response.set_cookie(
            _OIDC_COOKIE,
            signer.seal(flow),
            max_age=600,
            httponly=True,
            samesite="lax",
            secure=settings.secure_cookies,
        )
        return response

    async def oidc_callback(request: Request) -> Response:
        if oidc is None:
            return PlainTextResponse("sign-in through an OIDC provider is not configured\n", 404)
        flow = signer.unseal(request.cookies.get(_OIDC_COOKIE))
        q = request.query_params
        if flow is None or time.time() - float(flow.get("at", 0)) > 600:
            return PlainTextResponse("the sign-in took too long or did not start here; sign in again\n", 400)
        if not _same(q.get("state", ""), str(flow.get("state", ""))):
            _log.warning("console.oidc_refused", reason="state")
            return PlainTextResponse(
                "the provider's answer does not belong to this sign-in (state differs)\n", 400
            )
        if q.get("error"):
            return PlainTextResponse(
                f"the provider refused the sign-in: {q.get('error')} {q.get('error_description', '')}\n", 403
            )
        try:
            claims = await oidc.exchange(
                q.get("code", ""),
                redirect_uri=_callback(request),
                verifier=str(flow["verifier"]),
                nonce=str(flow["nonce"]),
            )
        except OidcError as exc:
            _log.warning("console.oidc_refused", reason=str(exc))
            return PlainTextResponse(f"sign-in refused: {exc}\n", 403)
        name = str(claims.get(oidc.settings.name_claim) or claims.get("sub") or "")
        claimed = claims.get(oidc.settings.roles_claim)
        roles: list[Role] = [r for r in ROLES if isinstance(claimed, list) and r in claimed]
        if not roles and (known := settings.users.find(name)) is not None:
            roles = list(known.roles)
        if not name or not roles:
            _log.warning("console.oidc_refused", user=name, reason="no roles")
            return PlainTextResponse(
                f"{name or 'this account'} has no console role: the token's {oidc.settings.roles_claim!r} claim "
                f"names none of {', '.join(ROLES)} and the users file has no such user\n",
                403,
            )
        _log.info("console.signed_in", by=name, roles=roles, through="oidc")
        response = start_session(str(flow.get("next", "")), name, roles)
        response.delete_cookie(_OIDC_COOKIE)
        return response

    async def logout(request: Request, user: User) -> Response:
        await action(request, "viewer")
        _log.info("console.signed_out", by=user.name)
        response = RedirectResponse("/login", 303)
        response.delete_cookie(_COOKIE)
        return response

    # --- pipelines --------------------------------------------------------------------------------

    async def pipelines(request: Request, user: User) -> Response:
        q = request.query_params
        filters = {
            k: q.get(k, "").strip() or None for k in ("pipeline", "status", "tenant", "provider", "model")
        }
        running = {"running": True, "closed": False}.get(q.get("state", ""))
        try:
            rows = await kf.list_pipelines(client, limit=200, running=running, **filters)
            error = None
        except RPCError as exc:
            rows, error = [], f"Temporal visibility refused the query: {exc.message}"
        return page(
            request,
            "pipelines.html",
            {"rows": rows, "filters": filters, "state": q.get("state", ""), "error": error},
        )

    async def pipeline_detail(request: Request, user: User) -> Response:
        workflow_id = request.path_params["workflow_id"]
        found = await kf.list_pipelines(client, query=f"WorkflowId = {kf._quote(workflow_id)}", limit=1)
        summary = found[0] if found else None
        status = outputs = None
        error = None
        try:
            status = await kf.status(client, workflow_id)
            outputs = await kf.outputs(client, workflow_id)
        except (RPCError, WorkflowFailureError) as exc:
            error = f"the pipeline did not answer its status query: {getattr(exc, 'message', exc)}"
        if summary is None and status is None:
            raise _Refused(404, f"no pipeline with workflow id {workflow_id!r}")
        context = {
            "workflow_id": workflow_id, "summary": summary, "status": status, "outputs": outputs, "error": error,
            "web_ui": kf.workflow_url(settings.ui_url, settings.namespace, workflow_id) if settings.ui_url else None,
            "notice": request.query_params.get("notice"), "now": datetime.now(UTC),
        }  # fmt: skip
        return page(request, "pipeline.html", context)

    async def pipeline_control(request: Request, user: User) -> Response:
        workflow_id = request.path_params["workflow_id"]
        _, data = await action(request, "operator")
        verb = data.get("action", "")
        reason = data.get("reason") or f"{verb} by {user.name} from the console"
        controls = {"pause": kf.pause, "resume": kf.resume, "cancel": kf.cancel}
        if verb not in controls:
            raise _Refused(400, f"action must be one of pause, resume, cancel, not {verb!r}")
        try:
            answer = await controls[verb](client, workflow_id, reason=reason, by=user.name)
            notice = f"{verb}: " + (
                "applied" if answer.applied else f"not applied ({answer.detail or answer.status})"
            )
        except (WorkflowUpdateFailedError, RPCError) as exc:
            notice = f"{verb} refused: {_why(exc)}"
        _log.info("console.control", by=user.name, action=verb, workflow_id=workflow_id, outcome=notice)
        return RedirectResponse(
            f"/pipelines/{urllib.parse.quote(workflow_id)}?notice={urllib.parse.quote(notice)}", 303
        )

    async def tokens(request: Request, user: User) -> Response:
        """The pipeline's streamed tokens as server-sent events, from the start (or ``Last-Event-ID``)
        until the workflow ends; the pipeline page shows them live."""
        workflow_id = request.path_params["workflow_id"]
        try:
            start = int(request.headers.get("last-event-id", "-1")) + 1
        except ValueError:
            start = 0
        return StreamingResponse(
            _token_events(client, workflow_id, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    # --- approvals --------------------------------------------------------------------------------

    async def approvals(request: Request, user: User) -> Response:
        items = await _inbox(client)
        return page(
            request,
            "approvals.html",
            {
                "items": items,
                "now": datetime.now(UTC),
                "errors": {},
                "notice": request.query_params.get("notice"),
            },
        )

    async def decide(request: Request, user: User) -> Response:
        _, data = await action(request, "approver")
        workflow_id, step_id = data.get("workflow_id", ""), data.get("step_id", "")
        decision, comment = data.get("decision", ""), data.get("comment") or None
        errors: dict[str, str] = {}
        if decision not in ("approve", "reject"):
            errors["decision"] = f"choose approve or reject, not {decision!r}"
        if not workflow_id or not step_id:
            errors["decision"] = "the form names no pipeline or step"
        if decision == "reject" and not comment:
            errors["comment"] = "say why you reject (the comment is kept with the decision)"
        if comment and len(comment) > 2000:
            errors["comment"] = f"keep the comment under 2000 characters (it has {len(comment)})"
        if errors:
            items = await _inbox(client)
            return page(
                request, "approvals.html",
                {"items": items, "now": datetime.now(UTC), "errors": {(workflow_id, step_id): errors}, "comment": comment},
                400,
            )  # fmt: skip
        helper = kf.approve if decision == "approve" else kf.reject
        try:
            state = await helper(client, workflow_id, step_id, by=user.name, comment=comment)
            notice = f"{workflow_id} · {step_id}: {state.status} by {state.by}"
        except (WorkflowUpdateFailedError, RPCError) as exc:
            notice = f"{workflow_id} · {step_id}: refused: {_why(exc)}"
        _log.info(
            "console.decision",
            by=user.name,
            decision=decision,
            workflow_id=workflow_id,
            step_id=step_id,
            outcome=notice,
        )
        return RedirectResponse(f"/approvals?notice={urllib.parse.quote(notice)}", 303)

    # --- routing ----------------------------------------------------------------------------------

    async def routing(request: Request, user: User) -> Response:
        q = request.query_params
        source, target = q.get("source", "").strip(), q.get("target", "").strip()
        matches = await _matching(client, source) if source else None
        return page(
            request, "routing.html",
            {"aliases": settings.aliases(), "source": source, "target": target, "matches": matches, "errors": {}, "report": None},
        )  # fmt: skip

    async def move(request: Request, user: User) -> Response:
        _, data = await action(request, "operator")
        source, target, reason = data.get("source", ""), data.get("target", ""), data.get("reason") or None
        errors: dict[str, str] = {}
        if not source:
            errors["source"] = "name a model (provider/model) or a provider whose running work should move"
        if not target:
            errors["target"] = "name the model (provider/model) or alias the work should move to"
        elif "/" not in target and target not in settings.aliases():
            known = ", ".join(sorted(settings.aliases())) or "none configured"
            errors["target"] = (
                f"{target!r} is neither provider/model nor an alias in force (aliases: {known})"
            )
        if source and target and source == target:
            errors["target"] = "the target is the source"
        matches = await _matching(client, source) if source else []
        report: list[dict[str, Any]] | None = None
        if not errors:
            gate = asyncio.Semaphore(_CONCURRENCY)

            async def move_one(summary: PipelineSummary, models: list[str]) -> dict[str, Any]:
                async with gate:
                    try:
                        in_force = await kf.reroute(
                            client,
                            summary.workflow_id,
                            {m: target for m in models},
                            reason=reason,
                            by=user.name,
                        )
                    except (WorkflowUpdateFailedError, RPCError) as exc:
                        return {"workflow_id": summary.workflow_id, "moved": False, "detail": _why(exc)}
                detail = ", ".join(f"{k} → {v}" for k, v in in_force.items())
                return {"workflow_id": summary.workflow_id, "moved": True, "detail": detail}

            report = list(await asyncio.gather(*(move_one(s, m) for s, m in matches)))
            _log.info("console.reroute", by=user.name, source=source, target=target, report=report)
        return page(
            request, "routing.html",
            {"aliases": settings.aliases(), "source": source, "target": target, "matches": matches, "errors": errors, "report": report, "reason": reason or ""},
            400 if errors else 200,
        )  # fmt: skip

    # --- providers --------------------------------------------------------------------------------

    async def providers(request: Request, user: User) -> Response:
        return await _providers_page(request, {})

    async def _providers_page(request: Request, extra: dict[str, Any], status: int = 200) -> Response:
        figures_error = None
        try:
            figures = await settings.metrics.providers()
        except Exception as exc:  # a metrics source down must not take the page with it
            figures, figures_error = {}, f"{exc.__class__.__name__}: {exc}"
        context = {
            "rows": settings.describe_providers(), "figures": figures, "window": settings.metrics.window,
            "figures_error": figures_error, "aliases": settings.aliases(), "errors": {}, "check": None, **extra,
        }  # fmt: skip
        return page(request, "providers.html", context, status)

    async def check(request: Request, user: User) -> Response:
        _, data = await action(request, "operator")
        model = data.get("model", "")
        if "/" not in model and model not in settings.aliases():
            return await _providers_page(
                request,
                {
                    "errors": {"model": f"name a model as provider/model or an alias, not {model!r}"},
                    "model": model,
                },
                400,
            )
        result = await _check(client, model, settings)
        _log.info(
            "console.check", by=user.name, model=model, **{k: v for k, v in result.items() if k != "model"}
        )
        return await _providers_page(request, {"check": result, "model": model})

    # --- events -----------------------------------------------------------------------------------

    async def events(request: Request, user: User) -> Response:
        reader = settings.events
        context = {
            "connected": reader.connected, "triggers": await reader.triggers(), "recent": await reader.recent(),
            "letters": await reader.dead_letters(), "notice": request.query_params.get("notice"),
        }  # fmt: skip
        return page(request, "events.html", context)

    async def replay(request: Request, user: User) -> Response:
        _, data = await action(request, "operator")
        try:
            notice = await settings.events.replay(data.get("id", ""), by=user.name)
        except LookupError as exc:
            notice = f"not replayed: {exc}"
        _log.info("console.replay", by=user.name, id=data.get("id"), outcome=notice)
        return RedirectResponse(f"/events?notice={urllib.parse.quote(notice)}", 303)

    async def home(request: Request) -> Response:
        return RedirectResponse("/pipelines" if signed_in(request) else "/login", 303)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    routes = [
        Route("/", home),
        Route("/healthz", healthz),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/login/oidc", oidc_start, methods=["POST"]),
        Route("/login/oidc/callback", oidc_callback),
        Route("/logout", guarded(logout), methods=["POST"]),
        Route("/pipelines", guarded(pipelines)),
        Route("/pipelines/{workflow_id:path}/control", guarded(pipeline_control), methods=["POST"]),
        Route("/pipelines/{workflow_id:path}/tokens", guarded(tokens)),
        Route("/pipelines/{workflow_id:path}", guarded(pipeline_detail)),
        Route("/approvals", guarded(approvals)),
        Route("/approvals/decide", guarded(decide), methods=["POST"]),
        Route("/routing", guarded(routing)),
        Route("/routing/move", guarded(move), methods=["POST"]),
        Route("/providers", guarded(providers)),
        Route("/providers/check", guarded(check), methods=["POST"]),
        Route("/events", guarded(events)),
        Route("/events/replay", guarded(replay), methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(_HERE / "static")), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(_SecurityHeaders)])


class _SecurityHeaders:
    """No framing, no sniffing, scripts and styles only from the console itself."""

    _HEADERS = [
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
        (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    ]

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self._HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


# --- helpers --------------------------------------------------------------------------------------


def _callback(request: Request) -> str:
    return str(request.url_for("oidc_callback"))


def _same(given: str, expected: str) -> bool:
    import hmac

    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def _why(exc: BaseException) -> str:
    """The reason a control was refused, as the workflow said it."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ApplicationError):
            return f"{cause.message} ({cause.type})" if cause.type else cause.message
        if isinstance(cause, RPCError):
            return cause.message
        cause = cause.__cause__ or getattr(cause, "cause", None)
    return str(exc)


def _money(value: float | None) -> str:
    if value is None:
        return "—"
    if 0 < value < 0.0001:
        return "< $0.0001"
    return f"${value:,.4f}"


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    seconds = (datetime.now(UTC) - moment).total_seconds()
    return _span(seconds) + " ago" if seconds >= 0 else "in " + _span(-seconds)


def _span(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


async def _token_events(client: Client, workflow_id: str, start: int) -> AsyncIterator[str]:
    stream = WorkflowStreamClient.create(client, workflow_id)
    converter = client.data_converter.payload_converter
    try:
        async for item in stream.subscribe(None, from_offset=start, result_type=RawValue):
            if not is_tokens_topic(item.topic):
                continue
            try:
                event = converter.from_payload(item.data.payload, TokenEvent)
            except Exception:  # an event of a newer shape is skipped
                continue
            data = {"step": event.step_id, "kind": event.kind, "attempt": event.attempt, "model": event.model,
                    "text": event.text, "error": event.error_type}  # fmt: skip
            yield f"id: {item.offset}\ndata: {json.dumps(data)}\n\n"
    except (RPCError, WorkflowFailureError) as exc:
        yield f"event: failed\ndata: {json.dumps({'error': getattr(exc, 'message', str(exc))})}\n\n"
        return
    yield "event: end\ndata: {}\n\n"


@dataclass
class _Pending:
    summary: PipelineSummary
    step_id: str
    message: str | None
    detail: str | None
    deadline: datetime | None
    draft: Any
    draft_step: str | None
    tool: str | None = None
    arguments: Any = None
    approvers: list[str] | None = None

    def time_left(self) -> str | None:
        if self.deadline is None:
            return None
        left = (self.deadline - datetime.now(UTC)).total_seconds()
        return "due now" if left <= 0 else _span(left) + " left"


async def _inbox(client: Client) -> list[_Pending]:
    items: list[_Pending] = []
    waiting = await kf.list_pipelines(client, awaiting=True, running=True, limit=200)
    gate = asyncio.Semaphore(_CONCURRENCY)

    async def status_of(workflow_id: str) -> PipelineStatus | None:
        async with gate:
            try:
                return await kf.status(client, workflow_id)
            except (RPCError, WorkflowFailureError):
                return None

    statuses = await asyncio.gather(*(status_of(s.workflow_id) for s in waiting))
    for summary, status in zip(waiting, statuses, strict=True):
        for step_id in summary.awaiting:
            approval = next((a for a in status.approvals if a.step_id == step_id), None) if status else None
            if status is not None and (approval is None or approval.status != "waiting"):
                continue  # decided since visibility was updated
            steps = status.steps if status else []
            # An agent's tool call waits under "<step>.<turn>.<call>": its step is the agent step.
            owner = step_id if approval is None or approval.tool is None else step_id.split(".", 1)[0]
            index = next((i for i, s in enumerate(steps) if s.id == owner), None)
            step = steps[index] if index is not None else None
            before = [s for s in steps[: index or 0] if s.output is not None and s.type != "approval"]
            is_call = approval is not None and approval.tool is not None
            items.append(
                _Pending(
                    summary=summary, step_id=step_id,
                    message=approval.message if approval else None,
                    detail=step.detail if step else None,
                    deadline=approval.deadline if approval else None,
                    draft=before[-1].output if before and not is_call else None,
                    draft_step=before[-1].id if before and not is_call else None,
                    tool=approval.tool if approval else None,
                    arguments=approval.arguments if approval else None,
                    approvers=approval.approvers if approval else None,
                )
            )  # fmt: skip
    return items


async def _matching(client: Client, source: str) -> list[tuple[PipelineSummary, list[str]]]:
    """Running pipelines that may still call ``source`` (a model, or every model of a provider),
    with the models of theirs that match."""
    if "/" in source:
        found = await kf.list_pipelines(client, model=source, running=True, limit=1000)
        return [(s, [source]) for s in found]
    found = await kf.list_pipelines(client, running=True, limit=1000)
    out = []
    for s in found:
        models = [m for m in s.models if m.split("/", 1)[0] == source]
        if models:
            out.append((s, models))
    return out


async def _check(client: Client, model: str, settings: ConsoleSettings) -> dict[str, Any]:
    """One tiny request through ``model`` on a worker: a one-step pipeline, one attempt, no fallback."""
    spec = parse_pipeline(
        {
            "name": "provider-check",
            "description": f"check of {model} from the console",
            "steps": [
                {"id": "check", "model": model, "prompt": "Reply with the single word OK.", "max_tokens": 5,
                 "retry": {"max_attempts": 1}},
            ],
        }
    )  # fmt: skip
    started = time.perf_counter()
    handle = await kf.start_pipeline(
        client,
        spec,
        {},
        task_queue=settings.task_queue,
        workflow_id=f"provider-check-{uuid.uuid4().hex[:10]}",
    )
    try:
        result = await asyncio.wait_for(handle.result(), settings.check_timeout_s)
    except WorkflowFailureError as exc:
        cause: BaseException | None = exc.cause
        while cause is not None and not isinstance(cause, ApplicationError):
            cause = cause.__cause__
        try:  # the model's own error class, as the step recorded it
            failures = (await kf.status(client, handle.id)).steps[0].failures
        except (RPCError, WorkflowFailureError, IndexError):
            failures = []
        if failures:
            return {
                "model": model, "ok": False, "latency_s": time.perf_counter() - started, "workflow_id": handle.id,
                "error_type": failures[-1].error_type, "error": failures[-1].message,
            }  # fmt: skip
        return {
            "model": model, "ok": False, "latency_s": time.perf_counter() - started, "workflow_id": handle.id,
            "error_type": cause.type if isinstance(cause, ApplicationError) else exc.__class__.__name__,
            "error": cause.message if isinstance(cause, ApplicationError) else str(exc),
        }  # fmt: skip
    except TimeoutError:
        return {
            "model": model, "ok": False, "latency_s": time.perf_counter() - started, "workflow_id": handle.id,
            "error_type": "Timeout", "error": f"no answer within {settings.check_timeout_s:g}s (is a worker polling {settings.task_queue!r}?)",
        }  # fmt: skip
    step = result.steps[0] if result.steps else None
    return {
        "model": model, "ok": True, "latency_s": time.perf_counter() - started, "workflow_id": handle.id,
        "answered_by": step.model if step else None, "tokens": result.usage.total_tokens,
    }  # fmt: skip

"""Operating running pipelines from the terminal, and serving the console.

``kernelflow ls``, ``status``, ``approve``, ``reject``, ``pause``, ``resume``, ``cancel``, ``reroute``
(tables on a terminal, JSON with ``--json``) and ``kernelflow console``. Every action is sent with
``--by`` (default: the login name) so the pipeline records who did it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict
from typing import Any

from temporalio.client import WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from kernel.errors import ConfigurationError
from worker.config import WorkerSettings, load_config

__all__ = ["COMMANDS", "add_dlq_parser", "add_parsers", "dlq_command"]


def _by(args: argparse.Namespace) -> str:
    return str(args.by or getpass.getuser())


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [
        ["—" if v in (None, "", []) else str(v) for v in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


async def _client(args: argparse.Namespace) -> Any:
    from worker.cli import _client as client_of

    return await client_of(WorkerSettings.from_env(**_overrides(args)))


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from worker.cli import _overrides as overrides

    return overrides(args)


async def _refusable(args: argparse.Namespace, call: Awaitable[Any], describe: Callable[[Any], str]) -> int:
    """Run one control; a refusal says why (exit 4), nothing changed."""
    from worker.console.app import _why

    try:
        answer = await call
    except WorkflowUpdateFailedError as exc:
        return _refused(args, _why(exc))
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return _refused(args, f"no running pipeline {args.workflow_id!r}: {exc.message}")
        raise
    if args.json:
        _print_json(answer.model_dump(mode="json") if hasattr(answer, "model_dump") else answer)
    else:
        print(describe(answer))
    return 0


def _refused(args: argparse.Namespace, why: str) -> int:
    if args.json:
        _print_json({"refused": True, "reason": why})
    print(f"kernelflow: refused: {why}", file=sys.stderr)
    return 4


async def _cmd_ls(args: argparse.Namespace) -> int:
    from worker.client import list_pipelines

    client = await _client(args)
    running = {"running": True, "closed": False}.get(args.state or "")
    awaiting: str | bool | None = True if args.awaiting == "" else args.awaiting
    rows = await list_pipelines(
        client, limit=args.limit, pipeline=args.pipeline, status=args.status, tenant=args.tenant,
        provider=args.provider, model=args.model, awaiting=awaiting, running=running,
    )  # fmt: skip
    if args.json:
        _print_json([asdict(r) for r in rows])
        return 0
    _table(
        ["WORKFLOW ID", "PIPELINE", "STATUS", "TENANT", "AWAITING", "STARTED"],
        [
            [r.workflow_id, r.pipeline, r.status or r.workflow_status, r.tenant, ",".join(r.awaiting),
             r.started_at.strftime("%Y-%m-%d %H:%M:%S") if r.started_at else None]
            for r in rows
        ],
    )  # fmt: skip
    return 0


async def _cmd_status(args: argparse.Namespace) -> int:
    from worker.client import status

    client = await _client(args)
    try:
        state = await status(client, args.workflow_id)
    except RPCError as exc:
        return _refused(args, f"pipeline {args.workflow_id!r} did not answer: {exc.message}")
    if args.json:
        _print_json(state.model_dump(mode="json"))
        return 0
    print(
        f"{args.workflow_id}: pipeline {state.pipeline}, {state.status}"
        + (f" at {state.current_step}" if state.current_step else "")
    )
    print(
        f"tokens {state.usage.total_tokens}, cost ${state.cost_usd:.4f}"
        + (f", paused: {state.pause_reason}" if state.paused else "")
    )
    _table(
        ["STEP", "KIND", "STATUS", "MODEL", "TOKENS", "DETAIL"],
        [
            [s.id, s.type, s.status, s.model, s.usage.total_tokens or None, s.error or s.detail]
            for s in state.steps
        ],
    )
    for a in state.approvals:
        print(
            f"approval {a.step_id}: {a.status}"
            + (f" by {a.by}" if a.by else "")
            + (f": {a.comment}" if a.comment else "")
        )
    return 0


async def _cmd_decide(args: argparse.Namespace) -> int:
    from worker.client import approve, reject

    client = await _client(args)
    raised = _tenant_budget(args)
    if args.command == "approve":
        call = approve(
            client, args.workflow_id, args.step_id, by=_by(args), comment=args.comment, tenant_budget=raised
        )
    else:
        call = reject(client, args.workflow_id, args.step_id, by=_by(args), comment=args.comment)
    return await _refusable(args, call, lambda a: f"{args.workflow_id} {a.step_id}: {a.status} by {a.by}")


async def _cmd_control(args: argparse.Namespace) -> int:
    from worker.client import cancel, pause, resume

    client = await _client(args)
    helper = {"pause": pause, "resume": resume, "cancel": cancel}[args.command]
    kwargs: dict[str, Any] = {"by": _by(args)}
    if args.reason:
        kwargs["reason"] = args.reason
    if args.command == "resume":
        kwargs["tenant_budget"] = _tenant_budget(args)
    call = helper(client, args.workflow_id, **kwargs)
    return await _refusable(
        args, call,
        lambda a: f"{args.workflow_id}: {args.command} " + ("applied" if a.applied else f"not applied ({a.detail})") + f"; now {a.status}",
    )  # fmt: skip


def _tenant_budget(args: argparse.Namespace) -> dict[str, float] | None:
    """``--cost-per-day-usd`` / ``--cost-per-month-usd``: a tenant's new cost budget."""
    raised = {
        name: value
        for name in ("cost_per_day_usd", "cost_per_month_usd")
        if (value := getattr(args, name, None)) is not None
    }
    return raised or None


def _budget_options(parser: argparse.ArgumentParser) -> None:
    for period in ("day", "month"):
        parser.add_argument(
            f"--cost-per-{period}-usd",
            type=float,
            help=f"after a tenant budget pause or approval: the tenant's new budget for this {period} (USD)",
        )


async def _cmd_reroute(args: argparse.Namespace) -> int:
    from worker.client import reroute

    routes: dict[str, str] = {}
    for pair in args.route:
        source, sep, target = pair.partition("=")
        if not sep or not source or not target:
            raise ConfigurationError(
                f"a route is FROM=TO (e.g. openai/gpt-4o=anthropic/claude-sonnet-4-5), got {pair!r}"
            )
        routes[source] = target
    client = await _client(args)
    call = reroute(client, args.workflow_id, routes, reason=args.reason, by=_by(args))
    return await _refusable(
        args,
        call,
        lambda r: f"{args.workflow_id}: routes in force: " + ", ".join(f"{k} -> {v}" for k, v in r.items()),
    )


async def _cmd_console(args: argparse.Namespace) -> int:
    from worker.app import build_registry
    from worker.console import create_app
    from worker.console.auth import hash_password
    from worker.console.serve import ConsoleServer, settings_from_env, without_credentials
    from worker.logs import configure_logging

    if args.hash_password:
        password = sys.stdin.readline().rstrip("\n")
        if not password:
            raise ConfigurationError("--hash-password reads the password from standard input; it was empty")
        print(hash_password(password))
        return 0
    settings = WorkerSettings.from_env(**_overrides(args))
    configure_logging(settings.log_format, settings.log_level)
    registry = build_registry(load_config(settings.config_file))
    console = settings_from_env(
        registry, namespace=settings.namespace, task_queue=settings.task_queue,
        describe_providers=lambda: without_credentials(registry.describe()),
    )  # fmt: skip
    client = await _client(args)
    import os

    host = args.host or os.environ.get("KERNELFLOW_CONSOLE_HOST", "127.0.0.1")
    port = args.port or int(os.environ.get("KERNELFLOW_CONSOLE_PORT", "8500"))
    stop = asyncio.Event()
    from worker.cli import _on_signals

    _on_signals(stop)
    async with contextlib.AsyncExitStack() as stack:
        from worker.events_cli import _broker, _events_config

        events = _events_config(load_config(settings.config_file), None)
        if events.broker:  # the Events page reads the broker the bridge uses
            from worker.console.broker_events import BrokerEvents

            console.events = BrokerEvents(await stack.enter_async_context(_broker(events.broker)), events)
        server = await stack.enter_async_context(
            ConsoleServer(create_app(client, console), host=host, port=port)
        )
        print(
            f"Console    {server.url}  (Temporal {settings.temporal_address}, namespace {settings.namespace})",
            flush=True,
        )
        await stop.wait()
    await registry.aclose()
    return 0


def add_dlq_parser(verbs: Any) -> argparse.ArgumentParser:
    """``kernelflow events dlq ls|replay``, registered under ``kernelflow events``."""
    dlq: argparse.ArgumentParser = verbs.add_parser(
        "dlq", help="list dead-lettered events with their reasons, or replay one"
    )
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = actions.add_parser("ls", help="dead letters, oldest first, with why")
    listing.add_argument("--json", action="store_true")
    replay = actions.add_parser("replay", help="publish a dead letter again to its original subject")
    replay.add_argument("letter_id", metavar="ID")
    replay.add_argument("--by", help="who replays (default: your login name)")
    replay.add_argument("--json", action="store_true")
    return dlq


async def dlq_command(args: argparse.Namespace, events: Any, open_broker: Callable[[str], Any]) -> int:
    from worker.console.broker_events import BrokerEvents

    if not events.broker:
        raise ConfigurationError(
            "no broker: give --broker, KERNELFLOW_BROKER_URL or events.broker in the config"
        )
    async with open_broker(events.broker) as broker:
        reader = BrokerEvents(broker, events)
        if args.dlq_command == "ls":
            letters = await reader.dead_letters(limit=1000)
            if args.json:
                _print_json([asdict(d) for d in letters])
            else:
                _table(
                    ["ID", "SUBJECT", "ATTEMPTS", "WHEN", "REASON"],
                    [[d.id, d.subject, d.attempts, d.time.strftime("%Y-%m-%d %H:%M:%S") if d.time else None,
                      d.reason] for d in letters],
                )  # fmt: skip
            return 0
        try:
            done = await reader.replay(args.letter_id, by=_by(args))
        except LookupError as exc:
            return _refused(args, str(exc))
        if args.json:
            _print_json({"replayed": True, "detail": done})
        else:
            print(done)
        return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "ls": _cmd_ls,
    "status": _cmd_status,
    "approve": _cmd_decide,
    "reject": _cmd_decide,
    "pause": _cmd_control,
    "resume": _cmd_control,
    "cancel": _cmd_control,
    "reroute": _cmd_reroute,
    "console": _cmd_console,
}


def add_parsers(sub: Any, temporal_options: Callable[[argparse.ArgumentParser], None]) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        temporal_options(p)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    ls = sub.add_parser("ls", help="list pipelines through Temporal visibility, with filters")
    for name in ("pipeline", "status", "tenant", "provider", "model"):
        ls.add_argument(f"--{name}", help=f"only pipelines with this {name}")
    ls.add_argument(
        "--awaiting",
        nargs="?",
        const="",
        metavar="STEP",
        help="only pipelines waiting for an approval (of STEP)",
    )
    ls.add_argument("--state", choices=["running", "closed"], help="only running or only closed runs")
    ls.add_argument("--limit", type=int, default=100)
    common(ls)

    status = sub.add_parser("status", help="a pipeline's steps, models, tokens, cost and decisions")
    status.add_argument("workflow_id", metavar="ID")
    common(status)

    for verb in ("approve", "reject"):
        p = sub.add_parser(verb, help=f"{verb} a pipeline's waiting approval step")
        p.add_argument("workflow_id", metavar="ID")
        p.add_argument("step_id", metavar="STEP")
        p.add_argument("--comment", help="kept with the decision")
        p.add_argument("--by", help="who decides (default: your login name)")
        if verb == "approve":
            _budget_options(p)
        common(p)

    for verb, text in (
        ("pause", "hold before the next step"),
        ("resume", "resume a paused pipeline"),
        ("cancel", "stop, keeping finished steps"),
    ):
        p = sub.add_parser(verb, help=f"{text}")
        p.add_argument("workflow_id", metavar="ID")
        p.add_argument("--reason")
        p.add_argument("--by", help="who acts (default: your login name)")
        if verb == "resume":
            _budget_options(p)
        common(p)

    reroute = sub.add_parser("reroute", help="send a running pipeline's later calls of a model elsewhere")
    reroute.add_argument("workflow_id", metavar="ID")
    reroute.add_argument("route", nargs="+", metavar="FROM=TO", help="model (or alias) to its new target")
    reroute.add_argument("--reason")
    reroute.add_argument("--by", help="who acts (default: your login name)")
    common(reroute)

    console = sub.add_parser(
        "console", help="serve the operator console (pipelines, approvals, routing, providers)"
    )
    console.add_argument("--host", help="listen address (env KERNELFLOW_CONSOLE_HOST, default 127.0.0.1)")
    console.add_argument("--port", type=int, help="port (env KERNELFLOW_CONSOLE_PORT, default 8500)")
    console.add_argument(
        "--hash-password",
        action="store_true",
        help="print a password hash for the users file (password on stdin)",
    )
    temporal_options(console)

"""The ``kernelflow`` command: worker, dev, run, watch, demo, providers, bridge, events."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from kernel.errors import ConfigurationError, FailureType, KernelflowError
from kernel.pipeline import PipelineSpec, load_pipeline
from worker.config import WorkerSettings, load_config
from worker.logs import configure_logging, log_fatal
from workflows.pipeline import PipelineResult, PipelineStatus

__all__ = ["main", "run"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_PIPELINE = REPO_ROOT / "examples" / "ticket-triage.yaml"
DEMO_INPUTS = {
    "ticket": "I was charged twice for my March invoice and the second charge is still pending. "
    "Please refund it before Friday, or I will have to dispute it with my bank.",
    "customer": "ACME Corp",
}
DEMO_FAULTS = [
    # The primary drafting model is in an outage: every call answers 503, so the step falls back.
    {"fault": "503", "model": "gpt-4.1", "retry_after": 0.2},
]


# --- progress ------------------------------------------------------------------------------------


class Progress:
    """Prints each step's transitions once, as a person reading a terminal wants them."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self.out = out
        self._seen: dict[str, tuple[str, str | None, int]] = {}

    def __call__(self, status: PipelineStatus) -> None:
        for step in status.steps:
            key = (step.status, step.model, len(step.failures))
            if self._seen.get(step.id) == key or step.status == "pending":
                continue
            previous = self._seen.get(step.id)
            self._seen[step.id] = key
            if (previous is not None and len(step.failures) > previous[2]) or (
                previous is None and step.failures
            ):
                for failure in step.failures[(previous[2] if previous else 0) :]:
                    self._line(
                        f"  ! {step.id:<14} {failure.model} failed: {failure.error_type}: {_short(failure.message)}"
                    )
            if step.status == "running":
                self._line(f"  … {step.id:<14} {step.model}")
            elif step.status == "completed":
                cost = "price unknown" if step.cost_usd is None else f"${step.cost_usd:.6f}"
                self._line(f"  ✓ {step.id:<14} {step.model}  {step.usage.total_tokens} tokens  {cost}")
            elif step.status in ("failed", "cancelled"):
                self._line(f"  ✗ {step.id:<14} {step.status}" + (f": {step.error}" if step.error else ""))

    def _line(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def _short(text: str, limit: int = 140) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _print_result(result: PipelineResult, *, as_json: bool) -> None:
    if as_json:
        print(result.model_dump_json(indent=2))
        return
    print(f"\npipeline {result.pipeline}: {result.status}" + (f" ({result.reason})" if result.reason else ""))
    for name, value in result.outputs.items():
        rendered = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        print(f"\n  {name}:\n    " + "\n    ".join(str(rendered).splitlines() or [""]))
    usage = result.usage
    print(
        f"\n  usage: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion = {usage.total_tokens} tokens"
        + (f" ({usage.cached_tokens} cached)" if usage.cached_tokens else "")
    )
    cost = f"${result.cost_usd:.6f}"
    if result.cost_unknown_models:
        cost += f" + unknown for {', '.join(result.cost_unknown_models)}"
    print(f"  cost:  {cost}")


# --- commands ------------------------------------------------------------------------------------


def _input_file(path: str) -> dict[str, Any]:
    """Inputs from a JSON or YAML file: for inputs too large (or too structured) for a command line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"--input-file {path!r} cannot be read: {exc.strerror}") from exc
    try:
        loaded = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"--input-file {path!r} is neither JSON nor YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigurationError(
            f"--input-file {path!r} must hold an object of input names to values, got {type(loaded).__name__}"
        )
    return loaded


def _parse_inputs(
    pairs: Sequence[str], raw_json: str | None, input_file: str | None = None
) -> dict[str, Any]:
    inputs: dict[str, Any] = _input_file(input_file) if input_file else {}
    if raw_json:
        try:
            loaded = json.loads(raw_json)
        except ValueError as exc:
            raise ConfigurationError(f"--input-json is not valid JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigurationError("--input-json must be a JSON object of input names to values")
        inputs.update(loaded)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigurationError(f"--input takes name=value, got {pair!r}")
        inputs[name] = value
    return inputs


def _coerce_inputs(spec: PipelineSpec, inputs: dict[str, Any]) -> dict[str, Any]:
    """``--input n=5`` arrives as text; convert it when the pipeline declares a non-string type."""
    coerced = dict(inputs)
    for name, value in inputs.items():
        declared = spec.inputs.get(name)
        if declared is None or declared.type == "string" or not isinstance(value, str):
            continue
        try:
            coerced[name] = json.loads(value)
        except ValueError:
            coerced[name] = value
    return coerced


async def _client(settings: WorkerSettings) -> Any:
    """A client on the connection profile (flags, environment, TOML), storing and encrypting payloads
    as the worker does (``payloads`` of the config file, the environment; ``kernelflow dev``'s key when
    run beside it)."""
    from worker.config import payload_settings_from_env
    from worker.connection import open_client, resolve_connection
    from worker.devkeys import discover_dev_keys

    payloads = discover_dev_keys(payload_settings_from_env(config_file=settings.config_file))
    return await open_client(resolve_connection(settings), payloads=payloads)


async def _cmd_run(args: argparse.Namespace) -> int:
    from worker.app import build_registry
    from worker.client import check_models, follow, start_pipeline, start_registered

    settings = WorkerSettings.from_env(**_overrides(args))
    given = _parse_inputs(args.input or [], args.input_json, args.input_file)
    if (args.pipeline is None) == (args.name is None):
        raise ConfigurationError("give a pipeline file, or --name of a pipeline registered on the worker")
    client = await _client(settings)
    if args.name is not None:
        handle = await start_registered(
            client, args.name, given, task_queue=settings.task_queue, version=args.version,
            workflow_id=args.id, tenant=args.tenant,
        )  # fmt: skip
    else:
        spec = load_pipeline(args.pipeline)
        inputs = _coerce_inputs(spec, given)
        spec.resolve_inputs(inputs)
        check_models(spec, build_registry(load_config(settings.config_file)))
        handle = await start_pipeline(
            client, spec, inputs, task_queue=settings.task_queue, workflow_id=args.id, tenant=args.tenant
        )
    print(f"started {handle.id} on task queue {settings.task_queue}", file=sys.stderr)
    if args.no_wait:
        print(handle.id)
        return 0
    result = await follow(handle, None if args.json else Progress())
    _print_result(result, as_json=args.json)
    return 0 if result.status == "completed" else 3


async def _cmd_watch(args: argparse.Namespace) -> int:
    from worker.watch import PipelineWatch, WatchError

    settings = WorkerSettings.from_env(**_overrides(args))
    client = await _client(settings)
    try:
        status = await PipelineWatch(client, args.workflow_id, as_json=args.json).run()
    except WatchError as exc:
        print(f"kernelflow: {exc}", file=sys.stderr)
        return 2
    return 0 if status == "completed" else 3


async def _cmd_worker(args: argparse.Namespace) -> int:
    from worker.app import run_worker

    try:
        settings = WorkerSettings.from_env(**_overrides(args))
    except ConfigurationError:
        fmt = os.environ.get("KERNELFLOW_LOG_FORMAT")
        configure_logging("json" if fmt == "json" else "console" if fmt == "console" else "auto")
        raise
    configure_logging(settings.log_format, settings.log_level)
    await run_worker(settings)
    return 0


def _cmd_providers(args: argparse.Namespace) -> int:
    from worker.app import build_registry

    settings = WorkerSettings.from_env()
    registry = build_registry(load_config(settings.config_file))
    rows = registry.describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'provider':<14} {'version':<8} {'api':<5} {'credentials':<34} capabilities")
    for row in rows:
        env = row["credentials_env"]
        creds = (
            "not needed"
            if env is None
            else (f"{env} set" if row["credentials_present"] else f"{env} MISSING")
        )
        api = "{}..{}".format(*row["kernel_api"])
        print(f"{row['name']:<14} {row['version']:<8} {api:<5} {creds:<34} {', '.join(row['capabilities'])}")
    if registry.aliases:
        print("\naliases: " + ", ".join(f"{k} -> {v}" for k, v in sorted(registry.aliases.items())))
    return 0


async def _cmd_dev(args: argparse.Namespace) -> int:
    from simulator.server import SimulatorServer
    from worker.app import build_registry, build_worker, connect, simulator_settings
    from worker.devserver import DevServer
    from worker.events_cli import dev_events
    from worker.observability import DevObservability
    from worker.pipelines import load_catalog, pipelines_dir
    from worker.search_attributes import ensure_search_attributes

    configure_logging("console", args.log_level)
    settings = WorkerSettings.from_env()
    stop = asyncio.Event()
    _on_signals(stop)
    sim = None if args.no_simulator else SimulatorServer(port=args.sim_port)
    codec = None
    try:
        overrides = simulator_settings(sim.start()) if sim is not None else None
        payloads, codec = _dev_encryption(
            args.state_dir, args.ui_port, settings.namespace, not args.no_encryption
        )
        async with DevServer(
            state_dir=args.state_dir, port=args.port, ui_port=args.ui_port,
            ui_codec_endpoint=codec.url if codec is not None else None,
        ) as server:  # fmt: skip
            ops = DevObservability(settings, metrics_port=args.metrics_port)
            client = await connect(
                server.target,
                settings.namespace,
                payloads=payloads,
                runtime=ops.runtime,
                interceptors=ops.interceptors(),
            )
            await ensure_search_attributes(client, settings.namespace)
            config = load_config(settings.config_file)
            registry = build_registry(config, provider_settings=overrides)
            catalog = load_catalog(pipelines_dir(config.pipelines_dir) or DEMO_PIPELINE.parent)
            events = dev_events(
                client, config, state_dir=args.state_dir, port=args.nats_port, task_queue=settings.task_queue,
                catalog=catalog,
            )  # fmt: skip
            async with events as embedded, build_worker(
                client, task_queue=settings.task_queue, llm_activities=ops.activities(registry, config),
                pipelines=catalog, events=embedded.publisher, shadow=config.shadow,
            ), ops.serving(client), _dev_console(
                args, client, registry, settings, server.ui_url, ops.url, embedded.broker_url
            ) as console_line:  # fmt: skip
                print(f"Temporal   {server.target}  (namespace {settings.namespace}, data {server.db_path})")
                print(f"Web UI     {server.ui_url}")
                _print_encryption(payloads, codec, args.state_dir)
                if sim is not None:
                    print(
                        f"Simulator  {sim.url}  (providers {', '.join(sorted(overrides or {}))} point here)"
                    )
                else:
                    print(
                        "Simulator  off: providers call the real clouds with the API keys in the environment"
                    )
                print(f"Worker     task queue {settings.task_queue}, providers: {', '.join(registry.names)}")
                print(f"Pipelines  registered by name: {', '.join(catalog.names) or 'none'}")
                print(f"Metrics    {ops.url}/metrics  (health: /healthz, /readyz)")
                print("\n".join(embedded.lines))
                if console_line:
                    print(console_line)
                print("Ctrl-C stops everything.", flush=True)
                await stop.wait()
            await registry.aclose()
    finally:
        if sim is not None:
            sim.stop()
        if codec is not None:
            codec.stop()
    return 0


def _dev_encryption(state_dir: str, ui_port: int, namespace: str, encrypt: bool) -> tuple[Any, Any]:
    """Payload settings of ``kernelflow dev``/``demo`` (encrypted by default, key under the state folder)
    and, when encrypting, the started codec server the Web UI decodes with."""
    from worker.codec_server import CodecServer, CodecServerSettings
    from worker.config import payload_settings_from_env
    from worker.devkeys import dev_payload_settings

    payloads = dev_payload_settings(payload_settings_from_env(), state_dir, encrypt=encrypt)
    if not payloads.encryption.enabled:
        return payloads, None
    # The dev Web UI sends no token: the codec server binds to loopback and accepts browsers only from
    # the Web UI's origin.
    origins = [f"http://127.0.0.1:{ui_port}", f"http://localhost:{ui_port}"]
    settings = CodecServerSettings(
        namespaces=[namespace], ui_origins=origins, authenticate=False, payloads=payloads
    )
    from worker.devserver import free_port

    codec = CodecServer(settings, port=free_port())  # below the ephemeral range Temporal picks from
    codec.start()
    return payloads, codec


def _print_encryption(payloads: Any, codec: Any, state_dir: str) -> None:
    from worker.devkeys import describe_encryption

    print(f"Encryption {describe_encryption(payloads)}")
    if codec is not None:
        print(
            f"Codec      {codec.url}  (decrypts for the Web UI; no token: loopback only, browsers only "
            "from the Web UI origin)"
        )
        keys = payloads.encryption.options.get("dir")
        if keys and Path(state_dir).resolve() != Path(".state").resolve():
            print(f"           other terminals: export KERNELFLOW_ENCRYPTION_KEYS_DIR={keys}")


@contextlib.asynccontextmanager
async def _dev_console(
    args: argparse.Namespace,
    client: Any,
    registry: Any,
    settings: WorkerSettings,
    ui_url: str | None,
    ops_url: str | None = None,
    broker_url: str | None = None,
) -> AsyncIterator[str | None]:
    """The operator console beside the dev stack; without a users file, a ``dev`` user is made."""
    if not args.console_port:
        yield None
        return
    from worker.console import create_app
    from worker.console.serve import ConsoleServer, dev_user, settings_from_env
    from worker.console.sources import ScrapedMetrics
    from worker.devserver import free_port

    made = None if os.environ.get("KERNELFLOW_CONSOLE_USERS") else dev_user()
    extra: dict[str, Any] = {}
    if ops_url and not (
        os.environ.get("KERNELFLOW_PROMETHEUS_URL") or os.environ.get("KERNELFLOW_METRICS_URLS")
    ):
        extra["metrics"] = ScrapedMetrics([f"{ops_url}/metrics"])
    console = settings_from_env(
        registry, namespace=settings.namespace, task_queue=settings.task_queue,
        users=made[0] if made else None, ui_url=os.environ.get("KERNELFLOW_TEMPORAL_UI_URL") or ui_url, **extra,
    )  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        if broker_url:  # the Events page reads the embedded broker
            from worker.console.broker_events import BrokerEvents
            from worker.events_cli import _broker, _events_config

            broker = await stack.enter_async_context(_broker(broker_url))
            events_config = _events_config(load_config(settings.config_file), broker_url)
            console.events = BrokerEvents(broker, events_config)
        server = await stack.enter_async_context(
            ConsoleServer(create_app(client, console), port=free_port(args.console_port))
        )
        sign_in = f"  (sign in as dev / {made[1]})" if made else ""
        yield f"Console    {server.url}{sign_in}"


async def _cmd_demo(args: argparse.Namespace) -> int:
    from simulator.core import SimulatorConfig
    from simulator.server import SimulatorServer
    from worker.app import build_registry, build_worker, connect, simulator_settings
    from worker.client import follow, start_pipeline, workflow_url
    from worker.devserver import DevServer, free_port

    configure_logging("console", "error")
    spec = load_pipeline(args.pipeline)
    port, ui_port = free_port(args.port), free_port(args.ui_port)
    print("Kernelflow demo: embedded Temporal server, LLM-cloud simulator and worker, all on 127.0.0.1")
    with SimulatorServer(config=SimulatorConfig(faults=list(DEMO_FAULTS))) as sim:
        payloads, codec = _dev_encryption(args.state_dir, ui_port, "default", not args.no_encryption)
        async with DevServer(
            state_dir=args.state_dir, port=port, ui_port=ui_port,
            ui_codec_endpoint=codec.url if codec is not None else None,
        ) as server:  # fmt: skip
            client = await connect(server.target, payloads=payloads)
            registry = build_registry(provider_settings=simulator_settings(sim.url))
            task_queue = "kernelflow-demo"
            async with build_worker(client, task_queue=task_queue, registry=registry):
                print(f"  Temporal {server.target} · Web UI {server.ui_url} · simulator {sim.url}")
                print(f"  simulated outage: {DEMO_FAULTS[0]['model']} answers 503 on every call")
                print(f"  payloads encrypted at rest: {'yes' if codec is not None else 'no'}\n")
                handle = await start_pipeline(client, spec, DEMO_INPUTS, task_queue=task_queue)
                print(f"pipeline {spec.name} started as workflow {handle.id}", flush=True)
                result = await follow(handle, Progress(sys.stdout))
            await registry.aclose()
            _print_result(result, as_json=False)
            calls = sim.stats()
            print(
                f"  simulator served {calls['requests']} calls ({calls['faults_injected']} of them injected faults)"
            )
            print(
                f"\n  Web UI of this run (while a server runs on this state, e.g. `kernelflow dev --ui-port {ui_port}`):"
            )
            print(f"    {workflow_url(server.ui_url or '', 'default', handle.id)}")
        if codec is not None:
            codec.stop()
    return 0 if result.status == "completed" else 3


async def _cmd_codec_server(args: argparse.Namespace) -> int:
    from worker.codec_server import serve_forever, settings_from_env

    configure_logging("console", "info")
    settings = settings_from_env(
        namespaces=args.namespace, ui_origins=args.ui_origin, verifier=args.verifier, no_auth=args.no_auth
    )
    await serve_forever(settings, host=args.host, port=args.port)
    return 0


async def _cmd_keys(args: argparse.Namespace) -> int:
    from worker.keys_cli import keys_command

    return await keys_command(args)


async def _cmd_events(args: argparse.Namespace) -> int:
    from worker.events_cli import run_command

    return await run_command(args)


def _ops_commands() -> dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]]:
    from worker import compare
    from worker.ops_cli import COMMANDS

    return {**COMMANDS, **compare.COMMANDS}


def _on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = {
        "address": "temporal_address",
        "namespace": "namespace",
        "task_queue": "task_queue",
        "config": "config_file",
        "profile": "profile",
        "metrics_port": "metrics_port",
        "shutdown_grace": "shutdown_grace_s",
    }
    return {
        target: getattr(args, src) for src, target in keys.items() if getattr(args, src, None) is not None
    }


# --- entry point ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kernelflow", description="Durable LLM pipelines on Temporal.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def temporal_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", help="Temporal frontend (env TEMPORAL_ADDRESS, default localhost:7233)")
        p.add_argument("--namespace", help="Temporal namespace (env TEMPORAL_NAMESPACE, default default)")
        p.add_argument("--task-queue", help="task queue (env KERNELFLOW_TASK_QUEUE, default kernelflow)")
        p.add_argument("--config", help="YAML config file (env KERNELFLOW_CONFIG)")
        p.add_argument(
            "--profile", help="Temporal connection profile, as the temporal CLI's (env TEMPORAL_PROFILE)"
        )

    worker = sub.add_parser("worker", help="run a worker against a Temporal server")
    temporal_options(worker)
    worker.add_argument(
        "--metrics-port",
        type=int,
        help="serve /metrics, /healthz, /readyz here (env KERNELFLOW_METRICS_PORT)",
    )
    worker.add_argument(
        "--shutdown-grace", type=float, help="seconds in-flight work may take after SIGTERM (default 20)"
    )

    dev = sub.add_parser("dev", help="embedded Temporal dev server + simulator + worker, until Ctrl-C")
    dev.add_argument("--port", type=int, default=7233)
    dev.add_argument("--ui-port", type=int, default=8233)
    dev.add_argument("--sim-port", type=int, default=8400)
    dev.add_argument("--metrics-port", type=int, default=9464, help="/metrics, /healthz, /readyz")
    dev.add_argument("--state-dir", default=".state")
    dev.add_argument(
        "--no-simulator", action="store_true", help="call the real clouds (keys from the environment)"
    )
    dev.add_argument("--log-level", default="info")
    dev.add_argument(
        "--no-encryption", action="store_true", help="store payloads in clear (encrypted by default)"
    )
    dev.add_argument("--console-port", type=int, default=8500, help="operator console port (0: no console)")

    run = sub.add_parser("run", help="start a pipeline, show its progress, print its outputs")
    run.add_argument("pipeline", nargs="?", help="pipeline YAML file")
    run.add_argument("--name", help="instead of a file: a pipeline registered on the worker")
    run.add_argument("--version", type=int, help="with --name: that version (default: the newest)")
    run.add_argument("--input", action="append", metavar="NAME=VALUE", help="an input (repeatable)")
    run.add_argument("--input-json", metavar="JSON", help="inputs as a JSON object")
    run.add_argument(
        "--input-file",
        metavar="PATH",
        help="inputs from a JSON or YAML file (--input-json and --input add to it)",
    )
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument(
        "--id",
        help="workflow id (default: pipeline name + random suffix); never encrypted: no personal data in it",
    )
    run.add_argument(
        "--tenant",
        help="tenant, searchable in the Web UI as KernelflowTenant (never encrypted); with per-tenant keys "
        "the workflow id starts with tenant/<tenant>/",
    )
    run.add_argument("--no-wait", action="store_true", help="print the workflow id and return at once")
    temporal_options(run)

    watch = sub.add_parser(
        "watch", help="follow a running (or finished) pipeline: streamed answers live, then its status"
    )
    watch.add_argument("workflow_id", metavar="WORKFLOW_ID")
    watch.add_argument("--json", action="store_true", help="one JSON event per line")
    watch.add_argument("--address", help="Temporal frontend (env TEMPORAL_ADDRESS, default localhost:7233)")
    watch.add_argument("--namespace", help="Temporal namespace (env TEMPORAL_NAMESPACE, default default)")
    watch.add_argument("--profile", help="Temporal connection profile (env TEMPORAL_PROFILE)")

    demo = sub.add_parser("demo", help="run the example pipeline on embedded everything, then stop")
    demo.add_argument("--pipeline", default=str(DEMO_PIPELINE))
    demo.add_argument("--port", type=int, default=7233)
    demo.add_argument("--ui-port", type=int, default=8233)
    demo.add_argument("--state-dir", default=".state")
    demo.add_argument(
        "--no-encryption", action="store_true", help="store payloads in clear (encrypted by default)"
    )

    codec = sub.add_parser(
        "codec-server", help="decrypt payloads for the Web UI and `temporal --codec-endpoint` (remote codec)"
    )
    codec.add_argument("--host", default="127.0.0.1")
    codec.add_argument("--port", type=int, default=8081)
    codec.add_argument("--ui-origin", action="append", help="Web UI origin allowed by CORS (repeatable)")
    codec.add_argument("--namespace", action="append", help="namespace served (repeatable; default default)")
    codec.add_argument("--verifier", help="module:callable(token, namespace) -> bool checking access tokens")
    codec.add_argument(
        "--no-auth", action="store_true", help="no token (loopback only): for a local dev set-up"
    )

    from worker.keys_cli import add_keys_parser

    add_keys_parser(sub)

    providers = sub.add_parser("providers", help="list provider plugins, capabilities and credentials")
    providers.add_argument("--json", action="store_true")

    from worker.events_cli import add_commands as add_event_commands

    add_event_commands(sub, temporal_options)
    dev.add_argument("--nats-port", type=int, default=4222, help="embedded NATS JetStream server")

    from worker import ops_cli

    ops_cli.add_parsers(sub, temporal_options)
    from worker import compare

    compare.add_parsers(sub, temporal_options)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        if args.command == "providers":
            return _cmd_providers(args)
        handler = {
            "worker": _cmd_worker,
            "dev": _cmd_dev,
            "run": _cmd_run,
            "watch": _cmd_watch,
            "demo": _cmd_demo,
            "codec-server": _cmd_codec_server,
            "keys": _cmd_keys,
            "bridge": _cmd_events,
            "events": _cmd_events,
            **_ops_commands(),
        }[args.command]
        return asyncio.run(handler(args))
    except KeyboardInterrupt:
        return 130
    except KernelflowError as exc:
        if not log_fatal(str(exc)):
            print(f"kernelflow: {exc}", file=sys.stderr)
        return 2
    except WorkflowFailureError as exc:
        cause = exc.cause
        while (
            isinstance(cause, BaseException)
            and cause.__cause__ is not None
            and not isinstance(cause, ApplicationError)
        ):
            cause = cause.__cause__
        if isinstance(cause, ApplicationError) and cause.type in FailureType.__members__.values():
            print(f"kernelflow: pipeline failed ({cause.type}): {cause.message}", file=sys.stderr)
        else:
            print(f"kernelflow: pipeline failed: {cause}", file=sys.stderr)
        return 3
    except (OSError, RuntimeError) as exc:
        if not log_fatal(str(exc)):
            print(f"kernelflow: {exc}", file=sys.stderr)
        return 1


def run() -> None:
    """Console-script entry: ``main()``, then exit without interpreter teardown.

    The Temporal client's native threads can outlive the event loop and abort CPython's finalization
    (temporalio/sdk-python#300). Every resource is closed by then, so streams are flushed and the
    process ends at once with the command's exit code.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()

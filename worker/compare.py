"""``kernelflow compare``: recorded runs' model inputs re-run against a candidate model.

Closed pipeline runs are found through Temporal's visibility (``--query``, ``--since``); each run's
history is read with the client's data converter, so encrypted and externally stored payloads are read
as the worker wrote them. Every ``llm_chat`` activity in it (input: the ``ChatRequest``; result: the
answer, usage, cost and latency; or the failure) is one model input. Each input is sent to the
candidate through the worker's registry (providers and prices from the config), rate limited and with
bounded concurrency, and stored as a ``ShadowPair`` (source ``compare``) whose id is derived from the
run, the event and the candidate: running the command again adds nothing new.

Only runs the server still keeps are found: histories older than the namespace's retention are gone.
Calls made as local activities record no input in the history and are counted as skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.service import RPCError

from kernel.contracts import ChatRequest, ChatResponse
from kernel.errors import ConfigurationError, KernelflowError, error_type
from kernel.pricing import PriceTable
from kernel.registry import Registry
from kernel.shadow import ShadowPair, ShadowSide, ShadowStore, request_digest
from kernel.shadow_report import judge_output, output_schema_of
from worker.shadow_sealer import CodecSealer

__all__ = [
    "CodecSealer",
    "CompareStats",
    "RecordedCall",
    "add_parsers",
    "compare_command",
    "open_shadow_store",
    "parse_rate",
    "parse_since",
    "payload_codec",
    "recorded_calls",
    "report_command",
    "run_compare",
    "visibility_query",
]

LLM_CHAT = "llm_chat"
_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*$")
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}


# --- arguments ------------------------------------------------------------------------------------


def parse_since(value: str | None) -> timedelta | None:
    """``7d``, ``12h``, ``30m``, ``90s``, ``2w`` as a duration; a clear error otherwise."""
    if value is None:
        return None
    found = _SINCE.match(value)
    if found is None or float(found.group(1)) <= 0:
        raise ConfigurationError(
            f"--since {value!r} is not a duration: give a positive number and a unit, one of "
            "s, m, h, d, w (e.g. 7d, 12h, 30m)"
        )
    return timedelta(**{_UNITS[found.group(2)]: float(found.group(1))})


def parse_rate(value: str) -> float:
    """``5/s``, ``60/m``, ``1000/h`` or a plain number (per second) as calls per second."""
    found = _RATE.match(value)
    if found is None or float(found.group(1)) <= 0:
        raise ConfigurationError(
            f"--rate {value!r} is not a rate: give a positive number of calls per s, m or h (e.g. 5/s, 60/m)"
        )
    return float(found.group(1)) / _PER[found.group(2) or "s"]


def visibility_query(query: str | None, since: timedelta | None, *, now: datetime | None = None) -> str:
    """Closed pipeline runs (those that continued as new too), closed within ``since``, matching ``query``."""
    parts = ["WorkflowType = 'PipelineWorkflow'", "ExecutionStatus != 'Running'"]
    if since is not None:
        start = (now or datetime.now(UTC)) - since
        parts.append(f"CloseTime >= '{start.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}'")
    if query and query.strip():
        parts.append(f"({query.strip()})")
    return " AND ".join(parts)


# --- the store, its pairs sealed with the payload codec (worker/shadow_sealer.py) --------------------


def open_shadow_store(url: str | None, codec: Any) -> ShadowStore:
    """The store ``url`` names, else the one the worker writes to (``KERNELFLOW_SHADOW_STORE``, then
    ``shadow.store`` in ``KERNELFLOW_CONFIG``'s file, then the default), sealing with ``codec`` when it
    encrypts."""
    from worker.config import load_config
    from worker.shadow_store import open_store
    from worker.shadow_worker import shadow_store_url

    if url is None:
        path = os.environ.get("KERNELFLOW_CONFIG")
        url = shadow_store_url(load_config(Path(path) if path else None).shadow)
    return open_store(url, sealer=CodecSealer.of(codec))


def payload_codec(config_file: Any) -> Any:
    """The payload codec the worker and the CLI use (config file, environment, ``kernelflow dev``'s key)."""
    from worker.config import payload_settings_from_env
    from worker.devkeys import discover_dev_keys
    from worker.storage import build_codec

    return build_codec(discover_dev_keys(payload_settings_from_env(config_file=config_file)))


# --- reading histories ----------------------------------------------------------------------------


@dataclass
class RecordedCall:
    """One ``llm_chat`` activity of a recorded run: its input and what the primary answered."""

    workflow_id: str
    run_id: str
    event_id: int
    pipeline: str
    step_id: str
    tenant: str | None
    request: ChatRequest
    primary: ShadowSide
    completed_at: datetime


@dataclass
class _Activity:
    event_id: int
    scheduled_at: datetime
    payloads: list[Payload]
    started_at: datetime | None = None


async def recorded_calls(
    client: Client, workflow_id: str, run_id: str, *, pipeline: str | None = None, tenant: str | None = None
) -> tuple[list[RecordedCall], int]:
    """The closed ``llm_chat`` calls of one run, and how many local-activity calls were skipped."""
    from activities.llm import LlmCallInput, LlmCallResult

    converter = client.data_converter
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    scheduled: dict[int, _Activity] = {}
    calls: list[RecordedCall] = []
    skipped = 0
    async for event in handle.fetch_history_events():
        kind = event.event_type
        when = event.event_time.ToDatetime(tzinfo=UTC)
        if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attrs = event.activity_task_scheduled_event_attributes
            if attrs.activity_type.name == LLM_CHAT:
                scheduled[event.event_id] = _Activity(event.event_id, when, list(attrs.input.payloads))
            continue
        if kind == EventType.EVENT_TYPE_MARKER_RECORDED:
            if _is_local_llm_call(event.marker_recorded_event_attributes):
                skipped += 1
            continue
        if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started = scheduled.get(event.activity_task_started_event_attributes.scheduled_event_id)
            if started is not None:
                started.started_at = when
            continue
        closing = _closing(event)
        if closing is None:
            continue
        scheduled_id, outcome = closing
        activity = scheduled.pop(scheduled_id, None)
        if activity is None:
            continue
        (call,) = await converter.decode(activity.payloads, [LlmCallInput])
        begun = activity.started_at or activity.scheduled_at
        measured = (when - begun).total_seconds() * 1000
        if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            (result,) = await converter.decode(list(outcome.result.payloads), [LlmCallResult])
            primary = _answer(result.model_ref, result.response, call.request, result.cost_usd)
            primary.latency_ms = result.latency_ms
        else:
            primary = await _primary_failure(converter, call.model, event, kind, measured)
        calls.append(
            RecordedCall(
                workflow_id=workflow_id,
                run_id=run_id,
                event_id=activity.event_id,
                pipeline=call.pipeline or pipeline or "",
                step_id=call.step_id,
                tenant=tenant,
                request=call.request,
                primary=primary,
                completed_at=when,
            )
        )
    return calls, skipped


def _is_local_llm_call(attrs: Any) -> bool:
    if attrs.marker_name != "core_local_activity":
        return False
    data = attrs.details.get("data")
    if data is None or not data.payloads:
        return False
    try:
        return bool(json.loads(data.payloads[0].data).get("activity_type") == LLM_CHAT)
    except ValueError:
        return False


def _closing(event: Any) -> tuple[int, Any] | None:
    kind = event.event_type
    if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
        attrs = event.activity_task_completed_event_attributes
    elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED:
        attrs = event.activity_task_failed_event_attributes
    elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT:
        attrs = event.activity_task_timed_out_event_attributes
    elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED:
        attrs = event.activity_task_canceled_event_attributes
    else:
        return None
    return int(attrs.scheduled_event_id), attrs


async def _primary_failure(
    converter: Any, model: str, event: Any, kind: int, latency_ms: float
) -> ShadowSide:
    if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED:
        return ShadowSide(model=model, error_type="Cancelled", error="cancelled", latency_ms=latency_ms)
    if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT:
        failure = event.activity_task_timed_out_event_attributes.failure
    else:
        failure = event.activity_task_failed_event_attributes.failure
    try:
        exc = await converter.decode_failure(failure)
        message = str(exc)
    except Exception:  # a failure that cannot be read still counts as a failure
        message = failure.message
    info = failure.application_failure_info
    kind_name = info.type if failure.HasField("application_failure_info") and info.type else "Timeout"
    if failure.HasField("timeout_failure_info"):
        kind_name = "Timeout"
    return ShadowSide(model=model, error_type=kind_name, error=message, latency_ms=latency_ms)


def _answer(model: str, response: ChatResponse, request: ChatRequest, cost: float | None) -> ShadowSide:
    text: str | None = response.text
    if not text and response.tool_calls:  # tools are never run: their choice is the answer
        text = json.dumps(
            [{"name": c.function.name, "arguments": c.function.arguments} for c in response.tool_calls],
            sort_keys=True,
        )
    structured, valid = judge_output(text, request.model_dump(mode="json", exclude_none=True))
    return ShadowSide(
        model=model,
        output=text,
        structured=structured,
        valid=valid,
        prompt_tokens=response.usage.prompt_tokens,
        completion_tokens=response.usage.completion_tokens,
        cost_usd=cost,
    )


# --- asking the candidate -------------------------------------------------------------------------


class _RateLimiter:
    """At most ``per_second`` starts per second, evenly spaced."""

    def __init__(self, per_second: float) -> None:
        self._interval = 1.0 / per_second
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            now = time.monotonic()
            delay = self._next - now
            self._next = max(now, self._next) + self._interval
        if delay > 0:
            await asyncio.sleep(delay)


async def ask_candidate(
    registry: Registry,
    prices: PriceTable,
    candidate: str,
    request: ChatRequest,
    *,
    retries: int = 2,
    backoff: float = 1.0,
) -> ShadowSide:
    """One call to the candidate, tools never run. A retryable failure (rate limited, overloaded, a
    server error) is tried again up to ``retries`` times after its Retry-After or ``backoff`` doubling,
    so the comparison's own pace does not count against the candidate; the last failure is recorded on
    the side, never raised. The latency is the successful (or last) attempt's."""
    for attempt in range(retries + 1):
        started = time.perf_counter()
        try:
            provider, model_name = registry.resolve(candidate)
            prepared = provider.prepare_chat(request.model_copy(update={"model": model_name}))
            provider.check_chat(prepared.request)
            response = await provider.chat(prepared.request)
            break
        except KernelflowError as exc:
            if exc.retryable and attempt < retries:
                await asyncio.sleep(getattr(exc, "retry_after", None) or backoff * 2**attempt)
                continue
            return ShadowSide(
                model=candidate,
                error_type=error_type(exc),
                error=str(exc),
                latency_ms=(time.perf_counter() - started) * 1000,
            )
    latency = (time.perf_counter() - started) * 1000
    ref = f"{provider.name}/{model_name}"
    side = _answer(ref, response, request, prices.cost(provider.name, model_name, response.usage))
    side.latency_ms = latency
    return side


def pair_id(call: RecordedCall, candidate: str) -> str:
    key = f"compare|{call.workflow_id}|{call.run_id}|{call.event_id}|{candidate}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _pair(call: RecordedCall, candidate: ShadowSide, candidate_ref: str) -> ShadowPair:
    request = call.request.model_dump(mode="json", exclude_none=True, by_alias=True)
    request.pop("model", None)
    _, schema = output_schema_of(request)
    return ShadowPair(
        id=pair_id(call, candidate_ref),
        source="compare",
        recorded_at=call.completed_at,
        pipeline=call.pipeline,
        step_id=call.step_id,
        workflow_id=call.workflow_id,
        run_id=call.run_id,
        tenant=call.tenant,
        request_digest=request_digest(request),
        request=request,
        output_schema=schema,
        primary=call.primary,
        candidate=candidate,
    )


@dataclass
class CompareStats:
    runs: int = 0
    calls: int = 0
    skipped_local: int = 0
    already: int = 0
    asked: int = 0
    candidate_errors: dict[str, int] = field(default_factory=dict)
    stored: int = 0


class _Progress:
    """A live line on a terminal (redrawn in place); a line every 10% otherwise."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out, self.total, self.done, self.errors = out, total, 0, 0
        self.tty = out.isatty()
        self._started = time.monotonic()
        self._shown = -1

    def step(self, failed: bool) -> None:
        self.done += 1
        self.errors += int(failed)
        tenth = self.done * 10 // max(self.total, 1)
        if self.tty or tenth != self._shown or self.done == self.total:
            self._shown = tenth
            self._draw()

    def _draw(self) -> None:
        width = 24
        filled = width * self.done // max(self.total, 1)
        rate = self.done / max(time.monotonic() - self._started, 1e-6)
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} calls · "
            f"{self.errors} candidate error{'s' if self.errors != 1 else ''} · {rate:.1f}/s"
        )
        if self.tty:
            print("\r" + line, end="\n" if self.done == self.total else "", file=self.out, flush=True)
        else:
            print(line, file=self.out, flush=True)


async def run_compare(
    client: Client,
    store: ShadowStore,
    registry: Registry,
    *,
    candidate: str,
    prices: PriceTable | None = None,
    query: str | None = None,
    since: timedelta | None = None,
    step_id: str | None = None,
    rate: float = 5.0,
    concurrency: int = 4,
    retries: int = 2,
    limit: int | None = None,
    out: TextIO = sys.stderr,
) -> CompareStats:
    """Find closed runs, read their model inputs and store one pair per input with the candidate's
    answer. Inputs whose pair is already stored are not sent again."""
    prices = prices or PriceTable()
    ref = registry.resolve_ref(candidate)
    candidate_ref = f"{ref.provider}/{ref.model}"
    stats = CompareStats()
    runs = [run async for run in _runs(client, visibility_query(query, since), limit)]
    stats.runs = len(runs)
    reading = asyncio.Semaphore(8)

    async def read(
        run_id: str, workflow_id: str, pipeline: str | None, tenant: str | None
    ) -> list[RecordedCall]:
        async with reading:
            found, skipped = await recorded_calls(
                client, workflow_id, run_id, pipeline=pipeline, tenant=tenant
            )
        stats.skipped_local += skipped
        return [c for c in found if step_id is None or c.step_id == step_id]

    calls = [call for found in await asyncio.gather(*(read(*run) for run in runs)) for call in found]
    stats.calls = len(calls)
    known = {p.id for p in store.pairs(candidate=candidate_ref, source="compare")}
    todo = [c for c in calls if pair_id(c, candidate_ref) not in known]
    stats.already = len(calls) - len(todo)
    print(
        f"{stats.runs} closed run{'s' if stats.runs != 1 else ''}, {stats.calls} model call"
        f"{'s' if stats.calls != 1 else ''}"
        + (f" ({stats.already} already compared)" if stats.already else "")
        + (
            f", {stats.skipped_local} local-activity call{'s' if stats.skipped_local != 1 else ''} skipped (no input in history)"
            if stats.skipped_local
            else ""
        )
        + f"; asking {candidate_ref} at most {rate:g}/s, {concurrency} at a time",
        file=out,
        flush=True,
    )
    limiter = _RateLimiter(rate)
    gate = asyncio.Semaphore(concurrency)
    progress = _Progress(out, len(todo))

    async def one(call: RecordedCall) -> None:
        async with gate:
            await limiter.wait()
            side = await ask_candidate(registry, prices, candidate, call.request, retries=retries)
        if not side.ok:
            kind = side.error_type or "Error"
            stats.candidate_errors[kind] = stats.candidate_errors.get(kind, 0) + 1
        stats.asked += 1
        added = await asyncio.to_thread(store.add, [_pair(call, side, candidate_ref)])
        stats.stored += added  # read after the await: calls finish concurrently
        progress.step(not side.ok)

    await asyncio.gather(*(one(call) for call in todo))
    return stats


async def _runs(
    client: Client, query: str, limit: int | None
) -> AsyncIterator[tuple[str, str, str | None, str | None]]:
    from workflows import search_attributes as sa

    try:
        async for execution in client.list_workflows(query, limit=limit):
            attrs = execution.typed_search_attributes
            yield execution.run_id, execution.id, attrs.get(sa.PIPELINE), attrs.get(sa.TENANT)
    except RPCError as exc:
        raise ConfigurationError(
            f"the visibility query was refused: {exc.message}\n  query: {query}"
        ) from exc


# --- the commands ---------------------------------------------------------------------------------


def _check_candidate(registry: Registry, prices: PriceTable, candidate: str, allow_unknown: bool) -> None:
    from kernel.errors import UnknownProvider

    try:
        ref = registry.resolve_ref(candidate)
    except UnknownProvider as exc:
        raise ConfigurationError(f"--candidate {candidate!r}: {exc}") from exc
    if prices.lookup(ref.provider, ref.model) is None and not allow_unknown:
        raise ConfigurationError(
            f"--candidate {candidate!r}: model {ref.model!r} is not in the model catalog or the config's "
            f"prices for provider {ref.provider!r} (its cost would be unknown); check the name, add its "
            "price under prices: in the config, or pass --allow-unknown-model"
        )


async def compare_command(args: argparse.Namespace) -> int:
    from worker.app import build_registry
    from worker.config import WorkerSettings, load_config
    from worker.ops_cli import _client, _overrides

    since = parse_since(args.since)
    rate = parse_rate(args.rate)
    if args.concurrency < 1:
        raise ConfigurationError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.retries < 0:
        raise ConfigurationError(f"--retries must be 0 or more, got {args.retries}")
    settings = WorkerSettings.from_env(**_overrides(args))
    config = load_config(settings.config_file)
    registry = build_registry(config)
    prices = PriceTable().with_overrides({p: dict(m) for p, m in config.prices.items()})
    _check_candidate(registry, prices, args.candidate, args.allow_unknown_model)
    client = await _client(args)
    store = open_shadow_store(args.store, client.data_converter.payload_codec)
    print(
        "Only runs the Temporal server still keeps are compared: histories past the namespace's "
        "retention are gone.",
        file=sys.stderr,
    )
    try:
        stats = await run_compare(
            client, store, registry, candidate=args.candidate, prices=prices, query=args.query, since=since,
            step_id=args.step, rate=rate, concurrency=args.concurrency, retries=args.retries, limit=args.limit,
        )  # fmt: skip
    finally:
        await registry.aclose()
        store.close()
    errors = ", ".join(f"{k} {v}" for k, v in sorted(stats.candidate_errors.items())) or "none"
    print(
        f"stored {stats.stored} new pair{'s' if stats.stored != 1 else ''} "
        f"({stats.asked} candidate call{'s' if stats.asked != 1 else ''}, errors: {errors}); "
        "`kernelflow report` shows them"
    )
    return 0


async def report_command(args: argparse.Namespace) -> int:
    from worker.report import report_command as run

    return await run(args)


def add_parsers(sub: Any, temporal_options: Callable[[argparse.ArgumentParser], None]) -> None:
    compare = sub.add_parser(
        "compare", help="re-run recorded runs' model inputs against a candidate model; pairs to the store"
    )
    compare.add_argument("--candidate", required=True, metavar="PROVIDER/MODEL", help="the model to compare")
    compare.add_argument(
        "--query", help="visibility filter of the runs, e.g. \"KernelflowPipeline = 'ticket-triage'\""
    )
    compare.add_argument("--since", help="runs closed within this duration: 7d, 12h, 30m (default: all kept)")
    compare.add_argument("--step", metavar="ID", help="only the calls of this step")
    compare.add_argument("--rate", default="5/s", help="candidate calls per second (5/s, 60/m; default 5/s)")
    compare.add_argument("--concurrency", type=int, default=4, help="candidate calls in flight (default 4)")
    compare.add_argument(
        "--retries", type=int, default=2, help="tries again of a retryable candidate failure (default 2)"
    )
    compare.add_argument("--limit", type=int, help="at most this many runs")
    compare.add_argument(
        "--store", help="shadow store URL (env KERNELFLOW_SHADOW_STORE, default sqlite:///.state/shadow.db)"
    )
    compare.add_argument(
        "--allow-unknown-model", action="store_true", help="compare a model the catalog does not price"
    )
    temporal_options(compare)

    report = sub.add_parser(
        "report", help="compare candidates with primaries per step, from the stored pairs"
    )
    report.add_argument("--candidate", metavar="PROVIDER/MODEL", help="only this candidate")
    report.add_argument("--pipeline", help="only this pipeline")
    report.add_argument("--step", metavar="ID", help="only this step")
    report.add_argument(
        "--source", choices=["shadow", "compare"], help="only pairs from live shadowing or compare"
    )
    report.add_argument("--since", help="pairs recorded within this duration: 7d, 12h, 30m")
    report.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report here")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument(
        "--embed-model", metavar="PROVIDER/MODEL", help="also score similarity with this embedding model"
    )
    report.add_argument("--store", help="shadow store URL (env KERNELFLOW_SHADOW_STORE)")
    temporal_options(report)


COMMANDS = {"compare": compare_command, "report": report_command}

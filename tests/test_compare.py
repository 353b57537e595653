"""``kernelflow compare`` and ``kernelflow report`` as a person runs them: a separate ``kernelflow worker``
process with encryption on, pipelines started with ``kernelflow run``, then the two commands, against the
real Temporal dev server and the simulator (which serves the candidate, failing it for some inputs).
The HTML report is opened in Debian's chromium: no console errors, no requests, one chart per expected
chart with a non-zero size, and every figure equal to the one computed here from the stored pairs.
"""

from __future__ import annotations

import base64
import os
import shutil
import sqlite3
import statistics
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from kernel.shadow import ShadowPair
from simulator.server import SimulatorServer
from worker.codec import KernelflowCodec
from worker.compare import CodecSealer, parse_rate, parse_since, visibility_query
from worker.keys import EnvKeyProvider
from worker.shadow_store import SqliteShadowStore

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "examples" / "ticket-triage.yaml"
CANDIDATE = "anthropic/claude-sonnet-4-5"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TICKETS = [
    "My invoice for March shows the wrong VAT number.",
    "Please refund the duplicate charge on my card.",
    "The export button crashes the app on Safari.",
    "I need a refund for the unused seats of last month.",
    "How do I add a second admin to our account?",
    # over the payload threshold (64 KiB): the worker keeps it in its payload store, outside the history
    "The dashboard is slow. " * 3200 + "It times out on the monthly view.",
]
BIG = len(TICKETS) - 1
FAILING_WORD = "refund"  # the candidate answers 500 to every input that mentions it
PRIMARY_FAILS_ON = "VAT"


def _kernelflow() -> str:
    found = shutil.which("kernelflow")
    assert found, "the kernelflow console script is not installed (make setup)"
    return found


def _cli(
    env: dict[str, str], cwd: Path, *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_kernelflow(), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def recorded(
    temporal_target: str, simulator_server: SimulatorServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Five ticket-triage runs recorded by a separate encrypting worker process, then compared once."""
    sim = simulator_server
    sim.reset()
    sim.add_faults(
        [
            {"fault": "500", "model": "claude-sonnet-4-5", "match": FAILING_WORD},
            # the primary drafting model fails on one ticket: the step falls back to openai/gpt-4o
            {"fault": "500", "model": "gpt-4.1", "match": PRIMARY_FAILS_ON},
        ]
    )
    home = tmp_path_factory.mktemp("compare")
    queue = f"compare-{uuid.uuid4().hex[:8]}"
    key = base64.b64encode(os.urandom(32)).decode()
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    env = {
        **base,
        "TEMPORAL_ADDRESS": temporal_target,
        "KERNELFLOW_TASK_QUEUE": queue,
        "OPENAI_BASE_URL": f"{sim.url}/v1",
        "OPENAI_API_KEY": "sim-key",
        "ANTHROPIC_BASE_URL": sim.url,
        "ANTHROPIC_API_KEY": "sim-key",
        "KERNELFLOW_ENCRYPTION_KEYS": f"k1={key}",
        "KERNELFLOW_SHADOW_STORE": f"sqlite:///{home}/shadow.db",
        "KERNELFLOW_LOG_FORMAT": "json",
    }
    log = (home / "worker.log").open("wb")
    worker = subprocess.Popen(
        [_kernelflow(), "worker"], env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        runs = []
        for n, ticket in enumerate(TICKETS):
            done = _cli(env, home, "run", str(PIPELINE), "--input", f"ticket={ticket}", "--input", f"customer=C{n}",
                        "--id", f"{queue}-{n}", "--json")  # fmt: skip
            assert done.returncode == 0, f"run {n} failed: {done.stderr}\n{(home / 'worker.log').read_text()}"
            runs.append(f"{queue}-{n}")
        query = f"KernelflowPipeline = 'ticket-triage' AND TaskQueue = '{queue}'"
        first = _cli(env, home, "compare", "--candidate", CANDIDATE, "--query", query, "--since", "1h",
                     "--rate", "50/s")  # fmt: skip
        assert first.returncode == 0, first.stderr
        asked = sim.stats()["by_model"].get("claude-sonnet-4-5", 0)
        yield {"env": env, "home": home, "queue": queue, "runs": runs, "query": query, "first": first, "sim": sim, "asked": asked,
               "key": key}  # fmt: skip
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()


def _store(recorded: dict[str, Any]) -> SqliteShadowStore:
    keys = EnvKeyProvider(environ={"KERNELFLOW_ENCRYPTION_KEYS": f"k1={recorded['key']}"})
    return SqliteShadowStore(
        recorded["home"] / "shadow.db", sealer=CodecSealer.of(KernelflowCodec(provider=keys))
    )


def _pairs(recorded: dict[str, Any]) -> list[ShadowPair]:
    store = _store(recorded)
    try:
        return store.pairs()
    finally:
        store.close()


async def test_histories_are_encrypted_and_compare_reads_them_through_the_converter(
    recorded: dict[str, Any], client: Client
) -> None:
    # The session's client has no key: what the server holds of an llm_chat input is ciphertext.
    handle = client.get_workflow_handle(recorded["runs"][0])
    inputs = [
        e.activity_task_scheduled_event_attributes.input.payloads[0]
        async for e in handle.fetch_history_events()
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == "llm_chat"
    ]
    assert inputs and all(p.metadata["encoding"] == b"binary/encrypted" for p in inputs)
    assert b"VAT" not in b"".join(p.data for p in inputs)
    big = client.get_workflow_handle(recorded["runs"][BIG])
    stored = [
        e.activity_task_scheduled_event_attributes.input.payloads[0]
        async for e in big.fetch_history_events()
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    references = [
        p for p in stored if p.metadata.get("messageType", b"").endswith(b"ExternalStorageReference")
    ]
    assert references, [p.metadata for p in stored]
    assert all(len(p.data) < 4096 for p in stored)  # the big ticket is not in the history

    pairs = _pairs(recorded)
    # three llm steps per run, and the failed call of the draft that fell back
    assert len(pairs) == len(TICKETS) * 3 + 1, recorded["first"].stderr
    (failed,) = [p for p in pairs if not p.primary.ok]
    assert (failed.step_id, failed.primary.model, failed.primary.error_type) == (
        "draft", "openai/gpt-4.1", "UpstreamError"
    )  # fmt: skip
    assert failed.primary.error and "500" in failed.primary.error  # the failure's message was decrypted
    assert PRIMARY_FAILS_ON in str(failed.request)
    fallback = [
        p for p in pairs if p.step_id == "draft" and p.workflow_id == failed.workflow_id and p.primary.ok
    ]
    assert [p.primary.model for p in fallback] == ["openai/gpt-4o"]
    every, pairs = pairs, [p for p in pairs if p is not failed]
    assert {(p.pipeline, p.source, p.candidate.model) for p in pairs} == {
        ("ticket-triage", "compare", CANDIDATE)
    }
    assert {p.step_id for p in pairs} == {"classify", "draft", "crm_note"}
    assert {p.workflow_id for p in pairs} == set(recorded["runs"])
    classify = [p for p in pairs if p.step_id == "classify"]
    # the inputs were read: the ticket text is in the stored request, the primary's answer and usage too
    assert sorted(TICKETS) == sorted(next(t for t in TICKETS if t in str(p.request)) for p in classify)
    for pair in pairs:
        assert pair.primary.ok and pair.primary.output and pair.primary.prompt_tokens
        assert pair.primary.latency_ms is not None and pair.primary.latency_ms > 0
        assert pair.primary.model.startswith("openai/")
        assert pair.request is not None and "model" not in pair.request
    for pair in classify:
        assert pair.output_schema is not None and pair.primary.valid is True
    # The candidate failed for every input that mentions the word, and answered the others.
    for pair in pairs:
        mentions = FAILING_WORD in str(pair.request)
        assert (not pair.candidate.ok) == mentions, (pair.step_id, pair.candidate)
        if mentions:
            assert pair.candidate.error_type == "UpstreamError" and pair.candidate.error
        else:
            assert pair.candidate.output and pair.candidate.cost_usd is not None
    # a retryable failure was tried twice more before it was recorded (--retries 2 by default)
    failing = sum(not p.candidate.ok for p in every)
    assert recorded["asked"] == (len(every) - failing) + 3 * failing
    assert "candidate error" in recorded["first"].stderr and "closed runs" in recorded["first"].stderr
    assert "retention" in recorded["first"].stderr

    # Encrypted at rest: the store's rows are sealed and hold no prompt in clear.
    with sqlite3.connect(recorded["home"] / "shadow.db") as db:
        rows = db.execute("SELECT sealed, body FROM shadow_pairs").fetchall()
    assert rows and all(sealed == 1 and b"VAT" not in body and b"Safari" not in body for sealed, body in rows)


def test_running_compare_again_adds_nothing_and_asks_the_candidate_nothing(recorded: dict[str, Any]) -> None:
    before = _pairs(recorded)
    asked = recorded["sim"].stats()["by_model"].get("claude-sonnet-4-5", 0)
    again = _cli(
        recorded["env"], recorded["home"], "compare", "--candidate", CANDIDATE, "--query", recorded["query"]
    )
    assert again.returncode == 0, again.stderr
    assert "stored 0 new pairs" in again.stdout
    assert f"({len(before)} already compared)" in again.stderr
    after = _pairs(recorded)
    assert sorted(p.id for p in after) == sorted(p.id for p in before)
    assert recorded["sim"].stats()["by_model"].get("claude-sonnet-4-5", 0) == asked


def test_bad_input_fails_fast_naming_what_is_wrong(recorded: dict[str, Any]) -> None:
    env, home = recorded["env"], recorded["home"]
    cases = [
        (["--candidate", "nocloud/model-x"], "no provider named 'nocloud'"),
        (["--candidate", "anthropic/claude-made-up"], "not in the model catalog"),
        (["--candidate", CANDIDATE, "--since", "a week"], "--since 'a week' is not a duration"),
        (["--candidate", CANDIDATE, "--rate", "fast"], "--rate 'fast' is not a rate"),
        (
            ["--candidate", CANDIDATE, "--query", "KernelflowPipeline === 'x' AND ("],
            "visibility query was refused",
        ),
    ]
    for args, message in cases:
        done = _cli(env, home, "compare", *args, timeout=60)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    assert parse_since("7d") is not None and parse_since("7d").days == 7  # type: ignore[union-attr]
    assert parse_rate("120/m") == 2.0
    assert "CloseTime >=" in visibility_query("x = 'y'", parse_since("1h"))


def _expected(pairs: list[ShadowPair]) -> dict[str, dict[str, Any]]:
    """Each step's figures, computed here from the pairs without the kernel's report."""
    figures: dict[str, dict[str, Any]] = {}
    pairs = [p for p in pairs if p.candidate.model == CANDIDATE]
    for step in sorted({p.step_id for p in pairs}):
        group = [p for p in pairs if p.step_id == step]
        both = [p for p in group if p.primary.error_type is None and p.candidate.error_type is None]
        row: dict[str, Any] = {"pairs": len(group), "both_answered": len(both), "answered": both}
        row["exact_match"] = sum(p.primary.output == p.candidate.output for p in both) / len(both)
        for side in ("primary", "candidate"):
            sides = [getattr(p, side) for p in group]
            lat = [s.latency_ms for s in sides]
            cuts = statistics.quantiles(lat, n=100, method="inclusive")
            costs = [s.cost_usd for s in sides if s.error_type is None and s.cost_usd is not None]
            checked = [s.valid for s in sides if s.error_type is None and s.valid is not None]
            row[side] = {
                "error_rate": sum(s.error_type is not None for s in sides) / len(sides),
                "latency_p50_ms": cuts[49],
                "latency_p95_ms": cuts[94],
                "cost_per_call_usd": statistics.fmean(costs) if costs else None,
                "valid_share": (sum(checked) / len(checked)) if checked else None,
            }
        figures[f"ticket-triage/{step}/{CANDIDATE}"] = row
    return figures


def _similarity(sim_url: str, pairs: list[ShadowPair]) -> float:
    import openai

    sdk = openai.OpenAI(base_url=f"{sim_url}/v1", api_key="sim-key")
    scores = []
    for pair in pairs:
        got = sdk.embeddings.create(
            model="text-embedding-3-small", input=[pair.primary.output, pair.candidate.output]
        )
        a, b = (item.embedding for item in got.data)
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        scores.append(dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5))
    return statistics.fmean(scores)


def test_the_terminal_report_shows_each_step(recorded: dict[str, Any]) -> None:
    done = _cli(recorded["env"], recorded["home"], "report", "--pipeline", "ticket-triage", timeout=60)
    assert done.returncode == 0, done.stderr
    for step in ("classify", "draft", "crm_note"):
        assert f"ticket-triage · {step} → {CANDIDATE}" in done.stdout
    assert "latency p95" in done.stdout and "UpstreamError" in done.stdout


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (`make browser` installs it as root)"
)
async def test_the_html_report_renders_its_charts_and_the_pairs_figures_in_a_browser(
    recorded: dict[str, Any],
) -> None:
    from playwright.async_api import async_playwright

    html = recorded["home"] / "report.html"
    done = _cli(recorded["env"], recorded["home"], "report", "--html", str(html), "--candidate", CANDIDATE,
                "--embed-model", "openai/text-embedding-3-small", timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = _expected(_pairs(recorded))
    for row in expected.values():  # similarity through the simulator's embeddings, by the vendor's SDK
        row["similarity"] = _similarity(recorded["sim"].url, row["answered"])
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            page = await browser.new_page(viewport={"width": 1366, "height": 860})
            problems: list[str] = []
            requests: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            await page.goto(html.as_uri())
            await page.wait_for_load_state("load")
            assert problems == []
            assert requests == [html.as_uri()], f"the report fetched more than itself: {requests}"
            charts = await page.eval_on_selector_all(
                "svg.chart",
                "els => els.map(e => [e.dataset.chart, e.getBoundingClientRect().width, "
                "e.getBoundingClientRect().height, e.querySelectorAll('rect').length])",
            )
            names = sorted(c[0] for c in charts)
            steps = sorted(expected)
            assert names == sorted(
                ["agreement", *(f"latency:{k}" for k in steps), *(f"cost:{k}" for k in steps)]
            )
            assert all(w > 0 and h > 0 and bars > 0 for _, w, h, bars in charts), charts
            for key, row in expected.items():
                section = page.locator(f'section[data-step="{key}"]')
                shown = await section.evaluate(
                    "s => Array.from(s.querySelectorAll('[data-metric]')).map(e => "
                    "[e.dataset.side || '', e.dataset.metric, e.dataset.value, e.textContent])"
                )
                values = {(side, metric): (value, text) for side, metric, value, text in shown}
                assert int(values[("", "pairs")][0]) == row["pairs"]
                assert int(values[("", "both_answered")][0]) == row["both_answered"]
                assert float(values[("", "exact_match")][0]) == pytest.approx(row["exact_match"])
                assert values[("", "exact_match")][1] == f"{row['exact_match'] * 100:.1f}%"
                assert float(values[("", "similarity")][0]) == pytest.approx(
                    row["similarity"], rel=1e-4, abs=1e-6
                )
                for side in ("primary", "candidate"):
                    for metric, want in row[side].items():
                        value, text = values[(side, metric)]
                        if want is None:
                            assert value == "" and text == "—", (key, side, metric, value)
                        else:
                            assert float(value) == pytest.approx(want), (key, side, metric)
                    p50 = row[side]["latency_p50_ms"]
                    assert values[(side, "latency_p50_ms")][1] == f"{p50:.0f} ms"
            await page.set_viewport_size(
                {"width": 390, "height": 844}
            )  # a phone: nothing wider than the screen
            overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"the report is {overflow}px wider than a phone's screen"
            await page.set_viewport_size({"width": 1366, "height": 860})
            target = os.environ.get("KERNELFLOW_SCREENSHOTS")
            if target:
                await page.screenshot(path=str(Path(target) / "shadow-report.png"), full_page=True)
        finally:
            await browser.close()


def test_compare_of_one_step_against_another_candidate(recorded: dict[str, Any]) -> None:
    done = _cli(recorded["env"], recorded["home"], "compare", "--candidate", "openai/gpt-4o", "--step", "classify",
                "--query", recorded["query"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    store = _store(recorded)
    try:
        added = store.pairs(candidate="openai/gpt-4o")
        assert len(store.pairs(candidate=CANDIDATE)) == len(TICKETS) * 3 + 1
    finally:
        store.close()
    assert len(added) == len(TICKETS) and {p.step_id for p in added} == {"classify"}
    assert all(p.candidate.ok and p.candidate.valid is True for p in added)

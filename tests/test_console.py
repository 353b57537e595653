"""The operator console end to end: a real Temporal dev server, the simulator, a worker, the console
over HTTP, and Debian's chromium driven by Playwright. Roles and CSRF are also tested by posting
straight to the endpoints, not only through hidden buttons.

With ``KERNELFLOW_SCREENSHOTS=<dir>`` (``make screenshots``) the pages are saved there at a laptop and
a phone width."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from structlog.testing import capture_logs
from temporalio.client import Client, WorkflowHandle

from kernel.pipeline import parse_pipeline
from simulator.server import SimulatorServer
from worker.app import build_registry, build_worker, simulator_settings
from worker.client import list_pipelines, start_pipeline, status
from worker.config import KernelflowConfig
from worker.console import ConsoleSettings, create_app
from worker.console.auth import User, Users, hash_password
from worker.console.serve import ConsoleServer
from worker.devserver import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PASSWORD = "correct horse battery staple"
T = TypeVar("T")

REVIEWED = {
    "name": "reviewed-reply",
    "inputs": {"customer": {"type": "string"}},
    "steps": [
        {"id": "draft", "model": "openai/gpt-4o-mini", "prompt": "Draft a reply to {{ inputs.customer }}"},
        {
            "id": "review",
            "type": "approval",
            "message": "Send this reply to {{ inputs.customer }}?",
            "timeout_s": 3600,
            "approvers": ["ada"],
        },
        {"id": "send", "model": "openai/gpt-4.1", "prompt": "Format for sending: {{ steps.draft.output }}"},
    ],
}


async def _until(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], what: str, within: float = 30
) -> T:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = await probe()
        if ok(value):
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not seen within {within:g}s (last: {value!r})")
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
async def stack(client: Client, simulator_server: SimulatorServer) -> AsyncIterator[dict[str, Any]]:
    config = KernelflowConfig(
        aliases={"fast": "openai/gpt-4o-mini", "careful": "anthropic/claude-sonnet-4-5"}
    )
    registry = build_registry(config, provider_settings=simulator_settings(simulator_server.url))
    queue = f"console-{uuid.uuid4().hex[:8]}"
    users = Users(
        users=[
            User(name="ada", roles=["operator", "approver"], password_hash=hash_password(PASSWORD)),
            User(name="otto", roles=["operator"], password_hash=hash_password(PASSWORD)),
            User(name="vic", roles=["viewer"], password_hash=hash_password(PASSWORD)),
        ]
    )
    settings = ConsoleSettings(
        users=users, secret=os.urandom(32), task_queue=queue, ui_url="http://127.0.0.1:8233",
        describe_providers=registry.describe, aliases=lambda: dict(registry.aliases),
    )  # fmt: skip
    async with (
        build_worker(client, task_queue=queue, registry=registry),
        ConsoleServer(create_app(client, settings), port=free_port()) as server,
    ):
        yield {"url": server.url, "queue": queue, "client": client}
    await registry.aclose()


async def _start_reviewed(stack: dict[str, Any], customer: str = "Dana") -> WorkflowHandle[Any, Any]:
    handle = await start_pipeline(
        stack["client"],
        parse_pipeline(REVIEWED),
        {"customer": customer},
        task_queue=stack["queue"],
        tenant="acme",
    )
    await _until(
        lambda: list_pipelines(stack["client"], awaiting="review", running=True),
        lambda found: handle.id in [p.workflow_id for p in found],
        "the approval in visibility",
    )
    return handle


async def _sign_in(http: httpx.AsyncClient, name: str, password: str = PASSWORD) -> str:
    """Sign in over HTTP; returns the session's CSRF token as the pages carry it."""
    form = await http.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token is not None
    done = await http.post("/login", data={"csrf": token.group(1), "username": name, "password": password})
    assert done.status_code == 303, done.text
    page = await http.get("/approvals")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    return csrf.group(1)


# --- straight to the endpoints --------------------------------------------------------------------


async def test_roles_and_csrf_are_enforced_on_every_endpoint(stack: dict[str, Any]) -> None:
    client: Client = stack["client"]
    handle = await _start_reviewed(stack)
    decide = {"workflow_id": handle.id, "step_id": "review", "decision": "approve", "comment": "ok"}
    posts: list[tuple[str, dict[str, str], str]] = [
        ("/approvals/decide", decide, "approver"),
        ("/routing/move", {"source": "openai/gpt-4.1", "target": "fast"}, "operator"),
        (f"/pipelines/{handle.id}/control", {"action": "pause"}, "operator"),
        ("/providers/check", {"model": "fast"}, "operator"),
        ("/events/replay", {"id": "x"}, "operator"),
    ]
    async with httpx.AsyncClient(base_url=stack["url"]) as anonymous:
        for path, data, _ in posts:
            assert (await anonymous.post(path, data=data)).status_code == 401
        assert (await anonymous.get("/approvals")).status_code == 303  # to the sign-in page
        # The sign-in form has its own token: a post without it is refused.
        await anonymous.get("/login")
        refused = await anonymous.post("/login", data={"username": "ada", "password": PASSWORD})
        assert refused.status_code == 403 and "CSRF" in refused.text
        token = re.search(r'name="csrf" value="([^"]+)"', (await anonymous.get("/login")).text)
        assert token is not None
        wrong = await anonymous.post(
            "/login", data={"csrf": token.group(1), "username": "ada", "password": "nope"}
        )
        assert wrong.status_code == 400 and "unknown user or wrong password" in wrong.text

    async with (
        httpx.AsyncClient(base_url=stack["url"]) as vic,
        httpx.AsyncClient(base_url=stack["url"]) as otto,
        httpx.AsyncClient(base_url=stack["url"]) as ada,
    ):
        vic_csrf = await _sign_in(vic, "vic")
        otto_csrf = await _sign_in(otto, "otto")
        ada_csrf = await _sign_in(ada, "ada")
        # A viewer may post nothing, even with a valid token.
        for path, data, role in posts:
            answer = await vic.post(path, data={**data, "csrf": vic_csrf})
            assert answer.status_code == 403, path
            assert f"lacks the {role} role" in answer.text
        # An operator may not decide approvals.
        answer = await otto.post("/approvals/decide", data={**decide, "csrf": otto_csrf})
        assert answer.status_code == 403 and "lacks the approver role" in answer.text
        # The approver: no token, a wrong token, another session's token: all refused.
        for token in (None, "forged", vic_csrf):
            data = dict(decide) if token is None else {**decide, "csrf": token}
            answer = await ada.post("/approvals/decide", data=data)
            assert answer.status_code == 403 and "CSRF" in answer.text
        # Nothing changed: the approval still waits, and the pipeline is not paused.
        state = await status(client, handle.id)
        assert [a.status for a in state.approvals] == ["waiting"] and not state.paused
        # A changed session cookie is no session.
        cookie = ada.cookies["kf_session"]
        async with httpx.AsyncClient(
            base_url=stack["url"], cookies={"kf_session": cookie[:-2] + "xx"}
        ) as forged:
            assert (await forged.get("/approvals")).status_code == 303
        # The approver with the token decides; the decision names her, in the pipeline and in the log.
        with capture_logs() as logs:
            answer = await ada.post("/approvals/decide", data={**decide, "csrf": ada_csrf})
        assert answer.status_code == 303
        logged = [e for e in logs if e["event"] == "console.decision"]
        assert logged and logged[0]["by"] == "ada" and logged[0]["workflow_id"] == handle.id
        result = await handle.result()
        assert result.status == "completed"
        review = (await status(client, handle.id)).approvals[0]
        assert (review.status, review.by, review.comment) == ("approved", "ada", "ok")
        # A decided approval cannot be decided again: the refusal is reported, not a crash.
        again = await ada.post("/approvals/decide", data={**decide, "csrf": ada_csrf}, follow_redirects=True)
        assert "refused" in again.text
        # Bad input: a rejection without a comment gets a message next to the field.
        other = await _start_reviewed(stack, "Eve")
        bad = await ada.post(
            "/approvals/decide",
            data={"workflow_id": other.id, "step_id": "review", "decision": "reject", "csrf": ada_csrf},
        )
        assert bad.status_code == 400 and "say why you reject" in bad.text
        assert [a.status for a in (await status(client, other.id)).approvals] == ["waiting"]
        # Sign-out is a form too.
        assert (await ada.post("/logout", data={})).status_code == 403
        assert (await ada.post("/logout", data={"csrf": ada_csrf})).status_code == 303
        await other.cancel()


async def test_operator_pauses_resumes_and_cancels_a_pipeline(stack: dict[str, Any]) -> None:
    client: Client = stack["client"]
    handle = await _start_reviewed(stack, "Pat")
    path = f"/pipelines/{handle.id}/control"
    async with httpx.AsyncClient(base_url=stack["url"]) as vic:
        await _sign_in(vic, "vic")
        assert 'value="pause"' not in (await vic.get(f"/pipelines/{handle.id}")).text  # a viewer gets no form
    async with httpx.AsyncClient(base_url=stack["url"]) as otto:
        csrf = await _sign_in(otto, "otto")
        page = (await otto.get(f"/pipelines/{handle.id}")).text
        assert 'value="pause"' in page and 'value="cancel"' in page
        done = await otto.post(path, data={"csrf": csrf, "action": "pause"}, follow_redirects=True)
        assert "pause: applied" in done.text
        state = await status(client, handle.id)
        assert state.paused and state.pause_reason == "pause by otto from the console"
        done = await otto.post(
            path, data={"csrf": csrf, "action": "resume", "reason": "all clear"}, follow_redirects=True
        )
        assert "resume: applied" in done.text and not (await status(client, handle.id)).paused
        bad = await otto.post(path, data={"csrf": csrf, "action": "explode"})
        assert bad.status_code == 400 and "pause, resume, cancel" in bad.text
        done = await otto.post(
            path, data={"csrf": csrf, "action": "cancel", "reason": "customer left"}, follow_redirects=True
        )
        assert "cancel: applied" in done.text
        assert (await handle.result()).status == "cancelled"
        # A check through a provider whose key the worker lacks shows the error type, not a crash.
        checked = await otto.post("/providers/check", data={"csrf": csrf, "model": "echo/echo-1"})
        result = re.search(r'<div class="check-result bad" id="check-result">(.*?)</div>', checked.text, re.S)
        assert checked.status_code == 200 and result is not None, checked.text[-800:]
        assert "<b>MissingCredentials</b>" in result.group(1) and "ECHO_API_KEY" in result.group(1)
        # Without an event broker the Events page says so, and a replay is reported as impossible.
        events = await otto.get("/events")
        assert events.status_code == 200 and "No event broker is connected" in events.text
        replay = await otto.post("/events/replay", data={"csrf": csrf, "id": "1"}, follow_redirects=True)
        assert "not replayed: no event broker is configured" in replay.text
        # A finished pipeline refuses, and the page says why instead of failing.
        again = await otto.post(path, data={"csrf": csrf, "action": "pause"}, follow_redirects=True)
        assert "pause refused" in again.text or "pause: not applied" in again.text


async def test_moving_all_of_a_providers_running_work(stack: dict[str, Any]) -> None:
    client: Client = stack["client"]
    handle = await _start_reviewed(stack, "Quinn")
    async with httpx.AsyncClient(base_url=stack["url"]) as otto:
        csrf = await _sign_in(otto, "otto")
        counted = (await otto.get("/routing", params={"source": "openai"})).text
        assert handle.id in counted and "openai/gpt-4.1" in counted
        moved = await otto.post("/routing/move", data={"csrf": csrf, "source": "openai", "target": "careful"})
        assert moved.status_code == 200
        row = re.search(rf"{handle.id}</a></td><td>(.*?)</tr>", moved.text, re.S)
        assert row is not None and "moved" in row.group(1) and "openai/gpt-4.1 → careful" in row.group(1)
        missing = await otto.post("/routing/move", data={"csrf": csrf, "source": "", "target": "careful"})
        assert missing.status_code == 400 and "name a model (provider/model) or a provider" in missing.text
    state = await status(client, handle.id)
    assert state.routes == {"openai/gpt-4.1": "careful"} and state.reroutes[-1].by == "otto"
    await handle.cancel()


# --- in a real browser ----------------------------------------------------------------------------

browser_only = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (`make browser` installs it when run as root)",
)

LAPTOP = {"width": 1366, "height": 860}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (`make browser` installs it when run as root)")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield browser
        finally:
            await browser.close()


async def _page_as(browser: Any, stack: dict[str, Any], name: str, viewport: dict[str, int] = LAPTOP) -> Any:
    context = await browser.new_context(viewport=viewport, base_url=stack["url"])
    page = await context.new_page()
    await page.goto("/approvals")
    assert "/login" in page.url  # signed out: sent to sign in first, and back afterwards
    await page.fill("#username", name)
    await page.fill("#password", PASSWORD)
    await page.click("button[type=submit]")
    await page.wait_for_url("**/approvals")
    return page


async def _shoot(page: Any, name: str) -> None:
    """At a laptop and a phone width: nothing wider than the screen; saved for the docs on request."""
    target = os.environ.get("KERNELFLOW_SCREENSHOTS")
    for label, viewport in (("laptop", LAPTOP), ("phone", PHONE)):
        await page.set_viewport_size(viewport)
        overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{name} at {label} width is {overflow}px wider than the screen"
        hidden = await page.evaluate(
            "Array.from(document.querySelectorAll('table')).filter(t => t.parentElement.scrollWidth > "
            "t.parentElement.clientWidth + 1).map(t => t.id || t.className)"
        )
        assert not hidden, f"{name} at {label} width: tables {hidden} need sideways scrolling"
        if target:
            await page.screenshot(path=str(Path(target) / f"{name}-{label}.png"), full_page=True)
    await page.set_viewport_size(LAPTOP)


@browser_only
async def test_approver_signs_in_checks_a_provider_and_approves_from_the_inbox(
    stack: dict[str, Any], browser: Any
) -> None:
    client: Client = stack["client"]
    page = await _page_as(browser, stack, "ada")

    # Providers: plugins with versions, credentials as set or missing, never the secret.
    await page.click("nav >> text=Providers")
    openai = page.locator("tr[data-provider=openai]")
    await openai.wait_for()
    assert "OPENAI_API_KEY set" in await openai.inner_text()
    assert "sk-" not in await page.content()
    # A check of a bad model name gets its message next to the field; a good one runs on the worker.
    await page.fill("#check input[name=model]", "gpt-4o")
    await page.click("#check button")
    assert "provider/model or an alias" in await page.locator("#model-error").inner_text()
    await page.fill("#check input[name=model]", "fast")
    await page.click("#check button")
    result = await page.locator("#check-result").inner_text()
    assert result.startswith("OK") and "openai/gpt-4o-mini" in result
    await _shoot(page, "providers")

    # The inbox: the approval with its message, its draft and the time left.
    handle = await _start_reviewed(stack, "Dana")
    await page.click("nav >> text=Approvals")
    card = page.locator(f"article.approval[data-workflow='{handle.id}']")
    await card.wait_for()
    text = await card.inner_text()
    assert "Send this reply to Dana?" in text
    assert "Draft from draft" in text
    assert re.search(r"(59m|1h 0m) \d*s? ?left", text) or "59m" in text, text
    await _shoot(page, "approvals")

    # Rejecting without a comment: a message next to the comment, nothing decided.
    await card.locator("button[value=reject]").click()
    card = page.locator(f"article.approval[data-workflow='{handle.id}']")
    assert "say why you reject" in await card.locator(".field-error").inner_text()
    # Approve with a comment.
    await card.locator("textarea").fill("Looks right, send it.")
    await card.locator("button[value=approve]").click()
    assert "approved by ada" in await page.locator(".notice").inner_text()
    assert (await handle.result()).status == "completed"

    # The pipeline's page: completed, every step, tokens, cost, and the decision attributed.
    await page.goto(f"/pipelines/{handle.id}")
    assert "completed" in await page.locator(".head .badge").first.inner_text()
    steps = await page.locator("#steps").inner_text()
    assert "draft" in steps and "review" in steps and "send" in steps and "openai/gpt-4.1" in steps
    assert int((await page.locator("#tokens").inner_text()).replace(",", "")) > 0
    decision = await page.locator("#decisions").inner_text()
    assert "approved" in decision and "ada" in decision and "Looks right, send it." in decision
    link = page.locator("a", has_text="Temporal Web UI")
    assert (
        await link.get_attribute("href") == f"http://127.0.0.1:8233/namespaces/default/workflows/{handle.id}"
    )
    await _shoot(page, "pipeline")

    # The list finds it by tenant and pipeline.
    await page.goto("/pipelines?tenant=acme&pipeline=reviewed-reply")
    await page.locator(f"#pipelines a[href='/pipelines/{handle.id}']").wait_for()
    await _shoot(page, "pipelines")
    state = await status(client, handle.id)
    assert state.approvals[0].by == "ada"
    await page.context.close()


@browser_only
async def test_operator_moves_running_work_from_the_routing_page(stack: dict[str, Any], browser: Any) -> None:
    client: Client = stack["client"]
    handles = [await _start_reviewed(stack, f"Customer {n}") for n in range(2)]
    ids = {h.id for h in handles}
    page = await _page_as(browser, stack, "ada")
    await page.click("nav >> text=Routing")
    assert "careful" in await page.locator("#aliases").inner_text()

    # Count first: both running pipelines may still call openai/gpt-4.1 (their "send" step).
    await page.fill("#count input[name=source]", "openai/gpt-4.1")
    await page.click("text=Count matching pipelines")
    count = int(await page.locator("#match-count b").inner_text())
    assert count >= 2

    # A target the worker cannot call: every pipeline refuses, each with why; nothing moved.
    await page.fill("#move input[name=target]", "nosuch/model")
    await page.fill("#move input[name=reason]", "test a bad target")
    await page.click("#move button")
    report = page.locator("#report")
    rows = await report.locator("tbody tr").all_inner_texts()
    mine = [r for r in rows if any(i in r for i in ids)]
    assert len(mine) == 2 and all("refused" in r and "nosuch" in r for r in mine), rows
    for h in handles:
        assert (await status(client, h.id)).routes == {}

    # An unknown alias is refused next to the field before anything is sent.
    await page.fill("#move input[name=target]", "no-such-alias")
    await page.click("#move button")
    assert "neither provider/model nor an alias" in await page.locator("#target-error").inner_text()

    # The alias: every matching pipeline moves, and records who moved it and why.
    await page.fill("#move input[name=target]", "careful")
    await page.fill("#move input[name=reason]", "openai outage drill")
    await page.click("#move button")
    rows = await page.locator("#report tbody tr").all_inner_texts()
    mine = [r for r in rows if any(i in r for i in ids)]
    assert len(mine) == 2 and all("moved" in r for r in mine), rows
    await _shoot(page, "routing")
    for h in handles:
        state = await status(client, h.id)
        assert state.routes == {"openai/gpt-4.1": "careful"}
        assert state.reroutes[-1].by == "ada" and state.reroutes[-1].reason == "openai outage drill"
        await h.cancel()
    await page.context.close()


@browser_only
async def test_viewer_cannot_approve_and_a_form_without_its_token_is_refused(
    stack: dict[str, Any], browser: Any
) -> None:
    client: Client = stack["client"]
    handle = await _start_reviewed(stack, "Vera")
    viewer = await _page_as(browser, stack, "vic", PHONE)
    card = viewer.locator(f"article.approval[data-workflow='{handle.id}']")
    await card.wait_for()
    assert await card.locator("button").count() == 0
    assert "needs the approver role" in await card.inner_text()
    await viewer.context.close()

    # The approver's form with its token removed (as a forged cross-site form would be): refused.
    page = await _page_as(browser, stack, "ada")
    card = page.locator(f"article.approval[data-workflow='{handle.id}']")
    await card.locator("input[name=csrf]").evaluate("el => el.remove()")
    await card.locator("textarea").fill("sneaky")
    await card.locator("button[value=approve]").click()
    await page.wait_for_load_state()
    assert "CSRF token missing or wrong" in await page.content()
    assert [a.status for a in (await status(client, handle.id)).approvals] == ["waiting"]
    await handle.cancel()
    await page.context.close()


@browser_only
async def test_a_running_steps_tokens_show_as_they_stream(stack: dict[str, Any], browser: Any) -> None:
    reply = " ".join(f"word{n}" for n in range(30))
    spec = parse_pipeline(
        {
            "name": "streamed",
            "steps": [
                {"id": "story", "model": "openai/gpt-4o-mini", "stream": True,
                 "prompt": f'[[sim: token_delay=0.15 reply="{reply}"]] tell'},
                {"id": "hold", "type": "approval"},
            ],
        }
    )  # fmt: skip
    handle = await start_pipeline(stack["client"], spec, {}, task_queue=stack["queue"])
    page = await _page_as(browser, stack, "vic")
    await page.goto(f"/pipelines/{handle.id}")
    story = page.locator("#live [data-step=story] pre")
    seen: list[str] = []

    async def text() -> str:
        current = await story.inner_text() if await story.count() else ""
        if current and (not seen or seen[-1] != current):
            seen.append(current)
        return current

    await _until(text, lambda t: t.strip() == reply, "the whole streamed reply", within=60)
    # It arrived in pieces while the step ran, each a beginning of the reply.
    assert len(seen) > 2 and all(reply.startswith(t.strip()) for t in seen), seen
    await handle.cancel()
    await page.context.close()

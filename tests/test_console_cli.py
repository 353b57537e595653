"""The console and the operating commands as a user meets them: ``kernelflow dev`` in its own process
prints the console's address and a sign-in; ``kernelflow console`` runs beside it with a users file;
``kernelflow ls``, ``status``, ``reroute``, ``approve``, ``reject``, ``pause``, ``resume`` and ``cancel``
drive a pipeline from the terminal."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from worker.devserver import free_port

REPO = Path(__file__).resolve().parent.parent

PIPELINE = {
    "name": "cli-reviewed",
    "inputs": {"who": {"type": "string"}},
    "steps": [
        {"id": "draft", "model": "openai/gpt-4o-mini", "prompt": "Draft for {{ inputs.who }}"},
        {"id": "review", "type": "approval", "message": "Send it to {{ inputs.who }}?"},
        {"id": "send", "model": "openai/gpt-4.1", "prompt": "Send {{ steps.draft.output }}"},
    ],
}


def _kf(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kernelflow", *args], capture_output=True, text=True, timeout=60, env=env, cwd=REPO, input=stdin
    )


def _wait_line(process: subprocess.Popen[str], marker: str, within: float = 90) -> str:
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            return "".join(lines)
    raise AssertionError(f"{marker!r} not printed:\n{''.join(lines)}")


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    state = tmp_path_factory.mktemp("console-dev")
    env = {**os.environ, "KERNELFLOW_TASK_QUEUE": "console-cli"}
    env.pop("KERNELFLOW_CONSOLE_USERS", None)
    port = free_port()
    process = subprocess.Popen(
        ["kernelflow", "dev", "--port", str(port), "--ui-port", str(free_port()), "--sim-port", str(free_port()),
         "--console-port", str(free_port()), "--state-dir", str(state), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    try:
        banner = _wait_line(process, "Ctrl-C stops everything")
        found = re.search(r"Console\s+(http://\S+)\s+\(sign in as dev / (\S+)\)", banner)
        nats = re.search(r"NATS\s+(nats://\S+)", banner)
        assert found and nats, banner
        pipeline = state / "reviewed.yaml"
        pipeline.write_text(yaml.safe_dump(PIPELINE))
        # kernelflow dev encrypts with a key under its state folder: commands beside it use that key.
        yield {
            **env, "KERNELFLOW_ENCRYPTION_KEYS_DIR": str(state / "keys"), "TEMPORAL_ADDRESS": f"127.0.0.1:{port}",
            "NATS": nats.group(1), "CONSOLE": found.group(1), "DEV_PASSWORD": found.group(2), "PIPELINE": str(pipeline), "STATE": str(state),
        }  # fmt: skip
    finally:
        _stop(process)


def _sign_in(http: httpx.Client, name: str, password: str) -> str:
    token = re.search(r'name="csrf" value="([^"]+)"', http.get("/login").text)
    assert token is not None
    done = http.post("/login", data={"csrf": token.group(1), "username": name, "password": password})
    assert done.status_code == 303, done.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', http.get("/approvals").text)
    assert csrf is not None
    return csrf.group(1)


def _start(env: dict[str, str], who: str) -> str:
    started = _kf("run", env["PIPELINE"], "--input", f"who={who}", "--no-wait", env=env)
    assert started.returncode == 0, started.stderr
    return started.stdout.strip()


def _until_awaiting(env: dict[str, str], workflow_id: str) -> list[dict[str, object]]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listed = _kf("ls", "--awaiting", "review", "--state", "running", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        rows: list[dict[str, object]] = json.loads(listed.stdout)
        if any(r["workflow_id"] == workflow_id for r in rows):
            return rows
        time.sleep(0.3)
    raise AssertionError(f"{workflow_id} never listed as awaiting review")


def test_dev_serves_the_console_with_a_printed_sign_in(dev: dict[str, str]) -> None:
    with httpx.Client(base_url=dev["CONSOLE"]) as http:
        _sign_in(http, "dev", dev["DEV_PASSWORD"])
        page = http.get("/providers")
        assert page.status_code == 200 and "openai" in page.text
        assert page.headers["x-frame-options"] == "DENY"
        # The Events page reads the embedded event broker.
        events = http.get("/events").text
        assert "Dead letters" in events and "No event broker is connected" not in events


def test_operating_commands_drive_a_pipeline_from_the_terminal(dev: dict[str, str]) -> None:
    env = dev
    workflow_id = _start(env, "Kim")
    _until_awaiting(env, workflow_id)

    table = _kf("ls", "--pipeline", "cli-reviewed", env=env)
    assert table.returncode == 0 and table.stdout.startswith("WORKFLOW ID") and workflow_id in table.stdout

    rerouted = _kf(
        "reroute",
        workflow_id,
        "openai/gpt-4.1=openai/gpt-4o-mini",
        "--reason",
        "drill",
        "--by",
        "ops",
        "--json",
        env=env,
    )
    assert rerouted.returncode == 0, rerouted.stderr
    assert json.loads(rerouted.stdout) == {"openai/gpt-4.1": "openai/gpt-4o-mini"}
    bad = _kf("reroute", workflow_id, "openai/gpt-4.1", env=env)
    assert bad.returncode == 2 and "FROM=TO" in bad.stderr

    paused = _kf("pause", workflow_id, "--by", "ops", "--json", env=env)
    assert paused.returncode == 0 and json.loads(paused.stdout)["paused"] is True
    resumed = _kf("resume", workflow_id, "--by", "ops", env=env)
    assert resumed.returncode == 0 and "resume applied" in resumed.stdout

    approved = _kf("approve", workflow_id, "review", "--comment", "fine by me", "--by", "ada", env=env)
    assert approved.returncode == 0, approved.stderr
    assert "approved by ada" in approved.stdout
    again = _kf("reject", workflow_id, "review", "--comment", "too late", "--by", "bob", "--json", env=env)
    assert again.returncode == 4 and json.loads(again.stdout)["refused"] is True

    deadline = time.monotonic() + 30
    while True:
        shown = _kf("status", workflow_id, "--json", env=env)
        assert shown.returncode == 0, shown.stderr
        state = json.loads(shown.stdout)
        if state["status"] == "completed" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert state["status"] == "completed"
    assert state["approvals"][0]["by"] == "ada" and state["approvals"][0]["comment"] == "fine by me"
    assert state["reroutes"][-1]["by"] == "ops"
    send = next(s for s in state["steps"] if s["id"] == "send")
    assert send["model"] == "openai/gpt-4o-mini"  # the reroute took effect
    text = _kf("status", workflow_id, env=env)
    assert "approval review: approved by ada: fine by me" in text.stdout

    cancelled = _kf("cancel", workflow_id, env=env)
    assert cancelled.returncode == 4 and "refused" in cancelled.stderr
    missing = _kf("approve", "no-such-workflow", "review", env=env)
    assert missing.returncode == 4 and "no-such-workflow" in missing.stderr


def test_console_command_signs_in_users_of_a_file_and_attributes_decisions(dev: dict[str, str]) -> None:
    hashed = _kf("console", "--hash-password", env=dev, stdin="s3cret-for-test\n")
    assert hashed.returncode == 0 and hashed.stdout.startswith("scrypt$")
    users = Path(dev["STATE"]) / "users.yaml"
    users.write_text(
        yaml.safe_dump(
            {"users": [{"name": "ada", "roles": ["approver"], "password_hash": hashed.stdout.strip()}]}
        )
    )
    port = free_port()
    env = {
        **dev, "KERNELFLOW_CONSOLE_USERS": str(users), "KERNELFLOW_CONSOLE_SECRET": "x" * 32,
        "KERNELFLOW_BROKER_URL": dev["NATS"],
    }  # fmt: skip
    process = subprocess.Popen(
        ["kernelflow", "console", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    try:
        _wait_line(process, "Console")
        workflow_id = _start(dev, "Lee")
        _until_awaiting(dev, workflow_id)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            csrf = _sign_in(http, "ada", "s3cret-for-test")
            assert workflow_id in http.get("/approvals").text
            # Apart from the workers, the console holds no provider keys and does not claim to know theirs.
            assert "OPENAI_API_KEY on the workers: check" in http.get("/providers").text
            assert "Dead letters" in http.get("/events").text  # the broker of KERNELFLOW_BROKER_URL
            done = http.post(
                "/approvals/decide",
                data={
                    "csrf": csrf,
                    "workflow_id": workflow_id,
                    "step_id": "review",
                    "decision": "reject",
                    "comment": "no",
                },
            )
            assert done.status_code == 303
        shown = _kf("status", workflow_id, "--json", env=dev)
        approval = json.loads(shown.stdout)["approvals"][0]
        assert (approval["status"], approval["by"], approval["comment"]) == ("rejected", "ada", "no")
    finally:
        _stop(process)
    # A users file that names an unknown role is refused at start, naming what is allowed.
    users.write_text(
        yaml.safe_dump({"users": [{"name": "x", "roles": ["root"], "password_hash": "scrypt$1"}]})
    )
    refused = _kf("console", "--port", str(free_port()), env=env)
    assert refused.returncode == 2 and "viewer, operator, approver" in refused.stderr


def test_dev_console_reads_the_workers_metrics_endpoint(dev: dict[str, str]) -> None:
    """After the pipelines above, the Providers page of ``kernelflow dev``'s console shows the model
    calls its worker counted, read from the worker's /metrics."""
    with httpx.Client(base_url=dev["CONSOLE"]) as http:
        _sign_in(http, "dev", dev["DEV_PASSWORD"])
        deadline = time.monotonic() + 30
        while True:
            page = http.get("/providers").text
            found = re.search(r'<tr data-provider="openai">.*?<td class="num calls">([^<]*)</td>', page, re.S)
            assert found is not None
            calls = found.group(1)
            if calls.isdigit() or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert "since the workers started" in page
    # Kim's pipeline called two models, Lee's (rejected) one: the draft steps and one send.
    assert calls == "3", calls

"""The `kernelflow` command as a person uses it: real processes, real ports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.devserver import free_port

REPO = Path(__file__).resolve().parents[1]
TRIAGE = str(REPO / "examples" / "ticket-triage.yaml")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _kernelflow() -> str:
    binary = shutil.which("kernelflow")
    assert binary, "the kernelflow console script is not installed"
    return binary


def _run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_kernelflow(), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


def _start_dev(state: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], int, int]:
    """`kernelflow dev` on free ports, returned once it says it is ready."""
    port, ui_port, sim_port = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [_kernelflow(), "dev", "--port", str(port), "--ui-port", str(ui_port), "--sim-port", str(sim_port),
         "--state-dir", str(state), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    lines: list[str] = []
    assert process.stdout is not None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
    banner = "".join(lines)
    assert "Ctrl-C stops everything" in banner, f"kernelflow dev did not come up:\n{banner}"
    return process, port, ui_port


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_closed(*ports: int, within: float = 20) -> bool:
    deadline = time.monotonic() + within
    while any(_port_open(p) for p in ports) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_port_open(p) for p in ports)


@pytest.fixture(scope="module")
def dev_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[str], int, int, dict[str, str]]]:
    env = {**os.environ, "KERNELFLOW_TASK_QUEUE": "cli-test"}
    state = tmp_path_factory.mktemp("dev-state")
    process, port, ui_port = _start_dev(state, env)
    # kernelflow dev encrypts with a key under its state folder: commands beside it use that key.
    keys = {"KERNELFLOW_ENCRYPTION_KEYS_DIR": str(state / "keys")}
    yield process, port, ui_port, {**env, "TEMPORAL_ADDRESS": f"127.0.0.1:{port}", **keys}
    _stop(process)


def test_dev_prints_where_everything_listens(
    dev_stack: tuple[subprocess.Popen[str], int, int, dict[str, str]],
) -> None:
    _, port, ui_port, _ = dev_stack
    assert _port_open(port) and _port_open(ui_port)


def test_run_prints_outputs_as_json(
    dev_stack: tuple[subprocess.Popen[str], int, int, dict[str, str]],
) -> None:
    *_, env = dev_stack
    done = _run(
        "run",
        TRIAGE,
        "--input",
        "ticket=My invoice is wrong",
        "--input",
        "customer=Initech",
        "--json",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "completed"
    assert result["outputs"]["category"] == "billing"
    assert (
        result["outputs"]["drafted_by"] == "openai/gpt-4.1"
    )  # no simulated outage here: the primary answers
    assert "Initech" in result["outputs"]["reply"]
    assert result["usage"]["total_tokens"] > 0 and result["cost_usd"] > 0


def test_run_shows_progress_on_the_terminal(
    dev_stack: tuple[subprocess.Popen[str], int, int, dict[str, str]],
) -> None:
    *_, env = dev_stack
    done = _run("run", TRIAGE, "--input", "ticket=Login fails", env=env)
    assert done.returncode == 0, done.stderr
    for step in ("classify", "draft", "crm_note"):
        assert f"✓ {step}" in done.stderr
    assert "reply:" in done.stdout and "cost:" in done.stdout


def test_run_starts_a_pipeline_registered_on_the_worker_by_name(
    dev_stack: tuple[subprocess.Popen[str], int, int, dict[str, str]],
) -> None:
    *_, env = dev_stack
    done = _run(
        "run", "--name", "ticket-triage", "--input-json", '{"ticket": "Card declined"}', "--json", env=env
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["pipeline"] == "ticket-triage" and result["status"] == "completed"
    assert "Card declined" in result["outputs"]["reply"]

    unknown = _run("run", "--name", "no-such-pipeline", env=env)
    assert unknown.returncode == 3
    assert "no-such-pipeline" in unknown.stderr and "ticket-triage" in unknown.stderr  # lists what exists


def test_run_takes_inputs_too_large_for_a_command_line_from_a_file(
    dev_stack: tuple[subprocess.Popen[str], int, int, dict[str, str]], tmp_path: Path
) -> None:
    *_, env = dev_stack
    ticket = "My invoice is wrong. " + "Here is the whole thread. " * 12_000  # ~300 kB
    inputs = tmp_path / "inputs.yaml"
    inputs.write_text(f"ticket: {json.dumps(ticket)}\ncustomer: Initech\n")
    done = _run("run", TRIAGE, "--input-file", str(inputs), "--json", env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "completed" and "Initech" in result["outputs"]["reply"]

    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    refused = _run("run", TRIAGE, "--input-file", str(listed), env=env)
    assert refused.returncode == 2 and "must hold an object" in refused.stderr
    missing = _run("run", TRIAGE, "--input-file", str(tmp_path / "nope.json"), env=env)
    assert missing.returncode == 2 and "cannot be read" in missing.stderr


def test_run_refuses_bad_input_naming_it(
    dev_stack: tuple[subprocess.Popen[str], int, int, dict[str, str]], tmp_path: Path
) -> None:
    *_, env = dev_stack
    missing = _run("run", TRIAGE, env=env)
    assert missing.returncode == 2 and "needs input 'ticket'" in missing.stderr

    unknown = _run("run", TRIAGE, "--input", "ticket=x", "--input", "tikcet=y", env=env)
    assert unknown.returncode == 2 and "tikcet" in unknown.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsteps:\n  - id: a\n    model: nosuchprovider/x\n    prompt: hi\n")
    refused = _run("run", str(bad), env=env)
    assert refused.returncode == 2
    assert (
        "nosuchprovider" in refused.stderr and "available:" in refused.stderr and "openai" in refused.stderr
    )


def test_ctrl_c_stops_everything(
    dev_stack: tuple[subprocess.Popen[str], int, int, dict[str, str]],
) -> None:
    process, port, ui_port, _ = dev_stack
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0
    assert _wait_closed(port, ui_port), "the Temporal dev server outlived kernelflow dev"


def test_a_killed_dev_stack_leaves_no_server_behind(tmp_path: Path) -> None:
    process, port, ui_port = _start_dev(tmp_path, dict(os.environ))
    process.kill()  # SIGKILL: kernelflow dev gets no chance to stop its Temporal server
    process.wait()
    assert _wait_closed(port, ui_port), "the Temporal dev server outlived a killed kernelflow dev"


def test_demo_runs_the_example_and_exits_cleanly(tmp_path: Path) -> None:
    port, ui_port = free_port(), free_port()
    done = _run(
        "demo", "--port", str(port), "--ui-port", str(ui_port), "--state-dir", str(tmp_path), timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "gpt-4.1 failed: Overloaded" in out  # the simulated outage forces the fallback
    assert "drafted_by:\n    openai/gpt-4o" in out
    assert "cost:" in out and f"http://127.0.0.1:{ui_port}/namespaces/default/workflows/ticket-triage-" in out
    assert not _port_open(port) and not _port_open(ui_port)

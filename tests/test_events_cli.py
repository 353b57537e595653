"""The events example as a person runs it: `kernelflow dev` with the example's config (embedded NATS
and bridge), then `kernelflow events publish` for order.paid and order.shipped, `events tail`, and the
`temporal` CLI to read the result."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.devserver import free_port

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    binary = shutil.which(args[0])
    assert binary, f"{args[0]} is not installed"
    return subprocess.run(
        [binary, *args[1:]], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], str]]:
    port, ui_port, sim_port, nats_port = free_port(), free_port(), free_port(), free_port()
    state = tmp_path_factory.mktemp("dev")
    env = {
        **os.environ,
        "KERNELFLOW_CONFIG": str(REPO / "examples" / "events" / "kernelflow.yaml"),
        "KERNELFLOW_TASK_QUEUE": "events-cli",
    }
    process = subprocess.Popen(
        [shutil.which("kernelflow") or "kernelflow", "dev", "--port", str(port), "--ui-port", str(ui_port),
         "--sim-port", str(sim_port), "--nats-port", str(nats_port),
         "--state-dir", str(state), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
    banner = "".join(lines)
    assert "Ctrl-C stops everything" in banner, banner
    match = re.search(r"NATS\s+(nats://\S+)", banner)
    assert match, banner
    codec = re.search(r"Codec\s+(http://\S+)", banner)
    assert codec, banner
    assert "triggers: order-paid, order-shipped" in banner
    yield (
        {
            **env,
            "TEMPORAL_ADDRESS": f"127.0.0.1:{port}",
            "KERNELFLOW_BROKER_URL": match.group(1),
            # kernelflow dev encrypts payloads with a key under its state folder; the temporal CLI reads
            # results through its codec server, other kernelflow processes with the key itself.
            "KERNELFLOW_ENCRYPTION_KEYS_DIR": str(state / "keys"),
            "CODEC_ENDPOINT": codec.group(1),
        },
        banner,
    )
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _result(env: dict[str, str], workflow_id: str) -> dict[str, object]:
    done = _run(
        "temporal", "workflow", "result", "--workflow-id", workflow_id, "--address", env["TEMPORAL_ADDRESS"],
        "--codec-endpoint", env["CODEC_ENDPOINT"], "--output", "json", env=env, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, object] = json.loads(done.stdout)["result"]
    return result


def test_order_paid_starts_and_order_shipped_resumes(dev: tuple[dict[str, str], str]) -> None:
    env, _ = dev
    tail = subprocess.Popen(
        [shutil.which("kernelflow") or "kernelflow", "events", "tail", "shop.orders.>", "--all", "--count", "2", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    paid = _run(
        "kernelflow", "events", "publish", "shop.orders.paid", "--type", "com.shop.order.paid", "--id", "pay-1001",
        "--data", '{"order_id": "1001", "customer": "ACME", "amount": 120}', env=env,
    )  # fmt: skip
    assert paid.returncode == 0, paid.stderr
    assert "published com.shop.order.paid id=pay-1001" in paid.stdout
    again = _run(
        "kernelflow", "events", "publish", "shop.orders.paid", "--type", "com.shop.order.paid", "--id", "pay-1001",
        "--data", '{"order_id": "1001", "customer": "ACME", "amount": 120}', env=env,
    )  # fmt: skip
    assert "duplicate" in again.stdout
    shipped = _run(
        "kernelflow", "events", "publish", "shop.orders.shipped", "--type", "com.shop.order.shipped", "--binary",
        "--data", '{"order_id": "1001", "carrier": "DHL", "tracking": "JD0123"}', env=env,
    )  # fmt: skip
    assert shipped.returncode == 0, shipped.stderr
    result = _result(env, "order-1001")
    assert result["status"] == "completed"
    outputs = result["outputs"]
    assert isinstance(outputs, dict)
    assert outputs["carrier"] == "DHL" and "1001" in str(outputs["notice"])
    out, err = tail.communicate(timeout=30)
    seen = [json.loads(line) for line in out.splitlines()]
    assert [s["event"]["type"] for s in seen] == ["com.shop.order.paid", "com.shop.order.shipped"], err

    lifecycle = _run(
        "kernelflow", "events", "tail", "kernelflow.events.>", "--all", "--count", "5", "--json", env=env
    )
    assert lifecycle.returncode == 0, lifecycle.stderr
    published = [json.loads(line) for line in lifecycle.stdout.splitlines()]
    assert [p["event"]["type"] for p in published] == [
        "kernelflow.pipeline.started",
        "kernelflow.step.completed",
        "kernelflow.step.completed",
        "kernelflow.step.completed",
        "kernelflow.pipeline.completed",
    ]
    assert published[-1]["subject"] == "kernelflow.events._.order-fulfilment.pipeline.completed"
    assert published[-1]["event"]["id"] == "order-1001:5"


def test_publish_refuses_bad_data_and_names_the_flag(dev: tuple[dict[str, str], str]) -> None:
    env, _ = dev
    done = _run(
        "kernelflow", "events", "publish", "shop.orders.paid", "--type", "t", "--data", "{oops", env=env
    )
    assert done.returncode == 2 and "--data is not valid JSON" in done.stderr


def test_a_separate_bridge_process_with_the_webhook_ingress(
    dev: tuple[dict[str, str], str], tmp_path: Path
) -> None:
    """`kernelflow bridge` next to the dev stack's own bridge (they share the consumer), fed through
    its signed webhook ingress; SIGINT stops it and it prints what it did."""
    import base64
    import uuid

    import httpx
    import yaml
    from standardwebhooks.webhooks import Webhook

    env, _ = dev
    port = free_port()
    config = yaml.safe_load((REPO / "examples" / "events" / "kernelflow.yaml").read_text())
    config["pipelines_dir"] = str(REPO / "examples")
    config["events"]["ingress"] = {"listen": f"127.0.0.1:{port}"}
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(config))
    secret = "whsec_" + base64.b64encode(b"bridge-cli-secret-0123456789abcd").decode()
    bridge_env = {**env, "KERNELFLOW_CONFIG": str(path), "KERNELFLOW_WEBHOOK_SECRET": secret}
    process = subprocess.Popen(
        [shutil.which("kernelflow") or "kernelflow", "bridge"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=bridge_env, cwd=REPO,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if "webhook ingress on" in line or not line:
                break
        order = uuid.uuid4().hex[:6]
        body = json.dumps(
            {"specversion": "1.0", "id": f"pay-{order}", "source": "/shop", "type": "com.shop.order.paid",
             "data": {"order_id": order, "customer": "Globex", "amount": 42}}
        ).encode()  # fmt: skip
        msg_id = f"msg_{order}"
        headers = {
            "content-type": "application/cloudevents+json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(time.time())),
        }
        headers["webhook-signature"] = Webhook(secret).sign(
            msg_id,
            __import__("datetime").datetime.fromtimestamp(int(headers["webhook-timestamp"])),
            body.decode(),
        )
        answer = httpx.post(f"http://127.0.0.1:{port}/events/shop.orders.paid", content=body, headers=headers)
        assert answer.status_code == 202, answer.text
        bad = httpx.post(
            f"http://127.0.0.1:{port}/events/shop.orders.paid",
            content=body,
            headers={**headers, "webhook-signature": "v1,AAAA"},
        )
        assert bad.status_code == 401
        status = _run(
            "temporal", "workflow", "describe", "--workflow-id", f"order-{order}", "--address", env["TEMPORAL_ADDRESS"],
            env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while status.returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
            status = _run(
                "temporal", "workflow", "describe", "--workflow-id", f"order-{order}",
                "--address", env["TEMPORAL_ADDRESS"], env=env,
            )  # fmt: skip
        assert status.returncode == 0, status.stderr
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "bridge stopped:" in err

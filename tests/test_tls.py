"""Temporal behind TLS and mutual TLS: Debian's nginx terminating TLS in front of the dev server,
with certificates made here. Workers and clients connect through connection profiles (the `temporal`
CLI's TOML), pipelines run through each, a worker idles behind nginx for three minutes without an
error, and every broken set-up fails within seconds with a message naming the profile."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kernel.pipeline import PipelineSpec
from simulator.server import SimulatorServer
from tests.worker_process import WorkerProcess, kernelflow_binary
from worker.client import start_pipeline
from worker.config import PayloadSettings
from worker.connection import ConnectFailed, open_client, resolve_connection
from worker.devserver import free_port

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx" / "temporal-grpc-tls.conf"
API_KEY = "kf-test-" + uuid.uuid4().hex
IDLE_SECONDS = 180.0
INLINE = PayloadSettings(storage="off")  # 1.5 MB must cross nginx, not a side store

pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="Debian's nginx is not installed (`make ops-tools` installs it)",
)

SPEC = PipelineSpec.model_validate(
    {
        "name": "behind-tls",
        "inputs": {"text": {"type": "string"}},
        "steps": [
            {"id": "answer", "model": "openai/gpt-4o-mini", "prompt": "Count the words: {{ inputs.text }}"}
        ],
        "outputs": {"answer": "{{ steps.answer.output }}"},
    }
)


# --- certificates ------------------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *, ca: bool = False, server: bool = False,
) -> x509.Certificate:  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(path: Path, *items: x509.Certificate | ec.EllipticCurvePrivateKey) -> Path:
    data = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            data += item.public_bytes(serialization.Encoding.PEM)
        else:
            data += item.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
    path.write_bytes(data)
    return path


@dataclass
class Pki:
    ca: Path
    server: Path
    server_key: Path
    client_ca: Path
    client: Path
    client_key: Path
    other_ca: Path
    stranger: Path
    stranger_key: Path


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, client_ca_key, other_key = _key(), _key(), _key()
    ca = _cert("kernelflow test CA", ca_key, None, ca=True)
    client_ca = _cert("kernelflow client CA", client_ca_key, None, ca=True)
    other = _cert("some other CA", other_key, None, ca=True)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    server = _cert("localhost", server_key, (ca, ca_key), server=True)
    client = _cert("kernelflow worker", client_key, (client_ca, client_ca_key))
    stranger = _cert("stranger", stranger_key, (other, other_key))
    return Pki(
        ca=_write(folder / "ca.pem", ca),
        server=_write(folder / "server.pem", server),
        server_key=_write(folder / "server-key.pem", server_key),
        client_ca=_write(folder / "client-ca.pem", client_ca),
        client=_write(folder / "client.pem", client),
        client_key=_write(folder / "client-key.pem", client_key),
        other_ca=_write(folder / "other-ca.pem", other),
        stranger=_write(folder / "stranger.pem", stranger),
        stranger_key=_write(folder / "stranger-key.pem", stranger_key),
    )


# --- nginx -------------------------------------------------------------------------------------------


@dataclass
class Nginx:
    tls_port: int
    mtls_port: int
    pki: Pki
    profiles: Path


def _wait_listening(port: int, process: subprocess.Popen[bytes], error_log: Path, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"nginx exited: {error_log.read_text() if error_log.exists() else ''}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nginx did not listen on {port}")


def nginx_config(
    template: str, *, prefix: Path, temporal_port: int, tls_port: int, mtls_port: int, pki: Pki
) -> str:
    """The shipped example with this test's paths and ports, plus what running unprivileged in a
    folder needs (pid, logs and temp paths, foreground)."""
    text = template
    for old, new in (
        ("/etc/nginx/tls/server.pem", pki.server),
        ("/etc/nginx/tls/server-key.pem", pki.server_key),
        ("/etc/nginx/tls/client-ca.pem", pki.client_ca),
        ("127.0.0.1:7233", f"127.0.0.1:{temporal_port}"),
        ("listen 7443", f"listen 127.0.0.1:{tls_port}"),
        ("listen 7444", f"listen 127.0.0.1:{mtls_port}"),
        ("CHANGE-ME-API-KEY", API_KEY),
    ):
        assert str(old) in text, f"{old} is no longer in {NGINX_CONF.name}"
        text = text.replace(str(old), str(new))
    temp = "\n".join(
        f"    {name}_temp_path {prefix / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {\n", "http {\n" + temp + "\n", 1)
    head = f"daemon off;\npid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'} warn;\n"
    if os.geteuid() == 0:
        head += "user root;\n"
    return head + text


@pytest.fixture(scope="module")
def nginx(temporal_target: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    prefix = tmp_path_factory.mktemp("nginx")
    pki = make_pki(prefix / "tls")
    tls_port, mtls_port = free_port(), free_port()
    temporal_port = int(temporal_target.rsplit(":", 1)[1])
    conf = prefix / "nginx.conf"
    conf.write_text(
        nginx_config(NGINX_CONF.read_text(), prefix=prefix, temporal_port=temporal_port, tls_port=tls_port,
                     mtls_port=mtls_port, pki=pki)
    )  # fmt: skip
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    check = subprocess.run([binary, "-t", "-p", str(prefix), "-c", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen([binary, "-p", str(prefix), "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        _wait_listening(tls_port, process, prefix / "error.log")
        _wait_listening(mtls_port, process, prefix / "error.log")
        profiles = prefix / "temporal.toml"
        profiles.write_text(
            f"""
[profile.apikey]
address = "localhost:{tls_port}"
api_key = "{API_KEY}"
[profile.apikey.tls]
server_ca_cert_path = "{pki.ca}"

[profile.mtls]
address = "localhost:{mtls_port}"
[profile.mtls.tls]
server_ca_cert_path = "{pki.ca}"
client_cert_path = "{pki.client}"
client_key_path = "{pki.client_key}"

[profile.wrong-ca]
address = "localhost:{tls_port}"
api_key = "{API_KEY}"
[profile.wrong-ca.tls]
server_ca_cert_path = "{pki.other_ca}"

[profile.bad-key]
address = "localhost:{tls_port}"
api_key = "not-the-key"
[profile.bad-key.tls]
server_ca_cert_path = "{pki.ca}"

[profile.no-client-cert]
address = "localhost:{mtls_port}"
[profile.no-client-cert.tls]
server_ca_cert_path = "{pki.ca}"

[profile.stranger-cert]
address = "localhost:{mtls_port}"
[profile.stranger-cert.tls]
server_ca_cert_path = "{pki.ca}"
client_cert_path = "{pki.stranger}"
client_key_path = "{pki.stranger_key}"

[profile.garbage-key]
address = "localhost:{mtls_port}"
[profile.garbage-key.tls]
server_ca_cert_path = "{pki.ca}"
client_cert_path = "{pki.client}"
client_key_path = "{prefix / "garbage-key.pem"}"
"""
        )
        (prefix / "garbage-key.pem").write_text(
            "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
        )
        yield Nginx(tls_port, mtls_port, pki, profiles)
    finally:
        process.terminate()
        process.wait(timeout=10)


def _worker_env(nginx: Nginx, sim: SimulatorServer, profile: str, queue: str) -> dict[str, str]:
    return {
        "TEMPORAL_CONFIG_FILE": str(nginx.profiles),
        "TEMPORAL_PROFILE": profile,
        "KERNELFLOW_TASK_QUEUE": queue,
        "KERNELFLOW_PAYLOADS_STORAGE": "off",
        "OPENAI_BASE_URL": sim.url.rstrip("/") + "/v1",
        "OPENAI_API_KEY": "sim-key",
    }


async def _client(nginx: Nginx, profile: str):  # type: ignore[no-untyped-def]
    connection = resolve_connection(profile=profile, environ={"TEMPORAL_CONFIG_FILE": str(nginx.profiles)})
    return await open_client(connection, payloads=INLINE)


# --- the idle worker: started first, checked last --------------------------------------------------------


@pytest.fixture(scope="module")
def idle_worker(nginx: Nginx, simulator_server: SimulatorServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkerProcess, str, float]]:  # fmt: skip
    """A worker behind nginx (mutual TLS) that idles while the other tests of this file run."""
    queue = f"idle-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(
        _worker_env(nginx, simulator_server, "mtls", queue), cwd=tmp_path_factory.mktemp("idle")
    ).start()
    worker.wait_started()
    started = time.monotonic()
    yield worker, queue, started
    worker.stop()


def test_idle_worker_is_started_first(idle_worker: tuple[WorkerProcess, str, float]) -> None:
    """Starts the idle worker before the others, so its three minutes overlap them."""
    assert idle_worker[0].process is not None and idle_worker[0].process.poll() is None


# --- pipelines through TLS -----------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["apikey", "mtls"])
async def test_a_pipeline_with_a_1_5_mb_input_runs_through_tls(
    nginx: Nginx, sim: SimulatorServer, tmp_path: Path, profile: str
) -> None:
    queue = f"tls-{uuid.uuid4().hex[:8]}"
    with WorkerProcess(_worker_env(nginx, sim, profile, queue), cwd=tmp_path) as worker:
        started = worker.wait_started()
        assert f"profile '{profile}'" in started["temporal"], started
        assert f":{nginx.tls_port if profile == 'apikey' else nginx.mtls_port}" in started["temporal"]
        client = await _client(nginx, profile)
        big = "word " * 300_000  # 1.5 MB: over nginx's default 1 MB body limit
        handle = await start_pipeline(client, SPEC, {"text": big}, task_queue=queue)
        result = await asyncio.wait_for(handle.result(), timeout=60)
        assert result.status == "completed"
        described = await handle.describe()
        assert described.status is not None and described.status.name == "COMPLETED"
        # `kernelflow run` takes the same profile (as the `temporal` CLI does).
        pipeline = tmp_path / "hello.yaml"
        pipeline.write_text(
            "name: hello\nsteps:\n  - {id: greet, model: openai/gpt-4o-mini, prompt: Hello}\n"
            "outputs: {greeting: '{{ steps.greet.output }}'}\n"
        )
        done = await asyncio.to_thread(
            subprocess.run,
            [
                kernelflow_binary(),
                "run",
                str(pipeline),
                "--profile",
                profile,
                "--task-queue",
                queue,
                "--json",
            ],
            env={
                **os.environ,
                "TEMPORAL_CONFIG_FILE": str(nginx.profiles),
                "KERNELFLOW_PAYLOADS_STORAGE": "off",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"] == "completed"


# --- broken set-ups fail fast and say why -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "says"),
    [
        ("wrong-ca", r"server's certificate is not signed by the CA"),
        ("bad-key", r"invalid or missing API key"),
        ("no-client-cert", r"client certificate missing or not trusted"),
        ("stranger-cert", r"client certificate missing or not trusted"),
        ("garbage-key", r"private key"),
    ],
)
async def test_a_broken_connection_fails_within_seconds_naming_the_profile(
    nginx: Nginx, profile: str, says: str
) -> None:
    started = time.monotonic()
    with pytest.raises((ConnectFailed,)) as failure:
        await _client(nginx, profile)
    elapsed = time.monotonic() - started
    message = str(failure.value)
    assert f"profile '{profile}'" in message, message
    assert re.search(says, message, re.IGNORECASE), message
    assert elapsed < 15, f"took {elapsed:.1f}s: {message}"


def test_the_worker_command_reports_a_broken_profile_and_exits(nginx: Nginx, tmp_path: Path, sim: SimulatorServer) -> None:  # fmt: skip
    worker = WorkerProcess(_worker_env(nginx, sim, "wrong-ca", "never"), cwd=tmp_path).start()
    assert worker.process is not None
    code = worker.process.wait(timeout=30)
    assert code != 0
    record = worker.wait_for(lambda r: r.get("level") == "error", within=5)
    assert "profile 'wrong-ca'" in record["event"], record


# --- last: the idle worker ---------------------------------------------------------------------------------


@pytest.mark.idle
@pytest.mark.timeout(IDLE_SECONDS + 120)
async def test_a_worker_idles_behind_nginx_for_three_minutes_without_an_error(
    nginx: Nginx, idle_worker: tuple[WorkerProcess, str, float]
) -> None:
    """Long polls outlast nginx's timeouts: in three idle minutes the worker logged nothing at warning
    or above, and still takes work at once."""
    worker, queue, started = idle_worker
    left = IDLE_SECONDS - (time.monotonic() - started)
    if left > 0:
        await asyncio.sleep(left)  # the idle time is what is tested
    records = worker.records()
    since_start = records[next(i for i, r in enumerate(records) if r.get("event") == "worker started") :]
    # Start-up warnings are configuration (payload encryption off, say), not idling trouble.
    problems = [r for r in since_start if r.get("level") in ("warning", "error", "critical")]
    assert not problems, problems
    assert worker.process is not None
    code = worker.process.poll()
    assert code is None, f"the idle worker ended (exit {code}; -9 is a SIGKILL from outside):\n" + "\n".join(
        worker.lines[-20:]
    )
    client = await _client(nginx, "mtls")
    handle = await start_pipeline(client, SPEC, {"text": "still there?"}, task_queue=queue)
    result = await asyncio.wait_for(handle.result(), timeout=30)
    assert result.status == "completed"
    assert all(line.startswith("{") for line in worker.lines)

"""Encryption settings, key rings and the codec on their own: bad configuration fails fast and says
what is wrong; the tenant rule; tampering fails authentication."""

from __future__ import annotations

import base64
import dataclasses
import os
from pathlib import Path

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.converter import ActivitySerializationContext, WorkflowSerializationContext

from kernel.errors import ConfigurationError
from kernel.keys import Key, KeyUnavailable
from worker.codec import (
    ChainedCodec,
    KernelflowCodec,
    PayloadDecryptError,
    PlaintextRefused,
    tenant_of,
    tenant_workflow_id,
)
from worker.config import payload_settings_from_env
from worker.keys import EnvKeyProvider, FileKeyProvider, format_ring, load_key_provider, parse_ring


def _b64(material: bytes) -> str:
    return base64.b64encode(material).decode()


def test_environment_turns_encryption_on() -> None:
    keys = f"k2={_b64(os.urandom(32))},k1={_b64(os.urandom(32))}"
    settings = payload_settings_from_env({"KERNELFLOW_ENCRYPTION_KEYS": keys})
    assert settings.encryption.enabled and settings.encryption.provider == "env"
    settings = payload_settings_from_env(
        {
            "KERNELFLOW_ENCRYPTION_KEYS_DIR": "/k",
            "KERNELFLOW_ENCRYPTION_TENANT_KEYS": "on",
            "KERNELFLOW_COMPRESSION": "on",
        }
    )
    assert settings.encryption.enabled and settings.encryption.provider == "file"
    assert settings.encryption.options["dir"] == "/k" and settings.encryption.tenant_keys
    assert settings.compression.enabled
    assert not payload_settings_from_env(
        {"KERNELFLOW_ENCRYPTION_KEYS_DIR": "/k", "KERNELFLOW_ENCRYPTION": "off"}
    ).encryption.enabled
    assert not payload_settings_from_env({}).encryption.enabled
    with pytest.raises(ConfigurationError, match="KERNELFLOW_ENCRYPTION='maybe': use on or off"):
        payload_settings_from_env({"KERNELFLOW_ENCRYPTION": "maybe"})


def test_config_file_section_with_a_relative_key_dir(tmp_path: Path) -> None:
    config = tmp_path / "kernelflow.yaml"
    config.write_text("payloads:\n  encryption: {enabled: true, provider: file, options: {dir: keys}}\n")
    settings = payload_settings_from_env({"KERNELFLOW_CONFIG": str(config)})
    assert settings.encryption.options["dir"] == str(tmp_path / "keys")
    config.write_text("payloads:\n  encryption: {enabled: true, keyring: x}\n")
    with pytest.raises(ConfigurationError, match="keyring"):
        payload_settings_from_env({"KERNELFLOW_CONFIG": str(config)})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("k1", "'<id>=<base64 key>'"),
        ("k1=!!!", "key 'k1' is not valid base64"),
        (f"k1={_b64(b'short')}", "5 bytes long; AES-256 needs exactly 32"),
        (f"bad id={_b64(os.urandom(32))}", "key id 'bad id' is not allowed"),
        (f"k1={_b64(os.urandom(32))}\nk1={_b64(os.urandom(32))}", "appears twice"),
    ],
)
def test_bad_key_rings_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_ring(text, source="$KERNELFLOW_ENCRYPTION_KEYS")


def test_ring_format_round_trips_with_comments() -> None:
    keys = [Key("k2", os.urandom(32)), Key("k1", os.urandom(32))]
    assert parse_ring("# rotated 2026-11, by ops\n" + format_ring(keys), source="x") == keys


def test_unknown_key_provider_names_the_installed_ones() -> None:
    with pytest.raises(ConfigurationError, match="installed: env, file"):
        load_key_provider("vault")
    with pytest.raises(ConfigurationError, match="refused its options"):
        load_key_provider("file", {"directory": "/x"})


def test_tenant_rule() -> None:
    assert tenant_of("tenant/acme/triage-1") == "acme"
    assert tenant_of("tenant/acme/triage-1/review") == "acme"  # a child workflow
    assert tenant_of("triage-1") is None
    assert tenant_of("tenant/acme") is None
    assert tenant_workflow_id("acme", "triage-1") == "tenant/acme/triage-1"
    with pytest.raises(ConfigurationError, match="not a valid tenant name"):
        tenant_workflow_id("acme/evil", "x")


async def test_codec_round_trip_tenant_context_and_tampering(tmp_path: Path) -> None:
    provider = FileKeyProvider(dir=tmp_path, create_tenant_keys=True)
    provider.add_key()
    codec = KernelflowCodec(provider=provider, tenant_keys=True, compress_min_bytes=64)
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'"' + b"ticket " * 100 + b'"')

    shared = await codec.encode([plain])
    assert shared[0].metadata["encryption-key-id"] == (await provider.keys())[0].id.encode()
    assert "kernelflow-tenant" not in shared[0].metadata
    assert shared[0].metadata["kernelflow-compression"] == b"zlib"

    context = ActivitySerializationContext(
        namespace="default", workflow_id="tenant/acme/x/child", workflow_type="PipelineWorkflow",
        activity_type="llm_chat", activity_id="1", activity_task_queue="q", is_local=False,
    )  # fmt: skip
    acme = await codec.with_context(context).encode([plain])
    assert acme[0].metadata["kernelflow-tenant"] == b"acme"
    assert (tmp_path / "tenants" / "acme.keys").is_file()
    # Decoding needs no context: the key id and tenant are in the payload.
    assert await codec.decode([acme[0], shared[0]]) == [plain, plain]

    moved = Payload()
    moved.CopyFrom(acme[0])
    moved.metadata["kernelflow-compression"] = b""  # clear metadata is authenticated
    with pytest.raises(PayloadDecryptError, match="failed authentication"):
        await codec.decode([moved])

    provider.destroy("acme")
    with pytest.raises(KeyUnavailable, match=r"tenant 'acme'.* may have been destroyed"):
        await codec.decode([acme[0]])

    strict = KernelflowCodec(provider=provider, allow_plaintext=False).with_context(
        WorkflowSerializationContext(namespace="default", workflow_id="wf-1")
    )
    with pytest.raises(PlaintextRefused, match="workflow 'wf-1' is not encrypted"):
        await strict.decode([plain])


async def test_encrypting_without_a_key_says_where_keys_come_from() -> None:
    codec = KernelflowCodec(provider=EnvKeyProvider(environ={}))
    with pytest.raises(KeyUnavailable, match="no key to encrypt with"):
        await codec.encode([Payload(metadata={"encoding": b"binary/null"})])


async def test_the_plugin_keeps_encryption_when_it_adapts_a_clients_converter(tmp_path: Path) -> None:
    from temporalio.contrib.pydantic import pydantic_data_converter

    from worker.codec import EncryptedFailureConverter
    from worker.config import EncryptionSettings, PayloadSettings
    from worker.plugin import kernelflow_converter

    (tmp_path / "default.keys").write_text(format_ring([Key("k1", os.urandom(32))]))
    settings = PayloadSettings(
        dir=tmp_path / "payloads",
        encryption=EncryptionSettings(enabled=True, provider="file", options={"dir": str(tmp_path)}),
    )
    adapted = kernelflow_converter(pydantic_data_converter, payloads=settings)
    assert isinstance(adapted.payload_codec, KernelflowCodec) and adapted.payload_codec.encrypting
    assert adapted.failure_converter_class is EncryptedFailureConverter
    assert kernelflow_converter(adapted, payloads=settings).payload_codec is adapted.payload_codec

    # A user's own codec is kept and runs first; Kernelflow's encryption runs last.
    users = dataclasses.replace(
        pydantic_data_converter, payload_codec=KernelflowCodec(provider=None, compress_min_bytes=0)
    )
    chained = kernelflow_converter(users, payloads=settings)
    assert isinstance(chained.payload_codec, ChainedCodec) and chained.payload_codec.encrypting
    [stored] = await chained.encode(["a prompt " * 50])
    assert stored.metadata["encoding"] == b"binary/encrypted"
    inner = (await adapted.payload_codec.decode([stored]))[0]
    assert inner.metadata["encoding"] == b"binary/zlib", "the user's codec did not run before encryption"
    assert await chained.decode([stored], [str]) == ["a prompt " * 50]


def test_a_worker_with_encryption_on_and_no_key_refuses_to_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    kernelflow = Path(sys.executable).parent / "kernelflow"
    env = {
        **os.environ,
        "KERNELFLOW_ENCRYPTION_KEYS_DIR": str(tmp_path / "empty"),
        "TEMPORAL_ADDRESS": "127.0.0.1:1",
    }
    done = subprocess.run([str(kernelflow), "worker"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "encryption is on but the file key provider has no key" in done.stderr

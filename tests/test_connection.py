"""Connection profiles resolved as the `temporal` CLI resolves them (temporalio.envconfig)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel.errors import ConfigurationError
from worker.config import WorkerSettings
from worker.connection import resolve_connection


def test_connection_profiles_follow_the_temporal_cli_precedence(tmp_path: Path) -> None:
    """Flags over environment over the TOML profile; messages never show inline key material."""
    key = "-----BEGIN PRIVATE KEY-----\\nc2VjcmV0\\n-----END PRIVATE KEY-----"
    (tmp_path / "ca.pem").write_text("ca")
    (tmp_path / "temporal.toml").write_text(
        f"""
[profile.prod]
address = "temporal.prod:7233"
namespace = "prod"
[profile.prod.tls]
server_ca_cert_path = "{tmp_path / "ca.pem"}"
client_cert_data = "cert"
client_key_data = "{key}"
"""
    )
    env = {"TEMPORAL_CONFIG_FILE": str(tmp_path / "temporal.toml")}
    prod = resolve_connection(profile="prod", environ=env)
    assert (prod.target, prod.namespace) == ("temporal.prod:7233", "prod")
    assert "mutual TLS" in prod.describe() and "c2VjcmV0" not in prod.describe()
    overridden = resolve_connection(
        environ={**env, "TEMPORAL_PROFILE": "prod", "TEMPORAL_ADDRESS": "other:7233"}
    )
    assert (overridden.target, overridden.namespace) == ("other:7233", "prod")
    flagged = resolve_connection(
        WorkerSettings.from_env({}, temporal_address="flag:7233", profile="prod"),
        environ={**env, "TEMPORAL_ADDRESS": "other:7233"},
    )
    assert flagged.target == "flag:7233"
    assert resolve_connection(environ={}).target == "localhost:7233"
    with pytest.raises(ConfigurationError, match=r"profile 'prod'.*cannot be used"):
        resolve_connection(profile="prod", environ={"TEMPORAL_CONFIG_FILE": str(tmp_path / "missing.toml")})

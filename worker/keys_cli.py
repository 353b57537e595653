"""``kernelflow keys``: list, rotate, and destroy a tenant's keys (crypto-shredding), for the file provider
configured like the workers (``KERNELFLOW_ENCRYPTION_KEYS_DIR`` or ``payloads.encryption``).

Destroying a tenant's keys makes its stored prompts and answers unreadable everywhere. A pipeline still
running for that tenant could no longer read its own history and would fail, so the procedure is:
terminate the tenant's running pipelines, then destroy. ``destroy`` checks that none runs and refuses
otherwise, naming them.
"""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path
from typing import Any

from temporalio.client import Client

from kernel.errors import ConfigurationError
from worker.codec import TENANT_ID_PREFIX
from worker.config import PayloadSettings, payload_settings_from_env
from worker.keys import FileKeyProvider, load_key_provider

__all__ = ["add_keys_parser", "destroy_tenant_keys", "keys_command", "running_tenant_workflows"]


def add_keys_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="encryption keys: list, rotate, destroy a tenant's (crypto-shredding)")
    action = keys.add_subparsers(dest="keys_action", required=True, metavar="ACTION")
    init = action.add_parser("init", help="create the deployment's ring if there is none (idempotent)")
    init.add_argument("--codec-token-file", help="also write a random codec-server token here if missing")
    listing = action.add_parser("list", help="key ids of a ring, newest (encrypting) first")
    listing.add_argument("--tenant")
    rotate = action.add_parser("rotate", help="add a new key in front of the ring; older keys still decrypt")
    rotate.add_argument("--tenant")
    destroy = action.add_parser("destroy", help="delete a tenant's keys once none of its pipelines runs")
    destroy.add_argument("--tenant", required=True)
    destroy.add_argument("--address", help="Temporal frontend (env TEMPORAL_ADDRESS, default localhost:7233)")
    destroy.add_argument("--namespace", help="Temporal namespace (env TEMPORAL_NAMESPACE, default default)")


def _file_provider(settings: PayloadSettings) -> FileKeyProvider:
    encryption = settings.encryption
    if not encryption.enabled or encryption.provider != "file":
        raise ConfigurationError(
            "kernelflow keys manages the file key provider: set KERNELFLOW_ENCRYPTION_KEYS_DIR or "
            "payloads.encryption (provider: file) as for the workers; other providers manage keys themselves"
        )
    provider = load_key_provider(encryption.provider, encryption.options)
    assert isinstance(provider, FileKeyProvider)
    return provider


async def running_tenant_workflows(client: Client, tenant: str) -> list[str]:
    """Ids of the running workflows whose payloads use ``tenant``'s keys (children included)."""
    query = f'WorkflowId STARTS_WITH "{TENANT_ID_PREFIX}{tenant}/" AND ExecutionStatus = "Running"'
    return [execution.id async for execution in client.list_workflows(query)]


async def destroy_tenant_keys(client: Client, provider: FileKeyProvider, tenant: str) -> bool:
    """Destroy ``tenant``'s keys if none of its workflows runs; whether there were keys."""
    running = await running_tenant_workflows(client, tenant)
    if running:
        shown = ", ".join(running[:10]) + (f" and {len(running) - 10} more" if len(running) > 10 else "")
        raise ConfigurationError(
            f"tenant {tenant!r} still has {len(running)} running pipeline(s): {shown}. Terminate them first "
            f"(temporal workflow terminate --query 'WorkflowId STARTS_WITH \"{TENANT_ID_PREFIX}{tenant}/\"'), "
            "then destroy the keys"
        )
    return provider.destroy(tenant)


def _init(provider: FileKeyProvider, token_file: str | None) -> int:
    ring = provider.ring_path()
    if ring.exists():
        print(f"{ring} exists; left as it is")
    else:
        key = provider.add_key()
        print(f"new ring {ring} with key {key.id}")
    if token_file:
        path = Path(token_file)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(secrets.token_urlsafe(32) + "\n")
            print(f"new codec-server token in {path}")
    return 0


async def keys_command(args: argparse.Namespace) -> int:
    settings = payload_settings_from_env()
    provider = _file_provider(settings)
    if args.keys_action == "init":
        return _init(provider, args.codec_token_file)
    if args.keys_action == "list":
        ring = await provider.keys(args.tenant)
        for number, key in enumerate(ring):
            print(f"{key.id}{'  (encrypts)' if number == 0 else ''}")
        if not ring:
            print(f"no keys in {provider.ring_path(args.tenant)}")
        return 0
    if args.keys_action == "rotate":
        key = provider.add_key(args.tenant)
        print(f"new key {key.id} in {provider.ring_path(args.tenant)}; restart nothing: files are re-read")
        return 0
    from worker.app import connect
    from worker.config import WorkerSettings

    worker = WorkerSettings.from_env(
        **{k: v for k, v in {"temporal_address": args.address, "namespace": args.namespace}.items() if v}
    )
    client = await connect(worker.temporal_address, worker.namespace, payloads=settings)
    if await destroy_tenant_keys(client, provider, args.tenant):
        print(f"tenant {args.tenant!r}: keys destroyed; its stored payloads are unreadable from now on")
    else:
        print(f"tenant {args.tenant!r} had no keys")
    return 0

"""Register Kernelflow's typed search attributes in a namespace, idempotently.

A workflow that upserts a search attribute the namespace does not know fails its workflow task, so the
worker (and the embedded dev server) make sure every key in `workflows.search_attributes.ALL` exists, and
is visible, before any workflow runs. Safe to call from several workers at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError, RPCStatusCode

from workflows.search_attributes import ALL

__all__ = [
    "SearchAttributeConflictError",
    "cli_type_name",
    "ensure_search_attributes",
]

_POLL_INTERVAL_SECONDS = 0.1

_Kind: TypeAlias = IndexedValueType.ValueType


class SearchAttributeConflictError(RuntimeError):
    """A search attribute exists in the namespace with another type than Kernelflow needs."""

    def __init__(self, name: str, namespace: str, existing: str, wanted: str) -> None:
        super().__init__(name, namespace, existing, wanted)
        self.name = name
        self.namespace = namespace
        self.existing = existing
        self.wanted = wanted

    def __str__(self) -> str:
        return (
            f"search attribute {self.name!r} in namespace {self.namespace!r} has type {self.existing}, "
            f"Kernelflow needs {self.wanted}; remove it (temporal operator search-attribute remove "
            f"--name {self.name} --namespace {self.namespace}) or use another namespace"
        )


def _kind(key: SearchAttributeKey[Any]) -> _Kind:
    return IndexedValueType.ValueType(int(key.indexed_value_type))


def cli_type_name(key: SearchAttributeKey[Any]) -> str:
    """The type as the Temporal CLI spells it: `Keyword`, `KeywordList`, `Datetime`, ..."""
    enum_name = IndexedValueType.Name(_kind(key))
    words = enum_name.removeprefix("INDEXED_VALUE_TYPE_").split("_")
    return "".join(word.capitalize() for word in words)


async def ensure_search_attributes(
    client: Client,
    namespace: str,
    *,
    attributes: Sequence[SearchAttributeKey[Any]] = ALL,
    visible_timeout: float = 10.0,
) -> list[str]:
    """Add the search attributes the namespace lacks and wait until all of them are listed.

    Returns the names this call added (empty when everything was already there). Raises
    `SearchAttributeConflictError` when a name exists with another type, and `TimeoutError` when the
    attributes are still not listed after `visible_timeout` seconds.
    """
    wanted = {key.name: _kind(key) for key in attributes}
    existing = await _list_custom(client, namespace)
    _check_types(existing, wanted, namespace)

    missing = {name: kind for name, kind in wanted.items() if name not in existing}
    if missing:
        request = AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
        try:
            await client.operator_service.add_search_attributes(request)
        except RPCError as exc:
            # Another worker registering at the same moment wins the race; its result is checked below.
            if exc.status != RPCStatusCode.ALREADY_EXISTS:
                raise
            _check_types(await _list_custom(client, namespace), wanted, namespace)

    await _wait_until_listed(client, namespace, wanted, visible_timeout)
    return sorted(missing)


async def _list_custom(client: Client, namespace: str) -> dict[str, _Kind]:
    response = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    return dict(response.custom_attributes)


def _check_types(existing: Mapping[str, _Kind], wanted: Mapping[str, _Kind], namespace: str) -> None:
    for name, kind in wanted.items():
        if name in existing and existing[name] != kind:
            raise SearchAttributeConflictError(
                name, namespace, _type_label(existing[name]), _type_label(kind)
            )


def _type_label(kind: _Kind) -> str:
    return IndexedValueType.Name(kind).removeprefix("INDEXED_VALUE_TYPE_")


async def _wait_until_listed(
    client: Client, namespace: str, wanted: Mapping[str, _Kind], within: float
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        existing = await _list_custom(client, namespace)
        _check_types(existing, wanted, namespace)
        absent = sorted(set(wanted) - set(existing))
        if not absent:
            return
        if loop.time() >= deadline:
            raise TimeoutError(
                f"search attributes {', '.join(absent)} were added to namespace {namespace!r} "
                f"but are still not listed after {within:g}s"
            )
        await asyncio.sleep(_POLL_INTERVAL_SECONDS)

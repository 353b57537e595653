"""The provider registry: entry points, explicit registration, aliases, model strings, describe()."""

from __future__ import annotations

from typing import ClassVar

import pytest

from kernel.contracts import ChatRequest, ChatResponse
from kernel.errors import MissingCredentials, PluginError, UnknownProvider
from kernel.provider import KERNEL_API_VERSION, Provider, ProviderSettings
from kernel.registry import ENTRY_POINT_GROUP, ModelRef, Registry, parse_model_ref
from providers.openai import OpenAIProvider


class _Echo(Provider):
    name = "echo"
    version = "2.3.4"
    api_key_env: ClassVar[str | None] = "ECHO_API_KEY"

    async def chat(self, request: ChatRequest) -> ChatResponse:
        raise NotImplementedError


class _OtherEcho(Provider):
    name = "echo"

    async def chat(self, request: ChatRequest) -> ChatResponse:
        raise NotImplementedError


class _Future(Provider):
    name = "future"
    version = "9.0.0"
    kernel_api = (KERNEL_API_VERSION + 1, KERNEL_API_VERSION + 2)

    async def chat(self, request: ChatRequest) -> ChatResponse:
        raise NotImplementedError


# --- entry points -----------------------------------------------------------------------------------


def test_builtin_openai_arrives_through_the_entry_point_group() -> None:
    registry = Registry()
    added = registry.load_entry_points()
    assert ENTRY_POINT_GROUP == "kernelflow.providers"
    assert "openai" in added
    assert registry.provider_class("openai") is OpenAIProvider
    [row] = [r for r in registry.describe() if r["name"] == "openai"]
    assert "entry point 'openai'" in row["source"]
    assert "providers.openai:OpenAIProvider" in row["source"]


def test_loading_entry_points_twice_is_harmless() -> None:
    registry = Registry()
    registry.load_entry_points()
    assert registry.load_entry_points() == []
    assert "openai" in registry.names


def test_empty_group_adds_nothing() -> None:
    registry = Registry()
    assert registry.load_entry_points("kernelflow.no-such-group") == []
    assert registry.names == []


def test_plugin_clashing_with_an_entry_point_names_both() -> None:
    class Impostor(OpenAIProvider):
        pass

    registry = Registry()
    registry.load_entry_points()
    with pytest.raises(PluginError) as info:
        registry.register(Impostor, source="acme-llm 1.0")
    message = str(info.value)
    assert "'openai'" in message
    assert "providers.openai:OpenAIProvider" in message
    assert "acme-llm 1.0" in message
    assert registry.provider_class("openai") is OpenAIProvider


# --- explicit registration --------------------------------------------------------------------------


def test_explicit_registration() -> None:
    registry = Registry()
    registry.register(_Echo)
    assert registry.names == ["echo"]
    assert registry.provider_class("echo") is _Echo
    registry.register(_Echo)  # the same class again is a no-op
    assert registry.names == ["echo"]


def test_duplicate_name_refused_naming_both_sources() -> None:
    registry = Registry()
    registry.register(_Echo, source="pkg-one")
    with pytest.raises(PluginError) as info:
        registry.register(_OtherEcho, source="pkg-two")
    message = str(info.value)
    assert "'echo'" in message and "pkg-one" in message and "pkg-two" in message
    assert registry.provider_class("echo") is _Echo


def test_duplicate_name_with_default_sources_names_both_classes() -> None:
    registry = Registry()
    registry.register(_Echo)
    with pytest.raises(PluginError) as info:
        registry.register(_OtherEcho)
    assert "_Echo" in str(info.value) and "_OtherEcho" in str(info.value)


def test_incompatible_kernel_api_refused_naming_plugin_and_versions() -> None:
    registry = Registry()
    with pytest.raises(PluginError) as info:
        registry.register(_Future, source="future-plugin")
    message = str(info.value)
    assert "'future'" in message
    assert "9.0.0" in message
    assert f"{KERNEL_API_VERSION + 1}..{KERNEL_API_VERSION + 2}" in message
    assert f"API {KERNEL_API_VERSION}" in message
    assert registry.names == []


def test_not_a_provider_is_refused() -> None:
    with pytest.raises(PluginError, match=r"not a kernel\.Provider"):
        Registry().register(dict)  # type: ignore[arg-type]


def test_name_with_slash_is_refused() -> None:
    class Slashed(_Echo):
        name = "a/b"

    with pytest.raises(PluginError, match="name"):
        Registry().register(Slashed)


# --- model strings and aliases ----------------------------------------------------------------------


def test_parse_model_ref_splits_on_the_first_slash_only() -> None:
    assert parse_model_ref("openai/gpt-4o") == ModelRef("openai", "gpt-4o")
    ref = parse_model_ref("together/meta-llama/Llama-3-70b-chat-hf")
    assert ref == ModelRef("together", "meta-llama/Llama-3-70b-chat-hf")
    assert str(ref) == "together/meta-llama/Llama-3-70b-chat-hf"
    assert parse_model_ref("fast") is None


@pytest.mark.parametrize("value", ["/gpt-4o", "openai/"])
def test_half_model_ref_is_refused(value: str) -> None:
    with pytest.raises(UnknownProvider, match="provider/model"):
        parse_model_ref(value)


def test_resolve_provider_model_with_slashes() -> None:
    registry = Registry()
    registry.register(_Echo)
    provider, model = registry.resolve("echo/org/model/v1")
    assert isinstance(provider, _Echo)
    assert model == "org/model/v1"
    assert registry.resolve("echo/x")[0] is provider  # one instance per provider


def test_alias_resolution_follows_chains() -> None:
    registry = Registry(aliases={"smart": "echo/big", "default": "smart"})
    registry.register(_Echo)
    assert registry.resolve_ref("default") == ModelRef("echo", "big")
    assert registry.resolve_ref("smart") == ModelRef("echo", "big")
    assert registry.aliases == {"smart": "echo/big", "default": "smart"}


def test_alias_loop_is_reported_with_its_path() -> None:
    registry = Registry(aliases={"a": "b", "b": "c", "c": "a"})
    with pytest.raises(UnknownProvider) as info:
        registry.resolve_ref("a")
    assert "alias loop" in str(info.value)
    assert "a -> b -> c -> a" in str(info.value)


def test_alias_may_not_contain_slash() -> None:
    with pytest.raises(UnknownProvider):
        Registry().set_alias("openai/fast", "openai/gpt-4o-mini")


def test_unknown_alias_lists_aliases_and_providers() -> None:
    registry = Registry(aliases={"fast": "echo/small"})
    registry.register(_Echo)
    with pytest.raises(UnknownProvider) as info:
        registry.resolve("quick")
    message = str(info.value)
    assert "'quick'" in message and "fast" in message and "echo" in message


def test_unknown_provider_lists_what_is_available() -> None:
    registry = Registry()
    registry.register(_Echo)
    with pytest.raises(UnknownProvider) as info:
        registry.resolve("anthropc/claude-sonnet-4")
    assert "'anthropc'" in str(info.value)
    assert "available: echo" in str(info.value)


def test_alias_to_unknown_provider_is_refused() -> None:
    registry = Registry(aliases={"fast": "nowhere/model"})
    registry.register(_Echo)
    with pytest.raises(UnknownProvider, match="nowhere"):
        registry.resolve("fast")


# --- credentials and describe() ---------------------------------------------------------------------


def test_describe_never_shows_the_key_but_says_whether_it_is_present() -> None:
    secret = "sk-very-secret-value-123"
    with_env = Registry(environ={"ECHO_API_KEY": secret})
    with_env.register(_Echo)
    [row] = with_env.describe()
    assert row["credentials_present"] is True
    assert row["credentials_env"] == "ECHO_API_KEY"
    assert row["name"] == "echo" and row["version"] == "2.3.4"
    assert secret not in repr(row)

    with_settings = Registry(settings={"echo": ProviderSettings(api_key=secret)}, environ={})
    with_settings.register(_Echo)
    [row] = with_settings.describe()
    assert row["credentials_present"] is True
    assert secret not in repr(row)
    assert secret not in repr(with_settings.get("echo").settings)

    without = Registry(environ={})
    without.register(_Echo)
    [row] = without.describe()
    assert row["credentials_present"] is False


def test_missing_credentials_names_the_env_var() -> None:
    registry = Registry(environ={})
    registry.register(_Echo)
    provider, _ = registry.resolve("echo/m")
    with pytest.raises(MissingCredentials) as info:
        provider.api_key()
    assert info.value.env_var == "ECHO_API_KEY"
    assert "ECHO_API_KEY" in str(info.value)
    assert info.value.provider == "echo"


def test_configure_replaces_the_instance_and_its_settings() -> None:
    registry = Registry(environ={})
    registry.register(_Echo)
    before = registry.get("echo")
    registry.configure("echo", ProviderSettings(api_key="k"))
    after = registry.get("echo")
    assert after is not before
    assert after.api_key() == "k"


async def test_aclose_releases_instances() -> None:
    registry = Registry(environ={})
    registry.register(_Echo)
    first = registry.get("echo")
    await registry.aclose()
    assert registry.get("echo") is not first


# --- entry points publishing factories (how data-defined presets arrive) ------------------------------


def _fresh_preset_classes() -> list[type[Provider]]:
    """Builds new classes on every call, as a data-defined preset factory does."""
    return [
        type("AlphaProvider", (_Echo,), {"name": "alpha"}),
        type("BetaProvider", (_Echo,), {"name": "beta"}),
    ]


def _broken_factory() -> int:
    return 42


def _entry_points(monkeypatch: pytest.MonkeyPatch, *values: tuple[str, str]) -> None:
    import importlib.metadata

    points = [importlib.metadata.EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in values]

    def fake(*, group: str) -> list[importlib.metadata.EntryPoint]:
        return points if group == ENTRY_POINT_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)


def test_entry_point_factory_registers_every_class(monkeypatch: pytest.MonkeyPatch) -> None:
    _entry_points(monkeypatch, ("presets", f"{__name__}:_fresh_preset_classes"))
    registry = Registry()
    assert registry.load_entry_points() == ["alpha", "beta"]
    assert "entry point 'presets'" in registry.describe()[0]["source"]


def test_reloading_a_factory_entry_point_is_harmless(monkeypatch: pytest.MonkeyPatch) -> None:
    _entry_points(monkeypatch, ("presets", f"{__name__}:_fresh_preset_classes"))
    registry = Registry()
    registry.load_entry_points()
    assert registry.load_entry_points() == []
    assert registry.names == ["alpha", "beta"]


def test_entry_point_that_cannot_load_names_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    _entry_points(monkeypatch, ("ghost", "no_such_module_anywhere:Provider"))
    with pytest.raises(PluginError) as info:
        Registry().load_entry_points()
    assert "'ghost'" in str(info.value) and "no_such_module_anywhere" in str(info.value)


def test_entry_point_factory_returning_garbage_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _entry_points(monkeypatch, ("broken", f"{__name__}:_broken_factory"))
    with pytest.raises(PluginError, match="iterable of Provider classes"):
        Registry().load_entry_points()

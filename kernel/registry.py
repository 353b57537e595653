"""The provider registry: which plugin serves a ``provider/model`` string.

Plugins arrive through the ``kernelflow.providers`` entry-point group (the built-ins too, so that path
is always exercised) or by explicit ``register``. An entry point names either a ``Provider`` subclass
or a callable returning an iterable of them (how data-defined presets are published).
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from kernel.errors import PluginError, UnknownProvider
from kernel.provider import KERNEL_API_VERSION, Provider, ProviderSettings

__all__ = ["ENTRY_POINT_GROUP", "ModelRef", "Registry", "parse_model_ref"]

ENTRY_POINT_GROUP = "kernelflow.providers"


@dataclass(frozen=True, slots=True)
class ModelRef:
    provider: str
    model: str

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"


def parse_model_ref(value: str) -> ModelRef | None:
    """``"openai/gpt-4o"`` → ModelRef; a string without ``/`` is an alias and gives ``None``.
    Only the first ``/`` splits, so models such as ``together/meta-llama/Llama-3-70b`` work."""
    provider, sep, model = value.partition("/")
    if not sep:
        return None
    if not provider or not model:
        raise UnknownProvider(
            f"model {value!r} is not of the form 'provider/model' (for example 'openai/gpt-4o-mini')"
        )
    return ModelRef(provider, model)


@dataclass(slots=True)
class _Entry:
    cls: type[Provider]
    source: str


class Registry:
    """Provider classes by name, their settings, model aliases, and lazily built instances."""

    def __init__(
        self,
        *,
        settings: Mapping[str, ProviderSettings] | None = None,
        aliases: Mapping[str, str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._entries: dict[str, _Entry] = {}
        self._instances: dict[str, Provider] = {}
        self._settings: dict[str, ProviderSettings] = dict(settings or {})
        self._aliases: dict[str, str] = {}
        self._environ = environ
        for alias, target in (aliases or {}).items():
            self.set_alias(alias, target)

    # --- registration ----------------------------------------------------------------------------

    def register(self, cls: type[Provider], *, source: str | None = None) -> None:
        """Add a provider class. Refuses a kernel API it was not written for, or a name already taken
        by another plugin (naming both)."""
        if not (inspect.isclass(cls) and issubclass(cls, Provider)):
            raise PluginError(f"{source or cls!r} is not a kernel.Provider subclass")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name or "/" in name:
            raise PluginError(f"plugin {_qualname(cls)} needs a class attribute 'name' without '/'")
        source = source or _qualname(cls)
        low, high = cls.kernel_api
        if not low <= KERNEL_API_VERSION <= high:
            raise PluginError(
                f"plugin {name!r} ({source}, version {cls.version}) supports kernel API {low}..{high}, "
                f"but this kernel speaks API {KERNEL_API_VERSION}; upgrade the plugin or Kernelflow"
            )
        existing = self._entries.get(name)
        if existing is not None:
            if existing.cls is cls:
                return
            raise PluginError(
                f"two plugins are named {name!r}: {existing.source} and {source}; uninstall one or rename it"
            )
        self._entries[name] = _Entry(cls, source)

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> list[str]:
        """Register every plugin published in the entry-point group; returns the names added."""
        added: list[str] = []
        for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "unknown distribution"
            source = f"entry point {ep.name!r} = {ep.value} ({dist})"
            try:
                target = ep.load()
            except Exception as exc:
                raise PluginError(f"cannot load {source}: {type(exc).__name__}: {exc}") from exc
            for cls in _provider_classes(target, source):
                existing = self._entries.get(getattr(cls, "name", ""))
                if existing is not None and existing.source == source:
                    continue  # already loaded from this entry point (factories build new classes per call)
                before = set(self._entries)
                self.register(cls, source=source)
                added.extend(sorted(set(self._entries) - before))
        return added

    def configure(self, name: str, settings: ProviderSettings) -> None:
        self._settings[name] = settings
        self._instances.pop(name, None)

    def set_alias(self, alias: str, target: str) -> None:
        if "/" in alias:
            raise UnknownProvider(f"alias {alias!r} may not contain '/'")
        self._aliases[alias] = target

    # --- lookup ----------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def provider_class(self, name: str) -> type[Provider]:
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownProvider(f"no provider named {name!r}; available: {', '.join(self.names) or 'none'}")
        return entry.cls

    def get(self, name: str) -> Provider:
        instance = self._instances.get(name)
        if instance is None:
            cls = self.provider_class(name)
            instance = cls(settings=self._settings.get(name), environ=self._environ)
            self._instances[name] = instance
        return instance

    def resolve_ref(self, value: str) -> ModelRef:
        """Follow aliases until a ``provider/model`` reference whose provider is registered."""
        seen: list[str] = []
        current = value
        while (ref := parse_model_ref(current)) is None:
            if current in seen:
                raise UnknownProvider(f"alias loop: {' -> '.join([*seen, current])}")
            seen.append(current)
            target = self._aliases.get(current)
            if target is None:
                raise UnknownProvider(
                    f"{value!r} is neither 'provider/model' nor a known alias; "
                    f"aliases: {', '.join(sorted(self._aliases)) or 'none'}; "
                    f"providers: {', '.join(self.names) or 'none'}"
                )
            current = target
        self.provider_class(ref.provider)
        return ref

    def resolve(self, value: str) -> tuple[Provider, str]:
        """The provider instance and the provider's own model name for ``value``."""
        ref = self.resolve_ref(value)
        return self.get(ref.provider), ref.model

    def describe(self) -> list[dict[str, Any]]:
        rows = []
        for name in self.names:
            row = self.get(name).describe()
            row["source"] = self._entries[name].source
            rows.append(row)
        return rows

    async def aclose(self) -> None:
        instances, self._instances = self._instances, {}
        for instance in instances.values():
            await instance.aclose()


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"


def _provider_classes(target: Any, source: str) -> Iterable[type[Provider]]:
    if inspect.isclass(target):
        return [cast("type[Provider]", target)]
    if callable(target):
        factory: Callable[[], Any] = target
        produced = factory()
        try:
            return list(produced)
        except TypeError as exc:
            raise PluginError(f"{source} must return an iterable of Provider classes") from exc
    raise PluginError(f"{source} is neither a Provider subclass nor a callable returning them")

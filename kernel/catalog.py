"""What is known about each model, as data: context window, output limit, parameters it refuses,
capabilities and list prices, each fact with its source (``kernel/models.yaml``).

The catalog is applied before a call, to known models only: a request the model would refuse with a
400 is refused here with a message naming the field, or, when the request asks for ``lenient`` mode,
the offending fields are dropped and each drop is recorded as a warning on the response. Models the
catalog does not list (fine-tunes, new releases, Azure deployment names without a mapping to their
base model) pass through unchanged. Prices in the catalog are the default ``PriceTable``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kernel.contracts import ChatRequest
from kernel.errors import ConfigurationError, UnsupportedCapability

__all__ = [
    "REQUEST_OPTIONS",
    "ModelCatalog",
    "ModelFacts",
    "ModelRules",
    "Prepared",
    "PriceFacts",
    "apply_rules",
    "default_catalog",
    "set_fields",
]

REQUEST_OPTIONS: tuple[str, ...] = (
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "user",
    "parallel_tool_calls",
    "reasoning_effort",
    "thinking_budget",
    "service_tier",
    "cache",
    "provider_options",
)
"""The optional ``ChatRequest`` fields a provider or a model may refuse."""

_REMEMBERED = 4096
"""How many (vendor, model) lookups and compiled rules are remembered before starting afresh."""
_NEEDS = {"reasoning_effort": "reasoning_effort", "thinking_budget": "thinking"}
"""Options a known model takes only when its capabilities list the named one."""
_FACTS = ("context_window", "max_output_tokens", "reasoning", "refuses", "ignores", "exclusive",
          "max_tokens_field", "capabilities")  # fmt: skip


class PriceFacts(BaseModel):
    """List prices in USD per million tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    cache_write_input: float | None = Field(default=None, ge=0)


class ModelFacts(BaseModel):
    """One model. ``refuses`` are fields the API answers with a 400; ``ignores`` are fields it accepts
    and has no effect (dropped with a warning, never sent); ``exclusive`` lists groups of which at most
    one field may be given."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vendor: str
    name: str
    context_window: int | None = Field(default=None, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    reasoning: bool = False
    refuses: tuple[str, ...] = ()
    ignores: tuple[str, ...] = ()
    exclusive: tuple[tuple[str, ...], ...] = ()
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] | None = None
    capabilities: tuple[str, ...] = ()
    price: PriceFacts | None = None
    sources: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _every_fact_has_a_source(self) -> ModelFacts:
        facts = [name for name in _FACTS if name in self.model_fields_set]
        if facts and not self.sources.get("facts"):
            raise ValueError(f"gives {', '.join(facts)} without a source (sources.facts)")
        if self.price is not None and not self.sources.get("price"):
            raise ValueError("gives a price without a source (sources.price)")
        for name in (*self.refuses, *self.ignores, *(f for group in self.exclusive for f in group)):
            if name not in REQUEST_OPTIONS:
                raise ValueError(
                    f"names {name!r}, which is not a request option ({', '.join(REQUEST_OPTIONS)})"
                )
        return self


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request made acceptable to its model, and what was dropped to get there."""

    request: ChatRequest
    warnings: tuple[str, ...] = ()


class ModelCatalog:
    """Facts by vendor and model name. A name matches exactly, else by its longest listed prefix
    followed by ``-`` (dated snapshots), after a Bedrock cross-region prefix (``us.``) is removed."""

    def __init__(self, models: Iterable[ModelFacts] = ()) -> None:
        self._models: dict[str, dict[str, ModelFacts]] = {}
        for facts in models:
            self._models.setdefault(facts.vendor, {})[facts.name] = facts
        self._found: dict[tuple[str, str], ModelFacts | None] = {}  # lookups made, the catalog is fixed

    def vendors(self) -> list[str]:
        return sorted(self._models)

    def models(self, vendor: str) -> list[ModelFacts]:
        return list(self._models.get(vendor, {}).values())

    def lookup(self, vendor: str, model: str) -> ModelFacts | None:
        key = (vendor, model)
        try:
            return self._found[key]
        except KeyError:
            pass
        if len(self._found) >= _REMEMBERED:
            self._found.clear()  # model names come from requests: keep the memory bounded
        found = self._found[key] = self._find(vendor, model)
        return found

    def _find(self, vendor: str, model: str) -> ModelFacts | None:
        known = self._models.get(vendor)
        if not known:
            return None
        name = model.rsplit("/", 1)[-1]
        if vendor == "bedrock" and name.count(".") >= 2:
            name = name.split(".", 1)[1]  # us.anthropic.claude-... -> anthropic.claude-...
        exact = known.get(name)
        if exact is not None:
            return exact
        best: str | None = None
        for candidate in known:
            if name.startswith(candidate + "-") and (best is None or len(candidate) > len(best)):
                best = candidate
        return known[best] if best is not None else None

    def with_models(self, models: Iterable[ModelFacts]) -> ModelCatalog:
        """A copy with ``models`` added or replacing the listed ones."""
        merged = [facts for vendor in self._models.values() for facts in vendor.values()]
        return ModelCatalog([*merged, *models])


def _parse(raw: Any, *, where: str) -> list[ModelFacts]:
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"{where} must map vendors to their models")
    found: list[ModelFacts] = []
    for vendor, models in raw.items():
        if not isinstance(models, Mapping):
            raise ConfigurationError(f"{where}: {vendor} must map model names to their facts")
        for name, fields in models.items():
            if str(name).startswith("_"):
                continue  # anchors shared by several entries
            try:
                found.append(
                    ModelFacts.model_validate({**dict(fields or {}), "vendor": vendor, "name": name})
                )
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or '(entry)'}: {e['msg']}" for e in exc.errors()
                )
                raise ConfigurationError(f"{where}: {vendor}/{name}: {problems}") from exc
    return found


@cache
def default_catalog() -> ModelCatalog:
    """The catalog shipped in ``kernel/models.yaml``."""
    text = resources.files("kernel").joinpath("models.yaml").read_text(encoding="utf-8")
    return ModelCatalog(_parse(yaml.safe_load(text), where="kernel/models.yaml"))


def set_fields(request: ChatRequest) -> list[str]:
    """The optional request options this request actually uses, in ``REQUEST_OPTIONS`` order."""
    values = request.__dict__
    used = []
    for name in REQUEST_OPTIONS:
        value = values[name]
        if value is not None and value != [] and value != {}:
            used.append(name)
    return used


@dataclass(frozen=True, slots=True)
class ModelRules:
    """What ``provider`` cannot honour and what ``model`` refuses, worked out once per provider and
    model (``ModelRules.build``); ``apply`` then does only the per-request part: which options the
    request uses. ``Provider.prepare_chat`` keeps one per model."""

    provider: str
    model: str
    drops: tuple[tuple[str, str], ...] = ()
    """(option, why it is dropped), in the order the reasons are reported."""
    exclusive: tuple[tuple[str, ...], ...] = ()
    max_output_tokens: int | None = None
    watched: frozenset[str] = frozenset()
    """Every option a rule names: a request using none of them passes as it is."""

    @classmethod
    def build(
        cls, *, provider: str, model: str, unsupported: Iterable[str] = (), facts: ModelFacts | None = None
    ) -> ModelRules:
        label = f"{provider}/{model}"
        drops: dict[str, str] = {}
        for name in unsupported:
            drops.setdefault(name, f"{provider} has no equivalent of {name!r}")
        exclusive: tuple[tuple[str, ...], ...] = ()
        max_output: int | None = None
        if facts is not None:
            for name in facts.refuses:
                drops.setdefault(name, f"model {label} refuses {name!r}")
            for name in facts.ignores:
                drops.setdefault(name, f"model {label} ignores {name!r}")
            for name, capability in _NEEDS.items():
                if facts.capabilities and capability not in facts.capabilities:
                    drops.setdefault(
                        name, f"model {label} has no {capability} (it has {', '.join(facts.capabilities)})"
                    )
            exclusive = facts.exclusive
            max_output = facts.max_output_tokens
        watched = frozenset(drops) | frozenset(name for group in exclusive for name in group)
        return cls(provider, model, tuple(drops.items()), exclusive, max_output, watched)

    def apply(self, request: ChatRequest, *, lenient: bool | None = None) -> Prepared:
        """``request`` checked against these rules (see ``apply_rules``); ``lenient`` overrides the
        request's own ``lenient``."""
        clamp: int | None = None
        if self.max_output_tokens and (request.max_tokens or 0) > self.max_output_tokens:
            clamp = self.max_output_tokens
        used = set_fields(request)
        if clamp is None and self.watched.isdisjoint(used):
            return Prepared(request)
        drops = {name: why for name, why in self.drops if name in used}
        label = f"{self.provider}/{request.model}"
        for group in self.exclusive:
            given = [name for name in group if name in used and name not in drops]
            for name in given[1:]:
                drops[name] = f"model {label} takes only one of {', '.join(group)} (kept {given[0]!r})"
        if not drops and clamp is None:
            return Prepared(request)
        if not (request.lenient if lenient is None else lenient):
            problems = [f"{name}: {why}" for name, why in drops.items()]
            if clamp is not None:
                problems.append(
                    f"max_tokens: {request.max_tokens} is above the model's output limit of {clamp}"
                )
            raise UnsupportedCapability(
                f"request for {label} cannot be sent as is: {'; '.join(problems)}. Remove these fields, or "
                "set lenient to drop them with a warning",
                provider=self.provider,
                model=request.model,
            )
        update: dict[str, Any] = {name: None for name in drops}
        warnings = [f"dropped {name}: {why}" for name, why in drops.items()]
        if clamp is not None:
            update["max_tokens"] = clamp
            warnings.append(
                f"lowered max_tokens from {request.max_tokens} to {clamp}, the output limit of {label}"
            )
        return Prepared(request.model_copy(update=update), tuple(warnings))


def apply_rules(
    request: ChatRequest,
    *,
    provider: str,
    unsupported: Iterable[str] = (),
    facts: ModelFacts | None = None,
) -> Prepared:
    """Check ``request`` against what ``provider`` cannot honour (``unsupported``) and what the model
    refuses (``facts``, when the model is known). Strict (the default): raise ``UnsupportedCapability``
    naming every offending field. Lenient (``request.lenient``): drop them and say so in warnings."""
    rules = ModelRules.build(provider=provider, model=request.model, unsupported=unsupported, facts=facts)
    return rules.apply(request)

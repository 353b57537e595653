"""Safe expressions for ``when:`` guards, ``switch`` cases, ``transform`` steps and native values.

An expression is a Jinja expression (``steps.classify.output.urgency == 'high'``,
``inputs.items | map(attribute='name') | list``) compiled by the same immutable sandbox as the
templates: no attribute starting with ``_``, no method that mutates, no imports, no I/O, and undefined
names are errors. It evaluates to a Python value, not text.

``render_value`` gives templates a native mode: a string that is exactly one ``{{ expression }}``
evaluates to the expression's value (a list stays a list); any other string renders as text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kernel.errors import PipelineError
from kernel.templating import TemplateRefs, render, template_refs

__all__ = [
    "evaluate",
    "expression_refs",
    "is_single_expression",
    "render_value",
    "strip_braces",
    "truthy",
    "value_refs",
]

_ENV = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
_SINGLE = re.compile(r"^\s*\{\{(?P<body>(?:(?!\}\}|\{\{).)*)\}\}\s*$", re.DOTALL)


def strip_braces(source: str) -> str:
    """``{{ x }}`` and ``x`` mean the same expression."""
    match = _SINGLE.match(source)
    return match.group("body").strip() if match else source.strip()


def is_single_expression(source: str) -> bool:
    return _SINGLE.match(source) is not None


@lru_cache(maxsize=1024)
def _compile(source: str) -> Callable[..., Any]:
    return _ENV.compile_expression(source, undefined_to_none=False)


def _syntax_error(exc: jinja2.TemplateSyntaxError, location: str) -> PipelineError:
    return PipelineError(f"{location}: expression syntax error: {exc.message}", location=location)


def evaluate(source: str, context: Mapping[str, Any], *, location: str) -> Any:
    """The value of expression ``source``; failures are ``PipelineError`` naming ``location``."""
    expression = strip_braces(source)
    try:
        value = _compile(expression)(**context)
    except jinja2.TemplateSyntaxError as exc:
        raise _syntax_error(exc, location) from exc
    except jinja2.UndefinedError as exc:
        raise PipelineError(
            f"{location}: expression refers to something undefined: {exc}", location=location
        ) from exc
    except jinja2.TemplateError as exc:
        raise PipelineError(f"{location}: expression failed: {exc}", location=location) from exc
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError, IndexError) as exc:
        raise PipelineError(
            f"{location}: expression failed: {type(exc).__name__}: {exc}", location=location
        ) from exc
    if isinstance(value, jinja2.Undefined):
        raise PipelineError(f"{location}: expression {expression!r} is undefined", location=location)
    return value


def truthy(source: str, context: Mapping[str, Any], *, location: str) -> bool:
    return bool(evaluate(source, context, location=location))


def render_value(value: Any, context: Mapping[str, Any], *, location: str) -> Any:
    """Render every string in ``value`` (lists and mappings recursively); a string that is exactly
    one ``{{ expression }}`` keeps the expression's type."""
    if isinstance(value, str):
        if is_single_expression(value):
            return evaluate(value, context, location=location)
        return render(value, context, location=location)
    if isinstance(value, list):
        return [render_value(v, context, location=f"{location}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: render_value(v, context, location=f"{location}.{k}") for k, v in value.items()}
    return value


def expression_refs(source: str, *, location: str) -> TemplateRefs:
    """Parse expression ``source`` (syntax errors name ``location``) and list what it reads."""
    expression = strip_braces(source)
    if not expression:
        raise PipelineError(f"{location}: the expression is empty", location=location)
    try:
        _ENV.compile_expression(expression)
    except jinja2.TemplateSyntaxError as exc:
        raise _syntax_error(exc, location) from exc
    return template_refs("{{ " + expression + " }}", location=location)


def value_refs(value: Any, *, location: str) -> list[TemplateRefs]:
    """The references of every template string inside ``value``."""
    if isinstance(value, str):
        return [template_refs(value, location=location)]
    if isinstance(value, list):
        return [r for i, v in enumerate(value) for r in value_refs(v, location=f"{location}[{i}]")]
    if isinstance(value, dict):
        return [r for k, v in value.items() for r in value_refs(v, location=f"{location}.{k}")]
    return []

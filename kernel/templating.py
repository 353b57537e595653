"""Sandboxed Jinja2 templates for prompts and outputs.

Rendering is pure and deterministic (no I/O, no clocks), so workflows may render. Undefined names are
errors, never empty strings: a prompt that silently lost its input is worse than a failed step.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kernel.errors import PipelineError

__all__ = ["TemplateRefs", "render", "template_refs"]

_ENV = ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
)


@lru_cache(maxsize=1024)
def _compile(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


def render(source: str, context: Mapping[str, Any], *, location: str) -> str:
    """Render ``source`` with ``context``; failures are ``PipelineError`` naming ``location``."""
    if "{" not in source:
        return source
    try:
        return _compile(source).render(context)
    except jinja2.UndefinedError as exc:
        raise PipelineError(
            f"{location}: template refers to something undefined: {exc}", location=location
        ) from exc
    except jinja2.TemplateError as exc:
        raise PipelineError(f"{location}: template failed: {exc}", location=location) from exc
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as exc:
        raise PipelineError(
            f"{location}: template failed: {type(exc).__name__}: {exc}", location=location
        ) from exc


class TemplateRefs:
    """Names a template reads: top-level variables and ``steps.<id>`` / ``inputs.<name>`` attributes."""

    def __init__(self) -> None:
        self.variables: set[str] = set()
        self.attributes: dict[str, set[str]] = {}


def template_refs(source: str, *, location: str) -> TemplateRefs:
    """Parse ``source`` (syntax errors name ``location``) and list what it refers to."""
    try:
        tree = _ENV.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise PipelineError(
            f"{location}: template syntax error on line {exc.lineno}: {exc.message}", location=location
        ) from exc
    refs = TemplateRefs()
    local_names = {n.name for n in tree.find_all(nodes.Name) if n.ctx in ("store", "param")}
    for node in tree.find_all(nodes.Name):
        if node.ctx == "load" and node.name not in local_names:
            refs.variables.add(node.name)
    for getattr_node in _attribute_nodes(tree):
        target = getattr_node.node
        if isinstance(target, nodes.Name) and target.ctx == "load" and target.name not in local_names:
            attr = getattr_node.attr if isinstance(getattr_node, nodes.Getattr) else _const_arg(getattr_node)
            if attr is not None:
                refs.attributes.setdefault(target.name, set()).add(attr)
    return refs


def _attribute_nodes(tree: nodes.Node) -> Iterator[nodes.Getattr | nodes.Getitem]:
    yield from tree.find_all(nodes.Getattr)
    yield from tree.find_all(nodes.Getitem)


def _const_arg(node: nodes.Getattr | nodes.Getitem) -> str | None:
    if (
        isinstance(node, nodes.Getitem)
        and isinstance(node.arg, nodes.Const)
        and isinstance(node.arg.value, str)
    ):
        return node.arg.value
    return None

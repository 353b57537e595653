"""Pipeline specs: validation that names step and field, input resolution, the template sandbox."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from kernel.errors import PipelineError
from kernel.pipeline import LlmStep, load_pipeline, parse_pipeline
from kernel.templating import render, template_refs

_YAML = """
name: ticket-triage
description: Classify a support ticket and draft a reply.
inputs:
  ticket: {type: string, description: the customer's message}
  max_words: {type: integer, default: 80}
steps:
  - id: classify
    model: openai/gpt-4o-mini
    fallbacks: [anthropic/claude-3-5-haiku]
    system: You sort support tickets.
    prompt: "Classify: {{ inputs.ticket }}"
    output: json
    response_format:
      type: json_schema
      json_schema:
        name: label
        schema: {type: object, properties: {label: {type: string}}}
  - id: reply
    model: fast
    messages:
      - role: system
        content: Answer in at most {{ inputs.max_words }} words.
      - role: user
        content: "Ticket ({{ steps.classify.output.label }}): {{ inputs.ticket }}"
outputs:
  label: "{{ steps.classify.output.label }}"
  reply: "{{ steps['reply'].text }}"
"""


def _base() -> dict[str, Any]:
    return {
        "name": "p",
        "inputs": {"topic": {"type": "string"}},
        "steps": [
            {"id": "first", "model": "openai/gpt-4o", "prompt": "About {{ inputs.topic }}"},
            {"id": "second", "model": "openai/gpt-4o", "prompt": "Refine {{ steps.first.text }}"},
        ],
    }


def _refused(data: dict[str, Any] | str) -> str:
    with pytest.raises(PipelineError) as info:
        parse_pipeline(data)
    return str(info.value)


def test_valid_spec_parses_from_yaml_text() -> None:
    spec = parse_pipeline(_YAML)
    assert spec.name == "ticket-triage"
    assert [s.id for s in spec.steps] == ["classify", "reply"]
    classify = spec.step("classify")
    assert isinstance(classify, LlmStep)
    assert classify.fallbacks == ["anthropic/claude-3-5-haiku"]
    assert [m.role for m in classify.message_templates()] == ["system", "user"]
    assert spec.models() == ["anthropic/claude-3-5-haiku", "fast", "openai/gpt-4o-mini"]
    assert spec.inputs["max_words"].required is False
    assert spec.inputs["ticket"].required is True


def test_load_pipeline_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "triage.yaml"
    path.write_text(_YAML, encoding="utf-8")
    assert load_pipeline(path).name == "ticket-triage"


def test_load_pipeline_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: p\nsteps: []\n", encoding="utf-8")
    with pytest.raises(PipelineError, match=r"broken\.yaml"):
        load_pipeline(path)
    with pytest.raises(PipelineError, match=r"missing\.yaml"):
        load_pipeline(tmp_path / "missing.yaml")


def test_unknown_field_is_named_with_its_step() -> None:
    data = _base()
    data["steps"][1]["temprature"] = 0.3
    message = _refused(data)
    assert "steps[1]" in message
    assert "temprature" in message
    assert "unknown field" in message


def test_unknown_top_level_field() -> None:
    data = _base()
    data["output"] = {}
    assert "pipeline.output: unknown field" in _refused(data)


def test_duplicate_step_id() -> None:
    data = _base()
    data["steps"][1]["id"] = "first"
    message = _refused(data)
    assert "'first'" in message and "used twice" in message


def test_template_reading_a_later_step() -> None:
    data = _base()
    data["steps"][0]["prompt"] = "Use {{ steps.second.text }}"
    message = _refused(data)
    assert "step 'first'" in message
    assert "steps.second" in message
    assert "does not run before it" in message


def test_template_reading_a_step_that_does_not_exist() -> None:
    data = _base()
    data["steps"][1]["prompt"] = "Use {{ steps.thrid.text }}"
    message = _refused(data)
    assert "step 'second'" in message and "steps.thrid" in message and "is no step" in message
    assert "first" in message  # the steps it could read


def test_template_reading_a_step_by_subscript() -> None:
    data = _base()
    data["steps"][1]["prompt"] = "Use {{ steps['nope'].text }}"
    assert "steps.nope" in _refused(data)


def test_template_reading_an_undeclared_input() -> None:
    data = _base()
    data["steps"][0]["prompt"] = "About {{ inputs.topik }}"
    message = _refused(data)
    assert "step 'first'" in message and "inputs.topik" in message and "topic" in message


def test_template_reading_an_unknown_variable() -> None:
    data = _base()
    data["steps"][0]["prompt"] = "About {{ topic }}"
    message = _refused(data)
    assert "step 'first'" in message and "topic" in message


def test_output_template_is_checked() -> None:
    data = _base()
    data["outputs"] = {"answer": "{{ steps.third.text }}"}
    message = _refused(data)
    assert "outputs.answer" in message and "steps.third" in message


def test_template_syntax_error_names_step_field_and_line() -> None:
    data = _base()
    data["steps"][1]["prompt"] = "line one\nline two {{ steps.first.text \nline three"
    with pytest.raises(PipelineError) as info:
        parse_pipeline(data)
    message = str(info.value)
    assert "step 'second'" in message
    assert "messages[0].content" in message
    assert "line 2" in message or "line 3" in message
    assert info.value.location is not None and "second" in info.value.location


def test_template_syntax_error_in_system_names_its_message() -> None:
    data = _base()
    data["steps"][0]["system"] = "{% if %}"
    assert "step 'first' messages[0].content" in _refused(data)


@pytest.mark.parametrize("model", ["openai gpt-4o", "openai/", "openai/gpt 4o", ""])
def test_bad_model_string(model: str) -> None:
    data = _base()
    data["steps"][0]["model"] = model
    message = _refused(data)
    assert "steps[0]" in message and "model" in message
    assert repr(model) in message


def test_bad_fallback_model_string() -> None:
    data = _base()
    data["steps"][0]["fallbacks"] = ["openai/ok", "bad model"]
    message = _refused(data)
    assert "steps[0]" in message and "fallbacks[1]" in message


def test_both_prompt_and_messages() -> None:
    data = _base()
    data["steps"][0]["messages"] = [{"role": "user", "content": "x"}]
    message = _refused(data)
    assert "steps[0]" in message and "'prompt'" in message and "'messages'" in message


def test_neither_prompt_nor_messages() -> None:
    data = _base()
    del data["steps"][0]["prompt"]
    assert "exactly one of 'prompt' or 'messages'" in _refused(data)


def test_not_a_mapping_and_not_yaml() -> None:
    assert "mapping" in _refused("- just\n- a list\n")
    assert "not valid YAML" in _refused("name: [unclosed")


# --- inputs -----------------------------------------------------------------------------------------


def _spec_with_inputs(inputs: dict[str, Any]) -> Any:
    data = copy.deepcopy(_base())
    data["inputs"] = inputs
    data["steps"] = [{"id": "s", "model": "openai/gpt-4o", "prompt": "static"}]
    return parse_pipeline(data)


def test_resolve_inputs_applies_defaults() -> None:
    spec = _spec_with_inputs(
        {
            "ticket": {"type": "string"},
            "limit": {"type": "integer", "default": 80},
            "note": {"required": False},
        }
    )
    assert spec.resolve_inputs({"ticket": "help"}) == {"ticket": "help", "limit": 80, "note": None}
    assert spec.resolve_inputs({"ticket": "help", "limit": 5})["limit"] == 5


def test_resolve_inputs_missing_required() -> None:
    spec = _spec_with_inputs({"ticket": {"type": "string", "description": "the customer's message"}})
    with pytest.raises(PipelineError) as info:
        spec.resolve_inputs({})
    assert "'ticket'" in str(info.value) and "the customer's message" in str(info.value)
    assert info.value.location == "inputs.ticket"


@pytest.mark.parametrize(
    ("kind", "bad", "good"),
    [
        ("string", 3, "x"),
        ("integer", 1.5, 2),
        ("integer", True, 0),
        ("number", "1", 1.5),
        ("boolean", 1, False),
        ("object", [1], {"a": 1}),
        ("array", {"a": 1}, [1]),
    ],
)
def test_resolve_inputs_checks_types(kind: str, bad: Any, good: Any) -> None:
    spec = _spec_with_inputs({"value": {"type": kind}})
    with pytest.raises(PipelineError) as info:
        spec.resolve_inputs({"value": bad})
    assert f"must be of type {kind}" in str(info.value)
    assert info.value.location == "inputs.value"
    assert spec.resolve_inputs({"value": good}) == {"value": good}


def test_resolve_inputs_refuses_unknown_inputs() -> None:
    spec = _spec_with_inputs({"ticket": {"type": "string"}})
    with pytest.raises(PipelineError) as info:
        spec.resolve_inputs({"ticket": "x", "tciket": "y"})
    assert "tciket" in str(info.value) and "ticket" in str(info.value)


def test_input_names_must_be_identifiers() -> None:
    data = _base()
    data["inputs"] = {"my-input": {"type": "string"}}
    assert "my-input" in _refused(data)


# --- templates and the sandbox ---------------------------------------------------------------------


def test_render_reads_inputs_and_steps() -> None:
    context = {"inputs": {"name": "Ada"}, "steps": {"first": {"text": "hi", "output": {"n": 2}}}}
    assert render(
        "{{ inputs.name }}: {{ steps.first.text }} {{ steps.first.output.n + 1 }}", context, location="x"
    ) == ("Ada: hi 3")
    assert render("no template here", {}, location="x") == "no template here"


def test_undefined_is_an_error_naming_the_location() -> None:
    with pytest.raises(PipelineError) as info:
        render("Hello {{ inputs.nmae }}", {"inputs": {"name": "Ada"}}, location="step 'a' prompt")
    assert "step 'a' prompt" in str(info.value)
    assert info.value.location == "step 'a' prompt"


def test_undefined_cannot_be_printed_as_empty() -> None:
    with pytest.raises(PipelineError):
        render("[{{ missing }}]", {}, location="x")


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ inputs.__class__ }}",
        "{{ inputs.items.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ inputs.list.append(1) }}",
        "{{ range(10**12) | list }}",
    ],
)
def test_sandbox_refuses_unsafe_access(source: str) -> None:
    with pytest.raises(PipelineError):
        render(source, {"inputs": {"list": [1]}}, location="step 'evil' prompt")


def test_template_refs_ignores_loop_variables() -> None:
    refs = template_refs(
        "{% for item in inputs.items_list %}{{ item }}{% endfor %}{% set x = 1 %}{{ x }}", location="x"
    )
    assert refs.variables == {"inputs"}
    assert refs.attributes == {"inputs": {"items_list"}}


def test_loop_over_steps_output_in_a_valid_spec() -> None:
    data = _base()
    data["inputs"] = {"topics": {"type": "array"}}
    data["steps"][0]["prompt"] = "{% for t in inputs.topics %}- {{ t }}\n{% endfor %}"
    spec = parse_pipeline(data)
    prompt = spec.steps[0].prompt
    assert prompt is not None
    assert render(prompt, {"inputs": {"topics": ["a", "b"]}}, location="x") == "- a\n- b\n"


def test_defaults_of_a_version_stay_with_the_runs_that_started_under_it() -> None:
    from kernel.pipeline import DEFAULTS_VERSION

    raw = {
        "name": "versions",
        "steps": [
            {"id": "ask", "model": "openai/gpt-4o-mini", "prompt": "hi"},
            {"id": "call", "type": "tool", "url": "http://127.0.0.1/x"},
            {"id": "vec", "type": "embed", "model": "openai/text-embedding-3-small", "input": "hi"},
        ],
    }
    first = parse_pipeline(raw, defaults_version=1)
    second = parse_pipeline(raw, defaults_version=2)
    newest = parse_pipeline(raw)
    assert DEFAULTS_VERSION == 2
    assert [s.heartbeat_timeout_s for s in first.steps] == [None, None, None]  # type: ignore[attr-defined]
    assert [s.heartbeat_timeout_s for s in second.steps] == [8.0, 8.0, 8.0]  # type: ignore[attr-defined]
    assert newest == second
    explicit = {**raw, "steps": [{**raw["steps"][0], "heartbeat_timeout_s": 30}]}  # type: ignore[dict-item]
    assert parse_pipeline(explicit, defaults_version=2).steps[0].heartbeat_timeout_s == 30  # type: ignore[attr-defined]
    # What a run carries into its next run (continue-as-new) keeps its version's values explicitly.
    carried = first.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert parse_pipeline(carried, defaults_version=1) == first

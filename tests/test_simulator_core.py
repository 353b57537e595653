"""The simulator's wire-agnostic core: directives, fault budgets, generation, usage."""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import pytest

from simulator.catalog import is_known_model
from simulator.core import (
    DEFAULT_HANG_SECONDS,
    Admission,
    Directive,
    DirectiveError,
    Message,
    RateLimitRule,
    ResponseFormat,
    SimRequest,
    Simulator,
    SimulatorConfig,
    Tool,
    generate,
    parse_directives,
    prompt_tokens,
    request_digest,
    schema_instance,
    strip_directives,
)


def _request(*texts: str, model: str = "gpt-4o", **kwargs: Any) -> SimRequest:
    messages = [Message("user", t) for t in texts]
    return SimRequest(wire="openai", model=model, messages=messages, digest="d1", **kwargs)


# ---- directives -----------------------------------------------------------------------------------


def test_directive_parses_bare_and_quoted_values() -> None:
    [directive] = parse_directives(
        "hi [[sim: fault=429 retry_after=1.5 reply=\"two words\" tag='x y']] there"
    )
    assert directive.fault == "429"
    assert directive.retry_after == 1.5
    assert directive.reply == "two words"
    assert directive.tag == "x y"
    assert directive.counter_key == directive.source


def test_quoted_value_may_contain_brackets_and_escaped_quotes() -> None:
    [directive] = parse_directives(r'[[sim: reply="a ]] b \"c\""]]')
    assert directive.reply == 'a ]] b "c"'


def test_several_directives_and_stripping() -> None:
    text = "[[sim: tag=one]] keep  this [[sim: fault=500 times=2 key=k]]"
    directives = parse_directives(text)
    assert [d.tag for d in directives] == ["one", None]
    assert directives[1].times == 2 and directives[1].counter_key == "k"
    assert strip_directives(text).split() == ["keep", "this"]


def test_unknown_key_and_fault_name_the_problem() -> None:
    with pytest.raises(DirectiveError, match="'colour'"):
        parse_directives("[[sim: colour=red]]")
    with pytest.raises(DirectiveError, match="'418'"):
        parse_directives("[[sim: fault=418]]")
    with pytest.raises(DirectiveError, match="times"):
        Directive.from_mapping({"times": "often"})


def test_text_without_directives_is_untouched() -> None:
    assert parse_directives("plain [[not a directive]]") == []
    assert strip_directives("plain [[x]]") == "plain [[x]]"


# ---- admission: times, key, model scoping, merging ------------------------------------------------


def test_times_budget_is_counted_per_key() -> None:
    sim = Simulator()
    first = _request("[[sim: fault=429 times=2 key=a]]")
    same_key_other_text = _request("other [[sim: fault=429 times=2 key=a]]")
    faults = [
        sim.admit(first).fault,
        sim.admit(same_key_other_text).fault,
        sim.admit(first).fault,
    ]
    assert [f.kind if f else None for f in faults] == ["429", "429", None]
    assert sim.stats()["faults_injected"] == 2


def test_default_key_is_the_directive_text() -> None:
    sim = Simulator()
    a = _request("[[sim: fault=500 times=1]]")
    b = _request("[[sim: fault=500  times=1]]")  # different text, own budget
    assert sim.admit(a).fault is not None
    assert sim.admit(a).fault is None
    assert sim.admit(b).fault is not None


def test_model_scoping_breaks_primary_only() -> None:
    sim = Simulator(SimulatorConfig(faults=[{"fault": "503", "model": "gpt-4o"}]))
    assert sim.admit(_request("hi", model="gpt-4o")).fault is not None
    assert sim.admit(_request("hi", model="gpt-4o-mini")).fault is None
    directive = "[[sim: fault=429 model=gpt-4.1]]"
    assert sim.admit(_request(directive, model="gpt-4.1-mini")).fault is None


def test_model_scoped_directive_does_not_spend_budget_elsewhere() -> None:
    sim = Simulator()
    text = "[[sim: fault=429 times=1 model=gpt-4o]]"
    assert sim.admit(_request(text, model="gpt-4o-mini")).fault is None
    assert sim.admit(_request(text, model="gpt-4o")).fault is not None


def test_header_directive_with_or_without_brackets() -> None:
    sim = Simulator()
    assert sim.admit(_request("hi"), header="fault=529").fault is not None
    admission = sim.admit(_request("hi"), header="[[sim: fault=429 retry_after_ms=250]]")
    assert admission.fault is not None and admission.fault.retry_after_ms == 250


def test_fields_merge_across_directives() -> None:
    sim = Simulator()
    text = (
        '[[sim: tag=plan latency=0.01]] [[sim: tag=draft reply="fixed" cached=3 fault=hang hang_seconds=2]]'
    )
    admission = sim.admit(_request(text))
    assert admission.tags == ("plan", "draft")
    assert admission.latency == 0.01
    assert admission.reply == "fixed"
    assert admission.cached == 3
    assert admission.fault is not None and admission.fault.kind == "hang"
    assert admission.hang_seconds == 2
    assert sim.stats()["by_tag"] == {"plan": 1, "draft": 1}


def test_hang_defaults_to_an_hour() -> None:
    assert Simulator().admit(_request("[[sim: fault=hang]]")).hang_seconds == DEFAULT_HANG_SECONDS


def test_match_scopes_a_configured_rule() -> None:
    sim = Simulator()
    sim.add_faults([{"fault": 400, "match": "summarize"}])
    assert sim.admit(_request("please summarize")).fault is not None
    assert sim.admit(_request("please translate")).fault is None


def test_reset_clears_rules_budgets_and_stats() -> None:
    sim = Simulator(SimulatorConfig(faults=[{"fault": "500"}]))
    sim.admit(_request("[[sim: fault=429 times=1 tag=t]]"))
    sim.reset()
    assert sim.faults() == []
    assert sim.stats() == {"requests": 0, "by_model": {}, "by_tag": {}, "by_wire": {}, "faults_injected": 0}
    assert sim.admit(_request("[[sim: fault=429 times=1]]")).fault is not None


def test_config_from_env() -> None:
    config = SimulatorConfig.from_env({"KERNELFLOW_SIM_FAULTS": '[{"fault": "429", "times": 1}]'})
    assert Simulator(config).faults() == [{"fault": "429", "times": 1}]
    assert SimulatorConfig.from_env({}).faults == []


def test_counters_are_exact_under_threads() -> None:
    sim = Simulator()
    request = _request("[[sim: fault=429 times=50 key=shared tag=t]]")

    def worker() -> None:
        for _ in range(100):
            sim.admit(request)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = sim.stats()
    assert stats["requests"] == 800
    assert stats["by_tag"] == {"t": 800}
    assert stats["faults_injected"] == 50


# ---- generation and usage -------------------------------------------------------------------------


def test_echo_reply_strips_directives_and_collapses_whitespace() -> None:
    request = _request("first", "  hello \n\n  world [[sim: tag=x]] ")
    completion = generate(request, Admission())
    assert completion.text == "Simulated reply from gpt-4o: hello world"
    assert completion.finish_reason == "stop"


def test_echo_is_truncated_to_240_characters() -> None:
    completion = generate(_request("x" * 1000), Admission())
    assert completion.text == "Simulated reply from gpt-4o: " + "x" * 240


def test_reply_directive_wins() -> None:
    assert generate(_request("hi"), Admission(reply="exactly this")).text == "exactly this"


def test_usage_arithmetic() -> None:
    request = _request("abcde", "abcdefgh")  # ceil(5/4)+4 + ceil(8/4)+4
    completion = generate(request, Admission(cached=4))
    assert completion.usage.prompt_tokens == 2 + 4 + 2 + 4 == prompt_tokens(request.messages)
    assert completion.text is not None
    assert completion.usage.completion_tokens == math.ceil(len(completion.text) / 4)
    assert completion.usage.cached_tokens == 4
    assert completion.usage.reasoning_tokens == 0
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


@pytest.mark.parametrize("model", ["o1-mini", "o3", "o4-mini", "gpt-5", "gpt-5-mini"])
def test_reasoning_models_report_reasoning_tokens(model: str) -> None:
    usage = generate(_request("hi", model=model), Admission()).usage
    assert usage.reasoning_tokens == usage.completion_tokens > 0


def test_completion_tokens_are_at_least_one() -> None:
    assert generate(_request("hi"), Admission(reply="")).usage.completion_tokens == 1


def test_max_tokens_truncates_with_length() -> None:
    completion = generate(_request("a long enough question", max_tokens=3), Admission())
    assert completion.finish_reason == "length"
    assert completion.text == "Simulated re"


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
}


def test_tool_call_uses_first_tool_or_the_named_one() -> None:
    tools = [Tool("weather", WEATHER), Tool("clock", {"type": "object", "properties": {}})]
    first = generate(_request("hi", tools=tools), Admission())
    assert first.finish_reason == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in first.tool_calls] == [
        ("weather", {"city": "sample city", "days": 1})
    ]
    assert first.tool_calls[0].id.startswith("call_")
    named = generate(_request("hi", tools=tools, tool_choice="clock"), Admission())
    assert named.tool_calls[0].name == "clock"
    assert generate(_request("hi", tools=tools), Admission()) == first  # deterministic


def test_tool_choice_none_and_tool_results_give_text() -> None:
    tools = [Tool("weather", WEATHER)]
    assert generate(_request("hi", tools=tools, tool_choice="none"), Admission()).tool_calls == ()
    messages = [Message("user", "weather?"), Message("assistant", ""), Message("tool", "sunny, 21C")]
    request = SimRequest(wire="openai", model="gpt-4o", messages=messages, tools=tools)
    completion = generate(request, Admission())
    assert completion.tool_calls == ()
    assert completion.text is not None and "sunny, 21C" in completion.text


def test_json_object_response_wraps_the_echo() -> None:
    completion = generate(_request("hi", response_format=ResponseFormat("json_object")), Admission())
    assert completion.text is not None
    assert json.loads(completion.text) == {"answer": "Simulated reply from gpt-4o: hi"}


def test_schema_instance_covers_the_keywords() -> None:
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "status": {"type": "string", "enum": ["draft", "final"]},
            "version": {"const": 2},
            "score": {"type": "number", "minimum": 0.5},
            "count": {"type": "integer"},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "author": {"$ref": "#/$defs/Person"},
            "choice": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            "maybe": {"type": ["null", "string"]},
            "email": {"type": "string", "format": "email"},
        },
        "$defs": {"Person": {"type": "object", "properties": {"name": {"type": "string"}}}},
    }
    assert schema_instance(schema) == {
        "title": "sample title",
        "status": "draft",
        "version": 2,
        "score": 0.5,
        "count": 0,
        "ok": True,
        "tags": ["sample tags"],
        "author": {"name": "sample name"},
        "choice": 0,
        "maybe": "sample maybe",
        "email": "email@example.com",
    }


def test_schema_instance_survives_recursion() -> None:
    schema = {
        "$ref": "#/$defs/Node",
        "$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}},
    }
    instance = schema_instance(schema)
    assert isinstance(instance, dict) and "next" in instance


def test_request_digest_is_stable() -> None:
    assert request_digest(b"abc") == request_digest(b"abc") != request_digest(b"abd")


def test_catalog_knows_vendor_models_sim_prefix_and_snapshots() -> None:
    assert is_known_model("openai", "gpt-4o")
    assert is_known_model("openai", "gpt-4o-2024-08-06")
    assert is_known_model("openai", "sim-anything")
    assert is_known_model("openai", "custom", extra=["custom"])
    assert not is_known_model("openai", "gpt-2")


def test_faults_with_budgets_take_turns() -> None:
    sim = Simulator()
    request = _request("[[sim: fault=429 times=1 key=a]] [[sim: fault=500 times=1 key=b]]")
    kinds = [getattr(sim.admit(request).fault, "kind", None) for _ in range(3)]
    assert kinds == ["429", "500", None]


def test_tags_count_every_request_even_when_the_fault_budget_is_spent() -> None:
    sim = Simulator()
    request = _request("[[sim: fault=429 times=1 tag=step]]")
    sim.admit(request)
    sim.admit(request)
    assert sim.stats()["by_tag"] == {"step": 2}
    assert sim.stats()["faults_injected"] == 1


# ---- scripts of turns -----------------------------------------------------------------------------


def test_a_script_answers_each_turn_of_a_tool_loop_in_order() -> None:
    turns = [
        {"calls": [{"name": "a", "arguments": {"x": 1}}, {"name": "b"}]},
        {"text": "done"},
    ]
    directive = f"go [[sim: script='{json.dumps(turns)}']]"
    sim = Simulator()
    first = _request(directive)
    answer = generate(first, sim.admit(first))
    assert answer.finish_reason == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in answer.tool_calls] == [("a", {"x": 1}), ("b", {})]
    assert len({c.id for c in answer.tool_calls}) == 2
    second = SimRequest(
        wire="openai",
        model="gpt-4o",
        messages=[
            Message("user", directive),
            Message("assistant", ""),
            Message("tool", "1"),
            Message("tool", "2"),
        ],
        digest="d2",
    )
    assert generate(second, sim.admit(second)).text == "done"
    third = SimRequest(
        wire="openai",
        model="gpt-4o",
        messages=[*second.messages, Message("assistant", "done"), Message("user", "and?")],
        digest="d3",
    )
    assert generate(third, sim.admit(third)).text == "Simulated reply from gpt-4o: and?"  # past the script


def test_a_script_that_cannot_be_read_names_the_problem() -> None:
    with pytest.raises(DirectiveError, match="not JSON"):
        parse_directives("[[sim: script='[{']]")
    with pytest.raises(DirectiveError, match="needs a 'name'"):
        parse_directives("""[[sim: script='[{"calls": [{"arguments": {}}]}]']]""")


def test_a_rate_limit_answers_429_with_retry_after_beyond_the_window_and_counts_only_admitted() -> None:
    sim = Simulator(SimulatorConfig(rate_limits={"m": RateLimitRule(requests=2, window_s=60)}))
    request = _request("hello", model="m")
    assert sim.admit(request).fault is None
    assert sim.admit(request).fault is None
    refused = sim.admit(request).fault
    assert refused is not None and refused.kind == "429"
    assert refused.retry_after is not None and 0 < refused.retry_after <= 60
    stats = sim.stats()
    assert stats["rate_limited"] == 1 and len(stats["admitted_at"]["m"]) == 2
    with pytest.raises(DirectiveError, match="allowed keys: requests, tokens, window_s"):
        RateLimitRule.from_json('{"m": {"rpm": 5}}')

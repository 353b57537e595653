"""The wire-agnostic heart of the simulator.

A wire module turns a vendor request into a `SimRequest` (model, `(role, text)` messages, tools,
tool choice, response format, max_tokens, stream flag). `Simulator.admit` then reads the
`[[sim: ...]]` directives and the configured fault rules, counts the request, and says what to do
(`Admission`); `generate` produces the deterministic `Completion` the wire module renders.
Nothing here knows HTTP.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar

from simulator.batches import BatchStore

__all__ = [
    "DEFAULT_HANG_SECONDS",
    "FAULT_KINDS",
    "FAULT_STATUS",
    "REASONING_MODEL_PREFIXES",
    "Admission",
    "Completion",
    "Directive",
    "DirectiveError",
    "Fault",
    "Message",
    "RateLimitRule",
    "ResponseFormat",
    "SimRequest",
    "Simulator",
    "SimulatorConfig",
    "Tool",
    "ToolCall",
    "Usage",
    "count_tokens",
    "echo_text",
    "generate",
    "is_reasoning_model",
    "parse_directives",
    "prompt_tokens",
    "request_digest",
    "schema_instance",
    "strip_directives",
]

# Fault kind -> HTTP status. `hang`, `malformed`, `mistyped` and `cut` answer 200 in their own broken way:
# `malformed` is not JSON at all; `mistyped` is JSON in which one documented field has the wrong type.
FAULT_STATUS: dict[str, int] = {
    "400": 400,
    "401": 401,
    "403": 403,
    "404": 404,
    "429": 429,
    "500": 500,
    "503": 503,
    "529": 529,
    "context_length": 400,
    "content_filter": 400,
    "quota": 429,
    "hang": 200,
    "malformed": 200,
    "mistyped": 200,
    "cut": 200,
}
FAULT_KINDS = frozenset(FAULT_STATUS)
DEFAULT_HANG_SECONDS = 3600.0
REASONING_MODEL_PREFIXES = ("o1", "o3", "o4", "gpt-5")
ECHO_LIMIT = 240

_DIRECTIVE = re.compile(r"\[\[sim:((?:\"(?:[^\"\\]|\\.)*\"|[^\"\]]|\](?!\]))*)\]\]", re.DOTALL)
_PAIR = re.compile(r"\s*([A-Za-z_]+)\s*=\s*(?:\"((?:[^\"\\]|\\.)*)\"|'([^']*)'|([^\s\"']+))\s*")
_ESCAPE = re.compile(r"\\(.)")
_WHITESPACE = re.compile(r"\s+")
_MARKER = "[[sim:"
_T = TypeVar("_T")


class DirectiveError(ValueError):
    """A directive or fault rule the simulator cannot read; wire modules answer it with a 400."""


@dataclass(frozen=True, slots=True)
class Directive:
    """One `[[sim: ...]]` directive or configured fault rule; every field is optional."""

    fault: str | None = None
    retry_after: float | None = None
    retry_after_ms: int | None = None
    times: int | None = None
    key: str | None = None
    model: str | None = None
    match: str | None = None
    latency: float | None = None
    token_delay: float | None = None
    hang_seconds: float | None = None
    reply: str | None = None
    tag: str | None = None
    cached: int | None = None
    script: str | None = None
    source: str = ""

    @property
    def counter_key(self) -> str:
        """The key its `times` budget is counted under."""
        return self.key if self.key is not None else self.source

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str | None = None) -> Directive:
        """Build from a JSON rule or parsed directive pairs, checking keys and values."""
        values: dict[str, Any] = {}
        for name, raw in data.items():
            kind = _FIELD_TYPES.get(name)
            if kind is None:
                allowed = ", ".join(sorted(_FIELD_TYPES))
                raise DirectiveError(f"unknown simulator directive key {name!r}; allowed keys: {allowed}")
            if raw is None:
                continue
            try:
                values[name] = kind(raw)
            except (TypeError, ValueError) as exc:
                raise DirectiveError(
                    f"simulator directive {name}={raw!r} is not a valid {kind.__name__}"
                ) from exc
        if "script" in values:
            _script_turns(values["script"])
        fault = values.get("fault")
        if fault is not None and fault not in FAULT_KINDS:
            allowed = ", ".join(sorted(FAULT_KINDS))
            raise DirectiveError(f"unknown simulator fault {fault!r}; allowed faults: {allowed}")
        if source is None:
            source = json.dumps(dict(data), sort_keys=True, default=str)
        return cls(source=source, **values)

    def to_mapping(self) -> dict[str, Any]:
        """The rule as JSON, without unset fields."""
        return {k: v for k, v in asdict(self).items() if v is not None and k != "source"}

    def applies_to(self, request: SimRequest) -> bool:
        if self.model is not None and self.model != request.model:
            return False
        return self.match is None or any(self.match in m.text for m in request.messages)


_FIELD_TYPES: dict[str, Any] = {
    "fault": str,
    "retry_after": float,
    "retry_after_ms": int,
    "times": int,
    "key": str,
    "model": str,
    "match": str,
    "latency": float,
    "token_delay": float,
    "hang_seconds": float,
    "reply": str,
    "tag": str,
    "cached": int,
    "script": str,
}


def parse_directives(text: str) -> list[Directive]:
    """Every `[[sim: key=value key2="quoted value"]]` directive in `text`, in order."""
    if _MARKER not in text:
        return []
    found: list[Directive] = []
    for match in _DIRECTIVE.finditer(text):
        found.append(_parse_body(match.group(1), source=match.group(0)))
    return found


def _parse_body(body: str, *, source: str) -> Directive:
    pairs: dict[str, str] = {}
    position = 0
    while position < len(body):
        pair = _PAIR.match(body, position)
        if pair is None or pair.end() == position:
            if body[position:].strip():
                raise DirectiveError(f"cannot read simulator directive {source!r} near {body[position:]!r}")
            break
        name, double, single, bare = pair.groups()
        if double is not None:
            pairs[name] = _ESCAPE.sub(r"\1", double)
        else:
            pairs[name] = single if single is not None else bare
        position = pair.end()
    return Directive.from_mapping(pairs, source=source)


def strip_directives(text: str) -> str:
    """`text` without its directives."""
    return _DIRECTIVE.sub("", text) if _MARKER in text else text


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # "system", "user", "assistant" or "tool"
    text: str


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    kind: str  # "text", "json_object" or "json_schema"
    schema: Mapping[str, Any] | None = None
    name: str = "response"


@dataclass(slots=True)
class SimRequest:
    """The neutral view of a request that every wire module maps to."""

    wire: str
    model: str
    messages: list[Message]
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str | None = None  # None or "auto", "none", "required", or a tool name
    response_format: ResponseFormat | None = None
    max_tokens: int | None = None
    stream: bool = False
    digest: str = ""  # hash of the request body, the seed of every id in the answer
    extra: dict[str, Any] = field(default_factory=dict)  # wire-specific details


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    retry_after: float | None = None
    retry_after_ms: int | None = None

    @property
    def status(self) -> int:
        return FAULT_STATUS[self.kind]


@dataclass(frozen=True, slots=True)
class Admission:
    """What the directives and rules ask of one request."""

    fault: Fault | None = None
    latency: float = 0.0
    token_delay: float = 0.0
    hang_seconds: float = DEFAULT_HANG_SECONDS
    reply: str | None = None
    cached: int = 0
    tags: tuple[str, ...] = ()
    script: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Completion:
    text: str | None
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str  # "stop", "length" or "tool_calls"
    usage: Usage


@dataclass(slots=True)
class SimulatorConfig:
    """Start-time configuration: fault rules and models beyond the catalog, per vendor."""

    faults: list[Mapping[str, Any]] = field(default_factory=list)
    extra_models: Mapping[str, Iterable[str]] = field(default_factory=dict)
    rate_limits: Mapping[str, RateLimitRule] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SimulatorConfig:
        """Read fault rules from `KERNELFLOW_SIM_FAULTS` (a JSON list) and per-model rate limits from
        `KERNELFLOW_SIM_RATE_LIMITS` (a JSON object: model -> {requests, tokens, window_s})."""
        env = os.environ if environ is None else environ
        raw = env.get("KERNELFLOW_SIM_FAULTS", "").strip()
        limits = env.get("KERNELFLOW_SIM_RATE_LIMITS", "").strip()
        return cls(
            faults=_rules_from_json(raw) if raw else [],
            rate_limits=RateLimitRule.from_json(limits) if limits else {},
        )


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    """A provider's limit on one model: at most `requests` requests and `tokens` tokens (prompt, about
    four characters a token, plus `max_tokens`) in any sliding window of `window_s` seconds. Requests
    beyond it get a 429 with Retry-After, and are not counted."""

    requests: int | None = None
    tokens: int | None = None
    window_s: float = 1.0

    @classmethod
    def from_json(cls, raw: str) -> dict[str, RateLimitRule]:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise DirectiveError(f"rate limits must be a JSON object of model -> limit, got {raw!r}")
        found: dict[str, RateLimitRule] = {}
        for model, rule in data.items():
            if not isinstance(rule, dict) or not set(rule) <= {"requests", "tokens", "window_s"}:
                raise DirectiveError(
                    f"rate limit of {model!r}: {rule!r}; allowed keys: requests, tokens, window_s"
                )
            found[model] = cls(**rule)
        return found


def request_tokens(request: SimRequest) -> int:
    """What a provider's rate limiter charges up front: the prompt plus the requested output."""
    prompt = sum(len(m.text) for m in request.messages) // 4 + 1
    return prompt + (request.max_tokens or 0)


def _rules_from_json(raw: str) -> list[Mapping[str, Any]]:
    data = json.loads(raw)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(rule, dict) for rule in data):
        raise DirectiveError(f"fault rules must be a JSON list of objects, got {raw!r}")
    return data


class Simulator:
    """Fault rules, `times` budgets and statistics; safe to use from several threads."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self._config = config or SimulatorConfig()
        self._lock = threading.Lock()
        self._rules: list[Directive] = []
        self._budgets: Counter[str] = Counter()
        self._requests = 0
        self._faults_injected = 0
        self._by_model: Counter[str] = Counter()
        self._by_tag: Counter[str] = Counter()
        self._by_wire: Counter[str] = Counter()
        self._rate_limits = dict(self._config.rate_limits)
        self._admitted: dict[str, deque[tuple[float, int]]] = {}
        self._rate_limited = 0
        self._extra_models = {vendor: frozenset(names) for vendor, names in self._config.extra_models.items()}
        self.batches = BatchStore()
        self.add_faults(self._config.faults)

    def extra_models(self, vendor: str) -> frozenset[str]:
        return self._extra_models.get(vendor, frozenset())

    def add_faults(self, rules: Iterable[Mapping[str, Any] | Directive]) -> None:
        parsed = [rule if isinstance(rule, Directive) else Directive.from_mapping(rule) for rule in rules]
        with self._lock:
            self._rules.extend(parsed)

    def faults(self) -> list[dict[str, Any]]:
        with self._lock:
            return [rule.to_mapping() for rule in self._rules]

    def reset(self) -> None:
        """Drop every fault rule and `times` budget and zero the statistics."""
        with self._lock:
            self._rules.clear()
            self._budgets.clear()
            self._requests = self._faults_injected = 0
            self._by_model.clear()
            self._by_tag.clear()
            self._by_wire.clear()
            self._admitted.clear()
            self._rate_limited = 0
        self.batches.reset()

    def admitted_times(self, model: str) -> list[float]:
        """When each request of a rate-limited `model` was let through (monotonic seconds)."""
        with self._lock:
            return [at for at, _ in self._admitted.get(model, ())]

    def _over_limit(self, request: SimRequest) -> float | None:
        """Seconds until `request` would fit its model's rate limit, or None when it fits (then it
        is recorded). Call with the lock held."""
        rule = self._rate_limits.get(request.model)
        if rule is None:
            return None
        now = time.monotonic()
        seen = self._admitted.setdefault(request.model, deque(maxlen=100_000))
        recent = [(at, tokens) for at, tokens in seen if at > now - rule.window_s]
        tokens = request_tokens(request)
        over_requests = rule.requests is not None and len(recent) + 1 > rule.requests
        over_tokens = rule.tokens is not None and sum(t for _, t in recent) + tokens > rule.tokens
        if over_requests or over_tokens:
            return max(recent[0][0] + rule.window_s - now, 0.001) if recent else rule.window_s
        seen.append((now, tokens))
        return None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self._requests,
                "by_model": dict(self._by_model),
                "by_tag": dict(self._by_tag),
                "by_wire": dict(self._by_wire),
                "faults_injected": self._faults_injected,
                **self._rate_stats(),
            }

    def _rate_stats(self) -> dict[str, Any]:
        if not self._rate_limits:
            return {}
        return {
            "rate_limited": self._rate_limited,
            "admitted_at": {model: [at for at, _ in seen] for model, seen in self._admitted.items()},
        }

    def admit(self, request: SimRequest, *, header: str | None = None) -> Admission:
        """Count `request` and decide its fate from the directives in its messages and `header`.

        The first applicable fault whose `times` budget is not spent wins, so
        `[[sim: fault=429 times=1 key=a]] [[sim: fault=500 times=1 key=b]]` answers 429, then 500,
        then succeeds.

        Raises `DirectiveError` when a directive cannot be read.
        """
        found: list[Directive] = []
        if header:
            found.extend(parse_directives(header if _MARKER in header else f"[[sim: {header}]]"))
        for message in request.messages:
            if _MARKER in message.text:
                found.extend(parse_directives(message.text))
        with self._lock:
            active = [d for d in dict.fromkeys((*found, *self._rules)) if d.applies_to(request)]
            # `times` budgets the fault only: tags, replies and delays apply to every request. A
            # directive with a reply, `times` and no fault budgets its reply instead ("answer this
            # once, then answer normally").
            faulting = next((d for d in active if d.fault is not None and self._spend(d)), None)
            spent = {d for d in active if d.fault is None and d.reply is not None and d.times is not None}
            spent = {d for d in spent if not self._spend(d)}
            admission = _merge(active, faulting, spent_replies=spent)
            if admission.fault is None and (wait := self._over_limit(request)) is not None:
                admission = replace(admission, fault=Fault("429", retry_after=round(wait, 3)))
                self._rate_limited += 1
            self._requests += 1
            self._by_model[request.model] += 1
            self._by_wire[request.wire] += 1
            for tag in admission.tags:
                self._by_tag[tag] += 1
            if admission.fault is not None:
                self._faults_injected += 1
        return admission

    def _spend(self, directive: Directive) -> bool:
        if directive.times is None:
            return True
        key = directive.counter_key
        self._budgets[key] += 1
        return self._budgets[key] <= directive.times


def _merge(
    active: list[Directive], faulting: Directive | None, *, spent_replies: set[Directive] | None = None
) -> Admission:
    if not active:
        return _NO_DIRECTIVES
    fault: Fault | None = None
    hang_seconds = DEFAULT_HANG_SECONDS
    if faulting is not None and faulting.fault is not None:
        fault = Fault(faulting.fault, faulting.retry_after, faulting.retry_after_ms)
        if faulting.hang_seconds is not None:
            hang_seconds = faulting.hang_seconds
    return Admission(
        fault=fault,
        latency=_first(d.latency for d in active) or 0.0,
        token_delay=_first(d.token_delay for d in active) or 0.0,
        hang_seconds=hang_seconds,
        reply=_first(d.reply for d in active if d not in (spent_replies or set())),
        cached=_first(d.cached for d in active) or 0,
        tags=tuple(dict.fromkeys(d.tag for d in active if d.tag is not None)),
        script=_first(d.script for d in active),
    )


def _first(values: Iterable[_T | None]) -> _T | None:
    return next((v for v in values if v is not None), None)


_NO_DIRECTIVES = Admission()


# ---- deterministic generation ------------------------------------------------------------------


def count_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def prompt_tokens(messages: Iterable[Message]) -> int:
    """Sum over messages of ceil(len(text) / 4) + 4, counting the text as sent."""
    return sum(count_tokens(m.text) + 4 for m in messages)


def is_reasoning_model(model: str) -> bool:
    return model.startswith(REASONING_MODEL_PREFIXES)


def request_digest(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=12).hexdigest()


def echo_text(request: SimRequest) -> str:
    """`Simulated reply from {model}: ` and the last user text (or the trailing tool results)."""
    messages = request.messages
    if messages and messages[-1].role == "tool":
        start = len(messages)
        while start > 0 and messages[start - 1].role == "tool":
            start -= 1
        source = " ".join(m.text for m in messages[start:])
    else:
        source = next((m.text for m in reversed(messages) if m.role == "user"), "")
    cleaned = _WHITESPACE.sub(" ", strip_directives(source)).strip()[:ECHO_LIMIT]
    return f"Simulated reply from {request.model}: {cleaned}"


def _script_turns(raw: str) -> list[dict[str, Any]]:
    """A script of turns: a JSON list whose items are `{"text": ...}` or `{"calls": [{"name": ...,
    "arguments": {...}}, ...]}`; the answer to a request is the item at its number of assistant
    messages (so each turn of a tool loop gets the next item), and past the end the usual echo."""
    try:
        turns = json.loads(raw)
    except ValueError as exc:
        raise DirectiveError(f"simulator script is not JSON: {exc}") from None
    if not isinstance(turns, list) or not all(
        isinstance(t, dict) and (isinstance(t.get("text"), str) or isinstance(t.get("calls"), list))
        for t in turns
    ):
        raise DirectiveError(
            'simulator script must be a JSON list of {"text": ...} or {"calls": [...]} items'
        )
    for turn in turns:
        for call in turn.get("calls") or []:
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise DirectiveError(f"simulator script call {call!r} needs a 'name' (and 'arguments')")
    return list(turns)


def _scripted(request: SimRequest, admission: Admission) -> Completion | None:
    if admission.script is None:
        return None
    turns = _script_turns(admission.script)
    number = sum(1 for m in request.messages if m.role == "assistant")
    if number >= len(turns):
        return None
    turn = turns[number]
    if "calls" in turn:
        calls = tuple(
            ToolCall(
                "call_" + hashlib.blake2b(f"{request.digest}:{i}".encode(), digest_size=12).hexdigest(),
                str(call["name"]),
                json.dumps(call.get("arguments", {}), separators=(",", ":")),
            )
            for i, call in enumerate(turn["calls"])
        )
        text = "".join(c.arguments for c in calls)
        return Completion(
            text=None, tool_calls=calls, finish_reason="tool_calls", usage=_usage(request, admission, text)
        )
    text = str(turn["text"])
    return Completion(text=text, tool_calls=(), finish_reason="stop", usage=_usage(request, admission, text))


def generate(request: SimRequest, admission: Admission) -> Completion:
    """The deterministic answer to `request`: a scripted turn when a `script` directive gives one."""
    scripted = _scripted(request, admission)
    if scripted is not None:
        return scripted
    tool = _tool_to_call(request)
    if tool is not None:
        arguments = json.dumps(schema_instance(tool.parameters), separators=(",", ":"))
        call_id = (
            "call_" + hashlib.blake2b(f"{request.digest}:{tool.name}".encode(), digest_size=12).hexdigest()
        )
        return Completion(
            text=None,
            tool_calls=(ToolCall(call_id, tool.name, arguments),),
            finish_reason="tool_calls",
            usage=_usage(request, admission, arguments),
        )
    text = admission.reply if admission.reply is not None else _answer_text(request)
    finish_reason = "stop"
    if request.max_tokens is not None and count_tokens(text) > request.max_tokens:
        text = text[: max(request.max_tokens, 0) * 4]
        finish_reason = "length"
    return Completion(
        text=text, tool_calls=(), finish_reason=finish_reason, usage=_usage(request, admission, text)
    )


def _tool_to_call(request: SimRequest) -> Tool | None:
    if not request.tools or request.tool_choice == "none":
        return None
    if request.messages and request.messages[-1].role == "tool":
        return None
    if request.tool_choice not in (None, "auto", "required"):
        return next((t for t in request.tools if t.name == request.tool_choice), request.tools[0])
    return request.tools[0]


def _answer_text(request: SimRequest) -> str:
    response_format = request.response_format
    if response_format is not None and response_format.kind == "json_schema":
        return json.dumps(schema_instance(response_format.schema or {}), separators=(",", ":"))
    if response_format is not None and response_format.kind == "json_object":
        return json.dumps({"answer": echo_text(request)}, separators=(",", ":"))
    return echo_text(request)


def _usage(request: SimRequest, admission: Admission, output: str) -> Usage:
    prompt = prompt_tokens(request.messages)
    completion = max(1, count_tokens(output))
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=min(admission.cached, prompt),
        reasoning_tokens=completion if is_reasoning_model(request.model) else 0,
    )


# ---- JSON instance from a JSON schema ----------------------------------------------------------

_STRING_FORMATS: dict[str, str] = {
    "date-time": "2025-01-01T00:00:00Z",
    "date": "2025-01-01",
    "time": "00:00:00Z",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
}
_MAX_DEPTH = 24


def schema_instance(schema: Mapping[str, Any], *, name: str = "value") -> Any:
    """A deterministic instance of `schema`: every property, the first enum value or branch,
    strings derived from the property name, numbers at their minimum (or 0), one array item."""
    return _instance(schema, schema, name, 0)


def _instance(schema: Mapping[str, Any], root: Mapping[str, Any], name: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return _instance(_resolve(ref, root), root, name, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for combinator in ("anyOf", "oneOf"):
        branches = schema.get(combinator)
        if branches:
            return _instance(branches[0], root, name, depth + 1)
    if schema.get("allOf"):
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            resolved = _resolve(part["$ref"], root) if "$ref" in part else part
            merged.setdefault("properties", {}).update(resolved.get("properties", {}))
            merged.setdefault("type", resolved.get("type"))
        return _instance(merged, root, name, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        properties: Mapping[str, Any] = schema.get("properties", {})
        return {key: _instance(sub, root, key, depth + 1) for key, sub in properties.items()}
    if kind == "array":
        items = schema.get("items")
        item_schema: Mapping[str, Any] = items if isinstance(items, Mapping) else {}
        count = max(1, int(schema.get("minItems", 1)))
        return [_instance(item_schema, root, name, depth + 1) for _ in range(count)]
    if kind in ("integer", "number"):
        return _number(schema, integer=kind == "integer")
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return _string(schema, name)


def _resolve(ref: str, root: Mapping[str, Any]) -> Mapping[str, Any]:
    if not ref.startswith("#/"):
        raise DirectiveError(f"cannot resolve schema reference {ref!r}: only local '#/...' references work")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node  # type: ignore[no-any-return]


def _number(schema: Mapping[str, Any], *, integer: bool) -> int | float:
    value: float = 0
    if "minimum" in schema:
        value = schema["minimum"]
    elif "exclusiveMinimum" in schema:
        value = schema["exclusiveMinimum"] + (1 if integer else 0.5)
    elif "maximum" in schema and schema["maximum"] < 0:
        value = schema["maximum"]
    return math.ceil(value) if integer else value


def _string(schema: Mapping[str, Any], name: str) -> str:
    fmt = schema.get("format")
    if fmt == "email":
        value = f"{name}@example.com"
    elif fmt in ("uri", "url"):
        value = f"https://example.com/{name}"
    else:
        value = _STRING_FORMATS.get(fmt, f"sample {name}") if isinstance(fmt, str) else f"sample {name}"
    min_length = int(schema.get("minLength", 0))
    if len(value) < min_length:
        value = value + "x" * (min_length - len(value))
    if "maxLength" in schema:
        value = value[: int(schema["maxLength"])]
    return value

"""``ProviderConformance``: the checks every provider plugin must pass, as a pytest base class.

Subclass it in a test module, name the models, and say how to build the provider::

    class TestEchoConformance(ProviderConformance):
        chat_model = "house-small"

        def make_provider(self, base_url, *, api_key, http_client):
            return EchoProvider(
                settings=ProviderSettings(base_url=base_url, api_key=api_key),
                environ={},
                http_client=http_client,
            )

The checks run against the simulator (``simulator_url``, or one the kit starts itself) and drive
faults with ``[[sim: ...]]`` directives. A check of a capability the provider does not declare is
checked the other way round: a request needing it must be refused before any network call. A
declared capability that misbehaves fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import httpx
import pytest
import pytest_asyncio
import structlog
from pydantic import BaseModel, ValidationError

from kernel.batch import BatchItem, batch_tag
from kernel.catalog import REQUEST_OPTIONS
from kernel.contracts import (
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    EmbedRequest,
    FunctionDefinition,
    ImagePart,
    ImageURL,
    JsonSchemaFormat,
    ResponseFormatJsonSchema,
    StreamDone,
    StreamError,
    StreamEvent,
    StreamStart,
    TextDelta,
    TextPart,
    Tool,
    ToolMessage,
    UserMessage,
)
from kernel.errors import (
    AuthenticationFailed,
    ContentFiltered,
    ContextLengthExceeded,
    MalformedResponse,
    MissingCredentials,
    ModelNotFound,
    Overloaded,
    ProviderError,
    QuotaExceeded,
    RateLimited,
    UnsupportedCapability,
    UpstreamError,
)
from kernel.provider import Provider, collect_stream
from kernel.testing._simulator import requests_tagged, shared_simulator_url

__all__ = ["FAULT_EXPECTATIONS", "ConformanceRun", "ProviderConformance"]

Mode = Literal["chat", "stream"]

FAULT_EXPECTATIONS: dict[str, type[ProviderError]] = {
    "429": RateLimited,
    "500": UpstreamError,
    "503": Overloaded,
    "529": Overloaded,
    "401": AuthenticationFailed,
    "404": ModelNotFound,
    "context_length": ContextLengthExceeded,
    "content_filter": ContentFiltered,
    "malformed": MalformedResponse,
    "mistyped": MalformedResponse,
}
"""Simulator fault kind -> the kernel error a provider must raise for it."""

_RETRY_AFTER = 7.0
# Faults whose HTTP status is known before any event: a stream must raise them, not yield them.
_RAISED_BEFORE_FIRST_EVENT = frozenset({"429", "500", "503", "529", "401", "404", "context_length"})
_LONG_TEXT = " ".join(f"word{i}" for i in range(60))
_PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


class _Ticket(BaseModel):
    """The structured-output check's schema (an object with a string enum, an integer and a list)."""

    label: Literal["bug", "feature", "question"]
    priority: int
    tags: list[str]


_WEATHER_TOOL = Tool(
    function=FunctionDefinition(
        name="get_weather",
        description="The current weather in a city.",
        parameters={
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    )
)


@dataclass
class ConformanceRun:
    """One check's provider, the HTTP client it was given, and the tag its requests carry."""

    provider: Provider
    http_client: httpx.AsyncClient
    simulator_url: str
    model: str
    tag: str = field(default_factory=lambda: f"conformance-{uuid.uuid4().hex[:12]}")

    def prompt(self, text: str, directive: str = "") -> str:
        extra = f" [[sim: {directive}]]" if directive else ""
        return f"{text} [[sim: tag={self.tag}]]{extra}"

    def request(self, text: str, directive: str = "", **fields: Any) -> ChatRequest:
        return ChatRequest(
            model=self.model, messages=[UserMessage(content=self.prompt(text, directive))], **fields
        )

    async def requests_seen(self) -> int:
        return await requests_tagged(self.simulator_url, self.tag)

    def open_connections(self) -> int:
        """Connections in the HTTP client's pool (httpx keeps the pool on its default transport)."""
        pool = getattr(getattr(self.http_client, "_transport", None), "_pool", None)
        return len(getattr(pool, "connections", ()))


async def _events(provider: Provider, request: ChatRequest) -> list[StreamEvent]:
    async with _closing(provider.stream(request)) as stream:
        return [event async for event in stream]


@contextlib.asynccontextmanager
async def _closing(stream: AsyncIterator[StreamEvent]) -> AsyncIterator[AsyncIterator[StreamEvent]]:
    """Close the stream when the consumer is done with it, as every consumer should."""
    try:
        yield stream
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()


async def _call(provider: Provider, request: ChatRequest, mode: Mode) -> ChatResponse:
    if mode == "chat":
        return await provider.chat(request)
    return await collect_stream(provider.stream(request), provider=provider.name)


@contextlib.contextmanager
def _captured_logs() -> Iterator[list[str]]:
    """Every stdlib log record (at DEBUG, httpx and httpcore included) and structlog event, as text."""
    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.name} {record.getMessage()} {record.args!r} {record.exc_text or ''}")

    handler = _Collect(level=logging.DEBUG)
    loggers = [logging.getLogger(), logging.getLogger("httpx"), logging.getLogger("httpcore")]
    levels = [logger.level for logger in loggers]
    root = loggers[0]
    root.addHandler(handler)
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    try:
        with structlog.testing.capture_logs() as events:
            yield lines
        lines.extend(repr(event) for event in events)
    finally:
        root.removeHandler(handler)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _exception_texts(exc: BaseException) -> list[str]:
    texts: list[str] = []
    current: BaseException | None = exc
    while current is not None:
        texts += [str(current), repr(current), repr(current.args), repr(vars(current))]
        current = current.__cause__ or current.__context__
    with contextlib.suppress(Exception):
        texts.append(repr(pickle.loads(pickle.dumps(exc)).__dict__))
    return texts


class ProviderConformance:
    """The provider contract as pytest checks. Subclasses set ``chat_model`` (and ``embed_model``
    when the provider declares embeddings) and implement ``make_provider``."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.asyncio]
    """Every check is a coroutine; marked so they also run under pytest-asyncio's strict mode."""
    chat_model: ClassVar[str]
    """A model the simulator serves for this provider's wire (``sim-...`` is known to every wire)."""
    embed_model: ClassVar[str | None] = None
    simulator_url: ClassVar[str | None] = None
    """The simulator to use; ``None`` starts one in this process."""
    stream_reports_usage: ClassVar[bool] = True
    """``False`` for a provider that declares its upstream reports no usage in streams."""
    quota_error: ClassVar[type[ProviderError] | None] = QuotaExceeded
    """What the upstream's out-of-credit answer (simulator fault ``quota``) must become: by default
    ``QuotaExceeded``, which is never retried. ``None`` for an upstream without such an answer."""
    catalog_model: ClassVar[str | None] = None
    """A model the kernel's catalog lists for this provider; its refused options are checked."""

    def make_provider(
        self, base_url: str, *, api_key: str | None, http_client: httpx.AsyncClient
    ) -> Provider:
        """The provider under test pointed at ``base_url`` (the simulator's root URL), sending every
        request through ``http_client``. With ``api_key=None`` it must have no credentials at all
        (build it with an empty ``environ``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_provider")

    # --- fixtures ----------------------------------------------------------------------------------

    def _simulator_url(self) -> str:
        return (self.simulator_url or shared_simulator_url()).rstrip("/")

    @contextlib.asynccontextmanager
    async def _run(self, *, api_key: str | None = "sk-conformance-key") -> AsyncIterator[ConformanceRun]:
        client = httpx.AsyncClient(timeout=httpx.Timeout(30.0))
        url = self._simulator_url()
        provider = self.make_provider(url, api_key=api_key, http_client=client)
        try:
            yield ConformanceRun(provider, client, url, self.chat_model)
        finally:
            await provider.aclose()
            await client.aclose()

    @pytest_asyncio.fixture
    async def conformance(self) -> AsyncIterator[ConformanceRun]:
        async with self._run() as run:
            yield run

    # --- chat and streaming ------------------------------------------------------------------------

    async def test_chat_returns_text_and_usage(self, conformance: ConformanceRun) -> None:
        provider = conformance.provider
        if not await self._declared(conformance, "chat"):
            return
        response = await provider.chat(conformance.request("Say hello to the conformance kit"))
        assert response.provider == provider.name
        assert response.text, "chat answered without text"
        assert response.finish_reason == "stop"
        usage = response.usage
        assert usage.prompt_tokens > 0 and usage.completion_tokens > 0, f"usage missing: {usage}"
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert await conformance.requests_seen() == 1

    async def test_stream_events_in_order(self, conformance: ConformanceRun) -> None:
        provider = conformance.provider
        if not await self._declared(conformance, "stream"):
            return
        events = await _events(provider, conformance.request("Stream a few words back"))
        kinds = [type(event).__name__ for event in events]
        assert isinstance(events[0], StreamStart), f"the first event must be StreamStart, got {kinds}"
        assert isinstance(events[-1], StreamDone), f"the last event must be StreamDone, got {kinds}"
        assert kinds.count("StreamStart") == 1 and kinds.count("StreamDone") == 1, kinds
        assert "StreamError" not in kinds, kinds
        assert any(isinstance(e, TextDelta) and e.text for e in events), f"no text deltas: {kinds}"
        start = events[0]
        assert start.provider == provider.name

    async def test_stream_collects_to_the_chat_answer(self, conformance: ConformanceRun) -> None:
        provider = conformance.provider
        if not await self._declared(conformance, "stream"):
            return
        request = conformance.request("The same answer, streamed or not")
        chat = await provider.chat(request)
        streamed = await collect_stream(provider.stream(request), provider=provider.name)
        assert streamed.text == chat.text
        assert streamed.finish_reason == chat.finish_reason
        assert streamed.tool_calls == chat.tool_calls

    async def test_stream_usage_matches_chat(self, conformance: ConformanceRun) -> None:
        provider = conformance.provider
        if not await self._declared(conformance, "stream"):
            return
        if not self.stream_reports_usage:
            pytest.skip(f"provider {provider.name!r} declares that its streams report no usage")
        request = conformance.request("Count my tokens, streamed or not")
        chat = await provider.chat(request)
        streamed = await collect_stream(provider.stream(request), provider=provider.name)
        assert streamed.usage == chat.usage

    # --- tools and structured output ---------------------------------------------------------------

    async def test_tool_call_round_trip(self, conformance: ConformanceRun) -> None:
        provider = conformance.provider
        if not await self._declared(conformance, "tools"):
            return
        request = conformance.request("What is the weather in Oslo?", tools=[_WEATHER_TOOL])
        first = await provider.chat(request)
        assert first.finish_reason == "tool_calls", f"expected a tool call, got {first.finish_reason}"
        [call] = first.tool_calls
        assert call.function.name == "get_weather" and call.id
        arguments = json.loads(call.function.arguments)
        assert isinstance(arguments, dict) and isinstance(arguments.get("city"), str), arguments

        if provider.capabilities.stream:
            streamed = await collect_stream(provider.stream(request), provider=provider.name)
            assert streamed.finish_reason == "tool_calls"
            assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed.tool_calls] == [
                ("get_weather", arguments)
            ]

        # The answer goes back as it came, through JSON as through workflow history: whatever state
        # the provider attached to it (signatures, thinking) must survive and be accepted.
        answered = AssistantMessage.model_validate_json(first.choices[0].message.model_dump_json())
        result = f"sunny-{conformance.tag}"
        follow_up = request.model_copy(
            update={
                "messages": [*request.messages, answered, ToolMessage(tool_call_id=call.id, content=result)]
            }
        )
        final = await provider.chat(follow_up)
        assert final.finish_reason == "stop" and not final.tool_calls
        assert result in final.text, f"the tool result did not reach the model: {final.text!r}"

    async def test_structured_output_validates(self, conformance: ConformanceRun) -> None:
        provider = conformance.provider
        if not await self._declared(conformance, "json_schema"):
            return
        assert provider.capabilities.json_schema_mode in ("native", "tool"), (
            f"provider {provider.name!r} declares json_schema but json_schema_mode "
            f"{provider.capabilities.json_schema_mode!r}"
        )
        schema = JsonSchemaFormat(name="ticket", json_schema=_Ticket.model_json_schema())
        request = conformance.request(
            "Classify: the app crashes on start",
            response_format=ResponseFormatJsonSchema(json_schema=schema),
        )
        modes: list[Mode] = ["chat", "stream"] if provider.capabilities.stream else ["chat"]
        for mode in modes:
            response = await _call(provider, request, mode)
            assert not response.tool_calls, f"{mode}: structured output leaked as a tool call"
            assert response.finish_reason == "stop", f"{mode}: finish_reason {response.finish_reason}"
            try:
                _Ticket.model_validate_json(response.text)
            except ValidationError as exc:
                pytest.fail(f"{mode}: the answer does not validate against the schema: {exc}")

    async def test_embeddings(self, conformance: ConformanceRun) -> None:
        provider = conformance.provider
        if not await self._declared(conformance, "embeddings"):
            return
        assert self.embed_model, f"{type(self).__name__} declares embeddings but sets no embed_model"
        texts = [conformance.prompt("first text"), conformance.prompt("second text")]
        response = await provider.embed(EmbedRequest(model=self.embed_model, input=texts))
        assert len(response.embeddings) == 2
        assert response.embeddings[0] and len(response.embeddings[0]) == len(response.embeddings[1])
        assert response.embeddings[0] != response.embeddings[1]

    # --- errors ------------------------------------------------------------------------------------

    @pytest.mark.parametrize("mode", ["chat", "stream"])
    @pytest.mark.parametrize("fault", list(FAULT_EXPECTATIONS))
    async def test_fault_maps_to_kernel_error_without_retrying(
        self, conformance: ConformanceRun, fault: str, mode: Mode
    ) -> None:
        provider = conformance.provider
        if mode == "stream" and not await self._declared(conformance, "stream"):
            return
        expected = FAULT_EXPECTATIONS[fault]
        directive = f"fault={fault}" + (f" retry_after={_RETRY_AFTER:g}" if fault == "429" else "")
        request = conformance.request("This call fails", directive)
        if mode == "chat":
            with pytest.raises(ProviderError) as caught:
                await provider.chat(request)
            error = caught.value
            assert isinstance(error, expected), f"fault {fault}: expected {expected.__name__}, got {error!r}"
            assert error.provider == provider.name
            if fault == "429":
                assert error.retry_after == pytest.approx(_RETRY_AFTER)
        else:
            await self._check_stream_fault(provider, request, fault, expected)
        assert await conformance.requests_seen() == 1, "the provider retried (one request expected)"

    async def _check_stream_fault(
        self, provider: Provider, request: ChatRequest, fault: str, expected: type[ProviderError]
    ) -> None:
        events: list[StreamEvent] = []
        try:
            events = await _events(provider, request)
        except ProviderError as error:
            assert isinstance(error, expected), f"fault {fault}: expected {expected.__name__}, got {error!r}"
            if fault == "429":
                assert error.retry_after == pytest.approx(_RETRY_AFTER)
            return
        assert fault not in _RAISED_BEFORE_FIRST_EVENT, (
            f"fault {fault}: the status is known before the first event, so stream() must raise "
            f"{expected.__name__}; it yielded {[type(e).__name__ for e in events]}"
        )
        assert not any(isinstance(e, StreamDone) for e in events), "a failed stream ended with StreamDone"
        assert isinstance(events[-1], StreamError) and events[-1].error_type == expected.__name__, events

    @pytest.mark.parametrize("mode", ["chat", "stream"])
    async def test_quota_exhaustion_is_classified_and_not_retried(
        self, conformance: ConformanceRun, mode: Mode
    ) -> None:
        provider = conformance.provider
        if self.quota_error is None:
            pytest.skip(f"{type(self).__name__} declares that its upstream has no out-of-credit answer")
        if mode == "stream" and not await self._declared(conformance, "stream"):
            return
        with pytest.raises(ProviderError) as caught:
            await _call(provider, conformance.request("Out of credit", "fault=quota"), mode)
        assert isinstance(caught.value, self.quota_error), (
            f"quota ({mode}): expected {self.quota_error.__name__}, got {caught.value!r}"
        )
        assert await conformance.requests_seen() == 1, "the provider retried (one request expected)"

    # --- request options ---------------------------------------------------------------------------

    async def test_unsupported_options_are_refused_or_dropped_never_ignored(
        self, conformance: ConformanceRun
    ) -> None:
        provider = conformance.provider
        unknown = sorted(set(provider.refused_options()) - set(REQUEST_OPTIONS))
        assert not unknown, f"unsupported_options names fields that are not request options: {unknown}"
        values: dict[str, Any] = {
            "temperature": 0.5,
            "top_p": 0.5,
            "max_tokens": 64,
            "stop": ["ZZZ"],
            "seed": 1,
            "presence_penalty": 0.1,
            "frequency_penalty": 0.1,
            "user": "u-1",
            "parallel_tool_calls": False,
            "reasoning_effort": "low",
            "thinking_budget": 1024,
            "service_tier": "auto",
            "cache": {"key": "k"},
            "provider_options": {provider.name: {}},
        }
        for option in sorted(provider.refused_options()):
            request = conformance.request("An option it cannot honour", **{option: values[option]})
            with pytest.raises(UnsupportedCapability) as caught:
                await provider.chat(request)
            assert option in str(caught.value), f"the refusal must name {option!r}: {caught.value}"
            prepared = provider.prepare_chat(request.model_copy(update={"lenient": True}))
            assert getattr(prepared.request, option) is None, f"lenient mode kept {option!r}"
            assert any(option in warning for warning in prepared.warnings), prepared.warnings
        assert await conformance.requests_seen() == 0, "a request with an unsupported option was sent"
        if provider.refused_options():
            lenient = conformance.request(
                "Served without what it cannot honour",
                lenient=True,
                **{option: values[option] for option in provider.refused_options()},
            )
            response = await provider.chat(provider.prepare_chat(lenient).request)
            assert response.text

    async def test_known_model_rules_refuse_before_the_call(self, conformance: ConformanceRun) -> None:
        provider = conformance.provider
        if self.catalog_model is None:
            pytest.skip(f"{type(self).__name__} names no catalog_model")
        facts = provider.model_facts(self.catalog_model)
        assert facts is not None, (
            f"the model catalog does not list {self.catalog_model!r} for {provider.name!r}"
        )
        refused = [*facts.refuses, *(group[1] for group in facts.exclusive if len(group) > 1)]
        assert refused, f"{self.catalog_model!r} refuses nothing; name a model with rules as catalog_model"
        option = refused[0]
        fields: dict[str, Any] = {option: 0.5}
        for group in facts.exclusive:
            if option in group:
                fields[group[0]] = 0.5
        request = ChatRequest(
            model=self.catalog_model,
            messages=[UserMessage(content=conformance.prompt("A refused option"))],
            **fields,
        )
        with pytest.raises(UnsupportedCapability) as caught:
            await provider.chat(request)
        assert option in str(caught.value), caught.value
        assert await conformance.requests_seen() == 0, "a request the model refuses was sent"

    async def test_stream_cut_midway_ends_with_stream_error(self, conformance: ConformanceRun) -> None:
        provider = conformance.provider
        if not await self._declared(conformance, "stream"):
            return
        events = await _events(provider, conformance.request(_LONG_TEXT, "fault=cut"))
        kinds = [type(event).__name__ for event in events]
        assert kinds and kinds[0] == "StreamStart", kinds
        assert kinds[-1] == "StreamError" and "StreamDone" not in kinds, kinds
        last = events[-1]
        assert isinstance(last, StreamError) and last.retryable, last
        assert await conformance.requests_seen() == 1

    async def test_closing_a_stream_early_releases_the_connection(self, conformance: ConformanceRun) -> None:
        provider = conformance.provider
        if not await self._declared(conformance, "stream"):
            return
        request = conformance.request(_LONG_TEXT, "token_delay=0.05")
        seen: list[StreamEvent] = []
        async with _closing(provider.stream(request)) as stream:
            async for event in stream:
                seen.append(event)
                if isinstance(event, TextDelta):
                    assert conformance.open_connections() >= 1, (
                        "make_provider must send requests through the http_client it is given"
                    )
                    break
        assert conformance.open_connections() == 0, "the connection stayed open after the stream closed"
        assert not any(isinstance(e, StreamDone) for e in seen)

        # A consumer cancelled while it waits for the next event releases it too.
        got_text = asyncio.Event()

        async def consume() -> None:
            async for event in provider.stream(request):
                if isinstance(event, TextDelta):
                    got_text.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_text.wait(), timeout=30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert conformance.open_connections() == 0, "the connection stayed open after cancellation"
        again = await provider.chat(conformance.request("still usable?"))
        assert again.text

    # --- credentials and capabilities --------------------------------------------------------------

    async def test_credentials_never_logged(self) -> None:
        secret = f"sk-conformance-{uuid.uuid4().hex}"
        async with self._run(api_key=secret) as run:
            provider = run.provider
            texts: list[str] = []
            with _captured_logs() as logged:
                ok = await provider.chat(run.request("A call that works"))
                modes: list[Mode] = ["chat", "stream"] if provider.capabilities.stream else ["chat"]
                for fault in ("401", "500"):
                    for mode in modes:
                        try:
                            await _call(provider, run.request("A call that fails", f"fault={fault}"), mode)
                        except ProviderError as error:
                            texts += _exception_texts(error)
                        else:
                            pytest.fail(f"fault {fault} ({mode}) did not fail")
            texts += [*logged, ok.model_dump_json(), repr(provider.settings), json.dumps(provider.describe())]
            leaked = [text for text in texts if secret in text]
            assert not leaked, f"the API key appears in: {leaked[:3]}"

    async def test_missing_credentials_refused_before_any_request(self) -> None:
        async with self._run(api_key=None) as run:
            provider = run.provider
            if type(provider).api_key_env is None and provider.has_credentials():
                # A provider that takes no credentials never demands any: the request goes out. (An
                # upstream that insists on a key, as the simulator's OpenAI wire does, may refuse it:
                # then the refusal is the upstream's HTTP 401, not the provider's own.)
                try:
                    await provider.chat(run.request("No key needed"))
                except AuthenticationFailed as exc:
                    assert exc.status_code == 401, f"refused without asking the upstream: {exc}"
                return
            assert not provider.has_credentials()
            modes: list[Mode] = ["chat", "stream"] if provider.capabilities.stream else ["chat"]
            for mode in modes:
                with pytest.raises(MissingCredentials) as caught:
                    await _call(provider, run.request("No key"), mode)
                env_var = caught.value.env_var
                assert env_var and env_var in str(caught.value), (
                    f"MissingCredentials must name the environment variable: {caught.value}"
                )
            assert await run.requests_seen() == 0, "a request was sent without credentials"

    async def test_vision_is_served_or_refused(self, conformance: ConformanceRun) -> None:
        if not await self._declared(conformance, "vision"):
            return
        content = [TextPart(text=conformance.prompt("describe")), ImagePart(image_url=ImageURL(url=_PIXEL))]
        response = await conformance.provider.chat(
            ChatRequest(model=conformance.model, messages=[UserMessage(content=content)])
        )
        assert response.text, "a request with an image got no answer"

    async def test_batch_is_idempotent_and_answers_each_item_in_order(
        self, conformance: ConformanceRun
    ) -> None:
        """A provider declaring ``batch`` finds the batch it made under a tag instead of making another,
        and answers each item in its place, a failed item classified like a realtime call."""
        if not await self._declared(conformance, "batch"):
            return
        provider = conformance.provider
        items = [
            BatchItem(custom_id="first", request=conformance.request("batch item one")),
            BatchItem(custom_id="second", request=conformance.request("batch item two", "fault=400")),
            BatchItem(custom_id="third", request=conformance.request("batch item three")),
        ]
        tag = batch_tag(conformance.tag)
        job = await provider.batch_submit(tag, items)
        again = await provider.batch_submit(tag, items)
        assert again.id == job.id, "submitting again under the same tag made a second batch"
        for _ in range(600):
            if (await provider.batch_status(job.id)).ended:
                break
            await asyncio.sleep(0.05)
        results = await provider.batch_results(job.id, [i.custom_id for i in items], conformance.model)
        assert [r.custom_id for r in results] == ["first", "second", "third"]
        assert [r.outcome for r in results] == ["succeeded", "errored", "succeeded"]
        assert results[1].error_type == "InvalidRequest" and not results[1].retryable
        assert all(
            r.response is not None and r.response.usage.prompt_tokens > 0 for r in (results[0], results[2])
        )

    async def _declared(self, run: ConformanceRun, capability: str) -> bool:
        """True when the provider declares ``capability``. Otherwise checks the other half of the
        contract instead of skipping: a request needing it is refused, naming it, before any request."""
        if getattr(run.provider.capabilities, capability):
            return True
        with pytest.raises(UnsupportedCapability) as caught:
            await self._needing(run, capability)
        assert capability in str(caught.value), caught.value
        assert await run.requests_seen() == 0, f"a request needing {capability} was sent"
        return False

    async def _needing(self, run: ConformanceRun, capability: str) -> None:
        provider = run.provider
        if capability == "chat":
            await provider.chat(run.request("chat please"))
        elif capability == "embeddings":
            await provider.embed(EmbedRequest(model=self.embed_model or run.model, input=[run.prompt("x")]))
        elif capability == "stream":
            await _events(provider, run.request("stream please"))
        elif capability == "tools":
            await provider.chat(run.request("use a tool", tools=[_WEATHER_TOOL]))
        elif capability == "batch":
            await provider.batch_submit(
                batch_tag(run.tag), [BatchItem(custom_id="only", request=run.request("batch please"))]
            )
        elif capability == "json_schema":
            schema = JsonSchemaFormat(name="ticket", json_schema=_Ticket.model_json_schema())
            await provider.chat(
                run.request("json", response_format=ResponseFormatJsonSchema(json_schema=schema))
            )
        else:
            content = [TextPart(text=run.prompt("describe")), ImagePart(image_url=ImageURL(url=_PIXEL))]
            await provider.chat(ChatRequest(model=run.model, messages=[UserMessage(content=content)]))

"""OpenTelemetry traces (gateway/tracing.py): the span tree of one retrieval, the agent's
``traceparent`` continued and passed on to OpenFGA, and tracing off by default.

Spans are collected with the SDK's InMemorySpanExporter; OpenFGA sits behind a
:class:`tests.faultproxy.FaultProxy` that records the headers it receives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway import tracing
from gateway.api import create_app
from gateway.fga_server import ManagedOpenFGA
from gateway.service import Gateway
from tests.conftest import make_settings
from tests.faultproxy import Fault, FaultProxy
from tests.world import World, bearer, doc

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
AGENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{AGENT_SPAN}-01"
DOCS = {
    "rev1": "Quarterly revenue forecast: revenue grows on enterprise renewals.",
    "rev2": "Revenue by region: the north grows fastest.",
    "pay1": "Salary bands for engineers, reviewed every year.",
}


@dataclass
class Traced:
    gateway: Gateway
    http: httpx.AsyncClient
    proxy: FaultProxy
    exporter: InMemorySpanExporter
    world: World
    task: str

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    async def retrieve(self, **headers: str) -> httpx.Response:
        token = self.world.agent_token("alice", "summarizer", self.task)
        return await self.http.post(
            "/v1/retrieve", json={"query": "revenue", "k": 2}, headers={**bearer(token), **headers}
        )


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.enable(provider)
    try:
        yield memory
    finally:
        tracing.disable()
        provider.shutdown()


async def _world(gateway: Gateway, http: httpx.AsyncClient) -> tuple[World, str]:
    w = await World(gateway, http, "acme").setup(members=["alice"], agents=["summarizer"])
    await w.ingest(
        [
            doc("rev1", DOCS["rev1"], ["user:alice"], ["agent:summarizer"]),
            doc("rev2", DOCS["rev2"], ["user:alice"], ["agent:summarizer"]),
            doc("pay1", DOCS["pay1"], agents=["agent:summarizer"]),
        ]
    )
    return w, await w.task("alice", "summarizer", ["source:docs"])


@pytest.fixture
async def traced(
    request: pytest.FixtureRequest,
    openfga: ManagedOpenFGA,
    tmp_path: Path,
    embeddings: Any,
    exporter: InMemorySpanExporter,
) -> AsyncIterator[Traced]:
    """A traced gateway behind a recording proxy; post-filter unless parametrized."""
    strategy = getattr(request, "param", "postfilter")
    with FaultProxy(openfga.http_port) as proxy:
        settings = make_settings(
            openfga, tmp_path / "data", openfga_url=proxy.url, strategy=strategy
        )
        g = await Gateway.start(settings, embeddings=embeddings)
        try:
            transport = httpx.ASGITransport(app=create_app(gateway=g))
            async with httpx.AsyncClient(transport=transport, base_url="http://scopegate") as c:
                w, task = await _world(g, c)
                exporter.clear()
                proxy.seen.clear()
                yield Traced(g, c, proxy, exporter, w, task)
        finally:
            await g.close()


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def _children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


async def test_one_retrieval_is_one_tree_in_the_agents_trace(traced: Traced) -> None:
    response = await traced.retrieve(traceparent=TRACEPARENT)
    assert response.status_code == 200, response.text
    assert {c["document_id"] for c in response.json()["chunks"]} == {"rev1", "rev2"}
    spans = traced.spans()
    assert {_hex(s.context.trace_id, 32) for s in spans} == {TRACE_ID}

    server = _one(spans, "POST /v1/retrieve")
    assert server.kind == SpanKind.SERVER
    assert server.parent is not None and server.parent.is_remote
    assert _hex(server.parent.span_id, 16) == AGENT_SPAN
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["http.route"] == "/v1/retrieve"

    retrieve = _one(spans, "scopegate.retrieve")
    assert {s.name for s in _children(spans, server)} == {"scopegate.verify", "scopegate.retrieve"}
    phases = [s.name for s in sorted(_children(spans, retrieve), key=lambda s: s.start_time or 0)]
    assert phases[0] == "scopegate.embed"
    assert phases[-2:] == ["scopegate.pack", "scopegate.audit"]
    assert set(phases) == {
        "scopegate.embed",
        "scopegate.search",
        "scopegate.check",
        "scopegate.pack",
        "scopegate.audit",
    }
    assert retrieve.attributes is not None
    assert retrieve.attributes["scopegate.request_id"] == response.json()["request_id"]
    assert retrieve.attributes["scopegate.outcome"] == "partial"
    assert retrieve.attributes["scopegate.candidates"] == 3
    assert retrieve.attributes["scopegate.batch_rounds"] == 1

    check = _one(spans, "scopegate.check")
    assert check.attributes is not None
    # Six request-level checks and four per candidate document, in the first round.
    assert check.attributes["scopegate.checks"] == 6 + 4 * 3
    assert check.attributes["scopegate.documents"] == 3
    assert check.attributes["scopegate.check.round"] == 1
    calls = _children(spans, check)
    assert calls and {c.name for c in calls} == {"openfga.BatchCheck"}
    assert all(c.kind == SpanKind.CLIENT for c in calls)
    assert sum(int((c.attributes or {})["scopegate.checks"]) for c in calls) == 18

    # OpenFGA received the trace: the agent's trace id, its parent the client span.
    sent = traced.proxy.requests("/batch-check")
    assert len(sent) == len(calls)
    parents = {_hex(c.context.span_id, 16) for c in calls}
    for request in sent:
        version, trace_id, parent_id, flags = request.headers["traceparent"].split("-")
        assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
        assert parent_id in parents


@pytest.mark.parametrize("traced", ["prefilter"], indirect=True)
async def test_the_prefilters_listobjects_carry_the_trace(traced: Traced) -> None:
    response = await traced.retrieve(traceparent=TRACEPARENT)
    assert response.status_code == 200, response.text
    spans = traced.spans()
    retrieve = _one(spans, "scopegate.retrieve")
    lists = [s for s in _children(spans, retrieve) if s.name == "openfga.StreamedListObjects"]
    assert lists and all(s.kind == SpanKind.CLIENT for s in lists)
    sent = traced.proxy.requests("/streamed-list-objects")
    assert len(sent) == len(lists)
    parents = {_hex(s.context.span_id, 16) for s in lists}
    for request in sent:
        _, trace_id, parent_id, _ = request.headers["traceparent"].split("-")
        assert trace_id == TRACE_ID and parent_id in parents
    assert {"scopegate.search", "scopegate.check"} <= {s.name for s in _children(spans, retrieve)}


async def test_nothing_of_the_request_is_in_span_attributes(traced: Traced) -> None:
    """Spans leave the gateway for a collector: no ids of people, documents or queries."""
    await traced.retrieve(traceparent=TRACEPARENT)
    values = [str(v) for s in traced.spans() for v in (s.attributes or {}).values()]
    for secret in ("alice", "summarizer", "acme", "rev1", "pay1", "revenue", traced.task):
        assert not any(secret in v for v in values), secret


async def test_without_a_traceparent_a_new_trace_starts(traced: Traced) -> None:
    for headers in ({}, {"traceparent": "00-not-a-valid-header-01"}):
        traced.exporter.clear()
        traced.proxy.seen.clear()
        assert (await traced.retrieve(**headers)).status_code == 200
        spans = traced.spans()
        server = _one(spans, "POST /v1/retrieve")
        assert server.parent is None
        assert _hex(server.context.trace_id, 32) != TRACE_ID
        assert len({s.context.trace_id for s in spans}) == 1
        for request in traced.proxy.requests("/batch-check"):
            assert _hex(server.context.trace_id, 32) in request.headers["traceparent"]


async def test_an_authzen_evaluation_is_traced_too(traced: Traced) -> None:
    token = traced.world.agent_token("alice", "summarizer", traced.task)
    body = {
        "subject": {"type": "user", "id": "alice"},
        "action": {"name": "read"},
        "resource": {"type": "document", "id": "rev1"},
    }
    response = await traced.http.post(
        "/access/v1/evaluation",
        json=body,
        headers={**bearer(token), "traceparent": TRACEPARENT},
    )
    assert response.json() == {"decision": True}
    spans = traced.spans()
    server = _one(spans, "POST /access/v1/evaluation")
    evaluate = _one(spans, "scopegate.evaluate")
    assert {s.name for s in _children(spans, server)} == {"scopegate.verify", "scopegate.evaluate"}
    assert {s.name for s in _children(spans, evaluate)} == {"scopegate.check", "scopegate.audit"}
    for request in traced.proxy.requests("/batch-check"):
        assert request.headers["traceparent"].split("-")[1] == TRACE_ID


async def test_a_failed_check_marks_its_spans(traced: Traced) -> None:
    traced.proxy.set(Fault.respond(500, {"code": "internal_error"}, path="/batch-check"))
    response = await traced.retrieve(traceparent=TRACEPARENT)
    assert response.status_code == 503
    spans = traced.spans()
    server = _one(spans, "POST /v1/retrieve")
    assert server.status.status_code == StatusCode.ERROR
    assert (server.attributes or {})["http.response.status_code"] == 503
    check = _one(spans, "scopegate.check")
    assert check.status.status_code == StatusCode.ERROR
    assert any(e.name == "exception" for e in check.events)
    # The failed request is still recorded, inside the retrieval's span.
    retrieve = _one(spans, "scopegate.retrieve")
    assert "scopegate.audit" in {s.name for s in _children(spans, retrieve)}


# -- off by default ----------------------------------------------------------------------------


@pytest.fixture
async def untraced(
    openfga: ManagedOpenFGA, tmp_path: Path, embeddings: Any
) -> AsyncIterator[Traced]:
    assert not tracing.enabled()
    memory = InMemorySpanExporter()
    with FaultProxy(openfga.http_port) as proxy:
        settings = make_settings(openfga, tmp_path / "data", openfga_url=proxy.url)
        g = await Gateway.start(settings, embeddings=embeddings)
        try:
            transport = httpx.ASGITransport(app=create_app(gateway=g))
            async with httpx.AsyncClient(transport=transport, base_url="http://scopegate") as c:
                w, task = await _world(g, c)
                proxy.seen.clear()
                yield Traced(g, c, proxy, memory, w, task)
        finally:
            await g.close()


async def test_off_by_default_nothing_is_sent_on(
    untraced: Traced, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert tracing.configure_from_env() is None
    assert not tracing.enabled()
    assert (await untraced.retrieve(traceparent=TRACEPARENT)).status_code == 200
    sent = untraced.proxy.requests("/batch-check")
    assert sent and all("traceparent" not in r.headers for r in sent)
    assert tracing.headers() == {}
    with tracing.span("scopegate.anything") as span:
        assert span is None


# -- configuration from OTEL_* ------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in (
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
    ):
        monkeypatch.delenv(name, raising=False)
    try:
        yield monkeypatch
    finally:
        tracing.disable()


def _configured() -> TracerProvider:
    provider = tracing.configure_from_env()
    assert provider is not None and tracing.enabled()
    return provider


def test_console_exporter_and_service_name(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OTEL_TRACES_EXPORTER", "console")
    provider = _configured()
    assert provider.resource.attributes["service.name"] == "scopegate"
    tracing.disable()
    provider.shutdown()
    clean_env.setenv("OTEL_SERVICE_NAME", "gateway-eu")
    provider = _configured()
    assert provider.resource.attributes["service.name"] == "gateway-eu"
    tracing.disable()
    provider.shutdown()


def test_an_otlp_endpoint_turns_tracing_on(clean_env: pytest.MonkeyPatch) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    provider = _configured()
    processors = provider._active_span_processor._span_processors
    assert [type(p._batch_processor._exporter) for p in processors] == [OTLPSpanExporter]
    tracing.disable()
    provider.shutdown()


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_TRACES_EXPORTER": "none"},
    ],
)
def test_stays_off_unless_asked(clean_env: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert tracing.configure_from_env() is None
    assert not tracing.enabled()


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"},
    ],
)
def test_unusable_settings_fail_at_startup(
    clean_env: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=r"OTEL_TRACES_EXPORTER|OTLP protocol"):
        tracing.configure_from_env()
    assert not tracing.enabled()

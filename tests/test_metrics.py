"""/metrics after real retrievals (gateway/metrics.py): decisions by tenant and verdict,
denials by the conjunct that failed, and requests that failed closed, by error code.

The counters are served by the operators' metrics app, never by the agent-facing API."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.api import create_app
from gateway.metrics import Metrics, create_metrics_app
from gateway.service import Gateway
from tests.world import World, bearer, doc


@pytest.fixture(autouse=True)
def postfilter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Denied candidates are only seen (and counted) when the search finds them: the
    post-filter, not a pre-filter that the adaptive strategy might pick."""
    monkeypatch.setenv("SCOPEGATE_STRATEGY", "postfilter")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def http(gateway: Gateway, metrics: Metrics) -> AsyncIterator[httpx.AsyncClient]:
    """The agent-facing API, counting into ``metrics``."""
    transport = httpx.ASGITransport(app=create_app(gateway=gateway, metrics=metrics))
    async with httpx.AsyncClient(transport=transport, base_url="http://scopegate") as client:
        yield client


@pytest.fixture
async def scrape(metrics: Metrics) -> AsyncIterator[httpx.AsyncClient]:
    """The operators' metrics listener, serving the same ``metrics``."""
    transport = httpx.ASGITransport(app=create_metrics_app(metrics))
    async with httpx.AsyncClient(transport=transport, base_url="http://metrics") as client:
        yield client


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_decisions_failed_checks_and_errors(
    gateway: Gateway, http: httpx.AsyncClient, scrape: httpx.AsyncClient
) -> None:
    w = await World(gateway, http, "acme").setup(members=["alice"], agents=["summarizer"])
    await w.ingest(
        [
            doc("d1", "Revenue forecast: renewals.", ["user:alice"], ["agent:summarizer"]),
            doc("d2", "Revenue forecast: churn.", ["user:alice"]),  # agent may not read
            doc("d3", "Revenue forecast: pricing.", [], ["agent:summarizer"]),  # user may not
        ]
    )
    task = await w.task("alice", "summarizer", ["source:docs"])
    for _ in range(2):
        assert (await w.retrieve("alice", "summarizer", task, "revenue", k=10)).status_code == 200
    missing = await w.retrieve("alice", "summarizer", task, "revenue", sources=["nope"])
    assert missing.status_code == 404

    response = await scrape.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    # The counts must agree with what the audit log recorded.
    verdicts: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    async for entry in gateway.audit.iter_all("acme"):
        for c in entry.record.candidates:
            verdicts[c.verdict] += 1
            failed.update(c.failed_checks)
    assert verdicts["allow"] == 2 and verdicts["deny"] >= 2
    for verdict in ("allow", "deny"):
        assert (
            value("scopegate_decisions_total", tenant="acme", verdict=verdict) == verdicts[verdict]
        )
    assert failed["agent_can_read"] >= 1 and failed["user_can_read"] >= 1
    for check, count in failed.items():
        assert value("scopegate_failed_checks_total", tenant="acme", check=check) == count
    assert value("scopegate_failed_checks_total", tenant="acme", check="task_active") == 0
    assert value("scopegate_request_errors_total", tenant="acme", code="not_found") == 1
    retrievals = value("scopegate_http_request_seconds_count", route="/v1/retrieve", status="200")
    assert retrievals == 2
    assert 'tenant="globex"' not in response.text


async def test_agent_facing_api_never_serves_metrics(
    gateway: Gateway, http: httpx.AsyncClient, scrape: httpx.AsyncClient
) -> None:
    w = await World(gateway, http, "acme").setup(members=["alice"], agents=["summarizer"])
    task = await w.task("alice", "summarizer", ["source:docs"])
    assert (await w.retrieve("alice", "summarizer", task, "anything")).status_code == 200
    agent = bearer(w.agent_token("alice", "summarizer", task))
    for headers in ({}, agent, bearer(w.admin_token)):
        for method in ("GET", "HEAD"):
            response = await http.request(method, "/metrics", headers=headers)
            assert response.status_code == 404, (method, headers)
            assert "scopegate_" not in response.text
    assert (await http.get("/metrics")).json()["error"]["code"] == "not_found"
    assert "/metrics" not in (await http.get("/openapi.json")).json()["paths"]

    served = await scrape.get("/metrics")
    assert served.status_code == 200
    samples = _samples(served.text)
    retrievals = samples[
        (
            "scopegate_http_request_seconds_count",
            frozenset({("route", "/v1/retrieve"), ("status", "200")}),
        )
    ]
    assert retrievals == 1
    # The metrics app serves nothing but /metrics.
    for path in ("/", "/v1/retrieve", "/healthz", "/review"):
        assert (await scrape.get(path)).status_code == 404


def test_every_route_family_has_its_own_latency_label() -> None:
    # Token exchange, SCIM and AuthZEN are as much the gateway's work as retrieval: each
    # is timed under its own label, and unknown paths share one (bounded cardinality).
    m = Metrics()
    paths = {
        "/v1/token": "/v1/token",
        "/scim/v2/Users/u1": "/scim/v2",
        "/access/v1/evaluation": "/access/v1",
        "/v1/principals/user:alice": "/v1/principals",
        "/v1/tenants/acme/directory": "/v1/tenants",
        "/v1/retrieve/sources": "/v1/retrieve",
        "/no/such/path/3f2a": "other",
    }
    for path in paths:
        m.observe_http(path, 200, 0.01)
    counted = {
        sample.labels["route"]
        for family in text_string_to_metric_families(m.render()[0].decode())
        for sample in family.samples
        if sample.name == "scopegate_http_request_seconds_count"
    }
    assert counted == set(paths.values())

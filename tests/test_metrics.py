"""/metrics after real retrievals (gateway/metrics.py): decisions by tenant and verdict,
denials by the conjunct that failed, and requests that failed closed, by error code."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.service import Gateway
from tests.world import World, doc


@pytest.fixture(autouse=True)
def postfilter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Denied candidates are only seen (and counted) when the search finds them: the
    post-filter, not a pre-filter that the adaptive strategy might pick."""
    monkeypatch.setenv("SCOPEGATE_STRATEGY", "postfilter")


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_decisions_failed_checks_and_errors(
    gateway: Gateway, http: httpx.AsyncClient
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

    response = await http.get("/metrics")
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

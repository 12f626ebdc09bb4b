"""Rate limits of retrieval (gateway/ratelimit.py): token buckets on a fake clock, and
429 ``rate_limited`` with ``Retry-After`` from a real gateway, keyed by the verified token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest

from gateway.api import create_app
from gateway.errors import RateLimited
from gateway.fga_server import ManagedOpenFGA
from gateway.metrics import Metrics
from gateway.ratelimit import Rate, RetrievalLimiter, TokenBuckets
from gateway.service import Gateway
from gateway.settings import load_settings
from tests.conftest import make_settings
from tests.world import World, doc


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def drain(buckets: TokenBuckets, key: str) -> int:
    taken = 0
    while buckets.wait_s(key) == 0:
        buckets.take(key)
        taken += 1
    return taken


# -- the buckets ------------------------------------------------------------------------


def test_bucket_allows_the_burst_then_refills_at_the_rate() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(Rate(per_s=2, burst=3), clock=clock)
    assert drain(buckets, "a") == 3
    assert buckets.wait_s("a") == pytest.approx(0.5)
    clock.advance(0.25)
    assert buckets.wait_s("a") == pytest.approx(0.25)
    clock.advance(0.25)
    assert drain(buckets, "a") == 1


def test_bucket_saves_up_at_most_the_burst() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(Rate(per_s=5, burst=4), clock=clock)
    drain(buckets, "a")
    clock.advance(3600)
    assert drain(buckets, "a") == 4


def test_bucket_keys_are_independent() -> None:
    buckets = TokenBuckets(Rate(per_s=1, burst=1), clock=FakeClock())
    assert drain(buckets, "a") == 1
    assert buckets.wait_s("a") > 0
    assert drain(buckets, "b") == 1


def test_a_clock_going_back_mints_no_tokens() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(Rate(per_s=1, burst=2), clock=clock)
    drain(buckets, "a")
    clock.advance(-100)
    assert buckets.wait_s("a") > 0
    clock.advance(100)
    assert buckets.wait_s("a") > 0  # no refill for time that already counted


def test_memory_is_bounded_least_recently_used_first() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(Rate(per_s=1, burst=1), clock=clock, max_buckets=2)
    for key in ("a", "b"):
        drain(buckets, key)
    assert buckets.wait_s("a") > 0  # a is now more recently used than b
    drain(buckets, "c")  # evicts b
    assert len(buckets) == 2
    assert buckets.wait_s("a") > 0, "a recently used bucket must survive"
    assert buckets.wait_s("b") == 0, "the evicted bucket comes back full"
    assert len(buckets) == 2


def test_rates_and_default_bursts() -> None:
    assert Rate.of(None, None) is None
    assert Rate.of(2.5, None) == Rate(2.5, 3)
    assert Rate.of(0.1, None) == Rate(0.1, 1)
    assert Rate.of(1, 10) == Rate(1, 10)
    for per_s, burst in ((0, 1), (-1, 1), (1, 0)):
        with pytest.raises(ValueError):
            Rate(per_s, burst)


# -- the limiter: agent and tenant buckets together -------------------------------------


def test_limiter_off_admits_everything() -> None:
    limiter = RetrievalLimiter(None, None, clock=FakeClock())
    assert not limiter.enabled
    for _ in range(1000):
        limiter.admit("acme", "bot")


def test_agent_limit_with_retry_after_in_whole_seconds() -> None:
    clock = FakeClock()
    limiter = RetrievalLimiter(Rate(per_s=0.4, burst=2), None, clock=clock)
    limiter.admit("acme", "bot")
    limiter.admit("acme", "bot")
    with pytest.raises(RateLimited) as refused:
        limiter.admit("acme", "bot")
    assert refused.value.status == 429 and refused.value.code == "rate_limited"
    assert refused.value.retry_after_s == 3  # 2.5 s, rounded up
    limiter.admit("acme", "other-agent")
    limiter.admit("globex", "bot")  # the key is tenant and agent
    clock.advance(2.5)
    limiter.admit("acme", "bot")


def test_tenant_limit_spans_its_agents() -> None:
    clock = FakeClock()
    limiter = RetrievalLimiter(None, Rate(per_s=1, burst=3), clock=clock)
    for agent in ("a", "b", "c"):
        limiter.admit("acme", agent)
    with pytest.raises(RateLimited) as refused:
        limiter.admit("acme", "d")
    assert refused.value.retry_after_s == 1
    limiter.admit("globex", "a")


def test_a_refused_request_takes_no_token_from_the_other_bucket() -> None:
    clock = FakeClock()
    limiter = RetrievalLimiter(Rate(per_s=1, burst=1), Rate(per_s=1, burst=2), clock=clock)
    limiter.admit("acme", "noisy")
    for _ in range(5):
        with pytest.raises(RateLimited):
            limiter.admit("acme", "noisy")  # refused by its own bucket
    limiter.admit("acme", "quiet")  # so the tenant's second token is still there
    with pytest.raises(RateLimited):
        limiter.admit("acme", "third")  # the tenant's bucket is empty now...
    clock.advance(1)
    limiter.admit("acme", "third")  # ...and the refusal did not drain the agent's bucket


def test_refused_by_both_waits_for_the_later_one() -> None:
    clock = FakeClock()
    limiter = RetrievalLimiter(Rate(per_s=0.25, burst=1), Rate(per_s=1, burst=1), clock=clock)
    limiter.admit("acme", "bot")
    with pytest.raises(RateLimited) as refused:
        limiter.admit("acme", "bot")
    assert refused.value.retry_after_s == 4


def test_settings_refuse_a_burst_without_a_rate() -> None:
    with pytest.raises(pydantic.ValidationError, match="RATE_LIMIT_AGENT_PER_S"):
        load_settings(rate_limit_agent_burst=5)
    with pytest.raises(pydantic.ValidationError):
        load_settings(rate_limit_tenant_per_s=0)
    settings = load_settings()
    assert settings.rate_limit_agent_per_s is None and settings.rate_limit_tenant_per_s is None


# -- over HTTP ----------------------------------------------------------------------------

# Rates so slow that no token comes back while a test runs: the outcome does not
# depend on how fast the machine is.
SLOW = 0.001
LIMITS = {
    "rate_limit_agent_per_s": SLOW,
    "rate_limit_agent_burst": 2,
    "rate_limit_tenant_per_s": SLOW,
    "rate_limit_tenant_burst": 3,
}


@pytest.fixture
async def limited(
    openfga: ManagedOpenFGA, tmp_path: Path, embeddings: Any
) -> AsyncIterator[Gateway]:
    settings = make_settings(openfga, tmp_path / "data", **LIMITS)
    g = await Gateway.start(settings, embeddings=embeddings)
    try:
        yield g
    finally:
        await g.close()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def limited_http(limited: Gateway, metrics: Metrics) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(gateway=limited, metrics=metrics)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://scopegate") as client:
        yield client


async def _world(g: Gateway, http: httpx.AsyncClient, tenant: str) -> tuple[World, dict[str, str]]:
    agents = ["summarizer", "planner"]
    w = await World(g, http, tenant).setup(members=["alice"], agents=agents)
    readers = [f"agent:{a}" for a in agents]
    await w.ingest([doc("d1", "Revenue forecast for the year.", ["user:alice"], readers)])
    tasks = {a: await w.task("alice", a, ["source:docs"]) for a in agents}
    return w, tasks


def _assert_limited(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    body = response.json()
    assert set(body) == {"error"}, "a rate-limited request returns no content"
    assert body["error"]["code"] == "rate_limited"
    assert body["error"]["request_id"]
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= round(1 / SLOW)
    assert "Revenue" not in response.text


async def test_http_429_with_retry_after_per_agent_then_per_tenant(
    limited: Gateway, limited_http: httpx.AsyncClient, metrics: Metrics
) -> None:
    w, tasks = await _world(limited, limited_http, "acme")

    async def retrieve(agent: str) -> httpx.Response:
        return await w.retrieve("alice", agent, tasks[agent], "revenue")

    for _ in range(2):  # the agent's burst
        ok = await retrieve("summarizer")
        assert ok.status_code == 200 and ok.json()["chunks"], ok.text
    _assert_limited(await retrieve("summarizer"))
    # Another agent of the same tenant has its own bucket: it still passes, and the
    # refused request above took nothing from the tenant's bucket (burst 3).
    assert (await retrieve("planner")).status_code == 200
    # Now the tenant's bucket is empty: the planner, with a token of its own left, waits too.
    _assert_limited(await retrieve("planner"))
    # Other tenants are not affected.
    other, other_tasks = await _world(limited, limited_http, "globex")
    passed = await other.retrieve("alice", "planner", other_tasks["planner"], "revenue")
    assert passed.status_code == 200

    def errors(tenant: str) -> float | None:
        labels = {"tenant": tenant, "code": "rate_limited"}
        return metrics.registry.get_sample_value("scopegate_request_errors_total", labels)

    assert errors("acme") == 2 and errors("globex") is None


async def test_http_limits_key_on_the_verified_token(
    limited: Gateway, limited_http: httpx.AsyncClient
) -> None:
    w, tasks = await _world(limited, limited_http, "acme")
    for _ in range(2):
        await w.retrieve("alice", "summarizer", tasks["summarizer"], "revenue")
    # Invalid tokens are refused before the limiter is consulted, and take nothing.
    bad = await limited_http.post(
        "/v1/retrieve",
        json={"query": "revenue"},
        headers={"authorization": "Bearer not-a-token"},
    )
    assert bad.status_code == 401
    # Nothing in the body names the limiter's key: an agent cannot pick another's bucket.
    spoofed = await limited_http.post(
        "/v1/retrieve",
        json={"query": "revenue", "agent": "planner", "tenant": "globex"},
        headers={"authorization": f"Bearer {w.agent_token('alice', 'summarizer', 'x')}"},
    )
    assert spoofed.status_code == 422
    _assert_limited(await w.retrieve("alice", "summarizer", tasks["summarizer"], "revenue"))
    assert (await w.retrieve("alice", "planner", tasks["planner"], "revenue")).status_code == 200

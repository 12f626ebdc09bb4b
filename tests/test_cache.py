"""The optional decision cache, against the real OpenFGA: hits, staleness bound, bypass.

The cache is off by default. When on, an answer may be served from it only while the
last complete ReadChanges poll started less than ``max_staleness_s`` ago, so a revoke
is denied at the latest ``max_staleness_s`` after it committed; a request with
``Cache-Control: no-cache`` is answered by OpenFGA alone; time-dependent answers are
keyed by time bucket, so a cached allow never outlives a task expiry.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.api import create_app
from gateway.cache import CacheRefused, DecisionCache, check_conditions, time_dependent_relations
from gateway.fga import load_model
from gateway.fga_server import ManagedOpenFGA
from gateway.service import Gateway
from tests.conftest import make_settings
from tests.world import World, bearer, doc

STALENESS_S = 1.0
TEXT = "Quarterly revenue forecast for the enterprise segment."


@pytest.fixture
async def cached(
    openfga: ManagedOpenFGA, tmp_path: Path, embeddings: Any
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    settings = make_settings(
        openfga,
        tmp_path / "data",
        decision_cache=True,
        decision_cache_poll_s=0.1,
        decision_cache_max_staleness_s=STALENESS_S,
        decision_cache_bucket_s=1.0,
        strategy="postfilter",
    )
    g = await Gateway.start(settings, embeddings=embeddings)
    transport = httpx.ASGITransport(app=create_app(gateway=g))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://scopegate") as http:
            yield g, http
    finally:
        await g.close()


async def _world(g: Gateway, http: httpx.AsyncClient, expires_at: str | None = None) -> World:
    w = await World(g, http, "acme").setup(members=["alice"], agents=["bot"])
    await w.ingest([doc("d1", TEXT, viewers=["user:alice"], agents=["agent:bot"])])
    w.task_id = await w.task("alice", "bot", ["source:docs"], expires_at=expires_at)  # type: ignore[attr-defined]
    assert g.watcher is not None
    await g.watcher.poll_once()  # the setup writes are seen: the cache vouches from here
    return w


async def _docs(w: World, **headers: str) -> list[str]:
    token = w.agent_token("alice", "bot", w.task_id)  # type: ignore[attr-defined]
    response = await w.http.post(
        "/v1/retrieve", json={"query": "revenue forecast", "k": 3},
        headers={**bearer(token), **headers},
    )
    assert response.status_code == 200, response.text
    return [c["document_id"] for c in response.json()["chunks"]]


async def test_cache_is_off_by_default(gateway: Gateway) -> None:
    assert gateway.fga.cache is None and gateway.watcher is None


async def test_repeated_retrieval_is_answered_from_the_cache(
    cached: tuple[Gateway, httpx.AsyncClient],
) -> None:
    g, http = cached
    w = await _world(g, http)
    assert await _docs(w) == ["d1"]
    before = g.fga.stats.snapshot()
    assert await _docs(w) == ["d1"]
    after = g.fga.stats
    assert after.cache_hits - before.cache_hits >= 10  # 6 request + 4 document checks
    assert after.batch_check_calls == before.batch_check_calls  # no round trip at all
    latest = [e async for e in g.audit.iter_all("acme") if e.record.kind == "retrieve"][-1]
    assert latest.record.consistency.endswith("+cache")


async def test_no_cache_header_goes_to_openfga_and_sees_a_revoke_at_once(
    cached: tuple[Gateway, httpx.AsyncClient],
) -> None:
    g, http = cached
    w = await _world(g, http)
    assert await _docs(w) == ["d1"]
    assert g.watcher is not None
    await g.watcher.stop()  # no invalidation can arrive: only the bypass can see the revoke
    await w.relationships(
        deletes=[{"user": "user:alice", "relation": "viewer", "object": "document:d1"}]
    )
    calls = g.fga.stats.batch_check_calls
    assert await _docs(w, **{"cache-control": "no-cache"}) == []
    assert g.fga.stats.batch_check_calls > calls
    latest = [e async for e in g.audit.iter_all("acme") if e.record.kind == "retrieve"][-1]
    assert latest.record.consistency == "HIGHER_CONSISTENCY"
    assert latest.record.candidates[0].failed_checks == ("user_can_read",)


async def test_revoke_is_denied_within_the_staleness_bound(
    cached: tuple[Gateway, httpx.AsyncClient],
) -> None:
    g, http = cached
    w = await _world(g, http)
    assert await _docs(w) == ["d1"]
    assert await _docs(w) == ["d1"]  # warm
    await w.relationships(
        deletes=[{"user": "user:alice", "relation": "viewer", "object": "document:d1"}]
    )
    revoked = time.monotonic()
    # The bound is a property of the design (no entry is served unless a poll that
    # started after the revoke has applied it), not a performance figure.
    await asyncio.sleep(max(0.0, revoked + STALENESS_S - time.monotonic()) + 0.05)
    assert await _docs(w) == []


async def test_cache_stops_answering_when_change_polls_stop(
    cached: tuple[Gateway, httpx.AsyncClient],
) -> None:
    g, http = cached
    w = await _world(g, http)
    assert await _docs(w) == ["d1"]
    assert g.watcher is not None and g.fga.cache is not None
    await g.watcher.stop()  # as if ReadChanges failed from now on
    await w.relationships(
        deletes=[{"user": "agent:bot", "relation": "agent_viewer", "object": "document:d1"}]
    )
    await asyncio.sleep(STALENESS_S + 0.05)
    refused = g.fga.cache.stats.refused_stale
    assert await _docs(w) == []
    assert g.fga.cache.stats.refused_stale > refused


async def test_a_cached_allow_never_outlives_the_task_expiry(
    cached: tuple[Gateway, httpx.AsyncClient],
) -> None:
    g, http = cached
    expires = datetime.now(UTC) + timedelta(seconds=4)
    w = await _world(g, http, expires_at=expires.isoformat())
    assert await _docs(w) == ["d1"]
    hits = g.fga.stats.cache_hits
    assert await _docs(w) == ["d1"]
    assert g.fga.stats.cache_hits > hits
    # No write happens, so nothing invalidates the cache: only the time buckets of the
    # time-dependent checks keep the expired task from being served.
    await asyncio.sleep((expires - datetime.now(UTC)).total_seconds() + 0.1)
    assert await _docs(w) == []


# -- the rules, without OpenFGA ------------------------------------------------------------


def test_time_dependent_relations_follow_the_condition_through_the_model() -> None:
    timed = time_dependent_relations(load_model())
    assert {("task", "live"), ("document", "in_task_scope"), ("folder", "scoped_task")} <= timed
    assert ("document", "user_can_read") not in timed
    assert ("tenant", "member") not in timed


def test_models_with_other_conditions_refuse_the_cache() -> None:
    model = copy.deepcopy(load_model())
    check_conditions(model)
    (name, condition), *_ = model["conditions"].items()
    condition["expression"] = "current_time > expires_at"  # allows *later*: not monotone
    with pytest.raises(CacheRefused, match=name):
        check_conditions(model)


def test_answers_computed_across_an_invalidation_are_dropped() -> None:
    now = [0.0]
    cache = DecisionCache(load_model(), clock=lambda: now[0])
    at = cache.evaluation_time()
    key = cache.key("s", "m", "user:acme/alice", "user_can_read", "document:acme/d1", at)
    generation = cache.generation
    cache.invalidate()  # a change arrived while the answer was being fetched
    cache.put(key, True, generation)
    assert cache.get(key) is None
    cache.put(key, True, cache.generation)
    assert cache.get(key) is True


def test_time_dependent_keys_carry_the_bucket_and_others_do_not() -> None:
    wall = [datetime(2026, 1, 1, 12, 0, 0, 500_000, tzinfo=UTC)]
    cache = DecisionCache(load_model(), bucket_s=10.0, wall=lambda: wall[0])
    at = cache.evaluation_time()
    assert at == datetime(2026, 1, 1, 12, 0, 10, tzinfo=UTC)  # the end of the bucket
    timed = cache.key("s", "m", "task:acme/t", "in_task_scope", "document:acme/d1", at)
    plain = cache.key("s", "m", "user:acme/a", "user_can_read", "document:acme/d1", at)
    wall[0] += timedelta(seconds=10)
    later = cache.evaluation_time()
    assert cache.key("s", "m", "task:acme/t", "in_task_scope", "document:acme/d1", later) != timed
    assert cache.key("s", "m", "user:acme/a", "user_can_read", "document:acme/d1", later) == plain


def test_freshness_needs_a_recent_complete_poll() -> None:
    now = [100.0]
    cache = DecisionCache(load_model(), max_staleness_s=2.0, clock=lambda: now[0])
    assert not cache.usable()  # never synced
    cache.synced(100.0)
    now[0] = 101.9
    assert cache.usable()
    now[0] = 102.1
    assert not cache.usable()

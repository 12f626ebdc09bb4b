"""The decision cache, against the real OpenFGA: hits, freshness, bypass.

Exact mode (the default): a request reads the cache only after a ReadChanges probe
that started after it arrived found nothing new, so a revoke is denied on the very next
request. Bounded mode (``decision_cache=True``): an answer may be served only while the
last complete ReadChanges poll started less than ``max_staleness_s`` ago, so a revoke
is denied at the latest ``max_staleness_s`` after it committed; a request with
``Cache-Control: no-cache`` is answered by OpenFGA alone; time-dependent answers are
keyed by time bucket, so a cached allow never outlives a task expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.api import create_app
from gateway.cache import (
    CacheRefused,
    Change,
    ChangeProbe,
    ChangeWatcher,
    DecisionCache,
    ListKey,
    check_conditions,
    time_dependent_relations,
)
from gateway.fga import load_model
from gateway.fga_server import ManagedOpenFGA
from gateway.retrieval import Adaptive
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
    async with _over_http(settings, embeddings) as pair:
        yield pair


@contextlib.asynccontextmanager
async def _over_http(
    settings: Any, embeddings: Any
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    """A gateway started with ``settings`` and an HTTP client on its app."""
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
        "/v1/retrieve",
        json={"query": "revenue forecast", "k": 3},
        headers={**bearer(token), **headers},
    )
    assert response.status_code == 200, response.text
    return [c["document_id"] for c in response.json()["chunks"]]


async def test_the_exact_cache_is_the_default(gateway: Gateway) -> None:
    assert gateway.fga.cache is not None and gateway.fga.cache.exact
    assert gateway.watcher is None and gateway.fga.change_probe is not None


async def _exact_world(g: Gateway, http: httpx.AsyncClient, **task: Any) -> World:
    w = await World(g, http, "acme").setup(members=["alice"], agents=["bot"])
    await w.ingest(
        [
            doc("d1", TEXT, viewers=["user:alice"], agents=["agent:bot"]),
            doc(
                "d2",
                "Revenue forecast appendix for the enterprise segment.",
                viewers=["user:alice"],
                agents=["agent:bot"],
            ),
        ]
    )
    w.task_id = await w.task("alice", "bot", ["source:docs"], **task)  # type: ignore[attr-defined]
    return w


async def test_exact_cache_answers_a_repeated_retrieval_with_fewer_checks(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await _exact_world(gateway, http)
    first = await _docs(w)
    assert sorted(first) == ["d1", "d2"]
    before = gateway.fga.stats.snapshot()
    assert await _docs(w) == first
    spent = gateway.fga.stats.since(before)
    assert spent.cache_hits > 0
    # Only the time-dependent allows (the task is live, each document in its scope)
    # go back to OpenFGA: 1 + 2, where the first request sent 6 + 4 x 2.
    assert spent.checks_sent == 3
    latest = [e async for e in gateway.audit.iter_all("acme") if e.record.kind == "retrieve"][-1]
    assert latest.record.consistency.endswith("+cache")


@pytest.mark.parametrize(
    "revoke",
    [
        {"user": "user:alice", "relation": "viewer", "object": "document:d1"},
        {"user": "agent:bot", "relation": "agent_viewer", "object": "document:d1"},
        {"user": "tenant:acme", "relation": "tenant", "object": "document:d1"},
    ],
    ids=["user", "agent", "stamp"],
)
async def test_exact_cache_denies_a_revoke_on_the_very_next_request(
    gateway: Gateway, http: httpx.AsyncClient, revoke: dict[str, str]
) -> None:
    w = await _exact_world(gateway, http)
    assert "d1" in await _docs(w)
    assert "d1" in await _docs(w)  # warm: answered from the cache
    if revoke["relation"] == "tenant":  # the stamp is not a public relation
        stamp = "document:acme/d1"
        from gateway.fga import Tuple

        await gateway.fga.write(deletes=[Tuple("tenant:acme", "tenant", stamp)])
    else:
        await w.relationships(deletes=[revoke])
    assert await _docs(w) == ["d2"]  # no sleep: the next request already denies


async def test_exact_cache_denies_a_revoked_task_on_the_very_next_request(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await _exact_world(gateway, http)
    assert await _docs(w)
    assert await _docs(w)
    response = await w.http.delete(f"/v1/tasks/{w.task_id}", headers=bearer(w.admin_token))
    assert response.status_code in (200, 204), response.text
    assert await _docs(w) == []


def _patient_lists(g: Gateway) -> None:
    """Keep adaptive on the pre-filter on a busy test machine: a ListObjects time budget
    it never runs out of, and post-filter costs it never prefers. These tests are about
    which answers the pre-filter reuses, not about choosing it."""
    adaptive = g.strategies["adaptive"]
    assert isinstance(adaptive, Adaptive)
    adaptive.pre.list_budget_s = 30.0
    adaptive.costs.post_ms = lambda *args: 1e9  # type: ignore[method-assign]


async def test_adaptive_reuses_list_objects_answers_until_a_change(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    _patient_lists(gateway)
    w = await World(gateway, http, "acme").setup(members=["alice"], agents=["bot"])
    await w.ingest(
        [
            doc(f"d{i}", f"{TEXT} Part {i}.", viewers=["user:alice"], agents=["agent:bot"])
            for i in range(1, 13)
        ]
    )
    task = await w.task("alice", "bot", ["document:d1", "document:d2"])
    token = w.agent_token("alice", "bot", task)

    async def prefilter() -> list[str]:
        ctx = gateway.verifier.verify_delegation(token)
        result = await gateway.retrieve(ctx, "revenue forecast", k=3, strategy="adaptive")
        assert "prefilter" in result.outcome.strategy  # a known task: its narrowest list
        return sorted(c.document_id for c in result.chunks)

    assert await prefilter() == ["d1", "d2"]  # a new task: a ListObjects probe
    hits = gateway.fga.stats.list_cache_hits
    assert await prefilter() == ["d1", "d2"]
    assert gateway.fga.stats.list_cache_hits > hits
    await w.relationships(
        deletes=[{"user": "agent:bot", "relation": "agent_viewer", "object": "document:d1"}]
    )
    calls = gateway.fga.stats.list_objects_calls
    assert await prefilter() == ["d2"]
    assert gateway.fga.stats.list_objects_calls > calls  # the change dropped the lists


async def test_a_listed_post_filter_denies_outside_its_kept_list_and_sees_changes_at_once(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    """A task too wide for the pre-filter: once the list of the conjunct that denies
    most of its documents is kept, candidates outside it are denied without a check.
    A grant and a revoke still count on the very next request (over HTTP)."""
    from gateway.retrieval import LISTED_NOTE

    adaptive = gateway.strategies["adaptive"]
    assert isinstance(adaptive, Adaptive)
    adaptive.pre.max_results = 2  # every superset of this task is over the limit
    w = await World(gateway, http, "acme").setup(members=["alice"], agents=["bot"])
    await w.ingest(
        [
            doc(
                f"d{i}",
                f"{TEXT} Part {i}.",
                viewers=["user:alice"] if i <= 6 else [],
                agents=["agent:bot"],
            )
            for i in range(1, 13)
        ]
    )
    w.task_id = await w.task("alice", "bot", ["source:docs"])  # type: ignore[attr-defined]

    async def retrieve() -> tuple[list[str], dict[str, Any]]:
        token = w.agent_token("alice", "bot", w.task_id)  # type: ignore[attr-defined]
        response = await http.post(
            "/v1/retrieve", json={"query": "revenue forecast", "k": 12}, headers=bearer(token)
        )
        assert response.status_code == 200, response.text
        records = [e.record async for e in gateway.audit.iter_all("acme")]
        last = [r for r in records if r.kind == "retrieve"][-1]
        return sorted(c["document_id"] for c in response.json()["chunks"]), last.to_dict()

    mine = [f"d{i}" for i in range(1, 7)]
    assert (await retrieve())[0] == sorted(mine)  # a new task: a probe, over the limit
    assert (await retrieve())[0] == sorted(mine)  # known: the list is fetched aside
    assert adaptive.pre._warming is not None
    await adaptive.pre._warming
    before = gateway.fga.stats.snapshot()
    found, record = await retrieve()
    assert found == sorted(mine)
    assert any(LISTED_NOTE in n for n in record["extra"]["notes"]), record["extra"]["notes"]
    spent = gateway.fga.stats.since(before)
    # Nothing is asked about the six documents outside alice's list.
    assert spent.checks_requested <= 6 + 4 * 6, spent
    verdicts = {c["document_id"]: c for c in record["candidates"]}
    assert {d for d, c in verdicts.items() if c["verdict"] == "allow"} == set(mine)
    for d in (f"d{i}" for i in range(7, 13)):
        assert verdicts[d]["failed_checks"] == ["user_can_read"], verdicts[d]
    # A reviewer's replay asks OpenFGA what the list answered: the same verdicts.
    replay = await http.post(
        f"/v1/audit/decisions/{record['request_id']}/replay", headers=bearer(w.admin_token)
    )
    assert replay.status_code == 200, replay.text
    replayed = {d["document_id"]: d for d in replay.json()["documents"]}
    assert replayed.keys() == verdicts.keys()
    for d, c in verdicts.items():
        assert replayed[d]["was"] == replayed[d]["now"] == c["verdict"], replayed[d]
        if c["verdict"] == "deny":
            assert "user_can_read" in replayed[d]["failed_checks"], replayed[d]

    await w.relationships(
        writes=[{"user": "user:alice", "relation": "viewer", "object": "document:d7"}]
    )
    assert (await retrieve())[0] == sorted([*mine, "d7"])  # the grant, at once
    await w.relationships(
        deletes=[{"user": "user:alice", "relation": "viewer", "object": "document:d1"}]
    )
    assert (await retrieve())[0] == sorted([*mine[1:], "d7"])  # the revoke, at once


async def test_repeated_retrieval_is_answered_from_the_cache(
    cached: tuple[Gateway, httpx.AsyncClient],
) -> None:
    g, http = cached
    w = await _world(g, http)
    # Both requests inside one 1 s bucket (time-dependent checks are keyed by it).
    await asyncio.sleep(1.0 - time.time() % 1.0 + 0.01)
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


def test_the_clock_is_left_out_only_where_the_checked_model_cannot_need_it() -> None:
    """A client reads the time-dependent relations from the model it checks against:
    a replay's scratch store may hold an archived model with other conditions."""
    from gateway.fga import FgaClient

    model = copy.deepcopy(load_model())
    document = next(t for t in model["type_definitions"] if t["type"] == "document")
    viewers = document["metadata"]["relations"]["viewer"]["directly_related_user_types"]
    viewers.append({"type": "user", "condition": "not_expired"})
    shipped = FgaClient("http://127.0.0.1:9", "01ARZ3NDEKTSV4RRFFQ69G5FAV")
    archived = FgaClient("http://127.0.0.1:9", "01ARZ3NDEKTSV4RRFFQ69G5FAV", model=model)
    assert ("document", "user_can_read") not in shipped._timed
    assert ("document", "user_can_read") in archived._timed


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


def test_kept_list_answers_are_bounded_by_their_total_ids() -> None:
    cache = DecisionCache(load_model(), exact=True, max_list_ids=10)

    def key(user: str) -> ListKey:
        return ListKey("store", "model", user, "user_can_read", "document")

    def ids(n: int) -> frozenset[str]:
        return frozenset(f"acme/d{i}" for i in range(n))

    cache.put_list(key("user:a"), ids(4), cache.generation)
    cache.put_list(key("user:b"), ids(4), cache.generation)
    cache.put_list(key("user:a"), ids(5), cache.generation)  # replaced, counted once
    assert cache.peek_list(key("user:a")) == ids(5) and cache.peek_list(key("user:b"))
    cache.put_list(key("user:c"), ids(3), cache.generation)  # 12 > 10: the oldest goes
    assert cache.peek_list(key("user:b")) is None
    assert cache.peek_list(key("user:a")) == ids(5) and cache.peek_list(key("user:c"))
    cache.put_list(key("user:d"), ids(11), cache.generation)  # never fits: not kept
    assert cache.peek_list(key("user:d")) is None and cache.peek_list(key("user:a"))


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


# -- the exact mode's rules, without OpenFGA -------------------------------------------------


class _Feed:
    """A change log in memory; ``gate`` holds a read until released."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.reads = 0
        self.fail = False
        self.gate: asyncio.Event | None = None

    async def read_changes(
        self, start_time: datetime, continuation_token: str | None, page_size: int
    ) -> tuple[list[Change], str | None]:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("OpenFGA is down")
        return [c for c in self.changes if c.timestamp >= start_time], None


def _change(at: datetime) -> Change:
    return Change(at, "TUPLE_OPERATION_DELETE", "user:acme/a", "viewer", "document:acme/d1")


async def test_change_probe_drops_entries_on_a_change_and_keeps_them_otherwise() -> None:
    feed = _Feed()
    cache = DecisionCache(load_model(), exact=True)
    probe = ChangeProbe(feed, cache)
    key = cache.key(
        "s", "m", "user:acme/a", "user_can_read", "document:acme/d1", cache.evaluation_time()
    )
    cache.put(key, True, cache.generation)
    assert await probe.fresh()  # the first probe has no horizon: it drops everything
    assert cache.get(key) is None
    cache.put(key, True, cache.generation)
    assert await probe.fresh() and cache.get(key) is True  # nothing changed
    feed.changes.append(_change(datetime.now(UTC)))
    assert await probe.fresh() and cache.get(key) is None  # a change: dropped
    cache.put(key, True, cache.generation)
    assert await probe.fresh() and cache.get(key) is True  # the same change, seen before


async def test_change_probe_knows_how_long_the_store_has_been_quiet() -> None:
    feed = _Feed()
    now = [100.0]
    probe = ChangeProbe(feed, DecisionCache(load_model(), exact=True), clock=lambda: now[0])
    assert probe.quiet_for() == 0.0  # nothing known yet: not quiet
    assert await probe.fresh()
    now[0] = 130.0
    assert probe.quiet_for() == 30.0  # counted from the first probe, which knows no past
    assert await probe.fresh()  # nothing new: still quiet
    now[0] = 140.0
    assert probe.quiet_for() == 40.0
    feed.changes.append(_change(datetime.now(UTC)))
    assert await probe.fresh()
    assert probe.quiet_for() == 0.0  # a change: the quiet time starts again at this probe
    now[0] = 145.0
    assert await probe.fresh() and probe.quiet_for() == 5.0  # the same change, seen before
    feed.changes.append(_change(datetime.now(UTC)))
    feed.fail = True
    assert not await probe.fresh()  # a failed probe vouches for nothing; nothing is reset
    feed.fail = False
    now[0] = 150.0
    assert await probe.fresh() and probe.quiet_for() == 0.0  # the change, once read


async def test_change_probe_that_fails_vouches_for_nothing() -> None:
    feed = _Feed()
    cache = DecisionCache(load_model(), exact=True)
    probe = ChangeProbe(feed, cache)
    assert await probe.fresh()
    feed.fail = True
    assert not await probe.fresh()
    assert probe.stats.failures == 1


async def test_a_request_never_joins_a_probe_that_started_before_it_arrived() -> None:
    feed = _Feed()
    cache = DecisionCache(load_model(), exact=True)
    ticks = itertools.count()
    probe = ChangeProbe(feed, cache, clock=lambda: float(next(ticks)))
    assert await probe.fresh()
    feed.gate = asyncio.Event()
    early = asyncio.ensure_future(probe.fresh())
    for _ in range(3):
        await asyncio.sleep(0)
    assert feed.reads == 2  # the early probe is reading
    late = [asyncio.ensure_future(probe.fresh()) for _ in range(3)]
    for _ in range(3):
        await asyncio.sleep(0)
    feed.gate.set()
    assert await early and all(await asyncio.gather(*late))
    # The late requests shared one probe of their own, started after they arrived.
    assert feed.reads == 3


def test_exact_mode_keeps_time_dependent_denials_only() -> None:
    cache = DecisionCache(load_model(), exact=True)
    at = cache.evaluation_time()
    scope = cache.key("s", "m", "task:acme/t", "in_task_scope", "document:acme/d1", at)
    assert scope.at is None
    cache.put(scope, True, cache.generation)
    assert cache.get(scope) is None  # an allow may expire the next instant
    cache.put(scope, False, cache.generation)
    assert cache.get(scope) is False  # a denial stays one while the tuples stay
    read = cache.key("s", "m", "user:acme/a", "user_can_read", "document:acme/d1", at)
    cache.put(read, True, cache.generation)
    assert cache.get(read) is True


def test_exact_mode_refuses_time_dependent_denials_under_an_exclusion() -> None:
    model = copy.deepcopy(load_model())
    document = next(t for t in model["type_definitions"] if t["type"] == "document")
    document["relations"]["in_task_scope"] = {
        "difference": {
            "base": {"computedUserset": {"relation": "scoped_task"}},
            "subtract": {"computedUserset": {"relation": "scoped_task"}},
        }
    }
    cache = DecisionCache(model, exact=True)
    scope = cache.key(
        "s", "m", "task:acme/t", "in_task_scope", "document:acme/d1", cache.evaluation_time()
    )
    cache.put(scope, False, cache.generation)
    assert cache.get(scope) is None


async def test_a_finished_probe_whose_callback_has_not_run_is_not_awaited_forever() -> None:
    feed = _Feed()
    probe = ChangeProbe(feed, DecisionCache(load_model(), exact=True), clock=lambda: 1.0)
    done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    done.set_result(True)
    probe._inflight = (0.0, done)  # started before this request arrived, already over
    assert await asyncio.wait_for(probe.fresh(), timeout=5)
    assert feed.reads == 1  # a probe of its own


class _ReadThatSwallowsCancellation(_Feed):
    """A read that completes just as its task is cancelled returns its answer and drops
    the cancellation (what asyncio.wait_for, around every OpenFGA call, does on Python
    3.11); every later read waits forever."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()
        self.answer: asyncio.Future[tuple[list[Change], str | None]] | None = None

    async def read_changes(
        self, start_time: datetime, continuation_token: str | None, page_size: int
    ) -> tuple[list[Change], str | None]:
        self.reads += 1
        answer = self.answer = asyncio.get_running_loop().create_future()
        self.reading.set()
        try:
            return await answer
        except asyncio.CancelledError:
            if answer.done() and not answer.cancelled():
                return answer.result()
            raise


async def test_the_change_watcher_stops_even_when_a_read_swallows_its_cancellation() -> None:
    feed = _ReadThatSwallowsCancellation()
    watcher = ChangeWatcher(feed, DecisionCache(load_model()), interval_s=0.01)
    watcher.start()
    await feed.reading.wait()
    assert feed.answer is not None
    # stop() cancels the task in the same turn of the loop as the read completes: the
    # read returns its answer, the cancellation is gone, and the loop must end anyway.
    # A loop that goes on reads again and waits there until the bound cancels stop().
    stopping = asyncio.ensure_future(watcher.stop())
    feed.answer.set_result(([], None))
    await asyncio.wait_for(stopping, timeout=30)
    assert feed.reads == 1 and watcher.stats.polls == 1


async def test_a_search_started_before_the_probe_is_used_only_for_the_vouched_superset(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    """A known task's pre-filter starts its exact search on the cached ListObjects
    answer while the change probe runs; after a change that answer is not used."""
    from gateway.retrieval import SPECULATION_DROPPED, SPECULATION_USED

    _patient_lists(gateway)
    w = await World(gateway, http, "acme").setup(members=["alice"], agents=["bot"])
    await w.ingest(
        [
            doc(
                f"d{i}",
                f"{TEXT} Part {i}.",
                viewers=["user:alice"] if i < 3 else [],
                agents=["agent:bot"],
            )
            for i in range(1, 7)
        ]
    )
    task = await w.task("alice", "bot", ["source:docs"])
    token = w.agent_token("alice", "bot", task)

    narrowest: list[str | None] = []

    async def retrieve() -> tuple[list[str], list[str]]:
        ctx = gateway.verifier.verify_delegation(token)
        result = await gateway.retrieve(ctx, "revenue forecast", k=3, strategy="adaptive")
        assert "prefilter" in result.outcome.strategy
        narrowest.append(result.outcome.narrowest)
        return sorted(c.document_id for c in result.chunks), result.outcome.notes

    assert (await retrieve())[0] == ["d1", "d2"]  # a new task: every list is asked
    found, notes = await retrieve()
    assert found == ["d1", "d2"] and SPECULATION_USED in notes
    await w.relationships(
        writes=[{"user": "user:alice", "relation": "viewer", "object": "document:d3"}]
    )
    found, notes = await retrieve()
    assert found == ["d1", "d2", "d3"]  # the grant counts on the very next request
    if narrowest[0] == "user_can_read":  # the list the grant changed: the head start goes
        assert SPECULATION_DROPPED in notes and SPECULATION_USED not in notes
    else:
        # A busy machine cut the user's first ListObjects short (an answer near its
        # deadline counts as truncated), so the agent's or the task's list is the one
        # reused, and the grant did not change it: the head start rightly stands.
        assert SPECULATION_USED in notes


# -- OpenFGA's own check cache, trusted only after a quiet time ----------------------------

SERVER_TTL_S = 2.0
SERVER_TIMEOUT_S = 2.0


@contextlib.asynccontextmanager
async def _behind_cached_openfga(
    tmp_path: Path, embeddings: Any, ttl_s: float
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    """A gateway in front of a real OpenFGA whose check query cache is on."""
    server = ManagedOpenFGA(
        tmp_path / "fga", check_cache_ttl_s=ttl_s, request_timeout_s=SERVER_TIMEOUT_S
    )
    server.start()
    try:
        # make_settings declares the server's TTL and request timeout to the gateway.
        async with _over_http(make_settings(server, tmp_path / "data"), embeddings) as pair:
            yield pair
    finally:
        server.stop()


@pytest.fixture
async def server_cached(
    tmp_path: Path, embeddings: Any
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    async with _behind_cached_openfga(tmp_path, embeddings, SERVER_TTL_S) as pair:
        yield pair


async def _latest_consistency(g: Gateway) -> str:
    records = [e.record async for e in g.audit.iter_all("acme") if e.record.kind == "retrieve"]
    return records[-1].consistency


async def test_openfga_cache_is_trusted_only_when_no_change_can_be_in_it(
    server_cached: tuple[Gateway, httpx.AsyncClient],
) -> None:
    g, http = server_cached
    assert g.fga.server_cache_quiet_s is not None
    quiet = g.fga.server_cache_quiet_s
    w = await _exact_world(g, http)
    assert sorted(await _docs(w)) == ["d1", "d2"]
    assert "+openfga-cache" not in await _latest_consistency(g)  # writes just now
    await asyncio.sleep(quiet + 0.3)
    assert sorted(await _docs(w)) == ["d1", "d2"]
    assert "+openfga-cache" in await _latest_consistency(g)
    # OpenFGA now holds alice's allow on d1 for its TTL; a revoke must not meet it.
    await w.relationships(
        deletes=[{"user": "user:alice", "relation": "viewer", "object": "document:d1"}]
    )
    assert await _docs(w) == ["d2"]
    assert "+openfga-cache" not in await _latest_consistency(g)
    await asyncio.sleep(quiet + 0.3)
    assert await _docs(w) == ["d2"]  # trusted again, and it has no stale allow
    assert "+openfga-cache" in await _latest_consistency(g)


async def test_without_the_quiet_time_openfga_cache_would_serve_a_revoked_grant(
    tmp_path: Path, embeddings: Any
) -> None:
    """The hazard the quiet time guards against, shown on the real server (TTL 60 s):
    the same check, sent as MINIMIZE_LATENCY right after a revoke, is still allowed.
    It also shows that a check sent without the clock is reused across requests."""
    from gateway.decision import CheckItem, CheckName

    async with _behind_cached_openfga(tmp_path, embeddings, 60.0) as (g, http):
        w = await _exact_world(g, http)
        item = CheckItem(
            CheckName.USER_CAN_READ, "user:acme/alice", "user_can_read", "document:acme/d1", "d1"
        )
        assert (await g.fga.batch_check([item], server_cache=True))[item].allowed is True
        await w.relationships(
            deletes=[{"user": "user:alice", "relation": "viewer", "object": "document:d1"}]
        )
        stale = await g.fga.batch_check([item], server_cache=True)
        fresh = await g.fga.batch_check([item])
        assert (stale[item].allowed, fresh[item].allowed) == (True, False)
        # The gateway itself would not have asked OpenFGA's cache now.
        assert g.fga.change_probe is not None and await g.fga.change_probe.fresh()
        assert not g.fga.server_cache_ready()

"""Retrieval strategies against the real OpenFGA and both stores, and an oracle.

Hypothesis draws small worlds (one tenant, users, agents, groups, nested folders,
documents of one to three chunks, grants, owners, one task with a scope, sometimes
expired, revoked or presented by the wrong user or agent). Each world is written into
its own OpenFGA store and into an :class:`InMemoryStore` and Chroma, and every
strategy must return exactly what :func:`oracle` computes from the world description
by plain set logic and exact cosine ranking: the top-k permitted chunks, ordered by
distance and then chunk id.

Chunk vectors are drawn from a small palette whose distances to each query vector are
at least 1e-3 apart, so equal distances are exact ties (identical vectors) and the
float32 ranking of Chroma cannot swap neighbours that the float64 oracle separates.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from connectors.base import ChunkRecord
from connectors.chroma import ChromaStore
from connectors.memory import InMemoryStore
from gateway import fga_server, retrieval
from gateway.decision import CheckName, plan_checks
from gateway.errors import AuthorizationUnavailable, SourceUnavailable
from gateway.fga import FgaClient, FgaStats, Tuple
from gateway.fga_server import ManagedOpenFGA
from gateway.identity import DelegationContext
from gateway.retrieval import (
    Adaptive,
    Phase,
    PostFilter,
    PreFilter,
    RequestChecks,
    RequestOptions,
    RetrievalOutcome,
    SelectivityStats,
    SourceHandle,
)

SOURCE = "src"
USERS = ("u0", "u1", "u2")
AGENTS = ("a0", "a1")
GROUPS = ("g0", "g1")
DIM = 8


def _palette(seed: int = 7, size: int = 6, queries: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Chunk and query vectors whose distances per query are >= 1e-3 apart."""
    rng = np.random.default_rng(seed)
    while True:
        chunks = rng.normal(size=(size, DIM))
        qs = rng.normal(size=(queries, DIM))
        ok = all(np.min(np.diff(np.sort([_cosine(q, c) for c in chunks]))) > 1e-3 for q in qs)
        if ok:
            return chunks, qs


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


PALETTE, QUERIES = _palette()


# -- worlds -------------------------------------------------------------------------


@dataclass
class Node:
    """The source, a folder or a document: parent and grants."""

    parent: str | None  # "source", "f<i>" or None for the source itself
    viewers: frozenset[str] = frozenset()  # "user:u0", "group:g0#member", "tenant#member"
    agents: frozenset[str] = frozenset()  # "agent:a0", "group:g0#member", "tenant#member"


@dataclass
class World:
    members: frozenset[str]  # users and agents active in the tenant
    groups: dict[str, frozenset[str]]
    nodes: dict[str, Node]  # "source", "f0".., "d0"..
    chunks: dict[str, list[int]]  # document -> palette index of each chunk
    owners: dict[str, str]
    task_user: str
    task_agent: str
    scope: frozenset[str]  # node names
    task_state: str  # "live", "expiring" (in an hour), "expired", "revoked"
    user: str  # who presents the task
    agent: str
    k: int
    query: int
    tenant: str = field(default_factory=lambda: f"w{uuid.uuid4().hex[:10]}")


# Tenant-wide grants are drawn more often, so that many worlds permit something.
SUBJECTS_U = st.sampled_from(
    [*(f"user:{u}" for u in USERS), *(f"group:{g}#member" for g in GROUPS)] + ["tenant#member"] * 3
)
SUBJECTS_A = st.sampled_from(
    [*(f"agent:{a}" for a in AGENTS), *(f"group:{g}#member" for g in GROUPS)]
    + ["tenant#member"] * 3
)


@st.composite
def worlds(draw: st.DrawFn) -> World:
    task_user, task_agent = draw(st.sampled_from(USERS)), draw(st.sampled_from(AGENTS))
    members = set(draw(st.lists(st.sampled_from(USERS + AGENTS), unique=True, max_size=5)))
    if draw(st.integers(0, 5)) > 0:  # mostly, the task's user and agent are active
        members |= {task_user, task_agent}
    groups = {
        g: frozenset(draw(st.lists(st.sampled_from(USERS + AGENTS), unique=True, max_size=3)))
        for g in GROUPS
    }

    def grants() -> tuple[frozenset[str], frozenset[str]]:
        viewers = draw(st.lists(SUBJECTS_U, unique=True, max_size=2))
        agents = draw(st.lists(SUBJECTS_A, unique=True, max_size=2))
        return frozenset(viewers), frozenset(agents)

    nodes: dict[str, Node] = {"source": Node(None, *grants())}
    for i in range(draw(st.integers(0, 3))):
        parent = draw(st.sampled_from(["source", *(f"f{j}" for j in range(i))]))
        nodes[f"f{i}"] = Node(parent, *grants())
    folders = [n for n in nodes if n != "source"]
    chunks: dict[str, list[int]] = {}
    owners: dict[str, str] = {}
    for d in range(draw(st.integers(1, 10))):
        name = f"d{d}"
        nodes[name] = Node(draw(st.sampled_from(["source", *folders])), *grants())
        chunks[name] = draw(st.lists(st.integers(0, len(PALETTE) - 1), min_size=1, max_size=3))
        if draw(st.integers(0, 3)) == 0:
            owners[name] = draw(st.sampled_from(USERS))
    scope = set(draw(st.lists(st.sampled_from(sorted(nodes)), min_size=1, max_size=3)))
    if draw(st.booleans()):
        scope.add("source")
    state = draw(st.sampled_from(["live", "live", "live", "expiring", "expired", "revoked"]))
    honest = draw(st.integers(0, 5)) > 0
    return World(
        frozenset(members),
        groups,
        nodes,
        chunks,
        owners,
        task_user,
        task_agent,
        frozenset(scope),
        state,
        task_user if honest else draw(st.sampled_from(USERS)),
        task_agent if honest else draw(st.sampled_from(AGENTS)),
        draw(st.integers(1, 6)),
        draw(st.integers(0, len(QUERIES) - 1)),
    )


# -- the oracle: plain set logic and exact ranking ---------------------------------------


def ancestors(w: World, node: str) -> Iterator[str]:
    current: str | None = node
    while current is not None:
        yield current
        current = w.nodes[current].parent


def holds(w: World, subjects: frozenset[str], principal: str, kind: str) -> bool:
    for s in subjects:
        if s == f"{kind}:{principal}":
            return True
        if s == "tenant#member" and principal in w.members:
            return True
        if s.startswith("group:") and principal in w.groups[s[6:].split("#")[0]]:
            return True
    return False


def permitted_documents(w: World) -> set[str]:
    request_ok = (
        w.user == w.task_user
        and w.agent == w.task_agent
        and w.task_state in ("live", "expiring")
        and w.user in w.members
        and w.agent in w.members
    )
    if not request_ok:
        return set()
    allowed = set()
    for d in w.chunks:
        chain = list(ancestors(w, d))
        user_reads = w.owners.get(d) == w.user or any(
            holds(w, w.nodes[n].viewers, w.user, "user") for n in chain
        )
        agent_reads = any(holds(w, w.nodes[n].agents, w.agent, "agent") for n in chain)
        in_scope = any(n in w.scope for n in chain)
        if user_reads and agent_reads and in_scope:
            allowed.add(d)
    return allowed


def oracle(w: World) -> list[str]:
    """Chunk ids of the top-k permitted chunks: distance, then chunk id."""
    query = QUERIES[w.query]
    ranked = sorted(
        (_cosine(query, PALETTE[p]), f"{d}#{i}")
        for d in permitted_documents(w)
        for i, p in enumerate(w.chunks[d])
    )
    return [chunk_id for _, chunk_id in ranked[: w.k]]


# -- loading a world ------------------------------------------------------------------


def tuples(w: World) -> list[Tuple]:
    t = w.tenant

    def obj(name: str) -> str:
        if name == "source":
            return f"source:{t}/{SOURCE}"
        return f"{'folder' if name.startswith('f') else 'document'}:{t}/{name}"

    def subject(s: str) -> str:
        if s == "tenant#member":
            return f"tenant:{t}#member"
        kind, _, rest = s.partition(":")
        return f"{kind}:{t}/{rest}"

    tenant = f"tenant:{t}"
    out = [
        Tuple(f"{'user' if m in USERS else 'agent'}:{t}/{m}", "member", tenant) for m in w.members
    ]
    for g, members in w.groups.items():
        out += [
            Tuple(f"{'user' if m in USERS else 'agent'}:{t}/{m}", "member", f"group:{t}/{g}")
            for m in members
        ]
    for name, node in w.nodes.items():
        out.append(Tuple(tenant, "tenant", obj(name)))
        if node.parent is not None:
            out.append(Tuple(obj(node.parent), "parent", obj(name)))
        out += [Tuple(subject(s), "viewer", obj(name)) for s in node.viewers]
        out += [Tuple(subject(s), "agent_viewer", obj(name)) for s in node.agents]
    out += [Tuple(f"user:{t}/{u}", "owner", obj(d)) for d, u in w.owners.items()]
    task = f"task:{t}/task"
    now = datetime.now(UTC)
    expires = {
        "live": None,
        "expiring": now + timedelta(hours=1),
        "expired": now - timedelta(hours=1),
        "revoked": None,
    }[w.task_state]
    out += [
        Tuple(tenant, "tenant", task),
        Tuple(f"user:{t}/{w.task_user}", "delegator", task),
        Tuple(f"agent:{t}/{w.task_agent}", "executor", task),
    ]
    if w.task_state != "revoked":
        out.append(Tuple(tenant, "live", task, expires))
    out += [Tuple(task, "scoped_task", obj(n), expires) for n in w.scope]
    return out


def records(w: World) -> list[ChunkRecord]:
    return [
        ChunkRecord(f"{d}#{i}", d, w.tenant, SOURCE, f"{d} chunk {i}", PALETTE[p].tolist())
        for d, palette in w.chunks.items()
        for i, p in enumerate(palette)
    ]


def context(w: World) -> DelegationContext:
    return DelegationContext(w.tenant, w.user, w.agent, "task", "jti", 0)


@pytest.fixture(scope="module")
def chroma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaStore]:
    store = ChromaStore(tmp_path_factory.mktemp("chroma"))
    yield store
    store.close()


async def new_fga(url: str, **options: Any) -> FgaClient:
    """A client bound to a fresh store (one per world) with the shipped model."""
    client = FgaClient(url, **options)
    await client.ensure_store_and_model(f"strat-{uuid.uuid4().hex[:12]}")
    return client


@contextlib.asynccontextmanager
async def loaded(
    w: World, url: str, chroma: ChromaStore, **options: Any
) -> AsyncIterator[tuple[FgaClient, dict[str, SourceHandle]]]:
    """The world in a fresh OpenFGA store, an InMemoryStore and Chroma."""
    fga = await new_fga(url, **options)
    memory = InMemoryStore()
    try:
        await fga.write(tuples(w))
        chunks = records(w)
        await memory.upsert(w.tenant, SOURCE, chunks)
        await chroma.upsert(w.tenant, SOURCE, chunks)
        documents = len(w.chunks)
        yield (
            fga,
            {
                "memory": SourceHandle(w.tenant, SOURCE, memory, documents, exact=True),
                "chroma": SourceHandle(w.tenant, SOURCE, chroma, documents, exact=False),
            },
        )
    finally:
        await chroma.drop(w.tenant, SOURCE)
        await fga.close()


@dataclass
class Screened:
    """A strategy that asks one conjunct first, as :class:`Adaptive` does for a task
    whose documents mostly fail it."""

    inner: PostFilter | PreFilter
    screen: CheckName

    async def retrieve(
        self,
        ctx: DelegationContext,
        vector: Any,
        k: int,
        sources: list[SourceHandle],
        options: RequestOptions | None = None,
    ) -> RetrievalOutcome:
        return await self.inner.retrieve(ctx, vector, k, sources, options, screen=self.screen)


@dataclass
class Listed:
    """A post-filter that denies the candidates outside the kept ListObjects answer of
    one conjunct without a check, as :class:`Adaptive` does for a task too wide for the
    pre-filter. Its client has the exact cache; the answer is fetched (and kept) first,
    after a probe has set the change log's horizon, so the request's probe vouches."""

    inner: PostFilter
    conjunct: CheckName

    async def retrieve(
        self,
        ctx: DelegationContext,
        vector: Any,
        k: int,
        sources: list[SourceHandle],
        options: RequestOptions | None = None,
    ) -> RetrievalOutcome:
        fga = self.inner.fga
        assert fga.change_probe is not None
        await fga.change_probe.fresh()  # the horizon: the request's own probe vouches
        relation = retrieval.LIST_RELATIONS[self.conjunct]
        user = retrieval._list_queries(ctx, (relation,))[relation]
        answer = await fga.stream_list_objects(user, relation, "document", limit=10_000)
        assert not answer.truncated
        outcome = await self.inner.retrieve(
            ctx, vector, k, sources, options, listed=self.conjunct, precision=0.5
        )
        assert outcome.listed == self.conjunct.value, outcome.notes  # the list was used
        return outcome


def strategies(fga: FgaClient, cached: FgaClient | None = None) -> dict[str, Any]:
    post = PostFilter(fga)
    tight = PostFilter(fga, overfetch=1)  # small windows: refills happen
    pre = PreFilter(fga, tight)
    starved = PreFilter(fga, tight, max_results=1)  # ListObjects truncated: falls back
    return {
        "postfilter": post,
        "postfilter-tight": tight,
        "prefilter": pre,
        "prefilter-starved": starved,
        "adaptive": Adaptive(post, pre),
        "postfilter-tight-user-first": Screened(tight, CheckName.USER_CAN_READ),
        "prefilter-scope-first": Screened(pre, CheckName.DOCUMENT_IN_TASK_SCOPE),
    } | (
        {}
        if cached is None
        else {
            "postfilter-user-listed": Listed(PostFilter(cached), CheckName.USER_CAN_READ),
            "postfilter-tight-scope-listed": Listed(
                PostFilter(cached, overfetch=1), CheckName.DOCUMENT_IN_TASK_SCOPE
            ),
        }
    )


def returned(outcome: RetrievalOutcome) -> list[str]:
    return [c.chunk_id for c in outcome.chunks]


COMMON: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "derandomize": True,
    "database": None,
}


@settings(max_examples=30, **COMMON)
@given(w=worlds())
async def test_every_strategy_equals_the_oracle(
    openfga: ManagedOpenFGA, chroma: ChromaStore, w: World
) -> None:
    expected = oracle(w)
    permitted = permitted_documents(w)
    found = "none" if not expected else "fewer than k" if len(expected) < w.k else "k"
    event(f"permitted chunks: {found}")
    # Every round of the worlds' few documents is screened when a strategy asks for it.
    with mock.patch.object(retrieval, "SCREEN_MIN_DOCUMENTS", 1):
        await _every_strategy(w, openfga, chroma, expected, permitted)


async def _every_strategy(
    w: World,
    openfga: ManagedOpenFGA,
    chroma: ChromaStore,
    expected: list[str],
    permitted: set[str],
) -> None:
    async with (
        loaded(w, openfga.url, chroma) as (fga, handles),
        # The same store through a client with the exact cache, for the listed ones.
        _same_store(fga, exact_cache=True) as cached,
    ):
        for (name, strategy), (kind, handle) in itertools.product(
            strategies(fga, cached).items(), handles.items()
        ):
            rounds = 2 if name == "adaptive" else 1  # the second run uses what it learned
            for attempt in range(rounds):
                outcome = await strategy.retrieve(context(w), QUERIES[w.query], w.k, [handle])
                got = returned(outcome)
                assert got == expected, (name, kind, attempt, outcome.strategy, outcome.notes)
                assert {c.document_id for c in outcome.chunks} <= permitted
                for c in outcome.chunks:
                    assert outcome.verdicts[str(c.document_id)].allowed


@contextlib.asynccontextmanager
async def _same_store(fga: FgaClient, **options: Any) -> AsyncIterator[FgaClient]:
    client = FgaClient(fga.api_url, fga.store_id, fga.model_id, **options)
    try:
        yield client
    finally:
        await client.close()


# -- examples that pin the interesting paths ---------------------------------------------


def wide_world(documents: int = 30, chunks: int = 2, allowed: int = 6) -> World:
    """Many documents, ``allowed`` of them readable by u0; everything in scope."""
    nodes = {"source": Node(None, frozenset(), frozenset({"agent:a0"}))}
    owners = {}
    for d in range(documents):
        nodes[f"d{d}"] = Node("source")
        if d < allowed:
            owners[f"d{d}"] = "u0"
    return World(
        members=frozenset({"u0", "a0"}),
        groups={g: frozenset() for g in GROUPS},
        nodes=nodes,
        chunks={f"d{d}": [(d + i) % len(PALETTE) for i in range(chunks)] for d in range(documents)},
        owners=owners,
        task_user="u0",
        task_agent="a0",
        scope=frozenset({"source"}),
        task_state="live",
        user="u0",
        agent="a0",
        k=5,
        query=0,
    )


async def test_checks_are_deduplicated_within_a_request(
    openfga: ManagedOpenFGA, chroma: ChromaStore
) -> None:
    w = wide_world(documents=30, chunks=3, allowed=3)
    async with loaded(w, openfga.url, chroma) as (fga, handles):
        post = PostFilter(fga, overfetch=1)  # forces refills over the same documents
        before = fga.stats.snapshot()
        outcome = await post.retrieve(context(w), QUERIES[0], w.k, [handles["memory"]])
        spent = fga.stats.since(before)
        assert returned(outcome) == oracle(w)
        assert outcome.batch_rounds >= 2
        decided = [d for d in outcome.verdicts if not d.startswith("?")]
        # Six request-level checks once, four per distinct document once, however many
        # chunks each document has and however many refills re-listed it.
        assert spent.checks_sent == 6 + 4 * len(decided)
        assert spent.checks_requested == spent.checks_sent
        assert spent.batch_check_calls == sum(
            math.ceil(p.size / 50) for p in outcome.phases if p.name == "check"
        )
        # And inside one call, identical questions asked twice are sent once.
        items = plan_checks(context(w), ["d0", "d1"])
        before = fga.stats.snapshot()
        await fga.batch_check(items + items + list(reversed(items)))
        spent = fga.stats.since(before)
        assert (spent.checks_requested, spent.checks_sent, spent.batch_check_calls) == (42, 14, 1)


async def test_truncated_list_objects_fall_back(
    openfga: ManagedOpenFGA, chroma: ChromaStore
) -> None:
    w = wide_world(documents=12, allowed=12)
    async with loaded(w, openfga.url, chroma) as (fga, handles):
        post = PostFilter(fga)
        pre = PreFilter(fga, post, max_results=5)  # every list holds 12 documents
        outcome = await pre.retrieve(context(w), QUERIES[0], w.k, [handles["memory"]])
        assert outcome.strategy == "prefilter->postfilter"
        assert outcome.list_objects_calls == 3
        assert any("fell back" in n for n in outcome.notes)
        assert returned(outcome) == oracle(w)
        roomy = PreFilter(fga, post, max_results=12)
        outcome = await roomy.retrieve(context(w), QUERIES[0], w.k, [handles["memory"]])
        assert outcome.strategy == "prefilter" and outcome.superset == 12
        assert returned(outcome) == oracle(w)


async def test_server_max_results_truncates_list_objects_but_not_the_stream(
    tmp_path: Path, chroma: ChromaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fga_server, "LISTOBJECTS_MAX_RESULTS", 3)
    server = ManagedOpenFGA(tmp_path / "fga")
    server.start()
    try:
        w = wide_world(documents=10, allowed=10)
        async with loaded(w, server.url, chroma, listobjects_max_results=3) as (fga, handles):
            user = f"user:{w.tenant}/u0"
            listed = await fga.list_objects(user, "user_can_read", "document")
            assert len(listed.ids) == 3 and listed.truncated  # the server's cap, flagged
            streamed = await fga.stream_list_objects(user, "user_can_read", "document", limit=50)
            assert len(streamed.ids) == 10 and not streamed.truncated
            outcome = await PreFilter(fga, PostFilter(fga)).retrieve(
                context(w), QUERIES[0], w.k, [handles["memory"]]
            )
            assert outcome.strategy == "prefilter"
            assert returned(outcome) == oracle(w)
    finally:
        server.stop()


async def test_server_deadline_truncates_and_prefilter_falls_back(
    tmp_path: Path, chroma: ChromaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fga_server, "LISTOBJECTS_DEADLINE_S", "0.001")
    server = ManagedOpenFGA(tmp_path / "fga")
    server.start()
    try:
        w = wide_world(documents=10, allowed=4)
        options = {"listobjects_deadline_s": 0.001}
        async with loaded(w, server.url, chroma, **options) as (fga, handles):
            streamed = await fga.stream_list_objects(
                f"user:{w.tenant}/u0", "user_can_read", "document", limit=50
            )
            assert streamed.truncated  # an answer at the deadline is never complete
            outcome = await PreFilter(fga, PostFilter(fga)).retrieve(
                context(w), QUERIES[0], w.k, [handles["chroma"]]
            )
            assert outcome.strategy == "prefilter->postfilter"
            assert returned(outcome) == oracle(w)
    finally:
        server.stop()


async def test_request_deadline_reaches_openfga_and_the_store(
    openfga: ManagedOpenFGA, chroma: ChromaStore
) -> None:
    w = wide_world(documents=6, allowed=3)
    async with loaded(w, openfga.url, chroma) as (fga, handles):
        past = RequestOptions(deadline=time.monotonic() - 1)
        before = fga.stats.snapshot()
        for strategy in strategies(fga).values():
            # Whichever phase meets the spent deadline first fails the request closed.
            with pytest.raises((AuthorizationUnavailable, SourceUnavailable)):
                await strategy.retrieve(context(w), QUERIES[0], w.k, [handles["chroma"]], past)
        with pytest.raises(AuthorizationUnavailable, match="deadline"):
            await fga.batch_check(plan_checks(context(w), ["d0"]), deadline=time.monotonic())
        spent = fga.stats.since(before)
        assert spent.checks_sent == 0 and spent.batch_check_calls == 0


async def test_adaptive_learns_and_records_its_choice(
    openfga: ManagedOpenFGA, chroma: ChromaStore
) -> None:
    w = wide_world(documents=40, allowed=2)
    async with loaded(w, openfga.url, chroma) as (fga, handles):
        adaptive = Adaptive(PostFilter(fga), PreFilter(fga, PostFilter(fga)))
        first = await adaptive.retrieve(context(w), QUERIES[0], w.k, [handles["chroma"]])
        assert first.strategy == "adaptive:prefilter"  # unknown key: ListObjects probe
        seen = adaptive.stats.get(context(w))
        assert seen is not None and seen == pytest.approx(2 / 40)
        again = await adaptive.retrieve(context(w), QUERIES[1], w.k, [handles["chroma"]])
        assert again.strategy.startswith("adaptive:") and again.notes[0].startswith("adaptive")
        assert returned(again) == oracle(World(**{**w.__dict__, "query": 1}))
        # A known task's pre-filter asks only the ListObjects that was narrowest.
        assert again.strategy == "adaptive:prefilter" and again.list_objects_calls == 1
        assert again.narrowest == first.narrowest == "user_can_read"


async def test_a_screen_asks_the_other_conjuncts_only_of_documents_that_pass_it(
    openfga: ManagedOpenFGA, chroma: ChromaStore
) -> None:
    w = wide_world(documents=30, allowed=6)
    documents = [f"d{d}" for d in range(30)]
    async with loaded(w, openfga.url, chroma) as (fga, _):
        outcomes = {}
        for screen in (None, CheckName.USER_CAN_READ):
            checks = RequestChecks(fga, context(w))
            outcome = RetrievalOutcome("test")
            before = fga.stats.snapshot()
            await checks.verify(documents, outcome, screen)
            spent = fga.stats.since(before)
            outcomes[screen] = outcome
            if screen is None:  # one round: four conjuncts of every document
                assert (checks.rounds, spent.checks_sent) == (1, 6 + 4 * 30)
            else:  # the screen of all 30, then the other three of the 6 that passed
                assert (checks.rounds, spent.checks_sent) == (2, 6 + 30 + 3 * 6)
                assert "user_can_read asked first: 6 of 30 documents passed it" in outcome.notes
        screened = outcomes[CheckName.USER_CAN_READ].verdicts
        assert {d for d, v in screened.items() if v.allowed} == {f"d{d}" for d in range(6)}
        assert {d: v.verdict for d, v in screened.items()} == {
            d: v.verdict for d, v in outcomes[None].verdicts.items()
        }
        assert screened["d9"].failed_checks == ("user_can_read",)

        # Fewer documents than SCREEN_MIN_DOCUMENTS: one round as before.
        checks = RequestChecks(fga, context(w))
        await checks.verify(documents[:7], RetrievalOutcome("test"), CheckName.USER_CAN_READ)
        assert checks.rounds == 1


async def test_a_screen_stops_at_a_failed_request_level_check(
    openfga: ManagedOpenFGA, chroma: ChromaStore
) -> None:
    w = dataclasses.replace(wide_world(documents=30, allowed=6), task_state="revoked")
    async with loaded(w, openfga.url, chroma) as (fga, _):
        checks = RequestChecks(fga, context(w))
        outcome = RetrievalOutcome("test")
        before = fga.stats.snapshot()
        await checks.verify([f"d{d}" for d in range(30)], outcome, CheckName.USER_CAN_READ)
        assert (checks.rounds, fga.stats.since(before).checks_sent) == (1, 6 + 30)
        assert checks.request_denied
        assert not any(v.allowed for v in outcome.verdicts.values())
        assert all("task_active" in v.failed_checks for v in outcome.verdicts.values())


async def test_adaptive_screens_a_task_by_the_conjunct_that_denies_most(
    openfga: ManagedOpenFGA, chroma: ChromaStore
) -> None:
    narrow, everything = wide_world(documents=40, allowed=4), wide_world(40, allowed=40)
    for w, screen in ((narrow, CheckName.USER_CAN_READ), (everything, None)):
        async with loaded(w, openfga.url, chroma) as (fga, handles):
            # ListObjects over the limit: the post-filter checks what the search finds.
            post = PostFilter(fga)
            adaptive = Adaptive(post, PreFilter(fga, post, max_results=1))
            assert adaptive.plan(context(w), w.k, [handles["chroma"]]).screen is None
            await adaptive.retrieve(context(w), QUERIES[0], w.k, [handles["chroma"]])
            plan = adaptive.plan(context(w), w.k, [handles["chroma"]])
            assert (plan.strategy, plan.screen) == ("postfilter", screen)
            again = await adaptive.retrieve(context(w), QUERIES[1], w.k, [handles["chroma"]])
            assert returned(again) == oracle(World(**{**w.__dict__, "query": 1}))
            assert any("asked first" in n for n in again.notes) == (screen is not None)


def test_a_task_whose_list_failed_is_probed_again_soon_then_every_32() -> None:
    """One slow answer (a server just started) costs a few probes, not 32 post-filters."""
    fga = FgaClient("http://127.0.0.1:9")  # plans only: never called
    adaptive = Adaptive(PostFilter(fga), PreFilter(fga, PostFilter(fga)), reprobe_every=32)
    ctx = _ctx("acme", "alice", "bot", "t1")
    handle = SourceHandle("acme", SOURCE, InMemoryStore(), documents=1000)
    probes = []
    for request in range(1, 100):
        plan = adaptive.plan(ctx, 10, [handle])
        if plan.reason == "ListObjects failed before: probe":
            probes.append(request)
        adaptive.stats.update(ctx, 0.1, list_failed=True)
    assert probes == [2, 3, 5, 9, 17, 33, 65, 97]
    adaptive.stats.update(ctx, 0.1, superset=100, list_failed=False)
    assert adaptive.plan(ctx, 10, [handle]).reason != "ListObjects failed before: probe"


def test_a_task_on_the_post_filter_with_its_list_kept_tries_the_pre_filter_again() -> None:
    """One cold exact ranking (every vector read from the store) priced the pre-filter
    out: with its list kept, it is tried again on the probe schedule."""
    fga = FgaClient("http://127.0.0.1:9")  # plans only: never called
    adaptive = Adaptive(PostFilter(fga), PreFilter(fga, PostFilter(fga), max_results=5000))
    for _ in range(5):
        adaptive.costs.observe([Phase("exact", 2000, 5000.0)])
    ctx = _ctx("acme", "alice", "bot", "t1")
    handle = SourceHandle("acme", SOURCE, InMemoryStore(), documents=20_000)
    adaptive.stats.update(ctx, 0.1, superset=2000, list_failed=False, narrowest="user_can_read")

    def tried(kept: frozenset[str] | None) -> list[int]:
        adaptive.pre.kept_list = lambda *args, **kwargs: kept  # type: ignore[method-assign]
        again = []
        for request in range(2, 100):
            plan = adaptive.plan(ctx, 10, [handle])
            assert plan.strategy == "prefilter" or "tried again" not in plan.reason
            if plan.strategy == "prefilter":
                assert plan.reason.endswith("the pre-filter tried again")
                assert plan.relations == ("user_can_read",)
                again.append(request)
            adaptive.stats.update(ctx, 0.1)
        return again

    assert tried(frozenset({"acme/d1"})) == [2, 3, 5, 9, 17, 33, 65, 97]
    assert tried(None) == []  # its list would cost a ListObjects call: no retry


async def test_a_list_that_failed_off_the_request_path_rests_before_it_is_tried_again() -> None:
    """A background list whose OpenFGA is unreachable fails quietly; its key rests
    (doubling) instead of sending a list per request."""
    fga = FgaClient("http://127.0.0.1:9", "store", "model", exact_cache=True)
    pre = PreFilter(fga, PostFilter(fga))
    ctx = _ctx("acme", "alice", "bot", "t1")
    try:
        rests = []
        for _ in range(3):
            assert pre.warm(ctx, "user_can_read")
            assert not pre.warm(ctx, "user_can_read")  # one list at a time
            assert pre._warming is not None
            await pre._warming  # never raises: a failure is only remembered
            assert not pre.warm(ctx, "user_can_read")  # resting
            (key,) = pre._warm_failures
            failures, until = pre._warm_failures[key]
            rests.append(round(until - time.monotonic()))
            pre._warm_failures[key] = (failures, 0.0)  # as if the rest were over
        assert rests == [30, 60, 120]
        assert pre.warm(ctx, "agent_can_read")  # another key is not held back
    finally:
        await pre.close()  # cancels the list still in flight
        await fga.close()


def test_a_task_too_wide_for_the_pre_filter_is_listed_by_the_conjunct_that_denies_most() -> None:
    fga = FgaClient("http://127.0.0.1:9", "store", "model", exact_cache=True)  # plans only
    adaptive = Adaptive(PostFilter(fga), PreFilter(fga, PostFilter(fga), max_results=100))
    handle = SourceHandle("acme", SOURCE, InMemoryStore(), documents=20_000)
    ctx = _ctx("acme", "alice", "bot", "t1")
    started: list[str] = []
    adaptive.pre.warm = lambda ctx, relation: started.append(relation) or True  # type: ignore[method-assign]
    denials = {"document_in_tenant": 0.0, "user_can_read": 0.2, "agent_can_read": 0.5}
    adaptive.stats.update(ctx, 0.4, denials={**denials, "document_in_task_scope": 0.0})
    kept: dict[str, frozenset[str]] = {}
    adaptive.pre.kept_list = lambda ctx, relation, limit=None: kept.get(relation)  # type: ignore[method-assign]
    plan = adaptive.plan(ctx, 10, [handle])
    assert (plan.strategy, plan.listed) == ("postfilter", None)
    assert started == ["agent_can_read"] and "listing agent_can_read" in plan.reason
    kept["agent_can_read"] = frozenset({"acme/d1"})
    plan = adaptive.plan(ctx, 10, [handle])
    assert (plan.strategy, plan.listed) == ("postfilter", CheckName.AGENT_CAN_READ)
    assert started == ["agent_can_read"]
    # No conjunct denies a quarter of the documents: nothing worth listing.
    other = _ctx("acme", "bob", "bot", "t2")
    adaptive.stats.update(other, 0.9, denials={**denials, "agent_can_read": 0.1})
    assert adaptive.plan(other, 10, [handle]).listed is None
    assert started == ["agent_can_read"]


# -- SelectivityStats ---------------------------------------------------------------


def _ctx(tenant: str, user: str, agent: str, task: str) -> DelegationContext:
    return DelegationContext(tenant, user, agent, task, "jti", 0)


def test_selectivity_stats_are_bounded_per_level() -> None:
    stats = SelectivityStats(capacity=3)
    for i in range(50):
        stats.update(_ctx(f"t{i % 5}", f"u{i}", "a", f"k{i}"), 0.5)
    assert all(size <= 3 for size in stats.sizes())
    assert len(stats) == 3
    # The most recent keys survive; the oldest are gone.
    assert stats.get(_ctx("t4", "u49", "a", "k49")) == 0.5
    assert stats.estimate(_ctx("t0", "u0", "a", "k0")) is None or (
        stats.estimate(_ctx("t0", "u0", "a", "k0"))[0] > 0  # type: ignore[index]
    )


def test_selectivity_stats_fall_back_to_coarser_keys_and_clamp() -> None:
    stats = SelectivityStats(capacity=10, alpha=0.5)
    stats.update(_ctx("acme", "alice", "bot", "t1"), 0.2)
    level, seen = stats.estimate(_ctx("acme", "alice", "bot", "t2")) or (None, None)
    assert level == 1 and seen is not None and seen.selectivity == pytest.approx(0.2)
    level, _ = stats.estimate(_ctx("acme", "bob", "bot", "t3")) or (None, None)
    assert level == 3  # only the tenant is known
    assert stats.estimate(_ctx("globex", "alice", "bot", "t1")) is None
    stats.update(_ctx("acme", "alice", "bot", "t1"), 7.0)  # clamped to 1
    assert stats.get(_ctx("acme", "alice", "bot", "t1")) == pytest.approx(0.6)
    stats.update(_ctx("acme", "alice", "bot", "t1"), -3.0)  # clamped to 0
    assert stats.get(_ctx("acme", "alice", "bot", "t1")) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        SelectivityStats(capacity=0)


def test_fga_stats_difference() -> None:
    before = FgaStats(1, 2, 3, 4, 5)
    after = FgaStats(2, 4, 6, 8, 10)
    assert after.since(before) == FgaStats(1, 2, 3, 4, 5)


async def test_many_requests_share_the_client_concurrently(
    openfga: ManagedOpenFGA, chroma: ChromaStore
) -> None:
    """One client (one pool, one semaphore) serves concurrent requests correctly."""
    w = wide_world(documents=20, allowed=8)
    async with loaded(w, openfga.url, chroma, max_parallel_batches=2) as (fga, handles):
        adaptive = Adaptive(PostFilter(fga), PreFilter(fga, PostFilter(fga)))
        results = await asyncio.gather(
            *(
                adaptive.retrieve(context(w), QUERIES[i % 4], w.k, [handles["chroma"]])
                for i in range(16)
            )
        )
        for i, outcome in enumerate(results):
            assert returned(outcome) == oracle(World(**{**w.__dict__, "query": i % 4}))
        assert fga._client is not None  # the same SDK client throughout

"""Retrieval strategies: turn a query vector into the exact top-k permitted chunks.

The contract every strategy keeps: the answer is the k nearest chunks whose documents
pass every conjunct of the decision, nearest first, or fewer only when the sources
hold fewer permitted chunks. **Order and ties:** chunks are ranked by the store's
distance, and equal distances by chunk id (ascending), across all sources of the
request. Every candidate looked at gets a verdict, so the audit record can show what
was blocked and why.

Exactness. A window from the store is trusted only up to its *boundary*: when a
source returned a full window, chunks at the distance of the first untrusted hit may
have been cut off, so only hits strictly nearer than it are trusted (a source that
returned less than asked is exhausted and fully trusted). Across sources the trusted
prefix ends at the nearest of the per-source boundaries; inside it the order is exact.

- Exact stores (the in-memory store, :meth:`VectorStore.search_documents` of every
  store) trust their whole window.
- Approximate stores (Chroma's HNSW) trust only the first ``ann_trust`` (half) of
  each window: HNSW misses neighbours mostly near the end of what it returns (top-100
  inside a window of 200 at ef_search=100: recall 0.99; top-20 of 40: 1.000, measured
  in ``bench/``). Where distances flatten out beyond the nearest cluster, misses
  reach into the trusted half of large windows (``bench/hnsw_recall.py``: with the
  connector's graph, 0 to 1 of 30 queries miss one of the top 125 of a 250 window,
  4 to 7 of 30 one of the top 250 of 500). This bounds the error, it does not remove
  it. The pre-filter path
  ranks exactly, and :class:`Adaptive` takes it whenever the permitted superset is
  small enough to be cheap, so only permissive requests (where the top-k permitted
  lie in the first ranks of the unfiltered query) depend on HNSW recall.

Strategies:

- :class:`PostFilter` queries the stores without a filter, checks the documents of
  the trusted prefix in one BatchCheck round, and refills with a window sized from the
  permitted rate it just saw, until k are permitted, the stores are exhausted or a
  request-level check fails. It never stops early at a candidate cap.
- :class:`PreFilter` streams ListObjects for the task's scope, the agent and the user
  in parallel; every complete answer is a superset of the permitted documents, so
  their intersection is one too. The stores rank that superset exactly, and BatchCheck
  re-verifies the winners. An answer over the limit, over the time budget, near the
  server deadline or broken is never trusted: the strategy falls back to PostFilter.
- :class:`Adaptive` picks one per request from measured selectivity (per tenant, user,
  agent and task, with coarser levels as priors; bounded LRU) and measured cost of
  each phase (:class:`CostModel`). Once it knows a task, its pre-filter asks only the
  ListObjects that was narrowest: any one complete answer is a superset. When most of
  a known task's documents fail one conjunct, that conjunct is its *screen*: it is
  asked first, and the other three only for the documents that passed it. A task
  too wide for the pre-filter is *listed* when it can be: the complete ListObjects
  answer of the conjunct that denies most of its documents is fetched off the request
  path and kept by the exact cache, and its post-filter denies the candidates outside
  it without a check (see ``LISTED_MIN_DENIAL``).

All OpenFGA calls of one request go through one :class:`RequestChecks`: request-level
checks are asked once, each document once, and the request deadline and consistency
travel with every call to OpenFGA and to the stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from connectors.base import Candidate, VectorStore
from connectors.vectors import ContentVersions, VersionedSearch
from gateway import tracing
from gateway.decision import (
    DOCUMENT_CHECKS,
    REQUEST_CHECKS,
    CheckItem,
    CheckName,
    CheckOutcome,
    DocumentVerdict,
    decide,
    document_checks,
    plan_checks,
)
from gateway.errors import AuthorizationUnavailable, SourceUnavailable
from gateway.fga import FgaClient, ListObjectsResult
from gateway.identity import DelegationContext
from gateway.ids import is_valid_scoped_id, scoped, unscoped

T = TypeVar("T")
log = logging.getLogger("scopegate.retrieval")

MISSING_METADATA = "chunk_metadata"
#: Per-item errors of one failed round kept in the error's detail (audit only).
DETAILED_ERRORS = 5
REQUEST_LEVEL = frozenset(c.value for c in REQUEST_CHECKS)
#: Fraction of an approximate store's window that is trusted (see module docstring).
ANN_TRUST = 0.5
#: Weight, in examined chunks, of the expected permitted rate when a refill is sized,
#: and the margin of a refill over what that rate says the missing chunks need: a
#: refill is already a second round trip, it should rarely need a third.
PRIOR_CHUNKS = 10
REFILL_MARGIN = 2.0
#: Notes of a pre-filter that started its first exact search on the cached ListObjects
#: answer while the change probe ran (see :meth:`PreFilter.retrieve`).
SPECULATION_USED = "exact search started while the change probe ran; the probe vouched"
SPECULATION_DROPPED = "exact search started while the change probe ran; dropped"
#: A task whose documents mostly fail one conjunct (at most this share passes it, in
#: recent requests) has that conjunct asked first, and the other three only for the
#: documents that passed: a second round trip that saves most of the checks. Only for
#: a round of at least ``SCREEN_MIN_DOCUMENTS`` documents.
SCREEN_MAX_PASS = 0.6
SCREEN_MIN_DOCUMENTS = 8
DOCUMENT_LEVEL = tuple(c.value for c in DOCUMENT_CHECKS)
#: A known task whose superset is over the pre-filter's limit still has a *listed*
#: conjunct when one denies at least ``LISTED_MIN_DENIAL`` of its documents: that
#: conjunct's ListObjects answer (up to ``PreFilter.listed_max`` documents) is fetched
#: off the request path and kept by the exact cache; while it is, the post-filter
#: denies the candidates outside it without asking OpenFGA and asks every conjunct of
#: the ones inside it, in rank order, only until k chunks are permitted.
LISTED_MIN_DENIAL = 0.25
LISTED_NOTE = "listed: candidates outside its kept ListObjects answer denied without a check"
#: A listed round asks for this many times the chunks its precision says are missing.
LISTED_MARGIN = 1.25
#: The ListObjects relation whose answer is exactly the documents a conjunct allows.
LIST_RELATIONS = {
    CheckName.USER_CAN_READ: "user_can_read",
    CheckName.AGENT_CAN_READ: "agent_can_read",
    CheckName.DOCUMENT_IN_TASK_SCOPE: "in_task_scope",
}
#: A background list that failed is not tried again for this key before this many
#: seconds, doubled after every further failure (up to ``WARM_BACKOFF_MAX_S``).
WARM_BACKOFF_S = 30.0
WARM_BACKOFF_MAX_S = 600.0
#: Note of a request whose checks OpenFGA could answer from its check cache.
OPENFGA_CACHE_NOTE = "OpenFGA check cache allowed: no change for longer than its TTL"


@dataclass(frozen=True, slots=True)
class SourceHandle:
    """A registered source of the caller's tenant, the store that holds it, how many
    documents it holds (for selectivity estimates), and whether its unfiltered
    search is exact (the in-memory store) or approximate (HNSW)."""

    tenant: str
    id: str
    store: VectorStore
    documents: int = 0
    exact: bool = False
    #: The catalog's content versions of this source's documents: lets a store that
    #: can (:class:`~connectors.vectors.VersionedSearch`) reuse vectors it read before.
    versions: ContentVersions | None = None


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """Per-request limits: ``deadline`` in ``time.monotonic()`` seconds, and
    ``consistency`` ("HIGHER_CONSISTENCY" demands answers straight from OpenFGA,
    never from the decision cache)."""

    deadline: float | None = None
    consistency: str | None = None


@dataclass(frozen=True, slots=True)
class Phase:
    """One timed step of a retrieval: ``size`` is what its cost grows with."""

    name: str
    size: int
    ms: float


@dataclass(slots=True)
class RetrievalOutcome:
    """What a strategy found: permitted chunks in order, and every verdict made."""

    strategy: str
    chunks: list[Candidate] = field(default_factory=list)
    verdicts: dict[str, DocumentVerdict] = field(default_factory=dict)
    candidates: dict[str, list[Candidate]] = field(default_factory=dict)
    batch_rounds: int = 0
    list_objects_calls: int = 0
    exhausted: bool = False
    selectivity: float | None = None
    notes: list[str] = field(default_factory=list)
    #: False when the ranking relied on an approximate store's window.
    exact_ranking: bool = True
    #: Documents in the complete ListObjects superset (pre-filter), if one was used,
    #: and the relation whose complete answer was the smallest.
    superset: int | None = None
    narrowest: str | None = None
    #: The conjunct whose kept ListObjects answer screened a post-filter's candidates
    #: (see ``LISTED_MIN_DENIAL``), and the documents it denied without a check.
    listed: str | None = None
    unlisted: set[str] = field(default_factory=set)
    #: Chunks examined in trusted windows, and how many of them were permitted.
    examined: int = 0
    permitted: int = 0
    phases: list[Phase] = field(default_factory=list)

    def observe(self, found: Sequence[Candidate]) -> None:
        for c in found:
            key = c.document_id or f"?{c.chunk_id}"
            bucket = self.candidates.setdefault(key, [])
            if all(x.chunk_id != c.chunk_id for x in bucket):
                bucket.append(c)


class RetrievalStrategy(Protocol):
    """``outcome``, when given, is filled in place as the retrieval goes: if it fails
    half way, the caller still holds every verdict reached (for the audit record)."""

    name: str

    async def retrieve(
        self,
        ctx: DelegationContext,
        vector: Sequence[float],
        k: int,
        sources: Sequence[SourceHandle],
        options: RequestOptions | None = None,
        *,
        outcome: RetrievalOutcome | None = None,
    ) -> RetrievalOutcome: ...


def _started(outcome: RetrievalOutcome | None, name: str) -> RetrievalOutcome:
    if outcome is None:
        return RetrievalOutcome(name)
    outcome.strategy = name
    return outcome


def well_formed(ctx: DelegationContext, c: Candidate, source: str) -> bool:
    """A chunk without its stamps, stamped for another tenant/source, or naming a
    document id that is malformed or too long once namespaced, is never released and
    its document never reaches OpenFGA."""
    return (
        c.tenant == ctx.tenant
        and c.source == source
        and is_valid_scoped_id(ctx.tenant, "document", c.document_id)
    )


def rank_key(c: Candidate) -> tuple[float, str]:
    """The order of results: distance, then chunk id."""
    return (c.distance, c.chunk_id)


# -- timing and deadlines ---------------------------------------------------------------


async def _timed(
    outcome: RetrievalOutcome, name: str, size: int, call: Awaitable[T], deadline: float | None
) -> T:
    """Run ``call`` under the request deadline and record how long it took."""
    started = time.perf_counter()
    if deadline is None:
        result = await call
    else:
        left = deadline - time.monotonic()
        if left <= 0:
            if isinstance(call, asyncio.Future):
                call.cancel()
                # A cancelled gather() finishes with CancelledError as its exception:
                # read it, or asyncio logs "exception was never retrieved".
                call.add_done_callback(_consume)
            elif hasattr(call, "close"):
                call.close()
            raise TimeoutError("request deadline exceeded")
        async with asyncio.timeout(left):
            result = await call
    outcome.phases.append(Phase(name, size, (time.perf_counter() - started) * 1000))
    return result


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _timed_search(
    outcome: RetrievalOutcome, name: str, size: int, call: Awaitable[T], deadline: float | None
) -> T:
    """A vector-store phase under the request deadline: running out of time while the
    stores search is the stores' failure, and is reported as such."""
    try:
        return await _timed(outcome, name, size, call, deadline)
    except TimeoutError as exc:
        raise SourceUnavailable(f"vector store exceeded the request deadline ({name})") from exc


# -- checks ---------------------------------------------------------------------------


class RequestChecks:
    """Every OpenFGA check of one request: request-level checks asked once (with the
    first documents), each document once, whatever strategy or fallback asks.

    With the exact decision cache, the request's change probe starts here (it runs
    while the stores search) and the cache is read only once it has vouched
    (:meth:`cache_fresh`); a request that demands ``consistency`` never probes.
    """

    def __init__(
        self,
        fga: FgaClient,
        ctx: DelegationContext,
        options: RequestOptions | None = None,
        model_id: str | None = None,
    ) -> None:
        self.fga = fga
        self.ctx = ctx
        self.options = options or RequestOptions()
        self.model_id = model_id
        self.outcomes: dict[CheckItem, CheckOutcome] = {}
        self.verdicts: dict[str, DocumentVerdict] = {}
        self.rounds = 0
        self.request_denied = False
        self._request_planned = False
        self._fresh: asyncio.Future[bool] | None = None
        probe = fga.change_probe if self.options.consistency is None else None
        if probe is not None:
            self._fresh = asyncio.ensure_future(probe.fresh())

    async def cache_fresh(self) -> bool:
        """True once this request's change probe found nothing new (never raises)."""
        if self._fresh is None:
            return False
        return await asyncio.shield(self._fresh)

    async def verify(
        self,
        document_ids: Sequence[str],
        outcome: RetrievalOutcome,
        screen: CheckName | None = None,
    ) -> None:
        """Decide every document not decided yet, in one BatchCheck round (two with
        ``screen``).

        What the exact cache already knows is not asked again, and once one conjunct
        of a document is known false its other conjuncts are not asked at all (a
        request-level one known false: nothing more is asked). ``screen``: the
        conjunct most documents of this task fail; with at least
        ``SCREEN_MIN_DOCUMENTS`` documents it is asked first (with the request-level
        checks), and the others only for the documents that passed it. If a round
        fails, its documents are recorded in ``outcome`` with verdict ``error`` (and
        the conjuncts that went unanswered) before the error is raised; the per-item
        texts of OpenFGA go into the error's ``detail`` only.
        """
        fresh = [d for d in dict.fromkeys(document_ids) if d not in self.verdicts]
        if fresh:
            items = plan_checks(self.ctx, fresh, include_request=not self._request_planned)
            vouched = await self.cache_fresh()
            known = self.fga.cached(items) if vouched else {}
            send = _still_needed(items, {**self.outcomes, **known})
            if screen is not None and len(fresh) >= SCREEN_MIN_DOCUMENTS:
                first = [i for i in send if i.document_id is None or i.name == screen]
            else:
                first = send
            # OpenFGA's own check cache, only once the change log shows it holds nothing
            # older than the last change (docs/cache.md).
            server_cache = vouched and self.fga.server_cache_ready()
            answered: dict[CheckItem, CheckOutcome] = dict(known)
            try:
                if first:
                    answered |= await self._ask(first, len(fresh), outcome, server_cache)
                rest = _still_needed(send, {**self.outcomes, **answered}) if first != send else []
                if rest and all(o.allowed is not None for o in answered.values()):
                    passed = len({i.document_id for i in rest})
                    outcome.notes.append(
                        f"{screen} asked first: {passed} of {len(fresh)} documents passed it"
                    )
                    answered |= await self._ask(rest, passed, outcome, server_cache)
            except BaseException:
                outcome.verdicts.update(decide(self.ctx, fresh, {**self.outcomes, **answered}))
                raise
            errored = [item for item, o in answered.items() if o.allowed is None]
            if errored:
                outcome.verdicts.update(decide(self.ctx, fresh, {**self.outcomes, **answered}))
                raise AuthorizationUnavailable(
                    f"OpenFGA could not answer {len(errored)} check(s)",
                    detail="; ".join(
                        f"{item.name.value} {item.user} {item.relation} {item.object}: "
                        f"{answered[item].error}"
                        for item in errored[:DETAILED_ERRORS]
                    ),
                )
            self.outcomes.update(answered)
            self._request_planned = True
            self.verdicts.update(decide(self.ctx, fresh, self.outcomes))
            self.request_denied = any(
                REQUEST_LEVEL.intersection(self.verdicts[d].failed_checks) for d in fresh
            )
        outcome.verdicts.update({d: self.verdicts[d] for d in document_ids})
        outcome.batch_rounds = self.rounds

    async def _ask(
        self,
        items: list[CheckItem],
        documents: int,
        outcome: RetrievalOutcome,
        server_cache: bool = False,
    ) -> dict[CheckItem, CheckOutcome]:
        """One BatchCheck round trip (the exact cache was consulted already)."""
        attributes = {
            "scopegate.checks": len(items),
            "scopegate.documents": documents,
            "scopegate.check.round": self.rounds + 1,
        }
        with tracing.span("scopegate.check", attributes):
            answered = await _timed(
                outcome,
                "check",
                len(items),
                self.fga.batch_check(
                    items,
                    model_id=self.model_id,
                    consistency=self.options.consistency,
                    deadline=self.options.deadline,
                    server_cache=server_cache,
                ),
                None,
            )
        if server_cache and OPENFGA_CACHE_NOTE not in outcome.notes:
            outcome.notes.append(OPENFGA_CACHE_NOTE)
        self.rounds += 1
        return answered

    def allowed(self, document_id: str | None) -> bool:
        verdict = self.verdicts.get(document_id or "")
        return verdict is not None and verdict.allowed

    def decided(self, document_id: str | None) -> bool:
        return (document_id or "") in self.verdicts

    def deny_unlisted(self, document_ids: Sequence[str], conjunct: CheckName) -> None:
        """Documents outside the complete ListObjects answer of ``conjunct`` (kept by
        the exact cache, which this request's change probe vouched for) fail it: it is
        recorded as failed, and :meth:`verify` asks nothing more about them."""
        for document_id in document_ids:
            if document_id in self.verdicts:
                continue
            for item in document_checks(self.ctx, document_id):
                if item.name == conjunct:
                    self.outcomes.setdefault(item, CheckOutcome(False))


def _still_needed(
    items: Sequence[CheckItem], known: Mapping[CheckItem, CheckOutcome]
) -> list[CheckItem]:
    """The items whose answer can still change a verdict: not known yet, and no other
    conjunct of their document (or of the request) known false."""
    denied = {i.document_id for i, o in known.items() if o.allowed is False}
    if None in denied:  # a request-level conjunct is false: every document is denied
        return []
    return [i for i in items if i not in known and i.document_id not in denied]


def _deny_malformed(outcome: RetrievalOutcome, c: Candidate) -> None:
    key = c.document_id or f"?{c.chunk_id}"
    outcome.verdicts.setdefault(key, DocumentVerdict(key, "deny", (MISSING_METADATA,)))


# -- windows --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """The trusted prefix of one round of searches, in result order."""

    trusted: list[tuple[Candidate, str]]
    exhausted: bool


def trusted_prefix(
    found: Sequence[tuple[SourceHandle, Sequence[Candidate]]], n: int, trust: float
) -> Window:
    """Merge per-source windows of size ``n`` into the prefix whose order is exact.

    A source that returned fewer than ``n`` hits is exhausted and fully trusted.
    Otherwise it is trusted strictly before its boundary distance: the distance of
    the first hit past the trusted part (the last hit for exact stores, the hit at
    ``trust * n`` for approximate ones), so ties cut off by the window never count.
    """
    boundary = math.inf
    merged: list[tuple[Candidate, str]] = []
    for handle, hits in found:
        ordered = sorted(hits, key=rank_key)
        merged.extend((c, handle.id) for c in ordered)
        if len(ordered) >= n:
            cut = len(ordered) - 1 if handle.exact else max(0, math.ceil(trust * n) - 1)
            boundary = min(boundary, ordered[cut].distance)
    merged.sort(key=lambda pair: rank_key(pair[0]))
    trusted = [pair for pair in merged if pair[0].distance < boundary]
    return Window(trusted, boundary == math.inf)


async def _search_all(
    outcome: RetrievalOutcome,
    sources: Sequence[SourceHandle],
    vector: Sequence[float],
    n: int,
    deadline: float | None,
) -> list[tuple[SourceHandle, list[Candidate]]]:
    attributes = {"scopegate.window": n, "scopegate.sources": len(sources)}
    with tracing.span("scopegate.search", attributes):
        results = await _timed_search(
            outcome,
            "search",
            n,
            asyncio.gather(*(s.store.search(s.tenant, s.id, vector, n) for s in sources)),
            deadline,
        )
    return list(zip(sources, results, strict=True))


def _examine(outcome: RetrievalOutcome, ctx: DelegationContext, window: Window) -> list[str]:
    """Record the trusted prefix in the outcome (before any check, so a failure later
    still leaves it on the record), deny malformed chunks, and return the documents
    that OpenFGA must decide."""
    documents: list[str] = []
    for c, source in window.trusted:
        outcome.observe([c])
        if well_formed(ctx, c, source):
            documents.append(str(c.document_id))
        else:
            _deny_malformed(outcome, c)
    return documents


def _finish(
    outcome: RetrievalOutcome,
    ctx: DelegationContext,
    checks: RequestChecks,
    window: Window,
) -> list[Candidate]:
    """The permitted chunks of the trusted prefix, once its documents are decided."""
    permitted: list[Candidate] = []
    for c, source in window.trusted:
        if well_formed(ctx, c, source) and checks.allowed(c.document_id):
            permitted.append(c)
    outcome.examined = len(window.trusted)
    outcome.permitted = len(permitted)
    outcome.exhausted = window.exhausted
    return permitted


# -- post-filter ----------------------------------------------------------------------


class PostFilter:
    """Query without a filter, check the trusted prefix, refill until k are permitted.

    ``overfetch`` is the first window's size in multiples of k (before the ANN trust
    factor); :class:`Adaptive` passes one learned from recent denial rates.
    ``max_candidates`` caps only the *first* window; refills grow past it when they
    must, because stopping early would silently return fewer than k.
    """

    name = "postfilter"

    def __init__(
        self,
        fga: FgaClient,
        overfetch: float = 4,
        max_candidates: int = 2000,
        model_id: str | None = None,
        *,
        ann_trust: float = ANN_TRUST,
    ) -> None:
        self.fga = fga
        self.overfetch = overfetch
        self.max_candidates = max_candidates
        self.model_id = model_id
        self.ann_trust = ann_trust

    def first_window(self, k: int, overfetch: float, sources: Sequence[SourceHandle]) -> int:
        trust = 1.0 if all(s.exact for s in sources) else self.ann_trust
        wanted = math.ceil(k * max(1.0, overfetch) / trust)
        return max(k + 1, min(wanted, self.max_candidates))

    async def retrieve(
        self,
        ctx: DelegationContext,
        vector: Sequence[float],
        k: int,
        sources: Sequence[SourceHandle],
        options: RequestOptions | None = None,
        *,
        overfetch: float | None = None,
        checks: RequestChecks | None = None,
        outcome: RetrievalOutcome | None = None,
        screen: CheckName | None = None,
        listed: CheckName | None = None,
        precision: float = 1.0,
    ) -> RetrievalOutcome:
        """``screen``: the conjunct to ask first (see :meth:`RequestChecks.verify`).
        ``listed``: a conjunct whose complete ListObjects answer the exact cache may
        keep (see ``LISTED_MIN_DENIAL``); used only if this request's change probe
        vouches for it, ``precision`` being the share of its documents expected to
        pass every conjunct."""
        options = options or RequestOptions()
        checks = checks or RequestChecks(self.fga, ctx, options, self.model_id)
        outcome = _started(outcome, self.name)
        outcome.exact_ranking = all(s.exact for s in sources)
        n = self.first_window(k, overfetch or self.overfetch, sources)
        allowed: frozenset[str] | None = None
        while True:
            found = await _search_all(outcome, sources, vector, n, options.deadline)
            window = trusted_prefix(found, n, self.ann_trust)
            if listed is not None and allowed is None:
                # The probe has been running since the request began (with the search).
                allowed = await _kept_answer(self.fga, ctx, checks, listed)
                if allowed is None:
                    listed = None
                else:
                    outcome.listed = listed.value
                    outcome.notes.append(f"{listed} {LISTED_NOTE}")
            if listed is not None and allowed is not None:
                permitted = await _verify_listed(
                    outcome, ctx, checks, window, allowed, listed, k, precision
                )
            else:
                await checks.verify(_examine(outcome, ctx, window), outcome, screen)
                permitted = _finish(outcome, ctx, checks, window)
            if len(permitted) >= k or window.exhausted or checks.request_denied:
                outcome.chunks = [] if checks.request_denied else permitted[:k]
                return outcome
            expected = min(1.0, 1.25 / max(1.0, overfetch or self.overfetch))
            n = self._next_window(n, k, len(permitted), len(window.trusted), expected, sources)

    def _next_window(
        self,
        n: int,
        k: int,
        permitted: int,
        examined: int,
        expected: float,
        sources: Sequence[SourceHandle],
    ) -> int:
        """Grow the window to what the permitted rate seen so far says the missing
        chunks need (at least doubling it).

        The rate of a small window is noisy (a few documents' chunks): it is shrunk
        towards the ``expected`` rate, worth ``PRIOR_CHUNKS`` examined chunks, so one
        unlucky window does not send hundreds of documents to OpenFGA at once.
        """
        trust = 1.0 if all(s.exact for s in sources) else self.ann_trust
        rate = (permitted + expected * PRIOR_CHUNKS) / (examined + PRIOR_CHUNKS)
        wanted = examined + REFILL_MARGIN * (k - permitted) / rate
        return max(2 * n, math.ceil(wanted / trust))


async def _kept_answer(
    fga: FgaClient, ctx: DelegationContext, checks: RequestChecks, conjunct: CheckName
) -> frozenset[str] | None:
    """The bare document ids the exact cache's complete ListObjects answer for
    ``conjunct`` holds, once this request's change probe vouched for the cache."""
    relation = LIST_RELATIONS.get(conjunct)
    if relation is None or not await checks.cache_fresh():
        return None
    user = _list_queries(ctx, (relation,))[relation]
    kept = fga.kept_list(user, relation, "document")
    return None if kept is None else _bare(ctx, kept)


async def _verify_listed(
    outcome: RetrievalOutcome,
    ctx: DelegationContext,
    checks: RequestChecks,
    window: Window,
    allowed: frozenset[str],
    conjunct: CheckName,
    k: int,
    precision: float,
) -> list[Candidate]:
    """Decide the window in rank order until k chunks are permitted.

    Its documents outside ``allowed`` (the complete ListObjects answer of
    ``conjunct``) fail that conjunct without a check. Every conjunct of the ones
    inside is asked, in rounds that each cover the chunks ``precision`` says are
    still missing (with ``LISTED_MARGIN``), nearest first. Returns the permitted
    chunks of the *decided prefix*: ranks past the first undecided document are
    not part of the answer, and not counted as examined.
    """
    documents = _examine(outcome, ctx, window)
    outside = [d for d in dict.fromkeys(documents) if d not in allowed]
    checks.deny_unlisted(outside, conjunct)
    outcome.unlisted.update(outside)
    # The documents outside are decided already; they are recorded with the first round.
    asked: list[str] = [d for d in outside if not checks.decided(d)]
    while True:
        permitted: list[Candidate] = []
        decided = 0
        for c, source in window.trusted:
            checkable = well_formed(ctx, c, source) and c.document_id in allowed
            if checkable and not checks.decided(c.document_id):
                break
            decided += 1
            if checkable and checks.allowed(c.document_id):
                permitted.append(c)
                if len(permitted) >= k:
                    break
        if len(permitted) >= k or decided == len(window.trusted) or checks.request_denied:
            if not asked:
                outcome.examined, outcome.permitted = decided, len(permitted)
                outcome.exhausted = window.exhausted and decided == len(window.trusted)
                return permitted
        else:
            need = math.ceil((k - len(permitted)) * LISTED_MARGIN / max(precision, 0.05))
            batch: dict[str, None] = {}
            for c, source in window.trusted[decided:]:
                document = str(c.document_id)
                if well_formed(ctx, c, source) and document in allowed:
                    if not checks.decided(document):
                        batch[document] = None
                    need -= 1
                    if need <= 0:
                        break
            asked.extend(batch)
        await checks.verify(asked, outcome)
        asked = []


# -- pre-filter -----------------------------------------------------------------------


#: The conjuncts whose ListObjects answers bound the permitted documents: every
#: complete answer is a superset of them. (tuple of the subject type, the relation)
LIST_CONJUNCTS = (
    ("task", "in_task_scope"),
    ("agent", "agent_can_read"),
    ("user", "user_can_read"),
)


@dataclass(frozen=True, slots=True)
class Superset:
    """Documents that may be permitted (None: no complete ListObjects answer), and
    the relation whose complete answer was the smallest."""

    ids: frozenset[str] | None
    calls: int
    notes: tuple[str, ...] = ()
    narrowest: str | None = None


class PreFilter:
    """ListObjects narrows the candidates; exact search over them; BatchCheck re-verifies.

    ``max_results`` is the largest superset (documents) worth ranking exactly;
    ``list_budget_s`` the time ListObjects may take before it is abandoned (a probe
    of three parallel lists needs about 1 s for a 400-object answer on a busy 2-core
    machine; :class:`Adaptive` gives a known task a budget from measured costs).
    ``listed_max`` is the largest answer fetched off the request path for a listed
    post-filter (see ``LISTED_MIN_DENIAL`` and :meth:`warm`).
    """

    name = "prefilter"

    def __init__(
        self,
        fga: FgaClient,
        fallback: PostFilter,
        max_results: int = 1000,
        model_id: str | None = None,
        *,
        list_budget_s: float = 1.0,
        grace: float = 1.0,
        listed_max: int = 50_000,
    ) -> None:
        self.fga = fga
        self.fallback = fallback
        self.max_results = max_results
        self.model_id = model_id
        self.list_budget_s = list_budget_s
        self.grace = grace
        self.listed_max = listed_max
        self._warming: asyncio.Task[None] | None = None
        #: (OpenFGA user, relation) -> (failures, monotonic time before which it rests)
        self._warm_failures: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()

    def warm(self, ctx: DelegationContext, relation: str) -> bool:
        """Fetch the complete ListObjects answer of ``relation`` for this request's
        party off the request path, for the exact cache to keep (it keeps only an
        answer fetched while nothing changed). One such list runs at a time; a key
        whose list failed rests ``WARM_BACKOFF_S``, doubled per failure. True when a
        list was started."""
        if not self.fga.keeps_lists:
            return False
        if self._warming is not None and not self._warming.done():
            return False
        user = _list_queries(ctx, (relation,))[relation]
        failed = self._warm_failures.get((user, relation))
        if failed is not None and time.monotonic() < failed[1]:
            return False
        self._warming = asyncio.ensure_future(self._warm(user, relation))
        return True

    async def close(self) -> None:
        """Cancel the list being fetched off the request path, if any."""
        warming, self._warming = self._warming, None
        if warming is not None and not warming.done():
            warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warming

    async def _warm(self, user: str, relation: str) -> None:
        key = (user, relation)
        started = time.monotonic()
        try:
            answer = await self.fga.stream_list_objects(
                user, relation, "document", limit=self.listed_max
            )
        except Exception as exc:  # a background list that fails only costs its retry
            why = f"failed: {exc}"
        else:
            if not answer.truncated:
                self._warm_failures.pop(key, None)
                log.info(
                    "listed %s %s off the request path: %d documents in %.2f s",
                    relation,
                    user,
                    len(answer.ids),
                    time.monotonic() - started,
                )
                return
            why = (
                f"incomplete after {len(answer.ids)} documents in "
                f"{time.monotonic() - started:.2f} s (over {self.listed_max} documents "
                "or the server's ListObjects deadline)"
            )
        failures = self._warm_failures.pop(key, (0, 0.0))[0] + 1
        rest = min(WARM_BACKOFF_MAX_S, WARM_BACKOFF_S * 2 ** (failures - 1))
        log.warning(
            "listing %s %s off the request path %s; its post-filter checks every "
            "candidate, and the list is tried again in %.0f s",
            relation,
            user,
            why,
            rest,
        )
        self._warm_failures[key] = (failures, time.monotonic() + rest)
        while len(self._warm_failures) > 1024:
            self._warm_failures.popitem(last=False)

    async def permitted_superset(
        self,
        ctx: DelegationContext,
        options: RequestOptions | None = None,
        limit: int | None = None,
        outcome: RetrievalOutcome | None = None,
        relations: Sequence[str] | None = None,
        budget_s: float | None = None,
        *,
        fresh: bool = False,
    ) -> Superset:
        """Intersection of the complete ListObjects answers for task, agent and user.

        They run in parallel; once one is complete the others get ``grace`` times its
        duration to finish (their intersection is tighter), then are abandoned.
        ``relations`` asks only some of them (:class:`Adaptive` asks only the one it
        saw narrowest): any one complete answer is already a superset. ``fresh``: the
        exact cache may answer (see :meth:`RequestChecks.cache_fresh`).
        """
        options = options or RequestOptions()
        limit = self.max_results if limit is None else limit
        queries = _list_queries(ctx, relations)
        started = time.perf_counter()
        pending: dict[asyncio.Future[ListObjectsResult], str] = {
            asyncio.ensure_future(
                self.fga.stream_list_objects(
                    user,
                    relation,
                    "document",
                    limit=limit,
                    budget_s=budget_s or self.list_budget_s,
                    consistency=options.consistency,
                    deadline=options.deadline,
                    fresh=fresh,
                )
            ): relation
            for relation, user in queries.items()
        }
        complete, notes = await self._collect(pending)
        if outcome is not None:
            size = min(len(a.ids) for _, a in complete) if complete else limit
            outcome.phases.append(Phase("list", size, (time.perf_counter() - started) * 1000))
        if not complete:
            return Superset(None, len(queries), tuple(notes))
        ids = frozenset.intersection(*(a.ids for _, a in complete))
        narrowest = min(complete, key=lambda pair: len(pair[1].ids))[0]
        return Superset(_bare(ctx, ids), len(queries), tuple(notes), narrowest)

    def _speculate(
        self,
        ctx: DelegationContext,
        vector: Sequence[float],
        k: int,
        sources: Sequence[SourceHandle],
        relations: Sequence[str] | None,
        limit: int | None,
        precision: float,
    ) -> _Speculation | None:
        """Start the first exact search on the cached ListObjects answer of a known
        task's one relation, while the change probe runs. It is used only if the
        answer the probe then vouches for is the same set of documents; otherwise it
        is cancelled. (The cache is never *read* as an answer before the probe.)"""
        if relations is None or len(relations) != 1:
            return None
        peeked = self.kept_list(ctx, relations[0], limit)
        ids = _bare(ctx, peeked) if peeked is not None else None
        if not ids:
            return None
        n = _first_exact_window(k, precision)
        return _Speculation(ids, n, time.perf_counter(), _exact_search(sources, vector, n, ids))

    def kept_list(
        self, ctx: DelegationContext, relation: str, limit: int | None = None
    ) -> frozenset[str] | None:
        """The exact cache's complete ListObjects answer for ``relation``, if it fits
        ``limit``; read without a probe, so only to price a plan or to start work that
        is dropped unless a probe then vouches for the same answer."""
        user = _list_queries(ctx, (relation,)).get(relation)
        kept = self.fga.peek_list(user, relation, "document") if user is not None else None
        limit = self.max_results if limit is None else limit
        return kept if kept is not None and len(kept) <= limit else None

    async def _collect(
        self, tasks: dict[asyncio.Future[ListObjectsResult], str]
    ) -> tuple[list[tuple[str, ListObjectsResult]], list[str]]:
        pending = set(tasks)
        complete: list[tuple[str, ListObjectsResult]] = []
        notes: list[str] = []
        started = time.monotonic()
        until: float | None = None
        try:
            while pending:
                timeout = None if until is None else max(0.0, until - time.monotonic())
                done, pending = await asyncio.wait(
                    pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    try:
                        answer = task.result()
                    except AuthorizationUnavailable as exc:
                        notes.append(f"ListObjects failed: {exc.message}")
                        continue
                    if answer.truncated:
                        continue
                    complete.append((tasks[task], answer))
                    if until is None:
                        waited = time.monotonic() - started
                        until = time.monotonic() + max(0.005, self.grace * waited)
                if not done or (until is not None and time.monotonic() >= until):
                    break
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return complete, notes

    async def retrieve(
        self,
        ctx: DelegationContext,
        vector: Sequence[float],
        k: int,
        sources: Sequence[SourceHandle],
        options: RequestOptions | None = None,
        *,
        checks: RequestChecks | None = None,
        limit: int | None = None,
        precision: float = 1.0,
        overfetch: float | None = None,
        relations: Sequence[str] | None = None,
        budget_s: float | None = None,
        outcome: RetrievalOutcome | None = None,
        reuse_lists: bool = False,
        screen: CheckName | None = None,
    ) -> RetrievalOutcome:
        """``reuse_lists``: a ListObjects answer may come from the exact cache
        (:class:`Adaptive` asks for it; the plain pre-filter lists on every request).
        ``screen``: the conjunct to ask first (see :meth:`RequestChecks.verify`)."""
        options = options or RequestOptions()
        checks = checks or RequestChecks(self.fga, ctx, options, self.model_id)
        probe = _started(outcome, self.name)
        ahead = (
            self._speculate(ctx, vector, k, sources, relations, limit, precision)
            if reuse_lists and options.consistency is None
            else None
        )
        try:
            fresh = reuse_lists and await checks.cache_fresh()
            superset = await self.permitted_superset(
                ctx, options, limit, probe, relations, budget_s, fresh=fresh
            )
        except BaseException:
            _drop(ahead)
            raise
        if ahead is not None:
            if fresh and superset.ids == ahead.ids:
                probe.notes.append(SPECULATION_USED)
            else:
                probe.notes.append(SPECULATION_DROPPED)
                _drop(ahead)
                ahead = None
        if superset.ids is None:
            probe.list_objects_calls = superset.calls
            probe.notes.extend(superset.notes)
            probe.notes.append(
                "ListObjects answers over the limit, over budget or incomplete; "
                "fell back to post-filter"
            )
            result = await self.fallback.retrieve(
                ctx,
                vector,
                k,
                sources,
                options,
                overfetch=overfetch,
                checks=checks,
                outcome=probe,
                screen=screen,
            )
            result.strategy = "prefilter->postfilter"
            return result
        outcome = probe
        outcome.list_objects_calls = superset.calls
        outcome.notes.extend(superset.notes)
        outcome.superset = len(superset.ids)
        outcome.narrowest = superset.narrowest
        corpus = sum(s.documents for s in sources)
        outcome.selectivity = len(superset.ids) / corpus if corpus else None
        await self._rank_exactly(
            outcome, ctx, vector, k, sources, superset.ids, checks, precision, ahead, screen
        )
        return outcome

    async def _rank_exactly(
        self,
        outcome: RetrievalOutcome,
        ctx: DelegationContext,
        vector: Sequence[float],
        k: int,
        sources: Sequence[SourceHandle],
        allowed: frozenset[str],
        checks: RequestChecks,
        precision: float,
        ahead: _Speculation | None = None,
        screen: CheckName | None = None,
    ) -> None:
        """``ahead``: the first search, already started on exactly ``allowed``."""
        deadline = checks.options.deadline
        excluded: set[str] = set()
        n = _first_exact_window(k, precision)
        while True:
            ids = sorted(allowed - excluded)
            attributes = {"scopegate.window": n, "scopegate.documents": len(ids)}
            if ahead is not None and ahead.n == n and ahead.ids == allowed and not excluded:
                search, begun = ahead.search, ahead.started
            else:
                _drop(ahead)
                search, begun = _exact_search(sources, vector, n, ids), None
            ahead = None
            with tracing.span("scopegate.search", {**attributes, "scopegate.exact": True}):
                found = await _timed_search(outcome, "exact", len(ids), search, deadline)
            if begun is not None:
                # Its cost, for the cost model, is from when it started, not the wait.
                ms = (time.perf_counter() - begun) * 1000
                outcome.phases[-1] = Phase("exact", len(ids), ms)
            exact = [dataclasses.replace(s, exact=True) for s in sources]
            window = trusted_prefix(list(zip(exact, found, strict=True)), n, 1.0)
            documents = _examine(outcome, ctx, window)
            await checks.verify(documents, outcome, screen)
            permitted = _finish(outcome, ctx, checks, window)
            if len(permitted) >= k or window.exhausted or checks.request_denied or not ids:
                outcome.chunks = [] if checks.request_denied else permitted[:k]
                return
            # ListObjects' superset held documents BatchCheck denies: skip them, widen.
            excluded |= {d for d in documents if not checks.allowed(d)}
            n *= 2


@dataclass(frozen=True, slots=True)
class _Speculation:
    """A first exact search started before the change probe vouched for its superset."""

    ids: frozenset[str]
    n: int
    started: float
    search: asyncio.Future[list[list[Candidate]]]


def _list_queries(ctx: DelegationContext, relations: Sequence[str] | None) -> dict[str, str]:
    """relation -> the OpenFGA user whose ListObjects answer bounds that conjunct."""
    return {
        relation: f"{kind}:{scoped(ctx.tenant, getattr(ctx, kind))}"
        for kind, relation in LIST_CONJUNCTS
        if relations is None or relation in relations
    }


def _bare(ctx: DelegationContext, ids: frozenset[str]) -> frozenset[str]:
    """Bare document ids of the caller's tenant among namespaced ListObjects ids.

    A kept answer is the same object on every request that reads it: its bare form
    is remembered (the last ``BARE_MEMO`` answers), not rebuilt per request (5 ms for
    10,000 ids)."""
    key = (ctx.tenant, id(ids))
    memo = _BARE_MEMO.get(key)
    if memo is not None and memo[0] is ids:
        _BARE_MEMO.move_to_end(key)
        return memo[1]
    prefix = f"{ctx.tenant}/"
    bare = frozenset(unscoped(ctx.tenant, i) for i in ids if i.startswith(prefix))
    if len(ids) >= BARE_MEMO_MIN:
        # The answer itself is held with its bare form, so its id() is not reused.
        _BARE_MEMO[key] = (ids, bare)
        while len(_BARE_MEMO) > BARE_MEMO:
            _BARE_MEMO.popitem(last=False)
    return bare


#: Bare forms of recent large ListObjects answers (see :func:`_bare`).
BARE_MEMO = 64
BARE_MEMO_MIN = 256
_BARE_MEMO: OrderedDict[tuple[str, int], tuple[frozenset[str], frozenset[str]]] = OrderedDict()


def _first_exact_window(k: int, precision: float) -> int:
    return max(k + 1, math.ceil(1.25 * k / max(precision, 0.05)))


def _exact_search(
    sources: Sequence[SourceHandle],
    vector: Sequence[float],
    n: int,
    ids: Sequence[str] | frozenset[str],
) -> asyncio.Future[list[list[Candidate]]]:
    ordered = sorted(ids)
    return asyncio.gather(*(_search_source(s, vector, n, ordered) for s in sources))


async def _search_source(
    s: SourceHandle, vector: Sequence[float], n: int, ordered: list[str]
) -> list[Candidate]:
    if s.versions is not None and isinstance(s.store, VersionedSearch):
        return await s.store.search_documents_versioned(
            s.tenant, s.id, vector, n, ordered, s.versions
        )
    return await s.store.search_documents(s.tenant, s.id, vector, n, ordered)


def _drop(ahead: _Speculation | None) -> None:
    """Cancel a speculative search that will not be used (its outcome is read)."""
    if ahead is not None:
        ahead.search.cancel()
        ahead.search.add_done_callback(_consume)


# -- statistics and costs ---------------------------------------------------------------


@dataclass(slots=True)
class Observation:
    """What recent requests of one key looked like (exponentially weighted)."""

    selectivity: float
    samples: int = 1
    superset: float | None = None
    precision: float | None = None
    #: Consecutive ListObjects failures (over the limit, over budget, broken), and
    #: their weighted rate.
    list_failures: int = 0
    list_failure_rate: float = 0.0
    #: The relation whose complete ListObjects answer was the smallest last time.
    narrowest: str | None = None
    #: Per document-level conjunct, the weighted share of checked documents it denied.
    denials: dict[str, float] = field(default_factory=dict)

    def screen(self) -> tuple[CheckName, float] | None:
        """The conjunct to ask first and the share of documents that pass it: the one
        that denies the most documents, when at most ``SCREEN_MAX_PASS`` pass it."""
        if not self.denials:
            return None
        name, share = max(self.denials.items(), key=lambda pair: pair[1])
        return (CheckName(name), 1 - share) if 1 - share <= SCREEN_MAX_PASS else None

    def listable(self) -> tuple[CheckName, float] | None:
        """The conjunct whose ListObjects answer would screen this task's candidates,
        and the share of documents that pass it: the listable one that denies the
        most, when it denies at least ``LISTED_MIN_DENIAL``."""
        shares = [(n, s) for n, s in self.denials.items() if CheckName(n) in LIST_RELATIONS]
        if not shares:
            return None
        name, share = max(shares, key=lambda pair: pair[1])
        return (CheckName(name), 1 - share) if share >= LISTED_MIN_DENIAL else None


StatsKey = tuple[str, ...]


class SelectivityStats:
    """Bounded LRU statistics per (tenant, user, agent, task), with the coarser keys
    (tenant, user, agent), (tenant, user) and (tenant,) kept as priors for new tasks.

    Each level holds at most ``capacity`` keys, so memory is bounded by
    ``4 * capacity`` small records. Fractions are clamped to [0, 1].
    """

    LEVELS = 4

    def __init__(self, capacity: int = 10_000, alpha: float = 0.3) -> None:
        if capacity < 1 or not 0 < alpha <= 1:
            raise ValueError("capacity must be >= 1 and alpha in (0, 1]")
        self._levels: list[OrderedDict[StatsKey, Observation]] = [
            OrderedDict() for _ in range(self.LEVELS)
        ]
        self.capacity = capacity
        self.alpha = alpha

    @staticmethod
    def keys(ctx: DelegationContext) -> list[StatsKey]:
        full = (ctx.tenant, ctx.user, ctx.agent, ctx.task)
        return [full[: SelectivityStats.LEVELS - i] for i in range(SelectivityStats.LEVELS)]

    def estimate(self, ctx: DelegationContext) -> tuple[int, Observation] | None:
        """(level, observation) of the most specific key seen; level 0 is the task."""
        for level, key in enumerate(self.keys(ctx)):
            found = self._levels[level].get(key)
            if found is not None:
                self._levels[level].move_to_end(key)
                return level, found
        return None

    def get(self, ctx: DelegationContext) -> float | None:
        found = self.estimate(ctx)
        return None if found is None else found[1].selectivity

    def update(
        self,
        ctx: DelegationContext,
        fraction: float,
        *,
        superset: int | None = None,
        precision: float | None = None,
        list_failed: bool | None = None,
        narrowest: str | None = None,
        denials: Mapping[str, float] | None = None,
    ) -> None:
        fraction = min(1.0, max(0.0, fraction))
        for level, key in enumerate(self.keys(ctx)):
            table = self._levels[level]
            old = table.get(key)
            if old is None:
                old = table[key] = Observation(fraction, 0)
            old.selectivity = _ewma(old.selectivity, fraction, self.alpha, old.samples)
            old.samples += 1
            if superset is not None:
                old.superset = _ewma(old.superset, float(superset), self.alpha, 1)
            if precision is not None:
                old.precision = _ewma(old.precision, min(1.0, max(0.0, precision)), self.alpha, 1)
            if list_failed is not None:
                old.list_failures = old.list_failures + 1 if list_failed else 0
                old.list_failure_rate += self.alpha * (list_failed - old.list_failure_rate)
                # A failed answer may mean the grants changed: ask every list next time.
                old.narrowest = None if list_failed else narrowest or old.narrowest
            if denials is not None:
                for name, share in denials.items():
                    old.denials[name] = _ewma(old.denials.get(name), share, self.alpha, 1)
            table.move_to_end(key)
            while len(table) > self.capacity:
                table.popitem(last=False)

    def __len__(self) -> int:
        return len(self._levels[0])

    def sizes(self) -> list[int]:
        return [len(level) for level in self._levels]


def _ewma(old: float | None, new: float, alpha: float, samples: int) -> float:
    return new if old is None or samples == 0 else old + alpha * (new - old)


class LinearCost:
    """ms = a + b * size, fitted by exponentially weighted least squares."""

    def __init__(
        self,
        a: float,
        b: float,
        decay: float = 0.95,
        prior_weight: float = 3.0,
        typical: float = 100.0,
    ):
        # Start from a prior line through two synthetic points, worth ``prior_weight``,
        # at 0 and at a ``typical`` size: a prior point far beyond the sizes observed
        # would pin the slope (least-squares leverage) long after real data arrived.
        self.decay = decay
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        for x in (0.0, typical):
            self._add(x, a + b * x, prior_weight / 2)

    def _add(self, x: float, y: float, w: float) -> None:
        self._w += w
        self._x += w * x
        self._y += w * y
        self._xx += w * x * x
        self._xy += w * x * y

    def observe(self, size: float, ms: float) -> None:
        for name in ("_w", "_x", "_y", "_xx", "_xy"):
            setattr(self, name, getattr(self, name) * self.decay)
        self._add(size, ms, 1.0)

    def coefficients(self) -> tuple[float, float]:
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mean_x * mean_x
        slope = (self._xy / self._w - mean_x * mean_y) / var if var > 1e-9 else 0.0
        slope = max(0.0, slope)
        return max(0.0, mean_y - slope * mean_x), slope

    def __call__(self, size: float) -> float:
        a, b = self.coefficients()
        return a + b * size


class CostModel:
    """Measured cost of each phase (ms), learned from every retrieval's phases.

    Priors: the Chroma figures of DESIGN section 6, and OpenFGA on SQLite as measured
    in ``bench/`` (a check of a nested grant costs about a millisecond; a ListObjects
    answer about a quarter of one per object). They only matter for the first few
    requests.
    """

    def __init__(self) -> None:
        self.phases: dict[str, LinearCost] = {
            "search": LinearCost(3.0, 0.03, typical=200),  # unfiltered query, by window
            "check": LinearCost(5.0, 1.0),  # one BatchCheck round, by checks
            "list": LinearCost(5.0, 0.25),  # ListObjects, by superset size
            "exact": LinearCost(3.0, 0.3),  # rank a superset exactly, by documents
        }

    def observe(self, phases: Sequence[Phase]) -> None:
        for phase in phases:
            model = self.phases.get(phase.name)
            if model is not None:
                model.observe(phase.size, phase.ms)

    def post_ms(
        self, k: int, selectivity: float, trust: float, screen_pass: float | None = None
    ) -> float:
        """``screen_pass``: the share of documents that pass the task's screen, when it
        has one (its checks then take two rounds, the second only for those)."""
        examined = k * 1.25 / max(selectivity, 1e-4)
        window = examined / trust
        check = self.phases["check"]
        if screen_pass is None:
            checking = check(4 * examined)
        else:
            checking = check(examined) + check(3 * examined * screen_pass)
        # A refill (a second round of both) happens when the estimate was optimistic.
        rounds = 1.3
        return (self.phases["search"](window) + checking) * rounds

    def pre_ms(self, k: int, superset: float, precision: float, *, listed: bool = True) -> float:
        """``listed``: False when the ListObjects answer is kept in the exact cache."""
        checked = 4 * k * 1.25 / max(precision, 0.05)
        listing = self.phases["list"](superset) if listed else 0.0
        return listing + self.phases["exact"](superset) + self.phases["check"](checked)


@dataclass(frozen=True, slots=True)
class Plan:
    strategy: str
    overfetch: float
    reason: str
    limit: int | None = None
    precision: float = 1.0
    relations: tuple[str, ...] | None = None
    budget_s: float | None = None
    screen: CheckName | None = None
    listed: CheckName | None = None


class Adaptive:
    """Choose post-filter or pre-filter per request from measured selectivity and cost.

    A task seen for the first time starts with a pre-filter probe, whatever coarser
    keys suggest: the probe costs at most the ListObjects budget (a truncated probe
    falls back to post-filter in the same request and teaches the statistics), while
    a post-filter at a selectivity far below the prior's checks the store until it is
    exhausted. Known keys take the cheaper strategy under :class:`CostModel`, counting
    the rate at which their ListObjects answers came back unusable (a failed probe
    costs its budget and then the post-filter); a key whose ListObjects failed is
    probed again after its 1st, 2nd, 4th, 8th ... request and then every ``reprobe_every``
    requests, since servers warm up and grants change; a task kept on the post-filter
    although its ListObjects answer is kept tries the pre-filter on the same schedule
    (one cold exact ranking must not price it out for good). A known
    key's pre-filter asks only the ListObjects that was narrowest last time: one
    OpenFGA call instead of three, and no CPU spent on the wide lists. With the exact
    decision cache that answer is reused while nothing changes (a per-task permitted
    superset, refreshed by the change probe): its pre-filter then costs no ListObjects,
    and its exact search starts on that superset while the probe runs (kept only if the
    probe vouches for the same superset; see :meth:`PreFilter.retrieve`).
    """

    name = "adaptive"

    def __init__(
        self,
        post: PostFilter,
        pre: PreFilter,
        stats: SelectivityStats | None = None,
        costs: CostModel | None = None,
        *,
        reprobe_every: int = 32,
        screening: bool = True,
        listing: bool = True,
    ) -> None:
        self.post = post
        self.pre = pre
        self.stats = stats or SelectivityStats()
        self.costs = costs or CostModel()
        self.reprobe_every = reprobe_every
        self.screening = screening
        self.listing = listing

    def plan(self, ctx: DelegationContext, k: int, sources: Sequence[SourceHandle]) -> Plan:
        found = self.stats.estimate(ctx)
        if found is None:
            return Plan("prefilter", self.post.overfetch, "no statistics: ListObjects probe")
        level, seen = found
        if level > 0:
            s = max(seen.selectivity, 1e-4)
            reason = f"new task (prior s={s:.4f}): ListObjects probe"
            return Plan("prefilter", min(1.25 / s, 1e4), reason)
        screen = seen.screen() if self.screening else None
        plan = self._known(ctx, k, sources, seen, screen[1] if screen else None)
        return dataclasses.replace(plan, screen=screen[0]) if screen else plan

    def _known(
        self,
        ctx: DelegationContext,
        k: int,
        sources: Sequence[SourceHandle],
        seen: Observation,
        screen_pass: float | None,
    ) -> Plan:
        """The cheaper strategy for a task seen before."""
        s = max(seen.selectivity, 1e-4)
        overfetch = min(1.25 / s, 1e4)
        trust = 1.0 if all(h.exact for h in sources) else self.post.ann_trust
        post_ms = self.costs.post_ms(k, s, trust, screen_pass)
        corpus = sum(h.documents for h in sources)
        superset = seen.superset if seen.superset is not None else s * max(corpus, 1)
        precision = seen.precision if seen.precision is not None else 1.0
        if superset > self.pre.max_results:
            return self._over_limit(ctx, seen, overfetch, corpus, precision, superset)
        limit = max(1, min(self.pre.max_results, math.ceil(4 * superset) + 16))
        # Room for three times the measured cost of the list: a slow answer is still
        # far cheaper than a post-filter that needs many check rounds.
        budget = min(
            4 * self.pre.list_budget_s,
            max(self.pre.list_budget_s, 3 * self.costs.phases["list"](superset) / 1000),
        )
        if seen.list_failures > 0 and self._reprobe_due(seen.samples):
            reason = "ListObjects failed before: probe"
            return Plan("prefilter", overfetch, reason, limit, budget_s=budget)
        # A known task's narrowest answer kept by the exact cache costs no ListObjects,
        # and cannot come back over budget.
        kept = self.pre.kept_list(ctx, seen.narrowest, limit) if seen.narrowest else None
        listed = kept is None
        failed = seen.list_failure_rate if listed else 0.0
        pre_cost = self.costs.pre_ms(k, superset, precision, listed=listed)
        pre_ms = (1 - failed) * pre_cost + failed * (1000 * budget + post_ms)
        reason = f"s={s:.4f} post~{post_ms:.0f}ms pre~{pre_ms:.0f}ms"
        # The pre-filter's measured cost may be one cold run (its first exact ranking
        # reads every vector from the store); with its list kept it is tried again on
        # the probe schedule, or the task would stay on the post-filter for good.
        retry = kept is not None and pre_ms >= post_ms and self._reprobe_due(seen.samples)
        if pre_ms < post_ms or retry:
            narrowest = (seen.narrowest,) if seen.narrowest else None
            reason += "; the pre-filter tried again" if retry else ""
            return Plan("prefilter", overfetch, reason, limit, precision, narrowest, budget)
        return Plan("postfilter", overfetch, reason)

    def _over_limit(
        self,
        ctx: DelegationContext,
        seen: Observation,
        overfetch: float,
        corpus: int,
        precision: float,
        superset: float,
    ) -> Plan:
        """A task too wide for the pre-filter: post-filter, listed when it can be (see
        ``LISTED_MIN_DENIAL``); when its list is not kept yet, fetch it off the path."""
        reason = f"superset ~{superset:.0f} over the limit"
        found = seen.listable() if self.listing else None
        if found is None:
            return Plan("postfilter", overfetch, reason)
        conjunct, passing = found
        relation = LIST_RELATIONS[conjunct]
        if self.pre.kept_list(ctx, relation, self.pre.listed_max) is not None:
            reason += f"; {conjunct} listed"
            return Plan("postfilter", overfetch, reason, precision=precision, listed=conjunct)
        if passing * max(corpus, 1) <= self.pre.listed_max and self.pre.warm(ctx, relation):
            reason += f"; listing {relation} off the request path"
        return Plan("postfilter", overfetch, reason)

    def _reprobe_due(self, samples: int) -> bool:
        """After the 1st, 2nd, 4th ... request, then every ``reprobe_every``: one slow
        answer (a cold server) does not hold a task on the post-filter for long."""
        return samples % self.reprobe_every == 0 or samples & (samples - 1) == 0

    async def retrieve(
        self,
        ctx: DelegationContext,
        vector: Sequence[float],
        k: int,
        sources: Sequence[SourceHandle],
        options: RequestOptions | None = None,
        *,
        outcome: RetrievalOutcome | None = None,
    ) -> RetrievalOutcome:
        options = options or RequestOptions()
        plan = self.plan(ctx, k, sources)
        checks = RequestChecks(self.post.fga, ctx, options, self.post.model_id)
        outcome = _started(outcome, self.name)
        outcome.notes.append(f"adaptive chose {plan.strategy}: {plan.reason}")
        if plan.strategy == "prefilter":
            result = await self.pre.retrieve(
                ctx,
                vector,
                k,
                sources,
                options,
                checks=checks,
                limit=plan.limit,
                precision=plan.precision,
                overfetch=plan.overfetch,
                relations=plan.relations,
                budget_s=plan.budget_s,
                outcome=outcome,
                reuse_lists=True,
                screen=plan.screen,
            )
        else:
            result = await self.post.retrieve(
                ctx,
                vector,
                k,
                sources,
                options,
                overfetch=plan.overfetch,
                checks=checks,
                outcome=outcome,
                screen=plan.screen,
                listed=plan.listed,
                precision=plan.precision,
            )
        self.learn(ctx, result, sources)
        result.strategy = f"adaptive:{result.strategy}"
        return result

    def learn(
        self, ctx: DelegationContext, result: RetrievalOutcome, sources: Sequence[SourceHandle]
    ) -> None:
        self.costs.observe(result.phases)
        if _request_denied(result):
            return
        fraction = permitted_fraction(result)
        checked = [v for v in result.verdicts.values() if MISSING_METADATA not in v.failed_checks]
        precision = None
        if result.superset is not None:
            precision = sum(v.allowed for v in checked) / len(checked) if checked else 1.0
            corpus = sum(s.documents for s in sources)
            if corpus:
                fraction = result.superset * precision / corpus
        elif result.listed is not None:
            # Of the documents inside the listed answer, the share every conjunct allows.
            inside = [v for v in checked if v.document_id not in result.unlisted]
            precision = sum(v.allowed for v in inside) / len(inside) if inside else None
        fell_back = result.strategy == "prefilter->postfilter"
        self.stats.update(
            ctx,
            fraction,
            superset=result.superset,
            precision=precision,
            list_failed=True if fell_back else (False if result.superset is not None else None),
            narrowest=result.narrowest,
            denials=denial_shares(checked),
        )


def _request_denied(result: RetrievalOutcome) -> bool:
    """When a request-level conjunct fails, nothing about selectivity was learned."""
    return any(REQUEST_LEVEL.intersection(v.failed_checks) for v in result.verdicts.values())


def denial_shares(checked: Sequence[DocumentVerdict]) -> dict[str, float] | None:
    """Per document-level conjunct, the share of the ``checked`` documents (those
    OpenFGA decided) it denied; None when there were none."""
    if not checked:
        return None
    return {
        name: sum(name in v.failed_checks for v in checked) / len(checked)
        for name in DOCUMENT_LEVEL
    }


def permitted_fraction(result: RetrievalOutcome) -> float:
    """The permitted share of the chunks a retrieval examined (its selectivity)."""
    if result.examined:
        return result.permitted / result.examined
    if result.selectivity is not None:
        return result.selectivity
    return 1.0

"""Retrieval strategies: turn a query vector into the exact top-k permitted chunks.

All strategies share one contract: the returned chunks are the k nearest chunks whose
documents pass every conjunct of the decision, in distance order, or fewer only when
the sources hold fewer permitted chunks. Every candidate that was looked at gets a
verdict, so the audit record can show what was blocked and why.

- :class:`PostFilter` searches k x overfetch, checks the new documents in one
  BatchCheck round, and refills (doubling the window) until k are permitted or the
  stores are exhausted.
- :class:`PreFilter` asks ListObjects for the documents the task, user and agent may
  reach, searches only those exactly, and re-verifies the winners with BatchCheck.
  A ListObjects answer that may be truncated is never trusted: it falls back.
- :class:`Adaptive` picks one of the two per request from the observed selectivity
  of this (tenant, user, agent, task).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from connectors.base import Candidate, VectorStore
from gateway.decision import (
    CheckItem,
    CheckOutcome,
    DocumentVerdict,
    decide,
    plan_checks,
)
from gateway.errors import AuthorizationUnavailable
from gateway.fga import FgaClient
from gateway.identity import DelegationContext
from gateway.ids import scoped, unscoped

MISSING_METADATA = "chunk_metadata"


@dataclass(frozen=True, slots=True)
class SourceHandle:
    """A registered source of the caller's tenant, the store that holds it, and how
    many documents it holds (for selectivity estimates)."""

    tenant: str
    id: str
    store: VectorStore
    documents: int = 0


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

    def observe(self, found: Sequence[Candidate]) -> None:
        for c in found:
            key = c.document_id or f"?{c.chunk_id}"
            bucket = self.candidates.setdefault(key, [])
            if all(x.chunk_id != c.chunk_id for x in bucket):
                bucket.append(c)


class RetrievalStrategy(Protocol):
    name: str

    async def retrieve(
        self,
        ctx: DelegationContext,
        vector: Sequence[float],
        k: int,
        sources: Sequence[SourceHandle],
    ) -> RetrievalOutcome: ...


def well_formed(ctx: DelegationContext, c: Candidate, source: str) -> bool:
    """A chunk without its stamps, or stamped for another tenant/source, is never released."""
    return bool(c.document_id) and c.tenant == ctx.tenant and c.source == source


async def _search_all(
    sources: Sequence[SourceHandle], vector: Sequence[float], n: int
) -> tuple[list[tuple[Candidate, str]], bool]:
    """Merge the n nearest of every source; also say whether every source ran dry."""
    results = await asyncio.gather(*(s.store.search(s.tenant, s.id, vector, n) for s in sources))
    merged = [(c, s.id) for s, found in zip(sources, results, strict=True) for c in found]
    merged.sort(key=lambda pair: pair[0].distance)
    exhausted = all(len(found) < n for found in results)
    return merged, exhausted


async def check_documents(
    fga: FgaClient,
    ctx: DelegationContext,
    document_ids: Sequence[str],
    include_request: bool,
    model_id: str | None = None,
) -> dict[CheckItem, CheckOutcome]:
    """One BatchCheck round (possibly several parallel calls) for these documents."""
    items = plan_checks(ctx, document_ids, include_request=include_request)
    outcomes = await fga.batch_check(items, model_id=model_id)
    errored = [item for item, o in outcomes.items() if o.allowed is None]
    if errored:
        raise AuthorizationUnavailable(
            f"OpenFGA could not answer {len(errored)} check(s): {errored[0].name.value}"
        )
    return outcomes


def _deny_malformed(outcome: RetrievalOutcome, c: Candidate) -> None:
    key = c.document_id or f"?{c.chunk_id}"
    outcome.verdicts.setdefault(key, DocumentVerdict(key, "deny", (MISSING_METADATA,)))


class PostFilter:
    """Search k x overfetch, check new documents, refill until k permitted."""

    name = "postfilter"

    def __init__(
        self,
        fga: FgaClient,
        overfetch: int = 4,
        max_candidates: int = 2000,
        model_id: str | None = None,
    ) -> None:
        self.fga = fga
        self.overfetch = overfetch
        self.max_candidates = max_candidates
        self.model_id = model_id

    async def retrieve(
        self,
        ctx: DelegationContext,
        vector: Sequence[float],
        k: int,
        sources: Sequence[SourceHandle],
        overfetch: int | None = None,
    ) -> RetrievalOutcome:
        outcome = RetrievalOutcome(self.name)
        outcomes: dict[CheckItem, CheckOutcome] = {}
        n = min(max(k, k * (overfetch or self.overfetch)), self.max_candidates)
        while True:
            merged, exhausted = await _search_all(sources, vector, n)
            fresh: list[str] = []
            for c, source in merged:
                outcome.observe([c])
                if not well_formed(ctx, c, source):
                    _deny_malformed(outcome, c)
                elif c.document_id not in outcome.verdicts and c.document_id not in fresh:
                    fresh.append(str(c.document_id))
            if fresh or not outcome.batch_rounds:
                outcomes.update(
                    await check_documents(
                        self.fga, ctx, fresh, not outcome.batch_rounds, self.model_id
                    )
                )
                outcome.batch_rounds += 1
                outcome.verdicts.update(decide(ctx, fresh, outcomes))
            permitted = [
                c
                for c, source in merged
                if well_formed(ctx, c, source) and outcome.verdicts[str(c.document_id)].allowed
            ]
            request_denied = _request_denied(outcome)
            if len(permitted) >= k or exhausted or request_denied or n >= self.max_candidates:
                outcome.chunks = permitted[:k]
                outcome.exhausted = exhausted
                if len(permitted) < k and not exhausted and not request_denied:
                    outcome.notes.append(f"candidate limit {self.max_candidates} reached")
                return outcome
            n = min(n * 2, self.max_candidates)


def _request_denied(outcome: RetrievalOutcome) -> bool:
    """When a request-level conjunct fails, no further candidate can be allowed."""
    request_level = {
        "task_in_tenant",
        "task_active",
        "task_delegator",
        "task_executor",
        "user_active",
        "agent_active",
    }
    return any(request_level.intersection(v.failed_checks) for v in outcome.verdicts.values())


class PreFilter:
    """ListObjects narrows the candidates; exact search over them; BatchCheck re-verifies."""

    name = "prefilter"

    def __init__(
        self,
        fga: FgaClient,
        fallback: PostFilter,
        max_results: int = 1000,
        model_id: str | None = None,
    ) -> None:
        self.fga = fga
        self.fallback = fallback
        self.max_results = max_results
        self.model_id = model_id

    async def permitted_superset(self, ctx: DelegationContext) -> tuple[set[str] | None, int]:
        """Intersection of the complete ListObjects answers (None if none was complete)."""
        queries = [
            (f"task:{scoped(ctx.tenant, ctx.task)}", "in_task_scope"),
            (f"agent:{scoped(ctx.tenant, ctx.agent)}", "agent_can_read"),
            (f"user:{scoped(ctx.tenant, ctx.user)}", "user_can_read"),
        ]
        answers = await asyncio.gather(
            *(
                self.fga.list_objects(user, relation, "document", max_results=self.max_results)
                for user, relation in queries
            )
        )
        complete = [a for a in answers if not a.truncated]
        if not complete:
            return None, len(answers)
        ids = set.intersection(*(set(a.ids) for a in complete))
        prefix_ok = {i for i in ids if i.startswith(f"{ctx.tenant}/")}
        return {unscoped(ctx.tenant, i) for i in prefix_ok}, len(answers)

    async def retrieve(
        self,
        ctx: DelegationContext,
        vector: Sequence[float],
        k: int,
        sources: Sequence[SourceHandle],
    ) -> RetrievalOutcome:
        allowed_ids, calls = await self.permitted_superset(ctx)
        if allowed_ids is None:
            result = await self.fallback.retrieve(ctx, vector, k, sources)
            result.strategy = "prefilter->postfilter"
            result.list_objects_calls = calls
            result.notes.append("ListObjects answers may be truncated; fell back to post-filter")
            return result
        outcome = RetrievalOutcome(self.name, list_objects_calls=calls)
        corpus = sum(s.documents for s in sources)
        outcome.selectivity = len(allowed_ids) / corpus if corpus else None
        outcomes: dict[CheckItem, CheckOutcome] = {}
        excluded: set[str] = set()
        while True:
            ids = sorted(allowed_ids - excluded)
            found = (
                await asyncio.gather(
                    *(s.store.search_documents(s.tenant, s.id, vector, k, ids) for s in sources)
                )
                if ids
                else []
            )
            merged = sorted(
                ((c, s.id) for s, part in zip(sources, found, strict=False) for c in part),
                key=lambda pair: pair[0].distance,
            )
            fresh = [
                str(c.document_id)
                for c, source in merged
                if well_formed(ctx, c, source) and str(c.document_id) not in outcome.verdicts
            ]
            for c, source in merged:
                outcome.observe([c])
                if not well_formed(ctx, c, source):
                    _deny_malformed(outcome, c)
            fresh = list(dict.fromkeys(fresh))
            if fresh or not outcome.batch_rounds:
                outcomes.update(
                    await check_documents(
                        self.fga, ctx, fresh, not outcome.batch_rounds, self.model_id
                    )
                )
                outcome.batch_rounds += 1
                outcome.verdicts.update(decide(ctx, fresh, outcomes))
            denied = {d for d in fresh if not outcome.verdicts[d].allowed}
            if not denied or _request_denied(outcome) or not ids:
                outcome.chunks = [
                    c
                    for c, source in merged
                    if well_formed(ctx, c, source) and outcome.verdicts[str(c.document_id)].allowed
                ][:k]
                outcome.exhausted = len(merged) < k
                return outcome
            # ListObjects and BatchCheck disagreed (a concurrent revoke): drop and retry.
            excluded |= denied


class SelectivityStats:
    """Bounded LRU of the permitted fraction seen per (tenant, user, agent, task)."""

    def __init__(self, capacity: int = 10_000, alpha: float = 0.3) -> None:
        self._data: OrderedDict[tuple[str, str, str, str], float] = OrderedDict()
        self.capacity = capacity
        self.alpha = alpha

    @staticmethod
    def key(ctx: DelegationContext) -> tuple[str, str, str, str]:
        return (ctx.tenant, ctx.user, ctx.agent, ctx.task)

    def get(self, ctx: DelegationContext) -> float | None:
        value = self._data.get(self.key(ctx))
        if value is not None:
            self._data.move_to_end(self.key(ctx))
        return value

    def update(self, ctx: DelegationContext, fraction: float) -> None:
        key = self.key(ctx)
        old = self._data.get(key)
        self._data[key] = fraction if old is None else old + self.alpha * (fraction - old)
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class Adaptive:
    """Post-filter when many candidates are permitted, pre-filter when few are."""

    name = "adaptive"

    def __init__(
        self,
        post: PostFilter,
        pre: PreFilter,
        threshold: float = 0.05,
        stats: SelectivityStats | None = None,
    ) -> None:
        self.post = post
        self.pre = pre
        self.threshold = threshold
        self.stats = stats or SelectivityStats()

    def choose(self, ctx: DelegationContext) -> str:
        seen = self.stats.get(ctx)
        return "prefilter" if seen is not None and seen < self.threshold else "postfilter"

    async def retrieve(
        self,
        ctx: DelegationContext,
        vector: Sequence[float],
        k: int,
        sources: Sequence[SourceHandle],
    ) -> RetrievalOutcome:
        seen = self.stats.get(ctx)
        if seen is not None and seen < self.threshold:
            result = await self.pre.retrieve(ctx, vector, k, sources)
        else:
            overfetch = None if seen is None else _overfetch_for(seen)
            result = await self.post.retrieve(ctx, vector, k, sources, overfetch=overfetch)
        self.stats.update(ctx, permitted_fraction(result))
        result.strategy = f"adaptive:{result.strategy}"
        return result


def _overfetch_for(fraction: float) -> int:
    """Enough candidates that k permitted are likely found in the first round."""
    return max(1, min(50, round(1.5 / max(fraction, 0.01))))


def permitted_fraction(result: RetrievalOutcome) -> float:
    if result.selectivity is not None:
        return result.selectivity
    verdicts = [v for v in result.verdicts.values() if MISSING_METADATA not in v.failed_checks]
    if not verdicts:
        return 1.0
    return sum(v.allowed for v in verdicts) / len(verdicts)

"""The static world of the load run and its oracle (DESIGN section 2 by set logic).

``bench/load.py`` builds one large world per tenant up front, loads it through the HTTP
API and compares every answer under load with :class:`Oracle`: the permitted documents
by set logic over the world description, their chunks ranked by exact cosine distance
over the same deterministic embeddings. (The leak oracle in tests/ mutates its worlds;
this one stays fixed for the whole run.)
"""

from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from connectors.embeddings import HashEmbeddings

WORDS = (
    "alpha river stone cloud forest garden market engine signal harbor winter summer "
    "copper silver marble planet window bridge castle island pepper orange violet button "
    "rocket camera mirror pocket ladder basket finance revenue budget invoice salary "
    "contract policy audit report memo server network cluster backup incident outage "
    "disk memory kernel patch"
)
VOCAB = tuple(WORDS.split())
EPS = 1e-5  # distances closer than this are ties (Chroma ranks in float32)


@dataclass
class Doc:
    id: str
    source: str
    folder: str | None
    seeds: tuple[int, ...]  # one paragraph (= one chunk) per seed, shared across tenants


@dataclass
class Task:
    user: str
    agent: str
    scope: tuple[str, ...]
    expiry: str  # "none" | "past" | "future"
    id: str = ""
    revoked: bool = False


@dataclass
class TenantWorld:
    """One tenant, in the vocabulary of the public API (typed ids local to the tenant)."""

    name: str
    users: tuple[str, ...]
    agents: tuple[str, ...]
    sources: tuple[str, ...]
    folders: dict[str, tuple[str, str | None]]  # folder -> (source, parent folder)
    docs: dict[str, Doc]
    grants: set[tuple[str, str, str]]  # (subject, viewer|agent_viewer|owner, object)
    memberships: set[tuple[str, str]]  # (user:u | agent:a | group:g#member, group)
    groups: tuple[str, ...]
    members: set[str]  # active tenant members: "user:u", "agent:a"
    tasks: list[Task]
    deprovision: tuple[str, ...]  # removed from the tenant after setup

    def text(self, doc: Doc) -> list[str]:
        return [paragraph(seed, self.name) for seed in doc.seeds]


def paragraph(seed: int, tenant: str) -> str:
    """A deterministic one-chunk paragraph; the same seed in two tenants differs by one word."""
    rng = random.Random(seed)
    weights = [rng.random() ** 3 for _ in VOCAB]  # skewed: paragraphs have topics
    words = rng.choices(VOCAB, weights=weights, k=rng.randint(100, 125))
    words.insert(rng.randint(0, len(words)), tenant)
    return " ".join(words) + "."


class Oracle:
    """DESIGN section 2 by set logic over a :class:`TenantWorld`, and exact cosine ranking."""

    def __init__(self, world: TenantWorld, embeddings: HashEmbeddings) -> None:
        self.w = world
        self.embeddings = embeddings

    def group_members(self) -> dict[str, set[str]]:
        """group -> every user:/agent: reaching it, through nested groups."""
        closure: dict[str, set[str]] = {g: set() for g in self.w.groups}
        changed = True
        while changed:
            changed = False
            for member, group in self.w.memberships:
                if member.startswith("group:"):
                    reached = closure[member.removeprefix("group:").removesuffix("#member")]
                else:
                    reached = {member}
                if not reached <= closure[group]:
                    closure[group] |= reached
                    changed = True
        return closure

    def lineage(self, doc: Doc) -> list[str]:
        """The document, its folders up to the top, and its source (typed ids)."""
        chain = [f"document:{doc.id}"]
        folder = doc.folder
        while folder is not None:
            chain.append(f"folder:{folder}")
            folder = self.w.folders[folder][1]
        chain.append(f"source:{doc.source}")
        return chain

    def holds(self, who: str, subject: str, groups: dict[str, set[str]]) -> bool:
        if subject == who:
            return True
        if subject.startswith("group:"):
            return who in groups[subject.removeprefix("group:").removesuffix("#member")]
        return subject == f"tenant:{self.w.name}#member" and who in self.w.members

    def can(self, who: str, relation: str, doc: Doc, groups: dict[str, set[str]]) -> bool:
        if relation == "viewer" and (who, "owner", f"document:{doc.id}") in self.w.grants:
            return True
        lineage = set(self.lineage(doc))
        return any(
            r == relation and o in lineage and self.holds(who, s, groups)
            for s, r, o in self.w.grants
        )

    def permitted(self, user: str, agent: str, task: Task | None) -> set[str]:
        """The documents user+agent+task may read now (empty for any request-level failure)."""
        if task is None or task.revoked or task.expiry == "past":
            return set()
        if (task.user, task.agent) != (user, agent):
            return set()
        if f"user:{user}" not in self.w.members or f"agent:{agent}" not in self.w.members:
            return set()
        groups = self.group_members()
        return {
            doc.id
            for doc in self.w.docs.values()
            if set(task.scope) & set(self.lineage(doc))
            and self.can(f"user:{user}", "viewer", doc, groups)
            and self.can(f"agent:{agent}", "agent_viewer", doc, groups)
        }

    def ranking(
        self, documents: set[str], query: str, sources: tuple[str, ...] | None
    ) -> list[tuple[str, float, str]]:
        """(chunk id, exact cosine distance, text) of every permitted chunk, nearest first."""
        q = vector(self.embeddings, query)
        ranked = []
        for doc_id in documents:
            doc = self.w.docs[doc_id]
            if sources is not None and doc.source not in sources:
                continue
            for i, text in enumerate(self.w.text(doc)):
                v = vector(self.embeddings, text)
                distance = 1.0 - float(q @ v) / float(np.linalg.norm(q) * np.linalg.norm(v))
                ranked.append((f"{doc_id}#{i}", distance, text))
        ranked.sort(key=lambda r: (r[1], r[0]))
        return ranked


@functools.lru_cache(maxsize=8192)
def vector(embeddings: HashEmbeddings, text: str) -> np.ndarray:
    """The (deterministic) embedding of ``text``, computed once."""
    return np.asarray(embeddings.embed_query(text))


def compare(
    ranked: list[tuple[str, float, str]], chunks: list[dict[str, Any]], k: int
) -> list[str]:
    """Problems with ``chunks`` as the top-k of ``ranked`` (empty when they agree)."""
    problems = []
    expected = {cid: (d, text) for cid, d, text in ranked}
    want = min(k, len(ranked))
    ids = [c["chunk_id"] for c in chunks]
    leaked = [
        cid
        for cid, c in zip(ids, chunks, strict=True)
        if expected.get(cid, (0, None))[1] != c["text"]
    ]
    if leaked:
        problems.append(f"LEAK: returned chunks not permitted (or another tenant's): {leaked}")
        return problems
    if len(ids) != want or len(set(ids)) != len(ids):
        problems.append(
            f"MISS: got {len(ids)} chunks {ids}, oracle top-{k} {[r[0] for r in ranked[:want]]}"
        )
        return problems
    if want:
        kth = ranked[want - 1][1]
        distances = [expected[cid][0] for cid in ids]
        if any(d > kth + EPS for d in distances):
            problems.append(f"NOT TOP-K: {list(zip(ids, distances, strict=True))} vs k-th {kth}")
        if any(b < a - EPS for a, b in itertools.pairwise(distances)):
            problems.append(f"ORDER: {list(zip(ids, distances, strict=True))}")
        for c in chunks:
            if abs(c["score"] - (1.0 - expected[c["chunk_id"]][0])) > 2e-5:
                problems.append(
                    f"SCORE: {c['chunk_id']} {c['score']} vs {1 - expected[c['chunk_id']][0]}"
                )
    for c in chunks:
        if set(c) != {"chunk_id", "document_id", "source", "text", "score", "tokens", "metadata"}:
            problems.append(f"SHAPE: {sorted(c)}")
        if c["document_id"] != c["chunk_id"].split("#")[0]:
            problems.append(f"DOCUMENT ID: {c}")
    return problems


# -- loading a world through the public API -----------------------------------------------------

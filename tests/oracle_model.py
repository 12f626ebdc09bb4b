"""The leak oracle's model of the gateway: tenant state, the decision, every admin request.

:class:`TenantState` is one tenant in the vocabulary of the public API (typed ids local
to the tenant). :meth:`TenantState.permitted` is DESIGN section 2 by plain set logic and
:func:`ranking` orders the permitted chunks by exact cosine distance; nothing here knows
OpenFGA. :func:`plan` turns one drawn mutation into the HTTP calls that apply it, the
status each must get and the state they must leave behind, refusals included:

- a folder and a document id belong to the first source whose ingestion named them;
  naming either in another source (or writing a ``parent`` that would move it there)
  is a 409 that writes nothing, not even the batch's other documents;
- re-ingesting a document replaces its text, folder, metadata and ACL entirely (grants
  written since through /v1/relationships included); an identical one is skipped;
- ``DELETE /v1/principals`` removes every relation of the principal and revokes its
  tasks, and re-adding the member later brings none of them back;
- removing a source (or a document) removes every tuple on its objects, task scopes
  naming them included, and frees their names for any source;
- a fronted collection (``FRONTED``: one Chroma and one Qdrant collection per tenant,
  filled by plain client code) states each document's ACL and folder path in its
  chunks' metadata; a sync makes the tuples of each document it reconciles exactly that
  ACL (an incremental sync: the documents whose ACL changed upstream since the last
  sync; a full one: all), and ``a/b`` paths nest folder ``a__b`` under ``a``.

Pure code, no servers: a world's whole program can be planned (and what the generator
exercises counted) without a gateway.
"""

from __future__ import annotations

import copy
import functools
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import numpy as np

from connectors.embeddings import HashEmbeddings

Grant = tuple[str, str, str]  # (subject, viewer | agent_viewer | owner, object)

TENANTS = ("acme", "globex")
ADMIN = "admin"
SOURCE_POOL = ("docs", "wiki", "hr")
# One pool of folder names and one of document ids for every source of a tenant (and for
# both tenants): ingestion keeps naming what another source already owns.
FOLDER_POOL = ("f0", "f1", "f2", "f3")
DOC_POOL = tuple(f"d{i}" for i in range(10))
# Every word is one cl100k token, so a paragraph of 100-125 words (plus its tenant
# marker) is one chunk and two paragraphs never fit in one (max 200 tokens).
WORDS = (
    "alpha river stone cloud forest garden market engine signal harbor winter summer "
    "copper silver marble planet window bridge castle island pepper orange violet button "
    "rocket camera mirror pocket ladder basket finance revenue budget invoice salary "
    "contract policy audit report memo server network cluster backup incident outage "
    "disk memory kernel patch"
)
VOCAB = tuple(WORDS.split())
EMBEDDINGS = HashEmbeddings()  # the oracle's own; the gateway's instance is separate
# Fronted collections: source id -> (store kind, document ids, folder paths). Their names
# are their own: the mutations of the program name only the pools above.
FRONTED = {
    "cx": ("chroma", ("x0", "x1", "x2", "x3"), ("cf0", "cf0/cf1", "cf0/cf1/cf2", "cf3")),
    "qx": ("qdrant", ("y0", "y1", "y2", "y3"), ("qf0", "qf0/qf1", "qf2")),
}
FRONTED_FOLDERS = tuple(
    "__".join(path.split("/")) for _, _, paths in FRONTED.values() for path in paths
)
FRONTED_DOCS = tuple(d for _, docs, _ in FRONTED.values() for d in docs)
_POINTS = uuid.UUID("2b7c0f4e-5d1a-4e8b-9c3f-7a6d5e4c3b2a")


def fronted_chunk_id(kind: str, doc_id: str, index: int) -> str:
    """The id the platform team's pipeline gave a chunk (Qdrant wants UUIDs)."""
    chunk = f"{doc_id}#{index}"
    return str(uuid.uuid5(_POINTS, chunk)) if kind == "qdrant" else chunk


@functools.lru_cache(maxsize=16384)
def paragraph(seed: int, tenant: str) -> str:
    """A deterministic one-chunk paragraph; the same seed in two tenants differs by one word."""
    rng = random.Random(seed)
    weights = [rng.random() ** 3 for _ in VOCAB]  # skewed: paragraphs have topics
    words = rng.choices(VOCAB, weights=weights, k=rng.randint(100, 125))
    words.insert(rng.randint(0, len(words)), tenant)
    return " ".join(words) + "."


@functools.lru_cache(maxsize=16384)
def vector(text: str) -> np.ndarray:
    """The (deterministic) embedding of ``text``, computed once."""
    return np.asarray(EMBEDDINGS.embed_query(text))


# -- the state ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Acl:
    viewers: tuple[str, ...] = ()
    agents: tuple[str, ...] = ()
    owner: str | None = None

    def grants(self, doc_id: str) -> set[Grant]:
        obj = f"document:{doc_id}"
        found = {(v, "viewer", obj) for v in self.viewers}
        found |= {(a, "agent_viewer", obj) for a in self.agents}
        if self.owner is not None:
            found.add((self.owner, "owner", obj))
        return found

    def entries(self) -> list[tuple[str, str]]:
        found = [("viewers", v) for v in self.viewers] + [("agents", a) for a in self.agents]
        return found + ([("owner", self.owner)] if self.owner else [])

    @staticmethod
    def of(entries: Sequence[tuple[str, str]]) -> Acl:
        owners = sorted(v for k, v in entries if k == "owner")
        return Acl(
            tuple(sorted({v for k, v in entries if k == "viewers"})),
            tuple(sorted({v for k, v in entries if k == "agents"})),
            owners[0] if owners else None,
        )

    def body(self) -> dict[str, Any]:
        acl: dict[str, Any] = {"viewers": list(self.viewers), "agents": list(self.agents)}
        if self.owner is not None:
            acl["owner"] = self.owner
        return acl


@dataclass(frozen=True)
class Doc:
    """A document as last ingested (its grants live in :attr:`TenantState.grants`)."""

    id: str
    source: str
    folder: str | None
    seeds: tuple[int, ...]  # one paragraph (= one chunk) per seed
    acl: Acl
    rev: int = 0  # in the metadata: a metadata-only change is a change too

    def texts(self, tenant: str) -> list[str]:
        return [paragraph(seed, tenant) for seed in self.seeds]

    @property
    def metadata(self) -> dict[str, Any]:
        return {"kind": "memo", "rev": self.rev}

    def body(self, tenant: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "text": "\n\n".join(self.texts(tenant)),
            "metadata": self.metadata,
            "acl": self.acl.body(),
        }
        if self.folder is not None:
            body["folder"] = self.folder
        return body


@dataclass
class Task:
    user: str
    agent: str
    scope: tuple[str, ...]
    expiry: str  # "none" | "past" | "future"
    id: str = ""
    revoked: bool = False

    def body(self, now: datetime) -> dict[str, Any]:
        body: dict[str, Any] = {
            "user": f"user:{self.user}",
            "agent": f"agent:{self.agent}",
            "scope": list(self.scope),
        }
        if self.expiry != "none":
            delta = timedelta(hours=1 if self.expiry == "future" else -1)
            body["expires_at"] = (now + delta).isoformat()
        return body


class Chunk(NamedTuple):
    id: str
    distance: float
    text: str
    source: str
    metadata: dict[str, Any]


@dataclass
class TenantState:
    name: str
    users: tuple[str, ...]
    agents: tuple[str, ...]
    groups: tuple[str, ...]
    openness: float  # how often a drawn ACL lets every member in
    sources: list[str]
    folders: dict[str, str] = field(default_factory=dict)  # folder -> the source owning it
    nesting: dict[str, str] = field(default_factory=dict)  # child folder -> parent folder
    docs: dict[str, Doc] = field(default_factory=dict)
    grants: set[Grant] = field(default_factory=set)  # documents' grants included
    memberships: set[tuple[str, str]] = field(default_factory=set)  # (member, group)
    members: set[str] = field(default_factory=set)  # active: "user:u", "agent:a"
    tasks: list[Task] = field(default_factory=list)
    # Removed through DELETE /v1/principals -> the documents they could read then.
    deprovisioned: dict[str, set[str]] = field(default_factory=dict)
    removed_sources: set[str] = field(default_factory=set)
    freed_folders: set[str] = field(default_factory=set)
    # Fronted collections: their documents (``acl`` and ``folder`` as upstream states
    # them now; the tuples live in ``grants`` like any document's) and folder trees.
    fronted: dict[str, Doc] = field(default_factory=dict)
    fronted_folders: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    @property
    def everyone(self) -> str:
        return f"tenant:{self.name}#member"

    def copy(self) -> TenantState:
        return copy.deepcopy(self)

    # -- documents -------------------------------------------------------------------

    def doc_grants(self, doc_id: str) -> set[Grant]:
        obj = f"document:{doc_id}"
        return {g for g in self.grants if g[2] == obj}

    def current_acl(self, doc_id: str) -> Acl:
        key = {"viewer": "viewers", "agent_viewer": "agents", "owner": "owner"}
        return Acl.of([(key[r], s) for s, r, _ in self.doc_grants(doc_id)])

    def in_sync(self, doc: Doc) -> bool:
        """The document's tuples are still exactly the ACL it was ingested with."""
        return self.doc_grants(doc.id) == doc.acl.grants(doc.id)

    def conflict(self, source: str, docs: Sequence[Doc]) -> str | None:
        """Why ingesting ``docs`` into ``source`` is refused (409), or None."""
        for d in docs:
            owner = self.docs.get(d.id)
            if owner is not None and owner.source != source:
                return f"document {d.id} belongs to source {owner.source}"
            if d.folder is not None and self.folders.get(d.folder, source) != source:
                return f"folder {d.folder} belongs to source {self.folders[d.folder]}"
        return None

    def ingest(self, source: str, docs: Sequence[Doc]) -> int:
        """Apply an accepted batch; the number of documents skipped as unchanged."""
        skipped = 0
        for d in docs:
            old = self.docs.get(d.id)
            if old == d and self.in_sync(old):
                skipped += 1
                continue
            obj = f"document:{d.id}"
            self.grants = {g for g in self.grants if g[2] != obj} | d.acl.grants(d.id)
            if d.folder is not None and d.folder not in self.folders:
                self.folders[d.folder] = source
                self.freed_folders.discard(d.folder)
            self.docs[d.id] = d
        return skipped

    def all_docs(self) -> dict[str, Doc]:
        """Every document the gateway serves: ingested ones and fronted ones."""
        return {**self.docs, **self.fronted}

    def front(self, doc: Doc, path: str | None) -> None:
        """A fronted document as upstream states it (its tuples come with a sync)."""
        parent: str | None = None
        parts = path.split("/") if path else []
        for depth in range(len(parts)):
            folder = "__".join(parts[: depth + 1])
            self.fronted_folders[folder] = (doc.source, parent)
            parent = folder
        self.fronted[doc.id] = replace(doc, folder=parent)

    def sync(self, doc_ids: Sequence[str]) -> None:
        """What a sync of these fronted documents leaves: exactly their upstream ACL."""
        for doc_id in doc_ids:
            obj = f"document:{doc_id}"
            acl = self.fronted[doc_id].acl
            self.grants = {g for g in self.grants if g[2] != obj} | acl.grants(doc_id)

    def forget(self, objects: set[str]) -> None:
        """Every tuple on these objects is gone: grants and the task scopes naming them."""
        self.grants = {g for g in self.grants if g[2] not in objects}
        for task in self.tasks:
            task.scope = tuple(s for s in task.scope if s not in objects)

    def delete_document(self, doc_id: str) -> None:
        self.docs.pop(doc_id)
        self.forget({f"document:{doc_id}"})

    def remove_source(self, source: str) -> None:
        docs = {d for d, doc in self.docs.items() if doc.source == source}
        folders = {f for f, s in self.folders.items() if s == source}
        self.forget(
            {f"source:{source}"}
            | {f"folder:{f}" for f in folders}
            | {f"document:{d}" for d in docs}
        )
        for d in docs:
            del self.docs[d]
        for f in folders:
            del self.folders[f]
            self.nesting.pop(f, None)
        self.sources.remove(source)
        self.removed_sources.add(source)
        self.freed_folders |= folders

    def deprovision(self, ref: str) -> None:
        self.deprovisioned[ref] = self.reach(ref)
        self.members.discard(ref)
        self.memberships = {m for m in self.memberships if m[0] != ref}
        self.grants = {g for g in self.grants if g[0] != ref}
        for task in self.tasks:
            if ref in (f"user:{task.user}", f"agent:{task.agent}"):
                task.revoked = True

    def public_tuples(self, obj: str) -> set[Grant]:
        """The tuples of the public vocabulary naming ``obj`` (what GET /v1/relationships
        lists): grants, parents, memberships."""
        kind, _, name = obj.partition(":")
        found = {g for g in self.grants if g[2] == obj}
        if kind == "document" and name in self.all_docs():
            doc = self.all_docs()[name]
            parent = f"folder:{doc.folder}" if doc.folder else f"source:{doc.source}"
            found.add((parent, "parent", obj))
        elif kind == "folder" and name in self.fronted_folders:
            source, up = self.fronted_folders[name]
            found.add((f"folder:{up}" if up else f"source:{source}", "parent", obj))
        elif kind == "folder" and name in self.folders:
            found.add((f"source:{self.folders[name]}", "parent", obj))
            if name in self.nesting:
                found.add((f"folder:{self.nesting[name]}", "parent", obj))
        elif kind == "group":
            found |= {(m, "member", obj) for m, g in self.memberships if g == name}
        elif kind == "tenant":
            found |= {(m, "member", obj) for m in self.members}
            found |= {(f"user:{ADMIN}", "member", obj), (f"user:{ADMIN}", "admin", obj)}
        return found

    def objects(self) -> list[str]:
        """Every object a world may name: the pools, the groups and the tenant."""
        return (
            [f"document:{d}" for d in DOC_POOL]
            + [f"folder:{f}" for f in FOLDER_POOL]
            + [f"source:{s}" for s in SOURCE_POOL]
            + [f"document:{d}" for d in sorted(self.fronted)]
            + [f"folder:{f}" for f in sorted(self.fronted_folders)]
            + [f"group:{g}" for g in self.groups]
            + [f"tenant:{self.name}"]
        )

    # -- the decision ------------------------------------------------------------------

    def group_members(self) -> dict[str, set[str]]:
        """group -> every user:/agent: reaching it, through nested groups."""
        closure: dict[str, set[str]] = {g: set() for g in self.groups}
        changed = True
        while changed:
            changed = False
            for member, group in self.memberships:
                if member.startswith("group:"):
                    reached = closure[member.removeprefix("group:").removesuffix("#member")]
                else:
                    reached = {member}
                if not reached <= closure[group]:
                    closure[group] |= reached
                    changed = True
        return closure

    def lineage(self, doc: Doc) -> set[str]:
        """The document, its folders up to the top, and its source (typed ids)."""
        chain = {f"document:{doc.id}", f"source:{doc.source}"}
        folder = doc.folder
        while folder is not None:
            chain.add(f"folder:{folder}")
            up = self.fronted_folders.get(folder)
            folder = up[1] if up is not None else self.nesting.get(folder)
        return chain

    def holds(self, who: str, subject: str, groups: dict[str, set[str]]) -> bool:
        if subject == who:
            return True
        if subject.startswith("group:"):
            return who in groups[subject.removeprefix("group:").removesuffix("#member")]
        return subject == self.everyone and who in self.members

    def can(self, who: str, relation: str, doc: Doc, groups: dict[str, set[str]]) -> bool:
        if relation == "viewer" and (who, "owner", f"document:{doc.id}") in self.grants:
            return True
        lineage = self.lineage(doc)
        return any(
            r == relation and o in lineage and self.holds(who, s, groups) for s, r, o in self.grants
        )

    def reach(self, ref: str) -> set[str]:
        """The documents a user (as viewer) or an agent (as agent_viewer) may read, any task."""
        relation = "viewer" if ref.startswith("user:") else "agent_viewer"
        groups = self.group_members()
        return {d for d, doc in self.all_docs().items() if self.can(ref, relation, doc, groups)}

    def permitted(self, user: str, agent: str, task: Task | None) -> set[str]:
        """The documents user+agent+task may read now (empty for any request-level failure)."""
        if task is None or task.revoked or task.expiry == "past":
            return set()
        if (task.user, task.agent) != (user, agent):
            return set()
        if f"user:{user}" not in self.members or f"agent:{agent}" not in self.members:
            return set()
        groups = self.group_members()
        return {
            doc.id
            for doc in self.all_docs().values()
            if set(task.scope) & self.lineage(doc)
            and self.can(f"user:{user}", "viewer", doc, groups)
            and self.can(f"agent:{agent}", "agent_viewer", doc, groups)
        }

    def audience(self) -> list[set[str]]:
        """What each task (by index) reads when presented by its own user and agent."""
        return [self.permitted(t.user, t.agent, t) for t in self.tasks]

    def chunks(self, documents: set[str], sources: Sequence[str] | None) -> list[Chunk]:
        """Every chunk of ``documents`` (inside ``sources``), distance not yet known."""
        found = []
        docs = self.all_docs()
        for doc_id in sorted(documents):
            doc = docs[doc_id]
            if sources is not None and doc.source not in sources:
                continue
            kind = FRONTED[doc.source][0] if doc_id in self.fronted else "managed"
            for i, text in enumerate(doc.texts(self.name)):
                chunk_id = fronted_chunk_id(kind, doc_id, i)
                found.append(Chunk(chunk_id, 0.0, text, doc.source, doc.metadata))
        return found


def ranking(chunks: list[Chunk], query: str) -> list[Chunk]:
    """``chunks`` with their exact cosine distance to ``query``, nearest first."""
    q = vector(query)
    ranked = []
    for c in chunks:
        v = vector(c.text)
        distance = 1.0 - float(q @ v) / float(np.linalg.norm(q) * np.linalg.norm(v))
        ranked.append(c._replace(distance=distance))
    return sorted(ranked, key=lambda c: (c.distance, c.id))


# -- planning one mutation --------------------------------------------------------------------


@dataclass
class Call:
    method: str
    path: str
    body: Any = None
    status: int = 200
    code: str | None = None  # the error code a refusal must carry


@dataclass
class Step:
    """One mutation: its calls (in order), their statuses and the state they leave."""

    kind: str
    what: str
    calls: list[Call]
    after: TenantState
    counts: list[str] = field(default_factory=list)  # tally keys, when it goes as planned
    skipped: int | None = None  # the ingestion answer's "skipped"
    queries: list[str] = field(default_factory=list)  # aimed at what the step changes
    fault: tuple[str, int] | None = None  # (how the OpenFGA write fails, writes let through)
    rivals: list[tuple[Call, TenantState]] = field(default_factory=list)  # a race: one wins
    new_task: bool = False  # the last task of ``after`` gets its id from the answer
    watch: list[int] = field(default_factory=list)  # tasks (by index) to probe first
    # Objects whose tuples are compared right after (a refusal must have written nothing,
    # a removal left nothing); every world compares them all at its end.
    named: list[str] = field(default_factory=list)


def plan(kind: str, state: TenantState, rng: random.Random) -> Step | None:
    """The step for mutation ``kind`` drawn by ``rng`` on ``state``; None when it cannot apply."""
    return PLANNERS[kind](state, rng)


def _refs(state: TenantState) -> list[str]:
    return [f"user:{u}" for u in state.users] + [f"agent:{a}" for a in state.agents]


def _fresh_ids(state: TenantState) -> list[str]:
    return [d for d in DOC_POOL if d not in state.docs]


def _fresh_folders(state: TenantState) -> list[str]:
    return [f for f in FOLDER_POOL if f not in state.folders]


def _own_folders(state: TenantState, source: str) -> list[str]:
    return sorted(f for f, s in state.folders.items() if s == source)


def _seeds(rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.randrange(10**6) for _ in range(rng.choice((1, 1, 2, 3))))


def _query(text: str) -> str:
    return " ".join(text.split()[:6])


def random_acl(state: TenantState, rng: random.Random) -> Acl:
    groups = [f"group:{g}#member" for g in state.groups]
    viewers_pool = [f"user:{u}" for u in state.users] + groups
    agents_pool = [f"agent:{a}" for a in state.agents] + groups
    viewers = set(rng.sample(viewers_pool, rng.randint(0, min(2, len(viewers_pool)))))
    agents = set(rng.sample(agents_pool, rng.randint(0, 1)))
    if rng.random() < state.openness:
        viewers.add(state.everyone)
    if rng.random() < state.openness:
        agents.add(state.everyone)
    owner = f"user:{rng.choice(state.users)}" if rng.random() < 0.25 else None
    return Acl(tuple(sorted(viewers)), tuple(sorted(agents)), owner)


def open_acl(state: TenantState) -> Acl:
    return Acl((state.everyone,), (state.everyone,))


def draw_fronted(state: TenantState, rng: random.Random) -> list[tuple[Doc, str | None]]:
    """What the platform team's pipelines wrote: documents with a path and an ACL."""
    found = []
    for source, (_, ids, paths) in FRONTED.items():
        for doc_id in sorted(rng.sample(ids, rng.randint(2, len(ids)))):
            doc = Doc(doc_id, source, None, _seeds(rng), random_acl(state, rng))
            found.append((doc, rng.choice([None, *paths])))
    return found


def upstream_changes(state: TenantState, rng: random.Random) -> list[Doc]:
    """One or two documents per fronted collection get a new ACL upstream."""
    changed = []
    for source in FRONTED:
        ids = sorted(d for d, doc in state.fronted.items() if doc.source == source)
        for doc_id in rng.sample(ids, min(len(ids), rng.randint(1, 2))):
            old = state.fronted[doc_id]
            acl = random_acl(state, rng)
            if acl == old.acl:
                acl = Acl() if old.acl != Acl() else open_acl(state)
            changed.append(replace(old, acl=acl))
    return changed


def _ingest_call(state: TenantState, source: str, docs: Sequence[Doc]) -> Call:
    body = {"documents": [d.body(state.name) for d in docs]}
    return Call("POST", f"/v1/sources/{source}/documents", body)


def _relationships(
    writes: Sequence[Grant] = (), deletes: Sequence[Grant] = (), status: int = 200
) -> Call:
    def rel(g: Grant) -> dict[str, str]:
        return {"user": g[0], "relation": g[1], "object": g[2]}

    body = {"writes": [rel(g) for g in writes], "deletes": [rel(g) for g in deletes]}
    return Call("POST", "/v1/relationships", body, status, "conflict" if status == 409 else None)


def _changed(before: TenantState, after: TenantState) -> tuple[bool, bool]:
    """(some task lost a document, some task gained one) between the two states."""
    pairs = list(zip(before.audience(), after.audience(), strict=False))
    return any(b - a for b, a in pairs), any(a - b for b, a in pairs)


def ingest_step(state: TenantState, source: str, docs: Sequence[Doc], kind: str, what: str) -> Step:
    """An ingestion batch as the oracle predicts it: 409 and nothing, or applied."""
    call = _ingest_call(state, source, docs)
    after = state.copy()
    refused = state.conflict(source, docs)
    if refused:
        call.status, call.code = 409, "conflict"
        counts = ["collision_refused", f"collision_refused:{refused.split()[0]}"]
        if _changed(state, _as_if_accepted(state, source, docs))[1]:
            counts.append("collision_refused:would_leak")
        step = Step(kind, f"{what}: 409 ({refused})", [call], after, counts)
        step.named = _named(docs)
        return step
    skipped = after.ingest(source, docs)
    queries = [_query(d.texts(state.name)[0]) for d in docs]
    return Step(kind, what, [call], after, ["ingest"], skipped=skipped, queries=queries)


def _named(docs: Sequence[Doc]) -> list[str]:
    """The documents and folders a batch names."""
    return [f"document:{d.id}" for d in docs] + [f"folder:{d.folder}" for d in docs if d.folder]


def _as_if_accepted(state: TenantState, source: str, docs: Sequence[Doc]) -> TenantState:
    """Roughly what a gateway that let the batch through would serve: another source's
    folder (with its documents) or document moved under ``source``."""
    trial = state.copy()
    for d in docs:
        if d.folder is not None and state.folders.get(d.folder, source) != source:
            trial.folders[d.folder] = source
            for doc_id, doc in state.docs.items():
                if doc.folder == d.folder:
                    trial.docs[doc_id] = replace(doc, source=source)
    trial.ingest(source, docs)
    return trial


def plan_ingest(state: TenantState, rng: random.Random) -> Step | None:
    """A batch with names drawn from the pools, whichever source owns them."""
    if not state.sources:
        return None
    source = rng.choice(state.sources)
    docs = [
        Doc(d, source, rng.choice([None, *FOLDER_POOL]), _seeds(rng), random_acl(state, rng))
        for d in rng.sample(DOC_POOL, rng.randint(1, 3))
    ]
    names = [(d.id, d.folder) for d in docs]
    return ingest_step(state, source, docs, "ingest", f"ingest into {source} {names}")


def plan_collide(state: TenantState, rng: random.Random) -> Step | None:
    """Deliberately name, in one source, a folder or document id another source owns."""
    owned = [("folder", f, s) for f, s in sorted(state.folders.items())]
    owned += [("document", d, doc.source) for d, doc in sorted(state.docs.items())]
    owned = [o for o in owned if any(s != o[2] for s in state.sources)]
    if not owned:
        return None
    kind = rng.choice(sorted({o[0] for o in owned}))  # folder or document, evenly
    what, name, owner = rng.choice([o for o in owned if o[0] == kind])
    source = rng.choice([s for s in state.sources if s != owner])
    own_ids = sorted(d for d, doc in state.docs.items() if doc.source == source)
    if what == "document":
        folder = rng.choice([None, *_own_folders(state, source)])
        bad = Doc(name, source, folder, _seeds(rng), open_acl(state))
    else:
        ids = _fresh_ids(state) + own_ids
        if not ids:
            return None
        bad = Doc(rng.choice(ids), source, name, _seeds(rng), open_acl(state))
    # Innocent documents around it: written, they would show (the batch is all or nothing).
    innocent: list[Doc] = []
    spare = [d for d in _fresh_ids(state) + own_ids if d != bad.id]
    for doc_id in rng.sample(spare, min(len(spare), rng.randint(0, 2))):
        folder = state.docs[doc_id].folder if doc_id in state.docs else None
        innocent.append(Doc(doc_id, source, folder, _seeds(rng), open_acl(state)))
    docs = [*innocent]
    docs.insert(rng.randint(0, len(docs)), bad)
    step = ingest_step(
        state, source, docs, "collide", f"{source} names {what} {name} of {owner} ({bad.id})"
    )
    assert step.calls[0].status == 409
    return step


def plan_reparent(state: TenantState, rng: random.Random) -> Step | None:
    """An admin ``parent`` write that would move another source's folder or document: 409."""
    victims = [(f"folder:{f}", s) for f, s in sorted(state.folders.items())]
    victims += [(f"document:{d}", doc.source) for d, doc in sorted(state.docs.items())]
    victims = [v for v in victims if any(s != v[1] for s in state.sources)]
    if not victims:
        return None
    victim, owner = rng.choice(victims)
    other = rng.choice([s for s in state.sources if s != owner])
    parents = [f"source:{other}"] + [f"folder:{f}" for f in _own_folders(state, other)]
    bad = (rng.choice(parents), "parent", victim)
    writes = [bad]
    if rng.random() < 0.5:  # a legitimate write in the same request is refused with it
        legit = _new_grant(state, rng)
        if legit is not None:
            writes.insert(rng.randint(0, 1), legit)
    step = Step(
        "reparent",
        f"parent {bad} (owned by {owner}) with {writes}: 409",
        [_relationships(writes, status=409)],
        state.copy(),
        ["reparent_refused"],
    )
    step.named = sorted({g[2] for g in writes})
    return step


def plan_nest(state: TenantState, rng: random.Random) -> Step | None:
    """Folder inside folder, both of one source: allowed."""

    def ancestors(f: str) -> set[str]:
        found = {f}
        while f in state.nesting:
            f = state.nesting[f]
            found.add(f)
        return found

    pairs = [
        (p, c)
        for c, sc in sorted(state.folders.items())
        if c not in state.nesting
        for p, sp in sorted(state.folders.items())
        if sp == sc and c not in ancestors(p)
    ]
    if not pairs:
        return None
    parent, child = rng.choice(pairs)
    after = state.copy()
    after.nesting[child] = parent
    call = _relationships([(f"folder:{parent}", "parent", f"folder:{child}")])
    return Step("nest", f"nest folder {child} in {parent}", [call], after, ["nest"])


def _reingest(state: TenantState, rng: random.Random, doc: Doc, acl: Acl, text_p: float) -> Doc:
    seeds = _seeds(rng) if rng.random() < text_p else doc.seeds
    rev = doc.rev + 1 if rng.random() < 0.5 else doc.rev
    return replace(doc, seeds=seeds, acl=acl, rev=rev)


def _narrowed(state: TenantState, rng: random.Random, doc: Doc) -> Acl | None:
    """The ACL less some entries (sometimes all of them; every member most often)."""
    entries = state.current_acl(doc.id).entries()
    if not entries:
        return None
    if rng.random() < 0.25:
        return Acl()
    dropped = {e for e in entries if e[1] == state.everyone and rng.random() < 0.7}
    dropped |= set(rng.sample(entries, rng.randint(0 if dropped else 1, len(entries))))
    return Acl.of([e for e in entries if e not in dropped])


def _widened(state: TenantState, rng: random.Random, doc: Doc) -> Acl | None:
    """The ACL plus a reader: a viewer and an agent entry (maybe there already) - every
    member, or the user and agent of a task that has the document in scope."""
    entries = state.current_acl(doc.id).entries()
    pairs = [(state.everyone, state.everyone)]
    pairs += [
        (f"user:{t.user}", f"agent:{t.agent}")
        for t in state.tasks
        if not t.revoked and set(t.scope) & state.lineage(doc)
    ]
    groups = [f"group:{g}#member" for g in state.groups]
    pairs += [(rng.choice([*groups, state.everyone]), rng.choice([*groups, state.everyone]))]
    viewer, agent = rng.choice(pairs)
    added = {("viewers", viewer), ("agents", agent)} - set(entries)
    return Acl.of(entries + sorted(added)) if added else None


def _reingest_step(
    state: TenantState, kind: str, old: list[Doc], new: list[Doc], what: str
) -> Step:
    step = ingest_step(state, new[0].source, new, kind, what)
    assert step.calls[0].status == 200
    step.queries = [_query(d.texts(state.name)[0]) for d in [*old, *new]]
    lost, gained = _changed(state, step.after)
    step.counts = [kind] + [f"{kind}:lost_reader"] * lost + [f"{kind}:new_reader"] * gained
    step.counts += ["reingest:lost_reader"] * lost + ["reingest:new_reader"] * gained
    if any(a.seeds != b.seeds for a, b in zip(old, new, strict=False)):
        step.counts.append(f"{kind}:new_text")
    return step


def _prefer(steps: list[Step], key: str, rng: random.Random, p: float = 0.8) -> Step | None:
    """One of ``steps``, most often one that exercises ``key``."""
    good = [s for s in steps if key in s.counts]
    return rng.choice(good if good and rng.random() < p else steps) if steps else None


def _reingests(
    state: TenantState,
    rng: random.Random,
    kind: str,
    change: Callable[[TenantState, random.Random, Doc], Acl | None],
) -> list[Step]:
    """Candidate re-ingestions of each document (three draws each) with ``change``d ACLs."""
    steps = []
    for doc in sorted(state.docs.values(), key=lambda d: d.id):
        for _ in range(3):
            acl = change(state, rng, doc)
            if acl is not None:
                new = _reingest(state, rng, doc, acl, 0.75)
                steps.append(_reingest_step(state, kind, [doc], [new], f"{kind} {doc.id}: {acl}"))
    return steps


def plan_reingest_narrow(state: TenantState, rng: random.Random) -> Step | None:
    """New text (mostly) under a narrower ACL; preferably one that drops a reader."""
    return _prefer(_reingests(state, rng, "narrow", _narrowed), "narrow:lost_reader", rng)


def plan_reingest_widen(state: TenantState, rng: random.Random) -> Step | None:
    """New text (mostly) under a wider ACL; preferably one that lets a reader in."""
    return _prefer(_reingests(state, rng, "widen", _widened), "widen:new_reader", rng)


def plan_reingest_same(state: TenantState, rng: random.Random) -> Step | None:
    docs = [d for _, d in sorted(state.docs.items()) if state.in_sync(d)]
    if not docs:
        return None
    doc = rng.choice(docs)
    step = ingest_step(state, doc.source, [doc], "same", f"re-ingest {doc.id} unchanged")
    assert step.skipped == 1
    step.counts = ["reingest_skipped"]
    return step


def plan_reingest_move(state: TenantState, rng: random.Random) -> Step | None:
    if not state.docs:
        return None
    doc = state.docs[rng.choice(sorted(state.docs))]
    places = [None, *_own_folders(state, doc.source), *_fresh_folders(state)]
    places = [p for p in places if p != doc.folder]
    if not places:
        return None
    new = _reingest(state, rng, doc, state.current_acl(doc.id), 0.5)
    new = replace(new, folder=rng.choice(places))
    return _reingest_step(state, "move", [doc], [new], f"move {doc.id} to folder {new.folder}")


def plan_faulted_ingest(state: TenantState, rng: random.Random) -> Step | None:
    """A valid re-ingestion whose OpenFGA writes fail part way (then rerun without fault);
    preferably one that takes a reader away, where a half-done update would show."""
    steps = []
    for doc in sorted(state.docs.values(), key=lambda d: d.id):
        for change in (_narrowed, _narrowed, _widened):
            acl = change(state, rng, doc)
            if acl is not None:
                steps.append(_faulted(state, rng, doc, _reingest(state, rng, doc, acl, 0.9)))
    if not steps and state.sources and _fresh_ids(state):
        doc = Doc(_fresh_ids(state)[0], rng.choice(state.sources), None, (), Acl())
        steps.append(_faulted(state, rng, None, doc))
    step = _prefer(steps, "faulted:lost_reader", rng, 0.8)
    if step is None:
        return None
    step.fault = (rng.choice(("refused", "reset", "answer_lost")), rng.choice((0, 0, 1)))
    step.what += f", OpenFGA write {step.fault[0]} after {step.fault[1]}"
    step.counts = [c.replace("faulted", "faulted_ingest") for c in step.counts]
    return step


def _faulted(state: TenantState, rng: random.Random, old: Doc | None, new: Doc) -> Step:
    """``new`` (re-ingesting ``old``), sometimes with a new document in the same batch."""
    docs = [new] if old is not None else []
    fresh = [d for d in _fresh_ids(state) if d != new.id]
    if fresh and (not docs or rng.random() < 0.3):
        folder = rng.choice([None, *_own_folders(state, new.source)])
        docs.append(Doc(rng.choice(fresh), new.source, folder, _seeds(rng), random_acl(state, rng)))
    olds = [old] if old is not None else []
    return _reingest_step(
        state, "faulted", olds, docs, f"{new.source} ingest {[d.id for d in docs]}"
    )


def plan_bulk(state: TenantState, rng: random.Random) -> Step | None:
    """Every document of a source and fresh ones (up to eight) in one request, many with
    every principal in their ACL: more tuples than one OpenFGA transaction holds, so the
    writes are split; half the time one of those transactions fails (then a rerun)."""
    if not state.sources:
        return None
    source = rng.choice(state.sources)
    own = [d for _, d in sorted(state.docs.items()) if d.source == source]
    fresh = _fresh_ids(state)
    fresh = rng.sample(fresh, min(len(fresh), max(0, 8 - len(own))))
    everyone = _widest_acl(state)
    folders = [None, *_own_folders(state, source)]
    docs = [
        _reingest(state, rng, d, everyone if rng.random() < 0.7 else random_acl(state, rng), 0.7)
        for d in own
    ]
    docs += [
        Doc(i, source, rng.choice(folders), _seeds(rng), everyone if rng.random() < 0.7 else Acl())
        for i in fresh
    ]
    if not docs:
        return None
    step = _reingest_step(state, "bulk", own, docs, f"{source} bulk ingest of {len(docs)}")
    tuples = sum(len(d.acl.grants(d.id)) + 2 for d in docs)  # grants, parent, stamp
    step.counts += ["bulk:split"] * (tuples > 100)
    if rng.random() < 0.5:
        step.fault = (rng.choice(("refused", "reset", "answer_lost")), rng.choice((0, 1, 2, 3)))
        step.what += f", OpenFGA write {step.fault[0]} after {step.fault[1]}"
        step.counts.append("bulk:faulted")
    return step


def _widest_acl(state: TenantState) -> Acl:
    groups = [f"group:{g}#member" for g in state.groups]
    return Acl(
        tuple(sorted([state.everyone, *groups, *(f"user:{u}" for u in state.users)])),
        tuple(sorted([state.everyone, *groups, *(f"agent:{a}" for a in state.agents)])),
        f"user:{state.users[0]}",
    )


def plan_deprovision(state: TenantState, rng: random.Random) -> Step | None:
    """DELETE /v1/principals: every relation of the principal, and its tasks, are gone."""
    refs = [
        r
        for r in _refs(state)
        if r in state.members
        or any(m[0] == r for m in state.memberships)
        or any(g[0] == r for g in state.grants)
    ]
    if not refs:
        return None
    readers = [r for r in refs if _reads_something(state, r)]
    ref = rng.choice(readers if readers and rng.random() < 0.6 else refs)
    after = state.copy()
    after.deprovision(ref)
    counts = ["deprovision"] + ["deprovision:had_reads"] * _reads_something(state, ref)
    call = Call("DELETE", f"/v1/principals/{ref}")
    step = Step("deprovision", f"deprovision {ref}", [call], after, counts)
    step.watch = _tasks_of(state, ref)
    step.named = [f"tenant:{state.name}"] + [f"group:{g}" for m, g in state.memberships if m == ref]
    step.named += [g[2] for g in state.grants if g[0] == ref]
    return step


def _tasks_of(state: TenantState, ref: str) -> list[int]:
    return [i for i, t in enumerate(state.tasks) if ref in (f"user:{t.user}", f"agent:{t.agent}")]


def _reads_something(state: TenantState, ref: str) -> bool:
    return any(reads for i, reads in enumerate(state.audience()) if i in _tasks_of(state, ref))


def plan_readd(state: TenantState, rng: random.Random) -> Step | None:
    """Re-add a removed principal as a member: nothing else of theirs comes back.

    Mostly with a new task over the sources where they read before (with the partner
    that reads most there): it must read only what members and new grants allow.
    """
    gone = [r for r in _refs(state) if r not in state.members]
    if not gone:
        return None
    preferred = [r for r in gone if r in state.deprovisioned]
    ref = rng.choice(preferred if preferred and rng.random() < 0.8 else gone)
    after = state.copy()
    after.members.add(ref)
    counts = ["readd"] + ["readd:after_deprovision"] * (ref in state.deprovisioned)
    calls = [_relationships([(ref, "member", f"tenant:{state.name}")])]
    step = Step("readd", f"re-add {ref} as a member", calls, after, counts)
    step.watch = _tasks_of(state, ref)
    step.named = [f"group:{g}" for g in state.groups]  # no membership of theirs is back
    former = {state.docs[d].source for d in state.deprovisioned.get(ref, ()) if d in state.docs}
    if rng.random() < 0.8 and state.sources:
        task = _task_for(after, ref, sorted(former) or [rng.choice(state.sources)], rng)
        if task is not None:
            after.tasks.append(task)
            calls.append(Call("POST", "/v1/tasks", task.body(datetime.now(UTC)), 201))
            step.new_task = True
            step.what += f", new task {task.user}/{task.agent} on {task.scope}"
            step.counts += ["readd:new_task_where_it_read"] * bool(former)
    return step


def _task_for(state: TenantState, ref: str, sources: list[str], rng: random.Random) -> Task | None:
    """A task of ``ref`` over ``sources`` with the member partner that reads most there."""
    kind, _, name = ref.partition(":")
    partners = [p for p in _refs(state) if p in state.members and not p.startswith(f"{kind}:")]
    if not partners:
        return None
    in_scope = {d for d, doc in state.docs.items() if doc.source in sources}
    partner = max(rng.sample(partners, len(partners)), key=lambda p: len(state.reach(p) & in_scope))
    other = partner.partition(":")[2]
    user, agent = (name, other) if kind == "user" else (other, name)
    return Task(user, agent, tuple(f"source:{s}" for s in sources[:2]), "none")


def plan_suspend(state: TenantState, rng: random.Random) -> Step | None:
    """Only the membership tuple goes (its groups, grants and tasks stay, unusable)."""
    if not state.members:
        return None
    ref = rng.choice(sorted(state.members))
    after = state.copy()
    after.members.discard(ref)
    call = _relationships(deletes=[(ref, "member", f"tenant:{state.name}")])
    return Step("suspend", f"delete membership of {ref}", [call], after, ["suspend"])


def plan_remove_source(state: TenantState, rng: random.Random) -> Step | None:
    """Remove a source (preferably one somebody reads); its names become free."""
    if len(state.sources) < 2:
        return None
    steps = [_remove_source(state, source) for source in state.sources]
    return _prefer(steps, "remove_source:lost_reader", rng, 0.7)


def _remove_source(state: TenantState, source: str) -> Step:
    after = state.copy()
    after.remove_source(source)
    lost, _ = _changed(state, after)
    counts = ["remove_source"] + ["remove_source:lost_reader"] * lost
    counts += ["remove_source:freed_folder"] * bool(_own_folders(state, source))
    doc = Doc(DOC_POOL[0], source, None, (1,), Acl())
    calls = [
        Call("DELETE", f"/v1/sources/{source}", status=204),
        Call("GET", f"/v1/sources/{source}", status=404, code="not_found"),
        Call(
            "POST",
            f"/v1/sources/{source}/documents",
            {"documents": [doc.body(state.name)]},
            404,
            "not_found",
        ),
    ]
    queries = [_query(d.texts(state.name)[0]) for d in state.docs.values() if d.source == source]
    step = Step("remove_source", f"remove source {source}", calls, after, counts)
    step.queries = queries[:3]
    step.named = [f"source:{source}"] + [f"folder:{f}" for f in _own_folders(state, source)]
    step.named += [f"document:{d}" for d, doc in state.docs.items() if doc.source == source]
    return step


def plan_add_source(state: TenantState, rng: random.Random) -> Step | None:
    """Register a source (maybe a removed one's name) and ingest into it, freed names first."""
    free = [s for s in SOURCE_POOL if s not in state.sources]
    if not free:
        return None
    reused = [s for s in free if s in state.removed_sources]
    source = rng.choice(reused if reused and rng.random() < 0.8 else free)
    after = state.copy()
    after.sources.append(source)
    calls = [Call("POST", "/v1/sources", {"id": source, "kind": "chroma"}, 201)]
    grants = [
        (after.everyone, relation, f"source:{source}")
        for relation in ("viewer", "agent_viewer")
        if rng.random() < state.openness
    ]
    if grants:
        calls.append(_relationships(grants))
        after.grants |= set(grants)
    counts = ["add_source"] + ["add_source:reused_name"] * (source in state.removed_sources)
    folders = sorted(after.freed_folders) or [None, *FOLDER_POOL]
    ids = _fresh_ids(after) or list(DOC_POOL)
    docs = [
        Doc(d, source, rng.choice(folders), _seeds(rng), random_acl(after, rng))
        for d in rng.sample(ids, min(len(ids), rng.randint(1, 2)))
    ]
    if any(d.folder in state.freed_folders for d in docs) and not after.conflict(source, docs):
        counts.append("add_source:reused_freed_folder")
    ingest = ingest_step(after, source, docs, "add_source", "")
    calls += ingest.calls
    counts += ingest.counts
    step = Step(
        "add_source", f"add source {source}, {ingest.what or 'ingest'}", calls, ingest.after
    )
    step.counts, step.queries = counts, ingest.queries
    step.named = ingest.named
    return step


def plan_new_task(state: TenantState, rng: random.Random) -> Step | None:
    users = [u for u in state.users if f"user:{u}" in state.members]
    agents = [a for a in state.agents if f"agent:{a}" in state.members]
    if not users or not agents:
        return None
    objects = [f"source:{s}" for s in state.sources] * 3
    objects += [f"folder:{f}" for f in sorted(state.folders)]
    objects += [f"document:{d}" for d in sorted(state.docs)]
    scope = tuple(dict.fromkeys(rng.choices(objects, k=rng.randint(1, 2))))
    task = Task(rng.choice(users), rng.choice(agents), scope, rng.choice(("none", "future")))
    after = state.copy()
    after.tasks.append(task)
    step = Step("new_task", f"task for {task.user}/{task.agent} on {scope}", [], after)
    step.calls = [Call("POST", "/v1/tasks", task.body(datetime.now(UTC)), 201)]
    step.new_task, step.counts = True, ["new_task"]
    return step


def plan_revoke_task(state: TenantState, rng: random.Random) -> Step | None:
    live = [i for i, t in enumerate(state.tasks) if not t.revoked]
    if not live:
        return None
    i = rng.choice(live)
    after = state.copy()
    after.tasks[i].revoked = True
    call = Call("DELETE", f"/v1/tasks/{state.tasks[i].id}", status=204)
    return Step("revoke_task", f"revoke task {i}", [call], after, ["revoke_task"])


def plan_revoke_grant(state: TenantState, rng: random.Random) -> Step | None:
    if not state.grants:
        return None
    grant = rng.choice(sorted(state.grants))
    after = state.copy()
    after.grants.discard(grant)
    step = Step("revoke_grant", f"revoke {grant}", [_relationships(deletes=[grant])], after)
    step.counts = ["revoke_grant"]
    return step


def _new_grant(state: TenantState, rng: random.Random) -> Grant | None:
    objects = [f"document:{d}" for d in sorted(state.docs)]
    objects += [f"folder:{f}" for f in sorted(state.folders)]
    objects += [f"source:{s}" for s in state.sources]
    if not objects:
        return None
    relation = rng.choice(["viewer", "agent_viewer"])
    pool = [f"user:{u}" for u in state.users] if relation == "viewer" else []
    pool += [f"agent:{a}" for a in state.agents] if relation == "agent_viewer" else []
    grant = (rng.choice([*pool, state.everyone]), relation, rng.choice(objects))
    return None if grant in state.grants else grant


def plan_add_grant(state: TenantState, rng: random.Random) -> Step | None:
    grant = _new_grant(state, rng)
    if grant is None:
        return None
    after = state.copy()
    after.grants.add(grant)
    return Step("add_grant", f"grant {grant}", [_relationships([grant])], after, ["add_grant"])


def plan_leave_group(state: TenantState, rng: random.Random) -> Step | None:
    if not state.memberships:
        return None
    member, group = rng.choice(sorted(state.memberships))
    after = state.copy()
    after.memberships.discard((member, group))
    call = _relationships(deletes=[(member, "member", f"group:{group}")])
    return Step("leave_group", f"{member} leaves {group}", [call], after, ["leave_group"])


def plan_delete_document(state: TenantState, rng: random.Random) -> Step | None:
    if not state.docs:
        return None
    doc = state.docs[rng.choice(sorted(state.docs))]
    after = state.copy()
    after.delete_document(doc.id)
    call = Call("DELETE", f"/v1/sources/{doc.source}/documents/{doc.id}", status=204)
    step = Step("delete_document", f"delete {doc.id} of {doc.source}", [call], after)
    step.counts, step.queries = ["delete_document"], [_query(doc.texts(state.name)[0])]
    return step


def plan_race(state: TenantState, rng: random.Random) -> Step | None:
    """Two sources claim one free folder name or document id at once: exactly one wins."""
    if len(state.sources) < 2:
        return None
    a, b = rng.sample(state.sources, 2)
    fresh_ids, fresh_folders = _fresh_ids(state), _fresh_folders(state)
    if fresh_folders and len(fresh_ids) >= 2 and rng.random() < 0.5:
        folder = rng.choice(fresh_folders)
        ids = rng.sample(fresh_ids, 2)
        docs = [
            Doc(i, s, folder, _seeds(rng), open_acl(state))
            for i, s in zip(ids, (a, b), strict=True)
        ]
        what = f"folder {folder}"
    elif fresh_ids:
        doc_id = rng.choice(fresh_ids)
        docs = [Doc(doc_id, s, None, _seeds(rng), open_acl(state)) for s in (a, b)]
        what = f"document {doc_id}"
    else:
        return None
    rivals = []
    for doc in docs:
        after = state.copy()
        after.ingest(doc.source, [doc])
        rivals.append((_ingest_call(state, doc.source, [doc]), after))
    step = Step("race", f"{a} and {b} both claim {what}", [], state.copy(), ["race"])
    step.rivals = rivals
    step.queries = [_query(d.texts(state.name)[0]) for d in docs]
    step.named = _named(docs)
    return step


PLANNERS: dict[str, Callable[[TenantState, random.Random], Step | None]] = {
    "ingest": plan_ingest,
    "collide": plan_collide,
    "reparent": plan_reparent,
    "nest": plan_nest,
    "narrow": plan_reingest_narrow,
    "widen": plan_reingest_widen,
    "same": plan_reingest_same,
    "move": plan_reingest_move,
    "faulted_ingest": plan_faulted_ingest,
    "bulk": plan_bulk,
    "deprovision": plan_deprovision,
    "readd": plan_readd,
    "suspend": plan_suspend,
    "remove_source": plan_remove_source,
    "add_source": plan_add_source,
    "new_task": plan_new_task,
    "revoke_task": plan_revoke_task,
    "revoke_grant": plan_revoke_grant,
    "add_grant": plan_add_grant,
    "leave_group": plan_leave_group,
    "delete_document": plan_delete_document,
    "race": plan_race,
}

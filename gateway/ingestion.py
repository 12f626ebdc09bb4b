"""Ingestion: documents into a store and their tuples into OpenFGA, never out of step.

The invariants (DESIGN §4, THREATS "Re-ingestion"):

- Every name is claimed for the source in the catalog before anything is written
  (:meth:`SourceCatalog.claim`: all or nothing, 409 for another source's folder or
  document), and the claim's lease keeps two requests off one document.
- A document is visible only while its tenant stamp (``tenant:T tenant document:T/d``)
  exists; every conjunct needs it. The stamp is written last, in the last transaction.
- New text replaces old text only while the document is hidden: the stamp and every
  narrowed grant are deleted first, the store is rewritten, the new grants are written,
  and only then the stamp. A failure anywhere leaves the old text under the old (or a
  narrower) ACL, or the document hidden; a rerun repairs it, since the catalog records
  the fingerprint only once everything landed.
- An ACL-only change writes its deletes before its writes (narrowing first).
- A document whose content and ACL fingerprints are unchanged is skipped, not re-embedded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.embeddings import Embeddings

from connectors.base import ChunkRecord, VectorStore
from connectors.chunking import chunk_document
from gateway.catalog import Claim, SourceCatalog
from gateway.errors import InvalidRequest
from gateway.fga import FgaClient, Tuple
from gateway.ids import fga_object, validate_id
from gateway.relationships import document_tuples

#: Chunk metadata key holding the content version (the document's content fingerprint)
#: the chunk was written with; never shown to agents (gateway.packing strips it).
VERSION_KEY = "scopegate_version"
#: The denial of a document whose text changed while a request was deciding on it.
CONTENT_CHANGED = "content_changed"

#: Relations ingestion owns on a document; task scopes naming it belong to their tasks.
INGESTION_RELATIONS = frozenset({"tenant", "parent", "owner", "viewer", "agent_viewer"})
READ_PARALLEL = 16


@dataclass(frozen=True, slots=True)
class PreparedDocument:
    """One validated document of an ingestion request, with the tuples it should have."""

    id: str
    text: str
    folder: str | None
    metadata: dict[str, str | int | float | bool]
    acl: dict[str, Any]
    stamp: Tuple
    document_side: list[Tuple]
    folder_side: list[Tuple]
    content_fp: str
    acl_fp: str

    @property
    def fingerprint(self) -> str:
        return f"{self.content_fp}:{self.acl_fp}"

    @property
    def wanted(self) -> list[Tuple]:
        return self.folder_side + self.document_side


@dataclass(slots=True)
class IngestReport:
    documents: int = 0
    chunks: int = 0
    skipped: int = 0
    writes: list[Tuple] = field(default_factory=list)
    deletes: list[Tuple] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {"documents": self.documents, "chunks": self.chunks, "skipped": self.skipped}


def prepare(
    tenant: str, source: str, documents: Sequence[Mapping[str, Any]]
) -> list[PreparedDocument]:
    """Validate a whole request before anything is written (422 on the first bad one)."""
    prepared: list[PreparedDocument] = []
    seen: set[str] = set()
    for doc in documents:
        document_id = validate_id(doc.get("id"), "document id")
        if document_id in seen:
            raise InvalidRequest(f"document {document_id} appears twice in one request")
        seen.add(document_id)
        prepared.append(_prepare_one(tenant, source, document_id, doc))
    return prepared


def _prepare_one(
    tenant: str, source: str, document_id: str, doc: Mapping[str, Any]
) -> PreparedDocument:
    text = doc.get("text")
    if not isinstance(text, str):
        raise InvalidRequest(f"document {document_id}: text must be a string")
    acl = doc.get("acl") or {}
    if not isinstance(acl, Mapping):
        raise InvalidRequest("acl must be an object")
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise InvalidRequest("metadata must be an object")
    folder = doc.get("folder")
    if folder is not None:
        folder = validate_id(folder, "folder")
    wanted = document_tuples(tenant, source, document_id, folder, acl)
    document = fga_object("document", tenant, document_id)
    stamp = Tuple(fga_object("tenant", tenant, tenant), "tenant", document)
    clean = {str(k): v for k, v in metadata.items() if isinstance(v, str | int | float | bool)}
    canonical_acl = {
        "viewers": sorted({str(v) for v in acl.get("viewers") or []}),
        "agents": sorted({str(a) for a in acl.get("agents") or []}),
        "owner": acl.get("owner"),
    }
    return PreparedDocument(
        id=document_id,
        text=text,
        folder=folder,
        metadata=clean,
        acl=canonical_acl,
        stamp=stamp,
        document_side=[t for t in wanted if t.object == document and t != stamp],
        folder_side=[t for t in wanted if t.object != document],
        content_fp=_digest({"text": text, "metadata": clean}),
        acl_fp=_digest({"acl": canonical_acl, "folder": folder}),
    )


def _digest(value: object) -> str:
    raw = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:32]


class Ingestor:
    """Applies prepared documents under a claim (see the module docstring)."""

    def __init__(self, fga: FgaClient, catalog: SourceCatalog, embeddings: Embeddings) -> None:
        self.fga = fga
        self.catalog = catalog
        self.embeddings = embeddings

    async def apply(
        self,
        claim: Claim,
        store: VectorStore,
        prepared: Sequence[PreparedDocument],
        progress: Callable[[int], object] | None = None,
    ) -> IngestReport:
        """Apply the changed documents of one request together, in phases.

        Batching across documents keeps every per-document invariant: each document
        is hidden (stamp and narrowed grants deleted, in the first transactions) before
        its chunks are rewritten; its grants are written before its stamp (every stamp
        of the request goes after every grant); its fingerprint is recorded last. A
        failure between phases leaves documents hidden or narrowed, and a rerun repairs
        them, since none of them has its fingerprint yet.
        """
        report = IngestReport(documents=len(prepared))
        changed = [d for d in prepared if claim.documents[d.id].fingerprint != d.fingerprint]
        report.skipped = len(prepared) - len(changed)
        unchanged = {d.id for d in prepared} - {d.id for d in changed}
        report.chunks = sum(claim.documents[i].chunks for i in unchanged)
        if progress is not None and report.skipped:
            progress(report.skipped)
        if not changed:
            return report
        recontent = [d for d in changed if _content_changed(claim, d)]
        records = await self._embed(claim.tenant, claim.source, recontent)
        current = await self._current(changed)
        plans = [_plan(doc, current[doc.id], doc.id in records) for doc in changed]
        tenant = claim.tenant
        await self.catalog.start_updates(tenant, [d.id for d in changed])
        hide = list(dict.fromkeys(t for plan in plans for t in plan.hide))
        if hide:
            await self.fga.write(deletes=hide)
        await store.delete_documents(tenant, claim.source, [doc.id for doc in recontent])
        chunks = [c for doc in recontent for c in records[doc.id]]
        if chunks:
            await store.upsert(tenant, claim.source, chunks)
        # Documents of one folder share its tuples: OpenFGA refuses a duplicate in one request.
        grants = list(dict.fromkeys(t for plan in plans for t in plan.writes))
        stamps = [plan.stamp for plan in plans if plan.stamp is not None]
        # FgaClient.write keeps the order: every stamp lands after every grant.
        narrow = list(dict.fromkeys(t for plan in plans for t in plan.narrow))
        await self.fga.write([*grants, *stamps], narrow)
        entries = []
        for doc, plan in zip(changed, plans, strict=True):
            count = len(records[doc.id]) if doc.id in records else claim.documents[doc.id].chunks
            report.chunks += count
            report.writes += plan.writes + ([plan.stamp] if plan.stamp is not None else [])
            report.deletes += plan.narrowed
            entries.append((doc.id, count, doc.fingerprint, doc.folder, doc.acl))
        await self.catalog.complete_documents(tenant, entries)
        if progress is not None:
            progress(len(changed))
        return report

    async def _current(self, docs: Sequence[PreparedDocument]) -> dict[str, set[Tuple]]:
        """The ingestion tuples each document has now (reads in parallel, 16 at a time)."""
        found: dict[str, set[Tuple]] = {}
        for start in range(0, len(docs), READ_PARALLEL):
            part = docs[start : start + READ_PARALLEL]
            answers = await asyncio.gather(*(self.fga.read(object=d.stamp.object) for d in part))
            for doc, tuples in zip(part, answers, strict=True):
                found[doc.id] = {
                    Tuple(t.user, t.relation, t.object)
                    for t in tuples
                    if t.relation in INGESTION_RELATIONS
                }
        return found

    async def _embed(
        self, tenant: str, source: str, docs: Sequence[PreparedDocument]
    ) -> dict[str, list[ChunkRecord]]:
        """Chunk and embed every changed document in one call to the model."""
        pieces = [(d, piece) for d in docs for piece in chunk_document(d.id, d.text)]
        if not pieces:
            return {d.id: [] for d in docs}
        vectors = await asyncio.to_thread(
            self.embeddings.embed_documents, [piece[2] for _, piece in pieces]
        )
        records: dict[str, list[ChunkRecord]] = {d.id: [] for d in docs}
        for (d, (chunk_id, _index, text)), vector in zip(pieces, vectors, strict=True):
            metadata = {**d.metadata, VERSION_KEY: d.content_fp}
            records[d.id].append(
                ChunkRecord(chunk_id, d.id, tenant, source, text, vector, metadata)
            )
        return records


@dataclass(frozen=True, slots=True)
class _DocumentPlan:
    """One document's share of a batched apply."""

    hide: list[Tuple]  # deleted in the first transactions (content changes)
    narrow: list[Tuple]  # deleted before the writes (ACL-only changes)
    narrowed: list[Tuple]  # every grant this update removes (for the report)
    writes: list[Tuple]
    stamp: Tuple | None  # written after every grant of the request


def _plan(doc: PreparedDocument, current: set[Tuple], recontent: bool) -> _DocumentPlan:
    target = set(doc.document_side) | {doc.stamp}
    narrowed = sorted(current - target, key=_order)
    writes = doc.folder_side + [t for t in doc.document_side if t not in current]
    if recontent:
        hide = ([doc.stamp] if doc.stamp in current else []) + narrowed
        return _DocumentPlan(hide, [], narrowed, writes, doc.stamp)
    stamp = None if doc.stamp in current else doc.stamp
    return _DocumentPlan([], narrowed, narrowed, writes, stamp)


def content_current(fingerprint: str | None, version: object) -> bool:
    """Whether a chunk written with content ``version`` is the document's current text.

    ``fingerprint`` is the catalog's (None while an update is in flight). A chunk
    without a version predates versions: only an update in flight rules it out.
    """
    if fingerprint is None:
        return False
    if version is None:
        return True
    return fingerprint.split(":")[0] == version


def _content_changed(claim: Claim, doc: PreparedDocument) -> bool:
    """New or incomplete documents, and changed text or metadata, rewrite the store."""
    fingerprint = claim.documents[doc.id].fingerprint
    return fingerprint is None or fingerprint.split(":")[0] != doc.content_fp


def _order(t: Tuple) -> tuple[str, str, str]:
    return (t.object, t.relation, t.user)


def tuples_json(tuples: Sequence[Tuple]) -> list[list[str]]:
    """Tuples as ``[user, relation, object]`` for audit records."""
    return [[t.user, t.relation, t.object] for t in tuples]

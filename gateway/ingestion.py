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

#: Relations ingestion owns on a document; task scopes naming it belong to their tasks.
INGESTION_RELATIONS = frozenset({"tenant", "parent", "owner", "viewer", "agent_viewer"})


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
        report = IngestReport(documents=len(prepared))
        changed = [d for d in prepared if claim.documents[d.id].fingerprint != d.fingerprint]
        report.skipped = len(prepared) - len(changed)
        unchanged = {d.id for d in prepared} - {d.id for d in changed}
        report.chunks = sum(claim.documents[i].chunks for i in unchanged)
        if progress is not None and report.skipped:
            progress(report.skipped)
        recontent = [d for d in changed if _content_changed(claim, d)]
        records = await self._embed(claim.tenant, claim.source, recontent)
        for doc in changed:
            chunks = records.get(doc.id)
            await self._apply_one(claim, store, doc, chunks, report)
            report.chunks += len(chunks) if chunks is not None else claim.documents[doc.id].chunks
            if progress is not None:
                progress(1)
        return report

    async def _apply_one(
        self,
        claim: Claim,
        store: VectorStore,
        doc: PreparedDocument,
        chunks: list[ChunkRecord] | None,
        report: IngestReport,
    ) -> None:
        tenant = claim.tenant
        current = {
            Tuple(t.user, t.relation, t.object)
            for t in await self.fga.read(object=doc.stamp.object)
            if t.relation in INGESTION_RELATIONS
        }
        target = set(doc.document_side) | {doc.stamp}
        narrowed = sorted(current - target, key=_order)
        await self.catalog.start_update(tenant, doc.id)
        if chunks is None:
            # Same text: only grants move, deletes (narrowing) before writes.
            writes = doc.folder_side + [t for t in doc.document_side if t not in current]
            if doc.stamp not in current:
                writes.append(doc.stamp)
            await self.fga.write(writes, narrowed)
        else:
            hide = ([doc.stamp] if doc.stamp in current else []) + narrowed
            if hide:
                await self.fga.write(deletes=hide)
            await store.delete_document(tenant, claim.source, doc.id)
            await store.upsert(tenant, claim.source, chunks)
            writes = doc.folder_side + [t for t in doc.document_side if t not in current]
            # The stamp goes last: FgaClient.write keeps the order, so when the writes
            # are split into several transactions it lands in the final one.
            await self.fga.write([*writes, doc.stamp])
            writes.append(doc.stamp)
        report.writes += writes
        report.deletes += narrowed
        count = len(chunks) if chunks is not None else claim.documents[doc.id].chunks
        await self.catalog.complete_document(
            tenant,
            doc.id,
            chunks=count,
            fingerprint=doc.fingerprint,
            folder=doc.folder,
            acl=doc.acl,
        )

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
            records[d.id].append(
                ChunkRecord(chunk_id, d.id, tenant, source, text, vector, d.metadata)
            )
        return records


def _content_changed(claim: Claim, doc: PreparedDocument) -> bool:
    """New or incomplete documents, and changed text or metadata, rewrite the store."""
    fingerprint = claim.documents[doc.id].fingerprint
    return fingerprint is None or fingerprint.split(":")[0] != doc.content_fp


def _order(t: Tuple) -> tuple[str, str, str]:
    return (t.object, t.relation, t.user)


def tuples_json(tuples: Sequence[Tuple]) -> list[list[str]]:
    """Tuples as ``[user, relation, object]`` for audit records."""
    return [[t.user, t.relation, t.object] for t in tuples]

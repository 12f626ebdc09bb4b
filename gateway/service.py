"""The gateway as a library: retrieval, administration and review, no HTTP.

:class:`Gateway` wires the edges (OpenFGA, vector stores, audit store, embeddings)
to the pure parts (decision, relationships, packing). The web layer, the CLI, the
LangChain retriever and the MCP server are all thin clients of this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from langchain_core.embeddings import Embeddings

from connectors.base import ChunkRecord, VectorStore
from connectors.chunking import chunk_document
from gateway.audit import AuditRecord, AuditStore, CandidateVerdict, open_audit_store, redact_query
from gateway.cache import ChangeWatcher, DecisionCache
from gateway.catalog import SourceCatalog, SourceInfo
from gateway.decision import CheckItem, CheckName
from gateway.errors import (
    AuthorizationUnavailable,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    ScopegateError,
)
from gateway.fga import FgaClient, Tuple, load_model
from gateway.fga_server import ManagedOpenFGA
from gateway.identity import (
    DelegationContext,
    PrincipalContext,
    TokenVerifier,
    issue_token,
    load_or_create_signing_key,
)
from gateway.ids import fga_object, validate_id
from gateway.packing import PackedChunk, pack
from gateway.relationships import (
    admin_tuple,
    document_tuples,
    principal,
    source_tuples,
    task_tuples,
)
from gateway.retrieval import (
    Adaptive,
    PostFilter,
    PreFilter,
    RequestOptions,
    RetrievalOutcome,
    RetrievalStrategy,
    SourceHandle,
)
from gateway.settings import Settings

SOURCE_KINDS = frozenset({"chroma", "memory"})
INGESTION_RELATIONS = frozenset({"tenant", "parent", "owner", "viewer", "agent_viewer"})
DEADLINE_BACKSTOP_S = 0.5

log = logging.getLogger("scopegate.service")


@dataclass(frozen=True, slots=True)
class RetrieveResult:
    request_id: str
    chunks: list[PackedChunk]
    outcome: RetrievalOutcome | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "chunks": [c.to_dict() for c in self.chunks]}


@dataclass(slots=True)
class StoreRegistry:
    """One store instance per distinct source configuration."""

    data_dir: Path
    _stores: dict[str, VectorStore] = field(default_factory=dict)

    def for_source(self, info: SourceInfo) -> VectorStore:
        key = json.dumps([info.kind, info.config], sort_keys=True)
        if key not in self._stores:
            self._stores[key] = self._open(info.kind, info.config)
        return self._stores[key]

    def _open(self, kind: str, config: Mapping[str, Any]) -> VectorStore:
        if kind == "memory":
            from connectors.memory import InMemoryStore

            return InMemoryStore()
        from connectors.chroma import ChromaStore

        url = config.get("url")
        if url:
            return ChromaStore(url=str(url))
        return ChromaStore(path=self.data_dir / "chroma")

    async def healthy(self) -> bool:
        checks = await asyncio.gather(*(s.healthy() for s in self._stores.values()))
        return all(checks)


class Gateway:
    """Everything scopegate does, as async methods taking verified contexts."""

    def __init__(
        self,
        settings: Settings,
        fga: FgaClient,
        audit: AuditStore,
        catalog: SourceCatalog,
        embeddings: Embeddings,
        verifier: TokenVerifier,
        *,
        managed: ManagedOpenFGA | None = None,
        signing_key: Any = None,
    ) -> None:
        self.settings = settings
        self.fga = fga
        self.audit = audit
        self.catalog = catalog
        self.embeddings = embeddings
        self.verifier = verifier
        self.managed = managed
        self.signing_key = signing_key
        self.stores = StoreRegistry(settings.data_dir)
        self.watcher: ChangeWatcher | None = None
        self.retention: asyncio.Task[None] | None = None
        post = PostFilter(fga, settings.overfetch, settings.max_candidates)
        pre = PreFilter(fga, post, settings.listobjects_max_results)
        self.strategies: dict[str, RetrievalStrategy] = {
            "postfilter": post,
            "prefilter": pre,
            "adaptive": Adaptive(post, pre),
        }

    # -- lifecycle -------------------------------------------------------------------

    @classmethod
    async def start(cls, settings: Settings, embeddings: Embeddings | None = None) -> Gateway:
        """Start (or connect to) OpenFGA, open the stores, and return a ready gateway."""
        data_dir = settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        managed = None
        url = settings.openfga_url
        if url is None:
            managed = ManagedOpenFGA(data_dir / "openfga", settings.openfga_binary)
            url = await asyncio.to_thread(managed.start)
        fga = FgaClient(
            url,
            settings.openfga_store_id,
            settings.openfga_model_id,
            timeout_s=settings.openfga_timeout_s,
            max_parallel_batches=settings.openfga_max_parallel_batches,
            consistency=settings.openfga_consistency,
            api_token=settings.openfga_api_token,
        )
        try:
            await fga.ensure_store_and_model(settings.openfga_store_name)
            watcher = _decision_cache(settings, fga)
        except BaseException:
            await fga.close()
            if managed is not None:
                managed.stop()
            raise
        key = load_or_create_signing_key(data_dir)
        public_keys = {key.kid: key.public_pem}
        public_keys.update({kid: pem.encode() for kid, pem in settings.trusted_issuers_pem.items()})
        verifier = TokenVerifier(
            public_keys,
            issuer=settings.token_issuer,
            audience=settings.token_audience,
            algorithms=settings.token_algorithms,
            leeway_s=settings.token_leeway_s,
            jwks_url=settings.jwks_url,
        )
        if embeddings is None:
            from connectors.embeddings import default_embeddings

            embeddings = default_embeddings()
        audit = open_audit_store(settings.audit_dsn, data_dir)
        catalog = SourceCatalog(data_dir / "catalog.db")
        gateway = cls(
            settings, fga, audit, catalog, embeddings, verifier, managed=managed, signing_key=key
        )
        gateway.watcher = watcher
        if settings.audit_retention_days is not None:
            gateway.retention = asyncio.create_task(gateway._retention_loop())
        return gateway

    async def _retention_loop(self) -> None:
        """Purge audit records past ``audit_retention_days``: at start, then periodically.

        A failed purge (store down, or a broken chain it refuses to erase) is logged and
        retried next time; it never stops the gateway or touches the decision path.
        """
        days = self.settings.audit_retention_days
        assert days is not None
        while True:
            try:
                removed = await self.audit.purge_older_than(days)
                if removed:
                    log.info("audit retention: purged %d records older than %d days", removed, days)
            except Exception as exc:  # retried on the next round
                log.warning("audit retention: purge failed: %s", exc)
            await asyncio.sleep(self.settings.audit_retention_interval_s)

    async def close(self) -> None:
        if self.retention is not None:
            self.retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.retention
        if self.watcher is not None:
            await self.watcher.stop()
        with contextlib.suppress(Exception):
            await self.fga.close()
        with contextlib.suppress(Exception):
            await self.audit.close()
        self.catalog.close()
        if self.managed is not None:
            await asyncio.to_thread(self.managed.stop)

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def mint_token(
        self,
        *,
        tenant: str,
        user: str,
        agent: str | None = None,
        task: str | None = None,
        ttl_s: int = 900,
    ) -> str:
        """Tokens signed by the embedded key (demo, tests, `scopegate token issue`)."""
        return issue_token(
            self.signing_key,
            issuer=self.settings.token_issuer,
            audience=self.settings.token_audience,
            tenant=tenant,
            user=user,
            agent=agent,
            task=task,
            ttl_s=ttl_s,
        )

    # -- authorization of the gateway's own API --------------------------------------

    async def _has(self, p: PrincipalContext, relation: str) -> bool:
        item = CheckItem(
            CheckName.USER_ACTIVE,
            fga_object("user", p.tenant, p.user),
            relation,
            fga_object("tenant", p.tenant, p.tenant),
        )
        return await self.fga.check(item)

    async def require_admin(self, p: PrincipalContext) -> None:
        if not await self._has(p, "admin"):
            raise Forbidden(f"user {p.user} is not an admin of tenant {p.tenant}")

    async def require_reviewer(self, p: PrincipalContext) -> None:
        if not await self._has(p, "reviewer"):
            raise Forbidden(f"user {p.user} is not a reviewer of tenant {p.tenant}")

    # -- tenants, tasks, relationships -----------------------------------------------

    async def create_tenant(self, tenant: str, admin: str) -> None:
        """Operator bootstrap: the tenant's first admin (also an active member)."""
        validate_id(tenant, "tenant")
        validate_id(admin, "user")
        t = fga_object("tenant", tenant, tenant)
        u = fga_object("user", tenant, admin)
        await self.fga.write([Tuple(u, "admin", t), Tuple(u, "member", t)])

    async def create_task(
        self,
        p: PrincipalContext,
        user: object,
        agent: object,
        scope: Sequence[object],
        expires_at: datetime | None = None,
    ) -> str:
        user_id = principal(p.tenant, user, "user")
        agent_id = principal(p.tenant, agent, "agent")
        if user_id != p.user:
            await self.require_admin(p)
        if expires_at is not None and expires_at.tzinfo is None:
            raise InvalidRequest("expires_at must include a timezone")
        task_id = f"t{secrets.token_hex(8)}"
        tuples = task_tuples(p.tenant, task_id, user_id, agent_id, scope, expires_at)
        await self.fga.write(tuples)
        await self._audit_admin(
            p,
            "task.create",
            {"task": task_id, "user": user_id, "agent": agent_id, "scope": [str(s) for s in scope]},
        )
        return task_id

    async def revoke_task(self, p: PrincipalContext, task_id: str) -> None:
        validate_id(task_id, "task")
        task = fga_object("task", p.tenant, task_id)
        existing = await self.fga.read(object=task)
        if not existing:
            raise NotFound(f"task {task_id} not found")
        is_delegator = any(
            t.relation == "delegator" and t.user == fga_object("user", p.tenant, p.user)
            for t in existing
        )
        if not is_delegator:
            await self.require_admin(p)
        await self.fga.write(deletes=[t for t in existing if t.relation == "live"])
        await self._audit_admin(p, "task.revoke", {"task": task_id})

    async def write_relationships(
        self,
        p: PrincipalContext,
        writes: Sequence[Mapping[str, Any]],
        deletes: Sequence[Mapping[str, Any]],
    ) -> None:
        await self.require_admin(p)
        if len(writes) + len(deletes) > 500:
            raise InvalidRequest("at most 500 relationship changes per call")
        w = [admin_tuple(p.tenant, x) for x in writes]
        d = [admin_tuple(p.tenant, x) for x in deletes]
        await self.fga.write(w, d)
        await self._audit_admin(p, "relationships.write", {"writes": len(w), "deletes": len(d)})

    # -- sources and ingestion -------------------------------------------------------

    async def register_source(
        self, p: PrincipalContext, source_id: str, kind: str, config: Mapping[str, Any]
    ) -> SourceInfo:
        await self.require_admin(p)
        validate_id(source_id, "source")
        if kind not in SOURCE_KINDS:
            raise InvalidRequest(f"kind must be one of {sorted(SOURCE_KINDS)}")
        if await self.catalog.get_source(p.tenant, source_id) is not None:
            raise Conflict(f"source {source_id} already exists")
        await self.fga.write(source_tuples(p.tenant, source_id))
        info = await self.catalog.add_source(p.tenant, source_id, kind, dict(config))
        await self._audit_admin(p, "source.register", {"source": source_id, "kind": kind})
        return info

    async def get_source(self, p: PrincipalContext, source_id: str) -> SourceInfo:
        await self.require_admin(p)
        validate_id(source_id, "source")
        info = await self.catalog.get_source(p.tenant, source_id)
        if info is None:
            raise NotFound(f"source {source_id} not found")
        return info

    async def list_sources(self, p: PrincipalContext) -> list[SourceInfo]:
        await self.require_admin(p)
        return await self.catalog.list_sources(p.tenant)

    async def ingest(
        self,
        p: PrincipalContext,
        source_id: str,
        documents: Sequence[Mapping[str, Any]],
        progress: Any = None,
    ) -> dict[str, int]:
        """Chunk, embed and store documents, then write their tuples (diffed on re-ingest)."""
        info = await self.get_source(p, source_id)
        store = self.stores.for_source(info)
        chunks_total = 0
        for doc in documents:
            document_id = validate_id(doc.get("id"), "document id")
            text = doc.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"document {document_id}: text must be a string")
            existing_source = await self.catalog.document_source(p.tenant, document_id)
            if existing_source not in (None, source_id):
                raise Conflict(
                    f"document {document_id} already belongs to source {existing_source}"
                )
            acl = doc.get("acl") or {}
            if not isinstance(acl, Mapping):
                raise InvalidRequest("acl must be an object")
            folder = doc.get("folder")
            wanted = document_tuples(p.tenant, source_id, document_id, folder, acl)
            metadata = doc.get("metadata") or {}
            if not isinstance(metadata, Mapping):
                raise InvalidRequest("metadata must be an object")
            records = await self._chunk_records(p.tenant, source_id, document_id, text, metadata)
            if existing_source is not None:
                await store.delete_document(p.tenant, source_id, document_id)
            await store.upsert(p.tenant, source_id, records)
            await self._sync_document_tuples(p.tenant, document_id, wanted)
            await self.catalog.record_document(p.tenant, source_id, document_id, len(records))
            chunks_total += len(records)
            if progress is not None:
                progress(1)
        await self._audit_admin(
            p, "documents.ingest", {"source": source_id, "documents": len(documents)}
        )
        return {"documents": len(documents), "chunks": chunks_total}

    async def _chunk_records(
        self, tenant: str, source: str, document_id: str, text: str, metadata: Mapping[str, Any]
    ) -> list[ChunkRecord]:
        pieces = chunk_document(document_id, text)
        vectors = await asyncio.to_thread(self.embeddings.embed_documents, [p[2] for p in pieces])
        clean = {str(k): v for k, v in metadata.items() if isinstance(v, str | int | float | bool)}
        return [
            ChunkRecord(
                chunk_id,
                document_id,
                tenant,
                source,
                piece,
                vector,
                clean,
            )
            for (chunk_id, _index, piece), vector in zip(pieces, vectors, strict=True)
        ]

    async def _sync_document_tuples(
        self, tenant: str, document_id: str, wanted: list[Tuple]
    ) -> None:
        """Write the document's ACL tuples, removing the ones a re-ingest dropped.

        Only relations that ingestion owns are diffed: task scopes that name the
        document (``scoped_task``) belong to their tasks and are left alone.
        """
        document = fga_object("document", tenant, document_id)
        current = {
            Tuple(t.user, t.relation, t.object)
            for t in await self.fga.read(object=document)
            if t.relation in INGESTION_RELATIONS
        }
        target = set(wanted)
        document_side = [t for t in wanted if t.object == document]
        others = [t for t in wanted if t.object != document]
        await self.fga.write(
            [t for t in document_side if t not in current] + others,
            [t for t in current if t not in target],
        )

    async def delete_document(self, p: PrincipalContext, source_id: str, document_id: str) -> None:
        info = await self.get_source(p, source_id)
        validate_id(document_id, "document id")
        if await self.catalog.document_source(p.tenant, document_id) != source_id:
            raise NotFound(f"document {document_id} not found in source {source_id}")
        # Tuples first: once they are gone nothing can be served, whatever the store does.
        document = fga_object("document", p.tenant, document_id)
        await self.fga.write(deletes=await self.fga.read(object=document))
        await self.stores.for_source(info).delete_document(p.tenant, source_id, document_id)
        await self.catalog.forget_document(p.tenant, document_id)
        await self._audit_admin(
            p, "documents.delete", {"source": source_id, "document": document_id}
        )

    # -- retrieval ---------------------------------------------------------------------

    async def retrievable_sources(self, ctx: DelegationContext) -> list[str]:
        """Ids of the tenant's sources, for an agent choosing ``sources`` (ids only).

        No config, no counts: only what a retrieval naming a source already reveals
        (an unknown source is ``not_found``).
        """
        return [s.id for s in await self.catalog.list_sources(ctx.tenant)]

    async def _source_handles(
        self, tenant: str, requested: Sequence[str] | None
    ) -> list[SourceHandle]:
        registered = {s.id: s for s in await self.catalog.list_sources(tenant)}
        names = list(requested) if requested else sorted(registered)
        handles = []
        for name in dict.fromkeys(names):
            validate_id(name, "source")
            info = registered.get(name)
            if info is None:
                raise NotFound(f"source {name} not found")
            count = await self.catalog.document_count(tenant, name)
            store = self.stores.for_source(info)
            handles.append(SourceHandle(tenant, name, store, count, exact=info.kind == "memory"))
        return handles

    async def retrieve(
        self,
        ctx: DelegationContext,
        query: str,
        k: int = 5,
        sources: Sequence[str] | None = None,
        max_tokens: int | None = None,
        strategy: str | None = None,
        request_id: str | None = None,
        consistency: str | None = None,
    ) -> RetrieveResult:
        """The main job: exact top-k permitted chunks, audited before they are returned.

        ``request_id`` names the audit record (the HTTP layer passes its own, so an
        error response points at the record of the failed request). ``consistency``
        "HIGHER_CONSISTENCY" makes every check of this request bypass the decision cache.
        """
        request_id = request_id or uuid.uuid4().hex
        started = time.monotonic()
        chosen = strategy or self.settings.strategy
        # Recorded as asked: "MINIMIZE_LATENCY+cache" means answers may come from the
        # decision cache (within its staleness bound), the rest from OpenFGA in that mode.
        mode = consistency or self.fga.consistency
        if consistency is None and self.fga.cache is not None:
            mode += "+cache"
        outcome: RetrievalOutcome | None = None
        source_names: list[str] = list(sources or [])
        try:
            handles = await self._source_handles(ctx.tenant, sources)
            source_names = [h.id for h in handles]
            vector = await asyncio.to_thread(self.embeddings.embed_query, query)
            options = RequestOptions(started + self.settings.request_timeout_s, consistency)
            # Each phase runs out at ``options.deadline`` and says whose fault it was;
            # this outer bound, a little later, is only the backstop.
            outcome = await asyncio.wait_for(
                self.strategies[chosen].retrieve(ctx, vector, k, handles, options),
                timeout=self.settings.request_timeout_s + DEADLINE_BACKSTOP_S,
            )
            packed = pack(outcome.chunks, max_tokens)
        except TimeoutError as exc:
            err = AuthorizationUnavailable("retrieval deadline exceeded")
            await self._audit_retrieval(
                request_id, ctx, query, k, source_names, chosen, outcome, [], started, err, mode
            )
            raise err from exc
        except ScopegateError as exc:
            await self._audit_retrieval(
                request_id, ctx, query, k, source_names, chosen, outcome, [], started, exc, mode
            )
            raise
        except Exception as exc:
            # A bug must fail closed too: no content, and a record of the failure.
            bug = ScopegateError(f"internal error: {type(exc).__name__}")
            await self._audit_retrieval(
                request_id, ctx, query, k, source_names, chosen, outcome, [], started, bug, mode
            )
            raise bug from exc
        await self._audit_retrieval(
            request_id,
            ctx,
            query,
            k,
            source_names,
            outcome.strategy,
            outcome,
            packed,
            started,
            None,
            mode,
        )
        return RetrieveResult(request_id, packed, outcome)

    async def _audit_retrieval(
        self,
        request_id: str,
        ctx: DelegationContext,
        query: str,
        k: int,
        sources: Sequence[str],
        strategy: str,
        outcome: RetrievalOutcome | None,
        packed: Sequence[PackedChunk],
        started: float,
        error: ScopegateError | None,
        consistency: str,
    ) -> None:
        returned = {c.chunk_id for c in packed}
        candidates = []
        if outcome is not None:
            for doc_id, verdict in outcome.verdicts.items():
                chunks = outcome.candidates.get(doc_id, [])
                candidates.append(
                    CandidateVerdict(
                        document_id=doc_id,
                        source=str(chunks[0].source) if chunks else "",
                        chunk_ids=tuple(c.chunk_id for c in chunks),
                        verdict=verdict.verdict,
                        failed_checks=verdict.failed_checks,
                        errored_checks=verdict.errored_checks,
                        returned=any(c.chunk_id in returned for c in chunks),
                    )
                )
        if error is not None:
            result = "error"
        elif not candidates:
            result = "empty"
        elif all(c.verdict == "allow" for c in candidates):
            result = "allowed"
        elif packed:
            result = "partial"
        else:
            result = "denied"
        redact = self.settings.audit_redact_queries
        record = AuditRecord(
            request_id=request_id,
            time=datetime.now(UTC).isoformat(),
            tenant=ctx.tenant,
            user=ctx.user,
            agent=ctx.agent,
            task=ctx.task,
            token_id=ctx.token_id,
            kind="retrieve",
            query=None if redact else query,
            query_hash=redact_query(query, self.settings.audit_redaction_key) if redact else None,
            sources=tuple(sources),
            strategy=strategy,
            store_id=self.fga.store_id,
            model_id=self.fga.model_id,
            consistency=consistency,
            k=k,
            candidates=tuple(candidates),
            returned_chunk_ids=tuple(c.chunk_id for c in packed),
            outcome=result,
            error_code=error.code if error is not None else None,
            latency_ms=round((time.monotonic() - started) * 1000, 3),
            extra={
                "batch_rounds": outcome.batch_rounds if outcome else 0,
                "list_objects_calls": outcome.list_objects_calls if outcome else 0,
                "notes": list(outcome.notes) if outcome else [],
                "error": error.message if error is not None else None,
            },
        )
        await self.audit.append(record)

    async def _audit_admin(
        self, p: PrincipalContext, action: str, details: Mapping[str, Any]
    ) -> None:
        record = AuditRecord(
            request_id=uuid.uuid4().hex,
            time=datetime.now(UTC).isoformat(),
            tenant=p.tenant,
            user=p.user,
            agent=None,
            task=None,
            token_id=p.token_id,
            kind="admin",
            query=None,
            query_hash=None,
            sources=(),
            strategy="",
            store_id=self.fga.store_id,
            model_id=self.fga.model_id,
            consistency=self.fga.consistency,
            k=0,
            candidates=(),
            returned_chunk_ids=(),
            outcome="allowed",
            error_code=None,
            latency_ms=0.0,
            extra={"action": action, **details},
        )
        await self.audit.append(record)

    # -- health ------------------------------------------------------------------------

    async def readiness(self) -> dict[str, bool]:
        fga_ok, stores_ok, audit_ok = await asyncio.gather(
            self.fga.healthy(), self.stores.healthy(), self.audit.healthy()
        )
        return {"openfga": fga_ok, "stores": stores_ok, "audit": audit_ok}


def _decision_cache(settings: Settings, fga: FgaClient) -> ChangeWatcher | None:
    """The optional decision cache and the ReadChanges watcher that keeps it honest."""
    if not settings.decision_cache:
        return None
    fga.cache = DecisionCache(
        load_model(),
        bucket_s=settings.decision_cache_bucket_s,
        max_staleness_s=settings.decision_cache_max_staleness_s,
    )
    watcher = ChangeWatcher(fga, fga.cache, interval_s=settings.decision_cache_poll_s)
    watcher.start()
    return watcher


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]

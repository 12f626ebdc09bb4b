"""The gateway as a library: retrieval, administration and review, no HTTP.

:class:`Gateway` wires the edges (OpenFGA, vector stores, audit store, embeddings)
to the pure parts (decision, relationships, packing). The web layer, the CLI, the
LangChain retriever and the MCP server are all thin clients of this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from langchain_core.embeddings import Embeddings

from connectors.base import VectorStore
from gateway import tracing
from gateway.audit import AuditRecord, AuditStore, CandidateVerdict, open_audit_store, redact_query
from gateway.cache import ChangeWatcher, DecisionCache
from gateway.catalog import SourceCatalog, SourceInfo, open_catalog
from gateway.decision import CheckItem, CheckName, DocumentVerdict
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
from gateway.ids import PUBLIC_RELATIONS, fga_object, parse_ref, unscoped, validate_id
from gateway.ingestion import Ingestor, prepare, tuples_json
from gateway.packing import PackedChunk, pack
from gateway.relationships import (
    SUBJECT_TYPES,
    admin_tuple,
    local_tuple,
    principal,
    source_tuples,
    subject,
    task_tuples,
)
from gateway.retrieval import (
    Adaptive,
    PostFilter,
    PreFilter,
    RequestChecks,
    RequestOptions,
    RetrievalOutcome,
    RetrievalStrategy,
    SourceHandle,
)
from gateway.settings import Settings

SOURCE_KINDS = frozenset({"chroma", "memory"})
#: Object types whose tuples may name a principal (besides its tenant).
SUBJECT_OBJECT_TYPES = ("group", "source", "folder", "document", "task")
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
    chroma_url: str | None = None
    chroma_headers: Mapping[str, str] = field(default_factory=dict)
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

        url = config.get("url") or self.chroma_url
        if url:
            return ChromaStore(url=str(url), headers=dict(self.chroma_headers) or None)
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
        self.stores = StoreRegistry(settings.data_dir, settings.chroma_url, settings.chroma_headers)
        self.ingestor = Ingestor(fga, catalog, embeddings)
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
        # The data directory's key signs development tokens only: production trusts
        # configured issuers and nothing else (Settings.check_production insists on one).
        key = None if settings.environment == "production" else load_or_create_signing_key(data_dir)
        public_keys = {key.kid: key.public_pem} if key is not None else {}
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
        catalog = open_catalog(settings.catalog_dsn, data_dir)
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
        with contextlib.suppress(Exception):
            await self.catalog.close()
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

    async def create_tenant(
        self, tenant: str, admin: str, by: PrincipalContext | None = None
    ) -> None:
        """Operator bootstrap: the tenant's first admin (also an active member).

        Conflict when the tenant exists: an existing tenant gets admins through
        ``/v1/relationships``, never silently through bootstrap.
        """
        validate_id(tenant, "tenant")
        validate_id(admin, "user")
        t = fga_object("tenant", tenant, tenant)
        u = fga_object("user", tenant, admin)
        writes = [Tuple(u, "admin", t), Tuple(u, "member", t)]
        caller = by or PrincipalContext(tenant, "operator", "bootstrap", operator=True)
        details = {"tenant": tenant, "admin": admin, "writes": tuples_json(writes)}
        async with self._admin_mutation(caller, "tenant.create", details):
            if await self.fga.read(object=t):
                raise Conflict(f"tenant {tenant} already exists")
            try:
                await self.catalog.add_tenant(tenant)
            except Conflict as exc:
                raise Conflict(f"tenant {tenant} already exists") from exc
            await self.fga.write(writes)

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
        details = {
            "task": task_id,
            "user": user_id,
            "agent": agent_id,
            "scope": [str(s) for s in scope],
            "expires_at": expires_at.isoformat() if expires_at else None,
            "writes": tuples_json(tuples),
        }
        async with self._admin_mutation(p, "task.create", details):
            await self.fga.write(tuples)
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
        live = [t for t in existing if t.relation == "live"]
        details = {"task": task_id, "deletes": tuples_json(live)}
        async with self._admin_mutation(p, "task.revoke", details):
            await self.fga.write(deletes=live)

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
        details = {"writes": tuples_json(w), "deletes": tuples_json(d)}
        async with self._admin_mutation(p, "relationships.write", details):
            await self._claim_parents(p.tenant, w)
            await self.fga.write(w, d)
            await self._unlink_parents(p.tenant, d)

    async def _claim_parents(self, tenant: str, writes: Sequence[Tuple]) -> None:
        """A ``parent`` write may not move another source's folder or document (409)."""
        for t in writes:
            if t.relation != "parent":
                continue
            parent_type, _, parent_id = t.user.partition(":")
            child_type, _, child_id = t.object.partition(":")
            if parent_type not in {"source", "folder"} or child_type not in {"folder", "document"}:
                raise InvalidRequest("parent links a folder or document to a folder or source")
            await self.catalog.link(
                tenant,
                f"{parent_type}:{unscoped(tenant, parent_id)}",
                f"{child_type}:{unscoped(tenant, child_id)}",
            )

    async def _unlink_parents(self, tenant: str, deletes: Sequence[Tuple]) -> None:
        for t in deletes:
            if t.relation == "parent" and t.user.startswith("folder:"):
                await self.catalog.unlink(
                    tenant,
                    f"folder:{unscoped(tenant, t.user.partition(':')[2])}",
                    f"folder:{unscoped(tenant, t.object.partition(':')[2])}",
                )

    async def list_relationships(
        self, p: PrincipalContext, object: str | None = None, user: str | None = None
    ) -> list[dict[str, str]]:
        """Public tuples naming ``object`` or ``user`` (typed, tenant-local ids), for admins."""
        await self.require_admin(p)
        if (object is None) == (user is None):
            raise InvalidRequest("give exactly one of object or user")
        if object is not None:
            ref = parse_ref(object, p.tenant)
            found = await self.fga.read(object=ref.to_fga(p.tenant))
        else:
            who = subject(p.tenant, user, SUBJECT_TYPES)
            found = await self._tuples_of_subject(p.tenant, who)
        # The public vocabulary only: what this returns can be written or deleted back.
        return [local_tuple(p.tenant, t) for t in found if t.relation in PUBLIC_RELATIONS]

    async def _tuples_of_subject(self, tenant: str, who: str) -> list[Tuple]:
        """Every tuple of the tenant whose user is ``who`` (one read per object type)."""
        reads = [
            self.fga.read(user=who, object=fga_object("tenant", tenant, tenant)),
            *(self.fga.read(user=who, object=f"{kind}:") for kind in SUBJECT_OBJECT_TYPES),
        ]
        prefix = f"{tenant}/"
        found: list[Tuple] = []
        for batch in await asyncio.gather(*reads):
            found += [
                t
                for t in batch
                if t.object == f"tenant:{tenant}" or t.object.partition(":")[2].startswith(prefix)
            ]
        return found

    async def deprovision(self, p: PrincipalContext, ref: str) -> dict[str, int]:
        """Remove every relation of a user or agent in the tenant and revoke its tasks.

        Tenant and group membership, admin, reviewer, direct grants and task bindings
        go; tasks it delegated or executes lose their ``live`` tuple, so re-adding the
        principal later revives nothing.
        """
        await self.require_admin(p)
        target = parse_ref(ref, p.tenant, frozenset({"user", "agent"}))
        who = target.to_fga(p.tenant)
        relations = await self._tuples_of_subject(p.tenant, who)
        tasks = sorted({t.object for t in relations if t.relation in {"delegator", "executor"}})
        lives = [
            t
            for batch in await asyncio.gather(
                *(self.fga.read(relation="live", object=task) for task in tasks)
            )
            for t in batch
        ]
        deletes = [Tuple(t.user, t.relation, t.object) for t in relations + lives]
        details = {"principal": str(target), "deletes": tuples_json(deletes)}
        async with self._admin_mutation(p, "principal.deprovision", details):
            # Membership first: from the first transaction on, the principal is inactive.
            deletes.sort(key=lambda t: t.object != f"tenant:{p.tenant}")
            await self.fga.write(deletes=deletes)
        return {
            "relations_removed": len(relations),
            "tasks_revoked": len({t.object for t in lives}),
        }

    # -- sources and ingestion -------------------------------------------------------

    async def register_source(
        self, p: PrincipalContext, source_id: str, kind: str, config: Mapping[str, Any]
    ) -> SourceInfo:
        await self.require_admin(p)
        validate_id(source_id, "source")
        if kind not in SOURCE_KINDS:
            raise InvalidRequest(f"kind must be one of {sorted(SOURCE_KINDS)}")
        existing = await self.catalog.get_source(p.tenant, source_id)
        if existing is not None:
            state = " (being removed)" if existing.state != "active" else ""
            raise Conflict(f"source {source_id} already exists{state}")
        tuples = source_tuples(p.tenant, source_id)
        details = {"source": source_id, "kind": kind, "writes": tuples_json(tuples)}
        async with self._admin_mutation(p, "source.register", details):
            await self.fga.write(tuples)
            info = await self.catalog.add_source(p.tenant, source_id, kind, dict(config))
        return info

    async def get_source(self, p: PrincipalContext, source_id: str) -> SourceInfo:
        await self.require_admin(p)
        validate_id(source_id, "source")
        info = await self.catalog.get_source(p.tenant, source_id)
        if info is None or info.state != "active":
            raise NotFound(f"source {source_id} not found")
        return info

    async def list_sources(self, p: PrincipalContext) -> list[SourceInfo]:
        await self.require_admin(p)
        return await self.catalog.list_sources(p.tenant)

    async def remove_source(self, p: PrincipalContext, source_id: str) -> dict[str, int]:
        """Remove a source: its tuples, its chunks, then its catalog entries.

        The source stops serving first (state ``removing``), then every tuple naming its
        documents, folders and itself goes (task scopes on them included, so a task
        scoped only to it denies), then the store's collection, then the catalog, which
        frees its names. A removal that fails half-way is finished by calling it again.
        """
        await self.require_admin(p)
        validate_id(source_id, "source")
        info = await self.catalog.get_source(p.tenant, source_id)
        if info is None:
            raise NotFound(f"source {source_id} not found")
        documents, folders = await self.catalog.source_contents(p.tenant, source_id)
        objects = [fga_object("document", p.tenant, d) for d in documents]
        objects += [fga_object("folder", p.tenant, f) for f in folders]
        objects.append(fga_object("source", p.tenant, source_id))
        deletes = await self._tuples_on(objects)
        details = {
            "source": source_id,
            "documents": documents,
            "folders": folders,
            "deletes": tuples_json(deletes),
        }
        async with self._admin_mutation(p, "source.remove", details):
            await self.catalog.mark_removing(p.tenant, source_id)
            # Document stamps first: from the first transaction on, nothing is served.
            deletes.sort(key=lambda t: t.relation != "tenant")
            await self.fga.write(deletes=deletes)
            await self.stores.for_source(info).drop(p.tenant, source_id)
            await self.catalog.forget_source(p.tenant, source_id)
        return {"documents": len(documents), "folders": len(folders), "tuples": len(deletes)}

    async def _tuples_on(self, objects: Sequence[str]) -> list[Tuple]:
        found: list[Tuple] = []
        for i in range(0, len(objects), 16):
            batch = objects[i : i + 16]
            for tuples in await asyncio.gather(*(self.fga.read(object=o) for o in batch)):
                found += [Tuple(t.user, t.relation, t.object) for t in tuples]
        return found

    async def ingest(
        self,
        p: PrincipalContext,
        source_id: str,
        documents: Sequence[Mapping[str, Any]],
        progress: Any = None,
    ) -> dict[str, int]:
        """Chunk, embed and store documents and write their tuples (see gateway.ingestion).

        The whole request is validated and its names claimed before anything is
        written: a folder or document of another source refuses it all with 409.
        """
        info = await self.get_source(p, source_id)
        prepared = prepare(p.tenant, source_id, documents)
        store = self.stores.for_source(info)
        details = {
            "source": source_id,
            "documents": [d.id for d in prepared],
            "fingerprints": {d.id: d.fingerprint for d in prepared},
            "wanted": tuples_json([t for d in prepared for t in [*d.wanted, d.stamp]]),
        }
        async with self._admin_mutation(p, "documents.ingest", details) as result:
            folders = [d.folder for d in prepared if d.folder is not None]
            claim = await self.catalog.claim(p.tenant, source_id, folders, [d.id for d in prepared])
            try:
                report = await self.ingestor.apply(claim, store, prepared, progress)
            finally:
                await self.catalog.release(claim)
            result.update(
                skipped=report.skipped,
                writes=tuples_json(report.writes),
                deletes=tuples_json(report.deletes),
            )
        return report.summary()

    async def delete_document(self, p: PrincipalContext, source_id: str, document_id: str) -> None:
        info = await self.get_source(p, source_id)
        validate_id(document_id, "document id")
        if await self.catalog.document_source(p.tenant, document_id) != source_id:
            raise NotFound(f"document {document_id} not found in source {source_id}")
        document = fga_object("document", p.tenant, document_id)
        tuples = await self._tuples_on([document])
        details = {"source": source_id, "document": document_id, "deletes": tuples_json(tuples)}
        async with self._admin_mutation(p, "documents.delete", details):
            claim = await self.catalog.claim(p.tenant, source_id, [], [document_id])
            try:
                # Tuples first (the stamp leading): once gone nothing can be served.
                tuples.sort(key=lambda t: t.relation != "tenant")
                await self.fga.write(deletes=tuples)
                await self.stores.for_source(info).delete_document(p.tenant, source_id, document_id)
                await self.catalog.forget_document(p.tenant, document_id)
            finally:
                await self.catalog.release(claim)

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

    @tracing.traced("scopegate.retrieve")
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
        # Filled in place by the strategy: when it fails half way, the verdicts it
        # reached are still recorded (and nothing is returned).
        outcome = RetrievalOutcome(chosen)
        source_names: list[str] = list(sources or [])
        try:
            handles = await self._source_handles(ctx.tenant, sources)
            source_names = [h.id for h in handles]
            with tracing.span("scopegate.embed"):
                vector = await asyncio.to_thread(self.embeddings.embed_query, query)
            options = RequestOptions(started + self.settings.request_timeout_s, consistency)
            # Each phase runs out at ``options.deadline`` and says whose fault it was;
            # this outer bound, a little later, is only the backstop.
            strategy_run = self.strategies[chosen].retrieve(
                ctx, vector, k, handles, options, outcome=outcome
            )
            outcome = await asyncio.wait_for(
                strategy_run,
                timeout=self.settings.request_timeout_s + DEADLINE_BACKSTOP_S,
            )
            with tracing.span("scopegate.pack", {"scopegate.chunks": len(outcome.chunks)}):
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
            bug = ScopegateError("internal error", detail=f"{type(exc).__name__}: {exc}"[:500])
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
                # What the upstream said (may name objects): kept here, never in a response.
                "error_detail": error.detail if error is not None else None,
            },
        )
        tracing.annotate(
            {
                "scopegate.request_id": request_id,
                "scopegate.strategy": strategy,
                "scopegate.k": k,
                "scopegate.candidates": len(candidates),
                "scopegate.returned": len(packed),
                "scopegate.batch_rounds": outcome.batch_rounds if outcome else 0,
                "scopegate.outcome": result,
            }
        )
        with tracing.span("scopegate.audit"):
            await self.audit.append(record)

    @tracing.traced("scopegate.evaluate")
    async def evaluate_access(
        self,
        ctx: DelegationContext,
        documents: Sequence[str | None],
        *,
        stop_on: bool | None = None,
        request_id: str | None = None,
        consistency: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> list[DocumentVerdict | None]:
        """The decision of DESIGN section 2 for named documents, without retrieving.

        The library form of the AuthZEN Access Evaluation API (DESIGN section 9, see
        :mod:`gateway.authzen`). ``documents`` are validated bare ids in the caller's
        order; ``None`` stands for an evaluation the caller answered false without
        OpenFGA (an unsupported action, for instance). Every distinct document is
        decided with the request-level checks in one BatchCheck round, exactly as a
        retrieval decides its candidates. ``stop_on`` ends the answer at the first
        decision equal to it (False: deny on first deny, True: permit on first permit).

        Returns the verdicts of the answered evaluations, in order (None where the
        caller had decided). The audit record is written first, of the same kind as a
        retrieval's (strategy ``authzen``, per-document verdicts with their failed
        checks; ``returned`` marks documents whose permit was answered), so reviewers
        show and replay it like any retrieval; ``details`` go to its ``extra``. Any
        OpenFGA failure or unanswered check is recorded and raised: no decision is
        true then.
        """
        request_id = request_id or uuid.uuid4().hex
        started = time.monotonic()
        outcome = RetrievalOutcome("authzen")
        options = RequestOptions(started + self.settings.request_timeout_s, consistency)
        answered: list[DocumentVerdict | None] = []
        error: ScopegateError | None = None
        try:
            wanted = [d for d in documents if d is not None]
            if wanted:
                await RequestChecks(self.fga, ctx, options).verify(wanted, outcome)
            for document in documents:
                verdict = None if document is None else outcome.verdicts[document]
                answered.append(verdict)
                if stop_on is not None and (verdict is not None and verdict.allowed) == stop_on:
                    break
        except ScopegateError as exc:
            error = exc
        except Exception as exc:
            error = ScopegateError("internal error", detail=f"{type(exc).__name__}: {exc}"[:500])
        permitted = {v.document_id for v in answered if v is not None and v.allowed}
        if error is not None:
            answered, permitted, result = [], set(), "error"
        elif len(permitted) == len(answered):
            result = "allowed"
        else:
            result = "partial" if permitted else "denied"
        record = AuditRecord(
            request_id=request_id,
            time=datetime.now(UTC).isoformat(),
            tenant=ctx.tenant,
            user=ctx.user,
            agent=ctx.agent,
            task=ctx.task,
            token_id=ctx.token_id,
            kind="retrieve",
            query="",
            query_hash=None,
            sources=(),
            strategy="authzen",
            store_id=self.fga.store_id,
            model_id=self.fga.model_id,
            consistency=consistency or self.fga.consistency,
            k=len(documents),
            candidates=tuple(
                CandidateVerdict(
                    document_id=v.document_id,
                    source="",
                    chunk_ids=(),
                    verdict=v.verdict,
                    failed_checks=v.failed_checks,
                    errored_checks=v.errored_checks,
                    returned=v.document_id in permitted,
                )
                for v in outcome.verdicts.values()
            ),
            returned_chunk_ids=(),
            outcome=result,
            error_code=error.code if error is not None else None,
            latency_ms=round((time.monotonic() - started) * 1000, 3),
            extra={
                **(details or {}),
                "answered": len(answered),
                "batch_rounds": outcome.batch_rounds,
                "error": error.message if error is not None else None,
                "error_detail": error.detail if error is not None else None,
            },
        )
        tracing.annotate(
            {
                "scopegate.request_id": request_id,
                "scopegate.evaluations": len(documents),
                "scopegate.candidates": len(outcome.verdicts),
                "scopegate.batch_rounds": outcome.batch_rounds,
                "scopegate.outcome": result,
            }
        )
        with tracing.span("scopegate.audit"):
            await self.audit.append(record)
        if error is not None:
            raise error
        return answered

    @contextlib.asynccontextmanager
    async def _admin_mutation(
        self, p: PrincipalContext, action: str, details: Mapping[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        """Record an admin mutation before applying it, then record how it ended.

        The intent record (with the tuples) is written first: if the audit store is
        down the mutation is not applied (``audit_unavailable``). The closing record
        names the intent and carries what the body adds to the yielded dict; a failed
        mutation closes with an ``error`` record and re-raises.
        """
        intent = uuid.uuid4().hex
        started = time.monotonic()
        await self.audit.append(
            self._admin_record(
                p, intent, "allowed", None, {"action": action, "phase": "intent", **details}, 0.0
            )
        )
        result: dict[str, Any] = {}
        try:
            yield result
        except BaseException as exc:
            code = exc.code if isinstance(exc, ScopegateError) else "internal_error"
            message = exc.message if isinstance(exc, ScopegateError) else type(exc).__name__
            extra = {"action": action, "phase": "failed", "intent": intent, "error": message}
            await self._close_admin(p, "error", code, extra, started)
            raise
        extra = {"action": action, "phase": "applied", "intent": intent, **result}
        await self._close_admin(p, "allowed", None, extra, started)

    async def _close_admin(
        self,
        p: PrincipalContext,
        outcome: str,
        code: str | None,
        extra: Mapping[str, Any],
        started: float,
    ) -> None:
        latency = round((time.monotonic() - started) * 1000, 3)
        try:
            await self.audit.append(
                self._admin_record(p, uuid.uuid4().hex, outcome, code, extra, latency)
            )
        except ScopegateError as exc:
            # The intent record already holds the tuples; the closing one is best effort.
            log.warning("audit: closing record of %s not written: %s", extra["action"], exc)

    def _admin_record(
        self,
        p: PrincipalContext,
        request_id: str,
        outcome: str,
        code: str | None,
        extra: Mapping[str, Any],
        latency_ms: float,
    ) -> AuditRecord:
        return AuditRecord(
            request_id=request_id,
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
            outcome=outcome,
            error_code=code,
            latency_ms=latency_ms,
            extra=extra,
        )

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

"""The gateway as a library: retrieval, administration and review, no HTTP.

:class:`Gateway` wires the edges (OpenFGA, vector stores, audit store, embeddings)
to the pure parts (decision, relationships, packing). The web layer, the CLI, the
LangChain retriever and the MCP server are all thin clients of this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import jwt
from langchain_core.embeddings import Embeddings

from connectors.base import VectorStore
from connectors.fronted import (
    is_fronted,
    location,
    open_fronted,
    open_qdrant,
    public_config,
    source_config,
)
from connectors.fronted import production_problems as source_production_problems
from connectors.vectors import DEFAULT_MAX_BYTES
from gateway import scim, tracing
from gateway.audit import AuditRecord, AuditStore, CandidateVerdict, open_audit_store, redact_query
from gateway.cache import ChangeWatcher, DecisionCache
from gateway.catalog import (
    DirectoryState,
    ScimGroupRecord,
    ScimUserRecord,
    SourceCatalog,
    SourceInfo,
    open_catalog,
)
from gateway.changelog import ChangeArchiver, decision_point, open_archiver
from gateway.decision import CheckItem, CheckName, DocumentVerdict, request_checks
from gateway.errors import (
    AuthorizationUnavailable,
    Conflict,
    Forbidden,
    IdentityStale,
    InvalidRequest,
    InvalidToken,
    NotFound,
    ScopegateError,
)
from gateway.fga import FgaClient, Tuple, load_model
from gateway.fga_server import CHECK_CACHE_TTL_S, ManagedOpenFGA, cache_quiet_s
from gateway.identity import (
    DelegationContext,
    PrincipalContext,
    SigningKey,
    TokenVerifier,
    issue_token,
    load_or_create_signing_key,
)
from gateway.ids import PUBLIC_RELATIONS, TypedRef, fga_object, parse_ref, unscoped, validate_id
from gateway.ingestion import (
    CONTENT_CHANGED,
    VERSION_KEY,
    Ingestor,
    content_current,
    prepare,
    tuples_json,
)
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
    OPENFGA_CACHE_NOTE,
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
from gateway.sync import (
    FrontedStore,
    SourceSync,
    already_synced,
    fronted_fingerprint,
    managed_acls,
    plan,
    wanted_tuples,
)
from gateway.token_exchange import (
    ACCESS_TOKEN,
    ExchangeRequest,
    OidcVerifier,
    VerifiedUser,
    exchange_signing_key,
    remaining_s,
)

SOURCE_KINDS = frozenset({"chroma", "memory", "qdrant"})
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
    #: Bytes of chunk vectors each Chroma store keeps for exact ranking (0: none).
    vector_cache_bytes: int = DEFAULT_MAX_BYTES
    _stores: dict[str, VectorStore] = field(default_factory=dict)

    def for_source(self, info: SourceInfo) -> VectorStore:
        key = json.dumps([info.kind, info.config], sort_keys=True)
        if is_fronted(info.config):
            # A fronted collection is bound to the one (tenant, source) it serves.
            key = json.dumps([info.tenant, info.id, info.kind, info.config], sort_keys=True)
            if key not in self._stores:
                headers = dict(self.chroma_headers) or None
                self._stores[key] = open_fronted(
                    info.kind, info.config, info.tenant, info.id, headers
                )
        if key not in self._stores:
            self._stores[key] = self._open(info.kind, info.config)
        return self._stores[key]

    def _open(self, kind: str, config: Mapping[str, Any]) -> VectorStore:
        if kind == "memory":
            from connectors.memory import InMemoryStore

            return InMemoryStore()
        if kind == "qdrant":
            return open_qdrant(config, self.data_dir)
        from connectors.chroma import ChromaStore

        url = config.get("url") or self.chroma_url
        cache = self.vector_cache_bytes
        if url:
            headers = dict(self.chroma_headers) or None
            return ChromaStore(url=str(url), headers=headers, vector_cache_bytes=cache)
        return ChromaStore(path=self.data_dir / "chroma", vector_cache_bytes=cache)

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
        self.stores = StoreRegistry(
            settings.data_dir,
            settings.chroma_url,
            settings.chroma_headers,
            settings.vector_cache_mb << 20,
        )
        self.ingestor = Ingestor(fga, catalog, embeddings)
        self.watcher: ChangeWatcher | None = None
        self.changelog: ChangeArchiver | None = None
        self.retention: asyncio.Task[None] | None = None
        post = PostFilter(fga, settings.overfetch, settings.max_candidates)
        pre = PreFilter(
            fga,
            post,
            settings.prefilter_max_documents,
            listed_max=settings.listed_max_documents,
        )
        self.strategies: dict[str, RetrievalStrategy] = {
            "postfilter": post,
            "prefilter": pre,
            "adaptive": Adaptive(post, pre, listing=settings.listed_max_documents > 0),
        }

    # -- lifecycle -------------------------------------------------------------------

    @classmethod
    async def start(cls, settings: Settings, embeddings: Embeddings | None = None) -> Gateway:
        """Start (or connect to) OpenFGA, open the stores, and return a ready gateway."""
        data_dir = settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        managed = None
        url = settings.openfga_url
        cache_ttl = settings.openfga_check_cache_ttl_s
        if url is None:
            cache_ttl = CHECK_CACHE_TTL_S if cache_ttl is None else cache_ttl
            managed = ManagedOpenFGA(
                data_dir / "openfga",
                settings.openfga_binary,
                check_cache_ttl_s=cache_ttl,
                request_timeout_s=settings.openfga_request_timeout_s,
            )
            url = await asyncio.to_thread(managed.start)
        fga = FgaClient(
            url,
            settings.openfga_store_id,
            settings.openfga_model_id,
            timeout_s=settings.openfga_timeout_s,
            max_parallel_batches=settings.openfga_max_parallel_batches,
            consistency=settings.openfga_consistency,
            api_token=settings.openfga_api_token,
            exact_cache=settings.decision_cache_exact,
            server_cache_quiet_s=cache_quiet_s(cache_ttl, settings.openfga_request_timeout_s),
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
        # OpenFGA's change log, archived in the background (as-of replays, docs/audit.md).
        if settings.changelog_archive:
            gateway.changelog = await open_archiver(fga, settings.audit_dsn, data_dir)
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
        if self.changelog is not None:
            await self.changelog.close()
        for strategy in self.strategies.values():
            if isinstance(strategy, Adaptive):
                await strategy.pre.close()
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
        return await self._deprovision_principal(p, target)

    # -- sources and ingestion -------------------------------------------------------

    async def register_source(
        self, p: PrincipalContext, source_id: str, kind: str, config: Mapping[str, Any]
    ) -> SourceInfo:
        await self.require_admin(p)
        validate_id(source_id, "source")
        if kind not in SOURCE_KINDS:
            raise InvalidRequest(f"kind must be one of {sorted(SOURCE_KINDS)}")
        config = source_config(kind, config)
        if self.settings.environment == "production":
            refused = source_production_problems(kind, config)
            if refused:
                raise InvalidRequest(f"production refuses this source: {refused[0]}")
        await self._check_fronting(p.tenant, source_id, kind, config)
        existing = await self.catalog.get_source(p.tenant, source_id)
        if existing is not None:
            state = " (being removed)" if existing.state != "active" else ""
            raise Conflict(f"source {source_id} already exists{state}")
        tuples = source_tuples(p.tenant, source_id)
        details = {"source": source_id, "kind": kind, "writes": tuples_json(tuples)}
        async with self._admin_mutation(p, "source.register", details):
            await self.fga.write(tuples)
            info = await self.catalog.add_source(p.tenant, source_id, kind, dict(config))
        return _public(info)

    async def get_source(self, p: PrincipalContext, source_id: str) -> SourceInfo:
        """The source as admins see it (secrets of its config masked)."""
        return _public(await self._active_source(p, source_id))

    async def _active_source(self, p: PrincipalContext, source_id: str) -> SourceInfo:
        await self.require_admin(p)
        validate_id(source_id, "source")
        info = await self.catalog.get_source(p.tenant, source_id)
        if info is None or info.state != "active":
            raise NotFound(f"source {source_id} not found")
        return info

    async def list_sources(self, p: PrincipalContext) -> list[SourceInfo]:
        await self.require_admin(p)
        return [_public(i) for i in await self.catalog.list_sources(p.tenant)]

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
        info = await self._active_source(p, source_id)
        if is_fronted(info.config):
            raise InvalidRequest(f"source {source_id} fronts a collection: sync it instead")
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
        info = await self._active_source(p, source_id)
        if is_fronted(info.config):
            raise InvalidRequest(f"source {source_id} fronts a collection: delete upstream, sync")
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
                await self.stores.for_source(info).delete_documents(
                    p.tenant, source_id, [document_id]
                )
                await self.catalog.forget_document(p.tenant, document_id)
            finally:
                await self.catalog.release(claim)

    # -- fronted collections and ACL sync (gateway/sync.py) ----------------------------

    async def _check_fronting(
        self, tenant: str, source_id: str, kind: str, config: Mapping[str, Any]
    ) -> None:
        """A fronted collection serves one tenant: a second registration is refused."""
        if not is_fronted(config):
            return
        fronting = await self.catalog.fronting(kind, location(config), str(config["collection"]))
        if any(pair != (tenant, source_id) for pair in fronting):
            raise Conflict(f"collection {config['collection']} is already registered")

    async def sync_source(
        self,
        p: PrincipalContext,
        source_id: str,
        *,
        dry_run: bool = False,
        full: bool = False,
        progress: Any = None,
    ) -> dict[str, Any]:
        """Reconcile OpenFGA with the source's own ACLs (DESIGN section 4, gateway.sync).

        Returns ``{"writes", "deletes", "unchanged"}`` counts (with ``diff`` on a dry
        run, which writes nothing) plus what was found: ``documents``, ``problems``
        and, for fronted collections, ``orphans`` (chunks naming no document),
        ``inconsistent`` (documents whose chunks disagree; granted nothing) and
        ``skipped``: a fronted document whose ACL is the one the last sync wrote is not
        read back from OpenFGA unless ``full`` (which also repairs tuples changed there).
        A fronted source whose mapping names ``updated_at`` is read from the store only
        where it changed since the last completed sync's high-water mark (``since``),
        unless ``full`` or there is no mark yet; such a partial read cannot see documents
        removed upstream (only a full sync forgets them).
        """
        info = await self._active_source(p, source_id)
        syncer = SourceSync(self.fga, self.catalog)
        tenant = p.tenant
        rows = await self.catalog.source_documents(tenant, source_id)
        fronted = is_fronted(info.config)
        extra: dict[str, Any] = {}
        if fronted:
            since = None if full else await self.catalog.sync_mark(info)
            store = cast(FrontedStore, self.stores.for_source(info))
            scan = await store.scan_acls(since)
            acls = [a for i, a in scan.documents.items() if i not in scan.inconsistent]
            known = set() if scan.partial else {r[0] for r in rows}
            reconcile = sorted(known | set(scan.documents))
            extra = {"orphans": scan.orphans, "inconsistent": len(scan.inconsistent)}
            extra["since"] = since if scan.partial else None
        else:
            # Documents still being written are left to their ingestion.
            complete = [(r[0], r[1], r[2]) for r in rows if r[3] is not None]
            acls = managed_acls(complete)
            reconcile = [r[0] for r in complete]
        wanted = wanted_tuples(tenant, source_id, acls)
        skipped: set[str] = set()
        if fronted and not full:
            skipped = already_synced(acls, wanted, {r[0]: r[3] for r in rows})
            reconcile = [d for d in reconcile if d not in skipped]
        if fronted:
            extra["skipped"] = len(skipped)
        await syncer.check_owners(
            tenant, source_id, sorted(wanted.folders), sorted(wanted.documents)
        )
        _, owned_folders = await self.catalog.source_contents(tenant, source_id)
        if fronted and scan.partial:
            owned_folders = []  # a partial read knows the folders of what it read only
        docs, folders = await syncer.current(
            tenant, reconcile, sorted(set(wanted.folders) | set(owned_folders))
        )
        diff = plan(wanted.without(skipped), docs, folders, own_folders=fronted)
        diff.unchanged += sum(len(wanted.documents[d]) for d in skipped)
        result: dict[str, Any] = {
            **diff.counts(),
            "documents": len(wanted.documents),
            "problems": diff.problems,
            **extra,
        }
        if dry_run:
            return {**result, "dry_run": True, "diff": diff.diff(tenant)}
        details = {
            "source": source_id,
            "writes": tuples_json(diff.writes),
            "deletes": tuples_json(diff.deletes),
            "unchanged": diff.unchanged,
        }
        async with self._admin_mutation(p, "source.sync", details):
            if fronted:
                await self.catalog.claim(
                    tenant, source_id, diff.folders, diff.documents, lease=False
                )
            await syncer.apply(diff, progress)
            if fronted:
                gone = [] if scan.partial else sorted({r[0] for r in rows} - set(scan.documents))
                await self.catalog.complete_documents(
                    tenant,
                    [
                        (a.id, scan.chunks.get(a.id, 0), fronted_fingerprint(a),
                         a.folders[-1] if a.folders else None, a.to_dict())
                        for a in acls
                        if a.id in wanted.documents and a.id not in skipped
                    ]
                    + [(i, scan.chunks.get(i, 0), fronted_fingerprint(None), None, {})
                       for i in sorted(scan.inconsistent)],
                )  # fmt: skip
                await self.catalog.forget_documents(tenant, source_id, gone)
                if scan.high_water is not None:
                    await self.catalog.set_sync_mark(info, scan.high_water)
        return result

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
        """The requested (or all) active sources, after the directory freshness check:
        one catalog statement (:meth:`SourceCatalog.retrieval_view`)."""
        view = await self.catalog.retrieval_view(tenant)
        _refuse_stale_directory(view.directory)
        registered = {info.id: (info, count) for info, count in view.sources}
        names = list(requested) if requested else sorted(registered)
        handles = []
        for name in dict.fromkeys(names):
            validate_id(name, "source")
            found = registered.get(name)
            if found is None:
                raise NotFound(f"source {name} not found")
            info, count = found
            store = self.stores.for_source(info)
            # Ingestion records a managed source's content versions; a fronted
            # collection's text changes without the catalog knowing.
            versions = (
                None
                if is_fronted(info.config)
                else functools.partial(self.catalog.content_versions, tenant, source=name)
            )
            handles.append(
                SourceHandle(tenant, name, store, count, info.kind == "memory", versions)
            )
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
            await self._drop_outdated_content(ctx.tenant, outcome)
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

    async def _drop_outdated_content(self, tenant: str, outcome: RetrievalOutcome) -> None:
        """Release no text that a re-ingestion replaced while this request was running.

        A chunk read from the store before an update and checked after it would show
        the old text under the new ACL. Ingestion stamps every chunk with its content
        version and clears the catalog's fingerprint before it touches any tuple; read
        *after* the checks, the catalog then says whether the text checked is still the
        current one. Anything else (an update in flight, a newer text) denies the
        document for this request (``content_changed``). Chunks written before versions
        existed carry none and are judged by the catalog alone.
        """
        versions = {
            c.document_id: c.metadata.get(VERSION_KEY)
            for c in outcome.chunks
            if c.document_id is not None
        }
        if not versions:
            return
        current = await self.catalog.content_versions(tenant, list(versions))
        stale = {
            doc
            for doc, version in versions.items()
            if doc in current and not content_current(current[doc], version)
        }
        if stale:
            outcome.chunks = [c for c in outcome.chunks if c.document_id not in stale]
            for doc in stale:
                outcome.verdicts[doc] = DocumentVerdict(doc, "deny", (CONTENT_CHANGED,))

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
        if outcome is not None and OPENFGA_CACHE_NOTE in outcome.notes:
            # Some checks went out as MINIMIZE_LATENCY (OpenFGA's cache could answer).
            consistency = consistency.removesuffix("+cache") + "+openfga-cache+cache"
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
                # Where OpenFGA's change log stood: replays as of the decision start here.
                "changelog": decision_point(self.changelog, self.fga.store_id, started).to_dict(),
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
            await self.require_fresh_directory(ctx.tenant)
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
                # As a retrieval's: replays as of the decision start here.
                "changelog": decision_point(self.changelog, self.fga.store_id, started).to_dict(),
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

    # -- identity: the tenant's directory (SCIM), its freshness, token exchange --------
    #
    # SCIM requests come from the tenant's directory (its bearer secret), recorded as
    # the caller ``scim:directory``; the mapping itself is gateway.scim (pure). Every
    # SCIM mutation is an admin mutation (intent record first). Mutations of one tenant
    # take turns in this process; across replicas each one re-applies the whole state
    # of its resource, so a re-sent request repairs what a concurrent one left.

    SCIM_CALLER = "scim:directory"
    _SCIM_USER_FILTERS = {"username": "user_name_key", "externalid": "external_id", "id": "id"}
    _SCIM_GROUP_FILTERS = {"displayname": "display_key", "externalid": "external_id", "id": "id"}

    @functools.cached_property
    def oidc(self) -> OidcVerifier:
        """Verifier of the identity providers' tokens (``SCOPEGATE_OIDC_ISSUERS``)."""
        return OidcVerifier(self.settings.oidc_issuers, leeway_s=self.settings.token_leeway_s)

    @functools.cached_property
    def exchange_key(self) -> SigningKey:
        """The key that signs exchanged delegation tokens (see token_exchange)."""
        return exchange_signing_key(self.settings, self.signing_key)

    @functools.cached_property
    def _scim_locks(self) -> dict[str, asyncio.Lock]:
        return {}

    def _scim_lock(self, tenant: str) -> asyncio.Lock:
        return self._scim_locks.setdefault(tenant, asyncio.Lock())

    async def _tenant_caller(self, tenant: str, by: PrincipalContext | None) -> PrincipalContext:
        """An operator (``by`` None is the CLI on the data directory) or the tenant's admin."""
        validate_id(tenant, "tenant")
        if by is not None and not by.operator:
            if by.tenant != tenant:
                raise Forbidden("admins manage the directory of their own tenant only")
            await self.require_admin(by)
        if not await self.catalog.tenant_exists(tenant):
            raise NotFound(f"tenant {tenant} not found")
        if by is not None and not by.operator:
            return by
        # Recorded in the tenant concerned, as the operator bootstrap is.
        return PrincipalContext(tenant, "operator", by.token_id if by else "cli", operator=True)

    async def issue_scim_secret(
        self, tenant: str, by: PrincipalContext | None = None, *, keep_previous: bool = False
    ) -> dict[str, Any]:
        """A new SCIM bearer secret for ``tenant``: returned once, stored as a digest only.

        The tenant's previous secrets stop working unless ``keep_previous`` (for a
        rotation in which the directory is reconfigured after the new secret exists).
        """
        p = await self._tenant_caller(tenant, by)
        secret_id, secret = scim.new_secret()
        details = {"secret_id": secret_id, "keep_previous": keep_previous}
        async with self._admin_mutation(p, "scim.secret.issue", details) as result:
            revoked = await self.catalog.add_scim_secret(
                tenant, secret_id, scim.secret_digest(secret), keep_previous=keep_previous
            )
            result["revoked"] = revoked
        return {"tenant": tenant, "token": secret, "token_id": secret_id, "revoked": revoked}

    async def authenticate_scim(self, secret: str) -> PrincipalContext:
        """The tenant whose SCIM secret this is (InvalidToken otherwise)."""
        secret_id = scim.secret_id(secret)
        found = await self.catalog.scim_secret(secret_id) if secret_id else None
        if found is None or not scim.secret_matches(secret, found[1]):
            raise InvalidToken("invalid SCIM secret")
        return PrincipalContext(found[0], self.SCIM_CALLER, f"scim-secret:{secret_id}")

    async def scim_heard(self, p: PrincipalContext) -> None:
        """The directory spoke: its tenant is fresh again (see require_fresh_directory)."""
        await self.catalog.directory_heard(p.tenant)

    async def declare_directory(
        self,
        tenant: str,
        directory: str,
        max_silence_s: float | None = None,
        by: PrincipalContext | None = None,
    ) -> dict[str, Any]:
        """``scim``: the directory is the tenant's source of truth, and retrievals fail
        closed once it has been silent for ``max_silence_s``; ``none`` withdraws that."""
        p = await self._tenant_caller(tenant, by)
        if directory not in {"scim", "none"}:
            raise InvalidRequest("directory must be 'scim' or 'none'")
        if directory == "scim" and (max_silence_s is None or max_silence_s <= 0):
            raise InvalidRequest("a scim directory needs a positive max_silence_s")
        bound = max_silence_s if directory == "scim" else None
        details = {"directory": directory, "max_silence_s": bound}
        async with self._admin_mutation(p, "directory.declare", details):
            state = await self.catalog.declare_directory(tenant, directory, bound)
        return self._directory_json(state)

    async def directory_status(
        self, tenant: str, by: PrincipalContext | None = None
    ) -> dict[str, Any]:
        await self._tenant_caller(tenant, by)
        state = await self.catalog.directory(tenant)
        return self._directory_json(state or DirectoryState(tenant, "none", None, None, None))

    @staticmethod
    def _directory_json(state: DirectoryState) -> dict[str, Any]:
        def stamp(at: float | None) -> str | None:
            return None if at is None else datetime.fromtimestamp(at, UTC).isoformat()

        return {
            "tenant": state.tenant,
            "directory": state.source,
            "max_silence_s": state.max_silence_s,
            "declared_at": stamp(state.declared_at),
            "heard_at": stamp(state.heard_at),
            "stale": state.stale(time.time()),
        }

    async def require_fresh_directory(self, tenant: str) -> None:
        """IdentityStale (503) when the tenant's declared directory has been silent too long.

        Its lifecycle data may be out of date (a user deactivated upstream and not yet
        here): the tenant fails closed until the directory speaks again.
        """
        _refuse_stale_directory(await self.catalog.directory(tenant))

    # SCIM Users

    async def scim_users(
        self, p: PrincipalContext, filter_text: str | None, start: int = 1, count: int = 100
    ) -> tuple[list[ScimUserRecord], int]:
        """Users matching a filter (``userName``, ``externalId``, ``id``; ``eq`` and ``and``)."""
        filters: dict[str, str] = {}
        for clause in scim.parse_filter(filter_text):
            column = self._SCIM_USER_FILTERS.get(clause.attribute)
            if column is None:
                raise scim.invalid(
                    f"Users cannot be filtered by {clause.attribute}", "invalidFilter"
                )
            value = scim.name_key(clause.value) if column == "user_name_key" else clause.value
            if filters.setdefault(column, value) != value:
                return [], 0
        return await self.catalog.scim_users(p.tenant, filters, start, count)

    async def scim_user(self, p: PrincipalContext, resource_id: str) -> ScimUserRecord:
        found = await self.catalog.scim_user(p.tenant, id=resource_id)
        if found is None:
            raise NotFound(f"User {resource_id[:64]} not found")
        return found

    async def scim_user_groups(
        self, p: PrincipalContext, resource_id: str
    ) -> list[tuple[str, str]]:
        """``(group resource id, displayName)`` of the Groups a User belongs to."""
        groups = await self.catalog.scim_memberships(p.tenant, resource_id)
        return [(g.id, g.display_name) for g in groups]

    async def scim_create_user(
        self, p: PrincipalContext, body: Mapping[str, Any]
    ) -> ScimUserRecord:
        """POST /Users. A create re-sent for the same user (same ``userName``, and the
        same ``externalId`` when both have one) applies again to that user."""
        state = scim.parse_user(body)
        async with self._scim_lock(p.tenant):
            same = await self.catalog.scim_user(
                p.tenant, user_name_key=scim.name_key(state.user_name)
            )
            if same is not None:
                if None not in (same.external_id, state.external_id) and (
                    same.external_id != state.external_id
                ):
                    raise Conflict("a User with this userName exists")
                if state.external_id is None:
                    state = dataclasses.replace(state, external_id=same.external_id)
            return await self._scim_save_user(p, same, state, "scim.user.create")

    async def scim_replace_user(
        self, p: PrincipalContext, resource_id: str, body: Mapping[str, Any]
    ) -> ScimUserRecord:
        """PUT /Users/{id}. ``active`` and ``externalId`` left out keep their values."""
        async with self._scim_lock(p.tenant):
            before = await self.scim_user(p, resource_id)
            state = scim.parse_user(body, active_default=before.active)
            if state.external_id is None:
                state = dataclasses.replace(state, external_id=before.external_id)
            return await self._scim_save_user(p, before, state, "scim.user.replace")

    async def scim_patch_user(
        self, p: PrincipalContext, resource_id: str, body: Mapping[str, Any]
    ) -> ScimUserRecord:
        """PATCH /Users/{id}: ``active: false`` (or ``"False"``) deprovisions."""
        async with self._scim_lock(p.tenant):
            before = await self.scim_user(p, resource_id)
            patched = scim.apply_patch(self._user_state(before).document(), body)
            state = scim.parse_user(patched, active_default=before.active)
            return await self._scim_save_user(p, before, state, "scim.user.patch")

    async def scim_delete_user(self, p: PrincipalContext, resource_id: str) -> None:
        """DELETE /Users/{id}: deprovisioned as ``DELETE /v1/principals`` does, then gone."""
        async with self._scim_lock(p.tenant):
            before = await self.scim_user(p, resource_id)
            details = {"scim_id": before.id, "userName": before.user_name, "user": before.user_id}
            async with self._admin_mutation(p, "scim.user.delete", details):
                await self._deprovision_principal(p, TypedRef("user", before.user_id))
                await self.catalog.forget_scim_user(p.tenant, before.id)

    @staticmethod
    def _user_state(record: ScimUserRecord) -> scim.UserState:
        return scim.UserState(
            record.user_name, record.external_id, record.active, dict(record.attributes)
        )

    async def _scim_save_user(
        self,
        p: PrincipalContext,
        before: ScimUserRecord | None,
        state: scim.UserState,
        action: str,
    ) -> ScimUserRecord:
        """Store the User and make OpenFGA say what it says.

        Active: a tenant member, and a member of the Groups listing it. Inactive: the
        user id is deprovisioned (tasks revoked, nothing left) and its Group memberships
        are forgotten, so that reactivation revives only what the directory sends again.
        A changed ``userName`` is a new user id: the old one is deprovisioned.
        """
        tenant = p.tenant
        user_id = state.user_id
        if before is not None and scim.name_key(before.user_name) == scim.name_key(state.user_name):
            # userName is not case-sensitive: the same name in other letters is the same
            # user, never a new id.
            user_id = before.user_id
        resource_id = before.id if before is not None else uuid.uuid4().hex
        await self._scim_unique_user(tenant, resource_id, state, user_id)
        now = time.time()
        record = ScimUserRecord(
            tenant,
            resource_id,
            user_id,
            state.user_name,
            state.external_id,
            state.active,
            state.attributes,
            before.created_at if before is not None else now,
            now,
        )
        gone = [before.user_id] if before is not None and before.user_id != user_id else []
        if not state.active:
            gone.append(user_id)
        writes: list[Tuple] = []
        if state.active:
            who = fga_object("user", tenant, user_id)
            groups = await self.catalog.scim_memberships(tenant, resource_id)
            writes = [Tuple(who, "member", fga_object("tenant", tenant, tenant))]
            writes += [
                Tuple(who, "member", fga_object("group", tenant, g.group_id)) for g in groups
            ]
        details = {
            "scim_id": resource_id,
            "userName": state.user_name,
            "externalId": state.external_id,
            "user": user_id,
            "active": state.active,
            "deprovisions": [f"user:{u}" for u in gone],
            "writes": tuples_json(writes),
        }
        async with self._admin_mutation(p, action, details):
            for stale in dict.fromkeys(gone):
                await self._deprovision_principal(p, TypedRef("user", stale))
            if not state.active:
                await self.catalog.forget_scim_memberships(tenant, resource_id)
            await self.catalog.save_scim_user(record, scim.name_key(state.user_name))
            if writes:
                await self.fga.write(writes)
        return record

    async def _scim_unique_user(
        self, tenant: str, resource_id: str, state: scim.UserState, user_id: str
    ) -> None:
        checks = [
            ({"user_name_key": scim.name_key(state.user_name)}, "userName"),
            ({"user_id": user_id}, f"user id {user_id}"),
        ]
        if state.external_id is not None:
            checks.append(({"external_id": state.external_id}, "externalId"))
        for filters, what in checks:
            other = await self.catalog.scim_user(tenant, **filters)
            if other is not None and other.id != resource_id:
                raise Conflict(f"another User has this {what}")

    async def _deprovision_principal(self, p: PrincipalContext, target: TypedRef) -> dict[str, int]:
        """What ``deprovision`` does once the caller is authorized, recorded the same way.

        The directory's deactivations and deletes come through here: every relation of
        the principal in the tenant goes (membership first) and its tasks lose ``live``.
        """
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
        counts = {
            "relations_removed": len(relations),
            "tasks_revoked": len({t.object for t in lives}),
        }
        async with self._admin_mutation(p, "principal.deprovision", details) as result:
            # Membership first: from the first transaction on, the principal is inactive.
            deletes.sort(key=lambda t: t.object != f"tenant:{p.tenant}")
            await self.fga.write(deletes=deletes)
            result.update(counts)
        return counts

    # SCIM Groups

    async def scim_groups(
        self, p: PrincipalContext, filter_text: str | None, start: int = 1, count: int = 100
    ) -> tuple[list[ScimGroupRecord], int]:
        """Groups matching a filter (``displayName``, ``externalId``, ``id``, ``members``)."""
        filters: dict[str, str] = {}
        members: set[str] = set()
        for clause in scim.parse_filter(filter_text):
            if clause.attribute == "members":
                members.add(clause.value)
                continue
            column = self._SCIM_GROUP_FILTERS.get(clause.attribute)
            if column is None:
                raise scim.invalid(
                    f"Groups cannot be filtered by {clause.attribute}", "invalidFilter"
                )
            value = scim.name_key(clause.value) if column == "display_key" else clause.value
            if filters.setdefault(column, value) != value:
                return [], 0
        if len(members) > 1:
            found, _ = await self.catalog.scim_groups(p.tenant, filters, 1, 1_000_000)
            wanted = [
                g for g in found if members <= set(await self.catalog.scim_members(p.tenant, g.id))
            ]
            return wanted[start - 1 : start - 1 + count], len(wanted)
        member = next(iter(members), None)
        return await self.catalog.scim_groups(p.tenant, filters, start, count, member=member)

    async def scim_group(self, p: PrincipalContext, resource_id: str) -> ScimGroupRecord:
        found = await self.catalog.scim_group(p.tenant, id=resource_id)
        if found is None:
            raise NotFound(f"Group {resource_id[:64]} not found")
        return found

    async def scim_group_members(self, p: PrincipalContext, resource_id: str) -> list[str]:
        return await self.catalog.scim_members(p.tenant, resource_id)

    async def scim_create_group(
        self, p: PrincipalContext, body: Mapping[str, Any]
    ) -> ScimGroupRecord:
        """POST /Groups; a create re-sent for the same group applies again to it."""
        state = scim.parse_group(body)
        async with self._scim_lock(p.tenant):
            same = await self.catalog.scim_group(
                p.tenant, display_key=scim.name_key(state.display_name)
            )
            if same is not None:
                if None not in (same.external_id, state.external_id) and (
                    same.external_id != state.external_id
                ):
                    raise Conflict("a Group with this displayName exists")
                if state.external_id is None:
                    state = dataclasses.replace(state, external_id=same.external_id)
            return await self._scim_save_group(p, same, state, "scim.group.create")

    async def scim_replace_group(
        self, p: PrincipalContext, resource_id: str, body: Mapping[str, Any]
    ) -> ScimGroupRecord:
        async with self._scim_lock(p.tenant):
            before = await self.scim_group(p, resource_id)
            state = scim.parse_group(body)
            if state.external_id is None:
                state = dataclasses.replace(state, external_id=before.external_id)
            return await self._scim_save_group(p, before, state, "scim.group.replace")

    async def scim_patch_group(
        self, p: PrincipalContext, resource_id: str, body: Mapping[str, Any]
    ) -> ScimGroupRecord:
        """PATCH /Groups/{id}: members added, removed or replaced; a rename."""
        async with self._scim_lock(p.tenant):
            before = await self.scim_group(p, resource_id)
            members = await self.catalog.scim_members(p.tenant, before.id)
            current = scim.GroupState(
                before.display_name, before.external_id, tuple(members), dict(before.attributes)
            )
            state = scim.parse_group(scim.apply_patch(current.document(), body))
            return await self._scim_save_group(p, before, state, "scim.group.patch")

    async def scim_delete_group(self, p: PrincipalContext, resource_id: str) -> None:
        """DELETE /Groups/{id}: every user ``member`` tuple of the group goes.

        Grants that name the group (``group:G#member`` viewers) are the data owners'
        ACLs and stay: they no longer grant the directory's users anything.
        """
        async with self._scim_lock(p.tenant):
            before = await self.scim_group(p, resource_id)
            group = fga_object("group", p.tenant, before.group_id)
            deletes = [
                Tuple(t.user, t.relation, t.object)
                for t in await self.fga.read(relation="member", object=group)
                if t.user.startswith("user:")
            ]
            details = {
                "scim_id": before.id,
                "displayName": before.display_name,
                "group": before.group_id,
                "deletes": tuples_json(deletes),
            }
            async with self._admin_mutation(p, "scim.group.delete", details):
                await self.fga.write(deletes=deletes)
                await self.catalog.forget_scim_group(p.tenant, before.id)

    async def _scim_save_group(
        self,
        p: PrincipalContext,
        before: ScimGroupRecord | None,
        state: scim.GroupState,
        action: str,
    ) -> ScimGroupRecord:
        """Store the Group and make its ``member`` tuples exactly its active Users.

        The directory is the source of truth for the group's users: user members written
        by other means are removed (agents and groups that admins made members stay). A
        new ``displayName`` is a new group id: its users move to it (grants naming the
        old id stay, and grant them nothing).
        """
        tenant = p.tenant
        users = await self._scim_member_users(tenant, state.members)
        group_id = state.group_id
        same_name = before is not None and (
            scim.name_key(before.display_name) == scim.name_key(state.display_name)
        )
        if before is not None and same_name:
            group_id = before.group_id  # displayName is not case-sensitive either
        resource_id = before.id if before is not None else uuid.uuid4().hex
        await self._scim_unique_group(tenant, resource_id, state, group_id)
        group = fga_object("group", tenant, group_id)
        wanted = {
            Tuple(fga_object("user", tenant, u.user_id), "member", group) for u in users if u.active
        }
        objects = [group]
        if before is not None and before.group_id != group_id:
            objects.append(fga_object("group", tenant, before.group_id))
        existing = {
            Tuple(t.user, t.relation, t.object)
            for batch in await asyncio.gather(
                *(self.fga.read(relation="member", object=o) for o in objects)
            )
            for t in batch
            if t.user.startswith("user:")
        }
        writes = sorted(wanted - existing, key=lambda t: t.user)
        deletes = sorted(existing - wanted, key=lambda t: (t.object, t.user))
        now = time.time()
        record = ScimGroupRecord(
            tenant,
            resource_id,
            group_id,
            state.display_name,
            state.external_id,
            state.attributes,
            before.created_at if before is not None else now,
            now,
        )
        details = {
            "scim_id": resource_id,
            "displayName": state.display_name,
            "externalId": state.external_id,
            "group": group_id,
            "members": [u.user_id for u in users],
            "writes": tuples_json(writes),
            "deletes": tuples_json(deletes),
        }
        async with self._admin_mutation(p, action, details):
            await self.catalog.save_scim_group(
                record, scim.name_key(state.display_name), [u.id for u in users]
            )
            await self.fga.write(writes, deletes)
        return record

    async def _scim_member_users(self, tenant: str, members: Sequence[str]) -> list[ScimUserRecord]:
        users = []
        for member in members:
            user = await self.catalog.scim_user(tenant, id=member)
            if user is None:
                if await self.catalog.scim_group(tenant, id=member) is not None:
                    raise InvalidRequest("nested groups are not supported: members are Users")
                raise InvalidRequest(f"member {member[:64]!r} is not a User of this directory")
            users.append(user)
        return users

    async def _scim_unique_group(
        self, tenant: str, resource_id: str, state: scim.GroupState, group_id: str
    ) -> None:
        checks = [
            ({"display_key": scim.name_key(state.display_name)}, "displayName"),
            ({"group_id": group_id}, f"group id {group_id}"),
        ]
        if state.external_id is not None:
            checks.append(({"external_id": state.external_id}, "externalId"))
        for filters, what in checks:
            other = await self.catalog.scim_group(tenant, **filters)
            if other is not None and other.id != resource_id:
                raise Conflict(f"another Group has this {what}")

    # Token exchange (RFC 8693)

    async def exchange_token(
        self, request: ExchangeRequest, request_id: str | None = None
    ) -> dict[str, Any]:
        """A short-lived delegation token for the user of ``subject_token``, acting
        through the agent of ``actor_token`` on ``task`` (or a new task for ``scope``).

        Refused (403) unless the task is bound to that user and agent in their tenant,
        is live, and both are active members, whatever the tokens' signatures say; 503
        ``identity_stale`` when the tenant's directory is stale. The token lives
        ``exchange_token_ttl_s`` at most and never past the subject token. Every answer
        once the tokens are verified is an audit record (``token_exchange``), written
        before the answer.
        """
        user = await self.oidc.verify_user(request.subject_token)
        agent = await self.oidc.verify_agent(request.actor_token)
        if agent.tenant != user.tenant:
            raise InvalidToken("the subject and actor tokens belong to different tenants")
        tenant = user.tenant
        request_id = request_id or uuid.uuid4().hex
        started = time.monotonic()
        agent_id = scim.directory_id(agent.name, "agent")
        user_id: str | None = None
        task: str | None = request.task
        created_task: str | None = None
        issued: dict[str, Any] = {}
        answer: dict[str, Any] = {}
        failed: list[str] = []
        error: ScopegateError | None = None
        try:
            await self.require_fresh_directory(tenant)
            user_id = await self._exchange_user(tenant, user)
            if task is None:
                failed = await self._failed_checks(tenant, user_id, agent_id, None)
                if failed:
                    raise Forbidden("the user and the agent must be active members of the tenant")
                p = PrincipalContext(tenant, user_id, user.token_id)
                expires = datetime.fromtimestamp(
                    time.time() + self.settings.exchange_task_ttl_s, UTC
                )
                task = created_task = await self.create_task(
                    p, f"user:{user_id}", f"agent:{agent_id}", list(request.scope), expires
                )
            failed = await self._failed_checks(tenant, user_id, agent_id, task)
            if failed:
                raise Forbidden(
                    "the task is not bound to this user and agent, or one of them is not an "
                    "active member of the tenant"
                )
            ttl = min(self.settings.exchange_token_ttl_s, remaining_s(user.expires_at))
            if ttl < 1:
                raise InvalidToken("the subject token expires too soon")
            token = issue_token(
                self.exchange_key,
                issuer=self.settings.token_issuer,
                audience=self.settings.token_audience,
                tenant=tenant,
                user=user_id,
                agent=agent_id,
                task=task,
                ttl_s=ttl,
            )
            claims = jwt.decode(token, options={"verify_signature": False})
            issued = {"jti": claims["jti"], "expires_at": claims["exp"]}
            answer = {
                "access_token": token,
                "issued_token_type": ACCESS_TOKEN,
                "token_type": "Bearer",
                "expires_in": ttl,
                "task": task,
            }
        except ScopegateError as exc:
            error = exc
        except Exception as exc:
            error = ScopegateError("internal error", detail=f"{type(exc).__name__}: {exc}"[:500])
        if error is None:
            outcome = "allowed"
        else:
            outcome = "denied" if isinstance(error, Forbidden) else "error"
        record = AuditRecord(
            request_id=request_id,
            time=datetime.now(UTC).isoformat(),
            tenant=tenant,
            user=user_id or user.name,
            agent=agent_id,
            task=task,
            token_id=str(issued.get("jti", user.token_id)),
            kind="token_exchange",
            query=None,
            query_hash=None,
            sources=(),
            strategy="",
            store_id=self.fga.store_id,
            model_id=self.fga.model_id,
            consistency="HIGHER_CONSISTENCY",
            k=0,
            candidates=(),
            returned_chunk_ids=(),
            outcome=outcome,
            error_code=error.code if error is not None else None,
            latency_ms=round((time.monotonic() - started) * 1000, 3),
            extra={
                "action": "token.exchange",
                "subject_issuer": user.issuer.issuer,
                "subject_token_id": user.token_id,
                "subject_token_type": request.subject_token_type,
                "actor_issuer": agent.issuer.issuer,
                "actor_token_id": agent.token_id,
                "created_task": created_task,
                "scope": list(request.scope),
                "failed_checks": failed,
                "issued": issued,
                "error": error.message if error is not None else None,
                "error_detail": error.detail if error is not None else None,
            },
        )
        await self.audit.append(record)
        if error is not None:
            raise error
        return answer

    async def _exchange_user(self, tenant: str, user: VerifiedUser) -> str:
        """The scopegate user of a verified user token, by its issuer's ``user_match``."""
        match = user.issuer.user_match
        if match == "id":
            return scim.directory_id(user.name, "user")
        if match == "userName":
            found = await self.catalog.scim_user(tenant, user_name_key=scim.name_key(user.name))
        else:
            found = await self.catalog.scim_user(tenant, external_id=user.name)
        if found is None:
            raise Forbidden("the user was not provisioned by the tenant's directory")
        return found.user_id

    async def _failed_checks(
        self, tenant: str, user: str, agent: str, task: str | None
    ) -> list[str]:
        """The request-level conjuncts of DESIGN section 2 that do not hold, from OpenFGA.

        Without a task, only the two memberships. An unanswered check is
        authorization_unavailable, never a pass.
        """
        ctx = DelegationContext(tenant, user, agent, task or "none", "", 0)
        items = request_checks(ctx)
        if task is None:
            items = [i for i in items if i.name in {CheckName.USER_ACTIVE, CheckName.AGENT_ACTIVE}]
        outcomes = await self.fga.batch_check(items, consistency="HIGHER_CONSISTENCY")
        failed = []
        for item in items:
            outcome = outcomes.get(item)
            if outcome is None or outcome.allowed is None:
                raise AuthorizationUnavailable("authorization checks went unanswered")
            if not outcome.allowed:
                failed.append(item.name.value)
        return failed

    # -- health ------------------------------------------------------------------------

    async def readiness(self) -> dict[str, bool]:
        fga_ok, stores_ok, audit_ok = await asyncio.gather(
            self.fga.healthy(), self.stores.healthy(), self.audit.healthy()
        )
        return {"openfga": fga_ok, "stores": stores_ok, "audit": audit_ok}


def _refuse_stale_directory(state: DirectoryState | None) -> None:
    """IdentityStale when a declared directory has been silent past its bound."""
    if state is not None and state.stale(time.time()):
        raise IdentityStale(
            "the tenant's directory has been silent past its freshness bound",
            detail=f"last heard {state.heard_at}, bound {state.max_silence_s} s",
        )


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


def _public(info: SourceInfo) -> SourceInfo:
    """``info`` with the secrets of its config masked (what the API and the CLI show)."""
    return dataclasses.replace(info, config=public_config(info.config))

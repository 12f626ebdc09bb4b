"""CLI commands that act on a gateway: in-process on the data directory, or over HTTP.

A running ``scopegate serve`` on the same data directory is found through its
``runtime.json`` and used over HTTP, so two processes never drive one embedded
OpenFGA datastore at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from gateway.cli import dump, expires
from gateway.client import AsyncScopegateClient
from gateway.errors import InvalidRequest
from gateway.files import IngestBatch, LinkFolders, collect, ingest_files, is_file_input
from gateway.identity import (
    PrincipalContext,
    issue_token,
    load_or_create_signing_key,
    parse_ttl,
)
from gateway.service import Gateway
from gateway.settings import load_settings


def running_url(data_dir: Path) -> str | None:
    """The URL of a live ``serve`` on this data directory, if any."""
    runtime = data_dir / "runtime.json"
    if not runtime.exists():
        return None
    try:
        url = str(json.loads(runtime.read_text())["url"])
        httpx.get(f"{url}/healthz", timeout=1.0).raise_for_status()
    except (ValueError, KeyError, httpx.HTTPError):
        return None
    return url


@contextlib.asynccontextmanager
async def local_gateway(data_dir: Path) -> AsyncIterator[Gateway]:
    """The embedded gateway for one command. It runs no change-log archiver: archiving
    is the long-running ``serve``'s work (a replay as of a decision reads the log
    itself when no archiver runs), and a command should not wait for a first poll."""
    gateway = await Gateway.start(load_settings(data_dir=data_dir, changelog_archive=False))
    try:
        yield gateway
    finally:
        await gateway.close()


def _local_token(
    data_dir: Path, env_var: str, *, tenant: str, user: str, operator: bool = False
) -> str:
    """A token from ``env_var`` if set, else one minted with the data directory's key."""
    env = os.environ.get(env_var)
    if env:
        return env
    settings = load_settings(data_dir=data_dir)
    key = load_or_create_signing_key(data_dir)
    return issue_token(
        key,
        issuer=settings.token_issuer,
        audience=settings.token_audience,
        tenant=tenant,
        user=user,
        ttl_s=600,
        operator=operator,
    )


def _principal_token(args: argparse.Namespace, data_dir: Path) -> str:
    return _local_token(data_dir, "SCOPEGATE_TOKEN", tenant=args.tenant, user=args.as_user)


def _operator_token(data_dir: Path) -> str:
    return _local_token(
        data_dir, "SCOPEGATE_OPERATOR_TOKEN", tenant="platform", user="operator", operator=True
    )


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The objects of a JSON Lines file (``-`` is stdin), each line numbered in errors."""
    try:
        with contextlib.ExitStack() as stack:
            handle = sys.stdin if str(path) == "-" else stack.enter_context(path.open())
            for number, line in enumerate(handle, 1):
                if line.strip():
                    yield _json_object(line, f"{path}:{number}")
    except OSError as exc:
        raise InvalidRequest(f"{path}: {exc.strerror or exc}") from exc


def _json_object(line: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{where}: not JSON") from exc
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}: not a JSON object")
    return value


RELATIONSHIP_KEYS = ("user", "relation", "object")
# The gateway takes at most this many relationship changes per call.
RELATIONSHIPS_PER_CALL = 500


def relationships_of(args: argparse.Namespace) -> list[dict[str, str]]:
    """The relationships a command names: --user/--relation/--object, --tuple, --file."""
    single = [args.user, args.relation, args.object]
    found: list[dict[str, str]] = []
    if any(single):
        if not all(single):
            raise InvalidRequest("--user, --relation and --object go together")
        found.append(dict(zip(RELATIONSHIP_KEYS, single, strict=True)))
    found.extend(args.tuples)
    if args.file is not None:
        for number, item in enumerate(_jsonl(args.file), 1):
            if set(item) != set(RELATIONSHIP_KEYS) or not all(
                isinstance(v, str) for v in item.values()
            ):
                raise InvalidRequest(
                    f'{args.file}: entry {number} is not {{"user", "relation", "object"}}'
                )
            found.append({key: item[key] for key in RELATIONSHIP_KEYS})
    if not found:
        raise InvalidRequest(
            "name relationships with --user/--relation/--object, --tuple or --file"
        )
    return found


Relationships = list[dict[str, str]]


async def change_relationships(
    name: str,
    args: argparse.Namespace,
    write: Callable[[Relationships, Relationships], Awaitable[object]],
) -> None:
    """``relationships write|delete``: in calls of at most 500, each one atomic."""
    items = relationships_of(args)
    key = "written" if name == "relationships_write" else "deleted"
    totals = {"written": 0, "deleted": 0}
    for start in range(0, len(items), RELATIONSHIPS_PER_CALL):
        batch = items[start : start + RELATIONSHIPS_PER_CALL]
        await (write(batch, []) if key == "written" else write([], batch))
        totals[key] += len(batch)
    dump(totals)


def _report_deprovision(ref: str, counts: dict[str, int]) -> None:
    dump(counts)
    print(
        f"scopegate: {ref} deprovisioned: {counts['relations_removed']} relations removed, "
        f"{counts['tasks_revoked']} tasks revoked",
        file=sys.stderr,
    )


async def _ingest_files(
    args: argparse.Namespace,
    ingest: IngestBatch,
    existing: set[str] | None,
    link: LinkFolders | None = None,
) -> dict[str, Any]:
    """``ingest S PATH`` for a directory or files (gateway/files.py)."""
    collected = collect(args.file, getattr(args, "acl", None))
    with tqdm(total=len(collected.documents), desc="ingest", unit="file") as bar:
        return await ingest_files(
            collected,
            ingest,
            batch_size=args.batch,
            existing=existing,
            progress=bar.update,
            source=args.source_id,
            link=link,
        )


async def run_command(args: argparse.Namespace, data_dir: Path) -> int:
    url = args.url or running_url(data_dir)
    name = "_".join(
        str(part)
        for part in (
            args.command,
            getattr(args, f"{args.command}_command", None),
        )
        if part
    )
    if name == "tenant_create":
        if url is None:
            async with local_gateway(data_dir) as g:
                await g.create_tenant(args.tenant, args.admin)
        else:
            token = _operator_token(data_dir)
            async with AsyncScopegateClient(url, token) as client:
                await client.request(
                    "POST", "/v1/tenants", {"id": args.tenant, "admin": args.admin}
                )
        print(f"tenant {args.tenant} created; admin: {args.admin}")
        return 0
    if name in {"tenant_scim-token", "tenant_directory"}:
        return await _tenant_directory(name, args, url, data_dir)
    if name in {"audit_verify", "audit_purge"} and args.url is None:
        # Reads the store directly: safe beside a running serve (SQLite WAL, or PostgreSQL).
        from gateway.audit import open_audit_store
        from gateway.audit_cli import purge_audit, verify_audit

        store = open_audit_store(load_settings(data_dir=data_dir).audit_dsn, data_dir)
        try:
            if name == "audit_purge":
                return await purge_audit(store, args.older_than_days)
            return await verify_audit(store)
        finally:
            await store.close()
    if name == "audit_purge":
        print("scopegate: audit purge works on the store itself: use --data-dir", file=sys.stderr)
        return 2
    if name == "audit_export" and url is not None:
        from gateway.audit_cli import export_over_http

        return await export_over_http(url, _principal_token(args, data_dir), args.output)
    if name == "retrieve":
        target = url or "local"
        if url is None:
            async with local_gateway(data_dir) as g:
                ctx = await g.verifier.averify_delegation(args.token)
                dump((await g.retrieve(ctx, args.query, args.k)).to_dict())
            return 0
        async with AsyncScopegateClient(target, args.token) as client:
            found = await client.retrieve(args.query, args.k)
            dump(
                {
                    "request_id": found.request_id,
                    "chunks": [dataclasses.asdict(c) for c in found.chunks],
                }
            )
        return 0
    if url is not None:
        async with AsyncScopegateClient(url, _principal_token(args, data_dir)) as client:
            return await _over_http(name, args, client)
    async with local_gateway(data_dir) as g:
        p = PrincipalContext(args.tenant, args.as_user, f"cli-{uuid.uuid4().hex[:8]}")
        return await _in_process(name, args, g, p)


async def _tenant_directory(
    name: str, args: argparse.Namespace, url: str | None, data_dir: Path
) -> int:
    """``tenant scim-token`` and ``tenant directory``, as the platform operator."""
    declare = getattr(args, "directory", None)
    bound = parse_ttl(args.max_silence) if getattr(args, "max_silence", None) else None
    if name == "tenant_directory" and bound is not None and declare != "scim":
        raise InvalidRequest("--max-silence goes with --set scim")
    if url is None:
        async with local_gateway(data_dir) as g:
            if name == "tenant_scim-token":
                result = await g.issue_scim_secret(args.tenant, keep_previous=args.keep_previous)
            elif declare is not None:
                result = await g.declare_directory(args.tenant, declare, bound)
            else:
                result = await g.directory_status(args.tenant)
    else:
        path = f"/v1/tenants/{args.tenant}"
        async with AsyncScopegateClient(url, _operator_token(data_dir)) as client:
            if name == "tenant_scim-token":
                body = {"keep_previous": args.keep_previous}
                result = await client.request("POST", f"{path}/scim-token", body)
            elif declare is not None:
                body = {"directory": declare, "max_silence_s": bound}
                result = await client.request("PUT", f"{path}/directory", body)
            else:
                result = await client.request("GET", f"{path}/directory", retry=True)
    if name == "tenant_directory":
        dump(result)
        return 0
    # The secret alone on stdout (for a pipe into the identity provider's settings);
    # it is stored as a digest only and cannot be shown again.
    print(result["token"])
    print(
        f"scopegate: SCIM secret {result['token_id']} for tenant {args.tenant} (shown once); "
        f"{result['revoked']} previous secret(s) revoked. SCIM base URL: <gateway URL>/scim/v2",
        file=sys.stderr,
    )
    return 0


async def _over_http(name: str, args: argparse.Namespace, c: AsyncScopegateClient) -> int:
    if name == "task_create":
        body: dict[str, Any] = {"user": args.user, "agent": args.agent, "scope": args.scope}
        if args.expires_in:
            body["expires_at"] = expires(args.expires_in).isoformat()  # type: ignore[union-attr]
        dump(await c.request("POST", "/v1/tasks", body))
    elif name == "task_revoke":
        await c.request("DELETE", f"/v1/tasks/{args.task_id}")
        print(f"task {args.task_id} revoked")
    elif name == "sources_add":
        dump(
            await c.request(
                "POST",
                "/v1/sources",
                {"id": args.source_id, "kind": args.kind, "config": json.loads(args.config)},
            )
        )
    elif name == "sources_list":
        dump([s.to_dict() for s in await c.list_sources()])
    elif name == "sources_show":
        dump((await c.get_source(args.source_id)).to_dict())
    elif name == "sources_sync":
        body = {"dry_run": args.dry_run, "full": args.full}
        dump(await c.request("POST", f"/v1/sources/{args.source_id}/sync", body))
    elif name == "sources_remove":
        await c.remove_source(args.source_id)
        print(f"source {args.source_id} removed")
    elif name == "documents_delete":
        await c.delete_document(args.source_id, args.document_id)
        print(f"document {args.document_id} deleted from source {args.source_id}")
    elif name in {"relationships_write", "relationships_delete"}:
        await change_relationships(name, args, c.write_relationships)
    elif name == "relationships_list":
        dump(await c.list_relationships(object=args.object, user=args.user))
    elif name == "principals_deprovision":
        _report_deprovision(args.ref, await c.deprovision(args.ref))
    elif name == "ingest" and is_file_input(args.file):

        async def post(batch: list[dict[str, Any]]) -> dict[str, Any]:
            path = f"/v1/sources/{args.source_id}/documents"
            return dict(await c.request("POST", path, {"documents": batch}))

        dump(await _ingest_files(args, post, None, lambda w: c.write_relationships(w, [])))
    elif name == "ingest":
        docs = list(_jsonl(args.file))
        with tqdm(total=len(docs), desc="ingest", unit="doc") as bar:
            summary = await c.ingest(
                args.source_id, docs, batch_size=args.batch, progress=bar.update
            )
        dump(dataclasses.asdict(summary))
    elif name == "audit_list":
        params = {"limit": args.limit, **({"outcome": args.outcome} if args.outcome else {})}
        dump(await c.request("GET", "/v1/audit/decisions", params=params))
    elif name == "audit_show":
        dump(await c.request("GET", f"/v1/audit/decisions/{args.request_id}"))
    elif name in {"audit_replay", "audit_history"}:
        from gateway.audit_cli import replay_or_history_over_http

        await replay_or_history_over_http(name, args, c)
    else:
        print(f"scopegate: '{name.replace('_', ' ')}' is not available over --url", file=sys.stderr)
        return 2
    return 0


async def _in_process(name: str, args: argparse.Namespace, g: Gateway, p: PrincipalContext) -> int:
    if name == "task_create":
        task_id = await g.create_task(
            p, args.user, args.agent, args.scope, expires(args.expires_in)
        )
        dump({"task_id": task_id})
    elif name == "task_revoke":
        await g.revoke_task(p, args.task_id)
        print(f"task {args.task_id} revoked")
    elif name == "sources_add":
        info = await g.register_source(p, args.source_id, args.kind, json.loads(args.config))
        dump({"id": info.id, "kind": info.kind, "config": info.config})
    elif name == "sources_list":
        dump([{"id": s.id, "kind": s.kind, "config": s.config} for s in await g.list_sources(p)])
    elif name == "sources_show":
        info = await g.get_source(p, args.source_id)
        documents = await g.catalog.document_count(p.tenant, info.id)
        dump({"id": info.id, "kind": info.kind, "config": info.config, "documents": documents})
    elif name == "sources_sync":
        with tqdm(desc="sync", unit="tuple", disable=args.dry_run) as bar:
            dump(
                await g.sync_source(
                    p, args.source_id, dry_run=args.dry_run, full=args.full, progress=bar.update
                )
            )
    elif name == "sources_remove":
        await g.remove_source(p, args.source_id)
        print(f"source {args.source_id} removed")
    elif name == "documents_delete":
        await g.delete_document(p, args.source_id, args.document_id)
        print(f"document {args.document_id} deleted from source {args.source_id}")
    elif name in {"relationships_write", "relationships_delete"}:
        await change_relationships(name, args, lambda w, d: g.write_relationships(p, w, d))
    elif name == "relationships_list":
        dump(await g.list_relationships(p, object=args.object, user=args.user))
    elif name == "principals_deprovision":
        _report_deprovision(args.ref, await g.deprovision(p, args.ref))
    elif name == "ingest" and is_file_input(args.file):
        await g.get_source(p, args.source_id)
        rows = await g.catalog.source_documents(p.tenant, args.source_id)
        existing = {r[0] for r in rows if r[3] is not None}
        dump(
            await _ingest_files(
                args,
                lambda batch: g.ingest(p, args.source_id, batch),
                existing,
                lambda w: g.write_relationships(p, w, []),
            )
        )
    elif name == "ingest":
        docs = list(_jsonl(args.file))
        with tqdm(total=len(docs), desc="ingest", unit="doc") as bar:
            summary = await g.ingest(p, args.source_id, docs, progress=bar.update)
        dump(summary)
    elif name in {"audit_list", "audit_show", "audit_replay", "audit_history", "audit_export"}:
        from gateway.audit_cli import audit_in_process

        return await audit_in_process(name, args, g, p)
    else:
        print(f"scopegate: unknown command {name}", file=sys.stderr)
        return 2
    return 0

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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from gateway.cli import dump, expires
from gateway.client import AsyncScopegateClient
from gateway.errors import InvalidRequest
from gateway.identity import PrincipalContext, issue_token, load_or_create_signing_key
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
    gateway = await Gateway.start(load_settings(data_dir=data_dir))
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
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidRequest(f"{path}:{number}: not JSON") from exc


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
                ctx = g.verifier.verify_delegation(args.token)
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
    elif name == "ingest":
        docs = list(_jsonl(args.file))
        totals = {"documents": 0, "chunks": 0}
        with tqdm(total=len(docs), desc="ingest", unit="doc") as bar:
            for i in range(0, len(docs), args.batch):
                batch = docs[i : i + args.batch]
                done = await c.request(
                    "POST", f"/v1/sources/{args.source_id}/documents", {"documents": batch}
                )
                totals = {k: totals[k] + int(done[k]) for k in totals}
                bar.update(len(batch))
        dump(totals)
    elif name == "audit_list":
        params = {"limit": args.limit, **({"outcome": args.outcome} if args.outcome else {})}
        dump(await c.request("GET", "/v1/audit/decisions", params=params))
    elif name == "audit_show":
        dump(await c.request("GET", f"/v1/audit/decisions/{args.request_id}"))
    elif name == "audit_replay":
        dump(await c.request("POST", f"/v1/audit/decisions/{args.request_id}/replay"))
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
    elif name == "ingest":
        docs = list(_jsonl(args.file))
        with tqdm(total=len(docs), desc="ingest", unit="doc") as bar:
            summary = await g.ingest(p, args.source_id, docs, progress=bar.update)
        dump(summary)
    elif name in {"audit_list", "audit_show", "audit_replay", "audit_export"}:
        from gateway.audit_cli import audit_in_process

        return await audit_in_process(name, args, g, p)
    else:
        print(f"scopegate: unknown command {name}", file=sys.stderr)
        return 2
    return 0

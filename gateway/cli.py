"""The ``scopegate`` command (DESIGN §5).

Every command takes ``--data-dir`` (the embedded default) and ``--url`` (a running
gateway). Without ``--url`` a command that needs the gateway runs one in-process on
the data directory; ``serve`` writes ``runtime.json`` there so other commands find
the running server and talk to it over HTTP instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.errors import ScopegateError
from gateway.identity import issue_token, load_or_create_signing_key, parse_ttl
from gateway.settings import DEFAULT_DATA_DIR, load_settings


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"data directory of the embedded gateway (default {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("SCOPEGATE_URL"),
        help="talk to a running gateway at this URL instead",
    )


def _data_dir(args: argparse.Namespace) -> Path:
    if args.data_dir is not None:
        return Path(args.data_dir)
    return Path(os.environ.get("SCOPEGATE_DATA_DIR", str(DEFAULT_DATA_DIR)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scopegate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway (managed OpenFGA, Chroma, audit)")
    _common(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)

    demo = sub.add_parser("demo", help="multi-tenant demo: allowed, blocked, audit, replay")
    _common(demo)
    demo.add_argument("--documents", type=int, default=360)

    token = sub.add_parser("token", help="delegation and principal tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    issue = token_sub.add_parser("issue", help="print a signed JWT")
    _common(issue)
    issue.add_argument("--user", required=True)
    issue.add_argument("--tenant", required=True)
    issue.add_argument("--agent")
    issue.add_argument("--task")
    issue.add_argument("--ttl", default="15m", help="lifetime: 90s, 15m, 2h")
    issue.add_argument(
        "--operator",
        action="store_true",
        help="a platform operator token (may create tenants over --url)",
    )

    tenant = sub.add_parser("tenant", help="tenants")
    tenant_sub = tenant.add_subparsers(dest="tenant_command", required=True)
    create = tenant_sub.add_parser("create", help="bootstrap a tenant and its first admin")
    _common(create)
    create.add_argument("tenant")
    create.add_argument("--admin", required=True)

    task = sub.add_parser("task", help="delegated tasks")
    task_sub = task.add_subparsers(dest="task_command", required=True)
    tcreate = task_sub.add_parser("create", help="create a task for a user and an agent")
    _common(tcreate)
    _as(tcreate)
    tcreate.add_argument("--user", required=True)
    tcreate.add_argument("--agent", required=True)
    tcreate.add_argument(
        "--scope",
        action="append",
        required=True,
        help="source:ID, folder:ID or document:ID (repeatable)",
    )
    tcreate.add_argument("--expires-in", help="e.g. 2h")
    trevoke = task_sub.add_parser("revoke", help="revoke a task")
    _common(trevoke)
    _as(trevoke)
    trevoke.add_argument("task_id")

    sources = sub.add_parser("sources", help="data sources")
    sources_sub = sources.add_subparsers(dest="sources_command", required=True)
    sadd = sources_sub.add_parser("add", help="register a source")
    _common(sadd)
    _as(sadd)
    sadd.add_argument("source_id")
    sadd.add_argument("--kind", default="chroma")
    sadd.add_argument("--config", default="{}", help="JSON object, e.g. '{\"url\": ...}'")
    slist = sources_sub.add_parser("list", help="list sources")
    _common(slist)
    _as(slist)

    ingest = sub.add_parser("ingest", help="ingest documents from a JSON Lines file")
    _common(ingest)
    _as(ingest)
    ingest.add_argument("source_id")
    ingest.add_argument(
        "file", type=Path, help='one {"id", "text", "folder"?, "metadata"?, "acl"} per line'
    )
    ingest.add_argument("--batch", type=int, default=50)

    retrieve = sub.add_parser("retrieve", help="retrieve as an agent (delegation token)")
    _common(retrieve)
    retrieve.add_argument("query")
    retrieve.add_argument("--token", required=True)
    retrieve.add_argument("-k", type=int, default=5)

    audit = sub.add_parser("audit", help="the decision log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    for name, helptext in (
        ("list", "list decisions"),
        ("show", "show one decision"),
        ("replay", "re-evaluate a decision now"),
        ("verify", "verify the hash chain"),
        ("export", "export as JSON Lines"),
        ("purge", "delete records older than N days (keeps the chain verifiable)"),
    ):
        cmd = audit_sub.add_parser(name, help=helptext)
        _common(cmd)
        if name in {"list", "show", "replay", "export"}:
            _as(cmd)
        if name in {"show", "replay"}:
            cmd.add_argument("request_id")
        if name == "list":
            cmd.add_argument("--outcome")
            cmd.add_argument("--limit", type=int, default=20)
        if name == "export":
            cmd.add_argument(
                "--output", "-o", type=Path, help="write JSON Lines here (mode 0600), not stdout"
            )
        if name == "purge":
            cmd.add_argument(
                "--older-than-days", type=float, required=True, help="retention period in days"
            )

    mcp = sub.add_parser("mcp", help="serve the MCP tools (retrieve, list_sources)")
    _common(mcp)
    mcp.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    mcp.add_argument("--host", default="127.0.0.1", help="HTTP transport bind address")
    mcp.add_argument("--port", type=int, default=8090)
    return parser


def _as(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", required=True, help="the caller's tenant")
    parser.add_argument("--as", dest="as_user", required=True, help="the calling user (admin)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ScopegateError as exc:
        print(f"scopegate: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    if command == "serve":
        return _serve(args)
    if command == "demo":
        from gateway.demo import run_demo

        return asyncio.run(run_demo(_data_dir(args), documents=args.documents))
    if command == "token":
        return _token(args)
    if command == "mcp":
        from gateway.mcp_server import run_mcp

        return run_mcp(args)
    from gateway.commands import run_command

    return asyncio.run(run_command(args, _data_dir(args)))


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.api import create_app

    data_dir = _data_dir(args)
    settings = load_settings(data_dir=data_dir)
    runtime = data_dir / "runtime.json"
    data_dir.mkdir(parents=True, exist_ok=True)
    runtime.write_text(json.dumps({"url": f"http://{args.host}:{args.port}", "pid": os.getpid()}))
    print(
        f"scopegate: serving on http://{args.host}:{args.port} (data in {data_dir})",
        file=sys.stderr,
    )
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning")
    finally:
        runtime.unlink(missing_ok=True)
    return 0


def _token(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    settings = load_settings(data_dir=data_dir)
    key = load_or_create_signing_key(data_dir)
    print(
        issue_token(
            key,
            issuer=settings.token_issuer,
            audience=settings.token_audience,
            tenant=args.tenant,
            user=args.user,
            agent=args.agent,
            task=args.task,
            ttl_s=parse_ttl(args.ttl),
        )
    )
    return 0


def expires(text: str | None) -> datetime | None:
    if text is None:
        return None
    return datetime.now(UTC) + timedelta(seconds=parse_ttl(text))


def dump(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))

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
import re
import socket
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.errors import ConfigurationError, ScopegateError
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
    serve.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the operators' Prometheus listener (default loopback only)",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=9464,
        help="port of GET /metrics, never served on the API port (0 turns it off)",
    )

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
    scim_token = tenant_sub.add_parser(
        "scim-token", help="a new SCIM bearer secret for the tenant's directory (shown once)"
    )
    _common(scim_token)
    scim_token.add_argument("tenant")
    scim_token.add_argument(
        "--keep-previous",
        action="store_true",
        help="previous secrets stay valid (while the directory is reconfigured)",
    )
    directory = tenant_sub.add_parser(
        "directory", help="show or declare the tenant's directory as its source of truth"
    )
    _common(directory)
    directory.add_argument("tenant")
    directory.add_argument(
        "--set", dest="directory", choices=["scim", "none"], help="declare (scim) or withdraw"
    )
    directory.add_argument(
        "--max-silence", help="with --set scim: e.g. 24h; past it the tenant fails closed"
    )

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
    sshow = sources_sub.add_parser("show", help="a source and its document count")
    _common(sshow)
    _as(sshow)
    sshow.add_argument("source_id")
    sremove = sources_sub.add_parser(
        "remove", help="remove a source, its chunks, relationships and catalog entries"
    )
    _common(sremove)
    _as(sremove)
    sremove.add_argument("source_id")
    ssync = sources_sub.add_parser(
        "sync", help="reconcile the relationships with the source's own ACLs"
    )
    _common(ssync)
    _as(ssync)
    ssync.add_argument("source_id")
    ssync.add_argument("--dry-run", action="store_true", help="show the diff, write nothing")
    ssync.add_argument(
        "--full", action="store_true", help="re-read every document, not only changed ones"
    )

    documents = sub.add_parser("documents", help="ingested documents")
    documents_sub = documents.add_subparsers(dest="documents_command", required=True)
    ddelete = documents_sub.add_parser("delete", help="remove a document's chunks and relations")
    _common(ddelete)
    _as(ddelete)
    ddelete.add_argument("source_id")
    ddelete.add_argument("document_id")

    _relationships_parser(sub)

    principals = sub.add_parser("principals", help="users and agents of a tenant")
    principals_sub = principals.add_subparsers(dest="principals_command", required=True)
    deprovision = principals_sub.add_parser(
        "deprovision", help="remove every relation of a user or agent and revoke its tasks"
    )
    _common(deprovision)
    _as(deprovision)
    deprovision.add_argument("ref", help="user:ID or agent:ID")

    ingest = sub.add_parser("ingest", help="ingest documents from a JSON Lines file")
    _common(ingest)
    _as(ingest)
    ingest.add_argument("source_id")
    ingest.add_argument(
        "file",
        type=Path,
        help='a JSON Lines file (one {"id", "text", "folder"?, "metadata"?, "acl"} per line), '
        "or a directory or files (.txt .md .html .pdf)",
    )
    ingest.add_argument("--batch", type=int, default=50)
    ingest.add_argument(
        "--acl",
        type=Path,
        default=None,
        help="ACL mapping for a directory of files (default: PATH/scopegate-acl.json)",
    )

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
        ("replay", "re-evaluate a decision now (or as of the decision)"),
        ("history", "the relationship changes that touched an object's access"),
        ("verify", "verify the hash chain"),
        ("export", "export as JSON Lines"),
        ("purge", "delete records older than N days (keeps the chain verifiable)"),
    ):
        cmd = audit_sub.add_parser(name, help=helptext)
        _common(cmd)
        if name in {"list", "show", "replay", "history", "export"}:
            _as(cmd)
        if name in {"show", "replay"}:
            cmd.add_argument("request_id")
        if name == "replay":
            cmd.add_argument(
                "--what-if",
                dest="what_if",
                nargs="+",
                action="extend",
                type=relationship,
                default=[],
                metavar="USER,RELATION,OBJECT",
                help="evaluate as if these relationships existed (nothing is written)",
            )
            cmd.add_argument(
                "--as-of",
                dest="as_of",
                choices=["now", "decision"],
                default="now",
                help="decision: also rebuild the verdicts as they stood when it was decided",
            )
        if name == "history":
            cmd.add_argument("ref", help="document:d1, folder:f, source:s, group:g or task:t")
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


def _relationships_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    relationships = sub.add_parser("relationships", help="relationships inside the tenant")
    relationships_sub = relationships.add_subparsers(dest="relationships_command", required=True)
    for name, helptext in (("write", "write relationships"), ("delete", "delete relationships")):
        cmd = relationships_sub.add_parser(name, help=helptext)
        _common(cmd)
        _as(cmd)
        cmd.add_argument("--user", help="one relationship: user:alice, group:eng#member, ...")
        cmd.add_argument("--relation", help="member, admin, reviewer, parent, owner, viewer, ...")
        cmd.add_argument("--object", help="tenant:T, group:G, source:S, folder:F, document:D")
        cmd.add_argument(
            "--tuple",
            dest="tuples",
            nargs="+",
            action="extend",
            type=relationship,
            default=[],
            metavar="USER,RELATION,OBJECT",
            help="more relationships, e.g. user:alice,member,group:eng (repeatable)",
        )
        cmd.add_argument(
            "--file",
            type=Path,
            help='JSON Lines of {"user", "relation", "object"} ("-" reads stdin)',
        )
    rlist = relationships_sub.add_parser("list", help="relationships on an object or of a user")
    _common(rlist)
    _as(rlist)
    which = rlist.add_mutually_exclusive_group(required=True)
    which.add_argument("--object", help="relationships on this object, e.g. document:d1")
    which.add_argument("--user", help="relationships of this subject, e.g. group:eng#member")


def relationship(text: str) -> dict[str, str]:
    """``user:alice,viewer,document:d1`` (commas or spaces) as a relationship."""
    parts = [part for part in re.split(r"[,\s]+", text.strip()) if part]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not USER,RELATION,OBJECT (e.g. user:alice,viewer,document:d1)"
        )
    return dict(zip(("user", "relation", "object"), parts, strict=True))


def _as(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", required=True, help="the caller's tenant")
    parser.add_argument("--as", dest="as_user", required=True, help="the calling user (admin)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ScopegateError as exc:
        # The operator's own console: the upstream detail helps, and reaches no agent.
        detail = f" ({exc.detail})" if exc.detail else ""
        print(f"scopegate: {exc.code}: {exc.message}{detail}", file=sys.stderr)
        return 2
    except (ConfigurationError, ValidationError) as exc:
        # Settings and start-up refusals: the message says what to set.
        print(f"scopegate: configuration: {exc}", file=sys.stderr)
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
    from starlette.types import ASGIApp

    from gateway.api import create_app
    from gateway.metrics import Metrics, create_metrics_app

    data_dir = _data_dir(args)
    settings = load_settings(data_dir=data_dir)
    # Both ports are bound before anything starts, so a taken port fails fast and whole.
    metrics_port: int = args.metrics_port
    try:
        api_socket = _listen(args.host, args.port)
        metrics_socket = _listen(args.metrics_host, metrics_port) if metrics_port else None
    except OSError as exc:
        print(f"scopegate: cannot listen: {exc}", file=sys.stderr)
        return 2
    metrics = Metrics()
    listeners: list[tuple[ASGIApp, socket.socket]] = [
        (create_app(settings, metrics=metrics), api_socket)
    ]
    runtime_info: dict[str, object] = {"url": _url(args.host, args.port), "pid": os.getpid()}
    if metrics_socket is not None:
        listeners.append((create_metrics_app(metrics), metrics_socket))
        runtime_info["metrics_url"] = _url(args.metrics_host, metrics_port) + "/metrics"
    runtime = data_dir / "runtime.json"
    data_dir.mkdir(parents=True, exist_ok=True)
    runtime.write_text(json.dumps(runtime_info))
    print(f"scopegate: serving on {runtime_info['url']} (data in {data_dir})", file=sys.stderr)
    if metrics_socket is not None:
        print(f"scopegate: metrics on {runtime_info['metrics_url']}", file=sys.stderr)
    servers = [
        (uvicorn.Server(uvicorn.Config(app, log_level="warning")), sock) for app, sock in listeners
    ]
    try:
        asyncio.run(_serve_all(servers))
    finally:
        runtime.unlink(missing_ok=True)
    return 0


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _serve_all(servers: Sequence[tuple[Any, socket.socket]]) -> None:
    """The API server and the metrics server on one loop; the API's end stops both.

    Each uvicorn server takes over SIGINT/SIGTERM while it runs and passes a signal on
    to the handler it replaced once it has stopped, so a Ctrl-C stops the metrics
    listener first, then the API (its lifespan closes the gateway and OpenFGA).
    """
    (api, api_socket), *others = servers
    rest = [asyncio.ensure_future(s.serve(sockets=[sock])) for s, sock in others]
    try:
        await api.serve(sockets=[api_socket])
    finally:
        for server, _ in others:
            server.should_exit = True
        await asyncio.gather(*rest, return_exceptions=True)


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

"""``scopegate audit ...``: list, show, replay (with what-if, or as of the decision),
history, and export; verify the chains (the log's and the change-log archive's).

In-process commands go through the same reviewer functions as the HTTP API
(:mod:`gateway.review`), so ``--as`` must name a reviewer (or an admin) of
``--tenant``. ``export`` writes JSON Lines of full entries for a SIEM, to stdout or to
``--output`` (created 0600, written to a ``.part`` file and renamed when complete, so
a reader never picks up half an export). ``verify`` and ``purge`` need no gateway: they
work on the audit store directly; ``verify`` names the first broken entry and the record
it holds (and the first broken change of each archived store, and what it holds), ``purge``
refuses to erase a broken stretch of the chain.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import httpx

from gateway import review
from gateway.audit import Anchors, ArchivedChange, AuditEntry, AuditStore, VerifyResult
from gateway.cli import dump
from gateway.client import AsyncScopegateClient, raise_for_error
from gateway.errors import AuditUnavailable
from gateway.identity import PrincipalContext
from gateway.replay import describe_change
from gateway.service import Gateway


async def audit_in_process(
    name: str, args: argparse.Namespace, g: Gateway, p: PrincipalContext
) -> int:
    """Run ``audit list|show|replay|export`` against an in-process gateway."""
    if name == "audit_list":
        dump(
            await review.list_decisions(
                g,
                p,
                outcome=args.outcome,
                user=getattr(args, "user", None),
                agent=getattr(args, "agent", None),
                task=getattr(args, "task", None),
                since=getattr(args, "since", None),
                until=getattr(args, "until", None),
                limit=args.limit,
                cursor=getattr(args, "cursor", None),
            )
        )
    elif name == "audit_show":
        dump(await review.show_decision(g, p, args.request_id))
    elif name == "audit_replay":
        what_if = getattr(args, "what_if", None) or ()
        as_of = getattr(args, "as_of", None) or "now"
        replayed = await review.replay(g, p, args.request_id, what_if, as_of)
        dump(replayed)
        if as_of == "decision":
            print(explain_as_of(replayed), file=sys.stderr)
    elif name == "audit_history":
        found = await review.history(g, p, args.ref)
        dump(found)
        print(explain_history(found), file=sys.stderr)
    elif name == "audit_export":
        output = getattr(args, "output", None)
        count = await write_lines(await review.export_lines(g, p), output)
        _report_export(count, output)
    else:
        print(f"scopegate: unknown command {name.replace('_', ' ')}", file=sys.stderr)
        return 2
    return 0


def explain_as_of(replayed: dict[str, Any]) -> str:
    """A replay as of the decision in words: then / now per document, and what changed."""
    as_of = replayed["as_of"]
    exact = "matches the record" if as_of["exact"] else "DIFFERS from the record"
    seq = as_of["archive_seq"]
    where = f"change-log position {seq}" if seq is not None else "placed by its time"
    head = f"{replayed['request_id']} as of its decision ({as_of['decided_at']}, {where})"
    lines = [f"scopegate: {head}: {exact}"]
    for d in replayed["documents"]:
        then = d.get("then", d["was"])
        flipped = f"; flipped: {', '.join(d['flipped_checks'])}" if d.get("flipped_checks") else ""
        lines.append(f"  {d['document_id']}: was {d['was']}, then {then}, now {d['now']}{flipped}")
    changes = replayed.get("changes") or []
    lines.append(
        f"  {len(changes)} change(s) since the decision:" if changes else "  no change since"
    )
    lines += [f"    {describe_change(c)}" for c in changes]
    lines += [f"  note: {n}" for n in replayed.get("notes") or []]
    return "\n".join(lines)


def explain_history(found: dict[str, Any]) -> str:
    """``audit history``: one line per change, oldest first."""
    lines = [
        f"scopegate: {len(found['changes'])} change(s) touched {found['object']} "
        f"(through {', '.join(found['objects'])})"
    ]
    lines += [f"  {describe_change(c)}" for c in found["changes"]]
    return "\n".join(lines)


async def replay_or_history_over_http(
    name: str, args: argparse.Namespace, client: AsyncScopegateClient
) -> None:
    """``audit replay`` and ``audit history`` with ``--url``: the same output as in-process."""
    if name == "audit_history":
        found = await client.history(args.ref)
        dump(found)
        print(explain_history(found), file=sys.stderr)
        return
    as_of = getattr(args, "as_of", None) or "now"
    replayed = (await client.replay(args.request_id, args.what_if or None, as_of=as_of)).raw
    dump(replayed)
    if as_of == "decision":
        print(explain_as_of(replayed), file=sys.stderr)


async def export_over_http(url: str, token: str, output: Path | None) -> int:
    """``audit export --url``: stream ``GET /v1/audit/export`` into stdout or a file."""
    headers = {"authorization": f"Bearer {token}"}
    async with (
        httpx.AsyncClient(base_url=url.rstrip("/"), timeout=60.0) as client,
        client.stream("GET", "/v1/audit/export", headers=headers) as response,
    ):
        if response.status_code >= 400:
            await response.aread()
            raise_for_error(response)
        count = await write_lines(_http_lines(response), output)
    _report_export(count, output)
    return 0


async def _http_lines(response: httpx.Response) -> AsyncIterator[str]:
    async for line in response.aiter_lines():
        if line:
            yield line + "\n"


def _report_export(count: int, output: Path | None) -> None:
    where = f" to {output}" if output is not None else ""
    print(f"scopegate: exported {count} audit records{where}", file=sys.stderr)


async def write_lines(lines: AsyncIterator[str], output: Path | None) -> int:
    """Write every line to ``output`` (atomically, mode 0600) or stdout; the count."""
    count = 0
    with _destination(output) as handle:
        async for line in lines:
            handle.write(line)
            count += 1
    return count


@contextlib.contextmanager
def _destination(output: Path | None) -> Iterator[IO[str]]:
    if output is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    partial = output.with_name(output.name + ".part")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


async def purge_audit(store: AuditStore, days: float) -> int:
    """``audit purge``: drop a verified prefix older than ``days``; the chain stays checkable."""
    try:
        removed = await store.purge_older_than(days)
    except (ValueError, AuditUnavailable) as exc:
        print(f"scopegate: {exc}", file=sys.stderr)
        return 1
    print(f"scopegate: purged {removed} audit records older than {days:g} days", file=sys.stderr)
    return 0


async def verify_audit(store: AuditStore) -> int:
    """``audit verify``: the log's chain and the change-log archive's, as JSON on stdout
    (the log's result, with ``archive`` beside it), a clear verdict on stderr."""
    result = await store.verify()
    archives = await store.verify_archives(await archive_anchors(store))
    archive = {
        "ok": all(r.ok for r in archives.values()),
        "changes": sum(r.checked for r in archives.values()),
        "stores": {store_id: r.to_dict() for store_id, r in archives.items()},
    }
    dump({**dataclasses.asdict(result), "archive": archive})
    print(await describe_verification(store, result), file=sys.stderr)
    print(await describe_archive_verification(store, archives), file=sys.stderr)
    return 0 if result.ok and archive["ok"] else 1


async def archive_anchors(store: AuditStore) -> Anchors:
    """Every archive position a record keeps (``extra.changelog``), with its chain hash.

    The records are hash-chained, so these hashes anchor the archive: a history
    rewritten and re-hashed from some change on no longer matches them. A log that
    cannot be read to its end yields the anchors read so far (its own verdict says why).
    """
    anchors: dict[str, dict[int, dict[str, int]]] = {}
    with contextlib.suppress(AuditUnavailable):
        async for entry in store.iter_all(None):
            kept = entry.record.extra.get("changelog")
            if not isinstance(kept, Mapping) or not kept.get("archive_seq"):
                continue
            at = anchors.setdefault(str(kept["store_id"]), {})
            at.setdefault(int(kept["archive_seq"]), {}).setdefault(
                str(kept.get("archive_hash")), entry.seq
            )
    return anchors


async def describe_archive_verification(
    store: AuditStore, results: Mapping[str, VerifyResult]
) -> str:
    """The archive chains in words: intact, or each broken store, where, and what is there."""
    changes = sum(r.checked for r in results.values())
    stores = f"{len(results)} store{'s' if len(results) != 1 else ''}"
    broken = sum(1 for r in results.values() if not r.ok)
    if not broken:
        return f"scopegate: archive chain verified: True ({changes} changes, {stores})"
    lines = [f"scopegate: archive chain verified: False (broken in {broken} of {stores})"]
    for store_id, result in sorted(results.items()):
        if result.ok:
            continue
        seq = result.first_broken_seq
        lines += [
            f"  store {store_id}: BROKEN at change {seq}: {result.reason}",
            f"    {result.checked} changes before it verified intact",
        ]
        change = None
        with contextlib.suppress(AuditUnavailable):  # the verdict above already says where
            change = await store.archived_change(store_id, seq) if seq is not None else None
        if change is not None:
            lines.append(f"    change {seq} now holds: {_describe_change(change)}")
        elif seq is not None:
            lines.append(f"    change {seq}: no such change")
    return "\n".join(lines)


def _describe_change(change: ArchivedChange) -> str:
    condition = f" with condition {change.condition}" if change.condition else ""
    return (
        f"{change.operation} {change.user} {change.relation} {change.object}{condition} "
        f"at {change.time}"
    )


async def describe_verification(store: AuditStore, result: VerifyResult) -> str:
    """Human words for a verification: intact, or where it breaks and what is there."""
    if result.ok:
        return f"scopegate: audit chain intact ({result.checked} records verified)"
    seq = result.first_broken_seq
    lines = [
        f"scopegate: audit chain BROKEN at entry {seq}: {result.reason}",
        f"  {result.checked} entries before it verified intact",
    ]
    if seq is None:
        return "\n".join(lines)
    found = await _entries_around(store, seq)
    at, before = found.get(seq), found.get(seq - 1)
    lines.append(
        f"  entry {seq} now holds: {_describe(at)}" if at else f"  entry {seq}: no such entry"
    )
    if before is not None:
        lines.append(f"  last entry before it: {seq - 1}, {_describe(before)}")
    return "\n".join(lines)


async def _entries_around(store: AuditStore, seq: int) -> dict[int, AuditEntry]:
    """Entries ``seq - 1`` and ``seq`` (a scan: verification failures are rare)."""
    found: dict[int, AuditEntry] = {}
    try:
        async for entry in store.iter_all(None):
            if entry.seq in (seq - 1, seq):
                found[entry.seq] = entry
            if entry.seq >= seq:
                break
    except AuditUnavailable:
        pass  # an undecodable record: the verdict above already says where
    return found


def _describe(entry: AuditEntry) -> str:
    r = entry.record
    who: list[Any] = [f"tenant {r.tenant}", f"user {r.user}"]
    if r.agent:
        who.append(f"agent {r.agent}")
    return (
        f"request {r.request_id} ({r.kind}, {', '.join(who)}, {r.outcome}, at {r.time}; "
        f"stored hash {entry.hash[:16]}...)"
    )

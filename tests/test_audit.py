"""The audit store (gateway/audit.py) on real SQLite files and a real PostgreSQL cluster.

Every store test runs twice: on SQLite and on PostgreSQL (one private cluster per
session, one schema per test). Tampering goes through a raw database connection, as
an attacker with database access would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import audit
from gateway.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditRecord,
    AuditStore,
    CandidateVerdict,
    PostgresAuditStore,
    SqliteAuditStore,
    canonical_json,
    chain_hash,
    format_time,
    open_audit_store,
    query_fields,
    redact_query,
    storage_errors,
)
from gateway.errors import AuditUnavailable, InvalidRequest

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

Rows = list[tuple[Any, ...]]


def make_record(request_id: str | None = None, *, minutes: float = 0, **fields: Any) -> AuditRecord:
    values: dict[str, Any] = {
        "request_id": request_id or uuid.uuid4().hex,
        "time": format_time(T0 + timedelta(minutes=minutes)),
        "tenant": "acme",
        "user": "alice",
        "agent": "summarizer",
        "task": "task-1",
        "token_id": "jti-1",
        "kind": "retrieve",
        "query": f"question about {request_id}",
        "query_hash": None,
        "sources": ("docs",),
        "strategy": "postfilter",
        "store_id": "store-1",
        "model_id": "model-1",
        "consistency": "HIGHER_CONSISTENCY",
        "k": 5,
        "candidates": (
            CandidateVerdict("d1", "docs", ("d1#0", "d1#1"), "allow", returned=True),
            CandidateVerdict("d2", "docs", ("d2#0",), "deny", failed_checks=("user_can_read",)),
        ),
        "returned_chunk_ids": ("d1#0", "d1#1"),
        "outcome": "partial",
        "error_code": None,
        "latency_ms": 12.5,
        "extra": {"batch_rounds": 1},
    }
    values.update(fields)
    return AuditRecord(**values)


def ids(entries: Sequence[AuditEntry]) -> list[str]:
    return [e.record.request_id for e in entries]


# -- backends ------------------------------------------------------------------------------


@dataclass
class Backend:
    """A store under test, more handles on the same data, and raw SQL beside the store."""

    name: str
    opener: Callable[..., AuditStore]
    raw: Callable[[str, Sequence[object]], Rows]
    handles: list[AuditStore] = field(default_factory=list)

    def open(self, **options: Any) -> AuditStore:
        store = self.opener(**options)
        self.handles.append(store)
        return store

    def sql(self, query: str, *params: object) -> Rows:
        return self.raw(query, params)


def sqlite_backend(path: Path) -> Backend:
    def raw(query: str, params: Sequence[object]) -> Rows:
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            return conn.execute(query, params).fetchall()

    return Backend("sqlite", lambda **o: SqliteAuditStore(path, **o), raw)


def postgres_backend(server_dsn: str) -> Backend:
    schema = f"audit_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    dsn = f"{server_dsn}?options=-csearch_path%3D{schema}"

    def raw(query: str, params: Sequence[object]) -> Rows:
        with psycopg.connect(dsn, autocommit=True) as conn:
            cur = conn.execute(query.replace("?", "%s"), params)
            return cur.fetchall() if cur.description else []

    return Backend("postgres", lambda **o: PostgresAuditStore(dsn, **o), raw)


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        chosen = sqlite_backend(tmp_path / "audit.db")
    else:
        chosen = postgres_backend(request.getfixturevalue("pg_dsn"))
    yield chosen
    for store in chosen.handles:
        await store.close()


@pytest.fixture
def store(backend: Backend) -> AuditStore:
    return backend.open()


# -- append, get, list ------------------------------------------------------------------


async def test_append_chains_records_and_get_returns_them(store: AuditStore) -> None:
    first = await store.append(make_record("r1"))
    second = await store.append(make_record("r2"))

    assert (first.seq, first.prev_hash) == (1, GENESIS_HASH)
    assert first.hash == chain_hash(GENESIS_HASH, canonical_json(make_record("r1").to_dict()))
    assert (second.seq, second.prev_hash) == (2, first.hash)
    assert await store.get("acme", "r1") == first
    assert await store.get("acme", "r2") == second
    assert await store.get("acme", "absent") is None


async def test_get_list_and_export_are_tenant_scoped(store: AuditStore) -> None:
    await store.append(make_record("a1"))
    await store.append(make_record("g1", tenant="globex"))
    await store.append(make_record("same-id", user="alice"))
    await store.append(make_record("same-id", tenant="globex", user="gina"))

    assert await store.get("globex", "a1") is None
    assert await store.get("acme", "g1") is None
    shared = await store.get("globex", "same-id")
    assert shared is not None and shared.record.user == "gina"
    assert ids((await store.list("globex"))[0]) == ["same-id", "g1"]
    assert ids((await store.list("acme"))[0]) == ["same-id", "a1"]
    assert ids([e async for e in store.iter_all("globex")]) == ["g1", "same-id"]
    assert [e.seq async for e in store.iter_all(None)] == [1, 2, 3, 4]


async def test_list_filters(store: AuditStore) -> None:
    await store.append(make_record("a1", user="alice", task="t1", outcome="allowed"))
    await store.append(make_record("a2", minutes=10, user="bob", task="t2", outcome="denied"))
    await store.append(make_record("a3", minutes=20, agent="writer", task="t3"))
    await store.append(make_record("a4", minutes=30, task="t1", outcome="error"))
    await store.append(make_record("g1", minutes=15, tenant="globex", outcome="denied"))

    async def listed(**filters: Any) -> list[str]:
        return ids((await store.list("acme", **filters))[0])

    assert await listed() == ["a4", "a3", "a2", "a1"]
    assert await listed(outcome="denied") == ["a2"]
    assert await listed(user="alice") == ["a4", "a3", "a1"]
    assert await listed(agent="writer") == ["a3"]
    assert await listed(task="t1") == ["a4", "a1"]
    assert await listed(since=T0 + timedelta(minutes=10)) == ["a4", "a3", "a2"]
    assert await listed(until="2025-03-01T12:20:00Z") == ["a2", "a1"]
    assert await listed(since="2025-03-01T12:10:00", until="2025-03-01T12:30:00+00:00") == [
        "a3",
        "a2",
    ]
    assert await listed(user="alice", since=T0 + timedelta(minutes=5), task="t1") == ["a4"]
    with pytest.raises(InvalidRequest):
        await listed(since="yesterday")


async def test_cursor_pages_have_no_duplicates_and_no_gaps(
    store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = []
    for i in range(23):
        outcome = "denied" if i % 3 == 0 else "allowed"
        await store.append(make_record(f"a{i}", minutes=i, outcome=outcome))
        expected.insert(0, f"a{i}")
        if i % 4 == 0:
            await store.append(make_record(f"g{i}", tenant="globex"))

    async def pages(limit: int, **filters: Any) -> list[list[str]]:
        found, cursor = [], None
        while True:
            entries, cursor = await store.list("acme", limit=limit, cursor=cursor, **filters)
            found.append(ids(entries))
            if cursor is None:
                return found

    by_five = await pages(5)
    assert [len(p) for p in by_five] == [5, 5, 5, 5, 3]
    assert [i for page in by_five for i in page] == expected
    denied = await pages(2, outcome="denied")
    assert [i for page in denied for i in page] == [i for i in expected if int(i[1:]) % 3 == 0]
    assert await pages(23) == [expected]

    with pytest.raises(InvalidRequest):
        await store.list("acme", cursor="not a cursor")
    with pytest.raises(InvalidRequest):
        await store.list("acme", limit=0)
    monkeypatch.setattr(audit, "MAX_PAGE_SIZE", 4)
    capped, cursor = await store.list("acme", limit=10_000)
    assert len(capped) == 4 and cursor is not None


async def test_export_streams_oldest_first_in_batches(
    store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "_ITER_BATCH", 3)
    for i in range(8):
        await store.append(make_record(f"a{i}", tenant="globex" if i == 4 else "acme"))

    assert ids([e async for e in store.iter_all("acme")]) == [f"a{i}" for i in range(8) if i != 4]
    assert [e.seq async for e in store.iter_all(None)] == list(range(1, 9))


# -- one chain under concurrency ------------------------------------------------------------


async def test_concurrent_appends_from_two_handles_form_one_chain(backend: Backend) -> None:
    first, second = backend.open(), backend.open()  # two connections, as two replicas
    records = [make_record(f"r{i}") for i in range(200)]

    entries = await asyncio.gather(
        *((first if i % 2 else second).append(r) for i, r in enumerate(records))
    )

    by_seq = {e.seq: e for e in entries}
    assert sorted(by_seq) == list(range(1, 201))
    assert all(by_seq[s].prev_hash == by_seq[s - 1].hash for s in range(2, 201))
    assert backend.sql("SELECT COUNT(*) FROM audit_log") == [(200,)]
    assert await first.verify() == audit.VerifyResult(True, 200, None, None)


async def _queued_behind_the_lock(
    store: SqliteAuditStore, records: Sequence[AuditRecord]
) -> list[AuditEntry | BaseException]:
    """Append ``records`` while the store's write lock is held, so that they all queue
    up and go into one group; release it once every one is queued."""
    store._lock.acquire()
    try:
        appends = [asyncio.ensure_future(store.append(r)) for r in records]
        for _ in range(500):
            await asyncio.sleep(0.01)
            if len(store._queue) == len(records):
                break
        assert len(store._queue) == len(records)
    finally:
        store._lock.release()
    return list(await asyncio.gather(*appends, return_exceptions=True))


async def test_sqlite_appends_queued_together_commit_as_one_group(tmp_path: Path) -> None:
    store = SqliteAuditStore(tmp_path / "audit.db")
    try:
        await store.append(make_record("old"))
        statements: list[str] = []
        conn = store._connection()
        conn.set_trace_callback(statements.append)
        records = [make_record(f"r{i}") for i in range(20)]
        records[7] = make_record("old")  # already recorded: refused, alone
        records[12] = make_record("r3")  # the same id twice in one group: the second refused

        results = await _queued_behind_the_lock(store, records)

        refused = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        assert refused == [7, 12]
        assert all(isinstance(results[i], AuditUnavailable) for i in refused)
        assert results[7] is not results[12]
        entries = [r for r in results if isinstance(r, AuditEntry)]
        assert [e.seq for e in entries] == list(range(2, 20))  # in queue order, no gap
        assert [e.record.request_id for e in entries] == [
            r.request_id for i, r in enumerate(records) if i not in refused
        ]
        assert statements.count("COMMIT") == 1  # one transaction, one fsync
        assert await store.verify() == audit.VerifyResult(True, 19, None, None)
        for entry in entries:
            assert await store.get("acme", entry.record.request_id) == entry
        assert (await store.append(make_record("after"))).seq == 20
    finally:
        await store.close()


async def test_sqlite_group_that_cannot_be_written_fails_every_append(tmp_path: Path) -> None:
    store = SqliteAuditStore(tmp_path / "audit.db", max_pages=12)
    try:
        await store.append(make_record("first"))
        big = {"note": "x" * 3_000}  # the group overflows the file; one record alone fits
        results = await _queued_behind_the_lock(
            store, [make_record(f"r{i}", extra=big) for i in range(8)]
        )
        assert all(isinstance(r, AuditUnavailable) for r in results)
        assert len({id(r) for r in results}) == len(results)  # one exception each
        assert await store.verify() == audit.VerifyResult(True, 1, None, None)
        assert len((await store.list("acme"))[0]) == 1
        assert (await store.append(make_record("r0", extra=big))).seq == 2
    finally:
        await store.close()


async def test_handles_racing_to_create_the_sqlite_file_all_open_it(tmp_path: Path) -> None:
    for attempt in range(40):
        stores = [SqliteAuditStore(tmp_path / f"race{attempt}.db") for _ in range(3)]
        try:
            assert await asyncio.gather(*(s.healthy() for s in stores)) == [True, True, True]
        finally:
            for s in stores:
                await s.close()


CHILD = """
import asyncio, json, sys
from gateway.audit import AuditRecord, SqliteAuditStore, utc_now

async def main(path, worker, count, template):
    store = SqliteAuditStore(path)
    i = 0
    while count < 0 or i < count:
        fields = {**template, "request_id": f"{worker}-{i}", "time": utc_now()}
        await store.append(AuditRecord.from_dict(fields))
        print(fields["request_id"], flush=True)
        i += 1
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])))
"""


def spawn_appender(path: Path, worker: str, count: int) -> subprocess.Popen[str]:
    """An OS process appending ``count`` records (forever for -1), printing each ack."""
    template = json.dumps(make_record().to_dict())
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), worker, str(count), template],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )


async def test_processes_appending_to_one_sqlite_file_share_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    workers = [spawn_appender(path, f"w{n}", 25) for n in range(4)]
    outputs = [await asyncio.to_thread(w.communicate, timeout=60) for w in workers]

    assert [w.returncode for w in workers] == [0, 0, 0, 0]
    acked = {line for out, _ in outputs for line in out.split()}
    assert len(acked) == 100
    store = SqliteAuditStore(path)
    try:
        exported = [e async for e in store.iter_all(None)]
        assert [e.seq for e in exported] == list(range(1, 101))
        assert set(ids(exported)) == acked
        assert await store.verify() == audit.VerifyResult(True, 100, None, None)
    finally:
        await store.close()


async def test_acknowledged_appends_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    writer = spawn_appender(path, "k", -1)
    assert writer.stdout is not None
    acked = [await asyncio.to_thread(writer.stdout.readline) for _ in range(40)]
    writer.kill()
    await asyncio.to_thread(writer.wait)

    store = SqliteAuditStore(path)
    try:
        for request_id in acked:
            assert await store.get("acme", request_id.strip()) is not None
        result = await store.verify()
        assert result.ok and result.checked >= 40
    finally:
        await store.close()


# -- tamper evidence --------------------------------------------------------------------------


def rehash_edited_record(backend: Backend) -> None:
    """Edit entry 3 and give it a correct hash; entry 4 no longer links to it."""
    [(prev_hash, text)] = backend.sql("SELECT prev_hash, record FROM audit_log WHERE seq = 3")
    edited = text.replace("question about r3", "nothing to see")
    backend.sql(
        "UPDATE audit_log SET record = ?, hash = ? WHERE seq = 3",
        edited,
        chain_hash(prev_hash, edited),
    )


def run_statements(*statements: str) -> Callable[[Backend], None]:
    def tamper(backend: Backend) -> None:
        for statement in statements:
            backend.sql(statement)

    return tamper


TAMPERING = {
    "edited record": (
        run_statements(
            "UPDATE audit_log SET record = replace(record, 'about r3', 'about rX') WHERE seq = 3"
        ),
        3,
        "hash does not match",
    ),
    "edited and rehashed record": (rehash_edited_record, 4, "prev_hash"),
    "edited filter column": (
        run_statements("UPDATE audit_log SET outcome = 'allowed' WHERE seq = 3"),
        3,
        "indexed columns",
    ),
    "deleted record": (run_statements("DELETE FROM audit_log WHERE seq = 3"), 3, "missing"),
    "deleted last record": (run_statements("DELETE FROM audit_log WHERE seq = 5"), 5, "head"),
    "reordered records": (
        run_statements(
            "UPDATE audit_log SET seq = -2 WHERE seq = 2",
            "UPDATE audit_log SET seq = 2 WHERE seq = 4",
            "UPDATE audit_log SET seq = 4 WHERE seq = -2",
        ),
        2,
        "prev_hash",
    ),
    "edited hash": (
        run_statements(f"UPDATE audit_log SET hash = '{'f' * 64}' WHERE seq = 3"),
        3,
        "hash does not match",
    ),
}


@pytest.mark.parametrize("tampering", TAMPERING, ids=list(TAMPERING))
async def test_verify_detects_tampering(backend: Backend, tampering: str) -> None:
    store = backend.open()
    for i in range(1, 6):
        await store.append(make_record(f"r{i}"))
    assert (await store.verify()).ok

    tamper, broken_seq, reason = TAMPERING[tampering]
    tamper(backend)
    result = await store.verify()

    assert not result.ok
    assert result.first_broken_seq == broken_seq
    assert result.reason is not None and reason in result.reason


# -- retention ---------------------------------------------------------------------------------


async def test_purge_keeps_the_chain_verifiable(backend: Backend) -> None:
    store = backend.open()
    for i in range(6):
        await store.append(make_record(f"old{i}", minutes=i))
    await store.append(make_record("recent", minutes=40 * 24 * 60))
    await store.append(make_record("skewed", minutes=1))  # old clock, but after a recent one
    await store.append(make_record("later", minutes=41 * 24 * 60))
    now = T0 + timedelta(days=45)

    assert await store.purge_older_than(30, now=now) == 6
    assert await store.verify() == audit.VerifyResult(True, 3, None, None)
    assert await store.get("acme", "old0") is None
    assert await store.get("acme", "skewed") is not None  # only a prefix of the chain goes
    assert backend.sql("SELECT base_seq FROM audit_chain") == [(6,)]
    assert await store.purge_older_than(30, now=now) == 0
    assert (await store.append(make_record("next", minutes=45 * 24 * 60))).seq == 10
    assert (await store.verify()).ok

    backend.sql("DELETE FROM audit_log WHERE seq = 7")
    broken = await store.verify()
    assert (broken.ok, broken.first_broken_seq) == (False, 7)


async def test_purging_everything_continues_the_chain(store: AuditStore) -> None:
    for i in range(3):
        await store.append(make_record(f"old{i}"))
    last_hash = (await store.append(make_record("old3"))).hash

    assert await store.purge_older_than(1, now=T0 + timedelta(days=2)) == 4
    assert await store.verify() == audit.VerifyResult(True, 0, None, None)
    after = await store.append(make_record("new", minutes=3 * 24 * 60))
    assert (after.seq, after.prev_hash) == (5, last_hash)
    assert await store.verify() == audit.VerifyResult(True, 1, None, None)


async def test_purge_refuses_to_erase_a_broken_stretch(backend: Backend) -> None:
    store = backend.open()
    for i in range(3):
        await store.append(make_record(f"old{i}"))
    backend.sql("UPDATE audit_log SET record = replace(record, 'old1', 'oldX') WHERE seq = 2")

    with pytest.raises(AuditUnavailable, match="refusing to purge"):
        await store.purge_older_than(1, now=T0 + timedelta(days=2))
    assert backend.sql("SELECT COUNT(*) FROM audit_log") == [(3,)]


# -- redaction -----------------------------------------------------------------------------------


async def test_redaction_stores_only_the_keyed_hash(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    secret = "salary of the CEO, quarter 7f3a"
    query, query_hash = query_fields(secret, redact=True, key="key-1")
    expected = hmac.new(b"key-1", secret.encode(), hashlib.sha256).hexdigest()

    assert (query, query_hash) == (None, expected)
    assert redact_query(secret, "key-2") != expected
    assert query_fields(secret, redact=False, key="key-1") == (secret, None)
    await store.append(make_record("r1", query=query, query_hash=query_hash))

    entry = await store.get("acme", "r1")
    assert entry is not None and entry.record.query is None
    assert entry.record.query_hash == expected
    stored = backend.sql("SELECT record FROM audit_log")
    assert "CEO" not in stored[0][0] and expected in stored[0][0]
    if backend.name == "sqlite":  # nor anywhere in the files, WAL included
        assert not any(b"CEO" in p.read_bytes() for p in tmp_path.glob("audit.db*"))


# -- failing closed ------------------------------------------------------------------------------


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make ``path`` read-only for this process, root included (which ignores mode bits)."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        undo = ["chmod", "0644", str(path)]
    else:
        # Missing tools or support fail the test: scripts/install-system-deps installs
        # e2fsprogs, and a read-only audit file is a fault the suite must exercise.
        if shutil.which("chattr") is None:
            pytest.fail("chattr (e2fsprogs) is needed to make a file read-only for root")
        made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.fail(f"this filesystem has no immutable files: {made.stderr.strip()}")
        undo = ["chattr", "-i", str(path)]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


async def test_read_only_sqlite_file_fails_closed_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    writer = SqliteAuditStore(path)
    await writer.append(make_record("before"))
    await writer.close()

    store = SqliteAuditStore(path)
    try:
        with read_only(path):
            assert not await store.healthy()
            with pytest.raises(AuditUnavailable) as refused:
                await store.append(make_record("refused"))
            # The driver's text is kept as detail (logs), never in the message (responses).
            assert "readonly" in str(refused.value.detail)
            assert "readonly" not in refused.value.message
            assert await store.get("acme", "before") is not None  # reads still work
        assert await store.healthy()
        assert (await store.append(make_record("after"))).seq == 2
        assert await store.get("acme", "refused") is None
        assert (await store.verify()).ok
    finally:
        await store.close()


async def test_full_sqlite_store_fails_closed(tmp_path: Path) -> None:
    store = SqliteAuditStore(tmp_path / "audit.db", max_pages=12)
    written = 0
    try:
        with pytest.raises(AuditUnavailable) as full:
            for i in range(500):
                await store.append(make_record(f"r{i}"))
                written += 1
        assert "full" in str(full.value.detail) and "full" not in full.value.message
        assert written > 0
        assert await store.verify() == audit.VerifyResult(True, written, None, None)
        assert len((await store.list("acme", limit=500))[0]) == written
    finally:
        await store.close()
    roomy = SqliteAuditStore(tmp_path / "audit.db")
    try:
        assert (await roomy.append(make_record("after"))).seq == written + 1
    finally:
        await roomy.close()


async def test_unreachable_postgres_fails_closed() -> None:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        store = PostgresAuditStore(f"postgresql://postgres@127.0.0.1:{port}/x", connect_timeout_s=2)
        assert not await store.healthy()
        with pytest.raises(AuditUnavailable):
            await store.append(make_record("r1"))
        with pytest.raises(AuditUnavailable):
            await store.list("acme")
    await store.close()


async def test_closed_store_refuses_work(store: AuditStore) -> None:
    await store.append(make_record("r1"))
    await store.close()
    with pytest.raises(AuditUnavailable):
        await store.append(make_record("r2"))
    assert not await store.healthy()


async def test_duplicate_request_id_in_a_tenant_fails_closed(store: AuditStore) -> None:
    await store.append(make_record("r1"))
    with pytest.raises(AuditUnavailable):
        await store.append(make_record("r1"))
    assert (await store.append(make_record("r2"))).seq == 2  # no gap left behind
    assert (await store.verify()).ok


def all_subclasses(cls: type[BaseException]) -> list[type[BaseException]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += all_subclasses(sub)
    return found


def test_every_storage_error_becomes_audit_unavailable() -> None:
    upstream = [
        *all_subclasses(sqlite3.Error),
        *all_subclasses(psycopg.Error),
        *(e for e in all_subclasses(OSError) if e.__module__ == "builtins"),
    ]
    assert len(upstream) > 100
    for error_type in upstream:
        error = error_type("boom")
        with pytest.raises(AuditUnavailable) as caught, storage_errors():
            raise error
        assert caught.value.__cause__ is error
    with pytest.raises(KeyError), storage_errors():
        raise KeyError("a bug is not a storage failure")


# -- schema --------------------------------------------------------------------------------------


async def test_migrations_are_recorded_idempotent_and_guard_newer_schemas(
    backend: Backend,
) -> None:
    await backend.open().append(make_record("r1"))
    await backend.open().append(make_record("r2"))  # a second opening migrates nothing
    assert backend.sql("SELECT version FROM schema_version") == [(audit.LATEST_SCHEMA_VERSION,)]

    backend.sql("INSERT INTO schema_version (version) VALUES (?)", 99)
    with pytest.raises(AuditUnavailable, match="newer"):
        await backend.open().append(make_record("r3"))


def test_open_audit_store_follows_the_dsn(tmp_path: Path) -> None:
    default = open_audit_store(None, tmp_path)
    assert isinstance(default, SqliteAuditStore) and default.path == tmp_path / "audit.db"
    absolute = open_audit_store(f"sqlite:///{tmp_path}/other.db", tmp_path)
    assert isinstance(absolute, SqliteAuditStore) and absolute.path == tmp_path / "other.db"
    assert isinstance(open_audit_store("postgresql://u@db/audit", tmp_path), PostgresAuditStore)
    with pytest.raises(ValueError, match="unsupported"):
        open_audit_store("mysql://u@db/audit", tmp_path)


# -- records ---------------------------------------------------------------------------------------


def test_records_validate_and_freeze_their_fields() -> None:
    extra: dict[str, Any] = {"notes": ["a"]}
    record = make_record("r1", extra=extra, sources=["docs"])
    extra["notes"].append("mutated later")
    assert record.extra == {"notes": ["a"]} and record.sources == ("docs",)

    with pytest.raises(ValueError, match="outcome"):
        make_record(outcome="fine")
    with pytest.raises(ValueError, match="timezone"):
        make_record(time="2025-03-01T12:00:00")
    with pytest.raises(ValueError, match="verdict"):
        CandidateVerdict("d1", "docs", (), "maybe")
    with pytest.raises(TypeError):
        make_record(extra={"when": datetime.now(UTC)})


identifiers = st.text(min_size=1, max_size=12)
candidates = st.builds(
    CandidateVerdict,
    document_id=identifiers,
    source=identifiers,
    chunk_ids=st.lists(identifiers, max_size=3).map(tuple),
    verdict=st.sampled_from(sorted(audit.VERDICTS)),
    failed_checks=st.lists(identifiers, max_size=2).map(tuple),
    errored_checks=st.lists(identifiers, max_size=2).map(tuple),
    returned=st.booleans(),
)
scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
json_values = st.recursive(
    scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(
    query=st.none() | st.text(max_size=40),
    agent=st.none() | identifiers,
    found=st.lists(candidates, max_size=3).map(tuple),
    latency=st.floats(min_value=0, max_value=1e6),
    extra=st.dictionaries(st.text(max_size=6), json_values, max_size=3),
)
def test_records_round_trip_through_their_canonical_json(
    query: str | None,
    agent: str | None,
    found: tuple[CandidateVerdict, ...],
    latency: float,
    extra: dict[str, Any],
) -> None:
    record = make_record(
        query=query, agent=agent, candidates=found, latency_ms=latency, extra=extra
    )
    text = canonical_json(record.to_dict())
    again = AuditRecord.from_dict(json.loads(text))

    assert again == record
    assert canonical_json(again.to_dict()) == text
    assert text.isascii()

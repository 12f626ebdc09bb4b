"""The audit log (DESIGN section 7): one hash-chained record per request.

A retrieval's record is appended **before** its response is sent; when it cannot be
written the request fails with :class:`~gateway.errors.AuditUnavailable` and returns
nothing.

The chain is global (all tenants) and ordered by ``seq`` = 1, 2, 3, ...; each entry's
``hash`` is ``sha256(prev_hash + canonical_json(record.to_dict()))`` in hex, and the
first entry's ``prev_hash`` is 64 zeros. :func:`canonical_json` is JSON with sorted
keys, ``(",", ":")`` separators, ASCII only and no NaN, so anyone can recompute the
chain from an export. :meth:`AuditStore.verify` detects an edited, deleted or
reordered record and an edited hash. Retention deletes only a prefix of the chain
and keeps the last deleted entry's ``(seq, hash)`` as the checkpoint to verify from.
Someone able to rewrite the whole database can recompute every hash; against that,
copy the head hash somewhere they cannot write.

Two stores share one schema: :class:`SqliteAuditStore` (embedded) and
:class:`PostgresAuditStore` (replicas); :func:`open_audit_store` picks one from the
configured DSN. :func:`storage_errors` is the one place where sqlite3, psycopg and
OS errors become :class:`~gateway.errors.AuditUnavailable`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import hmac
import json
import logging
import math
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow

from gateway.errors import AuditUnavailable, InvalidRequest

log = logging.getLogger("scopegate.audit")

GENESIS_HASH = "0" * 64
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
OUTCOMES = frozenset({"allowed", "partial", "denied", "empty", "error"})
VERDICTS = frozenset({"allow", "deny", "error"})

Row = tuple[Any, ...]
TimeBound = datetime | str | None
_T = TypeVar("_T")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# -- time ------------------------------------------------------------------------------


def utc_now() -> str:
    """The current time as records carry it (see :func:`format_time`)."""
    return format_time(datetime.now(UTC))


def format_time(moment: datetime) -> str:
    """A timezone-aware ``moment`` as ISO-8601 UTC: ``2025-01-31T12:00:00.000000Z``."""
    if moment.tzinfo is None:
        raise ValueError("audit times must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"audit time {text!r} has no timezone")
    return moment


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _bound_micros(value: datetime | str) -> int:
    """A ``since``/``until`` filter in microseconds; a time without zone is UTC."""
    try:
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidRequest(f"invalid time {value!r}: use ISO-8601") from exc
    return _micros(moment if moment.tzinfo else moment.replace(tzinfo=UTC))


# -- hashing and redaction ---------------------------------------------------------------


def canonical_json(value: Any) -> str:
    """The serialisation that is hashed: sorted keys, no spaces, ASCII only, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def chain_hash(prev_hash: str, record_json: str) -> str:
    """``sha256(prev_hash + record_json)`` as lowercase hex."""
    return hashlib.sha256((prev_hash + record_json).encode("utf-8")).hexdigest()


def redact_query(query: str, key: str | bytes) -> str:
    """The keyed hash (HMAC-SHA256, hex) recorded instead of the query under redaction.

    Keyed, so a reader of the log cannot confirm a guessed query; reviewers who hold
    the key can still find every request that asked a given query.
    """
    secret = key.encode("utf-8") if isinstance(key, str) else key
    if not secret:
        raise ValueError("a redaction key is required")
    return hmac.new(secret, query.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def query_fields(query: str, *, redact: bool, key: str | bytes) -> tuple[str | None, str | None]:
    """``(query, query_hash)`` for a record: the text, or only its keyed hash."""
    return (None, redact_query(query, key)) if redact else (query, None)


# -- records -----------------------------------------------------------------------------


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalising fields of a frozen dataclass


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        raise TypeError("expected a sequence of strings, not a string")
    return tuple(str(v) for v in values)


def _frozen_json(extra: Mapping[str, Any]) -> Mapping[str, Any]:
    """A JSON-safe, deep-copied, read-only view of ``extra`` (fails early otherwise)."""
    return MappingProxyType(json.loads(canonical_json(dict(extra))))


@dataclass(frozen=True, slots=True)
class CandidateVerdict:
    """One candidate document of a request and what the decision made of it."""

    document_id: str
    source: str
    chunk_ids: tuple[str, ...]
    verdict: str  # "allow" | "deny" | "error"
    failed_checks: tuple[str, ...] = ()
    errored_checks: tuple[str, ...] = ()
    returned: bool = False

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {self.verdict!r}")
        for name in ("chunk_ids", "failed_checks", "errored_checks"):
            _set(self, name, _strings(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, keys in field order."""
        return {
            "document_id": self.document_id,
            "source": self.source,
            "chunk_ids": list(self.chunk_ids),
            "verdict": self.verdict,
            "failed_checks": list(self.failed_checks),
            "errored_checks": list(self.errored_checks),
            "returned": self.returned,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CandidateVerdict:
        """The inverse of :meth:`to_dict`."""
        return cls(
            document_id=data["document_id"],
            source=data["source"],
            chunk_ids=tuple(data["chunk_ids"]),
            verdict=data["verdict"],
            failed_checks=tuple(data["failed_checks"]),
            errored_checks=tuple(data["errored_checks"]),
            returned=bool(data["returned"]),
        )


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """Everything needed to explain and replay one request's decision.

    ``time`` is ISO-8601 with a timezone (:func:`utc_now`); ``kind`` is
    ``"retrieve"`` for retrievals; ``extra`` must be JSON-safe and is frozen.
    """

    request_id: str
    time: str
    tenant: str
    user: str
    agent: str | None
    task: str | None
    token_id: str
    kind: str
    query: str | None
    query_hash: str | None
    sources: tuple[str, ...]
    strategy: str
    store_id: str
    model_id: str
    consistency: str
    k: int
    candidates: tuple[CandidateVerdict, ...]
    returned_chunk_ids: tuple[str, ...]
    outcome: str  # "allowed" | "partial" | "denied" | "empty" | "error"
    error_code: str | None
    latency_ms: float
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}")
        _parse_time(self.time)
        if not math.isfinite(self.latency_ms):
            raise ValueError("latency_ms must be finite")
        _set(self, "sources", _strings(self.sources))
        _set(self, "returned_chunk_ids", _strings(self.returned_chunk_ids))
        _set(self, "candidates", tuple(self.candidates))
        _set(self, "latency_ms", float(self.latency_ms))
        _set(self, "extra", _frozen_json(self.extra))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, keys in field order; :func:`canonical_json` of this is hashed."""
        return {
            "request_id": self.request_id,
            "time": self.time,
            "tenant": self.tenant,
            "user": self.user,
            "agent": self.agent,
            "task": self.task,
            "token_id": self.token_id,
            "kind": self.kind,
            "query": self.query,
            "query_hash": self.query_hash,
            "sources": list(self.sources),
            "strategy": self.strategy,
            "store_id": self.store_id,
            "model_id": self.model_id,
            "consistency": self.consistency,
            "k": self.k,
            "candidates": [c.to_dict() for c in self.candidates],
            "returned_chunk_ids": list(self.returned_chunk_ids),
            "outcome": self.outcome,
            "error_code": self.error_code,
            "latency_ms": self.latency_ms,
            "extra": copy.deepcopy(dict(self.extra)),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditRecord:
        """The inverse of :meth:`to_dict`."""
        return cls(
            request_id=data["request_id"],
            time=data["time"],
            tenant=data["tenant"],
            user=data["user"],
            agent=data["agent"],
            task=data["task"],
            token_id=data["token_id"],
            kind=data["kind"],
            query=data["query"],
            query_hash=data["query_hash"],
            sources=tuple(data["sources"]),
            strategy=data["strategy"],
            store_id=data["store_id"],
            model_id=data["model_id"],
            consistency=data["consistency"],
            k=data["k"],
            candidates=tuple(CandidateVerdict.from_dict(c) for c in data["candidates"]),
            returned_chunk_ids=tuple(data["returned_chunk_ids"]),
            outcome=data["outcome"],
            error_code=data["error_code"],
            latency_ms=data["latency_ms"],
            extra=data.get("extra", {}),
        )


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """A record at its place in the chain."""

    seq: int
    prev_hash: str
    hash: str
    record: AuditRecord

    def to_dict(self) -> dict[str, Any]:
        """The export form: ``seq``, ``prev_hash``, ``hash`` and the record."""
        return {
            "seq": self.seq,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
            "record": self.record.to_dict(),
        }


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :meth:`AuditStore.verify`; ``checked`` counts entries found intact."""

    ok: bool
    checked: int
    first_broken_seq: int | None
    reason: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe."""
        return asdict(self)


AuditPage = tuple[list[AuditEntry], str | None]
#: Positions records keep in the archive: store id -> archive seq -> the chain hash a
#: record kept there -> the first audit entry (its ``seq``) that kept it.
Anchors = Mapping[str, Mapping[int, Mapping[str, int]]]
EntryList = list[AuditEntry]


# -- the change-log archive ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArchivedChange:
    """One entry of OpenFGA's change log, as the archive keeps it.

    ``seq`` numbers one store's changes 1, 2, 3, ... in the order they were archived
    (0 for a change not archived yet); ``time_us`` is OpenFGA's own timestamp of the
    change, in microseconds since the epoch; ``operation`` is ``write`` or ``delete``;
    ``condition`` is the canonical JSON of a written tuple's condition, or None.
    """

    seq: int
    time_us: int
    operation: str
    user: str
    relation: str
    object: str
    condition: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        """The tuple the change is about: ``(object, relation, user)``."""
        return (self.object, self.relation, self.user)

    @property
    def identity(self) -> Row:
        """What tells two changes apart when OpenFGA hands the same one out again."""
        return (self.time_us, self.operation, self.object, self.relation, self.user, self.condition)

    @property
    def time(self) -> str:
        """OpenFGA's timestamp as records carry times (:func:`format_time`)."""
        return format_time(_EPOCH + timedelta(microseconds=self.time_us))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe; :func:`canonical_json` of this (with the store id) is hashed."""
        return {
            "seq": self.seq,
            "time_us": self.time_us,
            "operation": self.operation,
            "user": self.user,
            "relation": self.relation,
            "object": self.object,
            "condition": self.condition,
        }


ChangeList = list[ArchivedChange]


@dataclass(frozen=True, slots=True)
class ArchiveHead:
    """Where one store's archive stands.

    ``seq`` and ``hash`` are the last archived change and the archive chain's hash
    there (each change's ``hash`` is ``sha256(prev_hash + canonical_json({"store_id",
    "change"}))``, from 64 zeros). ``newest_us`` is the newest OpenFGA timestamp
    archived; ``resume_from_us`` where the next full sweep of the log starts;
    ``began_us`` and ``updated_us`` the gateway's clock when archiving began and when
    the last change was added.
    """

    store_id: str
    seq: int
    hash: str
    resume_from_us: int | None
    newest_us: int | None
    began_us: int
    updated_us: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe."""
        return asdict(self)


class AuditStore(Protocol):
    """Where audit records go. Every storage failure raises ``AuditUnavailable``."""

    async def append(self, record: AuditRecord) -> AuditEntry:
        """Chain ``record`` after the current head, atomically; return once durable."""
        ...

    async def get(self, tenant: str, request_id: str) -> AuditEntry | None:
        """The entry of ``request_id`` in ``tenant``; None if absent or another tenant's."""
        ...

    async def list(
        self,
        tenant: str,
        *,
        outcome: str | None = None,
        user: str | None = None,
        agent: str | None = None,
        task: str | None = None,
        since: TimeBound = None,
        until: TimeBound = None,
        limit: int = DEFAULT_PAGE_SIZE,
        cursor: str | None = None,
    ) -> AuditPage:
        """One page of ``tenant``'s entries, newest first, and the next page's cursor.

        ``since`` is inclusive, ``until`` exclusive; ``limit`` is capped at 500; the
        cursor is opaque and None on the last page. Bad input raises InvalidRequest.
        """
        ...

    def iter_all(self, tenant: str | None) -> AsyncIterator[AuditEntry]:
        """Every entry (of ``tenant``, or of all tenants for None), oldest first."""
        ...

    async def verify(self) -> VerifyResult:
        """Recompute the whole chain from the retention checkpoint."""
        ...

    async def purge_older_than(self, days: float, *, now: datetime | None = None) -> int:
        """Delete the oldest entries older than ``days``; return how many.

        Only a prefix of the chain goes (an entry stays while an older-seq one must
        stay), after checking it is intact; the chain stays verifiable.
        """
        ...

    async def healthy(self) -> bool:
        """Whether an append could be written now (never raises)."""
        ...

    async def archive_changes(
        self, store_id: str, changes: Sequence[ArchivedChange], *, overlap_us: int
    ) -> ArchiveHead:
        """Add the changes not archived yet, atomically; return the archive's head.

        ``changes`` are what one read of OpenFGA's change log returned (``seq`` 0); a
        change already archived (same identity) is skipped, so reading an overlapping
        window again is harmless, and concurrent archivers (replicas) take turns on
        one per-store lock. The next sweep starts ``overlap_us`` before the newest
        archived timestamp.
        """
        ...

    async def archive_head(self, store_id: str) -> ArchiveHead | None:
        """Where the store's archive stands; None before anything was archived."""
        ...

    async def archived_changes(
        self,
        store_id: str,
        objects: Iterable[str],
        *,
        subjects: Iterable[str] | None = None,
        through: Iterable[str] = (),
    ) -> ChangeList:
        """Every archived change on ``objects``, oldest first (by time, then seq).

        With ``subjects``, only changes whose user is one of them, a userset or a
        wildcard, or whose relation is in ``through`` (relations that lead to other
        objects): the changes that can matter to checks asked for those subjects.
        """
        ...

    async def verify_archive(self, store_id: str) -> VerifyResult:
        """Recompute the store's archive chain; ``checked`` counts intact changes."""
        ...

    async def verify_archives(self, anchors: Anchors | None = None) -> dict[str, VerifyResult]:
        """Recompute the archive chain of every store archived here (read only: none
        when this database never held an archive), and check that it still holds the
        hash each of ``anchors`` recorded (a store named only there has lost its archive)."""
        ...

    async def archived_change(self, store_id: str, seq: int) -> ArchivedChange | None:
        """The archived change ``seq`` of ``store_id`` as stored now (None if absent)."""
        ...

    async def archive_hash_at(self, store_id: str, seq: int) -> str | None:
        """The archive chain's stored hash at change ``seq`` (None if there is none)."""
        ...

    async def admin_entries(self, tenant: str, since: TimeBound, until: TimeBound) -> EntryList:
        """The tenant's admin records (``kind`` admin) in ``[since, until)``, oldest first."""
        ...

    async def close(self) -> None:
        """Release connections; later calls raise ``AuditUnavailable``."""
        ...


# -- the one error translation ---------------------------------------------------------


@contextlib.contextmanager
def storage_errors() -> Iterator[None]:
    """Turn any sqlite3, psycopg or OS failure into :class:`AuditUnavailable`.

    The one place that translates storage errors: whatever the cause, a request
    whose record cannot be written fails closed.
    """
    try:
        yield
    except (sqlite3.Error, psycopg.Error, OSError) as exc:
        raise _unavailable(exc) from exc


def _unavailable(exc: BaseException) -> AuditUnavailable:
    detail = (str(exc).splitlines() or [""])[0][:200]
    # The driver's text may name hosts or files: logged, kept out of the message.
    log.warning("audit store unavailable: %s: %s", type(exc).__name__, detail)
    return AuditUnavailable(f"audit store unavailable ({type(exc).__name__})", detail=detail)


# -- schema (shared by both stores; "?" placeholders) ------------------------------------

_Statement = tuple[str, tuple[object, ...]]

_MIGRATIONS: tuple[tuple[_Statement, ...], ...] = (
    (  # 1: the log, its indexes, and the chain row (retention checkpoint and head).
        (
            "CREATE TABLE audit_log ("
            " seq BIGINT PRIMARY KEY, prev_hash TEXT NOT NULL, hash TEXT NOT NULL,"
            " record TEXT NOT NULL, tenant TEXT NOT NULL, request_id TEXT NOT NULL,"
            " user_id TEXT NOT NULL, agent_id TEXT, task_id TEXT, outcome TEXT NOT NULL,"
            " time_us BIGINT NOT NULL, UNIQUE (tenant, request_id))",
            (),
        ),
        ("CREATE INDEX audit_log_tenant_seq ON audit_log (tenant, seq)", ()),
        ("CREATE INDEX audit_log_tenant_outcome ON audit_log (tenant, outcome, seq)", ()),
        ("CREATE INDEX audit_log_tenant_user ON audit_log (tenant, user_id, seq)", ()),
        ("CREATE INDEX audit_log_time ON audit_log (time_us)", ()),
        (
            "CREATE TABLE audit_chain (id INTEGER PRIMARY KEY CHECK (id = 1),"
            " base_seq BIGINT NOT NULL, base_hash TEXT NOT NULL,"
            " head_seq BIGINT NOT NULL, head_hash TEXT NOT NULL)",
            (),
        ),
        (
            "INSERT INTO audit_chain (id, base_seq, base_hash, head_seq, head_hash)"
            " VALUES (1, 0, ?, 0, ?)",
            (GENESIS_HASH, GENESIS_HASH),
        ),
    ),
)
LATEST_SCHEMA_VERSION = len(_MIGRATIONS)
# The change-log archive has its own track (``changelog_schema_version``): its tables
# are created when an archiver (or an as-of replay) first uses the store, so a store
# that only ever holds records keeps the audit log's schema alone.
_ARCHIVE_MIGRATIONS: tuple[tuple[_Statement, ...], ...] = (
    (  # 1: OpenFGA's change log, archived per store (gateway/changelog.py), and its head.
        (
            "CREATE TABLE changelog_archive ("
            " store_id TEXT NOT NULL, seq BIGINT NOT NULL, time_us BIGINT NOT NULL,"
            " operation TEXT NOT NULL, object TEXT NOT NULL, relation TEXT NOT NULL,"
            " user_ref TEXT NOT NULL, user_set INTEGER NOT NULL, condition TEXT,"
            " hash TEXT NOT NULL, archived_us BIGINT NOT NULL, PRIMARY KEY (store_id, seq))",
            (),
        ),
        (
            "CREATE INDEX changelog_archive_object"
            " ON changelog_archive (store_id, object, time_us)",
            (),
        ),
        ("CREATE INDEX changelog_archive_time ON changelog_archive (store_id, time_us)", ()),
        (
            "CREATE TABLE changelog_cursor (store_id TEXT PRIMARY KEY,"
            " head_seq BIGINT NOT NULL, head_hash TEXT NOT NULL, resume_from_us BIGINT,"
            " newest_us BIGINT, began_us BIGINT NOT NULL, updated_us BIGINT NOT NULL)",
            (),
        ),
        ("CREATE INDEX audit_log_tenant_admin ON audit_log (tenant, agent_id, time_us)", ()),
    ),
)


@dataclass(frozen=True, slots=True)
class _Track:
    """A line of migrations recorded in its own version table."""

    table: str
    migrations: tuple[tuple[_Statement, ...], ...]

    @property
    def create(self) -> str:
        return f"CREATE TABLE IF NOT EXISTS {self.table} (version INTEGER PRIMARY KEY)"

    @property
    def select(self) -> str:
        return f"SELECT COALESCE(MAX(version), 0) FROM {self.table}"  # noqa: S608

    @property
    def insert(self) -> str:
        return f"INSERT INTO {self.table} (version) VALUES (?)"  # noqa: S608

    def pending(self, current: int) -> list[tuple[int, tuple[_Statement, ...]]]:
        latest = len(self.migrations)
        if current > latest:
            raise AuditUnavailable(
                f"audit schema version {current} ({self.table}) is newer than this "
                f"gateway's ({latest}); upgrade the gateway"
            )
        return [(v, self.migrations[v - 1]) for v in range(current + 1, latest + 1)]


_LOG_TRACK = _Track("schema_version", _MIGRATIONS)
_ARCHIVE_TRACK = _Track("changelog_schema_version", _ARCHIVE_MIGRATIONS)

# f-strings below only splice these constant column lists: values always go in as "?".
_ENTRY_COLUMNS = "seq, prev_hash, hash, record"
_WALK_COLUMNS = (
    f"{_ENTRY_COLUMNS}, tenant, request_id, user_id, agent_id, task_id, outcome, time_us"
)
_SELECT_CHAIN = "SELECT base_seq, base_hash, head_seq, head_hash FROM audit_chain WHERE id = 1"
_UPDATE_HEAD = "UPDATE audit_chain SET head_seq = ?, head_hash = ? WHERE id = 1"
_UPDATE_BASE = "UPDATE audit_chain SET base_seq = ?, base_hash = ? WHERE id = 1"
_INSERT_ENTRY = f"INSERT INTO audit_log ({_WALK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
_SELECT_ONE = f"SELECT {_ENTRY_COLUMNS} FROM audit_log WHERE tenant = ? AND request_id = ?"  # noqa: S608
_SELECT_ALL = f"SELECT {_WALK_COLUMNS} FROM audit_log ORDER BY seq"  # noqa: S608
_SELECT_RANGE = f"SELECT {_WALK_COLUMNS} FROM audit_log WHERE seq > ? AND seq <= ? ORDER BY seq"  # noqa: S608
_FIRST_RECENT = "SELECT MIN(seq) FROM audit_log WHERE time_us >= ?"
_DELETE_UPTO = "DELETE FROM audit_log WHERE seq <= ?"
_ITER_BATCH = 500

_CHANGE_COLUMNS = "seq, time_us, operation, user_ref, relation, object, condition"
_CURSOR_COLUMNS = "store_id, head_seq, head_hash, resume_from_us, newest_us, began_us, updated_us"
_SELECT_CURSOR = f"SELECT {_CURSOR_COLUMNS} FROM changelog_cursor WHERE store_id = ?"  # noqa: S608
_ENSURE_CURSOR = (
    f"INSERT INTO changelog_cursor ({_CURSOR_COLUMNS}) VALUES (?, 0, ?, NULL, NULL, ?, ?)"  # noqa: S608
    " ON CONFLICT (store_id) DO NOTHING"
)
_UPDATE_CURSOR = (
    "UPDATE changelog_cursor SET head_seq = ?, head_hash = ?, resume_from_us = ?,"
    " newest_us = ?, updated_us = ? WHERE store_id = ?"
)
_ARCHIVED_SINCE = (
    "SELECT time_us, operation, object, relation, user_ref, condition"
    " FROM changelog_archive WHERE store_id = ? AND time_us >= ?"
)
_INSERT_CHANGE = (
    "INSERT INTO changelog_archive (store_id, seq, time_us, operation, object, relation,"
    " user_ref, user_set, condition, hash, archived_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_ARCHIVE_CHAIN = (
    f"SELECT {_CHANGE_COLUMNS}, hash, user_set FROM changelog_archive"  # noqa: S608
    " WHERE store_id = ? ORDER BY seq"
)
_SELECT_ARCHIVED_CHANGE = (
    f"SELECT {_CHANGE_COLUMNS} FROM changelog_archive WHERE store_id = ? AND seq = ?"  # noqa: S608
)
# A store whose cursor row was deleted still has its changes verified, and the reverse.
_ARCHIVED_STORES = (
    "SELECT store_id FROM changelog_cursor UNION SELECT store_id FROM changelog_archive"
    " ORDER BY store_id"
)
_SQLITE_HAS_ARCHIVE = (
    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'changelog_cursor'"
)
_PG_HAS_ARCHIVE = "SELECT to_regclass('changelog_cursor') IS NOT NULL"
_SELECT_ARCHIVE_HASH = "SELECT hash FROM changelog_archive WHERE store_id = ? AND seq = ?"
_SELECT_ADMIN = (
    f"SELECT {_ENTRY_COLUMNS} FROM audit_log WHERE tenant = ? AND agent_id IS NULL"  # noqa: S608
    " AND time_us >= ? AND time_us < ? ORDER BY seq"
)
_IN_BATCH = 200
_FAR_FUTURE_US = 2**62


def _user_set(user: str) -> int:
    """1 for a userset (``group:g#member``) or a wildcard (``user:*``): users that stand
    for others, so their tuples matter to checks of any subject."""
    return 1 if "#" in user or user.endswith(":*") else 0


def archive_hash(prev_hash: str, store_id: str, change: ArchivedChange) -> str:
    """The archive chain's hash of ``change`` after ``prev_hash``."""
    return chain_hash(prev_hash, canonical_json({"store_id": store_id, "change": change.to_dict()}))


def _head_from_row(row: Row) -> ArchiveHead:
    return ArchiveHead(
        store_id=row[0],
        seq=int(row[1]),
        hash=row[2],
        resume_from_us=None if row[3] is None else int(row[3]),
        newest_us=None if row[4] is None else int(row[4]),
        began_us=int(row[5]),
        updated_us=int(row[6]),
    )


def _change_from_row(row: Row) -> ArchivedChange:
    return ArchivedChange(int(row[0]), int(row[1]), row[2], row[3], row[4], row[5], row[6])


def _fresh_changes(incoming: Sequence[ArchivedChange], archived: Iterable[Row]) -> ChangeList:
    """The changes of ``incoming`` beyond those archived already (counted by identity)."""
    have = Counter(tuple(row) for row in archived)
    fresh: list[ArchivedChange] = []
    for change in incoming:
        if have[change.identity] > 0:
            have[change.identity] -= 1
        else:
            fresh.append(change)
    return fresh


def _append_changes(
    head: ArchiveHead, fresh: Sequence[ArchivedChange], now_us: int
) -> tuple[list[Row], str]:
    """Insert parameters for ``fresh`` after ``head``, and the new head hash."""
    rows: list[Row] = []
    seq, hash_ = head.seq, head.hash
    for change in fresh:
        seq += 1
        numbered = replace(change, seq=seq)
        hash_ = archive_hash(hash_, head.store_id, numbered)
        rows.append(
            (
                head.store_id,
                seq,
                change.time_us,
                change.operation,
                change.object,
                change.relation,
                change.user,
                _user_set(change.user),
                change.condition,
                hash_,
                now_us,
            )
        )
    return rows, hash_


def _advanced(
    head: ArchiveHead,
    incoming: Sequence[ArchivedChange],
    added: int,
    hash_: str,
    overlap_us: int,
    now_us: int,
) -> Row:
    """The cursor's new values (``_UPDATE_CURSOR`` order) once ``incoming`` was read."""
    newest = max(c.time_us for c in incoming)
    if head.newest_us is not None:
        newest = max(newest, head.newest_us)
    resume = newest - overlap_us
    if head.resume_from_us is not None:
        resume = max(resume, head.resume_from_us)
    updated = now_us if added else head.updated_us
    return (head.seq + added, hash_, resume, newest, updated, head.store_id)


def _in_clause(column: str, count: int) -> str:
    return f"{column} IN ({', '.join('?' * count)})"


def _archived_query(
    store_id: str,
    objects: Sequence[str],
    subjects: Sequence[str] | None,
    through: Sequence[str],
) -> tuple[str, list[object]]:
    """Changes on ``objects`` (optionally only those that can matter to ``subjects``)."""
    clauses = ["store_id = ?", _in_clause("object", len(objects))]
    params: list[object] = [store_id, *objects]
    if subjects is not None:
        relevant = ["user_set = 1"]
        if subjects:
            relevant.append(_in_clause("user_ref", len(subjects)))
            params += subjects
        if through:
            relevant.append(_in_clause("relation", len(through)))
            params += through
        clauses.append("(" + " OR ".join(relevant) + ")")
    where = " AND ".join(clauses)
    return f"SELECT {_CHANGE_COLUMNS} FROM changelog_archive WHERE {where}", params  # noqa: S608


class _Walk:
    """Steps through stored rows in chain order; subclasses say how one row fits."""

    def step(self, row: Row) -> VerifyResult | None:
        raise NotImplementedError

    def run(self, rows: Iterable[Row]) -> VerifyResult | None:
        """Step through ``rows``; the first break, or None."""
        for row in rows:
            broken = self.step(row)
            if broken is not None:
                return broken
        return None


class _ArchiveWalk(_Walk):
    """Follows one store's archive chain from the start (rows of ``_SELECT_ARCHIVE_CHAIN``)."""

    def __init__(self, store_id: str, anchors: Mapping[int, Mapping[str, int]] | None = None):
        self.store_id = store_id
        self.seq = 0
        self.hash = GENESIS_HASH
        self.anchors = anchors or {}

    def step(self, row: Row) -> VerifyResult | None:
        change = _change_from_row(row[:7])
        if change.seq != self.seq + 1:
            return VerifyResult(False, self.seq, self.seq + 1, f"change {self.seq + 1} is missing")
        expected = archive_hash(self.hash, self.store_id, change)
        if expected != row[7]:
            return VerifyResult(False, self.seq, change.seq, "hash does not match the change")
        # The filter column replays read by: a userset hidden from them is tampering too.
        if int(row[8]) != _user_set(change.user):
            return VerifyResult(False, self.seq, change.seq, "user_set does not match the change")
        # A chain rewritten from some change on, hashes recomputed, still links up; the
        # hash an audit record kept at a later position does not.
        for kept, entry in self.anchors.get(change.seq, {}).items():
            if kept != expected:
                reason = (
                    f"audit entry {entry} recorded another chain hash at change {change.seq}:"
                    " the history up to it was rewritten"
                )
                return VerifyResult(False, self.seq, change.seq, reason)
        self.seq, self.hash = change.seq, expected
        return None

    def finish(self, head: ArchiveHead | None) -> VerifyResult:
        beyond = sorted(seq for seq in self.anchors if seq > self.seq)
        if beyond:
            entry = min(self.anchors[beyond[0]].values())
            reason = f"change {beyond[0]}, recorded by audit entry {entry}, is not in the archive"
            return VerifyResult(False, self.seq, beyond[0], reason)
        if head is None and self.seq == 0:
            return VerifyResult(True, 0, None, None)
        if head is not None and (head.seq, head.hash) == (self.seq, self.hash):
            return VerifyResult(True, self.seq, None, None)
        return VerifyResult(
            False, self.seq, self.seq + 1, "the archive head is not its last change"
        )


# -- rows, links, pages --------------------------------------------------------------------


def _index_values(record: AuditRecord) -> Row:
    """The columns stored beside a record's JSON so that lists can filter."""
    moment = _micros(_parse_time(record.time))
    return (
        record.tenant,
        record.request_id,
        record.user,
        record.agent,
        record.task,
        record.outcome,
        moment,
    )


def _link(head_seq: int, head_hash: str, record: AuditRecord, text: str) -> AuditEntry:
    return AuditEntry(head_seq + 1, head_hash, chain_hash(head_hash, text), record)


def _insert_params(entry: AuditEntry, text: str) -> Row:
    return (entry.seq, entry.prev_hash, entry.hash, text, *_index_values(entry.record))


def _decode_record(text: str) -> AuditRecord:
    try:
        return AuditRecord.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise AuditUnavailable("a stored audit record could not be decoded") from exc


def _entry_from_row(row: Row) -> AuditEntry:
    return AuditEntry(row[0], row[1], row[2], _decode_record(row[3]))


def _page_size(limit: int) -> int:
    if limit < 1:
        raise InvalidRequest("limit must be at least 1")
    return min(limit, MAX_PAGE_SIZE)


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except ValueError as exc:
        raise InvalidRequest("invalid cursor") from exc
    tag, _, number = text.partition(":")
    if tag != "seq" or not number.isdigit() or len(number) > 18:
        raise InvalidRequest("invalid cursor")
    return int(number)


def _list_query(
    tenant: str,
    equals: Mapping[str, str | None],
    since: TimeBound,
    until: TimeBound,
    before_seq: int | None,
    limit: int,
) -> tuple[str, list[object]]:
    """Newest-first page query; ``equals`` maps column names (constants) to values."""
    clauses: list[str] = ["tenant = ?"]
    params: list[object] = [tenant]
    bounds = (("time_us >= ?", since), ("time_us < ?", until))
    for clause, value in [(f"{c} = ?", v) for c, v in equals.items()] + list(bounds):
        if value is not None:
            clauses.append(clause)
            params.append(_bound_micros(value) if clause.startswith("time_us") else value)
    if before_seq is not None:
        clauses.append("seq < ?")
        params.append(before_seq)
    where = " AND ".join(clauses)
    sql = f"SELECT {_ENTRY_COLUMNS} FROM audit_log WHERE {where} ORDER BY seq DESC LIMIT ?"  # noqa: S608
    return sql, [*params, limit]


def _batch_query(tenant: str | None, after_seq: int) -> tuple[str, list[object]]:
    """Oldest-first batch after ``after_seq``, for :meth:`AuditStore.iter_all`."""
    scope = "" if tenant is None else " AND tenant = ?"
    params: list[object] = [after_seq] if tenant is None else [after_seq, tenant]
    sql = f"SELECT {_ENTRY_COLUMNS} FROM audit_log WHERE seq > ?{scope} ORDER BY seq LIMIT ?"  # noqa: S608
    return sql, [*params, _ITER_BATCH]


def _cutoff_micros(days: float, now: datetime | None) -> int:
    if days < 0:
        raise ValueError("retention days must not be negative")
    return _bound_micros((now or datetime.now(UTC)) - timedelta(days=days))


def _purge_end(first_recent: int | None, base_seq: int, head_seq: int) -> int | None:
    """The last seq to purge: everything before the oldest entry that must stay."""
    last = head_seq if first_recent is None else first_recent - 1
    return last if last > base_seq else None


# -- verification --------------------------------------------------------------------------


def _indexes_match(text: str, columns: Row) -> bool:
    try:
        return _index_values(AuditRecord.from_dict(json.loads(text))) == tuple(columns)
    except (ValueError, KeyError, TypeError):
        return False


class _ChainWalk(_Walk):
    """Follows the chain from a checkpoint, one stored row (``_WALK_COLUMNS``) at a time."""

    def __init__(self, seq: int, hash_: str) -> None:
        self.seq = seq
        self.hash = hash_
        self.checked = 0

    def step(self, row: Row) -> VerifyResult | None:
        """Accept the next row in seq order, or describe how the chain breaks there."""
        problem = self._problem(row)
        if problem is not None:
            return VerifyResult(False, self.checked, problem[0], problem[1])
        self.seq, self.hash = row[0], row[2]
        self.checked += 1
        return None

    def finish(self, head_seq: int, head_hash: str) -> VerifyResult:
        """The result once every row was accepted: the last one must be the head."""
        if (self.seq, self.hash) == (head_seq, head_hash):
            return VerifyResult(True, self.checked, None, None)
        broken = head_seq if self.seq == head_seq else min(self.seq, head_seq) + 1
        reason = f"the chain head (entry {head_seq}) is not the last entry (entry {self.seq})"
        return VerifyResult(False, self.checked, broken, reason)

    def _problem(self, row: Row) -> tuple[int, str] | None:
        seq, prev_hash, hash_, text = row[:4]
        expected = self.seq + 1
        if seq < expected:
            return seq, f"entry {seq} lies before the chain's start (entry {expected})"
        if seq > expected:
            return expected, f"entry {expected} is missing"
        if prev_hash != self.hash:
            return seq, "prev_hash is not the previous entry's hash"
        if chain_hash(prev_hash, text) != hash_:
            return seq, "hash does not match the record"
        if not _indexes_match(text, row[4:]):
            return seq, "indexed columns do not match the record"
        return None


def _check_purge_range(walk: _ChainWalk, broken: VerifyResult | None, last: int) -> None:
    """Refuse to purge (and so erase evidence of) a broken stretch of the chain."""
    if broken is None and walk.seq != last:
        broken = VerifyResult(False, walk.checked, walk.seq + 1, f"entry {walk.seq + 1} is missing")
    if broken is not None:
        raise AuditUnavailable(
            f"refusing to purge: the chain is broken at entry {broken.first_broken_seq} "
            f"({broken.reason})"
        )


# -- shared read path ----------------------------------------------------------------------


class _SqlAuditStore(ABC):
    """The read queries both SQL stores share; subclasses run them and the writes."""

    @abstractmethod
    async def _fetch(self, sql: str, params: Sequence[object]) -> Sequence[Row]:
        """Run one read query written with ``?`` placeholders; all rows."""

    @abstractmethod
    async def _ensure_archive(self) -> None:
        """Create the change-log archive's tables if this database has none yet."""

    async def get(self, tenant: str, request_id: str) -> AuditEntry | None:
        """The entry of ``request_id`` in ``tenant``; None if absent or another tenant's."""
        rows = await self._fetch(_SELECT_ONE, (tenant, request_id))
        return _entry_from_row(rows[0]) if rows else None

    async def list(
        self,
        tenant: str,
        *,
        outcome: str | None = None,
        user: str | None = None,
        agent: str | None = None,
        task: str | None = None,
        since: TimeBound = None,
        until: TimeBound = None,
        limit: int = DEFAULT_PAGE_SIZE,
        cursor: str | None = None,
    ) -> AuditPage:
        """One page of ``tenant``'s entries, newest first, and the next page's cursor."""
        size = _page_size(limit)
        equals = {"outcome": outcome, "user_id": user, "agent_id": agent, "task_id": task}
        query = _list_query(tenant, equals, since, until, _decode_cursor(cursor), size + 1)
        rows = await self._fetch(*query)
        entries = [_entry_from_row(row) for row in rows[:size]]
        more = len(rows) > size
        return entries, _encode_cursor(entries[-1].seq) if more else None

    async def iter_all(self, tenant: str | None) -> AsyncIterator[AuditEntry]:
        """Every entry (of ``tenant``, or of all tenants for None), oldest first."""
        after = 0
        while True:
            rows = await self._fetch(*_batch_query(tenant, after))
            for row in rows:
                yield _entry_from_row(row)
            if len(rows) < _ITER_BATCH:
                return
            after = rows[-1][0]

    async def archive_head(self, store_id: str) -> ArchiveHead | None:
        """Where the store's archive stands; None before anything was archived."""
        await self._ensure_archive()
        rows = await self._fetch(_SELECT_CURSOR, (store_id,))
        return _head_from_row(rows[0]) if rows else None

    async def archived_changes(
        self,
        store_id: str,
        objects: Iterable[str],
        *,
        subjects: Iterable[str] | None = None,
        through: Iterable[str] = (),
    ) -> ChangeList:
        """Every archived change on ``objects`` (relevant to ``subjects``), oldest first."""
        await self._ensure_archive()
        wanted = sorted(set(objects))
        who = None if subjects is None else sorted(set(subjects))
        via = sorted(set(through))
        found: list[ArchivedChange] = []
        for i in range(0, len(wanted), _IN_BATCH):
            query = _archived_query(store_id, wanted[i : i + _IN_BATCH], who, via)
            found += [_change_from_row(row) for row in await self._fetch(*query)]
        return sorted(found, key=lambda c: (c.time_us, c.seq))

    async def archive_hash_at(self, store_id: str, seq: int) -> str | None:
        """The archive chain's stored hash at change ``seq`` (None if there is none)."""
        if seq == 0:
            return GENESIS_HASH
        await self._ensure_archive()
        rows = await self._fetch(_SELECT_ARCHIVE_HASH, (store_id, seq))
        return str(rows[0][0]) if rows else None

    @abstractmethod
    async def _verify_archives(self, only: str | None, anchors: Anchors) -> dict[str, VerifyResult]:
        """Walk the archive chains (of ``only``, or of every store) in one read snapshot."""

    async def verify_archive(self, store_id: str) -> VerifyResult:
        """Recompute the store's archive chain from its first change."""
        return (await self._verify_archives(store_id, {}))[store_id]

    async def verify_archives(self, anchors: Anchors | None = None) -> dict[str, VerifyResult]:
        """Recompute every store's archive chain, checking ``anchors``; nothing is
        created or written."""
        return await self._verify_archives(None, anchors or {})

    async def archived_change(self, store_id: str, seq: int) -> ArchivedChange | None:
        """The archived change ``seq`` of ``store_id`` as stored now (None if absent)."""
        rows = await self._fetch(_SELECT_ARCHIVED_CHANGE, (store_id, seq))
        return _change_from_row(tuple(rows[0])) if rows else None

    async def admin_entries(self, tenant: str, since: TimeBound, until: TimeBound) -> EntryList:
        """The tenant's admin records in ``[since, until)``, oldest first."""
        low = _bound_micros(since) if since is not None else 0
        high = _bound_micros(until) if until is not None else _FAR_FUTURE_US
        rows = await self._fetch(_SELECT_ADMIN, (tenant, low, high))
        return [e for e in map(_entry_from_row, rows) if e.record.kind == "admin"]


# -- SQLite --------------------------------------------------------------------------------


class SqliteAuditStore(_SqlAuditStore):
    """The embedded audit store: one SQLite file in WAL mode, shareable by processes.

    ``synchronous=FULL``: an acknowledged append has been fsynced and survives the
    process being killed. ``BEGIN IMMEDIATE`` makes appends from several connections
    or processes take turns on one chain, waiting up to ``busy_timeout_s``. Calls run
    in a worker thread, one at a time per store. ``max_pages`` caps the file's size
    in pages (usually 4 KiB): past it, appends fail as on a full disk.

    Appends commit in groups: the appends that queue up while one transaction is
    being written go into the next one, so a burst costs one fsync, not one each.
    Each append still returns only once its own record is on disk, and one record
    the database refuses (a request id already recorded) fails alone.
    """

    def __init__(
        self, path: Path | str, *, busy_timeout_s: float = 10.0, max_pages: int | None = None
    ) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._max_pages = max_pages
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._archive_ready = False
        self._queue: list[_Pending] = []
        self._queue_lock = threading.Lock()

    async def append(self, record: AuditRecord) -> AuditEntry:
        """Chain ``record`` after the current head; return once it is on disk."""
        pending = _Pending(record, canonical_json(record.to_dict()))
        with self._queue_lock:
            self._queue.append(pending)
        return await asyncio.to_thread(self._append, pending)

    def _append(self, pending: _Pending) -> AuditEntry:
        """Write every queued append in one transaction, unless one that took the lock
        before this one already wrote ``pending``."""
        with self._lock:
            if not pending.done:
                with self._queue_lock:
                    group, self._queue = self._queue, []
                try:
                    self._guarded(lambda conn: _sqlite_append_group(conn, group))
                except AuditUnavailable as exc:
                    for queued in group:  # one exception each: they are raised in parallel
                        queued.fail(AuditUnavailable(exc.message, detail=exc.detail))
                except BaseException as exc:
                    for queued in group:
                        queued.fail(exc)
        return pending.result()

    async def verify(self) -> VerifyResult:
        """Recompute the chain on a separate read snapshot (appends keep going)."""
        await self._call(_sqlite_noop)
        return await asyncio.to_thread(self._verify_snapshot)

    async def _verify_archives(self, only: str | None, anchors: Anchors) -> dict[str, VerifyResult]:
        await self._call(_sqlite_noop)
        return await asyncio.to_thread(self._verify_archives_snapshot, only, anchors)

    async def purge_older_than(self, days: float, *, now: datetime | None = None) -> int:
        """Delete the oldest entries older than ``days``; return how many."""
        cutoff = _cutoff_micros(days, now)
        return await self._call(lambda conn: _sqlite_purge(conn, cutoff))

    async def archive_changes(
        self, store_id: str, changes: Sequence[ArchivedChange], *, overlap_us: int
    ) -> ArchiveHead:
        """Add the changes not archived yet in one ``BEGIN IMMEDIATE`` transaction."""
        await self._ensure_archive()
        now_us = _micros(datetime.now(UTC))
        return await self._call(
            lambda conn: _sqlite_archive(conn, store_id, changes, overlap_us, now_us)
        )

    async def healthy(self) -> bool:
        """Whether the database can take the write lock and write now."""
        try:
            await self._call(_sqlite_probe)
        except AuditUnavailable:
            return False
        return True

    async def close(self) -> None:
        """Close the connection; later calls raise ``AuditUnavailable``."""
        await asyncio.to_thread(self._close)

    async def _fetch(self, sql: str, params: Sequence[object]) -> Sequence[Row]:
        return await self._call(lambda conn: conn.execute(sql, params).fetchall())

    async def _ensure_archive(self) -> None:
        if not self._archive_ready:
            await self._call(lambda conn: _sqlite_migrate(conn, _ARCHIVE_TRACK))
            self._archive_ready = True

    async def _call(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        return await asyncio.to_thread(self._run, work)

    def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._lock:
            return self._guarded(work)

    def _guarded(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """``work`` on the connection, its errors translated (the caller holds the lock)."""
        with storage_errors():
            try:
                return self._attempt(work)
            except sqlite3.OperationalError as exc:
                # A connection opened while the file was read-only stays read-only
                # after the file is fixed (or moved): one more try on a fresh one.
                # Nothing was written, so retrying cannot duplicate a record.
                if not getattr(exc, "sqlite_errorname", "").startswith("SQLITE_READONLY"):
                    raise
                return self._attempt(work)

    def _attempt(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        conn = self._connection()
        try:
            return work(conn)
        except sqlite3.OperationalError:
            self._discard()  # reconnect next time rather than reuse a failed connection
            raise

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise AuditUnavailable("audit store is closed")
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                return self._open_once()
            except sqlite3.OperationalError as exc:
                # Connections racing to create the file (switching it to WAL) can get
                # SQLITE_BUSY at once: SQLite skips the busy handler where waiting
                # could deadlock. The loser retries until the busy timeout.
                busy = getattr(exc, "sqlite_errorname", "").startswith("SQLITE_BUSY")
                if not busy or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _open_once(self) -> sqlite3.Connection:
        conn = self._connect()
        try:
            _sqlite_configure(conn, self._max_pages)
            _sqlite_migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(
            self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
        )

    def _verify_snapshot(self) -> VerifyResult:
        with storage_errors(), contextlib.closing(self._connect()) as conn:
            return _sqlite_verify(conn)

    def _verify_archives_snapshot(
        self, only: str | None, anchors: Anchors
    ) -> dict[str, VerifyResult]:
        with storage_errors(), contextlib.closing(self._connect()) as conn:
            return _sqlite_verify_archives(conn, only, anchors)

    def _discard(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            self._discard()


@contextlib.contextmanager
def _sqlite_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``: take the database's write lock up front."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may already have rolled back (e.g. SQLITE_FULL)
            conn.rollback()
        raise


def _sqlite_one(conn: sqlite3.Connection, sql: str, params: Sequence[object] = ()) -> Row:
    row = conn.execute(sql, params).fetchone()
    if row is None:
        raise AuditUnavailable("the audit chain row is missing")
    return tuple(row)


def _sqlite_configure(conn: sqlite3.Connection, max_pages: int | None) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    if max_pages is not None:
        conn.execute(f"PRAGMA max_page_count={int(max_pages)}")


def _sqlite_migrate(conn: sqlite3.Connection, track: _Track = _LOG_TRACK) -> None:
    with _sqlite_transaction(conn):
        conn.execute(track.create)
        (current,) = _sqlite_one(conn, track.select)
        for version, statements in track.pending(current):
            for sql, params in statements:
                conn.execute(sql, params)
            conn.execute(track.insert, (version,))


def _sqlite_noop(conn: sqlite3.Connection) -> None:
    """Opening the store (file, pragmas, migrations) is the work."""


@dataclass(slots=True)
class _Pending:
    """One append waiting for its group's transaction (set by whichever thread writes it)."""

    record: AuditRecord
    text: str
    entry: AuditEntry | None = None
    error: BaseException | None = None
    done: bool = False

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self.error, self.done = exc, True

    def result(self) -> AuditEntry:
        if self.error is not None:
            raise self.error
        if self.entry is None:  # never: the group's writer sets one or the other
            raise AuditUnavailable("audit record not written")
        return self.entry


def _sqlite_append_group(conn: sqlite3.Connection, group: Sequence[_Pending]) -> None:
    """Chain every record of ``group`` in order, in one transaction (one fsync).

    A record the database refuses (a constraint: its request id is recorded already)
    is rolled back to its savepoint and fails alone; the chain goes on from the record
    before it. Any other error fails the whole group, none of it written. Entries are
    handed out only after the commit."""
    written: list[tuple[_Pending, AuditEntry]] = []
    with _sqlite_transaction(conn):
        _, _, head_seq, head_hash = _sqlite_one(conn, _SELECT_CHAIN)
        for pending in group:
            entry = _link(head_seq, head_hash, pending.record, pending.text)
            conn.execute("SAVEPOINT record")
            try:
                conn.execute(_INSERT_ENTRY, _insert_params(entry, pending.text))
            except sqlite3.IntegrityError as exc:
                conn.execute("ROLLBACK TO record")
                conn.execute("RELEASE record")
                pending.fail(_unavailable(exc))
                continue
            conn.execute("RELEASE record")
            written.append((pending, entry))
            head_seq, head_hash = entry.seq, entry.hash
        if written:
            conn.execute(_UPDATE_HEAD, (head_seq, head_hash))
    for pending, entry in written:
        pending.entry, pending.done = entry, True


def _sqlite_verify(conn: sqlite3.Connection) -> VerifyResult:
    conn.execute("BEGIN")  # one read snapshot for the chain row and every entry
    try:
        base_seq, base_hash, head_seq, head_hash = _sqlite_one(conn, _SELECT_CHAIN)
        walk = _ChainWalk(base_seq, base_hash)
        broken = walk.run(conn.execute(_SELECT_ALL))
        return broken or walk.finish(head_seq, head_hash)
    finally:
        conn.rollback()


def _archived_stores(only: str | None, found: Iterable[str], anchors: Anchors) -> list[str]:
    return [only] if only is not None else sorted({*found, *anchors})


def _sqlite_verify_archives(
    conn: sqlite3.Connection, only: str | None, anchors: Anchors
) -> dict[str, VerifyResult]:
    conn.execute("BEGIN")  # one read snapshot: what an archiver appends meanwhile is not seen
    try:
        if conn.execute(_SQLITE_HAS_ARCHIVE).fetchone() is None:
            stores = _archived_stores(only, (), anchors)
            return {s: _ArchiveWalk(s, anchors.get(s)).finish(None) for s in stores}
        found = [str(r[0]) for r in conn.execute(_ARCHIVED_STORES)] if only is None else []
        stores = _archived_stores(only, found, anchors)
        return {s: _sqlite_walk_archive(conn, s, anchors.get(s)) for s in stores}
    finally:
        conn.rollback()


def _sqlite_walk_archive(
    conn: sqlite3.Connection, store_id: str, anchors: Mapping[int, Mapping[str, int]] | None
) -> VerifyResult:
    row = conn.execute(_SELECT_CURSOR, (store_id,)).fetchone()
    walk = _ArchiveWalk(store_id, anchors)
    broken = walk.run(conn.execute(_SELECT_ARCHIVE_CHAIN, (store_id,)))
    return broken or walk.finish(None if row is None else _head_from_row(tuple(row)))


def _sqlite_purge(conn: sqlite3.Connection, cutoff_us: int) -> int:
    with _sqlite_transaction(conn):
        base_seq, base_hash, head_seq, _ = _sqlite_one(conn, _SELECT_CHAIN)
        (first_recent,) = _sqlite_one(conn, _FIRST_RECENT, (cutoff_us,))
        last = _purge_end(first_recent, base_seq, head_seq)
        if last is None:
            return 0
        walk = _ChainWalk(base_seq, base_hash)
        _check_purge_range(walk, walk.run(conn.execute(_SELECT_RANGE, (base_seq, last))), last)
        deleted = conn.execute(_DELETE_UPTO, (last,)).rowcount
        conn.execute(_UPDATE_BASE, (last, walk.hash))
    return deleted


def _sqlite_archive(
    conn: sqlite3.Connection,
    store_id: str,
    changes: Sequence[ArchivedChange],
    overlap_us: int,
    now_us: int,
) -> ArchiveHead:
    if not changes:
        row = conn.execute(_SELECT_CURSOR, (store_id,)).fetchone()
        if row is not None:
            return _head_from_row(tuple(row))
    with _sqlite_transaction(conn):
        conn.execute(_ENSURE_CURSOR, (store_id, GENESIS_HASH, now_us, now_us))
        head = _head_from_row(_sqlite_one(conn, _SELECT_CURSOR, (store_id,)))
        if not changes:
            return head
        low = min(c.time_us for c in changes)
        fresh = _fresh_changes(changes, conn.execute(_ARCHIVED_SINCE, (store_id, low)))
        rows, hash_ = _append_changes(head, fresh, now_us)
        conn.executemany(_INSERT_CHANGE, rows)
        update = _advanced(head, changes, len(fresh), hash_, overlap_us, now_us)
        conn.execute(_UPDATE_CURSOR, update)
    return _head_from_row((store_id, *update[:4], head.began_us, update[4]))


def _sqlite_probe(conn: sqlite3.Connection) -> None:
    """Write (and roll back) the chain row: fails on a read-only file or a lost disk."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("UPDATE audit_chain SET head_seq = head_seq WHERE id = 1")
    finally:
        if conn.in_transaction:
            conn.rollback()


# -- PostgreSQL ----------------------------------------------------------------------------

PgConnection = psycopg.AsyncConnection[TupleRow]
_PG_MIGRATION_LOCK = 0x5C09E_A0D17  # advisory lock id: replicas migrate one at a time


def _pg(sql: str) -> str:
    """Our shared SQL uses ``?``; psycopg wants ``%s`` (no literal ``%`` occurs)."""
    return sql.replace("?", "%s")


async def _pg_one(conn: PgConnection, sql: str, params: Sequence[object] = ()) -> Row:
    row = await (await conn.execute(_pg(sql), params)).fetchone()
    if row is None:
        raise AuditUnavailable("the audit chain row is missing")
    return row


async def _pg_walk(
    conn: PgConnection, walk: _ChainWalk | _ArchiveWalk, sql: str, params: Sequence[object]
) -> VerifyResult | None:
    """Stream rows through ``walk`` with a server-side cursor (inside a transaction)."""
    async with conn.cursor(name="scopegate_audit_walk") as cur:
        await cur.execute(_pg(sql), params)
        async for row in cur:
            broken = walk.step(row)
            if broken is not None:
                return broken
    return None


async def _pg_migrate(conn: PgConnection, track: _Track = _LOG_TRACK) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_MIGRATION_LOCK,))
        await conn.execute(track.create)
        (current,) = await _pg_one(conn, track.select)
        for version, statements in track.pending(current):
            for sql, params in statements:
                await conn.execute(_pg(sql), params)
            await conn.execute(_pg(track.insert), (version,))


class _PgPool:
    """A few autocommit connections, replaced when they break (no psycopg_pool needed)."""

    def __init__(self, dsn: str, size: int, connect_timeout_s: int) -> None:
        self._dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        self._slots = asyncio.Semaphore(size)
        self._idle: list[PgConnection] = []
        self._migrated = False
        self._closed = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[PgConnection]:
        """A connection for one unit of work, kept afterwards only if it is clean."""
        async with self._slots:
            conn = await self._take()
            try:
                yield conn
            finally:
                await self._give_back(conn)

    async def close(self) -> None:
        """Close idle connections now and busy ones when they come back."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    async def _take(self) -> PgConnection:
        if self._closed:
            raise AuditUnavailable("audit store is closed")
        if self._idle:
            return self._idle.pop()
        conn = await PgConnection.connect(
            self._dsn, autocommit=True, connect_timeout=self._connect_timeout_s
        )
        try:
            if not self._migrated:
                await _pg_migrate(conn)
                self._migrated = True
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _give_back(self, conn: PgConnection) -> None:
        clean = not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE
        if clean and not self._closed:
            self._idle.append(conn)
        else:
            await conn.close()


class PostgresAuditStore(_SqlAuditStore):
    """The audit store of scaled-out deployments: one database shared by all replicas.

    An append locks the chain row (``SELECT ... FOR UPDATE``) before reading the head,
    so appends from any number of tasks, connections and replicas take turns on one
    linear chain, and a failed append rolls back without leaving a gap. Schema
    migrations run under an advisory lock so replicas may start together.
    """

    def __init__(self, dsn: str, *, pool_size: int = 4, connect_timeout_s: int = 5) -> None:
        self._pool = _PgPool(dsn, pool_size, connect_timeout_s)
        self._archive_ready = False

    async def append(self, record: AuditRecord) -> AuditEntry:
        """Chain ``record`` after the current head; return once committed."""
        text = canonical_json(record.to_dict())
        with storage_errors():
            async with self._pool.connection() as conn, conn.transaction():
                _, _, head_seq, head_hash = await _pg_one(conn, _SELECT_CHAIN + " FOR UPDATE")
                entry = _link(head_seq, head_hash, record, text)
                await conn.execute(_pg(_INSERT_ENTRY), _insert_params(entry, text))
                await conn.execute(_pg(_UPDATE_HEAD), (entry.seq, entry.hash))
        return entry

    async def verify(self) -> VerifyResult:
        """Recompute the chain inside one repeatable-read snapshot."""
        with storage_errors():
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                base_seq, base_hash, head_seq, head_hash = await _pg_one(conn, _SELECT_CHAIN)
                walk = _ChainWalk(base_seq, base_hash)
                broken = await _pg_walk(conn, walk, _SELECT_ALL, ())
                return broken or walk.finish(head_seq, head_hash)

    async def _verify_archives(self, only: str | None, anchors: Anchors) -> dict[str, VerifyResult]:
        results: dict[str, VerifyResult] = {}
        with storage_errors():
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                (exists,) = await _pg_one(conn, _PG_HAS_ARCHIVE)
                if not exists:
                    stores = _archived_stores(only, (), anchors)
                    return {s: _ArchiveWalk(s, anchors.get(s)).finish(None) for s in stores}
                found: list[str] = []
                if only is None:
                    rows = await (await conn.execute(_pg(_ARCHIVED_STORES))).fetchall()
                    found = [str(r[0]) for r in rows]
                for store_id in _archived_stores(only, found, anchors):
                    cur = await conn.execute(_pg(_SELECT_CURSOR), (store_id,))
                    row = await cur.fetchone()
                    head = None if row is None else _head_from_row(tuple(row))
                    walk = _ArchiveWalk(store_id, anchors.get(store_id))
                    broken = await _pg_walk(conn, walk, _SELECT_ARCHIVE_CHAIN, (store_id,))
                    results[store_id] = broken or walk.finish(head)
        return results

    async def purge_older_than(self, days: float, *, now: datetime | None = None) -> int:
        """Delete the oldest entries older than ``days``; return how many."""
        cutoff = _cutoff_micros(days, now)
        with storage_errors():
            async with self._pool.connection() as conn, conn.transaction():
                chain = await _pg_one(conn, _SELECT_CHAIN + " FOR UPDATE")
                (first_recent,) = await _pg_one(conn, _FIRST_RECENT, (cutoff,))
                last = _purge_end(first_recent, chain[0], chain[2])
                if last is None:
                    return 0
                walk = _ChainWalk(chain[0], chain[1])
                broken = await _pg_walk(conn, walk, _SELECT_RANGE, (chain[0], last))
                _check_purge_range(walk, broken, last)
                deleted = await conn.execute(_pg(_DELETE_UPTO), (last,))
                await conn.execute(_pg(_UPDATE_BASE), (last, walk.hash))
                return deleted.rowcount

    async def archive_changes(
        self, store_id: str, changes: Sequence[ArchivedChange], *, overlap_us: int
    ) -> ArchiveHead:
        """Add the changes not archived yet, under the store's cursor row lock."""
        await self._ensure_archive()
        now_us = _micros(datetime.now(UTC))
        with storage_errors():
            if not changes:
                found = await self.archive_head(store_id)
                if found is not None:
                    return found
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(_pg(_ENSURE_CURSOR), (store_id, GENESIS_HASH, now_us, now_us))
                head = _head_from_row(
                    await _pg_one(conn, _SELECT_CURSOR + " FOR UPDATE", (store_id,))
                )
                if not changes:
                    return head
                low = min(c.time_us for c in changes)
                cur = await conn.execute(_pg(_ARCHIVED_SINCE), (store_id, low))
                fresh = _fresh_changes(changes, await cur.fetchall())
                rows, hash_ = _append_changes(head, fresh, now_us)
                if rows:
                    async with conn.cursor() as many:
                        await many.executemany(_pg(_INSERT_CHANGE), rows)
                update = _advanced(head, changes, len(fresh), hash_, overlap_us, now_us)
                await conn.execute(_pg(_UPDATE_CURSOR), update)
        return _head_from_row((store_id, *update[:4], head.began_us, update[4]))

    async def healthy(self) -> bool:
        """Whether the database answers and accepts writes (not a read-only standby)."""
        try:
            with storage_errors():
                async with self._pool.connection() as conn:
                    (read_only,) = await _pg_one(
                        conn, "SELECT current_setting('transaction_read_only')"
                    )
        except AuditUnavailable:
            return False
        return bool(read_only == "off")

    async def close(self) -> None:
        """Close the connections; later calls raise ``AuditUnavailable``."""
        with storage_errors():
            await self._pool.close()

    async def _fetch(self, sql: str, params: Sequence[object]) -> Sequence[Row]:
        with storage_errors():
            async with self._pool.connection() as conn:
                return await (await conn.execute(_pg(sql), params)).fetchall()

    async def _ensure_archive(self) -> None:
        if not self._archive_ready:
            with storage_errors():
                async with self._pool.connection() as conn:
                    await _pg_migrate(conn, _ARCHIVE_TRACK)
            self._archive_ready = True


# -- choosing a store ----------------------------------------------------------------------


def open_audit_store(dsn: str | None, data_dir: Path) -> AuditStore:
    """The store a DSN names; connects lazily, on first use.

    None or empty: SQLite at ``data_dir/audit.db``. ``postgresql://...`` (or
    ``postgres://``): PostgreSQL. ``sqlite:///relative.db`` or ``sqlite:////abs.db``
    (SQLAlchemy's convention): SQLite at that path.
    """
    if not dsn:
        return SqliteAuditStore(Path(data_dir) / "audit.db")
    if dsn.startswith(("postgresql://", "postgres://")):
        return PostgresAuditStore(dsn)
    if dsn.startswith("sqlite:///") and len(dsn) > len("sqlite:///"):
        return SqliteAuditStore(Path(dsn.removeprefix("sqlite:///")))
    raise ValueError("unsupported audit DSN: use postgresql://... or sqlite:///path")

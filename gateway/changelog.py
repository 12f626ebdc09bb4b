"""OpenFGA's change log, archived into the audit database, and what it says about a moment.

The archive
    :class:`ChangeArchiver` is a background task that keeps reading OpenFGA's change
    log (ReadChanges, all object types) and appends every change to the audit database
    (:meth:`~gateway.audit.AuditStore.archive_changes`, SQLite or PostgreSQL), so the
    history outlives whatever an operator prunes from OpenFGA. It never runs on the
    retrieval path: a retrieval only reads the archiver's in-memory position.

    OpenFGA orders its log by the ULID it stamps when a write *starts*, and a write
    can commit after a later-stamped one has been read: following continuation tokens
    alone would skip it. So besides following the token, the archiver sweeps the log
    every few seconds from ``overlap_s`` before the newest change it archived (the
    sweep's ``start_time``), and the store skips what it already holds. A change is
    missed only if its write took longer than ``overlap_s`` to commit.

The position of a decision
    :meth:`ChangeArchiver.position_at` answers, for a moment of the gateway's monotonic
    clock, the archive's last change that had been read from OpenFGA by then (its
    ``seq`` and chain ``hash``). Read at the start of a request, every change up to it
    was committed before any check of the request ran. The record also keeps the
    decision time (after the last check answered): as of the decision means every
    change up to the position, plus every later-archived change OpenFGA stamped at or
    before the decision time. See :func:`as_of` and docs/audit.md.

What a moment looked like
    :class:`ModelGraph` reads the authorization model's rewrites; :func:`walk` follows
    them from a check (object, relation) over a set of tuples and says which
    (object, relation) pairs the check can read and which objects it still needs;
    :func:`load_history` fetches archived changes object by object until the walk of
    every check is closed, at every moment asked for; :func:`fold` turns a history into
    the tuples that stood at a moment. All of this is pure except ``load_history``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.audit import (
    ArchivedChange,
    ArchiveHead,
    AuditStore,
    format_time,
    open_audit_store,
)
from gateway.fga import CHANGE_LOG_PAGE_SIZE, FgaClient, LoggedChange, LoggedTuple

log = logging.getLogger("scopegate.changelog")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: ObjRel: a relation on an object, as a check reads it: ``("document:acme/d1", "viewer")``.
ObjRel = tuple[str, str]


def micros(moment: datetime) -> int:
    """Microseconds since the epoch (the archive's time unit)."""
    return (moment.astimezone(UTC) - _EPOCH) // timedelta(microseconds=1)


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


# -- the position a record keeps --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Position:
    """The archive's last change read from OpenFGA at some moment (0: none yet)."""

    seq: int
    hash: str


@dataclass(frozen=True, slots=True)
class DecisionPoint:
    """What a retrieval record keeps (``extra.changelog``) to be replayed as of itself.

    ``position`` is the archive's position when the request started (None when the
    archiver had not read the log yet); ``started_at`` and ``decided_at`` are the
    gateway's clock when the request started and once its last check had answered.
    """

    store_id: str
    position: Position | None
    started_at: datetime
    decided_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "store_id": self.store_id,
            "archive_seq": None if self.position is None else self.position.seq,
            "archive_hash": None if self.position is None else self.position.hash,
            "started_at": format_time(self.started_at),
            "decided_at": format_time(self.decided_at),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecisionPoint:
        seq = data.get("archive_seq")
        position = None if seq is None else Position(int(seq), str(data["archive_hash"]))
        return cls(
            store_id=str(data["store_id"]),
            position=position,
            started_at=_parse(data["started_at"]),
            decided_at=_parse(data["decided_at"]),
        )

    def includes(self, change: ArchivedChange) -> bool:
        """Whether ``change`` had happened as of the decision.

        Changes archived up to the position had committed before the request started;
        any other change counts when OpenFGA stamped it at or before the decision
        time: a write that landed after the position was read but before the checks
        has a timestamp before the checks answered, so that time bounds it.
        """
        if self.position is not None and change.seq <= self.position.seq:
            return True
        return change.time_us <= micros(self.decided_at)

    def during(self, change: ArchivedChange) -> bool:
        """Whether ``change`` landed while the request was being decided."""
        if self.position is not None and change.seq <= self.position.seq:
            return False
        return micros(self.started_at) <= change.time_us <= micros(self.decided_at)


def _parse(text: str) -> datetime:
    moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# -- the archiver -----------------------------------------------------------------------


class ChangeLogReader(Protocol):
    """What the archiver needs from OpenFGA (:class:`gateway.fga.FgaClient`)."""

    async def read_change_log(
        self, start_time: datetime | None, continuation_token: str | None, page_size: int
    ) -> tuple[list[LoggedChange], str | None]: ...

    async def remove_stale_scratch_stores(self) -> int: ...


@dataclass(slots=True)
class ArchiverStats:
    polls: int = 0
    failures: int = 0
    changes_archived: int = 0
    last_poll_s: float = 0.0
    max_poll_s: float = 0.0
    last_error: str | None = None


@dataclass(slots=True)
class _Seen:
    at: float  # monotonic clock once the position was known
    position: Position


@dataclass(eq=False)
class ChangeArchiver:
    """Copies one store's change log into the audit database, continuously.

    Each poll reads from its continuation token, or, every ``sweep_every_s`` (and on
    the first poll), sweeps from ``overlap_s`` before the newest archived change (the
    whole log on a store never archived). A poll reads at most ``max_pages`` pages and
    goes on from there next time. The lag (:meth:`lag_s`) is how long ago the last
    poll that reached the end of the log started: everything OpenFGA had committed
    before then is archived.
    """

    feed: ChangeLogReader
    archive: AuditStore
    store_id: str
    interval_s: float = 0.5
    overlap_s: float = 10.0
    sweep_every_s: float = 4.0
    lag_bound_s: float = 30.0
    page_size: int = CHANGE_LOG_PAGE_SIZE
    max_pages: int = 200
    keep_positions_s: float = 900.0
    clock: Callable[[], float] = time.monotonic
    stats: ArchiverStats = field(default_factory=ArchiverStats)
    _token: str | None = None
    _last_sweep: float | None = None
    _sweep_started: float | None = None
    # The same two moments on the wall clock (OpenFGA stamps changes with one).
    _last_sweep_wall: datetime | None = None
    _sweep_started_wall: datetime | None = None
    _caught_up: float | None = None
    _head: ArchiveHead | None = None
    _seen: deque[_Seen] = field(default_factory=deque)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _task: asyncio.Task[None] | None = None
    _stopping: bool = False
    # What close() releases: the archiver's own OpenFGA client and audit store.
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    # -- polling ---------------------------------------------------------------------

    async def poll_once(self, *, sweep: bool = False) -> int:
        """Read what is new (or sweep), archive it; how many changes were added."""
        async with self._lock:
            return await self._poll(sweep)

    async def sync(
        self, settled: datetime | None = None, max_polls: int = 1000
    ) -> ArchiveHead | None:
        """Read to the end of the log: everything committed before this call is archived.

        A write that commits late is found by a sweep, so this sweeps too, unless a
        sweep that started more than ``overlap_s`` after ``settled`` has completed
        already: then every change OpenFGA stamped before ``settled`` is archived (the
        question an as-of replay of an older decision asks). Raises TimeoutError when
        the log grows faster than ``max_polls`` polls read it.
        """
        async with self._lock:
            began = self.clock()
            margin = timedelta(seconds=self.overlap_s)
            swept = (
                settled is not None
                and self._last_sweep_wall is not None
                and self._last_sweep_wall >= settled + margin
            )
            await self._poll(not swept)
            for _ in range(max_polls):
                caught_up = self._caught_up is not None and self._caught_up >= began
                sweep_done = self._last_sweep is not None and self._last_sweep >= began
                if caught_up and (swept or sweep_done):
                    return self._head
                await self._poll(False)
            raise TimeoutError("the change log grew faster than the archiver could read it")

    async def _poll(self, sweep: bool) -> int:
        started = self.clock()
        if sweep or self._token is None or (self._sweep_started is None and self._due(started)):
            self._sweep_started = started
            self._sweep_started_wall = datetime.now(UTC)
            sweep = True
        try:
            added, complete = await self._read_and_archive(sweep)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.stats.failures += 1
            self.stats.last_error = f"{type(exc).__name__}: {exc}"[:300]
            raise
        elapsed = self.clock() - started
        self.stats.polls += 1
        self.stats.changes_archived += added
        self.stats.last_poll_s = elapsed
        self.stats.max_poll_s = max(self.stats.max_poll_s, elapsed)
        self.stats.last_error = None
        if complete:
            self._caught_up = started
            if self._sweep_started is not None:
                # A sweep cut short by max_pages went on from its token: it ends here.
                self._last_sweep, self._sweep_started = self._sweep_started, None
                self._last_sweep_wall = self._sweep_started_wall
        return added

    def _due(self, now: float) -> bool:
        return self._last_sweep is None or now - self._last_sweep >= self.sweep_every_s

    async def _read_and_archive(self, sweep: bool) -> tuple[int, bool]:
        start_time, token = None, self._token
        if sweep:
            head = await self.archive.archive_head(self.store_id)
            resume = head.resume_from_us if head is not None else None
            # OpenFGA refuses a start time that is not in its past: never later than
            # the overlap before now (more than that much clock difference between the
            # gateway and OpenFGA is a misconfiguration the failures counter shows).
            overlap_us = int(self.overlap_s * 1_000_000)
            latest = micros(datetime.now(UTC)) - overlap_us
            if resume is not None and self._last_sweep_wall is not None:
                # The last complete sweep read every change that had committed when it
                # began; one stamped more than the overlap before that had. Start there,
                # not before the newest change: a quiet store is not read again and
                # again. (Twice the overlap: a clock difference up to it is covered.)
                swept = micros(self._last_sweep_wall) - 2 * overlap_us
                resume = max(resume, swept)
            start_time = None if resume is None else from_micros(min(resume, latest))
            token = None
        read: list[LoggedChange] = []
        complete = False
        for _ in range(self.max_pages):
            page, next_token = await self.feed.read_change_log(start_time, token, self.page_size)
            read += page
            token = next_token or token
            if len(page) < self.page_size or not next_token:
                complete = True
                break
        before = self._head.seq if self._head is not None else 0
        head = await self.archive.archive_changes(
            self.store_id,
            [_archived(c) for c in read],
            overlap_us=int(self.overlap_s * 1_000_000),
        )
        self._token = token
        self._remember(head)
        return max(0, head.seq - before), complete

    def _remember(self, head: ArchiveHead) -> None:
        self._head = head
        position = Position(head.seq, head.hash)
        now = self.clock()
        if not self._seen or self._seen[-1].position != position:
            self._seen.append(_Seen(now, position))
        # Keep what a request still running could ask for, and the entry before it.
        while len(self._seen) > 1 and self._seen[1].at < now - self.keep_positions_s:
            self._seen.popleft()

    # -- what requests and operators read ----------------------------------------------

    def position_at(self, moment: float) -> Position | None:
        """The archive's last change read from OpenFGA at ``moment`` (monotonic).

        None when nothing was known then (the archiver had not read the log yet, or
        ``moment`` is older than the positions kept).
        """
        # From the newest: a request asks about its own start, a moment ago.
        for seen in reversed(self._seen):
            if seen.at <= moment:
                return seen.position
        return None

    def lag_s(self) -> float | None:
        """Seconds since the last poll that reached the end of the log started."""
        return None if self._caught_up is None else max(0.0, self.clock() - self._caught_up)

    def status(self) -> dict[str, Any]:
        """For ``/readyz`` details and metrics: never part of readiness itself."""
        lag = self.lag_s()
        return {
            "running": self._task is not None and not self._task.done(),
            "archived_seq": self._head.seq if self._head is not None else 0,
            "lag_s": None if lag is None else round(lag, 3),
            "lag_bound_s": self.lag_bound_s,
            "within_bound": lag is not None and lag <= self.lag_bound_s,
            "polls": self.stats.polls,
            "failures": self.stats.failures,
            "last_error": self.stats.last_error,
        }

    # -- the background task -------------------------------------------------------------

    async def run(self) -> None:
        await self._tidy()
        # The flag as well as the cancellation: on Python 3.11 asyncio.wait_for (used
        # around every OpenFGA call) can swallow a cancellation that arrives just as
        # the call completes, and a loop relying on the cancellation alone never ends.
        while not self._stopping:
            started = self.clock()
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # logged, retried: archiving never stops the gateway
                log.warning("change-log archive: poll failed: %s", exc)
            if self._stopping:
                return
            # A long poll (a backlog) is followed by a pause as long as itself, so the
            # archiver never takes more than half of OpenFGA's attention it asks for.
            await asyncio.sleep(max(self.interval_s, self.clock() - started))

    async def _tidy(self) -> None:
        """Once, at start: scratch stores an interrupted as-of replay left behind."""
        try:
            removed = await self.feed.remove_stale_scratch_stores()
        except Exception as exc:  # hygiene only: logged, never fatal
            log.warning("change-log archive: stale scratch stores not removed: %s", exc)
            return
        if removed:
            log.info("change-log archive: removed %d stale scratch stores", removed)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._stopping = True
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self) -> None:
        """Stop polling and release the connections the archiver owns."""
        await self.stop()
        for close in self.closers:
            with contextlib.suppress(Exception):
                await close()


async def open_archiver(
    fga: FgaClient, audit_dsn: str | None, data_dir: Path, *, first_poll_s: float = 2.0
) -> ChangeArchiver:
    """A started archiver of ``fga``'s store with connections of its own.

    Its own OpenFGA client and audit store (same database) keep it off the retrieval
    path's connection pools and locks. One poll is given up to ``first_poll_s`` before
    the gateway serves, so that even its first requests record a position (a longer
    backlog goes on in the background).
    """
    feed = fga.detached()
    store = open_audit_store(audit_dsn, data_dir)
    archiver = ChangeArchiver(feed, store, fga.store_id, closers=[feed.close, store.close])
    try:
        await asyncio.wait_for(archiver.poll_once(sweep=True), first_poll_s)
    except Exception as exc:  # the background task retries; never a reason not to start
        log.warning("change-log archive: first poll did not finish: %s", exc or "timed out")
    archiver.start()
    return archiver


def decision_point(
    archiver: ChangeArchiver | None,
    store_id: str,
    started: float,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> DecisionPoint:
    """The position and times a retrieval record keeps; ``started`` is the monotonic
    clock when the request started (before any check), read now that the last check
    has answered."""
    elapsed = max(0.0, clock() - started)
    decided = datetime.now(UTC)
    position = archiver.position_at(started) if archiver is not None else None
    return DecisionPoint(store_id, position, decided - timedelta(seconds=elapsed), decided)


def _archived(change: LoggedChange) -> ArchivedChange:
    t = change.tuple
    return ArchivedChange(
        0, micros(change.timestamp), change.operation, t.user, t.relation, t.object, t.condition
    )


class ArchiveCollector(Collector):
    """Prometheus gauges of the archiver of the gateway ``gateway()`` returns."""

    def __init__(self, archiver: Callable[[], ChangeArchiver | None]) -> None:
        self._archiver = archiver

    def collect(self) -> Iterator[GaugeMetricFamily]:
        archiver = self._archiver()
        if archiver is None:
            return
        status = archiver.status()
        lag = GaugeMetricFamily(
            "scopegate_changelog_lag_seconds",
            "Seconds since the change-log archiver last reached the end of OpenFGA's log",
        )
        lag.add_metric([], float("inf") if status["lag_s"] is None else status["lag_s"])
        yield lag
        yield GaugeMetricFamily(
            "scopegate_changelog_archived_changes",
            "Changes of OpenFGA's log held in the audit database",
            value=status["archived_seq"],
        )
        yield GaugeMetricFamily(
            "scopegate_changelog_poll_failures",
            "Change-log polls that failed since the gateway started",
            value=status["failures"],
        )


# -- the authorization model, walked ------------------------------------------------------


class ModelGraph:
    """The rewrites of an authorization model (its JSON form), by (type, relation)."""

    def __init__(self, model: Mapping[str, Any]) -> None:
        self.rewrites: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.tuplesets: dict[str, frozenset[str]] = {}
        for definition in model.get("type_definitions") or []:
            kind = str(definition["type"])
            found: set[str] = set()
            for relation, rewrite in (definition.get("relations") or {}).items():
                self.rewrites[(kind, relation)] = rewrite
                found |= set(_tupleset_relations(rewrite))
            self.tuplesets[kind] = frozenset(found)

    @property
    def through(self) -> frozenset[str]:
        """Every relation some type follows to other objects (``parent``, ``tenant``)."""
        return frozenset().union(*self.tuplesets.values()) if self.tuplesets else frozenset()

    def leads_on(self, t: LoggedTuple | ArchivedChange) -> bool:
        """Whether a tuple can lead a check to another object (userset or tupleset)."""
        if "#" in t.user or t.user.endswith(":*"):
            return True
        return t.relation in self.tuplesets.get(type_of(t.object), frozenset())


def _tupleset_relations(rewrite: Mapping[str, Any]) -> Iterator[str]:
    if "tupleToUserset" in rewrite:
        yield str(rewrite["tupleToUserset"]["tupleset"]["relation"])
    for child in _children(rewrite):
        yield from _tupleset_relations(child)


def _children(rewrite: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    for combinator in ("union", "intersection"):
        if combinator in rewrite:
            return list(rewrite[combinator].get("child") or [])
    if "difference" in rewrite:
        return [rewrite["difference"]["base"], rewrite["difference"]["subtract"]]
    return []


def type_of(ref: str) -> str:
    return ref.partition(":")[0]


TupleIndex = Mapping[str, Mapping[str, Sequence[LoggedTuple]]]  # object -> relation -> tuples


@dataclass(frozen=True, slots=True)
class Walk:
    """What one walk found: the (object, relation) pairs the checks can read, and the
    objects it reached whose tuples it did not have."""

    touched: frozenset[ObjRel]
    missing: frozenset[str]


def walk(graph: ModelGraph, tuples: TupleIndex, roots: Iterable[ObjRel]) -> Walk:
    """Follow the model's rewrites from ``roots`` over ``tuples`` (an object absent from
    ``tuples`` is not known yet: it is reported missing and not followed)."""
    touched: set[ObjRel] = set()
    missing: set[str] = set()
    stack = list(roots)
    while stack:
        obj, relation = stack.pop()
        if (obj, relation) in touched:
            continue
        touched.add((obj, relation))
        by_relation = tuples.get(obj)
        if by_relation is None:
            missing.add(obj)
            continue
        rewrite = graph.rewrites.get((type_of(obj), relation))
        if rewrite is not None:
            stack.extend(_expand(rewrite, obj, relation, by_relation))
    return Walk(frozenset(touched), frozenset(missing))


def _expand(
    rewrite: Mapping[str, Any],
    obj: str,
    relation: str,
    tuples: Mapping[str, Sequence[LoggedTuple]],
) -> Iterator[ObjRel]:
    if "this" in rewrite:
        for t in tuples.get(relation, ()):
            if "#" in t.user:
                target, _, via = t.user.partition("#")
                yield (target, via)
    if "computedUserset" in rewrite:
        yield (obj, str(rewrite["computedUserset"]["relation"]))
    if "tupleToUserset" in rewrite:
        spec = rewrite["tupleToUserset"]
        tupleset = str(spec["tupleset"]["relation"])
        yield (obj, tupleset)
        for t in tuples.get(tupleset, ()):
            if "#" not in t.user:
                yield (t.user, str(spec["computedUserset"]["relation"]))
    for child in _children(rewrite):
        yield from _expand(child, obj, relation, tuples)


# -- histories and moments ----------------------------------------------------------------


Moment = Callable[[ArchivedChange], bool]


def fold(
    changes: Iterable[ArchivedChange], moment: Moment
) -> dict[tuple[str, str, str], LoggedTuple]:
    """The tuples standing once the changes ``moment`` includes had happened.

    For each tuple the latest included change wins (by OpenFGA's timestamp, then by
    archive order): a write leaves it standing, a delete removes it.
    """
    last: dict[tuple[str, str, str], ArchivedChange] = {}
    for change in sorted(changes, key=lambda c: (c.time_us, c.seq)):
        if moment(change):
            last[change.key] = change
    return {
        key: LoggedTuple(c.user, c.relation, c.object, c.condition)
        for key, c in last.items()
        if c.operation == "write"
    }


def index(objects: Iterable[str], standing: Iterable[LoggedTuple]) -> TupleIndex:
    """Tuples by object and relation; every object in ``objects`` is present (maybe empty)."""
    found: dict[str, dict[str, list[LoggedTuple]]] = {obj: {} for obj in objects}
    for t in standing:
        found.setdefault(t.object, {}).setdefault(t.relation, []).append(t)
    return found


@dataclass(frozen=True, slots=True)
class History:
    """The archived changes of every object the walks reached, relevant ones only."""

    objects: frozenset[str]
    changes: tuple[ArchivedChange, ...]

    def at(self, moment: Moment) -> TupleIndex:
        """The tuples standing at ``moment``."""
        return index(self.objects, fold(self.changes, moment).values())

    def ever(self) -> TupleIndex:
        """Every tuple that was ever written, deleted since or not."""
        written = {
            c.key: LoggedTuple(c.user, c.relation, c.object, c.condition)
            for c in self.changes
            if c.operation == "write"
        }
        return index(self.objects, written.values())


async def load_history(
    archive: AuditStore,
    store_id: str,
    graph: ModelGraph,
    roots: Sequence[ObjRel],
    subjects: Iterable[str] | None,
    moments: Sequence[Moment],
    *,
    ever: bool = False,
) -> History:
    """Fetch archived changes object by object until, at every moment (and over every
    tuple that ever stood, with ``ever``), the walk from ``roots`` is closed.

    ``subjects`` None keeps every change (histories for people); otherwise only
    changes that can matter to checks of those subjects.
    """
    who = None if subjects is None else frozenset(subjects)
    fetched: set[str] = set()
    changes: list[ArchivedChange] = []
    frontier = {obj for obj, _ in roots}
    while frontier:
        found = await archive.archived_changes(
            store_id, frontier, subjects=who, through=graph.through
        )
        fetched |= frontier
        changes += found
        history = History(frozenset(fetched), tuple(changes))
        missing: set[str] = set()
        views = [history.at(moment) for moment in moments]
        for view in [*views, history.ever()] if ever else views:
            missing |= walk(graph, view, roots).missing
        frontier = missing - fetched
    return History(frozenset(fetched), tuple(sorted(changes, key=lambda c: (c.time_us, c.seq))))


def everything(change: ArchivedChange) -> bool:
    """The moment after every archived change."""
    return True

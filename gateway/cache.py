"""The decision cache for OpenFGA checks, kept honest by ReadChanges.

Two modes. **Exact** (the gateway's default): a request reads the cache only after
one ReadChanges probe, started after the request arrived, has shown that nothing
changed since the cache's horizon (:class:`ChangeProbe`); a change committed before a
request arrives is therefore never answered from the cache: 0 stale requests.
**Bounded** (opt-in, ``SCOPEGATE_DECISION_CACHE``): a background watcher polls the
change log and requests read without a probe, at most ``max_staleness_s`` behind.

What is cached: the answer (allowed or not) of one check, keyed by the whole check —
store, authorization model, user, relation and object (the task is the user or the
object of the task checks) — and, for relations whose answer can depend on a
condition, the ``current_time`` the check was evaluated at. Checks sent with
contextual tuples, with a context supplied by the caller, at another model, or by a
request that demands ``HIGHER_CONSISTENCY`` never touch the cache.

Time. Conditions may only be *monotone expiries* (``current_time < param``, checked
when the cache is built; any other condition refuses the cache). A time-dependent
check is evaluated at the **end** of the current ``bucket_s`` bucket, never at its
start: if it is allowed then, it is allowed at every earlier instant of the bucket,
so a cached allow never outlives an expiry. The price is that an expiring grant can
stop working up to ``bucket_s`` before ``expires_at`` (early, never late). Entries
of a bucket are useless once the bucket is over, so ``bucket_s`` also bounds how long
a time-dependent answer lives. Relations that can never reach a conditional tuple are
cached without a bucket (found by walking the model, see
:func:`time_dependent_relations`; anything the walk does not understand counts as
time-dependent).

Invalidation. :class:`ChangeWatcher` polls OpenFGA's ReadChanges every
``interval_s`` and drops every entry when it sees any change (a grant on a folder
changes answers about every document below it, in ways a tuple alone cannot tell).
An answer is stored only if no invalidation happened while it was being computed.

Staleness. Entries are served only while the last *successful* poll started less
than ``max_staleness_s`` ago (the watcher marks a poll successful after it has
applied that poll's invalidations). A change committed at time c is seen by every
poll that starts after c, so no answer older than a change is served more than
``max_staleness_s`` after that change — whatever the poll interval, and also when
OpenFGA or the watcher fails (the cache then simply stops answering: fail closed).
Polls re-read an ``overlap_s`` window so a write whose id predates one already seen
(two writers committing out of order) is still caught.

Exact mode and time. Answers are evaluated at the request's own ``current_time``
(no bucket: an expiring task works until its expiry, as without a cache). A
time-independent answer is reused until a change; a time-dependent *denial* too, since
every condition is a monotone expiry and the model has no exclusion (``but not``), so
what is denied now stays denied while the tuples stay; a time-dependent *allow* is
never reused (it may expire the next instant). Complete ListObjects answers are
cached the same way, as supersets: with monotone expiries the permitted set only
shrinks while the tuples stay, and the strategies re-verify every document they return.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

logger = logging.getLogger(__name__)

#: The only condition shape the cache accepts: true until a timestamp parameter.
_MONOTONE_EXPIRY = re.compile(r"^\s*current_time\s*<\s*[A-Za-z_][A-Za-z0-9_]*\s*$")


class CacheRefused(ValueError):
    """The model has a condition the cache cannot reason about; run without a cache."""


def check_conditions(model: Mapping[str, Any]) -> None:
    """Raise CacheRefused unless every condition is ``current_time < <timestamp>``."""
    for name, condition in (model.get("conditions") or {}).items():
        expression = str(condition.get("expression", ""))
        params = condition.get("parameters") or {}
        types = {p: str((spec or {}).get("type_name", "")) for p, spec in params.items()}
        if not _MONOTONE_EXPIRY.match(expression) or types.get("current_time") != (
            "TYPE_NAME_TIMESTAMP"
        ):
            raise CacheRefused(f"condition {name!r} is not a monotone expiry")
        if any(t != "TYPE_NAME_TIMESTAMP" for t in types.values()):
            raise CacheRefused(f"condition {name!r} has non-timestamp parameters")


def time_dependent_relations(model: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    """Every (type, relation) whose answer may depend on a condition (and so on time).

    A relation depends on time if it may be satisfied through a conditioned tuple,
    directly or through any relation it refers to. Unknown rewrite shapes count as
    dependent, so a mistake here can only make the cache more careful.
    """
    types = {t["type"]: t for t in model.get("type_definitions", [])}
    edges: dict[tuple[str, str], set[tuple[str, str]]] = {}
    tainted: set[tuple[str, str]] = set()
    for type_name, definition in types.items():
        directs = ((definition.get("metadata") or {}).get("relations")) or {}
        for relation, rewrite in (definition.get("relations") or {}).items():
            node = (type_name, relation)
            edges[node] = set()
            _walk(node, rewrite, type_name, directs, edges[node], tainted)
    dependent = set(tainted)
    changed = True
    while changed:
        changed = False
        for node, targets in edges.items():
            if node not in dependent and (targets & dependent or _unknown(targets, edges)):
                dependent.add(node)
                changed = True
    return frozenset(dependent)


def has_exclusion(model: Mapping[str, Any]) -> bool:
    """True if any relation of ``model`` uses ``but not`` (a difference rewrite): then a
    denial can turn into an allow when a subtracted grant expires."""
    return '"difference"' in json.dumps(model.get("type_definitions", []))


def _unknown(targets: set[tuple[str, str]], edges: Mapping[tuple[str, str], Any]) -> bool:
    return any(t not in edges for t in targets)


def _direct_types(directs: Mapping[str, Any], relation: str) -> list[Mapping[str, Any]]:
    info = directs.get(relation) or {}
    return list(info.get("directly_related_user_types") or [])


def _walk(
    node: tuple[str, str],
    rewrite: Mapping[str, Any],
    type_name: str,
    directs: Mapping[str, Any],
    out: set[tuple[str, str]],
    tainted: set[tuple[str, str]],
) -> None:
    """Collect the relations ``rewrite`` refers to; taint ``node`` on a condition."""
    if "this" in rewrite:
        for ref in _direct_types(directs, node[1]):
            if ref.get("condition"):
                tainted.add(node)
            if ref.get("relation"):
                out.add((str(ref["type"]), str(ref["relation"])))
    elif "computedUserset" in rewrite:
        out.add((type_name, str(rewrite["computedUserset"].get("relation", ""))))
    elif "tupleToUserset" in rewrite:
        ttu = rewrite["tupleToUserset"]
        tupleset = str(ttu.get("tupleset", {}).get("relation", ""))
        target = str(ttu.get("computedUserset", {}).get("relation", ""))
        for ref in _direct_types(directs, tupleset):
            if ref.get("condition"):
                tainted.add(node)
            out.add((str(ref["type"]), target))
    elif "union" in rewrite or "intersection" in rewrite:
        children = (rewrite.get("union") or rewrite.get("intersection") or {}).get("child", [])
        for child in children:
            _walk(node, child, type_name, directs, out, tainted)
    elif "difference" in rewrite:
        diff = rewrite["difference"]
        for part in (diff.get("base", {}), diff.get("subtract", {})):
            _walk(node, part, type_name, directs, out, tainted)
    else:
        tainted.add(node)


@dataclass(frozen=True, slots=True)
class CacheKey:
    """A whole check. ``at`` is the evaluation time for time-dependent relations."""

    store: str
    model: str
    user: str
    relation: str
    object: str
    at: str | None


@dataclass(slots=True)
class _Entry:
    allowed: bool
    generation: int
    created: float


@dataclass(frozen=True, slots=True)
class ListKey:
    """A whole ListObjects question (answers are cached in exact mode only)."""

    store: str
    model: str
    user: str
    relation: str
    object_type: str


@dataclass(slots=True)
class _ListEntry:
    ids: frozenset[str]
    generation: int
    created: float


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    invalidations: int = 0
    refused_stale: int = 0
    list_hits: int = 0
    list_stores: int = 0


class DecisionCache:
    """Bounded LRU of check answers; see the module docstring for the rules.

    ``exact``: requests read only after a :class:`ChangeProbe` vouched for them (the
    caller says so), answers are evaluated at the request's own time, and complete
    ListObjects answers are kept too (at most ``max_lists``). Otherwise bounded: reads
    need a recent watcher poll (:meth:`usable`) and time-dependent checks use buckets.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        *,
        exact: bool = False,
        bucket_s: float = 10.0,
        ttl_s: float = 300.0,
        max_entries: int = 100_000,
        max_lists: int = 1_000,
        max_list_ids: int = 2_000_000,
        max_staleness_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] | None = None,
    ) -> None:
        check_conditions(model)
        if bucket_s <= 0 or ttl_s <= 0 or max_entries < 1 or max_staleness_s <= 0:
            raise ValueError("cache bounds must be positive")
        self.exact = exact
        self.timed = time_dependent_relations(model)
        # A time-dependent denial is reusable only if time can never turn it into an allow.
        self.monotone = not has_exclusion(model)
        self.max_lists = max_lists
        # Object ids over all kept answers (a listed task's answer may hold tens of
        # thousands): about 150 MB at the default.
        self.max_list_ids = max_list_ids
        self._list_ids = 0
        self._lists: OrderedDict[ListKey, _ListEntry] = OrderedDict()
        self.bucket_s = bucket_s
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_staleness_s = max_staleness_s
        self._clock = clock
        self._wall = wall or (lambda: datetime.now(UTC))
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self.generation = 0
        self.last_sync: float | None = None
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    # -- freshness ---------------------------------------------------------------------

    def usable(self) -> bool:
        """True while the last successful change poll started within max_staleness_s."""
        fresh = self.last_sync is not None and self._clock() - self.last_sync <= (
            self.max_staleness_s
        )
        if not fresh:
            self.stats.refused_stale += 1
        return fresh

    def synced(self, poll_started: float) -> None:
        """A poll that started at ``poll_started`` was read and applied completely."""
        if self.last_sync is None or poll_started > self.last_sync:
            self.last_sync = poll_started

    def invalidate(self) -> None:
        self.generation += 1
        self._entries.clear()
        self._lists.clear()
        self._list_ids = 0
        self.stats.invalidations += 1

    # -- time --------------------------------------------------------------------------

    def evaluation_time(self) -> datetime:
        """Exact: now. Bounded: the end of the current bucket (see docstring)."""
        if self.exact:
            return self._wall()
        now = self._wall().timestamp()
        end = math.floor(now / self.bucket_s) * self.bucket_s + self.bucket_s
        return datetime.fromtimestamp(end, UTC)

    def key(
        self, store: str, model: str, user: str, relation: str, obj: str, at: datetime
    ) -> CacheKey:
        timed = self.time_dependent(relation, obj)
        # Exact mode keeps time-dependent answers only when they hold for every later
        # instant (denials), so their key carries no time.
        stamp = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if timed and not self.exact else None
        return CacheKey(store, model, user, relation, obj, stamp)

    def time_dependent(self, relation: str, obj: str) -> bool:
        return (obj.partition(":")[0], relation) in self.timed

    def storable(self, key: CacheKey, allowed: bool) -> bool:
        """Whether an answer may be kept (exact mode: see the module docstring)."""
        if not self.exact or not self.time_dependent(key.relation, key.object):
            return True
        return not allowed and self.monotone

    # -- entries -----------------------------------------------------------------------

    def get(self, key: CacheKey) -> bool | None:
        entry = self._entries.get(key)
        if (
            entry is None
            or entry.generation != self.generation
            or self._clock() - entry.created > self.ttl_s
        ):
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry.allowed

    def put(self, key: CacheKey, allowed: bool, generation: int) -> None:
        """Store an answer computed while ``generation`` was current (else drop it)."""
        if generation != self.generation or not self.storable(key, allowed):
            return
        self._entries[key] = _Entry(allowed, generation, self._clock())
        self._entries.move_to_end(key)
        self.stats.stores += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    # -- ListObjects (exact mode) -------------------------------------------------------

    def get_list(self, key: ListKey) -> frozenset[str] | None:
        ids = self.peek_list(key)
        if ids is not None:
            self._lists.move_to_end(key)
            self.stats.list_hits += 1
        return ids

    def peek_list(self, key: ListKey) -> frozenset[str] | None:
        """What :meth:`get_list` would answer now, without counting or reordering: for
        work started speculatively, used only if a probe then vouches for the same
        answer (see ``PreFilter.retrieve``)."""
        entry = self._lists.get(key)
        if (
            entry is None
            or entry.generation != self.generation
            or self._clock() - entry.created > self.ttl_s
        ):
            return None
        return entry.ids

    def put_list(self, key: ListKey, ids: frozenset[str], generation: int) -> None:
        """Keep a *complete* answer fetched while ``generation`` was current."""
        if not self.exact or generation != self.generation or len(ids) > self.max_list_ids:
            return
        old = self._lists.pop(key, None)
        self._list_ids += len(ids) - (len(old.ids) if old is not None else 0)
        self._lists[key] = _ListEntry(ids, generation, self._clock())
        self.stats.list_stores += 1
        while len(self._lists) > self.max_lists or self._list_ids > self.max_list_ids:
            _, dropped = self._lists.popitem(last=False)
            self._list_ids -= len(dropped.ids)


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of OpenFGA's changelog."""

    timestamp: datetime
    operation: str
    user: str
    relation: str
    object: str


class ChangeFeed(Protocol):
    """What the watcher needs from the OpenFGA client."""

    async def read_changes(
        self, start_time: datetime, continuation_token: str | None, page_size: int
    ) -> tuple[list[Change], str | None]: ...


@dataclass(slots=True)
class WatcherStats:
    polls: int = 0
    failures: int = 0
    changes_seen: int = 0
    last_poll_s: float = 0.0
    max_poll_s: float = 0.0


@dataclass(slots=True)
class ChangeWatcher:
    """Polls ReadChanges and invalidates the cache on any change it has not seen."""

    feed: ChangeFeed
    cache: DecisionCache
    interval_s: float = 0.5
    overlap_s: float = 5.0
    initial_lookback_s: float = 3600.0
    page_size: int = 100
    max_pages: int = 1000
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    stats: WatcherStats = field(default_factory=WatcherStats)
    _high_water: datetime | None = None
    _seen: set[Change] = field(default_factory=set)
    _task: asyncio.Task[None] | None = None
    _stopping: bool = False

    async def poll_once(self) -> int:
        """One complete read of recent changes; returns how many were new."""
        started = self.clock()
        since = (
            self._high_water - timedelta(seconds=self.overlap_s)
            if self._high_water is not None
            else self.wall() - timedelta(seconds=self.initial_lookback_s)
        )
        fresh = await self._read_since(since)
        if fresh:
            self.cache.invalidate()
        self._remember(fresh)
        self.cache.synced(started)
        elapsed = self.clock() - started
        self.stats.polls += 1
        self.stats.changes_seen += len(fresh)
        self.stats.last_poll_s = elapsed
        self.stats.max_poll_s = max(self.stats.max_poll_s, elapsed)
        return len(fresh)

    async def _read_since(self, since: datetime) -> list[Change]:
        token: str | None = None
        fresh: list[Change] = []
        for _ in range(self.max_pages):
            page, token = await self.feed.read_changes(since, token, self.page_size)
            fresh.extend(c for c in page if c not in self._seen)
            if len(page) < self.page_size or not token:
                return fresh
        # Too far behind to page through: drop everything; the next poll resumes.
        self.cache.invalidate()
        raise TimeoutError("changelog too long to read in one poll")

    def _remember(self, changes: Iterable[Change]) -> None:
        for change in changes:
            self._seen.add(change)
            if self._high_water is None or change.timestamp > self._high_water:
                self._high_water = change.timestamp
        if self._high_water is not None:
            horizon = self._high_water - timedelta(seconds=2 * self.overlap_s)
            self._seen = {c for c in self._seen if c.timestamp >= horizon}

    async def run(self) -> None:
        # The flag as well as the cancellation: on Python 3.11 asyncio.wait_for (around
        # every OpenFGA call) can swallow a cancellation that arrives just as the call
        # completes, and a loop relying on the cancellation alone never ends.
        while not self._stopping:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: stop vouching for the cache
                self.stats.failures += 1
                logger.warning("decision cache: change poll failed: %s", exc)
            if self._stopping:
                return
            await asyncio.sleep(self.interval_s)

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


@dataclass(slots=True)
class ProbeStats:
    probes: int = 0
    failures: int = 0
    changes_seen: int = 0
    shared: int = 0


class ChangeProbe:
    """Exact freshness: a request reads the cache only after one ReadChanges read that
    started after the request arrived found nothing it had not seen.

    Probes run one at a time and are shared: a request joins the probe in flight if
    that probe started after the request arrived, else it waits for it and joins (or
    starts) the next one. Probe *i* reads the change log from the start of probe
    *i-1* minus ``overlap_s``, so a change committed at time c is read by the first
    probe that starts after c — its timestamp is at most ``overlap_s`` older than its
    commit (OpenFGA stamps a write before its transaction commits; ``overlap_s`` also
    absorbs that much clock difference between the gateway and OpenFGA) — and every
    request that arrives after c reads the cache only after that probe has dropped the
    entries. The first probe drops everything (no horizon yet). A probe that fails, or
    finds more than ``max_pages`` pages, vouches for nothing (the request asks
    OpenFGA) or drops everything. Answers may be stored by any request: an answer is
    stored only if no invalidation happened while it was fetched, and a change
    committed after it was computed is dropped by a later probe.

    The probe also keeps ``quiet_since``: a time (the gateway's clock) at or after
    every change commit it knows of — the end of the last probe that found anything
    new, of the first probe (which knows nothing older), or of one that found too many.
    :meth:`quiet_for` is how long since then; OpenFGA's check cache is trusted only
    after a quiet time longer than its TTL plus its request timeout (docs/cache.md).
    """

    def __init__(
        self,
        feed: ChangeFeed,
        cache: DecisionCache,
        *,
        overlap_s: float = 10.0,
        page_size: int = 100,
        max_pages: int = 20,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] | None = None,
    ) -> None:
        self.feed = feed
        self.cache = cache
        self.overlap_s = overlap_s
        self.page_size = page_size
        self.max_pages = max_pages
        self._clock = clock
        self._wall = wall or (lambda: datetime.now(UTC))
        self._horizon: datetime | None = None
        self._seen: set[Change] = set()
        self._inflight: tuple[float, asyncio.Future[bool]] | None = None
        self.quiet_since: float | None = None
        self.stats = ProbeStats()

    def quiet_for(self) -> float:
        """Seconds since ``quiet_since`` (0 before the first successful probe)."""
        if self.quiet_since is None:
            return 0.0
        return max(0.0, self._clock() - self.quiet_since)

    async def fresh(self) -> bool:
        """True when this request may read the cache (never raises)."""
        arrived = self._clock()
        while True:
            current = self._inflight
            if current is not None and current[1].done():
                # Finished, its done-callback not run yet: awaiting it would not yield,
                # and this loop would spin without letting the callback run.
                self._inflight = current = None
            if current is None:
                probe: asyncio.Future[bool] = asyncio.ensure_future(self._probe())
                self._inflight = (self._clock(), probe)
                probe.add_done_callback(self._finished)
                return await asyncio.shield(probe)
            started, running = current
            outcome = await asyncio.shield(running)
            if started >= arrived:
                self.stats.shared += 1
                return outcome

    def _finished(self, future: asyncio.Future[bool]) -> None:
        if self._inflight is not None and self._inflight[1] is future:
            self._inflight = None

    async def _probe(self) -> bool:
        started = self._wall()
        self.stats.probes += 1
        try:
            if self._horizon is None:
                fresh = await self._read_since(started - timedelta(seconds=self.overlap_s))
                self.cache.invalidate()
            else:
                fresh = await self._read_since(self._horizon - timedelta(seconds=self.overlap_s))
                if fresh:
                    self.cache.invalidate()
        except _TooManyChanges:
            self.cache.invalidate()
            fresh = []
            self._seen.clear()
            self.quiet_since = self._clock()
        except Exception as exc:  # any failure: this probe vouches for nothing
            self.stats.failures += 1
            logger.warning("decision cache: change probe failed: %s", exc)
            return False
        if fresh or self.quiet_since is None:
            # Every change this read found committed before now.
            self.quiet_since = self._clock()
        self._remember(fresh, started)
        self.stats.changes_seen += len(fresh)
        return True

    async def _read_since(self, since: datetime) -> list[Change]:
        token: str | None = None
        fresh: list[Change] = []
        for _ in range(self.max_pages):
            page, token = await self.feed.read_changes(since, token, self.page_size)
            fresh.extend(c for c in page if c not in self._seen)
            if len(page) < self.page_size or not token:
                return fresh
        raise _TooManyChanges

    def _remember(self, changes: Iterable[Change], started: datetime) -> None:
        self._seen.update(changes)
        self._horizon = started
        # Changes older than the next probe's window can never be read again.
        oldest = started - timedelta(seconds=2 * self.overlap_s)
        self._seen = {c for c in self._seen if c.timestamp >= oldest}


class _TooManyChanges(Exception):
    """More changes since the horizon than one probe reads: drop everything."""

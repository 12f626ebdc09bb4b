"""An optional decision cache for OpenFGA checks (off by default), kept honest by
ReadChanges.

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
"""

from __future__ import annotations

import asyncio
import contextlib
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


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    invalidations: int = 0
    refused_stale: int = 0


class DecisionCache:
    """Bounded LRU of check answers; see the module docstring for the rules."""

    def __init__(
        self,
        model: Mapping[str, Any],
        *,
        bucket_s: float = 10.0,
        ttl_s: float = 300.0,
        max_entries: int = 100_000,
        max_staleness_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] | None = None,
    ) -> None:
        check_conditions(model)
        if bucket_s <= 0 or ttl_s <= 0 or max_entries < 1 or max_staleness_s <= 0:
            raise ValueError("cache bounds must be positive")
        self.timed = time_dependent_relations(model)
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
        self.stats.invalidations += 1

    # -- time --------------------------------------------------------------------------

    def evaluation_time(self) -> datetime:
        """The end of the current bucket: checks are evaluated there (see docstring)."""
        now = self._wall().timestamp()
        end = math.floor(now / self.bucket_s) * self.bucket_s + self.bucket_s
        return datetime.fromtimestamp(end, UTC)

    def key(
        self, store: str, model: str, user: str, relation: str, obj: str, at: datetime
    ) -> CacheKey:
        object_type = obj.partition(":")[0]
        timed = (object_type, relation) in self.timed
        stamp = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if timed else None
        return CacheKey(store, model, user, relation, obj, stamp)

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
        if generation != self.generation:
            return
        self._entries[key] = _Entry(allowed, generation, self._clock())
        self._entries.move_to_end(key)
        self.stats.stores += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


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
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: stop vouching for the cache
                self.stats.failures += 1
                logger.warning("decision cache: change poll failed: %s", exc)
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

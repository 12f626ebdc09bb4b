"""Token buckets for ``POST /v1/retrieve``: one per agent (tenant and agent) and one per tenant.

Pure code with an injectable clock. Each bucket holds up to ``burst`` tokens and refills
at ``per_s`` tokens a second; a request takes one token from every bucket it is keyed
by, or from none of them: a request refused by its agent's bucket does not drain the
tenant's. Memory is bounded: past ``max_buckets`` keys the least recently used bucket
is dropped, which only ever forgets a debt (a dropped bucket comes back full).

The keys come from the verified token (tenant, agent), never from the request body.
Limits are per process: several gateway processes each apply them.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from gateway.errors import RateLimited

Clock = Callable[[], float]
DEFAULT_MAX_BUCKETS = 50_000


@dataclass(frozen=True)
class Rate:
    """``per_s`` tokens a second, at most ``burst`` of them saved up."""

    per_s: float
    burst: int

    def __post_init__(self) -> None:
        if self.per_s <= 0 or self.burst < 1:
            raise ValueError("a rate needs per_s > 0 and burst >= 1")

    @classmethod
    def of(cls, per_s: float | None, burst: int | None) -> Rate | None:
        """``None`` (no limit) without ``per_s``; the burst defaults to one second's worth."""
        if per_s is None:
            return None
        return cls(per_s, burst if burst is not None else max(1, math.ceil(per_s)))


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """Buckets of one rate, by key, at most ``max_buckets`` of them."""

    def __init__(
        self, rate: Rate, *, clock: Clock = time.monotonic, max_buckets: int = DEFAULT_MAX_BUCKETS
    ) -> None:
        self.rate = rate
        self._clock = clock
        self._max = max_buckets
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()

    def wait_s(self, key: Hashable) -> float:
        """Seconds until ``key`` has a token (0 when it has one now); takes nothing."""
        bucket = self._refilled(key)
        return 0.0 if bucket.tokens >= 1 else (1 - bucket.tokens) / self.rate.per_s

    def take(self, key: Hashable) -> None:
        """Take a token that :meth:`wait_s` just said is there."""
        self._refilled(key).tokens -= 1

    def __len__(self) -> int:
        return len(self._buckets)

    def _refilled(self, key: Hashable) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.rate.burst), now)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            # A clock stepping back neither mints tokens nor counts the same time twice.
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(self.rate.burst), bucket.tokens + elapsed * self.rate.per_s)
            bucket.updated = max(bucket.updated, now)
        return bucket


class RetrievalLimiter:
    """The per-agent and per-tenant limits of retrieval; either may be off (``None``)."""

    def __init__(
        self,
        agent: Rate | None,
        tenant: Rate | None,
        *,
        clock: Clock = time.monotonic,
        max_buckets: int = DEFAULT_MAX_BUCKETS,
    ) -> None:
        self._agents = TokenBuckets(agent, clock=clock, max_buckets=max_buckets) if agent else None
        self._tenants = (
            TokenBuckets(tenant, clock=clock, max_buckets=max_buckets) if tenant else None
        )

    @property
    def enabled(self) -> bool:
        return self._agents is not None or self._tenants is not None

    def admit(self, tenant: str, agent: str) -> None:
        """Take one token for this agent and one for its tenant, or raise :class:`RateLimited`.

        The error's ``retry_after_s`` is the whole number of seconds (rounded up) after
        which both buckets have a token again.
        """
        keyed = [
            (buckets, key)
            for buckets, key in ((self._agents, (tenant, agent)), (self._tenants, tenant))
            if buckets is not None
        ]
        wait = max((buckets.wait_s(key) for buckets, key in keyed), default=0.0)
        if wait > 0:
            raise RateLimited("too many retrievals; retry later", retry_after_s=math.ceil(wait))
        for buckets, key in keyed:
            buckets.take(key)

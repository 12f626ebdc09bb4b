"""Python client for a running scopegate gateway (sync and async, over httpx).

Both clients expose the same typed methods for the whole HTTP API v1 (DESIGN §4):
retrieval, tasks, sources and ingestion, relationships, deprovisioning, and the
reviewer's audit list / show / replay (with what-if). Errors come back as the
exception classes the gateway raises (:mod:`scopegate_client.errors`), mapped by the
``error.code`` of the body, or by the HTTP status when a proxy answered instead of
the gateway.

The token is a string or a zero-argument callable returning one; the callable is
asked before every attempt, so a token provider can rotate tokens freely.

Retries are limited to what is safe to repeat:

- a request that never reached the gateway (connect error or timeout, pool
  timeout) is retried whatever its method;
- a request that may have reached it is retried only when repeating it changes
  nothing (reads, retrieval and replay, which write nothing but an audit record,
  and task revocation), on transport errors and on 429/503 answers, honouring
  ``Retry-After``; removals of sources, documents and principals are not repeated,
  as a second attempt would answer 404 or zero counts for work the first one did;
- a 401 is retried once, with a fresh token, when the token callable hands out a
  different one: the gateway rejects an unauthenticated request before doing anything.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import anyio
import httpx

from scopegate_client import errors
from scopegate_client.models import (
    Decision,
    DecisionPage,
    DecisionSummary,
    IngestSummary,
    Replay,
    Retrieval,
    Source,
)

__all__ = [
    "AsyncScopegateClient",
    "ClientsPerLoop",
    "RetryPolicy",
    "ScopegateClient",
    "TokenSource",
    "error_from_response",
    "raise_for_error",
]

TokenSource = str | Callable[[], str]
"""A bearer token, or a zero-argument callable returning the current one."""

_ERRORS: dict[str, type[errors.ScopegateError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidToken,
        errors.Forbidden,
        errors.NotFound,
        errors.InvalidRequest,
        errors.PayloadTooLarge,
        errors.RateLimited,
        errors.Conflict,
        errors.Unavailable,
        errors.AuthorizationUnavailable,
        errors.SourceUnavailable,
        errors.AuditUnavailable,
        errors.IdentityStale,
    )
}

# When the body is not a scopegate error (a proxy or load balancer answered).
_BY_STATUS: dict[int, type[errors.ScopegateError]] = {
    400: errors.InvalidRequest,
    401: errors.InvalidToken,
    403: errors.Forbidden,
    404: errors.NotFound,
    409: errors.Conflict,
    413: errors.PayloadTooLarge,
    422: errors.InvalidRequest,
    429: errors.RateLimited,
    502: errors.Unavailable,
    503: errors.Unavailable,
    504: errors.Unavailable,
}

# Errors raised before the request left this process: repeating is always safe.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_RETRY_STATUSES = frozenset({429, 503})


# -- errors ---------------------------------------------------------------------------


def error_from_response(response: httpx.Response) -> errors.ScopegateError:
    """The gateway exception an error response stands for (``request_id`` attached)."""
    code: str | None = None
    request_id: str | None = response.headers.get("x-request-id")
    try:
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
        request_id = str(body.get("request_id") or request_id or "") or None
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}: {response.text[:200]}"
    cls = _ERRORS.get(code or "") or _BY_STATUS.get(response.status_code, errors.ScopegateError)
    exc = cls(message)
    if cls is errors.ScopegateError:
        exc.status = response.status_code
    exc.request_id = request_id
    return exc


def raise_for_error(response: httpx.Response) -> None:
    """Raise the mapped gateway exception if ``response`` is an error."""
    if response.status_code >= 400:
        raise error_from_response(response)


# -- requests and the retry policy (pure) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    json: Any = None
    params: Mapping[str, Any] | None = None
    repeatable: bool = False  # safe to send twice (see the module docstring)
    ok_statuses: frozenset[int] = frozenset()  # statuses returned as data, not raised


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to wait; ``attempts`` counts the first try."""

    attempts: int = 3
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0

    def delay(
        self,
        request: _Request,
        attempt: int,
        *,
        error: httpx.TransportError | None = None,
        response: httpx.Response | None = None,
    ) -> float | None:
        """Seconds to wait before trying again, or ``None`` to stop here."""
        if attempt + 1 >= self.attempts:
            return None
        if error is not None:
            if isinstance(error, _NOT_SENT) or request.repeatable:
                return self._backoff(attempt)
            return None
        retryable = response is not None and response.status_code in _RETRY_STATUSES
        if response is not None and retryable and request.repeatable:
            return self._retry_after(response) or self._backoff(attempt)
        return None

    def _backoff(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2.0**attempt)
        return base * (0.5 + random.random() / 2)

    def _retry_after(self, response: httpx.Response) -> float | None:
        value = response.headers.get("retry-after", "")
        try:
            seconds = float(value)
        except ValueError:
            return None
        return min(max(seconds, 0.0), self.max_backoff_s)


def _decode(request: _Request, response: httpx.Response) -> Any:
    if response.status_code >= 400 and response.status_code not in request.ok_statuses:
        raise error_from_response(response)
    return response.json() if response.content else None


def _headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


class _Tokens:
    """The token for the next attempt; after a 401, a fresh one if the source has one."""

    def __init__(self, source: TokenSource | None) -> None:
        self._source = source
        self._next: str | None = None
        self._refreshed = False

    def current(self) -> str | None:
        if self._next is not None:
            token, self._next = self._next, None
            return token
        if self._source is None:
            return None
        return self._source() if callable(self._source) else self._source

    def refresh_after_401(self, rejected: str | None) -> bool:
        if self._refreshed or not callable(self._source):
            return False
        self._refreshed = True
        fresh = self._source()
        if fresh == rejected:
            return False
        self._next = fresh
        return True


def _clean(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _retrieve(
    query: str, k: int, sources: Sequence[str] | None, max_tokens: int | None
) -> _Request:
    body: dict[str, Any] = {"query": query, "k": k}
    if sources is not None:
        body["sources"] = list(sources)
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return _Request("POST", "/v1/retrieve", body, repeatable=True)


def _create_task(
    user: str, agent: str, scope: Sequence[str], expires_at: datetime | str | None
) -> _Request:
    body: dict[str, Any] = {"user": user, "agent": agent, "scope": list(scope)}
    if expires_at is not None:
        body["expires_at"] = expires_at if isinstance(expires_at, str) else expires_at.isoformat()
    return _Request("POST", "/v1/tasks", body)


def _register_source(source_id: str, kind: str, config: Mapping[str, Any] | None) -> _Request:
    return _Request(
        "POST", "/v1/sources", {"id": source_id, "kind": kind, "config": dict(config or {})}
    )


def _segment(value: str) -> str:
    """``value`` as one path segment: no id can turn a call into one on another route."""
    if not value:
        raise errors.InvalidRequest("an id in a request path must not be empty")
    quoted = quote(value, safe=":")
    # "." and ".." would be resolved away by URL normalisation: keep them literal.
    return quoted.replace(".", "%2E") if not quoted.strip(".") else quoted


def _path(template: str, *values: str) -> str:
    return template.format(*(_segment(v) for v in values))


def _relationships(
    writes: Sequence[Mapping[str, str]], deletes: Sequence[Mapping[str, str]]
) -> _Request:
    body = {"writes": [dict(w) for w in writes], "deletes": [dict(d) for d in deletes]}
    return _Request("POST", "/v1/relationships", body)


def _list_relationships(object: str | None, user: str | None) -> _Request:
    params = _clean({"object": object, "user": user})
    return _Request("GET", "/v1/relationships", params=params, repeatable=True)


def _relationship_list(data: Mapping[str, Any]) -> list[dict[str, str]]:
    return [
        {"user": str(r["user"]), "relation": str(r["relation"]), "object": str(r["object"])}
        for r in data["relationships"]
    ]


def _replay(
    request_id: str, what_if: Sequence[Mapping[str, str]] | None, as_of: str = "now"
) -> _Request:
    path = _path("/v1/audit/decisions/{}/replay", request_id)
    body: dict[str, Any] = {"what_if": {"writes": [dict(w) for w in what_if]}} if what_if else {}
    if as_of != "now":
        body["as_of"] = as_of
    return _Request("POST", path, body or None, repeatable=True)


def _history(ref: str) -> _Request:
    return _Request("GET", "/v1/audit/history", params={"object": ref}, repeatable=True)


def _counts(data: Mapping[str, Any]) -> dict[str, int]:
    return {str(k): int(v) for k, v in data.items()}


def _list_decisions(**filters: Any) -> _Request:
    return _Request("GET", "/v1/audit/decisions", params=_clean(filters), repeatable=True)


def _batches(documents: Sequence[Mapping[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    if size < 1:
        raise ValueError("batch_size must be at least 1")
    for start in range(0, len(documents), size):
        yield [dict(d) for d in documents[start : start + size]]


def _summary(total: IngestSummary, data: Mapping[str, Any]) -> IngestSummary:
    return IngestSummary(
        total.documents + int(data["documents"]),
        total.chunks + int(data["chunks"]),
        total.skipped + int(data.get("skipped", 0)),
    )


def _unreachable(exc: httpx.TransportError) -> errors.Unavailable:
    return errors.Unavailable(f"gateway unreachable: {type(exc).__name__}: {exc}")


# -- clients ---------------------------------------------------------------------------


class AsyncScopegateClient:
    """Async client. ``token`` is a string or a zero-argument callable returning one."""

    def __init__(
        self,
        url: str,
        token: TokenSource | None = None,
        *,
        timeout_s: float = 30.0,
        retries: int = 2,
        transport: httpx.AsyncBaseTransport | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._token = token
        self._policy = RetryPolicy(attempts=retries + 1)
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(
            base_url=url.rstrip("/"), timeout=timeout_s, transport=transport
        )

    def with_token(self, token: TokenSource) -> AsyncScopegateClient:
        """A client for another caller sharing this one's connection pool (not closed by it)."""
        other = AsyncScopegateClient(str(self._http.base_url), token, http=self._http)
        other._policy = self._policy
        return other

    async def _send(self, request: _Request) -> Any:
        tokens = _Tokens(self._token)
        attempt = 0
        while True:
            token = tokens.current()
            try:
                response = await self._http.request(
                    request.method,
                    request.path,
                    json=request.json,
                    params=request.params,
                    headers=_headers(token),
                )
            except httpx.TransportError as exc:
                delay = self._policy.delay(request, attempt, error=exc)
                if delay is None:
                    raise _unreachable(exc) from exc
            else:
                if response.status_code == 401 and tokens.refresh_after_401(token):
                    continue
                delay = self._policy.delay(request, attempt, response=response)
                if delay is None:
                    return _decode(request, response)
            attempt += 1
            await anyio.sleep(delay)

    async def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        retry: bool = False,
    ) -> Any:
        """Any API call; ``retry=True`` only for requests that are safe to repeat."""
        return await self._send(_Request(method, path, json, params, repeatable=retry))

    # retrieval (delegation token)

    async def retrieve(
        self,
        query: str,
        k: int = 5,
        sources: Sequence[str] | None = None,
        max_tokens: int | None = None,
    ) -> Retrieval:
        return Retrieval.from_json(await self._send(_retrieve(query, k, sources, max_tokens)))

    async def retrievable_sources(self) -> list[str]:
        """The source ids an agent may name in ``sources`` (delegation token)."""
        data = await self._send(_Request("GET", "/v1/retrieve/sources", repeatable=True))
        return [str(s["id"]) for s in data["sources"]]

    # tenants (platform operator token)

    async def create_tenant(self, tenant: str, admin: str) -> None:
        """Bootstrap a tenant and its first admin."""
        await self._send(_Request("POST", "/v1/tenants", {"id": tenant, "admin": admin}))

    # tasks (admin or the delegating user)

    async def create_task(
        self,
        user: str,
        agent: str,
        scope: Sequence[str],
        expires_at: datetime | str | None = None,
    ) -> str:
        """Delegate ``scope`` (``source:..``, ``folder:..``, ``document:..``); the task id."""
        data = await self._send(_create_task(user, agent, scope, expires_at))
        return str(data["task_id"])

    async def revoke_task(self, task_id: str) -> None:
        await self._send(_Request("DELETE", _path("/v1/tasks/{}", task_id), repeatable=True))

    # sources and ingestion (admin)

    async def register_source(
        self, source_id: str, kind: str = "chroma", config: Mapping[str, Any] | None = None
    ) -> Source:
        return Source.from_json(await self._send(_register_source(source_id, kind, config)))

    async def list_sources(self) -> list[Source]:
        data = await self._send(_Request("GET", "/v1/sources", repeatable=True))
        return [Source.from_json(s) for s in data["sources"]]

    async def get_source(self, source_id: str) -> Source:
        data = await self._send(
            _Request("GET", _path("/v1/sources/{}", source_id), repeatable=True)
        )
        return Source.from_json(data)

    async def ingest(
        self,
        source_id: str,
        documents: Sequence[Mapping[str, Any]],
        *,
        batch_size: int = 100,
        progress: Callable[[int], object] | None = None,
    ) -> IngestSummary:
        """Ingest in batches; ``progress`` gets the number of documents of each batch."""
        total = IngestSummary(0, 0)
        for batch in _batches(documents, batch_size):
            path = _path("/v1/sources/{}/documents", source_id)
            total = _summary(total, await self._send(_Request("POST", path, {"documents": batch})))
            if progress is not None:
                progress(len(batch))
        return total

    async def delete_document(self, source_id: str, document_id: str) -> None:
        """Remove a document's chunks and relationships."""
        path = _path("/v1/sources/{}/documents/{}", source_id, document_id)
        await self._send(_Request("DELETE", path))

    async def remove_source(self, source_id: str) -> None:
        """Remove a source with its chunks, relationships and catalog entries."""
        await self._send(_Request("DELETE", _path("/v1/sources/{}", source_id)))

    # relationships and principals (admin)

    async def write_relationships(
        self,
        writes: Sequence[Mapping[str, str]] = (),
        deletes: Sequence[Mapping[str, str]] = (),
    ) -> dict[str, int]:
        """``{"user", "relation", "object"}`` items, inside the caller's tenant."""
        return _counts(await self._send(_relationships(writes, deletes)))

    async def list_relationships(
        self, *, object: str | None = None, user: str | None = None
    ) -> list[dict[str, str]]:
        """Relationships on ``object`` and/or of ``user`` (typed ids, e.g. ``document:d1``)."""
        return _relationship_list(await self._send(_list_relationships(object, user)))

    async def deprovision(self, ref: str) -> dict[str, int]:
        """Remove every relation of ``user:..`` or ``agent:..`` and revoke its tasks.

        Returns ``{"relations_removed": n, "tasks_revoked": n}``.
        """
        return _counts(await self._send(_Request("DELETE", _path("/v1/principals/{}", ref))))

    # audit (reviewer)

    async def list_decisions(
        self,
        *,
        outcome: str | None = None,
        user: str | None = None,
        agent: str | None = None,
        task: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> DecisionPage:
        request = _list_decisions(
            outcome=outcome,
            user=user,
            agent=agent,
            task=task,
            since=since,
            until=until,
            limit=limit,
            cursor=cursor,
        )
        return DecisionPage.from_json(await self._send(request))

    async def iter_decisions(self, **filters: Any) -> AsyncIterator[DecisionSummary]:
        """Every matching decision, newest first, following cursors."""
        cursor: str | None = None
        while True:
            page = await self.list_decisions(**filters, cursor=cursor)
            for decision in page.decisions:
                yield decision
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def get_decision(self, request_id: str) -> Decision:
        path = _path("/v1/audit/decisions/{}", request_id)
        return Decision.from_json(await self._send(_Request("GET", path, repeatable=True)))

    async def replay(
        self,
        request_id: str,
        what_if: Sequence[Mapping[str, str]] | None = None,
        *,
        as_of: str = "now",
    ) -> Replay:
        """Re-evaluate a decision now; ``what_if`` relationships are tried, never written.

        ``as_of="decision"`` also rebuilds each verdict as it stood when the request was
        decided (``then``) and lists the relationship changes since (``raw``).
        """
        return Replay.from_json(await self._send(_replay(request_id, what_if, as_of)))

    async def history(self, ref: str) -> dict[str, Any]:
        """The relationship changes that touched ``ref``'s access (``document:d1``)."""
        return dict(await self._send(_history(ref)))

    # health (no token needed)

    async def ready(self) -> dict[str, Any]:
        """``/readyz``: ``ready`` and the state of each part; never raises on 503."""
        data = await self._send(_Request("GET", "/readyz", ok_statuses=frozenset({503})))
        return dict(data)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncScopegateClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class ScopegateClient:
    """Sync client with the same methods as :class:`AsyncScopegateClient`."""

    def __init__(
        self,
        url: str,
        token: TokenSource | None = None,
        *,
        timeout_s: float = 30.0,
        retries: int = 2,
        transport: httpx.BaseTransport | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self._token = token
        self._policy = RetryPolicy(attempts=retries + 1)
        self._owns_http = http is None
        self._http = http or httpx.Client(
            base_url=url.rstrip("/"), timeout=timeout_s, transport=transport
        )

    def with_token(self, token: TokenSource) -> ScopegateClient:
        """A client for another caller sharing this one's connection pool (not closed by it)."""
        other = ScopegateClient(str(self._http.base_url), token, http=self._http)
        other._policy = self._policy
        return other

    def _send(self, request: _Request) -> Any:
        tokens = _Tokens(self._token)
        attempt = 0
        while True:
            token = tokens.current()
            try:
                response = self._http.request(
                    request.method,
                    request.path,
                    json=request.json,
                    params=request.params,
                    headers=_headers(token),
                )
            except httpx.TransportError as exc:
                delay = self._policy.delay(request, attempt, error=exc)
                if delay is None:
                    raise _unreachable(exc) from exc
            else:
                if response.status_code == 401 and tokens.refresh_after_401(token):
                    continue
                delay = self._policy.delay(request, attempt, response=response)
                if delay is None:
                    return _decode(request, response)
            attempt += 1
            time.sleep(delay)

    def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        retry: bool = False,
    ) -> Any:
        """Any API call; ``retry=True`` only for requests that are safe to repeat."""
        return self._send(_Request(method, path, json, params, repeatable=retry))

    def retrieve(
        self,
        query: str,
        k: int = 5,
        sources: Sequence[str] | None = None,
        max_tokens: int | None = None,
    ) -> Retrieval:
        return Retrieval.from_json(self._send(_retrieve(query, k, sources, max_tokens)))

    def retrievable_sources(self) -> list[str]:
        data = self._send(_Request("GET", "/v1/retrieve/sources", repeatable=True))
        return [str(s["id"]) for s in data["sources"]]

    def create_tenant(self, tenant: str, admin: str) -> None:
        self._send(_Request("POST", "/v1/tenants", {"id": tenant, "admin": admin}))

    def create_task(
        self,
        user: str,
        agent: str,
        scope: Sequence[str],
        expires_at: datetime | str | None = None,
    ) -> str:
        return str(self._send(_create_task(user, agent, scope, expires_at))["task_id"])

    def revoke_task(self, task_id: str) -> None:
        self._send(_Request("DELETE", _path("/v1/tasks/{}", task_id), repeatable=True))

    def register_source(
        self, source_id: str, kind: str = "chroma", config: Mapping[str, Any] | None = None
    ) -> Source:
        return Source.from_json(self._send(_register_source(source_id, kind, config)))

    def list_sources(self) -> list[Source]:
        data = self._send(_Request("GET", "/v1/sources", repeatable=True))
        return [Source.from_json(s) for s in data["sources"]]

    def get_source(self, source_id: str) -> Source:
        return Source.from_json(
            self._send(_Request("GET", _path("/v1/sources/{}", source_id), repeatable=True))
        )

    def ingest(
        self,
        source_id: str,
        documents: Sequence[Mapping[str, Any]],
        *,
        batch_size: int = 100,
        progress: Callable[[int], object] | None = None,
    ) -> IngestSummary:
        total = IngestSummary(0, 0)
        for batch in _batches(documents, batch_size):
            path = _path("/v1/sources/{}/documents", source_id)
            total = _summary(total, self._send(_Request("POST", path, {"documents": batch})))
            if progress is not None:
                progress(len(batch))
        return total

    def delete_document(self, source_id: str, document_id: str) -> None:
        path = _path("/v1/sources/{}/documents/{}", source_id, document_id)
        self._send(_Request("DELETE", path))

    def remove_source(self, source_id: str) -> None:
        self._send(_Request("DELETE", _path("/v1/sources/{}", source_id)))

    def write_relationships(
        self,
        writes: Sequence[Mapping[str, str]] = (),
        deletes: Sequence[Mapping[str, str]] = (),
    ) -> dict[str, int]:
        return _counts(self._send(_relationships(writes, deletes)))

    def list_relationships(
        self, *, object: str | None = None, user: str | None = None
    ) -> list[dict[str, str]]:
        return _relationship_list(self._send(_list_relationships(object, user)))

    def deprovision(self, ref: str) -> dict[str, int]:
        return _counts(self._send(_Request("DELETE", _path("/v1/principals/{}", ref))))

    def list_decisions(
        self,
        *,
        outcome: str | None = None,
        user: str | None = None,
        agent: str | None = None,
        task: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> DecisionPage:
        request = _list_decisions(
            outcome=outcome,
            user=user,
            agent=agent,
            task=task,
            since=since,
            until=until,
            limit=limit,
            cursor=cursor,
        )
        return DecisionPage.from_json(self._send(request))

    def iter_decisions(self, **filters: Any) -> Iterator[DecisionSummary]:
        cursor: str | None = None
        while True:
            page = self.list_decisions(**filters, cursor=cursor)
            yield from page.decisions
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def get_decision(self, request_id: str) -> Decision:
        path = _path("/v1/audit/decisions/{}", request_id)
        return Decision.from_json(self._send(_Request("GET", path, repeatable=True)))

    def replay(
        self,
        request_id: str,
        what_if: Sequence[Mapping[str, str]] | None = None,
        *,
        as_of: str = "now",
    ) -> Replay:
        return Replay.from_json(self._send(_replay(request_id, what_if, as_of)))

    def history(self, ref: str) -> dict[str, Any]:
        return dict(self._send(_history(ref)))

    def ready(self) -> dict[str, Any]:
        return dict(self._send(_Request("GET", "/readyz", ok_statuses=frozenset({503}))))

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> ScopegateClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ClientsPerLoop:
    """A sync client and one async client per event loop, for one gateway and token.

    httpx's async connection pools belong to the loop that opened them, so whatever is
    used from several loops (a retriever's ``invoke`` from a script, ``ainvoke`` from
    any running loop) keeps one async client per loop; each is dropped with its loop.
    Clients are opened on first use.
    """

    def __init__(
        self, url: str, token: TokenSource | None = None, *, timeout_s: float = 30.0
    ) -> None:
        self.url = url
        self._token = token
        self._timeout_s = timeout_s
        self._sync: ScopegateClient | None = None
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncScopegateClient] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def sync(self) -> ScopegateClient:
        with self._lock:
            if self._sync is None:
                self._sync = ScopegateClient(self.url, self._token, timeout_s=self._timeout_s)
            return self._sync

    def for_running_loop(self) -> AsyncScopegateClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._async.get(loop)
            if client is None:
                client = AsyncScopegateClient(self.url, self._token, timeout_s=self._timeout_s)
                self._async[loop] = client
            return client

    def close(self) -> None:
        """Close the sync client's pool (async pools close with their loop)."""
        with self._lock:
            if self._sync is not None:
                self._sync.close()
                self._sync = None

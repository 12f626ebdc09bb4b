"""Python client for a running scopegate gateway (sync and async, over httpx).

The token is supplied by a callable so it can be refreshed before it expires.
Errors come back as the same exception classes the gateway raises. Only idempotent
reads (and retrieval, which writes nothing but its audit record) are retried, and
only on connection errors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from gateway import errors

TokenSource = Callable[[], str] | str

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
        errors.AuthorizationUnavailable,
        errors.SourceUnavailable,
        errors.AuditUnavailable,
    )
}


@dataclass(frozen=True, slots=True)
class Chunk:
    chunk_id: str
    document_id: str
    source: str
    text: str
    score: float
    tokens: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Retrieval:
    request_id: str
    chunks: list[Chunk]


def _token(source: TokenSource) -> str:
    return source() if callable(source) else source


def raise_for_error(response: httpx.Response) -> None:
    """Map an error response to the gateway's exception class."""
    if response.status_code < 400:
        return
    try:
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "internal_error", response.text[:200]
    cls = _ERRORS.get(code, errors.ScopegateError)
    exc = cls(message)
    if cls is errors.ScopegateError:
        exc.status = response.status_code
    raise exc


def _retrieval(data: Mapping[str, Any]) -> Retrieval:
    return Retrieval(str(data["request_id"]), [Chunk(**c) for c in data["chunks"]])


def _retrieve_body(
    query: str, k: int, sources: Sequence[str] | None, max_tokens: int | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"query": query, "k": k}
    if sources is not None:
        body["sources"] = list(sources)
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


class AsyncScopegateClient:
    """Async client. ``token`` is a string or a zero-argument callable returning one."""

    def __init__(
        self,
        url: str,
        token: TokenSource,
        *,
        timeout_s: float = 30.0,
        retries: int = 2,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._token = token
        self._retries = retries
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"), timeout=timeout_s, transport=transport
        )

    async def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        retry: bool = False,
    ) -> Any:
        attempts = self._retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                response = await self._http.request(
                    method,
                    path,
                    json=json,
                    params=params,
                    headers={"authorization": f"Bearer {_token(self._token)}"},
                )
                break
            except httpx.TransportError as exc:
                if attempt == attempts - 1:
                    raise errors.Unavailable(f"gateway unreachable: {exc}") from exc
        raise_for_error(response)
        return response.json() if response.content else None

    async def retrieve(
        self,
        query: str,
        k: int = 5,
        sources: Sequence[str] | None = None,
        max_tokens: int | None = None,
    ) -> Retrieval:
        data = await self.request(
            "POST", "/v1/retrieve", _retrieve_body(query, k, sources, max_tokens), retry=True
        )
        return _retrieval(data)

    async def list_sources(self) -> list[dict[str, Any]]:
        data = await self.request("GET", "/v1/sources", retry=True)
        return list(data["sources"])

    async def aclose(self) -> None:
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
        token: TokenSource,
        *,
        timeout_s: float = 30.0,
        retries: int = 2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._token = token
        self._retries = retries
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s, transport=transport)

    def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        retry: bool = False,
    ) -> Any:
        attempts = self._retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                response = self._http.request(
                    method,
                    path,
                    json=json,
                    params=params,
                    headers={"authorization": f"Bearer {_token(self._token)}"},
                )
                break
            except httpx.TransportError as exc:
                if attempt == attempts - 1:
                    raise errors.Unavailable(f"gateway unreachable: {exc}") from exc
        raise_for_error(response)
        return response.json() if response.content else None

    def retrieve(
        self,
        query: str,
        k: int = 5,
        sources: Sequence[str] | None = None,
        max_tokens: int | None = None,
    ) -> Retrieval:
        data = self.request(
            "POST", "/v1/retrieve", _retrieve_body(query, k, sources, max_tokens), retry=True
        )
        return _retrieval(data)

    def list_sources(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/sources", retry=True)["sources"])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ScopegateClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

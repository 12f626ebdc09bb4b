"""Delegation tokens obtained by OAuth 2.0 Token Exchange (RFC 8693), as a token source.

An agent holds two tokens of its identity provider: the user's OIDC token (ID or
access token) and its own (a client-credentials token). :class:`TokenExchange` trades
them at the gateway's ``POST /v1/token`` for a short-lived delegation token and hands
that out until shortly before it expires, then exchanges again: refresh is a new
exchange, and nothing long-lived reaches the agent's code. It is a zero-argument
callable, so it goes wherever a token does::

    exchange = TokenExchange(
        "http://127.0.0.1:8080",
        subject_token=lambda: session.id_token,
        actor_token=lambda: agent_credentials.access_token(),
        task="t3f9c2a7d41b0e5f6",  # or scope=["source:docs"] for a new task
    )
    ScopegateClient("http://127.0.0.1:8080", exchange).retrieve("...")
    ScopegateRetriever(url="http://127.0.0.1:8080", token=exchange)

The exchange is a blocking HTTP call made at most once per token lifetime (async
clients call it from their loop: it is short, and rare). A refused exchange raises the
gateway's error (:mod:`scopegate_client.errors`): ``Forbidden`` once the user or the
agent is deprovisioned or the task revoked, ``IdentityStale`` while the tenant's
directory is stale, ``InvalidToken`` for a token the gateway cannot verify.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import httpx

from scopegate_client import errors
from scopegate_client.client import TokenSource, error_from_response

__all__ = ["ACCESS_TOKEN", "GRANT_TYPE", "ID_TOKEN", "JWT", "TokenExchange"]

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
JWT = "urn:ietf:params:oauth:token-type:jwt"


def _value(source: TokenSource) -> str:
    return source() if callable(source) else source


class TokenExchange:
    """A token source performing the exchange; thread-safe, one cached token."""

    def __init__(
        self,
        url: str,
        *,
        subject_token: TokenSource,
        actor_token: TokenSource,
        task: str | None = None,
        scope: Sequence[str] | None = None,
        subject_token_type: str = ID_TOKEN,
        actor_token_type: str = JWT,
        refresh_margin_s: float = 30.0,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (task is None) == (not scope):
            raise ValueError("give either task (an existing task) or scope (a new task)")
        self._url = url.rstrip("/")
        self._subject = subject_token
        self._actor = actor_token
        self._task = task
        self._scope = list(scope or [])
        self._subject_type = subject_token_type
        self._actor_type = actor_token_type
        self._margin = refresh_margin_s
        self._clock = clock
        self._http = httpx.Client(timeout=timeout_s, transport=transport)
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0

    @property
    def task(self) -> str | None:
        """The task the tokens are for (after a first exchange with ``scope``, the new task)."""
        return self._task

    def __call__(self) -> str:
        """The current delegation token, exchanging for a new one when it runs out."""
        with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                self._exchange()
            assert self._token is not None
            return self._token

    def refresh(self) -> str:
        """Exchange now, whatever the cached token's lifetime."""
        with self._lock:
            self._exchange()
            assert self._token is not None
            return self._token

    def _exchange(self) -> None:
        form = {
            "grant_type": GRANT_TYPE,
            "subject_token": _value(self._subject),
            "subject_token_type": self._subject_type,
            "actor_token": _value(self._actor),
            "actor_token_type": self._actor_type,
            "requested_token_type": ACCESS_TOKEN,
        }
        if self._task is not None:
            form["task"] = self._task
        else:
            form["scope"] = " ".join(self._scope)
        started = self._clock()
        try:
            response = self._http.post(f"{self._url}/v1/token", data=form)
        except httpx.TransportError as exc:
            raise errors.Unavailable(f"gateway unreachable: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            self._token = None
            raise error_from_response(response)
        data = response.json()
        lifetime = float(data["expires_in"])
        self._token = str(data["access_token"])
        # A task created for a scope is reused by every later exchange (one task, not
        # one per refresh).
        self._task = str(data.get("task") or self._task)
        self._refresh_at = started + lifetime - min(self._margin, lifetime / 2)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TokenExchange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Delegation tokens: minting (embedded default) and verification (RFC 8725).

Verification never lets the token choose how it is verified: algorithms come from
settings, the key from a configured ``kid``, and headers that point elsewhere for a
key (``jku``, ``x5u``, ``jwk``, ``x5c``) are refused. The verified claims become an
immutable context that every later step receives; nothing in a request body can
change who is asking.

Keys of production issuers may come from a configured JWKS URL (:class:`JwksKeys`):
async callers verify with ``averify_*``, which fetch it without blocking the event
loop; a JWKS that cannot be fetched or read is ``authorization_unavailable`` (503),
the issuer's failure rather than the token's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.types import Options

from gateway.errors import AuthorizationUnavailable, InvalidToken
from gateway.ids import validate_id

ACCESS_TOKEN_TYPE = "at+jwt"  # the JWT typ header of access tokens (RFC 9068)
_FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c")
_REQUIRED_CLAIMS = ["iss", "aud", "exp", "iat", "jti", "sub"]
MAX_KID_LENGTH = 256
JWKS_MAX_BYTES = 1_000_000


@dataclass(frozen=True, slots=True)
class PrincipalContext:
    """A verified admin/reviewer caller: a user of a tenant, rights from OpenFGA."""

    tenant: str
    user: str
    token_id: str
    # Platform operators (tokens minted with ``scope: operator``) may bootstrap tenants.
    operator: bool = False


@dataclass(frozen=True, slots=True)
class DelegationContext:
    """A verified agent call: user ``user`` delegated task ``task`` to ``agent``."""

    tenant: str
    user: str
    agent: str
    task: str
    token_id: str
    expires_at: int


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private_pem: bytes
    public_pem: bytes


def _thumbprint(public_pem: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(public_pem).digest()[:12]).decode().rstrip("=")


def load_or_create_signing_key(data_dir: Path) -> SigningKey:
    """The embedded default's Ed25519 key, created on first use (mode 0600)."""
    path = data_dir / "keys" / "ed25519.pem"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_suffix(".tmp")
        # Created 0600 from the first byte: writing first and chmod-ing after would
        # leave the private key readable by others for a moment (umask 022 -> 0644).
        # O_EXCL: never reuse a stale .tmp (and its mode) or follow a planted symlink.
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        tmp.replace(path)
    private_pem = path.read_bytes()
    private = serialization.load_pem_private_key(private_pem, password=None)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return SigningKey(_thumbprint(public_pem), private_pem, public_pem)


def parse_ttl(text: str) -> int:
    """``90s``, ``15m``, ``2h`` (or plain seconds) to seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip()
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    if not number.isdigit() or int(number) <= 0:
        raise ValueError(f"ttl {text!r} must look like 90s, 15m or 2h")
    return int(number) * scale


def issue_token(
    key: SigningKey,
    *,
    issuer: str,
    audience: str,
    tenant: str,
    user: str,
    agent: str | None = None,
    task: str | None = None,
    ttl_s: int = 900,
    now: int | None = None,
    operator: bool = False,
) -> str:
    """Mint a delegation token (agent and task) or a principal token (neither)."""
    if (agent is None) != (task is None):
        raise ValueError("a delegation token needs both agent and task")
    if operator and agent is not None:
        raise ValueError("an operator token cannot be a delegation token")
    issued = int(time.time()) if now is None else now
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl_s,
        "jti": uuid.uuid4().hex,
        "sub": validate_id(user, "user"),
        "tenant": validate_id(tenant, "tenant"),
    }
    if agent is not None and task is not None:
        claims["act"] = {"sub": validate_id(agent, "agent")}
        claims["task"] = validate_id(task, "task")
    if operator:
        claims["scope"] = "operator"
    headers = {"kid": key.kid, "typ": ACCESS_TOKEN_TYPE}
    return jwt.encode(claims, key.private_pem, algorithm="EdDSA", headers=headers)


class JwksKeys:
    """Signing keys published at a configured JWKS URL (never at a URL from a token).

    Keys are kept ``max_age_s``; a ``kid`` not among them refetches at most once per
    ``min_refetch_s``, so tokens with made-up ``kid`` values cannot make the gateway
    hammer the issuer. Concurrent requests of one event loop share one fetch. A fetch
    that fails, or a set that is not JSON, has no ``keys`` list or no usable key, and a
    ``kid`` whose entry does not parse, raise AuthorizationUnavailable; a ``kid`` the
    set does not hold is an InvalidToken.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        max_age_s: float = 300.0,
        min_refetch_s: float = 30.0,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.max_age_s = max_age_s
        self.min_refetch_s = min_refetch_s
        self._keys: dict[str, Any] = {}
        self._broken: frozenset[str] = frozenset()
        self._fetched_at: float | None = None
        self._inflight: asyncio.Task[None] | None = None

    async def get(self, kid: str) -> Any:
        """The key named ``kid``, fetching the set first when needed (non-blocking)."""
        if self._stale(kid):
            await self._refresh()
        return self._lookup(kid)

    def get_blocking(self, kid: str) -> Any:
        """:meth:`get` for callers outside an event loop (the fetch blocks the thread)."""
        if self._stale(kid):
            try:
                with httpx.Client(timeout=self.timeout_s) as client:
                    response = client.get(self.url, headers={"accept": "application/json"})
            except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
                raise _jwks_unavailable("could not be fetched", exc) from exc
            self._store(response)
        return self._lookup(kid)

    def _stale(self, kid: str) -> bool:
        if self._fetched_at is None:
            return True
        age = time.monotonic() - self._fetched_at
        if age >= self.max_age_s:
            return True
        # A kid not (or not usably) published may have been added or fixed since.
        return kid not in self._keys and age >= self.min_refetch_s

    async def _refresh(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._inflight
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._inflight = loop.create_task(self._fetch())
            task.add_done_callback(_consume_result)
        # Shielded: one caller giving up does not cancel the fetch the others wait for.
        await asyncio.shield(task)

    async def _fetch(self) -> None:
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                response = await client.get(self.url, headers={"accept": "application/json"})
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            raise _jwks_unavailable("could not be fetched", exc) from exc
        self._store(response)

    def _store(self, response: httpx.Response) -> None:
        if response.status_code != 200:
            raise _jwks_unavailable("could not be fetched", f"HTTP {response.status_code}")
        if len(response.content) > JWKS_MAX_BYTES:
            raise _jwks_unavailable("is too large", f"{len(response.content)} bytes")
        self._keys, self._broken = parse_jwks(response.content)
        self._fetched_at = time.monotonic()

    def _lookup(self, kid: str) -> Any:
        if kid in self._keys:
            return self._keys[kid]
        if kid in self._broken:
            raise _jwks_unavailable("holds an entry for this key that does not parse", kid)
        raise InvalidToken("unknown signing key")


def parse_jwks(body: bytes) -> tuple[dict[str, Any], frozenset[str]]:
    """Signature keys of a JWKS document by ``kid``, and the ``kid``s that did not parse.

    Entries for encryption (``use`` other than ``sig``) and symmetric keys (``oct``:
    never a verification key here) are left out; a set without any usable key is
    unavailable, not empty.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _jwks_unavailable("is not JSON", exc) from exc
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise _jwks_unavailable("has no 'keys' list", type(entries).__name__)
    keys: dict[str, Any] = {}
    broken: set[str] = set()
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") == "oct":
            continue
        try:
            keys[kid] = jwt.PyJWK(entry).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError, AttributeError):
            broken.add(kid)
    if not keys:
        raise _jwks_unavailable("holds no usable signing key", f"{len(entries)} entries")
    return keys, frozenset(broken - keys.keys())


def _jwks_unavailable(what: str, detail: object) -> AuthorizationUnavailable:
    text = f"{type(detail).__name__}: {detail}" if isinstance(detail, Exception) else str(detail)
    return AuthorizationUnavailable(f"the token issuer's JWKS {what}", detail=text[:300])


def _consume_result(task: asyncio.Task[None]) -> None:
    """Mark a shared fetch's failure as seen even when every waiter has given up."""
    if not task.cancelled():
        task.exception()


class TokenVerifier:
    """Verifies tokens against configured keys, algorithms, issuer and audience.

    ``verify_*`` are for callers outside an event loop; async code calls ``averify_*``,
    which never block the loop (a JWKS fetch is awaited).
    """

    def __init__(
        self,
        public_keys: Mapping[str, bytes],
        *,
        issuer: str,
        audience: str,
        algorithms: list[str],
        leeway_s: int = 5,
        jwks_url: str | None = None,
    ) -> None:
        if not algorithms or any(a.lower() == "none" or a.startswith("HS") for a in algorithms):
            raise ValueError("only asymmetric algorithms may be configured")
        if leeway_s > 5:
            raise ValueError("clock-skew leeway is at most 5 seconds")
        self._keys = dict(public_keys)
        self._issuer = issuer
        self._audience = audience
        self._algorithms = list(algorithms)
        self._leeway = leeway_s
        # Keys from a configured JWKS URL (production issuers); never from the token.
        self._jwks = JwksKeys(jwks_url) if jwks_url else None

    def _local_key(self, kid: object) -> Any:
        """The configured key named ``kid``; None when only the JWKS may hold it."""
        if isinstance(kid, str) and kid in self._keys:
            return self._keys[kid]
        if isinstance(kid, str) and self._jwks is not None and len(kid) <= MAX_KID_LENGTH:
            return None
        raise InvalidToken("unknown signing key")

    def _claims(self, token: str) -> dict[str, Any]:
        kid = self._header(token).get("kid")
        key = self._local_key(kid)
        if key is None and self._jwks is not None:
            key = self._jwks.get_blocking(str(kid))
        return self._decode(token, key)

    async def _aclaims(self, token: str) -> dict[str, Any]:
        kid = self._header(token).get("kid")
        key = self._local_key(kid)
        if key is None and self._jwks is not None:
            key = await self._jwks.get(str(kid))
        return self._decode(token, key)

    def _header(self, token: str) -> dict[str, Any]:
        if not isinstance(token, str) or not token or len(token) > 8192:
            raise InvalidToken("missing or oversized bearer token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken("malformed token") from exc
        if any(name in header for name in _FORBIDDEN_HEADERS):
            raise InvalidToken("token headers may not reference keys")
        if header.get("alg") not in self._algorithms:
            raise InvalidToken("token algorithm is not accepted")
        if header.get("typ") != ACCESS_TOKEN_TYPE:
            raise InvalidToken("not an access token")
        return header

    def _decode(self, token: str, key: Any) -> dict[str, Any]:
        options: Options = {"require": _REQUIRED_CLAIMS, "verify_signature": True}
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=options,
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"token rejected: {type(exc).__name__}") from exc
        return claims

    def verify_principal(self, token: str) -> PrincipalContext:
        """An admin or reviewer token: ``sub`` and ``tenant``, no ``act`` or ``task``."""
        return _principal(self._claims(token))

    def verify_delegation(self, token: str) -> DelegationContext:
        """An agent token: ``sub``, ``act.sub``, ``tenant`` and ``task`` all present."""
        return _delegation(self._claims(token))

    async def averify_principal(self, token: str) -> PrincipalContext:
        """:meth:`verify_principal` without blocking the event loop."""
        return _principal(await self._aclaims(token))

    async def averify_delegation(self, token: str) -> DelegationContext:
        """:meth:`verify_delegation` without blocking the event loop."""
        return _delegation(await self._aclaims(token))


def _principal(claims: Mapping[str, Any]) -> PrincipalContext:
    if "act" in claims or "task" in claims:
        raise InvalidToken("a delegation token cannot be used for this call")
    return PrincipalContext(
        tenant=_claim_id(claims, "tenant"),
        user=_claim_id(claims, "sub"),
        token_id=str(claims["jti"]),
        operator=claims.get("scope") == "operator",
    )


def _delegation(claims: Mapping[str, Any]) -> DelegationContext:
    act = claims.get("act")
    if not isinstance(act, dict):
        raise InvalidToken("token has no act claim naming the agent")
    return DelegationContext(
        tenant=_claim_id(claims, "tenant"),
        user=_claim_id(claims, "sub"),
        agent=_claim_id(act, "sub"),
        task=_claim_id(claims, "task"),
        token_id=str(claims["jti"]),
        expires_at=int(claims["exp"]),
    )


def _claim_id(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    try:
        return validate_id(value, name)
    except Exception as exc:
        raise InvalidToken(f"claim {name!r} is missing or not a valid id") from exc

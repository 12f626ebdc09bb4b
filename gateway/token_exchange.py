"""OAuth 2.0 Token Exchange (RFC 8693) at ``POST /v1/token``: what needs no gateway state.

An agent trades two tokens from a configured identity provider for a short-lived
delegation token signed by the gateway (DESIGN section 3):

- ``subject_token``: the user's OIDC ID or access token;
- ``actor_token``: a token the agent got for itself (a client-credentials grant at the
  same provider, or any token of a configured issuer whose ``sub`` is the agent);
- ``task`` (a task bound to that user and agent) or ``scope`` (space-separated
  ``source:..``/``folder:..``/``document:..``: a new task for that scope).

This module parses the request and verifies both tokens against their issuer's JWKS
(RFC 8725: algorithms from configuration only, ``jku``/``x5u``/``jwk``/``x5c`` refused,
``iss``, ``aud``, ``exp``, ``nbf`` and ``iat`` enforced, unknown ``kid`` refused). Whether
the task is bound to that user and agent and both are active members is the gateway's
question (:meth:`gateway.service.Gateway.exchange_token`): a valid signature never
outweighs the lifecycle.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.types import Options

from gateway.errors import ConfigurationError, InvalidRequest, InvalidToken
from gateway.identity import MAX_KID_LENGTH, JwksKeys, SigningKey
from gateway.ids import validate_id
from gateway.settings import OidcIssuer, Settings

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
JWT = "urn:ietf:params:oauth:token-type:jwt"
SUBJECT_TOKEN_TYPES = frozenset({ACCESS_TOKEN, ID_TOKEN, JWT})
ACTOR_TOKEN_TYPES = frozenset({ACCESS_TOKEN, JWT})
MAX_TOKEN = 8192
MAX_SCOPE_ITEMS = 200
_FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c")
_REQUIRED = ["iss", "aud", "exp", "iat", "sub"]
_KNOWN_FIELDS = frozenset(
    {
        "grant_type",
        "subject_token",
        "subject_token_type",
        "actor_token",
        "actor_token_type",
        "requested_token_type",
        "audience",
        "resource",
        "task",
        "scope",
    }
)


@dataclass(frozen=True, slots=True)
class ExchangeRequest:
    """A token exchange request, checked for shape (nothing verified yet)."""

    subject_token: str
    subject_token_type: str
    actor_token: str
    actor_token_type: str
    task: str | None
    scope: tuple[str, ...]


def parse_exchange(fields: Sequence[tuple[str, str]], audience: str) -> ExchangeRequest:
    """The request from its form fields (``application/x-www-form-urlencoded``).

    Each parameter at most once (RFC 6749 section 3.2); ``audience``, when given, must
    be this gateway's; ``resource`` is not supported; exactly one of ``task`` and
    ``scope``.
    """
    values: dict[str, str] = {}
    for name, value in fields:
        if name in values:
            raise InvalidRequest(f"parameter {name[:40]!r} given more than once")
        if name not in _KNOWN_FIELDS:
            continue  # RFC 6749 section 3.2: unrecognized parameters are ignored
        values[name] = value
    if values.get("grant_type") != GRANT_TYPE:
        raise InvalidRequest(f"grant_type must be {GRANT_TYPE}")
    for name in ("subject_token", "subject_token_type", "actor_token", "actor_token_type"):
        if not values.get(name):
            raise InvalidRequest(f"{name} is required")
    if values["subject_token_type"] not in SUBJECT_TOKEN_TYPES:
        raise InvalidRequest("subject_token_type must be an ID token, access token or JWT")
    if values["actor_token_type"] not in ACTOR_TOKEN_TYPES:
        raise InvalidRequest("actor_token_type must be an access token or JWT")
    if values.get("requested_token_type", ACCESS_TOKEN) not in {ACCESS_TOKEN, JWT}:
        raise InvalidRequest("only access tokens are issued")
    if "audience" in values and values["audience"] != audience:
        raise InvalidRequest("audience names another service")
    if "resource" in values:
        raise InvalidRequest("resource is not supported: name the task or a scope")
    if values["subject_token"] == values["actor_token"]:
        raise InvalidRequest("the actor token must be the agent's own, not the user's")
    task = values.get("task") or None
    scope = tuple(values.get("scope", "").split())
    if (task is None) == (not scope):
        raise InvalidRequest("give either task (an existing task) or scope (a new task)")
    if task is not None:
        validate_id(task, "task")
    if len(scope) > MAX_SCOPE_ITEMS:
        raise InvalidRequest(f"scope names at most {MAX_SCOPE_ITEMS} objects")
    return ExchangeRequest(
        values["subject_token"],
        values["subject_token_type"],
        values["actor_token"],
        values["actor_token_type"],
        task,
        scope,
    )


@dataclass(frozen=True, slots=True)
class VerifiedUser:
    """A verified user token: ``name`` is the value of the issuer's ``user_claim``."""

    issuer: OidcIssuer
    tenant: str
    name: str
    token_id: str
    expires_at: int


@dataclass(frozen=True, slots=True)
class VerifiedAgent:
    """A verified agent token: ``name`` is the value of the issuer's ``agent_claim``."""

    issuer: OidcIssuer
    tenant: str
    name: str
    token_id: str


class OidcVerifier:
    """Verifies tokens of the configured identity providers against their JWKS."""

    def __init__(self, issuers: Sequence[OidcIssuer], *, leeway_s: int = 5) -> None:
        if leeway_s > 5:
            raise ValueError("clock-skew leeway is at most 5 seconds")
        self._issuers = {i.issuer: i for i in issuers}
        self._keys = {
            i.issuer: JwksKeys(
                i.jwks_url, max_age_s=i.jwks_max_age_s, min_refetch_s=i.jwks_min_refetch_s
            )
            for i in issuers
        }
        self._leeway = leeway_s

    async def verify_user(self, token: str) -> VerifiedUser:
        """The user of a ``subject_token``; never a token an agent got for itself."""
        issuer, claims = await self._claims(token, "subject token")
        name = _string_claim(claims, issuer.user_claim, "subject token")
        agent = claims.get(issuer.agent_claim)
        if issuer.agent_claim != "sub" and isinstance(agent, str) and agent == claims["sub"]:
            raise InvalidToken("the subject token is an agent's own token, not a user's")
        return VerifiedUser(
            issuer, _tenant(issuer, claims), name, _token_id(claims), int(claims["exp"])
        )

    async def verify_agent(self, token: str) -> VerifiedAgent:
        """The agent of an ``actor_token``: its ``sub`` must be the agent itself."""
        issuer, claims = await self._claims(token, "actor token")
        name = _string_claim(claims, issuer.agent_claim, "actor token")
        if name != claims["sub"]:
            # A user's token names the client the user signed in to, with the user as
            # sub: it proves nothing about the agent holding it.
            raise InvalidToken("the actor token is not the agent's own token")
        return VerifiedAgent(issuer, _tenant(issuer, claims), name, _token_id(claims))

    async def _claims(self, token: str, what: str) -> tuple[OidcIssuer, dict[str, Any]]:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
            raise InvalidToken(f"missing or oversized {what}")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"malformed {what}") from exc
        claimed = unverified.get("iss") if isinstance(unverified, dict) else None
        issuer = self._issuers.get(claimed) if isinstance(claimed, str) else None
        if issuer is None:
            raise InvalidToken(f"the {what} comes from an issuer that is not trusted")
        if any(name in header for name in _FORBIDDEN_HEADERS):
            raise InvalidToken(f"{what} headers may not reference keys")
        if header.get("alg") not in issuer.algorithms:
            raise InvalidToken(f"{what} algorithm is not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_LENGTH:
            raise InvalidToken(f"{what} names no signing key")
        key = await self._keys[issuer.issuer].get(kid)
        options: Options = {"require": _REQUIRED, "verify_signature": True}
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=issuer.algorithms,
                audience=issuer.audience,
                issuer=issuer.issuer,
                leeway=self._leeway,
                options=options,
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"{what} rejected: {type(exc).__name__}") from exc
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise InvalidToken(f"{what} has no subject")
        return issuer, claims


def _string_claim(claims: Mapping[str, Any], name: str, what: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise InvalidToken(f"{what} has no {name!r} claim")
    return value


def _tenant(issuer: OidcIssuer, claims: Mapping[str, Any]) -> str:
    if issuer.tenant is not None:
        return issuer.tenant
    assert issuer.tenant_claim is not None
    value = claims.get(issuer.tenant_claim)
    try:
        return validate_id(value, "tenant")
    except InvalidRequest as exc:
        raise InvalidToken(f"claim {issuer.tenant_claim!r} is missing or not a tenant") from exc


def _token_id(claims: Mapping[str, Any]) -> str:
    for name in ("jti", "uti"):
        if isinstance(claims.get(name), str):
            return str(claims[name])[:128]
    return f"{claims['iss']}#{claims['sub']}#{claims['iat']}"[:256]


def remaining_s(expires_at: int, now: float | None = None) -> int:
    """Whole seconds a token expiring at ``expires_at`` has left."""
    return int(expires_at - (time.time() if now is None else now))


def exchange_signing_key(settings: Settings, development_key: SigningKey | None) -> SigningKey:
    """The key that signs exchanged delegation tokens.

    ``SCOPEGATE_EXCHANGE_SIGNING_KEY_FILE`` (an Ed25519 private key, PEM) whose public key
    is one of ``SCOPEGATE_TRUSTED_ISSUERS_PEM`` (its ``kid`` is that entry's name); in
    development without it, the data directory's key.
    """
    path = settings.exchange_signing_key_file
    if path is None:
        if development_key is None:
            raise ConfigurationError(
                "token exchange needs SCOPEGATE_EXCHANGE_SIGNING_KEY_FILE in production"
            )
        return development_key
    private_pem = path.read_bytes()
    private = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigurationError("SCOPEGATE_EXCHANGE_SIGNING_KEY_FILE must hold an Ed25519 key")
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    for kid, pem in settings.trusted_issuers_pem.items():
        try:
            trusted = serialization.load_pem_public_key(pem.encode())
        except ValueError:
            continue
        if isinstance(trusted, Ed25519PublicKey) and raw == trusted.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        ):
            public_pem = trusted.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            return SigningKey(kid, private_pem, public_pem)
    raise ConfigurationError(
        "the public key of SCOPEGATE_EXCHANGE_SIGNING_KEY_FILE must be in "
        "SCOPEGATE_TRUSTED_ISSUERS_PEM, or the gateway would refuse the tokens it issues"
    )

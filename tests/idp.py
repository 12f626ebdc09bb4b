"""A small OpenID Connect issuer on loopback: the identity provider of the identity tests.

It signs JWTs with RSA keys (RS256) and publishes the public keys at a JWKS endpoint
(with the discovery document pointing at it), as a real provider does; a test rotates
keys (the new one signs, the old one stays published until revoked) and revokes them
(gone from the JWKS) while the gateway runs. User tokens carry the user in ``sub`` and
``preferred_username``; agent tokens are client-credentials tokens (``sub`` and
``client_id`` are the agent). Every token carries a ``tenant`` claim.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

AUDIENCE = "scopegate"


class Issuer:
    """An OIDC issuer served on 127.0.0.1 (a free port) until :meth:`close`."""

    def __init__(self) -> None:
        self._keys: dict[str, rsa.RSAPrivateKey] = {}
        self._published: list[str] = []
        self.current = ""
        self.fetches = 0
        self.rotate()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body: dict[str, Any] = {
                        "issuer": issuer.url,
                        "jwks_uri": issuer.jwks_url,
                        "id_token_signing_alg_values_supported": ["RS256"],
                    }
                elif self.path == "/jwks":
                    issuer.fetches += 1
                    body = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/jwks"

    def config(self, **overrides: Any) -> dict[str, Any]:
        """This issuer as an entry of ``SCOPEGATE_OIDC_ISSUERS``."""
        return {
            "issuer": self.url,
            "jwks_url": self.jwks_url,
            "audience": AUDIENCE,
            "user_claim": "preferred_username",
            "user_match": "userName",
            "agent_claim": "client_id",
            # Keys are refetched on every use, so a revocation shows at once.
            "jwks_max_age_s": 0,
            "jwks_min_refetch_s": 0,
            **overrides,
        }

    def rotate(self) -> str:
        """A new signing key (published at once); the previous ones stay published."""
        kid = f"k-{uuid.uuid4().hex[:10]}"
        self._keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._published.append(kid)
        self.current = kid
        return kid

    def revoke(self, kid: str) -> None:
        """Withdraw a key from the JWKS (tokens it signed must no longer verify)."""
        self._published.remove(kid)

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid in self._published:
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._keys[kid].public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return {"keys": keys}

    def sign(self, claims: dict[str, Any], *, kid: str | None = None) -> str:
        kid = kid or self.current
        return jwt.encode(claims, self._keys[kid], algorithm="RS256", headers={"kid": kid})

    def _claims(self, subject: str, tenant: str, audience: str, ttl_s: int) -> dict[str, Any]:
        now = int(time.time())
        return {
            "iss": self.url,
            "sub": subject,
            "aud": audience,
            "iat": now if ttl_s > 0 else now + ttl_s - 60,
            "exp": now + ttl_s,
            "jti": uuid.uuid4().hex,
            "tenant": tenant,
        }

    def user_token(
        self,
        user: str,
        *,
        tenant: str = "acme",
        audience: str = AUDIENCE,
        ttl_s: int = 600,
        kid: str | None = None,
        **extra: Any,
    ) -> str:
        """The user's ID token (``ttl_s`` below zero: one that expired that long ago)."""
        claims = self._claims(user, tenant, audience, ttl_s)
        claims.update(preferred_username=user, email=user, **extra)
        return self.sign(claims, kid=kid)

    def agent_token(
        self,
        agent: str,
        *,
        tenant: str = "acme",
        audience: str = AUDIENCE,
        ttl_s: int = 600,
        kid: str | None = None,
    ) -> str:
        """The agent's own token (client credentials: ``sub`` is the client)."""
        claims = self._claims(agent, tenant, audience, ttl_s)
        claims["client_id"] = agent
        return self.sign(claims, kid=kid)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

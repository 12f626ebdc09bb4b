"""Every error scopegate raises, and the HTTP status and code each maps to.

This is part of the wire contract: the gateway raises these classes and answers with
their ``code``; the client raises the same classes for the codes it receives, so an
agent catches exactly what the gateway raised.

Exception tree::

    ScopegateError
    ├── InvalidToken                  401 invalid_token
    ├── Forbidden                     403 forbidden
    ├── NotFound                      404 not_found
    ├── InvalidRequest                422 invalid_request
    │   └── InvalidIdentifier
    ├── PayloadTooLarge               413 payload_too_large
    ├── RateLimited                   429 rate_limited
    ├── Conflict                      409 conflict
    └── Unavailable                   503
        ├── AuthorizationUnavailable      authorization_unavailable
        ├── SourceUnavailable             source_unavailable
        ├── AuditUnavailable              audit_unavailable
        └── IdentityStale                 identity_stale

A denial is a result, never an exception: these errors mean the gateway could not
decide, and every one of them makes the request return no content.

``message`` is what callers see (the HTTP error body); ``detail`` is what an upstream
said (OpenFGA's per-item errors, a driver's text), which may name objects or hosts: it
goes to the audit record and logs, never into a response.
"""

from __future__ import annotations

__all__ = [
    "AuditUnavailable",
    "AuthorizationUnavailable",
    "Conflict",
    "Forbidden",
    "IdentityStale",
    "InvalidIdentifier",
    "InvalidRequest",
    "InvalidToken",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "ScopegateError",
    "SourceUnavailable",
    "Unavailable",
]


class ScopegateError(Exception):
    status: int = 500
    code: str = "internal_error"
    # Set on errors received from a gateway over HTTP: the id of the failed request.
    request_id: str | None = None

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class InvalidToken(ScopegateError):
    status = 401
    code = "invalid_token"


class Forbidden(ScopegateError):
    status = 403
    code = "forbidden"


class NotFound(ScopegateError):
    status = 404
    code = "not_found"


class InvalidRequest(ScopegateError):
    status = 422
    code = "invalid_request"


class InvalidIdentifier(InvalidRequest):
    pass


class PayloadTooLarge(ScopegateError):
    status = 413
    code = "payload_too_large"


class RateLimited(ScopegateError):
    status = 429
    code = "rate_limited"

    def __init__(
        self, message: str, detail: str | None = None, *, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message, detail)
        # Whole seconds after which a retry may pass: the ``Retry-After`` header.
        self.retry_after_s = retry_after_s


class Conflict(ScopegateError):
    status = 409
    code = "conflict"


class Unavailable(ScopegateError):
    status = 503
    code = "unavailable"


class AuthorizationUnavailable(Unavailable):
    code = "authorization_unavailable"


class SourceUnavailable(Unavailable):
    code = "source_unavailable"


class AuditUnavailable(Unavailable):
    code = "audit_unavailable"


class IdentityStale(Unavailable):
    """The tenant's directory (SCIM) has been silent past its freshness bound: its
    lifecycle data cannot be trusted, so the tenant fails closed until it speaks again."""

    code = "identity_stale"

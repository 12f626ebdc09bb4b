"""All configuration in one place, built by :func:`load_settings`, never at import."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.errors import ConfigurationError

DEFAULT_DATA_DIR = Path(".scopegate")


class OidcIssuer(BaseModel):
    """An identity provider whose tokens ``POST /v1/token`` accepts (docs/identity.md).

    Its user tokens (the ``subject_token``) name the user in ``user_claim``, matched to
    a scopegate user as ``user_match`` says: ``userName`` or ``externalId`` of a User
    the tenant's directory provisioned over SCIM, or ``id`` (the claim is the user id,
    mapped like a SCIM ``userName``). Its agent tokens (the ``actor_token``, e.g. from a
    client-credentials grant) name the agent in ``agent_claim``. The tenant comes from
    ``tenant_claim``, or is ``tenant`` for every token of this issuer.
    """

    model_config = ConfigDict(extra="forbid")

    issuer: str = Field(min_length=1)
    jwks_url: str = Field(min_length=1)
    audience: str = Field(min_length=1)
    algorithms: list[str] = ["RS256"]
    tenant_claim: str | None = "tenant"
    tenant: str | None = None
    user_claim: str = "sub"
    user_match: Literal["userName", "externalId", "id"] = "userName"
    agent_claim: str = "client_id"
    # How long fetched keys are trusted: a key the issuer withdrew (revoked) is still
    # accepted until then. An unknown kid refetches at most once per min_refetch_s.
    jwks_max_age_s: float = Field(default=300.0, ge=0)
    jwks_min_refetch_s: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _checked(self) -> OidcIssuer:
        if any(a.lower() == "none" or a.upper().startswith("HS") for a in self.algorithms):
            raise ValueError("only asymmetric algorithms may be configured for an issuer")
        if not self.algorithms:
            raise ValueError("an issuer needs at least one algorithm")
        if (self.tenant is None) == (self.tenant_claim is None):
            raise ValueError("an issuer names its tenant by tenant_claim or tenant (one of them)")
        return self


class Settings(BaseSettings):
    """Environment variables use the ``SCOPEGATE_`` prefix (``SCOPEGATE_OPENFGA_URL``)."""

    model_config = SettingsConfigDict(env_prefix="SCOPEGATE_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = DEFAULT_DATA_DIR

    # OpenFGA: unset URL means "start and manage one on SQLite in data_dir".
    openfga_url: str | None = None
    openfga_store_id: str | None = None
    openfga_store_name: str = "scopegate"
    openfga_model_id: str | None = None
    openfga_api_token: str | None = None
    openfga_binary: str | None = None
    openfga_timeout_s: float = Field(default=2.0, gt=0)
    openfga_max_parallel_batches: int = Field(default=4, ge=1, le=32)
    openfga_consistency: Literal["HIGHER_CONSISTENCY", "MINIMIZE_LATENCY"] = "HIGHER_CONSISTENCY"
    # OpenFGA's check query cache, used only when the change log shows it cannot hold a
    # stale answer (docs/cache.md). The managed server runs it with this TTL (unset:
    # 10 s; 0: off). An external server's cache is used only when its TTL is declared
    # here (never more than the server's) with the server's --request-timeout.
    openfga_check_cache_ttl_s: float | None = Field(default=None, ge=0)
    openfga_request_timeout_s: float = Field(default=5.0, gt=0)

    # Identity.
    token_issuer: str = "scopegate"
    token_audience: str = "scopegate"
    token_algorithms: list[str] = ["EdDSA"]
    token_leeway_s: int = Field(default=5, ge=0, le=5)
    trusted_issuers_pem: dict[str, str] = {}
    jwks_url: str | None = None

    # Token exchange (POST /v1/token, RFC 8693): the identity providers it trusts, how
    # long the delegation tokens it issues live (never past the user's own token), how
    # long a task it creates for a requested scope lives, and, in production, the
    # Ed25519 private key (PEM file) that signs them: its public key must be one of
    # trusted_issuers_pem, so that the gateway accepts what it issues.
    oidc_issuers: list[OidcIssuer] = []
    exchange_token_ttl_s: int = Field(default=300, ge=1, le=3600)
    exchange_task_ttl_s: int = Field(default=8 * 3600, ge=60)
    exchange_signing_key_file: Path | None = None

    # Vector store: a Chroma server for sources registered without their own "url"
    # (unset: embedded Chroma in data_dir), and the headers sent to it (a token, as
    # {"Authorization": "Bearer ..."} or {"X-Chroma-Token": "..."}).
    chroma_url: str | None = None
    chroma_headers: dict[str, str] = {}

    # Retrieval.
    overfetch: int = Field(default=4, ge=1, le=50)
    max_candidates: int = Field(default=2000, ge=10)
    request_timeout_s: float = Field(default=10.0, gt=0)
    strategy: Literal["postfilter", "prefilter", "adaptive"] = "adaptive"
    listobjects_max_results: int = Field(default=1000, ge=1)
    # The largest permitted superset (documents) the pre-filter ranks exactly. Streamed
    # ListObjects has no server-side cap; a longer answer is abandoned and the request
    # post-filters instead.
    prefilter_max_documents: int = Field(default=5000, ge=1)
    # A task too wide for the pre-filter: the largest ListObjects answer (documents)
    # fetched off the request path so that its post-filter denies candidates outside it
    # without a check (retrieval.LISTED_MIN_DENIAL; 0 turns it off).
    listed_max_documents: int = Field(default=50_000, ge=0)
    # Chunk vectors each Chroma store keeps for ranking permitted documents exactly,
    # reused while a document's content version is unchanged (0 turns it off).
    vector_cache_mb: int = Field(default=256, ge=0)

    # Decision cache. Exact (on by default): read only after a per-request ReadChanges
    # probe shows nothing changed, so no request sees a change later than OpenFGA would.
    # Bounded (off by default; see gateway/cache.py for the staleness bound): replaces
    # the exact cache, reads without a probe.
    # Archive OpenFGA's change log into the audit database for replays as of the
    # decision (gateway/changelog.py): a background task off the retrieval path; its
    # failures never affect readiness or retrieval.
    changelog_archive: bool = True
    decision_cache_exact: bool = True
    decision_cache: bool = False
    decision_cache_bucket_s: float = Field(default=10.0, gt=0)
    decision_cache_max_staleness_s: float = Field(default=2.0, gt=0)
    decision_cache_poll_s: float = Field(default=0.5, gt=0)

    # Catalog of sources, folders and documents: SQLite in data_dir unless a PostgreSQL
    # DSN is given (shared by every replica of a scaled-out deployment).
    catalog_dsn: str | None = None

    # Audit.
    audit_dsn: str | None = None
    audit_redact_queries: bool = False
    audit_redaction_key: str = "development-only-redaction-key"
    audit_retention_days: int | None = Field(default=None, ge=0)
    audit_retention_interval_s: float = Field(default=3600.0, gt=0)

    # HTTP.
    max_body_bytes: int = Field(default=1_000_000, ge=1024)

    # Rate limits of POST /v1/retrieve (token buckets, per process; see gateway/ratelimit.py).
    # Off unless a rate is set; a burst left unset is one second's worth of the rate.
    rate_limit_agent_per_s: float | None = Field(default=None, gt=0)
    rate_limit_agent_burst: int | None = Field(default=None, ge=1)
    rate_limit_tenant_per_s: float | None = Field(default=None, gt=0)
    rate_limit_tenant_burst: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _bursts_need_rates(self) -> Settings:
        for scope in ("agent", "tenant"):
            if (
                getattr(self, f"rate_limit_{scope}_burst") is not None
                and getattr(self, f"rate_limit_{scope}_per_s") is None
            ):
                raise ValueError(
                    f"SCOPEGATE_RATE_LIMIT_{scope.upper()}_BURST needs "
                    f"SCOPEGATE_RATE_LIMIT_{scope.upper()}_PER_S"
                )
        return self

    def check_production(self) -> None:
        """Refuse development placeholders and embedded parts outside development.

        Every refusal names the setting that fixes it; all of them are reported at once.
        """
        if self.environment != "production":
            return
        problems = production_problems(self)
        if problems:
            raise ConfigurationError(
                "SCOPEGATE_ENVIRONMENT=production refuses this configuration:\n- "
                + "\n- ".join(problems)
            )


def production_problems(settings: Settings) -> list[str]:
    """What a production deployment must set, as one sentence each."""
    problems = []
    if settings.openfga_url is None:
        problems.append(
            "the managed OpenFGA (SQLite in the data directory) is for development: set "
            "SCOPEGATE_OPENFGA_URL to the OpenFGA cluster (and pin SCOPEGATE_OPENFGA_STORE_ID "
            "and SCOPEGATE_OPENFGA_MODEL_ID)"
        )
    if not _is_postgres(settings.audit_dsn):
        problems.append(
            "the SQLite audit log lives in one replica's data directory: set "
            "SCOPEGATE_AUDIT_DSN=postgresql://..."
        )
    if not _is_postgres(settings.catalog_dsn):
        problems.append(
            "the SQLite catalog lives in one replica's data directory: set "
            "SCOPEGATE_CATALOG_DSN=postgresql://..."
        )
    if settings.chroma_url is None:
        problems.append(
            "embedded Chroma lives in one replica's data directory: set SCOPEGATE_CHROMA_URL "
            "to the Chroma server (and SCOPEGATE_CHROMA_HEADERS for its token)"
        )
    if not settings.trusted_issuers_pem and not settings.jwks_url:
        problems.append(
            "tokens would be trusted only from the data directory's development signing key: "
            "set SCOPEGATE_TRUSTED_ISSUERS_PEM or SCOPEGATE_JWKS_URL"
        )
    if settings.oidc_issuers and settings.exchange_signing_key_file is None:
        problems.append(
            "token exchange would sign with the data directory's development key: set "
            "SCOPEGATE_EXCHANGE_SIGNING_KEY_FILE (its public key in SCOPEGATE_TRUSTED_ISSUERS_PEM)"
        )
    if settings.audit_redact_queries and settings.audit_redaction_key.startswith("development"):
        problems.append("query redaction needs its own key: set SCOPEGATE_AUDIT_REDACTION_KEY")
    return problems


def _is_postgres(dsn: str | None) -> bool:
    return dsn is not None and dsn.startswith(("postgresql://", "postgres://"))


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides winning."""
    settings = Settings(**overrides)  # type: ignore[arg-type]
    settings.check_production()
    return settings

"""All configuration in one place, built by :func:`load_settings`, never at import."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path(".scopegate")


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

    # Identity.
    token_issuer: str = "scopegate"
    token_audience: str = "scopegate"
    token_algorithms: list[str] = ["EdDSA"]
    token_leeway_s: int = Field(default=5, ge=0, le=5)
    trusted_issuers_pem: dict[str, str] = {}
    jwks_url: str | None = None

    # Vector store.
    chroma_url: str | None = None

    # Retrieval.
    overfetch: int = Field(default=4, ge=1, le=50)
    max_candidates: int = Field(default=2000, ge=10)
    request_timeout_s: float = Field(default=10.0, gt=0)
    strategy: Literal["postfilter", "prefilter", "adaptive"] = "adaptive"
    listobjects_max_results: int = Field(default=1000, ge=1)

    # Decision cache (off by default; see gateway/cache.py for the staleness bound).
    decision_cache: bool = False
    decision_cache_bucket_s: float = Field(default=10.0, gt=0)
    decision_cache_max_staleness_s: float = Field(default=2.0, gt=0)
    decision_cache_poll_s: float = Field(default=0.5, gt=0)

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
        """Refuse development placeholders outside development."""
        if self.environment == "production":
            if self.audit_redact_queries and self.audit_redaction_key.startswith("development"):
                raise ValueError("SCOPEGATE_AUDIT_REDACTION_KEY must be set in production")
            if not self.trusted_issuers_pem and not self.jwks_url:
                raise ValueError(
                    "production needs SCOPEGATE_TRUSTED_ISSUERS_PEM or SCOPEGATE_JWKS_URL"
                )


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides winning."""
    settings = Settings(**overrides)  # type: ignore[arg-type]
    settings.check_production()
    return settings

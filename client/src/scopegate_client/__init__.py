"""scopegate-client: the agent side of scopegate.

The HTTP client (sync and async), the errors and the response models of API v1 need
only httpx, pydantic and anyio. The integrations are modules of their own, each with
its extra: :mod:`scopegate_client.langchain`, :mod:`scopegate_client.llamaindex`,
:mod:`scopegate_client.openai_agents` and :mod:`scopegate_client.mcp_server`.
"""

from scopegate_client.client import (
    AsyncScopegateClient,
    ClientsPerLoop,
    RetryPolicy,
    ScopegateClient,
    TokenSource,
    error_from_response,
    raise_for_error,
)
from scopegate_client.errors import (
    AuditUnavailable,
    AuthorizationUnavailable,
    Conflict,
    Forbidden,
    InvalidIdentifier,
    InvalidRequest,
    InvalidToken,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ScopegateError,
    SourceUnavailable,
    Unavailable,
)
from scopegate_client.models import (
    CandidateRecord,
    Chunk,
    Decision,
    DecisionPage,
    DecisionSummary,
    IngestSummary,
    Replay,
    ReplayedDocument,
    Retrieval,
    Source,
)
from scopegate_client.tool_output import format_passages

__version__ = "0.1.0"

__all__ = [
    "AsyncScopegateClient",
    "AuditUnavailable",
    "AuthorizationUnavailable",
    "CandidateRecord",
    "Chunk",
    "ClientsPerLoop",
    "Conflict",
    "Decision",
    "DecisionPage",
    "DecisionSummary",
    "Forbidden",
    "IngestSummary",
    "InvalidIdentifier",
    "InvalidRequest",
    "InvalidToken",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "Replay",
    "ReplayedDocument",
    "Retrieval",
    "RetryPolicy",
    "ScopegateClient",
    "ScopegateError",
    "Source",
    "SourceUnavailable",
    "TokenSource",
    "Unavailable",
    "error_from_response",
    "format_passages",
    "raise_for_error",
]

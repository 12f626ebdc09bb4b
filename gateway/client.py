"""The Python client of a running gateway: :mod:`scopegate_client`, under its old name.

The client, its errors and the response models are the agent side of scopegate and
ship in the ``scopegate-client`` distribution, which installs without the server's
dependencies; this module re-exports them for code written against ``gateway.client``.
"""

from __future__ import annotations

from scopegate_client.client import (
    AsyncScopegateClient,
    ClientsPerLoop,
    RetryPolicy,
    ScopegateClient,
    TokenSource,
    error_from_response,
    raise_for_error,
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

__all__ = [
    "AsyncScopegateClient",
    "CandidateRecord",
    "Chunk",
    "ClientsPerLoop",
    "Decision",
    "DecisionPage",
    "DecisionSummary",
    "IngestSummary",
    "Replay",
    "ReplayedDocument",
    "Retrieval",
    "RetryPolicy",
    "ScopegateClient",
    "Source",
    "TokenSource",
    "error_from_response",
    "raise_for_error",
]

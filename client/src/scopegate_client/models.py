"""The response models of HTTP API v1 (DESIGN §4), as the client returns them.

Plain frozen dataclasses built from the gateway's JSON (``from_json``) and back
(``to_dict``): a retrieval (:class:`Retrieval` of :class:`Chunk`), sources, ingestion
totals, and the reviewer's decisions and replays.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CandidateRecord",
    "Chunk",
    "Decision",
    "DecisionPage",
    "DecisionSummary",
    "IngestSummary",
    "Replay",
    "ReplayedDocument",
    "Retrieval",
    "Source",
]


@dataclass(frozen=True, slots=True)
class Chunk:
    """One permitted chunk, as returned by ``POST /v1/retrieve``."""

    chunk_id: str
    document_id: str
    source: str
    text: str
    score: float
    tokens: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Chunk:
        return cls(
            chunk_id=str(data["chunk_id"]),
            document_id=str(data["document_id"]),
            source=str(data["source"]),
            text=str(data["text"]),
            score=float(data["score"]),
            tokens=int(data["tokens"]),
            metadata=dict(data.get("metadata") or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "chunk_id": self.chunk_id,
            "document_id": self.document_id,
            "source": self.source,
            "text": self.text,
            "score": self.score,
            "tokens": self.tokens,
            "metadata": dict(self.metadata),
        }


@dataclass(frozen=True, slots=True)
class Retrieval:
    """The answer to one retrieval: its audit ``request_id`` and the permitted chunks."""

    request_id: str
    chunks: list[Chunk]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Retrieval:
        return cls(str(data["request_id"]), [Chunk.from_json(c) for c in data["chunks"]])

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "chunks": [c.to_dict() for c in self.chunks]}


@dataclass(frozen=True, slots=True)
class Source:
    """A registered source; ``documents`` is only filled in by :meth:`get_source`."""

    id: str
    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    documents: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Source:
        documents = data.get("documents")
        return cls(
            id=str(data["id"]),
            kind=str(data.get("kind", "")),
            config=dict(data.get("config") or {}),
            documents=int(documents) if documents is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "kind": self.kind, "config": dict(self.config)}
        if self.documents is not None:
            data["documents"] = self.documents
        return data


@dataclass(frozen=True, slots=True)
class IngestSummary:
    """Totals of an ingestion; ``skipped`` counts documents that were already up to date."""

    documents: int
    chunks: int
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class DecisionSummary:
    """One line of the reviewer's decision list."""

    request_id: str
    time: str
    user: str
    agent: str | None
    task: str | None
    outcome: str
    strategy: str
    candidates: int
    blocked: int
    error_code: str | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DecisionSummary:
        return cls(
            request_id=str(data["request_id"]),
            time=str(data["time"]),
            user=str(data["user"]),
            agent=_opt_str(data.get("agent")),
            task=_opt_str(data.get("task")),
            outcome=str(data["outcome"]),
            strategy=str(data.get("strategy", "")),
            candidates=int(data.get("candidates", 0)),
            blocked=int(data.get("blocked", 0)),
            error_code=_opt_str(data.get("error_code")),
        )


@dataclass(frozen=True, slots=True)
class DecisionPage:
    """One page of the reviewer's decision list; ``next_cursor`` is ``None`` on the last."""

    decisions: list[DecisionSummary]
    next_cursor: str | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DecisionPage:
        return cls(
            [DecisionSummary.from_json(d) for d in data["decisions"]],
            _opt_str(data.get("next_cursor")),
        )


@dataclass(frozen=True, slots=True)
class CandidateRecord:
    """A recorded candidate document and its verdict."""

    document_id: str
    source: str
    chunk_ids: list[str]
    verdict: str
    failed_checks: list[str]
    errored_checks: list[str]
    returned: bool

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CandidateRecord:
        return cls(
            document_id=str(data["document_id"]),
            source=str(data.get("source", "")),
            chunk_ids=[str(c) for c in data.get("chunk_ids", [])],
            verdict=str(data["verdict"]),
            failed_checks=[str(c) for c in data.get("failed_checks", [])],
            errored_checks=[str(c) for c in data.get("errored_checks", [])],
            returned=bool(data.get("returned", False)),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """One recorded decision; ``raw`` holds the full record as the gateway sent it."""

    request_id: str
    time: str
    kind: str
    user: str
    agent: str | None
    task: str | None
    query: str | None
    sources: list[str]
    outcome: str
    error_code: str | None
    candidates: list[CandidateRecord]
    returned_chunk_ids: list[str]
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Decision:
        return cls(
            request_id=str(data["request_id"]),
            time=str(data["time"]),
            kind=str(data.get("kind", "")),
            user=str(data["user"]),
            agent=_opt_str(data.get("agent")),
            task=_opt_str(data.get("task")),
            query=_opt_str(data.get("query")),
            sources=[str(s) for s in data.get("sources", [])],
            outcome=str(data["outcome"]),
            error_code=_opt_str(data.get("error_code")),
            candidates=[CandidateRecord.from_json(c) for c in data.get("candidates", [])],
            returned_chunk_ids=[str(c) for c in data.get("returned_chunk_ids", [])],
            raw=dict(data),
        )

    @property
    def blocked(self) -> list[CandidateRecord]:
        return [c for c in self.candidates if c.verdict != "allow"]


@dataclass(frozen=True, slots=True)
class ReplayedDocument:
    document_id: str
    source: str
    was: str
    now: str
    changed: bool
    failed_checks: list[str]
    explanations: list[str]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReplayedDocument:
        return cls(
            document_id=str(data["document_id"]),
            source=str(data.get("source", "")),
            was=str(data["was"]),
            now=str(data["now"]),
            changed=bool(data.get("changed", False)),
            failed_checks=[str(c) for c in data.get("failed_checks", [])],
            explanations=[str(e) for e in data.get("explanations", [])],
        )


@dataclass(frozen=True, slots=True)
class Replay:
    """A recorded decision re-evaluated now; ``raw`` is the gateway's full answer."""

    request_id: str
    documents: list[ReplayedDocument]
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Replay:
        return cls(
            request_id=str(data["request_id"]),
            documents=[ReplayedDocument.from_json(d) for d in data.get("documents", [])],
            raw=dict(data),
        )


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)

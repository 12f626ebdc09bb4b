"""Context packing: permitted chunks, in score order, within a token budget."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from connectors.base import Candidate
from connectors.chunking import count_tokens

# Stamps travel with every chunk for the gateway's own checks; agents never see them.
STAMP_KEYS = frozenset({"tenant", "source", "document_id", "chunk_index", "scopegate_version"})


@dataclass(frozen=True, slots=True)
class PackedChunk:
    chunk_id: str
    document_id: str
    source: str
    text: str
    score: float
    tokens: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chunk_id": self.chunk_id,
            "document_id": self.document_id,
            "source": self.source,
            "text": self.text,
            "score": round(self.score, 6),
            "tokens": self.tokens,
            "metadata": self.metadata,
        }


def pack(chunks: Sequence[Candidate], max_tokens: int | None) -> list[PackedChunk]:
    """Keep chunks in order until the next one would exceed ``max_tokens``."""
    packed: list[PackedChunk] = []
    used = 0
    for c in chunks:
        tokens = count_tokens(c.text)
        if max_tokens is not None and used + tokens > max_tokens:
            break
        used += tokens
        packed.append(
            PackedChunk(
                chunk_id=c.chunk_id,
                document_id=str(c.document_id),
                source=str(c.source),
                text=c.text,
                score=c.score,
                tokens=tokens,
                metadata={k: v for k, v in c.metadata.items() if k not in STAMP_KEYS},
            )
        )
    return packed

"""What every integration shows a model: numbered passages, chunk metadata, fixable errors.

Mistakes a model can correct by calling again (an unknown source, an out of range
``k``) are answered as text; token, permission and availability errors are not the
model's to handle and raise for the application, whatever the agent framework.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from scopegate_client.errors import InvalidRequest, NotFound, ScopegateError

NO_CONTEXT = "No permitted context was found for this query."
#: Errors answered to the model as text (it can fix its own arguments).
MODEL_FIXABLE = (InvalidRequest, NotFound)


class Passage(Protocol):
    """What a passage shows: a :class:`~scopegate_client.models.Chunk` is one."""

    @property
    def source(self) -> object: ...
    @property
    def document_id(self) -> object: ...
    @property
    def chunk_id(self) -> object: ...
    @property
    def text(self) -> str: ...


def format_passages(passages: Sequence[Passage]) -> str:
    """Numbered blocks naming each passage's source, document and chunk; an explicit
    line when there is none, so a model never mistakes an empty answer for a failure."""
    if not passages:
        return NO_CONTEXT
    return "\n\n".join(
        f"[{n}] source={p.source} document={p.document_id} chunk={p.chunk_id}\n{p.text}"
        for n, p in enumerate(passages, 1)
    )


def error_for_model(exc: ScopegateError) -> str:
    """The text a model gets for an error: its code and message, never more."""
    return f"{exc.code}: {exc.message}"


# Keys the gateway sets on every retrieved chunk; they win over ingested metadata of the same
# name in the metadata of a LangChain document or a LlamaIndex node.
IDENTITY_KEYS = ("chunk_id", "document_id", "source", "score", "tokens", "request_id")


class ChunkLike(Protocol):
    """A permitted chunk: the client's :class:`~scopegate_client.models.Chunk` or the
    gateway's own, in-process."""

    @property
    def chunk_id(self) -> str: ...
    @property
    def document_id(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def score(self) -> float: ...
    @property
    def tokens(self) -> int: ...
    @property
    def metadata(self) -> dict[str, Any]: ...


def chunk_metadata(request_id: str, chunk: ChunkLike) -> dict[str, Any]:
    """Ingested metadata, then the gateway's identity keys (which win on a clash)."""
    return {
        **chunk.metadata,
        "chunk_id": chunk.chunk_id,
        "document_id": chunk.document_id,
        "source": chunk.source,
        "score": chunk.score,
        "tokens": chunk.tokens,
        "request_id": request_id,
    }

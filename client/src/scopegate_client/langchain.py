"""LangChain integration: a retriever and an agent tool backed by a running gateway.

:class:`ScopegateRetriever` calls ``POST /v1/retrieve`` of a gateway with the
delegation token (a string or a callable returning the current one); only chunks the
delegating user, the agent, the task and the tenant all permit come back, and every
call is audited under the ``request_id`` found in each document's metadata.
:func:`scopegate_tool` wraps a retriever as a tool for agents that call retrieval
themselves. (The server distribution adds an in-process mode, with no HTTP, in
``gateway.langchain``.)

Needs the ``langchain`` extra: ``pip install 'scopegate-client[langchain]'``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
    Callbacks,
)
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from scopegate_client.client import ClientsPerLoop, TokenSource
from scopegate_client.tool_output import (
    IDENTITY_KEYS,
    MODEL_FIXABLE,
    ChunkLike,
    chunk_metadata,
    error_for_model,
    format_passages,
)

__all__ = [
    "DEFAULT_TOOL_DESCRIPTION",
    "IDENTITY_KEYS",
    "ScopegateRetriever",
    "ScopegateToolInput",
    "format_documents",
    "scopegate_tool",
    "to_documents",
]

# Keyword arguments LangChain itself may leave in ``invoke(..., **kwargs)``.
_IGNORED_KWARGS = frozenset({"verbose"})


def to_documents(request_id: str, chunks: Sequence[ChunkLike]) -> list[Document]:
    """Permitted chunks as LangChain documents (``id`` is the chunk id)."""
    return [
        Document(id=c.chunk_id, page_content=c.text, metadata=chunk_metadata(request_id, c))
        for c in chunks
    ]


@dataclass(frozen=True, slots=True)
class _DocumentPassage:
    source: object
    document_id: object
    chunk_id: object
    text: str


def format_documents(documents: Sequence[Document]) -> str:
    """Numbered context blocks for a prompt; an explicit line when there is none."""
    return format_passages(
        [
            _DocumentPassage(
                doc.metadata.get("source"),
                doc.metadata.get("document_id"),
                doc.metadata.get("chunk_id"),
                doc.page_content,
            )
            for doc in documents
        ]
    )


class ScopegateRetriever(BaseRetriever):
    """Retrieves only what scopegate permits for the token's user, agent, task and tenant.

    ::

        ScopegateRetriever(url="http://127.0.0.1:8080", token=get_token, k=4)

    ``invoke(query, k=..., sources=..., max_tokens=...)`` overrides the defaults
    for one call. Documents carry ``chunk_id``, ``document_id``, ``source``,
    ``score``, ``tokens`` and the audit ``request_id`` in their metadata, next to
    the metadata given at ingestion (the gateway's keys win on a clash).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    url: str | None = None
    """Base URL of a running gateway."""
    token: TokenSource = Field(repr=False)
    """The delegation token, or a zero-argument callable returning the current one."""
    k: int = Field(default=5, ge=1, le=100)
    sources: list[str] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    timeout_s: float = Field(default=30.0, gt=0)

    _clients: ClientsPerLoop | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _one_mode(self) -> ScopegateRetriever:
        # Overridden by the server's retriever, which adds the in-process mode.
        if self.url is None:
            raise ValueError("url is required: the base URL of a running gateway")
        return self

    # -- the retriever contract --------------------------------------------------------

    def _get_relevant_documents(
        self,
        query: str,
        *,
        run_manager: CallbackManagerForRetrieverRun,
        k: int | None = None,
        sources: Sequence[str] | None = None,
        max_tokens: int | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        return self._retrieve(query, *self._call_options(k, sources, max_tokens, kwargs))

    async def _aget_relevant_documents(
        self,
        query: str,
        *,
        run_manager: AsyncCallbackManagerForRetrieverRun,
        k: int | None = None,
        sources: Sequence[str] | None = None,
        max_tokens: int | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        options = self._call_options(k, sources, max_tokens, kwargs)
        return await self._aretrieve(query, *options)

    # -- retrieval over HTTP -------------------------------------------------------------

    def _retrieve(
        self, query: str, k: int, sources: Sequence[str] | None, max_tokens: int | None
    ) -> list[Document]:
        found = self._http().sync().retrieve(query, k, sources, max_tokens)
        return to_documents(found.request_id, found.chunks)

    async def _aretrieve(
        self, query: str, k: int, sources: Sequence[str] | None, max_tokens: int | None
    ) -> list[Document]:
        found = await self._http().for_running_loop().retrieve(query, k, sources, max_tokens)
        return to_documents(found.request_id, found.chunks)

    def _call_options(
        self,
        k: int | None,
        sources: Sequence[str] | None,
        max_tokens: int | None,
        extra: Mapping[str, Any],
    ) -> tuple[int, Sequence[str] | None, int | None]:
        unknown = sorted(set(extra) - _IGNORED_KWARGS)
        if unknown:
            raise TypeError(f"unexpected retrieval options: {', '.join(unknown)}")
        return (
            self.k if k is None else k,
            self.sources if sources is None else sources,
            self.max_tokens if max_tokens is None else max_tokens,
        )

    def _http(self) -> ClientsPerLoop:
        with self._lock:
            if self._clients is None:
                assert self.url is not None
                self._clients = ClientsPerLoop(self.url, self.token, timeout_s=self.timeout_s)
            return self._clients

    def close(self) -> None:
        """Close the HTTP connection pool of the sync path (async pools close with their loop)."""
        with self._lock:
            if self._clients is not None:
                self._clients.close()


class ScopegateToolInput(BaseModel):
    """Arguments an agent may give the retrieval tool (never identity or filters)."""

    query: str = Field(description="What to look for, in natural language.")
    k: int | None = Field(
        default=None, ge=1, le=100, description="How many chunks to return (optional)."
    )
    sources: list[str] | None = Field(
        default=None, description="Restrict the search to these source ids (optional)."
    )


DEFAULT_TOOL_DESCRIPTION = (
    "Search the documents you are permitted to read for this task and return the most "
    "relevant passages, each with its source and document id. Use it whenever you need "
    "facts from the organisation's documents."
)


def scopegate_tool(
    retriever: ScopegateRetriever,
    *,
    name: str = "scopegate_retrieve",
    description: str = DEFAULT_TOOL_DESCRIPTION,
) -> BaseTool:
    """A tool for agents that call retrieval themselves.

    The tool answers with :func:`format_documents` text for the model and the
    documents as the message artifact. Identity is the retriever's token, never a
    tool argument. Mistakes the model can correct (an unknown source, an out of
    range ``k``) come back as the tool's answer; token, permission and availability
    errors raise, for the application to handle.
    """

    def run(
        query: str,
        k: int | None = None,
        sources: list[str] | None = None,
        callbacks: Callbacks = None,
    ) -> tuple[str, list[Document]]:
        try:
            docs = retriever.invoke(query, {"callbacks": callbacks}, k=k, sources=sources)
        except MODEL_FIXABLE as exc:
            raise ToolException(error_for_model(exc)) from exc
        return format_documents(docs), docs

    async def arun(
        query: str,
        k: int | None = None,
        sources: list[str] | None = None,
        callbacks: Callbacks = None,
    ) -> tuple[str, list[Document]]:
        try:
            docs = await retriever.ainvoke(query, {"callbacks": callbacks}, k=k, sources=sources)
        except MODEL_FIXABLE as exc:
            raise ToolException(error_for_model(exc)) from exc
        return format_documents(docs), docs

    return StructuredTool.from_function(
        func=run,
        coroutine=arun,
        name=name,
        description=description,
        args_schema=ScopegateToolInput,
        response_format="content_and_artifact",
        handle_tool_error=True,
    )

"""LangChain integration: a retriever and an agent tool backed by scopegate.

:class:`ScopegateRetriever` has two modes:

- **HTTP** (``url=...``): calls ``POST /v1/retrieve`` of a running gateway with the
  delegation token (a string or a callable returning the current one);
- **in-process** (``gateway=...``): calls :meth:`Gateway.retrieve` of a local gateway
  after verifying the same token with the gateway's own verifier, with no HTTP.

Either way only chunks the delegating user, the agent, the task and the tenant all
permit come back, and every call is audited under the ``request_id`` found in each
document's metadata.

The gateway is async and bound to the loop it was started on. In-process mode runs
every call on that loop: give it a :class:`~gateway.background.BackgroundGateway`
(its own loop thread) and both ``invoke`` and ``ainvoke`` work from plain scripts,
from other running loops and from notebook cells. A plain :class:`Gateway` is used
on the loop that was running when the retriever was built (or ``loop=``): ``ainvoke``
from that loop awaits directly, ``invoke`` from another thread waits for it, and
``invoke`` on that loop's own thread is refused (it could only deadlock).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
    Callbacks,
)
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from gateway.client import AsyncScopegateClient, ScopegateClient, TokenSource
from gateway.errors import InvalidRequest, NotFound

T = TypeVar("T")

# Keys the gateway sets on every document; they win over ingested metadata of the same name.
IDENTITY_KEYS = ("chunk_id", "document_id", "source", "score", "tokens", "request_id")
# Keyword arguments LangChain itself may leave in ``invoke(..., **kwargs)``.
_IGNORED_KWARGS = frozenset({"verbose"})


class _ChunkLike(Protocol):
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


def to_documents(request_id: str, chunks: Sequence[_ChunkLike]) -> list[Document]:
    """Permitted chunks as LangChain documents (``id`` is the chunk id)."""
    return [
        Document(
            id=c.chunk_id,
            page_content=c.text,
            metadata={
                **c.metadata,
                "chunk_id": c.chunk_id,
                "document_id": c.document_id,
                "source": c.source,
                "score": c.score,
                "tokens": c.tokens,
                "request_id": request_id,
            },
        )
        for c in chunks
    ]


def format_documents(documents: Sequence[Document]) -> str:
    """Numbered context blocks for a prompt; an explicit line when there is none."""
    if not documents:
        return "No permitted context was found for this query."
    blocks = []
    for number, doc in enumerate(documents, 1):
        meta = doc.metadata
        header = (
            f"[{number}] source={meta.get('source')} document={meta.get('document_id')} "
            f"chunk={meta.get('chunk_id')}"
        )
        blocks.append(f"{header}\n{doc.page_content}")
    return "\n\n".join(blocks)


class _Runner(Protocol):
    def call(self, coro: Coroutine[Any, Any, T]) -> T: ...
    async def acall(self, coro: Coroutine[Any, Any, T]) -> T: ...


class _LoopRunner:
    """Runs coroutines on the loop a plain :class:`Gateway` lives on."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.loop is None:
            coro.close()
            raise RuntimeError(
                "no event loop known for this Gateway: build the retriever inside the loop "
                "that runs it (or pass loop=), or use a BackgroundGateway"
            )
        if _running_loop() is self.loop:
            coro.close()
            raise RuntimeError(
                "invoke() on the gateway's own event loop would deadlock: use "
                "`await retriever.ainvoke(...)`, or run the gateway in a BackgroundGateway"
            )
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def acall(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.loop is None or asyncio.get_running_loop() is self.loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _retrieve_local(
    gateway: Any,
    token: str,
    query: str,
    k: int,
    sources: Sequence[str] | None,
    max_tokens: int | None,
) -> list[Document]:
    ctx = await gateway.verifier.averify_delegation(token)
    result = await gateway.retrieve(ctx, query, k, sources, max_tokens)
    return to_documents(result.request_id, result.chunks)


class ScopegateRetriever(BaseRetriever):
    """Retrieves only what scopegate permits for the token's user, agent, task and tenant.

    HTTP mode::

        ScopegateRetriever(url="http://127.0.0.1:8080", token=get_token, k=4)

    In-process mode::

        ScopegateRetriever(gateway=background_gateway, token=delegation_token)

    ``invoke(query, k=..., sources=..., max_tokens=...)`` overrides the defaults
    for one call. Documents carry ``chunk_id``, ``document_id``, ``source``,
    ``score``, ``tokens`` and the audit ``request_id`` in their metadata, next to
    the metadata given at ingestion (the gateway's keys win on a clash).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    url: str | None = None
    """Base URL of a running gateway (HTTP mode)."""
    gateway: Any = Field(default=None, repr=False)
    """A ``BackgroundGateway`` or ``Gateway`` (in-process mode)."""
    token: TokenSource = Field(repr=False)
    """The delegation token, or a zero-argument callable returning the current one."""
    k: int = Field(default=5, ge=1, le=100)
    sources: list[str] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    timeout_s: float = Field(default=30.0, gt=0)
    loop: asyncio.AbstractEventLoop | None = Field(default=None, repr=False, exclude=True)
    """The loop a plain ``Gateway`` runs on (default: the loop running at construction)."""

    _client: ScopegateClient | None = PrivateAttr(default=None)
    _aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncScopegateClient] = (
        PrivateAttr(default_factory=weakref.WeakKeyDictionary)
    )
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _one_mode(self) -> ScopegateRetriever:
        if (self.url is None) == (self.gateway is None):
            raise ValueError("give exactly one of url (HTTP mode) or gateway (in-process mode)")
        if self.gateway is not None:
            from gateway.background import BackgroundGateway
            from gateway.service import Gateway

            if not isinstance(self.gateway, BackgroundGateway | Gateway):
                raise TypeError("gateway must be a BackgroundGateway or a Gateway")
            if isinstance(self.gateway, Gateway) and self.loop is None:
                self.loop = _running_loop()
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
        k, sources, max_tokens = self._call_options(k, sources, max_tokens, kwargs)
        if self.url is not None:
            found = self._sync_client().retrieve(query, k, sources, max_tokens)
            return to_documents(found.request_id, found.chunks)
        coro = _retrieve_local(self._local_gateway(), self._token(), query, k, sources, max_tokens)
        return self._runner().call(coro)

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
        k, sources, max_tokens = self._call_options(k, sources, max_tokens, kwargs)
        if self.url is not None:
            found = await self._async_client().retrieve(query, k, sources, max_tokens)
            return to_documents(found.request_id, found.chunks)
        coro = _retrieve_local(self._local_gateway(), self._token(), query, k, sources, max_tokens)
        return await self._runner().acall(coro)

    # -- helpers -------------------------------------------------------------------------

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

    def _token(self) -> str:
        return self.token() if callable(self.token) else self.token

    def _local_gateway(self) -> Any:
        from gateway.background import BackgroundGateway

        return self.gateway.gateway if isinstance(self.gateway, BackgroundGateway) else self.gateway

    def _runner(self) -> _Runner:
        from gateway.background import BackgroundGateway

        if isinstance(self.gateway, BackgroundGateway):
            return self.gateway
        return _LoopRunner(self.loop)

    def _sync_client(self) -> ScopegateClient:
        with self._lock:
            if self._client is None:
                assert self.url is not None
                self._client = ScopegateClient(self.url, self.token, timeout_s=self.timeout_s)
            return self._client

    def _async_client(self) -> AsyncScopegateClient:
        # httpx async connection pools belong to one loop: one client per loop.
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._aclients.get(loop)
            if client is None:
                assert self.url is not None
                client = AsyncScopegateClient(self.url, self.token, timeout_s=self.timeout_s)
                self._aclients[loop] = client
            return client

    def close(self) -> None:
        """Close the HTTP connection pool of the sync path (async pools close with their loop)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


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
        except (InvalidRequest, NotFound) as exc:
            raise ToolException(f"{exc.code}: {exc.message}") from exc
        return format_documents(docs), docs

    async def arun(
        query: str,
        k: int | None = None,
        sources: list[str] | None = None,
        callbacks: Callbacks = None,
    ) -> tuple[str, list[Document]]:
        try:
            docs = await retriever.ainvoke(query, {"callbacks": callbacks}, k=k, sources=sources)
        except (InvalidRequest, NotFound) as exc:
            raise ToolException(f"{exc.code}: {exc.message}") from exc
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

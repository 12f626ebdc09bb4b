"""LangChain integration with an in-process mode: :mod:`scopegate_client.langchain` plus
a retriever that can call a gateway in this process, with no HTTP.

:class:`ScopegateRetriever` has two modes:

- **HTTP** (``url=...``): exactly the client's retriever (``POST /v1/retrieve``);
- **in-process** (``gateway=...``): calls :meth:`Gateway.retrieve` of a local gateway
  after verifying the same token with the gateway's own verifier.

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
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from langchain_core.documents import Document
from pydantic import Field, model_validator
from scopegate_client import langchain as client_side
from scopegate_client.langchain import DEFAULT_TOOL_DESCRIPTION as DEFAULT_TOOL_DESCRIPTION
from scopegate_client.langchain import IDENTITY_KEYS as IDENTITY_KEYS
from scopegate_client.langchain import ScopegateToolInput as ScopegateToolInput
from scopegate_client.langchain import format_documents as format_documents
from scopegate_client.langchain import scopegate_tool as scopegate_tool
from scopegate_client.langchain import to_documents

T = TypeVar("T")


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


class ScopegateRetriever(client_side.ScopegateRetriever):
    """The client's retriever, or the same retriever on a gateway in this process.

    HTTP mode::

        ScopegateRetriever(url="http://127.0.0.1:8080", token=get_token, k=4)

    In-process mode::

        ScopegateRetriever(gateway=background_gateway, token=delegation_token)
    """

    gateway: Any = Field(default=None, repr=False)
    """A ``BackgroundGateway`` or ``Gateway`` (in-process mode)."""
    loop: asyncio.AbstractEventLoop | None = Field(default=None, repr=False, exclude=True)
    """The loop a plain ``Gateway`` runs on (default: the loop running at construction)."""

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

    def _retrieve(
        self, query: str, k: int, sources: Sequence[str] | None, max_tokens: int | None
    ) -> list[Document]:
        if self.gateway is None:
            return super()._retrieve(query, k, sources, max_tokens)
        coro = _retrieve_local(self._local_gateway(), self._token(), query, k, sources, max_tokens)
        return self._runner().call(coro)

    async def _aretrieve(
        self, query: str, k: int, sources: Sequence[str] | None, max_tokens: int | None
    ) -> list[Document]:
        if self.gateway is None:
            return await super()._aretrieve(query, k, sources, max_tokens)
        coro = _retrieve_local(self._local_gateway(), self._token(), query, k, sources, max_tokens)
        return await self._runner().acall(coro)

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

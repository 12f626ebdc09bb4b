"""ScopegateRetriever and scopegate_tool against a real gateway (HTTP and in-process).

LangChain's standard retriever and tool suites run against both modes, and against the
client distribution's retriever (HTTP only) that the server's extends; a chain built on
the retriever is spied on to show that a denied document's text never reaches the prompt.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from langchain_core.documents import Document
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import ToolCall, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompt_values import PromptValue
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_tests.integration_tests import RetrieversIntegrationTests, ToolsIntegrationTests
from langchain_tests.unit_tests import ToolsUnitTests
from scopegate_client import langchain as client_side

from gateway import errors
from gateway.langchain import IDENTITY_KEYS, ScopegateRetriever, format_documents, scopegate_tool
from gateway.service import Gateway
from tests.served import (
    ALICE_DOCS,
    BOB_DOCS,
    DENIED_TEXT,
    Served,
    acme_fixture,
)
from tests.world import World, doc

QUERY = "revenue forecast and the salary bands"


acme = acme_fixture("langchain-gw")


# -- LangChain's standard suites ------------------------------------------------------------


class _RetrieverStandard(RetrieversIntegrationTests):
    """LangChain's suite for one kind of retriever (HTTP mode unless ``params`` says not)."""

    constructor: type[BaseRetriever] = ScopegateRetriever

    def params(self, acme: Served) -> dict[str, Any]:
        return {"url": acme.url, "token": lambda: acme.agent_token("alice")}

    @pytest.fixture(autouse=True)
    def _served(self, acme: Served) -> None:
        self.constructor_params = self.params(acme)

    @property
    def retriever_constructor(self) -> type[BaseRetriever]:
        return self.constructor

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return self.constructor_params

    @property
    def retriever_query_example(self) -> str:
        return QUERY


class TestHttpRetrieverStandard(_RetrieverStandard):
    pass


class TestClientRetrieverStandard(_RetrieverStandard):
    """``scopegate_client.langchain``: what an agent installs without the server."""

    constructor = client_side.ScopegateRetriever


class TestInProcessRetrieverStandard(_RetrieverStandard):
    def params(self, acme: Served) -> dict[str, Any]:
        return {"gateway": acme.bg, "token": acme.agent_token("alice")}


class _ToolUnderTest:
    @pytest.fixture(autouse=True)
    def _served(self, acme: Served) -> None:
        retriever = ScopegateRetriever(url=acme.url, token=acme.agent_token("alice"), k=2)
        self.built = scopegate_tool(retriever)

    @property
    def tool_constructor(self) -> BaseTool:
        return self.built

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"query": QUERY, "k": 3}


class TestScopegateToolStandard(_ToolUnderTest, ToolsIntegrationTests):
    pass


class TestScopegateToolUnitStandard(_ToolUnderTest, ToolsUnitTests):
    pass


# -- documents ------------------------------------------------------------------------------


def test_documents_carry_identity_and_audit_metadata(acme: Served) -> None:
    retriever = ScopegateRetriever(url=acme.url, token=acme.agent_token("alice"), k=10)
    docs = retriever.invoke(QUERY)
    assert {d.metadata["document_id"] for d in docs} == ALICE_DOCS
    assert all(set(IDENTITY_KEYS) <= set(d.metadata) for d in docs)
    assert len({d.metadata["request_id"] for d in docs}) == 1
    assert all(d.id == d.metadata["chunk_id"] for d in docs)
    assert all(DENIED_TEXT not in d.page_content for d in docs)
    # Same answer in-process (no HTTP), sync and async, and with per-call options.
    local = ScopegateRetriever(gateway=acme.bg, token=acme.agent_token("alice"), k=10)
    assert [d.id for d in local.invoke(QUERY)] == [d.id for d in docs]
    assert len(local.invoke(QUERY, k=2)) == 2
    assert local.invoke(QUERY, sources=["docs"], max_tokens=1) == []
    with pytest.raises(TypeError, match="top_k"):
        local.invoke(QUERY, top_k=2)


async def test_async_paths_in_both_modes(acme: Served) -> None:
    for retriever in (
        ScopegateRetriever(url=acme.url, token=acme.agent_token("bob"), k=10),
        ScopegateRetriever(gateway=acme.bg, token=acme.agent_token("bob"), k=10),
    ):
        docs = await retriever.ainvoke(QUERY)
        assert {d.metadata["document_id"] for d in docs} == BOB_DOCS


def test_invalid_token_fails_in_both_modes(acme: Served) -> None:
    for retriever in (
        ScopegateRetriever(url=acme.url, token="not-a-token"),
        ScopegateRetriever(gateway=acme.bg, token="not-a-token"),
    ):
        with pytest.raises(errors.InvalidToken):
            retriever.invoke(QUERY)
    with pytest.raises(ValueError, match="exactly one"):
        ScopegateRetriever(token="t")
    with pytest.raises(ValueError, match="url is required"):
        client_side.ScopegateRetriever(token="t")  # no in-process mode on the agent side


async def test_client_retriever_documents_and_async(acme: Served) -> None:
    retriever = client_side.ScopegateRetriever(url=acme.url, token=acme.agent_token("bob"), k=10)
    docs = await retriever.ainvoke(QUERY)
    assert {d.metadata["document_id"] for d in docs} == BOB_DOCS
    assert all(set(IDENTITY_KEYS) <= set(d.metadata) for d in docs)
    assert [d.id for d in await asyncio.to_thread(retriever.invoke, QUERY)] == [d.id for d in docs]
    retriever.close()


async def test_plain_gateway_runs_on_its_own_loop(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    # A Gateway started on this (pytest's) loop, built with the shared World helper.
    w = await World(gateway, http, "acme").setup(members=["alice"], agents=["summarizer"])
    await w.ingest(
        [doc("d1", "Revenue grows.", viewers=["user:alice"], agents=["agent:summarizer"])]
    )
    task = await w.task("alice", "summarizer", ["source:docs"])
    retriever = ScopegateRetriever(
        gateway=gateway, token=w.agent_token("alice", "summarizer", task)
    )

    assert [d.metadata["document_id"] for d in await retriever.ainvoke("revenue")] == ["d1"]
    # A worker thread's sync invoke runs on the gateway's loop and waits for it.
    docs = await asyncio.to_thread(retriever.invoke, "revenue")
    assert [d.metadata["document_id"] for d in docs] == ["d1"]
    # Blocking the gateway's own loop could only deadlock: refused with a clear error.
    with pytest.raises(RuntimeError, match="ainvoke"):
        retriever.invoke("revenue")


# -- a chain never sees denied text -----------------------------------------------------------


def _spied_chain(retriever: ScopegateRetriever, prompts: list[str]) -> Any:
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "Answer only from this context:\n\n{context}"),
            ("human", "{question}"),
        ]
    )

    def spy(value: PromptValue) -> PromptValue:
        prompts.append(value.to_string())
        return value

    model = FakeListChatModel(responses=["Revenue grows eight percent."])
    return (
        {"context": retriever | format_documents, "question": RunnablePassthrough()}
        | prompt
        | RunnableLambda(spy)
        | model
        | StrOutputParser()
    )


def test_chain_prompt_never_contains_denied_text(acme: Served) -> None:
    question = "What are the salary bands and the revenue bonus?"
    alice_prompts: list[str] = []
    alice = ScopegateRetriever(url=acme.url, token=acme.agent_token("alice"), k=10)
    assert _spied_chain(alice, alice_prompts).invoke(question) == "Revenue grows eight percent."
    (prompt,) = alice_prompts
    assert "Quarterly revenue forecast" in prompt
    assert DENIED_TEXT not in prompt and "212k" not in prompt

    # The denied document is relevant: bob, who may read it, gets it in his prompt.
    bob_prompts: list[str] = []
    bob = ScopegateRetriever(gateway=acme.bg, token=acme.agent_token("bob"), k=10)
    _spied_chain(bob, bob_prompts).invoke(question)
    assert DENIED_TEXT in bob_prompts[0]


async def test_async_chain_prompt_never_contains_denied_text(acme: Served) -> None:
    prompts: list[str] = []
    alice = ScopegateRetriever(gateway=acme.bg, token=acme.agent_token("alice"), k=10)
    await _spied_chain(alice, prompts).ainvoke("salary bands?")
    assert prompts and DENIED_TEXT not in prompts[0]


# -- the tool -------------------------------------------------------------------------------


def test_tool_returns_formatted_context_and_documents(acme: Served) -> None:
    tool = scopegate_tool(ScopegateRetriever(url=acme.url, token=acme.agent_token("alice")))
    message = tool.invoke(
        ToolCall(name=tool.name, args={"query": QUERY, "k": 10}, id="call-1", type="tool_call")
    )
    assert isinstance(message, ToolMessage)
    assert isinstance(message.content, str) and message.content.startswith("[1] source=docs")
    assert DENIED_TEXT not in message.content
    assert all(isinstance(d, Document) for d in message.artifact)
    assert {d.metadata["document_id"] for d in message.artifact} == ALICE_DOCS

    # What the model can fix comes back as the tool's answer.
    answer = tool.invoke({"query": QUERY, "sources": ["nope"]})
    assert answer.startswith("not_found")
    # What it cannot (identity) is the application's problem.
    broken = scopegate_tool(ScopegateRetriever(url=acme.url, token="not-a-token"))
    with pytest.raises(errors.InvalidToken):
        broken.invoke({"query": QUERY})


async def test_tool_async(acme: Served) -> None:
    tool = scopegate_tool(ScopegateRetriever(gateway=acme.bg, token=acme.agent_token("bob")))
    content = await tool.ainvoke({"query": "salary bands", "k": 10})
    assert DENIED_TEXT in content  # bob may read it
    empty = scopegate_tool(
        ScopegateRetriever(gateway=acme.bg, token=acme.agent_token("alice"), max_tokens=1)
    )
    assert await empty.ainvoke({"query": "salary"}) == format_documents([])

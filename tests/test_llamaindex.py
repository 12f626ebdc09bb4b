"""The LlamaIndex retriever against a real gateway served over HTTP.

A query engine built on the retriever, with LlamaIndex's own ``MockLLM`` (it answers
with the prompt it was given, so the answer shows exactly what the model read), never
puts a denied document's text into the prompt, while a user allowed to read it gets it.
"""

from __future__ import annotations

import pytest
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode
from scopegate_client import InvalidToken
from scopegate_client.llamaindex import HIDDEN_FROM_MODEL, ScopegateRetriever

from tests.served import (
    ALICE_DOCS,
    BOB_DOCS,
    DENIED_TEXT,
    Served,
    acme_fixture,
)

QUESTION = "What are the salary bands and the revenue bonus?"


acme = acme_fixture("llamaindex-gw")


def _documents(nodes: list[NodeWithScore]) -> set[str]:
    return {n.node.metadata["document_id"] for n in nodes}


def test_nodes_carry_source_document_and_score(acme: Served) -> None:
    retriever = ScopegateRetriever(acme.url, token=lambda: acme.agent_token("alice"), k=10)
    nodes = retriever.retrieve(QUESTION)
    assert _documents(nodes) == ALICE_DOCS
    assert all(DENIED_TEXT not in n.node.get_content() for n in nodes)
    for found in nodes:
        node = found.node
        assert isinstance(node, TextNode)
        assert node.node_id == node.metadata["chunk_id"]
        assert node.metadata["source"] == "docs"
        assert found.score == node.metadata["score"]
        assert len({n.node.metadata["request_id"] for n in nodes}) == 1
        # The model may cite source and document; it never reads the bookkeeping keys.
        for_model = node.get_content(metadata_mode=MetadataMode.LLM)
        assert "document_id: " in for_model and "source: docs" in for_model
        assert not any(f"{key}: " in for_model for key in HIDDEN_FROM_MODEL)
    scores = [n.score for n in nodes]
    assert scores == sorted(scores, reverse=True)
    retriever.close()


async def test_async_retrieve(acme: Served) -> None:
    retriever = ScopegateRetriever(acme.url, token=acme.agent_token("bob"), k=10)
    assert _documents(await retriever.aretrieve(QUESTION)) == BOB_DOCS
    narrowed = ScopegateRetriever(acme.url, token=acme.agent_token("bob"), k=2, sources=["docs"])
    assert len(await narrowed.aretrieve(QUESTION)) == 2


def test_query_engine_prompt_never_contains_denied_text(acme: Served) -> None:
    retriever = ScopegateRetriever(acme.url, token=acme.agent_token("alice"), k=10)
    engine = RetrieverQueryEngine.from_args(retriever, llm=MockLLM())
    response = engine.query(QUESTION)
    # MockLLM answers with its prompt: the answer is what the model was given.
    assert "Quarterly revenue forecast" in str(response)
    assert DENIED_TEXT not in str(response) and "212k" not in str(response)
    assert _documents(response.source_nodes) == ALICE_DOCS

    # The denied document is relevant: bob, who may read it, gets it in his prompt.
    bob = ScopegateRetriever(acme.url, token=acme.agent_token("bob"), k=10)
    assert DENIED_TEXT in str(RetrieverQueryEngine.from_args(bob, llm=MockLLM()).query(QUESTION))


async def test_async_query_engine(acme: Served) -> None:
    retriever = ScopegateRetriever(acme.url, token=acme.agent_token("alice"), k=10)
    response = await RetrieverQueryEngine.from_args(retriever, llm=MockLLM()).aquery(QUESTION)
    assert "Quarterly revenue forecast" in str(response) and DENIED_TEXT not in str(response)


def test_k_is_bounded() -> None:
    with pytest.raises(ValueError, match="k must be"):
        ScopegateRetriever("http://127.0.0.1:9", token="t", k=0)


def test_a_bad_token_is_refused(acme: Served) -> None:
    with pytest.raises(InvalidToken):
        ScopegateRetriever(acme.url, token="not-a-token").retrieve(QUESTION)

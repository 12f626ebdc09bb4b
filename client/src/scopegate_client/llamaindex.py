"""LlamaIndex integration: a retriever whose nodes are what scopegate permits.

:class:`ScopegateRetriever` is a ``llama_index.core`` retriever (``_retrieve`` and
``_aretrieve``) calling ``POST /v1/retrieve`` of a running gateway with the delegation
token. Each result is a ``NodeWithScore``: the chunk's text in a ``TextNode`` whose id
is the chunk id, the gateway's score, and in the node's metadata the chunk's ``source``,
``document_id``, ``chunk_id``, ``score``, ``tokens`` and the audit ``request_id`` next to
the metadata given at ingestion. A model sees the source and document id of each node
(to cite them) and none of the bookkeeping keys. Use it anywhere LlamaIndex takes a
retriever, e.g. ``RetrieverQueryEngine.from_args(retriever, llm=...)``.

Needs the ``llamaindex`` extra: ``pip install 'scopegate-client[llamaindex]'``.
"""

from __future__ import annotations

from collections.abc import Sequence

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from scopegate_client.client import ClientsPerLoop, TokenSource
from scopegate_client.models import Retrieval
from scopegate_client.tool_output import chunk_metadata

# Metadata a model has no use for: it sees the source and document id of each node.
HIDDEN_FROM_MODEL = ("chunk_id", "score", "tokens", "request_id")


def to_nodes(retrieval: Retrieval) -> list[NodeWithScore]:
    """Permitted chunks as scored LlamaIndex nodes (the node id is the chunk id)."""
    nodes = []
    for chunk in retrieval.chunks:
        metadata = chunk_metadata(retrieval.request_id, chunk)
        node = TextNode(
            id_=chunk.chunk_id,
            text=chunk.text,
            metadata=metadata,
            excluded_llm_metadata_keys=list(HIDDEN_FROM_MODEL),
            excluded_embed_metadata_keys=list(metadata),
        )
        nodes.append(NodeWithScore(node=node, score=chunk.score))
    return nodes


class ScopegateRetriever(BaseRetriever):
    """Retrieves only what scopegate permits for the token's user, agent, task and tenant.

    ::

        ScopegateRetriever("http://127.0.0.1:8080", token=get_token, k=4)

    ``token`` is the delegation token or a zero-argument callable returning the
    current one (asked before every request).
    """

    def __init__(
        self,
        url: str,
        token: TokenSource,
        *,
        k: int = 5,
        sources: Sequence[str] | None = None,
        max_tokens: int | None = None,
        timeout_s: float = 30.0,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
    ) -> None:
        if not 1 <= k <= 100:
            raise ValueError("k must be between 1 and 100")
        super().__init__(callback_manager=callback_manager, verbose=verbose)
        self.k = k
        self.sources = list(sources) if sources is not None else None
        self.max_tokens = max_tokens
        self._clients = ClientsPerLoop(url, token, timeout_s=timeout_s)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        client = self._clients.sync()
        return to_nodes(
            client.retrieve(query_bundle.query_str, self.k, self.sources, self.max_tokens)
        )

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        client = self._clients.for_running_loop()
        return to_nodes(
            await client.retrieve(query_bundle.query_str, self.k, self.sources, self.max_tokens)
        )

    def close(self) -> None:
        """Close the HTTP connection pool of the sync path (async pools close with their loop)."""
        self._clients.close()

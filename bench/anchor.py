"""The auth0-ai-langchain baseline, run by bench/retrieval.py inside its own virtualenv.

    bench/results/anchor-venv/bin/python bench/anchor.py --chroma DIR --collection NAME \
        --fga-url URL --store ID --model ID

auth0-ai-langchain pins langchain-core < 0.4 and openfga-sdk < 0.10, so it cannot share
the gateway's environment: bench/retrieval.py creates that virtualenv from PyPI
(``auth0-ai-langchain`` and the gateway's own chromadb version) and starts this script
in it. Nothing here imports the gateway.

The retriever is what a new user of the package writes: its ``FGARetriever`` around a
LangChain retriever over the same Chroma collection as the gateway (top k, no refill),
with one check per document, ``user:T/u user_can_read document:T/d`` (the user's own
right: the agent, the task and the tenant stamp are not asked), called through
``invoke``: its async path (``ainvoke``) fails in 1.0.1 with langchain-core 0.3
("unhashable type: 'Document'", it keys a dict by Document), so a user calls the sync
one, which opens a new OpenFGA client per call. Requests are JSON lines on stdin,
``{"user", "vector", "k"}``; each answer is one JSON line on stdout,
``{"ids", "ms", "checks"}`` (``ms``: the time of ``invoke`` alone, measured here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import chromadb
from auth0_ai_langchain.FGARetriever import FGARetriever
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from openfga_sdk import ClientConfiguration
from openfga_sdk.client.models import ClientBatchCheckItem
from pydantic import ConfigDict


class ChromaTopK(BaseRetriever):
    """The k nearest chunks of one Chroma collection; the query names a vector."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    collection: Any
    vectors: dict[str, list[float]]
    k: int = 10

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        found = self.collection.query(
            query_embeddings=[self.vectors[query]],
            n_results=self.k,
            include=["metadatas", "documents"],
        )
        return [
            Document(id=cid, page_content=text or "", metadata=dict(meta or {}))
            for cid, text, meta in zip(
                found["ids"][0], found["documents"][0], found["metadatas"][0], strict=True
            )
        ]

    async def _aget_relevant_documents(self, query: str, *, run_manager: Any) -> list[Document]:
        return self._get_relevant_documents(query, run_manager=run_manager)


async def serve(args: argparse.Namespace) -> None:
    client = chromadb.PersistentClient(path=args.chroma)
    collection = client.get_collection(args.collection, embedding_function=None)
    base = ChromaTopK(collection=collection, vectors={})
    config = ClientConfiguration(
        api_url=args.fga_url, store_id=args.store, authorization_model_id=args.model
    )
    user = [""]
    asked: set[str] = set()

    def build_query(doc: Document) -> ClientBatchCheckItem:
        obj = f"document:{args.tenant}/{doc.metadata['document_id']}"
        asked.add(obj)
        return ClientBatchCheckItem(user=user[0], relation="user_can_read", object=obj)

    retriever = FGARetriever(retriever=base, build_query=build_query, fga_configuration=config)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        user[0] = request["user"]
        base.k = int(request["k"])
        base.vectors = {"q": request["vector"]}
        asked.clear()
        started = time.perf_counter()
        try:
            docs = retriever.invoke("q")
        except Exception as exc:  # reported to the bench as a failed request
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
            continue
        ms = (time.perf_counter() - started) * 1000
        answer = {"ids": [d.id for d in docs], "ms": ms, "checks": len(asked)}
        print(json.dumps(answer), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--chroma", required=True)
    parser.add_argument("--collection", required=True)
    parser.add_argument("--fga-url", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tenant", default="acme")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()

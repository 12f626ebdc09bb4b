"""The code that docs/integrations.md shows for LangGraph, LlamaIndex and the OpenAI
Agents SDK is run here, as written, against a real gateway served over HTTP.

A block marked ``<!-- run: NAME -->`` is executed with ``url`` (the gateway) and
``delegation_token`` (alice's, delegating to the summarizer) defined, then what it
left behind is checked: alice's answers hold her documents and never the one only
bob may read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.served import ALICE_DOCS, DENIED_TEXT, Served, acme_fixture

DOC = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
MARKED = re.compile(r"<!-- run: (?P<name>[\w-]+) -->\n```python\n(?P<code>.*?)\n```", re.S)


def snippets() -> dict[str, str]:
    return {m["name"]: m["code"] for m in MARKED.finditer(DOC.read_text())}


acme = acme_fixture("doc-gw")


def run_snippet(name: str, acme: Served) -> dict[str, Any]:
    namespace: dict[str, Any] = {"url": acme.url, "delegation_token": acme.agent_token("alice")}
    exec(compile(snippets()[name], f"{DOC}#{name}", "exec"), namespace)
    return namespace


def test_every_marked_block_is_run_here() -> None:
    assert set(snippets()) == {"langgraph", "llamaindex", "openai-agents"}


def test_langgraph(acme: Served) -> None:
    messages = run_snippet("langgraph", acme)["result"]["messages"]
    assert [m.type for m in messages] == ["human", "ai", "tool", "ai"]
    assert {d.metadata["document_id"] for d in messages[2].artifact} <= ALICE_DOCS
    assert "Quarterly revenue forecast" in messages[-1].content
    assert all(DENIED_TEXT not in str(m.content) for m in messages)


def test_llamaindex(acme: Served) -> None:
    done = run_snippet("llamaindex", acme)
    response = done["response"]
    assert "Quarterly revenue forecast" in str(response) and DENIED_TEXT not in str(response)
    assert {n.node.metadata["document_id"] for n in response.source_nodes} <= ALICE_DOCS
    assert done["retriever"].sources == ["docs"]


def test_openai_agents(acme: Served) -> None:
    done = run_snippet("openai-agents", acme)
    for result in (done["result"], done["per_run"]):
        assert "Quarterly revenue forecast" in result.final_output
        assert DENIED_TEXT not in result.final_output

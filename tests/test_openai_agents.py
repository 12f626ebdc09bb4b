"""The OpenAI Agents SDK function tool, through the SDK's own tool-calling loop.

``Runner.run`` drives an agent whose model is the SDK's ``ScriptedModel`` (no network,
tracing off): the model calls the scopegate tool, then answers from what the tool gave
it. The tool retrieves from a real gateway served over HTTP with the agent's delegation
token, given to the tool or carried by the run's context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from agents import Agent, FunctionTool, RunConfig, Runner
from agents.exceptions import UserError
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message, function_call
from scopegate_client import InvalidToken
from scopegate_client.openai_agents import scopegate_function_tool

from tests.served import (
    ALICE_DOCS,
    BOB_DOCS,
    DENIED_TEXT,
    Served,
    acme_fixture,
)

QUESTION = "What are the salary bands and the revenue bonus?"
NO_TRACING = RunConfig(tracing_disabled=True)


acme = acme_fixture("agents-gw")


def _tool_output(call: ModelCall) -> str:
    (output,) = [
        item["output"]
        for item in call.input
        if isinstance(item, dict) and item.get("type") == "function_call_output"
    ]
    return str(output)


def _answer_from_tool(call: ModelCall) -> list[Any]:
    return [assistant_message(f"From the permitted passages:\n{_tool_output(call)}")]


def scripted_model(**arguments: Any) -> ScriptedModel:
    """Calls ``scopegate_retrieve`` with ``arguments``, then answers with what it got."""
    call = function_call("scopegate_retrieve", {"query": QUESTION, **arguments}, call_id="call-1")
    return ScriptedModel([[call], ModelStep.respond(_answer_from_tool)])


def _agent(tool: FunctionTool, model: ScriptedModel) -> Agent[Any]:
    return Agent(
        name="analyst", instructions="Answer from the documents.", model=model, tools=[tool]
    )


def _documents(text: str) -> set[str]:
    return {
        line.split(" document=")[1].split(" ")[0]
        for line in text.splitlines()
        if "] source=" in line
    }


async def test_agent_answers_only_from_permitted_passages(acme: Served) -> None:
    tool = scopegate_function_tool(acme.url, token=lambda: acme.agent_token("alice"))
    assert set(json.loads(json.dumps(tool.params_json_schema))["properties"]) == {
        "query",
        "k",
        "sources",
    }  # never identity
    model = scripted_model(k=10)
    result = await Runner.run(_agent(tool, model), QUESTION, run_config=NO_TRACING)
    model.assert_complete()

    seen_by_model = _tool_output(model.calls[1])
    assert _documents(seen_by_model) == ALICE_DOCS
    assert DENIED_TEXT not in seen_by_model and "212k" not in result.final_output
    assert "Quarterly revenue forecast" in result.final_output


async def test_token_from_the_run_context(acme: Served) -> None:
    @dataclass
    class Delegation:
        delegation_token: str

    tool = scopegate_function_tool(acme.url)  # one tool, a delegation per run
    seen: dict[str, str] = {}
    for user in ("bob", "alice"):
        model = scripted_model(k=10)
        context = Delegation(acme.agent_token(user))
        await Runner.run(_agent(tool, model), QUESTION, context=context, run_config=NO_TRACING)
        seen[user] = _tool_output(model.calls[1])
    assert (_documents(seen["bob"]), _documents(seen["alice"])) == (BOB_DOCS, ALICE_DOCS)
    assert DENIED_TEXT in seen["bob"] and DENIED_TEXT not in seen["alice"]

    with pytest.raises(UserError) as raised:
        await Runner.run(_agent(tool, scripted_model()), QUESTION, run_config=NO_TRACING)
    assert isinstance(raised.value.__cause__, InvalidToken)
    assert "no delegation token" in str(raised.value.__cause__)


def test_run_sync_and_per_call_arguments(acme: Served) -> None:
    tool = scopegate_function_tool(acme.url, token=acme.agent_token("alice"), k=1)
    for arguments, count in (({}, 1), ({"k": 3, "sources": ["docs"]}, 3)):
        model = scripted_model(**arguments)
        Runner.run_sync(_agent(tool, model), QUESTION, run_config=NO_TRACING)
        assert len(_documents(_tool_output(model.calls[1]))) == count


async def test_model_fixable_errors_are_the_tools_answer(acme: Served) -> None:
    tool = scopegate_function_tool(acme.url, token=acme.agent_token("alice"))
    model = scripted_model(sources=["nope"])
    await Runner.run(_agent(tool, model), QUESTION, run_config=NO_TRACING)
    assert _tool_output(model.calls[1]).startswith("not_found: ")


async def test_identity_errors_raise_for_the_application(acme: Served) -> None:
    tool = scopegate_function_tool(acme.url, token="not-a-token")
    model = scripted_model()
    # The SDK raises its UserError out of Runner.run, caused by the scopegate error.
    with pytest.raises(UserError) as raised:
        await Runner.run(_agent(tool, model), QUESTION, run_config=NO_TRACING)
    assert isinstance(raised.value.__cause__, InvalidToken)
    assert len(model.calls) == 1  # the model never saw anything about it

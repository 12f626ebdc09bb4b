"""OpenAI Agents SDK integration: retrieval through scopegate as a function tool.

:func:`scopegate_function_tool` builds a ``FunctionTool`` whose arguments are what a
model may choose (``query``, and optionally ``k`` and ``sources``) and never identity:
the delegation token is the one given here, or, when none is, the run context's
``delegation_token`` (``Runner.run(agent, input, context=...)``), so one agent
definition can serve many delegations. The model gets numbered passages naming each
chunk's source and document id.

Mistakes the model can fix (an unknown source, an out of range ``k``) come back as the
tool's output; token, permission and availability errors are never shown to the model:
``Runner.run`` raises the SDK's ``UserError`` for them, whose ``__cause__`` is the
scopegate error (:class:`~scopegate_client.errors.InvalidToken`, ...), for the
application to handle.

Needs the ``openai-agents`` extra: ``pip install 'scopegate-client[openai-agents]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agents import FunctionTool, RunContextWrapper, function_tool

from scopegate_client.client import AsyncScopegateClient, ClientsPerLoop, TokenSource
from scopegate_client.errors import InvalidToken
from scopegate_client.tool_output import MODEL_FIXABLE, error_for_model, format_passages

DEFAULT_DESCRIPTION = (
    "Search the documents you are permitted to read for this task and return the most "
    "relevant passages, each with its source and document id. Use it whenever you need "
    "facts from the organisation's documents."
)


def scopegate_function_tool(
    url: str,
    token: TokenSource | None = None,
    *,
    k: int = 5,
    sources: Sequence[str] | None = None,
    max_tokens: int | None = None,
    timeout_s: float = 30.0,
    name: str = "scopegate_retrieve",
    description: str = DEFAULT_DESCRIPTION,
) -> FunctionTool:
    """A function tool retrieving from the gateway at ``url``.

    ``token`` is the delegation token or a zero-argument callable returning the current
    one; without it, each run's context must carry ``delegation_token``. ``k``,
    ``sources`` and ``max_tokens`` are the defaults when the model gives none.
    """
    clients = ClientsPerLoop(url, token, timeout_s=timeout_s)
    default_k, default_sources = k, list(sources) if sources is not None else None

    def client_for(ctx: RunContextWrapper[Any]) -> AsyncScopegateClient:
        client = clients.for_running_loop()
        if token is not None:
            return client
        delegated = getattr(ctx.context, "delegation_token", None)
        if not isinstance(delegated, str) or not delegated:
            raise InvalidToken("no delegation token: give one to the tool or in the run context")
        return client.with_token(delegated)

    async def retrieve(
        ctx: RunContextWrapper[Any],
        query: str,
        k: int | None = None,
        sources: list[str] | None = None,
    ) -> str:
        """Retrieve passages.

        Args:
            query: What to look for, in natural language.
            k: How many passages to return (optional).
            sources: Restrict the search to these source ids (optional).
        """
        try:
            found = await client_for(ctx).retrieve(
                query,
                default_k if k is None else k,
                default_sources if sources is None else sources,
                max_tokens,
            )
        except MODEL_FIXABLE as exc:
            return error_for_model(exc)
        return format_passages(found.chunks)

    return function_tool(
        retrieve,
        name_override=name,
        description_override=description,
        failure_error_function=None,  # identity and outages raise, never reach the model
    )

"""scopegate-client: the agent side of scopegate.

The HTTP client (sync and async), the errors and the response models of API v1 need
only httpx, pydantic and anyio. The integrations are modules of their own, each with
its extra: :mod:`scopegate_client.langchain`, :mod:`scopegate_client.llamaindex`,
:mod:`scopegate_client.openai_agents` and :mod:`scopegate_client.mcp_server`.
"""

from scopegate_client import client, errors, models
from scopegate_client.client import *  # noqa: F403
from scopegate_client.errors import *  # noqa: F403
from scopegate_client.models import *  # noqa: F403
from scopegate_client.token_exchange import TokenExchange
from scopegate_client.tool_output import format_passages

__version__ = "0.1.0"

__all__ = ["TokenExchange", "format_passages"]
__all__ += client.__all__
__all__ += errors.__all__
__all__ += models.__all__

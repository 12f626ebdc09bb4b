"""Every error scopegate raises: the tree of :mod:`scopegate_client.errors`, plus the
server's own :class:`ConfigurationError`.

The exception classes are part of the wire contract, so they live in the client
distribution (which the server depends on) and are the same objects here: an error
the gateway raises and the one a client raises for its code are one class. See
:mod:`scopegate_client.errors` for the tree, the HTTP status and code of each error,
and what ``message`` and ``detail`` may carry.
"""

from scopegate_client import errors
from scopegate_client.errors import *  # noqa: F403

__all__ = ["ConfigurationError", *errors.__all__]


class ConfigurationError(Exception):
    """The gateway cannot start as configured (server side only; the message says what
    to set). Raised at start-up, never while serving a request."""

"""The Python client of a running gateway: :mod:`scopegate_client`, under its old name.

The client, its errors and the response models are the agent side of scopegate and
ship in the ``scopegate-client`` distribution, which installs without the server's
dependencies; this module re-exports the client and the response models for code
written against ``gateway.client``.
"""

from scopegate_client import client, models
from scopegate_client.client import *  # noqa: F403
from scopegate_client.models import *  # noqa: F403

__all__ = client.__all__ + models.__all__

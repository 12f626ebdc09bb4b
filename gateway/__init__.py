"""scopegate: a pre-retrieval authorization gateway for AI agents."""

__version__ = "0.1.0"

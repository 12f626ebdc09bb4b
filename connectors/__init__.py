"""Vector-store connectors: one small interface, one module per store."""

from connectors.base import Candidate, ChunkRecord, VectorStore

__all__ = ["Candidate", "ChunkRecord", "VectorStore"]

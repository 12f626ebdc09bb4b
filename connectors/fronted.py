"""Source configs of the connectors, and opening the store a registered source names.

A source config names a collection scopegate manages (nothing, or where its store
lives) or, with ``collection`` and ``mapping``, one it fronts (``kind`` ``chroma`` with
``path`` or ``url``; ``qdrant`` with ``path`` or ``url``, ``text_field``, ``vector``).
:func:`source_config` validates and normalises it before it is registered.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from connectors.base import VectorStore
from connectors.mapping import parse_mapping
from gateway.errors import InvalidRequest

FRONTED_KEYS = {
    "chroma": frozenset({"collection", "mapping", "path", "url"}),
    "qdrant": frozenset({"collection", "mapping", "path", "url", "text_field", "vector"}),
}


def is_fronted(config: Mapping[str, Any]) -> bool:
    return "collection" in config


def location(config: Mapping[str, Any]) -> str:
    """Where a fronted collection lives, as the catalog compares it."""
    return str(config.get("url") or config.get("path") or "")


def source_config(kind: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The config to register (422 when a fronted one is incomplete or wrong)."""
    if not is_fronted(config):
        return dict(config)
    if kind not in FRONTED_KEYS:
        raise InvalidRequest(f"a {kind} source cannot front an existing collection")
    unknown = set(config) - FRONTED_KEYS[kind]
    if unknown:
        raise InvalidRequest(f"unknown source config keys {sorted(unknown)}")
    collection = config.get("collection")
    if not isinstance(collection, str) or not collection or len(collection) > 255:
        raise InvalidRequest("collection must name an existing collection")
    if (config.get("path") is None) == (config.get("url") is None):
        raise InvalidRequest("a fronted collection needs exactly one of path or url")
    normal = dict(config)
    if normal.get("path") is not None:
        normal["path"] = os.path.realpath(str(normal["path"]))
    normal["mapping"] = parse_mapping(config.get("mapping")).model_dump(exclude_defaults=True)
    return normal


def open_fronted(
    kind: str,
    config: Mapping[str, Any],
    tenant: str,
    source: str,
    headers: Mapping[str, str] | None = None,
) -> VectorStore:
    """The read-only store of a fronted collection, bound to its (tenant, source)."""
    mapping = parse_mapping(config["mapping"])
    path = config.get("path")
    url = config.get("url")
    if kind == "qdrant":
        from connectors.qdrant import QdrantStore

        return QdrantStore(
            path=path,
            url=url,
            collection=str(config["collection"]),
            mapping=mapping,
            tenant=tenant,
            source=source,
            text_field=str(config.get("text_field") or "text"),
            vector=config.get("vector"),
        )
    from connectors.chroma_fronted import FrontedChromaStore

    return FrontedChromaStore(
        tenant, source, str(config["collection"]), mapping, path=path, url=url, headers=headers
    )


def open_qdrant(config: Mapping[str, Any], data_dir: Path) -> VectorStore:
    """A managed Qdrant store: the config's ``url`` or ``path``, else the data directory."""
    from connectors.qdrant import QdrantStore

    if config.get("url"):
        return QdrantStore(url=str(config["url"]))
    return QdrantStore(path=str(config.get("path") or data_dir / "qdrant"))

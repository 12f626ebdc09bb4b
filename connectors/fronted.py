"""Source configs of the connectors, and opening the store a registered source names.

A source config names a collection scopegate manages (nothing, or where its store
lives) or, with ``collection`` and ``mapping``, one it fronts (``kind`` ``chroma`` with
``path`` or ``url``; ``qdrant`` with ``path`` or ``url`` and ``api_key``, ``text_field``,
``vector``). :func:`source_config` validates and normalises it before it is registered;
:func:`public_config` is what the API and the CLI show of it (secrets masked).

A Qdrant ``path`` is local mode: one process owns the directory, so it is for
development; :func:`production_problems` says so for a production gateway.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from connectors.base import VectorStore
from connectors.mapping import parse_mapping
from gateway.errors import InvalidRequest

FRONTED_KEYS = {
    "chroma": frozenset({"collection", "mapping", "path", "url"}),
    "qdrant": frozenset(
        {"collection", "mapping", "path", "url", "api_key", "text_field", "vector"}
    ),
}
#: Config keys holding secrets: stored for the store's client, never shown back.
SECRET_KEYS = frozenset({"api_key"})
MASK = "***"


class QdrantConfig(BaseModel):
    """Where a Qdrant source lives: local mode (``path``) or a server (``url``, ``api_key``)."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(default=None, min_length=1, max_length=4096)
    url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/\S*)?$", max_length=2048)
    api_key: str | None = Field(default=None, min_length=1, max_length=4096)

    @model_validator(mode="after")
    def _one_place(self) -> QdrantConfig:
        if self.path is not None and self.url is not None:
            raise ValueError("give path (local mode) or url (a server), not both")
        if self.api_key is not None and self.url is None:
            raise ValueError("api_key goes with url: local mode has no key")
        return self


def qdrant_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The location keys of a Qdrant config, validated (422 with pydantic's reasons)."""
    place = {k: config[k] for k in ("path", "url", "api_key") if k in config}
    try:
        return QdrantConfig.model_validate(place).model_dump(exclude_none=True)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidRequest(f"invalid qdrant config: {reasons}") from exc


def public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A source config as the API and the CLI show it: secrets masked."""
    return {k: (MASK if k in SECRET_KEYS and v else v) for k, v in config.items()}


def production_problems(kind: str, config: Mapping[str, Any]) -> list[str]:
    """Why a production gateway refuses to register this source (one sentence each)."""
    if kind == "qdrant" and not config.get("url"):
        return [
            "Qdrant local mode (a path, or the data directory) lives in one replica: give "
            "url (and api_key) of the Qdrant server"
        ]
    if kind == "chroma" and is_fronted(config) and config.get("path"):
        return [
            "a fronted embedded Chroma collection lives in one replica's files: give the url "
            "of the Chroma server"
        ]
    return []


def is_fronted(config: Mapping[str, Any]) -> bool:
    return "collection" in config


def location(config: Mapping[str, Any]) -> str:
    """Where a fronted collection lives, as the catalog compares it."""
    return str(config.get("url") or config.get("path") or "")


def source_config(kind: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The config to register (422 when a fronted one is incomplete or wrong)."""
    if not is_fronted(config):
        if kind == "qdrant":
            unknown = set(config) - {"path", "url", "api_key"}
            if unknown:
                raise InvalidRequest(f"unknown source config keys {sorted(unknown)}")
            return qdrant_config(config)
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
    if kind == "qdrant":
        normal.update(qdrant_config(config))
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
            api_key=config.get("api_key"),
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
        return QdrantStore(url=str(config["url"]), api_key=config.get("api_key"))
    return QdrantStore(path=str(config.get("path") or data_dir / "qdrant"))

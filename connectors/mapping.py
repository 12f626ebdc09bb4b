"""Fronted collections: how the metadata of a collection scopegate did not write is read.

A platform team registers a collection its own pipeline filled (Chroma, Qdrant) with a
:class:`FieldMapping`: the metadata field holding the document id, the folder path
(``eng/runbooks`` becomes the nested folders ``eng`` and ``eng__runbooks`` of the
source), and the viewer, agent and owner fields, whose values are principals written as
scopegate refs (``user:alice``, ``group:eng#member``) or with a prefix of the
``prefixes`` map (``grp:eng`` with ``{"grp:": "group:{}#member"}``). With
``updated_at`` (a field holding when the pipeline last wrote the chunk, as a number such
as epoch seconds) a sync reads only what changed since the last one.

Only scalar metadata is ever read (THREATS, "A store's metadata can lie": chromadb can
hand a record the array-valued metadata of a deleted collection). An ACL field is a
string of principals separated by ``separator``; a store whose lists are its own
(Qdrant payloads) may also hold a list of strings there, and says so with
``lists=True``. Anything else in an ACL field grants nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from connectors.base import Metadata
from gateway.errors import InvalidRequest

#: Joins the segments of a folder path into one folder id (segments may not hold it).
FOLDER_SEPARATOR = "__"
_FIELD = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_FOLDER_DEPTH = 8


class FieldMapping(BaseModel):
    """Which metadata fields of a fronted collection hold what scopegate needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    document_id: str = Field(description="field holding the document id of a chunk")
    folder: str | None = Field(default=None, description="field holding a path like a/b")
    viewers: str | None = Field(default=None, description="field listing viewer principals")
    agents: str | None = Field(default=None, description="field listing agent principals")
    owner: str | None = Field(default=None, description="field naming the owning user")
    updated_at: str | None = Field(
        default=None, description="numeric field: when the chunk was last written upstream"
    )
    separator: str = Field(default=",", min_length=1, max_length=4)
    prefixes: dict[str, str] = Field(
        default_factory=dict,
        description='prefix -> template with one "{}", e.g. {"grp:": "group:{}#member"}',
    )

    @field_validator("document_id", "folder", "viewers", "agents", "owner", "updated_at")
    @classmethod
    def _field_name(cls, value: str | None) -> str | None:
        if value is not None and not _FIELD.match(value):
            raise ValueError("a field name is 1-128 letters, digits or _ . : -")
        return value

    @field_validator("prefixes")
    @classmethod
    def _templates(cls, value: dict[str, str]) -> dict[str, str]:
        for prefix, template in value.items():
            if not prefix or template.count("{}") != 1:
                raise ValueError(f"prefix {prefix!r}: template needs exactly one '{{}}'")
        return value

    def fields(self) -> frozenset[str]:
        """Fields the mapping reads (kept out of the metadata returned to agents)."""
        named = (
            self.document_id,
            self.folder,
            self.viewers,
            self.agents,
            self.owner,
            self.updated_at,
        )
        return frozenset(f for f in named if f is not None)

    def principal(self, raw: str) -> str:
        """One upstream principal as a scopegate ref (``grp:eng`` -> ``group:eng#member``)."""
        value = raw.strip()
        for prefix in sorted(self.prefixes, key=len, reverse=True):
            if value.startswith(prefix):
                return self.prefixes[prefix].replace("{}", value[len(prefix) :], 1)
        return value


def parse_mapping(value: object) -> FieldMapping:
    """The mapping of a source config (422 with pydantic's reasons when it is wrong)."""
    try:
        return FieldMapping.model_validate(value)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'mapping'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidRequest(f"invalid field mapping: {reasons}") from exc


@dataclass(frozen=True, slots=True)
class DocumentAcl:
    """A fronted document's ACL as its chunks state it (principals as refs)."""

    id: str
    folders: tuple[str, ...] = ()
    viewers: tuple[str, ...] = ()
    agents: tuple[str, ...] = ()
    owner: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "folders": list(self.folders),
            "viewers": list(self.viewers),
            "agents": list(self.agents),
            "owner": self.owner,
        }

    @property
    def fingerprint(self) -> str:
        raw = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()[:32]


@dataclass(slots=True)
class AclScan:
    """Every document a fronted collection names, and the chunks that name none."""

    documents: dict[str, DocumentAcl] = field(default_factory=dict)
    #: chunks without a usable document id (never served, never granted)
    orphans: int = 0
    #: documents whose chunks disagree on the ACL or folder: granted nothing
    inconsistent: set[str] = field(default_factory=set)
    #: chunks per document
    chunks: dict[str, int] = field(default_factory=dict)
    #: only the documents changed since a mark were read (removals are not seen)
    partial: bool = False
    #: the next incremental sync's mark: the newest ``updated_at`` of the first page
    high_water: float | None = None
    #: pages of chunks :meth:`stamp` was given
    pages: int = 0

    def stamp(self, page: Sequence[Mapping[str, Any] | None], mapping: FieldMapping) -> None:
        """Take the mark from the scan's first page: the newest ``updated_at`` in it.

        A scan of several pages is no snapshot: a chunk rewritten while it runs, in a
        page already read, can be stamped below what a later page shows, and a mark
        taken from the whole scan would leave it unread by every incremental sync.
        Whatever is written after the first page was read is stamped at or after that
        page's newest ``updated_at`` (the pipeline's clock does not go back), so the next
        sync, reading from it, misses nothing; it may read a few documents again.
        """
        if self.pages == 0:
            for metadata in page:
                value = updated_at_of(metadata, mapping)
                if value is not None and (self.high_water is None or value > self.high_water):
                    self.high_water = value
        self.pages += 1

    def add(self, acl: DocumentAcl | None) -> None:
        if acl is None:
            self.orphans += 1
            return
        self.chunks[acl.id] = self.chunks.get(acl.id, 0) + 1
        seen = self.documents.get(acl.id)
        if seen is None:
            self.documents[acl.id] = acl
        elif seen != acl:
            self.inconsistent.add(acl.id)
            self.documents[acl.id] = DocumentAcl(acl.id)


def scalar(value: object) -> bool:
    return isinstance(value, str | int | float | bool)


def scalar_metadata(metadata: Mapping[str, Any] | None, hidden: frozenset[str]) -> Metadata:
    """What agents see of a chunk's metadata: scalars only, mapping fields left out."""
    return {str(k): v for k, v in (metadata or {}).items() if k not in hidden and scalar(v)}


def updated_at_of(metadata: Mapping[str, Any] | None, mapping: FieldMapping) -> float | None:
    """The chunk's ``updated_at`` as a number (None when unmapped, missing or not one)."""
    if mapping.updated_at is None:
        return None
    value = (metadata or {}).get(mapping.updated_at)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def document_id_of(metadata: Mapping[str, Any] | None, mapping: FieldMapping) -> str | None:
    """The chunk's document id, only if the field holds a non-empty string."""
    value = (metadata or {}).get(mapping.document_id)
    return value if isinstance(value, str) and value else None


def acl_of(
    metadata: Mapping[str, Any] | None, mapping: FieldMapping, *, lists: bool = False
) -> DocumentAcl | None:
    """The ACL one chunk states, None when it names no document."""
    meta = metadata or {}
    document_id = document_id_of(meta, mapping)
    if document_id is None:
        return None
    return DocumentAcl(
        document_id,
        folder_chain(_string(meta, mapping.folder)),
        _principals(meta, mapping.viewers, mapping, lists),
        _principals(meta, mapping.agents, mapping, lists),
        _owner(meta, mapping),
    )


def folder_chain(path: str | None) -> tuple[str, ...]:
    """``eng/runbooks`` -> ``("eng", "eng__runbooks")``; a bad path is no folder at all."""
    if not path:
        return ()
    segments = [s for s in path.strip("/").split("/") if s]
    if not segments or len(segments) > MAX_FOLDER_DEPTH:
        return ()
    if any(not _SEGMENT.match(s) or FOLDER_SEPARATOR in s for s in segments):
        return ()
    return tuple(FOLDER_SEPARATOR.join(segments[: i + 1]) for i in range(len(segments)))


def _string(meta: Mapping[str, Any], key: str | None) -> str | None:
    value = meta.get(key) if key is not None else None
    return value if isinstance(value, str) else None


def _principals(
    meta: Mapping[str, Any], key: str | None, mapping: FieldMapping, lists: bool
) -> tuple[str, ...]:
    if key is None:
        return ()
    value = meta.get(key)
    raw: Sequence[object]
    if isinstance(value, str):
        raw = value.split(mapping.separator)
    elif lists and isinstance(value, list):
        raw = value
    else:
        return ()
    refs = {mapping.principal(v) for v in raw if isinstance(v, str) and v.strip()}
    return tuple(sorted(refs))


def _owner(meta: Mapping[str, Any], mapping: FieldMapping) -> str | None:
    value = _string(meta, mapping.owner)
    return mapping.principal(value) if value and value.strip() else None

"""ACL sync: make OpenFGA say what a source's own ACLs say (DESIGN §4, ``/sync``).

The source's ACLs are, for a fronted collection, what its chunks' metadata states
(through the source's field mapping), and for a managed source the ACLs it was last
ingested with (the catalog's ``documents.acl``; documents still being written are left
alone). The plan compares them with the tuples OpenFGA holds now, so a second run
finds nothing to do and a run that stopped half-way is finished by the next one.

Order, so that nothing is ever wider than either the old or the new ACL:

- deletes first (narrowing), in transactions of at most 100 tuples;
- then the writes: folders, grants and parents, and each new document's tenant stamp
  last of all, so a document no one had synced before becomes visible only once its
  grants are in.

A fronted collection whose mapping names ``updated_at`` is read incrementally: only the
documents one of whose chunks was written at or after the high-water mark of the last
completed sync (the newest ``updated_at`` of the first page it read, kept in the
catalog's sync state: see :meth:`connectors.mapping.AclScan.stamp`), all their chunks;
the first sync and ``full`` read everything (and only they see documents removed
upstream).

A fronted document whose chunks disagree on its ACL, or that names no valid id, is
granted nothing. Principals that are not valid refs are skipped (reported), which only
narrows. Every folder and document is claimed for the source in the catalog first:
another source's name refuses the whole sync with 409, nothing written.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from connectors.mapping import AclScan, DocumentAcl
from gateway.catalog import SourceCatalog
from gateway.errors import Conflict, InvalidIdentifier, InvalidRequest
from gateway.fga import FgaClient, Tuple
from gateway.ids import fga_object, is_valid_scoped_id
from gateway.ingestion import INGESTION_RELATIONS
from gateway.relationships import AGENT_TYPES, VIEWER_TYPES, local_tuple, principal, subject

#: OpenFGA's default limit of tuples per Write transaction.
BATCH = 100
READ_PARALLEL = 16
MAX_PROBLEMS = 50
FOLDER_RELATIONS = frozenset({"tenant", "parent"})


class FrontedStore(Protocol):
    """What sync needs from a fronted collection's connector."""

    async def scan_acls(self, since: float | None = None) -> AclScan: ...


@dataclass(slots=True)
class Wanted:
    """The tuples a source's ACLs call for, object by object."""

    documents: dict[str, set[Tuple]] = field(default_factory=dict)
    folders: dict[str, set[Tuple]] = field(default_factory=dict)
    stamps: set[Tuple] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    def without(self, documents: set[str]) -> Wanted:
        """The same folders, without ``documents`` (skipped by an incremental sync)."""
        kept = {d: t for d, t in self.documents.items() if d not in documents}
        stamps = {t for tuples in kept.values() for t in tuples} & self.stamps
        return Wanted(kept, self.folders, stamps, self.problems)


@dataclass(slots=True)
class SyncPlan:
    """The diff: ``deletes`` then ``writes`` (stamps last), and what was already right."""

    deletes: list[Tuple]
    writes: list[Tuple]
    unchanged: int
    folders: list[str]
    documents: list[str]
    problems: list[str]

    def counts(self) -> dict[str, int]:
        return {
            "writes": len(self.writes),
            "deletes": len(self.deletes),
            "unchanged": self.unchanged,
        }

    def diff(self, tenant: str) -> dict[str, list[dict[str, str]]]:
        """The diff in the tenant-local form API callers write."""
        return {
            "deletes": [local_tuple(tenant, t) for t in self.deletes],
            "writes": [local_tuple(tenant, t) for t in self.writes],
        }


# -- what the source says (pure) ---------------------------------------------------------


def wanted_tuples(tenant: str, source: str, acls: Iterable[DocumentAcl]) -> Wanted:
    """Tuples for each document and folder the ACLs name (invalid principals skipped)."""
    wanted = Wanted()
    tenant_obj = fga_object("tenant", tenant, tenant)
    source_obj = fga_object("source", tenant, source)
    for acl in acls:
        if not is_valid_scoped_id(tenant, "document", acl.id):
            wanted.problem(f"document id {acl.id[:140]!r} is not valid: never granted")
            continue
        document = fga_object("document", tenant, acl.id)
        parent = source_obj
        for folder in acl.folders:
            if not is_valid_scoped_id(tenant, "folder", folder):
                wanted.problem(f"{acl.id}: folder {folder[:140]!r} is not valid: left out")
                break
            folder_obj = fga_object("folder", tenant, folder)
            wanted.folders.setdefault(folder, set()).update(
                {Tuple(tenant_obj, "tenant", folder_obj), Tuple(parent, "parent", folder_obj)}
            )
            parent = folder_obj
        tuples = {Tuple(parent, "parent", document)}
        tuples |= _grants(wanted, tenant, acl, document)
        stamp = Tuple(tenant_obj, "tenant", document)
        wanted.stamps.add(stamp)
        wanted.documents[acl.id] = tuples | {stamp}
    return wanted


def _grants(wanted: Wanted, tenant: str, acl: DocumentAcl, document: str) -> set[Tuple]:
    found: set[Tuple] = set()
    for values, types, relation in (
        (acl.viewers, VIEWER_TYPES, "viewer"),
        (acl.agents, AGENT_TYPES, "agent_viewer"),
    ):
        for value in values:
            try:
                found.add(Tuple(subject(tenant, value, types), relation, document))
            except (InvalidRequest, InvalidIdentifier) as exc:
                wanted.problem(f"{acl.id}: {relation} {value[:140]!r} skipped: {exc.message}")
    if acl.owner is not None:
        try:
            owner = fga_object("user", tenant, principal(tenant, acl.owner, "user"))
            found.add(Tuple(owner, "owner", document))
        except (InvalidRequest, InvalidIdentifier) as exc:
            wanted.problem(f"{acl.id}: owner {acl.owner[:140]!r} skipped: {exc.message}")
    return found


def managed_acls(rows: Iterable[tuple[str, str | None, str | None]]) -> list[DocumentAcl]:
    """ACLs of a managed source from its catalog rows ``(id, folder, acl json)``."""
    acls = []
    for document_id, folder, raw in rows:
        acl: Mapping[str, Any] = json.loads(raw) if raw else {}
        acls.append(
            DocumentAcl(
                document_id,
                (folder,) if folder else (),
                tuple(str(v) for v in acl.get("viewers") or []),
                tuple(str(a) for a in acl.get("agents") or []),
                None if acl.get("owner") is None else str(acl["owner"]),
            )
        )
    return acls


def already_synced(
    acls: Iterable[DocumentAcl], wanted: Wanted, fingerprints: Mapping[str, str | None]
) -> set[str]:
    """Fronted documents whose ACL is the one the last complete sync wrote (incremental)."""
    return {
        a.id
        for a in acls
        if a.id in wanted.documents and fingerprints.get(a.id) == fronted_fingerprint(a)
    }


def fronted_fingerprint(acl: DocumentAcl | None) -> str:
    """What the catalog records for a synced fronted document (``None``: inconsistent)."""
    return "fronted:inconsistent" if acl is None else f"fronted:{acl.fingerprint}"


def plan(
    wanted: Wanted,
    current_documents: Mapping[str, set[Tuple]],
    current_folders: Mapping[str, set[Tuple]],
    *,
    own_folders: bool,
) -> SyncPlan:
    """Diff what is wanted against what OpenFGA holds.

    ``current_documents`` covers every document to reconcile (one wanted nothing for
    loses all its ingestion tuples); folders' tuples are deleted only when the source
    owns its folder tree (``own_folders``: fronted sources, whose paths come from the
    store), never links an admin made between a managed source's folders.
    """
    deletes: list[Tuple] = []
    writes: list[Tuple] = []
    unchanged = 0
    for folder in sorted(set(wanted.folders) | set(current_folders)):
        want = wanted.folders.get(folder, set())
        have = current_folders.get(folder, set())
        if own_folders:
            deletes += sorted(have - want, key=_order)
        writes += sorted(want - have, key=_order)
        unchanged += len(have & want)
    stamps: list[Tuple] = []
    for document in sorted(set(wanted.documents) | set(current_documents)):
        want = wanted.documents.get(document, set())
        have = current_documents.get(document, set())
        # The stamp leads the deletes: a document that loses it is hidden at once.
        deletes += sorted(have - want, key=lambda t: (t.relation != "tenant", *_order(t)))
        new = want - have
        writes += sorted((t for t in new if t not in wanted.stamps), key=_order)
        stamps += sorted((t for t in new if t in wanted.stamps), key=_order)
        unchanged += len(have & want)
    return SyncPlan(
        deletes=deletes,
        writes=writes + stamps,
        unchanged=unchanged,
        folders=sorted(wanted.folders),
        documents=sorted(wanted.documents),
        problems=list(wanted.problems),
    )


def _order(t: Tuple) -> tuple[str, str, str]:
    return (t.object, t.relation, t.user)


# -- reading and applying ------------------------------------------------------------------


class SourceSync:
    """Reads OpenFGA's side of a source and applies a plan in bounded transactions."""

    def __init__(self, fga: FgaClient, catalog: SourceCatalog) -> None:
        self.fga = fga
        self.catalog = catalog

    async def current(
        self, tenant: str, documents: Sequence[str], folders: Sequence[str]
    ) -> tuple[dict[str, set[Tuple]], dict[str, set[Tuple]]]:
        """The ingestion tuples of ``documents`` and the tree tuples of ``folders``."""
        docs = await self._read(tenant, "document", documents, INGESTION_RELATIONS)
        tree = await self._read(tenant, "folder", folders, FOLDER_RELATIONS)
        return docs, tree

    async def _read(
        self, tenant: str, type_name: str, ids: Sequence[str], relations: frozenset[str]
    ) -> dict[str, set[Tuple]]:
        found: dict[str, set[Tuple]] = {}
        valid = [i for i in dict.fromkeys(ids) if is_valid_scoped_id(tenant, type_name, i)]
        for start in range(0, len(valid), READ_PARALLEL):
            part = valid[start : start + READ_PARALLEL]
            answers = await asyncio.gather(
                *(self.fga.read(object=fga_object(type_name, tenant, i)) for i in part)
            )
            for name, tuples in zip(part, answers, strict=True):
                found[name] = {
                    Tuple(t.user, t.relation, t.object)
                    for t in tuples
                    if t.relation in relations and t.expires_at is None
                }
        return found

    async def check_owners(
        self, tenant: str, source: str, folders: Sequence[str], documents: Sequence[str]
    ) -> None:
        """Conflict (nothing claimed) if another source owns one of the names."""
        for kind, names in (("folder", folders), ("document", documents)):
            owners = await self.catalog.owners(tenant, kind, names)
            foreign = sorted(n for n, owner in owners.items() if owner not in (None, source))
            if foreign:
                raise Conflict(f"{kind} {foreign[0]} belongs to another source")

    async def apply(self, sync: SyncPlan, progress: Callable[[int], object] | None = None) -> None:
        """Deletes, then writes, at most :data:`BATCH` tuples per transaction."""
        for start in range(0, len(sync.deletes), BATCH):
            part = sync.deletes[start : start + BATCH]
            await self.fga.write(deletes=part)
            if progress is not None:
                progress(len(part))
        for start in range(0, len(sync.writes), BATCH):
            part = sync.writes[start : start + BATCH]
            await self.fga.write(part)
            if progress is not None:
                progress(len(part))

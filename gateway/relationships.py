"""Pure builders for the tuples scopegate writes: tasks, documents, admin writes.

Everything a client names goes through :mod:`gateway.ids` here, so the tuples that
reach OpenFGA are always namespaced to the caller's tenant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from gateway.errors import InvalidRequest
from gateway.fga import Tuple
from gateway.ids import PUBLIC_RELATIONS, fga_object, parse_ref, unscoped, validate_id

VIEWER_TYPES = frozenset({"user", "group", "tenant"})
AGENT_TYPES = frozenset({"agent", "group", "tenant"})
SCOPE_TYPES = frozenset({"source", "folder", "document"})
SUBJECT_TYPES = frozenset({"user", "agent", "group", "tenant", "folder", "source"})
OBJECT_TYPES = frozenset({"tenant", "group", "source", "folder", "document"})

# relation -> object types it may be written on (the public vocabulary, DESIGN §4).
RELATION_OBJECTS: Mapping[str, frozenset[str]] = {
    "member": frozenset({"group", "tenant"}),
    "admin": frozenset({"tenant"}),
    "reviewer": frozenset({"tenant"}),
    "parent": frozenset({"folder", "document"}),
    "owner": frozenset({"document"}),
    "viewer": frozenset({"source", "folder", "document"}),
    "agent_viewer": frozenset({"source", "folder", "document"}),
}


def subject(tenant: str, value: object, allowed: frozenset[str]) -> str:
    """A client subject (``user:alice``, ``group:eng#member``) in OpenFGA form."""
    ref = parse_ref(value, tenant, allowed, allow_relation=True)
    if ref.type in {"group", "tenant"} and ref.relation != "member":
        raise InvalidRequest(f"{ref.type} subjects must be written as '{ref.type}:id#member'")
    if ref.type not in {"group", "tenant"} and ref.relation is not None:
        raise InvalidRequest(f"{ref.type} subjects take no '#relation'")
    return ref.to_fga(tenant)


def principal(tenant: str, value: object, type_name: str) -> str:
    """``user:alice`` or bare ``alice`` -> ``alice`` (validated)."""
    if isinstance(value, str) and value.startswith(f"{type_name}:"):
        return parse_ref(value, tenant, frozenset({type_name})).id
    return validate_id(value, type_name)


def task_tuples(
    tenant: str,
    task_id: str,
    user: str,
    agent: str,
    scope: Sequence[object],
    expires_at: datetime | None,
) -> list[Tuple]:
    """Binding, liveness and scope tuples of a new task."""
    if not scope:
        raise InvalidRequest("a task needs at least one scope entry")
    task = fga_object("task", tenant, task_id)
    tenant_obj = fga_object("tenant", tenant, tenant)
    tuples = [
        Tuple(tenant_obj, "tenant", task),
        Tuple(tenant_obj, "live", task, expires_at),
        Tuple(fga_object("user", tenant, user), "delegator", task),
        Tuple(fga_object("agent", tenant, agent), "executor", task),
    ]
    for entry in scope:
        ref = parse_ref(entry, tenant, SCOPE_TYPES)
        tuples.append(Tuple(task, "scoped_task", ref.to_fga(tenant), expires_at))
    return tuples


def document_tuples(
    tenant: str,
    source: str,
    document_id: str,
    folder: str | None,
    acl: Mapping[str, Any],
) -> list[Tuple]:
    """Tenant stamp, parent, owner and grants of one ingested document."""
    document = fga_object("document", tenant, document_id)
    source_obj = fga_object("source", tenant, source)
    tuples = [Tuple(fga_object("tenant", tenant, tenant), "tenant", document)]
    if folder is not None:
        folder_obj = fga_object("folder", tenant, validate_id(folder, "folder"))
        tuples += [
            Tuple(fga_object("tenant", tenant, tenant), "tenant", folder_obj),
            Tuple(source_obj, "parent", folder_obj),
            Tuple(folder_obj, "parent", document),
        ]
    else:
        tuples.append(Tuple(source_obj, "parent", document))
    for viewer in _list(acl, "viewers"):
        tuples.append(Tuple(subject(tenant, viewer, VIEWER_TYPES), "viewer", document))
    for agent in _list(acl, "agents"):
        tuples.append(Tuple(subject(tenant, agent, AGENT_TYPES), "agent_viewer", document))
    owner = acl.get("owner")
    if owner is not None:
        tuples.append(
            Tuple(fga_object("user", tenant, principal(tenant, owner, "user")), "owner", document)
        )
    return tuples


def source_tuples(tenant: str, source: str) -> list[Tuple]:
    return [
        Tuple(fga_object("tenant", tenant, tenant), "tenant", fga_object("source", tenant, source))
    ]


def admin_tuple(tenant: str, write: Mapping[str, Any]) -> Tuple:
    """One ``{"user", "relation", "object"}`` from /v1/relationships, checked and namespaced."""
    relation = write.get("relation")
    if relation not in PUBLIC_RELATIONS:
        raise InvalidRequest(f"relation must be one of {sorted(PUBLIC_RELATIONS)}")
    obj = parse_ref(write.get("object"), tenant, OBJECT_TYPES)
    if obj.type not in RELATION_OBJECTS[str(relation)]:
        raise InvalidRequest(f"relation {relation!r} cannot be written on {obj.type} objects")
    user = subject(tenant, write.get("user"), SUBJECT_TYPES)
    return Tuple(user, str(relation), obj.to_fga(tenant))


def _list(acl: Mapping[str, Any], key: str) -> list[object]:
    value = acl.get(key, [])
    if not isinstance(value, list):
        raise InvalidRequest(f"acl.{key} must be a list")
    return value


def local_tuple(tenant: str, t: Tuple) -> dict[str, str]:
    """A tuple of ``tenant`` in the typed, tenant-local form API callers write."""
    return {
        "user": _local(tenant, t.user),
        "relation": t.relation,
        "object": _local(tenant, t.object),
    }


def _local(tenant: str, value: str) -> str:
    head, sep, relation = value.partition("#")
    type_name, _, object_id = head.partition(":")
    bare = object_id if type_name == "tenant" else unscoped(tenant, object_id)
    return f"{type_name}:{bare}{sep}{relation}"

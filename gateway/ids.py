"""Identifier validation and per-tenant namespacing.

Clients write bare ids (``d1``) and typed ids local to their tenant
(``document:d1``, ``group:eng#member``). Only this module turns them into OpenFGA
ids (``document:acme/d1``), so two tenants' ids can never collide and nothing a
client sends can smuggle a separator into a tuple.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import Forbidden, InvalidIdentifier

MAX_ID_LENGTH = 128
# OpenFGA's limits on the two sides of a tuple or check (openfga/api, openfga/v1:
# TupleKey and CheckRequestTupleKey): ``object`` matches ``^[^\s]{2,256}$``, ``user``
# is at most 512 bytes. Ids here are ASCII, so characters are bytes. A namespaced id
# (``document:<tenant>/<id>``) can exceed them although tenant and id are each valid:
# only the combination decides.
MAX_FGA_OBJECT = 256
MAX_FGA_USER = 512
# Types the model never relates anything to: they only ever stand on the user side.
SUBJECT_ONLY_TYPES = frozenset({"user", "agent"})
# ASCII only: ids that differ by case stay distinct, and unicode look-alikes,
# separators (# : @ /), whitespace and control characters are refused outright.
_BARE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SEPARATOR = "/"
# Published in the OpenAPI schema so that clients and schema-driven tools see the
# charset; the validators here stay the authority (they also refuse "..").
ID_PATTERN = _BARE_ID.pattern

OBJECT_TYPES = frozenset(
    {"user", "agent", "tenant", "group", "task", "source", "folder", "document"}
)
PUBLIC_RELATIONS = frozenset(
    {"member", "admin", "reviewer", "parent", "owner", "viewer", "agent_viewer"}
)
REF_PATTERN = rf"^({'|'.join(sorted(OBJECT_TYPES))}):[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}(#member)?$"


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is an acceptable bare id, else raise InvalidIdentifier."""
    if not isinstance(value, str) or not _BARE_ID.fullmatch(value) or ".." in value:
        raise InvalidIdentifier(
            f"{what} must be 1-{MAX_ID_LENGTH} characters of A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    return value


def scoped(tenant: str, bare_id: str) -> str:
    """The namespaced id of ``bare_id`` inside ``tenant`` (both already validated)."""
    return f"{tenant}{SEPARATOR}{bare_id}"


def unscoped(tenant: str, namespaced: str) -> str:
    """Inverse of :func:`scoped`; raises if the id is not in ``tenant``."""
    prefix = f"{tenant}{SEPARATOR}"
    if not namespaced.startswith(prefix):
        raise InvalidIdentifier("identifier belongs to another tenant")
    return namespaced[len(prefix) :]


@dataclass(frozen=True, slots=True)
class TypedRef:
    """A client-side typed reference such as ``group:eng#member``."""

    type: str
    id: str
    relation: str | None = None

    def to_fga(self, tenant: str) -> str:
        """The OpenFGA form, namespaced per tenant (tenants are their own namespace).

        Raises InvalidIdentifier when that form would not fit OpenFGA's limits.
        """
        base = fga_object(self.type, tenant, self.id)
        if self.relation is None:
            return base
        return _fitting(f"{base}#{self.relation}", MAX_FGA_USER, self.type)

    def __str__(self) -> str:
        base = f"{self.type}:{self.id}"
        return f"{base}#{self.relation}" if self.relation else base


def parse_ref(
    value: object,
    tenant: str,
    allowed_types: frozenset[str] = OBJECT_TYPES,
    allow_relation: bool = False,
) -> TypedRef:
    """Parse a client typed id, refusing other tenants, unknown types and bad ids."""
    if not isinstance(value, str) or len(value) > 2 * MAX_ID_LENGTH:
        raise InvalidIdentifier("reference must be a string like 'document:d1'")
    head, sep, relation = value.partition("#")
    type_name, colon, bare = head.partition(":")
    if not colon or type_name not in allowed_types:
        raise InvalidIdentifier(
            f"reference {value[:64]!r} must be one of {sorted(allowed_types)} followed by ':id'"
        )
    validate_id(bare, f"{type_name} id")
    if sep and (not allow_relation or relation != "member"):
        raise InvalidIdentifier("only '#member' usersets are accepted")
    if type_name == "tenant" and bare != tenant:
        raise Forbidden("references to another tenant are not accepted")
    return TypedRef(type_name, bare, relation if sep else None)


def fga_object(type_name: str, tenant: str, bare_id: str) -> str:
    """``document:acme/d1`` from its parts; tenants map to ``tenant:acme``.

    The single gate on the way to OpenFGA: both ids are validated, and a form longer
    than OpenFGA accepts on the side this type stands on raises InvalidIdentifier
    (422), before anything is written anywhere.
    """
    validate_id(tenant, "tenant")
    validate_id(bare_id, f"{type_name} id")
    if type_name == "tenant":
        return f"tenant:{bare_id}"
    limit = MAX_FGA_USER if type_name in SUBJECT_ONLY_TYPES else MAX_FGA_OBJECT
    return _fitting(f"{type_name}:{scoped(tenant, bare_id)}", limit, type_name)


def validate_scoped_id(tenant: str, type_name: str, value: object, what: str | None = None) -> str:
    """``value`` if it is a valid bare id whose namespaced form fits OpenFGA in ``tenant``.

    What to call up front on every id of a request before writing anything: it raises
    InvalidIdentifier exactly where :func:`fga_object` would later.
    """
    bare = validate_id(value, what or f"{type_name} id")
    fga_object(type_name, tenant, bare)
    return bare


def is_valid_scoped_id(tenant: str, type_name: str, value: object) -> bool:
    """:func:`validate_scoped_id` as a predicate, for ids read back from a store."""
    try:
        validate_scoped_id(tenant, type_name, value)
    except InvalidIdentifier:
        return False
    return True


def _fitting(form: str, limit: int, type_name: str) -> str:
    if len(form) > limit:
        raise InvalidIdentifier(
            f"{type_name} id is too long for this tenant: its namespaced form has "
            f"{len(form)} characters, OpenFGA accepts at most {limit}"
        )
    return form

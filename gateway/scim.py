"""SCIM 2.0 (RFC 7643, RFC 7644) as identity providers send it, mapped onto the model.

Pure: no I/O, no HTTP framework. The gateway (:mod:`gateway.service`) stores what this
module parses and writes the tuples it implies; :mod:`gateway.identity_api` serves it.

The mapping (DESIGN section 3):

- a User's ``userName`` is its scopegate user id, and an active User is a tenant member
  (``user:U member tenant:T``); ``active: false`` or DELETE deprovisions it;
- a Group's ``displayName`` is its group id, and its ``members`` are ``member`` tuples
  of that group (users, or other groups as ``group:G#member``).

Directory names that are not valid ids (``alice@example.com``, ``Test SCIMv2``) map to
ids by :func:`directory_id`, the one rule both SCIM and token exchange use.

What identity providers actually send, beyond the RFC, is accepted: ``op`` in any case
(``Replace``), PATCH operations without ``path`` whose value object holds attribute
names, dotted sub-attributes (``name.givenName``) or extension URNs; ``active`` as the
strings ``"True"``/``"False"``; member removals as ``path: members`` with a value list;
filter values without quotes. Passwords are never stored.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import InvalidIdentifier
from gateway.ids import validate_id

USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE_SCHEMA = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
LIST_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"
SP_CONFIG_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"
RESOURCE_TYPE_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:ResourceType"
SCHEMA_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Schema"
MEDIA_TYPE = "application/scim+json"

MAX_COUNT = 200  # page size bound (ServiceProviderConfig filter.maxResults)
MAX_OPERATIONS = 1000
MAX_MEMBERS = 10_000
MAX_FILTER = 1000
#: Never stored or returned: ``password`` (Okta sends one), server-owned attributes.
_DROPPED = frozenset({"id", "meta", "schemas", "password", "groups"})

# -- errors ------------------------------------------------------------------------------


class ScimError(Exception):
    """An error answered in SCIM's own shape (RFC 7644 section 3.12)."""

    def __init__(self, status: int, detail: str, scim_type: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.scim_type = scim_type

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.detail, self.scim_type)


def error_body(status: int, detail: str, scim_type: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"schemas": [ERROR_SCHEMA], "status": str(status), "detail": detail}
    if scim_type is not None:
        body["scimType"] = scim_type
    return body


def invalid(detail: str, scim_type: str = "invalidValue") -> ScimError:
    return ScimError(400, detail, scim_type)


# -- the tenant's SCIM secret ----------------------------------------------------------------

SECRET_PREFIX = "sgscim_"
_SECRET = re.compile(r"sgscim_([0-9a-f]{16})_[A-Za-z0-9_-]{32,64}")


def new_secret() -> tuple[str, str]:
    """A fresh SCIM bearer secret and its public id (the id locates its digest)."""
    secret_id = secrets.token_hex(8)
    return secret_id, f"{SECRET_PREFIX}{secret_id}_{secrets.token_urlsafe(32)}"


def secret_id(secret: str) -> str | None:
    match = _SECRET.fullmatch(secret)
    return match.group(1) if match else None


def secret_digest(secret: str) -> str:
    """What is stored: 256 random bits need no slow hash, only a one-way one."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, digest: str) -> bool:
    return hmac.compare_digest(secret_digest(secret), digest)


# -- ids -----------------------------------------------------------------------------------

_ID_CHAR = re.compile(r"[A-Za-z0-9._-]")
_READABLE = {"@": "_at_", " ": "_"}


def directory_id(name: object, what: str = "name") -> str:
    """The scopegate id of a directory name: the name itself when it is a valid id.

    Otherwise ``@`` becomes ``_at_``, a space ``_`` and any other character ``_xHH_``
    per UTF-8 byte (``alice@example.com`` is ``alice_at_example.com``, ``Test SCIMv2``
    is ``Test_SCIMv2``). Two names that map to one id never merge: the second one is
    refused as not unique. Raises InvalidIdentifier when even the mapped form is not an
    id (too long, or not starting with a letter or digit).
    """
    if not isinstance(name, str) or not name:
        raise InvalidIdentifier(f"{what} must be a non-empty string")
    parts = []
    for ch in name:
        if _ID_CHAR.fullmatch(ch):
            parts.append(ch)
        elif ch in _READABLE:
            parts.append(_READABLE[ch])
        else:
            parts.append("".join(f"_x{b:02x}_" for b in ch.encode()))
    mapped = "".join(parts)
    try:
        return validate_id(mapped, what)
    except InvalidIdentifier as exc:
        raise InvalidIdentifier(
            f"{what} {name[:64]!r} does not map to a scopegate id ({mapped[:64]!r}): ids are "
            "1-128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit"
        ) from exc


def name_key(name: str) -> str:
    """``userName`` and ``displayName`` compare without case (RFC 7643: caseExact false)."""
    return name.casefold()


# -- resources ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserState:
    """What the directory says of one user (everything but ``id`` and ``meta``)."""

    user_name: str
    external_id: str | None
    active: bool
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def user_id(self) -> str:
        return directory_id(self.user_name, "userName")

    def document(self) -> dict[str, Any]:
        """The resource as one JSON object, the shape PATCH operations address."""
        doc = copy.deepcopy(self.attributes)
        doc["userName"] = self.user_name
        if self.external_id is not None:
            doc["externalId"] = self.external_id
        doc["active"] = self.active
        return doc


@dataclass(frozen=True, slots=True)
class GroupState:
    """What the directory says of one group; ``members`` are SCIM resource ids."""

    display_name: str
    external_id: str | None
    members: tuple[str, ...] = ()
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def group_id(self) -> str:
        return directory_id(self.display_name, "displayName")

    def document(self) -> dict[str, Any]:
        doc = copy.deepcopy(self.attributes)
        doc["displayName"] = self.display_name
        if self.external_id is not None:
            doc["externalId"] = self.external_id
        doc["members"] = [{"value": m} for m in self.members]
        return doc


def parse_active(value: object) -> bool:
    """``active`` as a boolean; Entra ID sends the strings ``"True"`` and ``"False"``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"true", "false"}:
        return value.strip().lower() == "true"
    raise invalid("active must be true or false")


def _text(body: Mapping[str, Any], key: str, *, required: bool) -> str | None:
    value = _get(body, key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 1024:
        raise invalid(f"{key} must be a non-empty string of at most 1024 characters")
    return value


def parse_user(body: Mapping[str, Any], *, active_default: bool = True) -> UserState:
    """A User from a POST or PUT body (or a patched document); validates ``userName``."""
    if not isinstance(body, Mapping):
        raise invalid("the body must be a JSON object", "invalidSyntax")
    user_name = _text(body, "userName", required=True)
    assert user_name is not None
    try:
        directory_id(user_name, "userName")
    except InvalidIdentifier as exc:
        raise invalid(exc.message) from exc
    raw_active = _get(body, "active")
    active = active_default if raw_active is None else parse_active(raw_active)
    attributes = {
        k: v
        for k, v in body.items()
        if k.lower() not in {"username", "externalid", "active"} and k.lower() not in _DROPPED
    }
    return UserState(user_name, _text(body, "externalId", required=False), active, attributes)


def parse_group(body: Mapping[str, Any]) -> GroupState:
    """A Group from a POST or PUT body (or a patched document); validates ``displayName``."""
    if not isinstance(body, Mapping):
        raise invalid("the body must be a JSON object", "invalidSyntax")
    display_name = _text(body, "displayName", required=True)
    assert display_name is not None
    try:
        directory_id(display_name, "displayName")
    except InvalidIdentifier as exc:
        raise invalid(exc.message) from exc
    raw_members = _get(body, "members")
    if raw_members is None:
        raw_members = []
    if not isinstance(raw_members, list) or len(raw_members) > MAX_MEMBERS:
        raise invalid(f"members must be a list of at most {MAX_MEMBERS} members")
    members = tuple(dict.fromkeys(_member_id(m) for m in raw_members))
    attributes = {
        k: v
        for k, v in body.items()
        if k.lower() not in {"displayname", "externalid", "members"} and k.lower() not in _DROPPED
    }
    return GroupState(display_name, _text(body, "externalId", required=False), members, attributes)


def _member_id(member: object) -> str:
    value = member.get("value") if isinstance(member, Mapping) else None
    if not isinstance(value, str) or not value or len(value) > 256:
        raise invalid("each member needs a 'value': the id of a User or Group")
    return value


def _get(body: Mapping[str, Any], key: str) -> Any:
    """An attribute by name, without case (RFC 7643 section 2.1)."""
    if key in body:
        return body[key]
    lowered = key.lower()
    for k, v in body.items():
        if k.lower() == lowered:
            return v
    return None


def render_user(
    resource_id: str,
    state: UserState,
    *,
    created: str,
    modified: str,
    location: str,
    groups: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """The User as returned: ``groups`` are ``(group resource id, displayName)``."""
    schemas = [USER_SCHEMA]
    if any(k.lower() == ENTERPRISE_SCHEMA.lower() for k in state.attributes):
        schemas.append(ENTERPRISE_SCHEMA)
    doc: dict[str, Any] = {"schemas": schemas, "id": resource_id, **state.document()}
    doc["groups"] = [{"value": g, "display": name} for g, name in groups]
    doc["meta"] = _meta("User", created, modified, location)
    return doc


def render_group(
    resource_id: str,
    state: GroupState,
    *,
    created: str,
    modified: str,
    location: str,
    with_members: bool = True,
) -> dict[str, Any]:
    doc: dict[str, Any] = {"schemas": [GROUP_SCHEMA], "id": resource_id, **state.document()}
    if not with_members:
        doc.pop("members")
    doc["meta"] = _meta("Group", created, modified, location)
    return doc


def _meta(kind: str, created: str, modified: str, location: str) -> dict[str, str]:
    return {
        "resourceType": kind,
        "created": created,
        "lastModified": modified,
        "location": location,
    }


def list_response(resources: Sequence[Mapping[str, Any]], total: int, start: int) -> dict[str, Any]:
    return {
        "schemas": [LIST_SCHEMA],
        "totalResults": total,
        "startIndex": start,
        "itemsPerPage": len(resources),
        "Resources": list(resources),
    }


def page(start_index: str | None, count: str | None) -> tuple[int, int]:
    """``startIndex`` (1-based) and ``count`` as RFC 7644 section 3.4.2.4 reads them."""
    try:
        start = int(start_index) if start_index else 1
        size = int(count) if count else 100
    except ValueError as exc:
        raise invalid("startIndex and count must be integers") from exc
    return max(start, 1), min(max(size, 0), MAX_COUNT)


# -- filters -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Clause:
    """``attribute eq value``; ``attribute`` is lower-cased (names are case-insensitive)."""

    attribute: str
    value: str


_TOKEN = re.compile(r'\s*(?:"((?:[^"\\]|\\.)*)"|(\[|\])|([^\s"\[\]]+))')


def parse_filter(text: str | None) -> list[Clause]:
    """A filter as providers send it: ``a eq "v"`` clauses joined by ``and``.

    ``members[value eq "x"]`` is read as ``members eq "x"``; unquoted values are taken
    as strings (an example in Entra ID's documentation sends one). Anything else is
    ``invalidFilter``: no ``or``, ``not``, other operators or nesting.
    """
    if text is None or not text.strip():
        return []
    if len(text) > MAX_FILTER:
        raise invalid("filter too long", "invalidFilter")
    tokens = _tokens(text)
    clauses: list[Clause] = []
    i = 0
    while True:
        clause, i = _clause(tokens, i)
        clauses.append(clause)
        if i == len(tokens):
            return clauses
        kind, word = tokens[i]
        if kind != "word" or word.lower() != "and":
            raise invalid(f"unsupported filter {text[:100]!r}", "invalidFilter")
        i += 1


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            raise invalid("malformed filter", "invalidFilter")
        quoted, bracket, word = match.groups()
        if quoted is not None:
            try:
                tokens.append(("string", json.loads(f'"{quoted}"')))
            except ValueError as exc:
                raise invalid("malformed string in filter", "invalidFilter") from exc
        elif bracket is not None:
            tokens.append(("bracket", bracket))
        else:
            tokens.append(("word", word))
        pos = match.end()
    return tokens


def _clause(tokens: Sequence[tuple[str, str]], i: int) -> tuple[Clause, int]:
    def at(j: int) -> tuple[str, str]:
        if j >= len(tokens):
            raise invalid("incomplete filter", "invalidFilter")
        return tokens[j]

    kind, attribute = at(i)
    if kind != "word":
        raise invalid("a filter starts with an attribute name", "invalidFilter")
    i += 1
    if at(i) == ("bracket", "["):
        # members[value eq "x"]: the same question as members eq "x".
        inner, j = _clause(tokens, i + 1)
        if at(j) != ("bracket", "]") or inner.attribute != "value":
            raise invalid("unsupported value filter", "invalidFilter")
        return Clause(attribute.lower(), inner.value), j + 1
    _, op = at(i)
    if op.lower() != "eq":
        raise invalid(f"unsupported filter operator {op[:20]!r}: only eq", "invalidFilter")
    _, value = at(i + 1)
    return Clause(_unprefixed(attribute).lower(), value), i + 2


def _unprefixed(attribute: str) -> str:
    for schema in (USER_SCHEMA, GROUP_SCHEMA):
        if attribute.lower().startswith(schema.lower() + ":"):
            return attribute[len(schema) + 1 :]
    return attribute


# -- PATCH (RFC 7644 section 3.5.2) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Path:
    attribute: str  # may be a schema URN (an extension's container)
    sub: str | None = None
    filter: Clause | None = None
    extension: str | None = None  # the URN that holds ``attribute``


def apply_patch(document: Mapping[str, Any], body: Mapping[str, Any]) -> dict[str, Any]:
    """The document after a PatchOp request; raises ScimError for what cannot apply."""
    if not isinstance(body, Mapping):
        raise invalid("the body must be a JSON object", "invalidSyntax")
    operations = _get(body, "Operations")
    if not isinstance(operations, list) or not operations:
        raise invalid("a PatchOp needs a non-empty Operations list", "invalidSyntax")
    if len(operations) > MAX_OPERATIONS:
        raise invalid(f"at most {MAX_OPERATIONS} operations per request", "tooMany")
    doc = copy.deepcopy(dict(document))
    for operation in operations:
        if not isinstance(operation, Mapping):
            raise invalid("each operation must be an object", "invalidSyntax")
        op = _get(operation, "op")
        if not isinstance(op, str) or op.lower() not in {"add", "replace", "remove"}:
            raise invalid("op must be add, replace or remove", "invalidSyntax")
        path = _get(operation, "path")
        value = _get(operation, "value")
        if path is not None and not isinstance(path, str):
            raise invalid("path must be a string", "invalidPath")
        _apply(doc, op.lower(), path, value)
    return doc


def _apply(doc: dict[str, Any], op: str, path: str | None, value: Any) -> None:
    if path is None or not path.strip():
        if op == "remove":
            raise invalid("remove needs a path", "noTarget")
        if not isinstance(value, Mapping):
            raise invalid("an operation without path needs an object value", "invalidValue")
        # Okta and Entra ID: {"op": "replace", "value": {"active": false}}, with keys
        # that may themselves be paths ("name.givenName", extension URNs).
        for key, item in value.items():
            if str(key).lower() in _DROPPED:
                continue
            _apply(doc, op, str(key), item)
        return
    target = _parse_path(path)
    container = _container(doc, target, create=op != "remove")
    if container is None:
        return
    if target.filter is not None:
        _apply_filtered(container, op, target, value)
    elif target.sub is not None:
        parent = _child(container, target.attribute, create=op != "remove")
        if parent is None:
            return
        _set(parent, op, target.sub, value)
    else:
        _set(container, op, target.attribute, value)


def _set(container: dict[str, Any], op: str, name: str, value: Any) -> None:
    key = _key(container, name)
    current = container.get(key)
    if op == "remove":
        if value is not None and isinstance(current, list):
            # Entra ID without its compliance flag: {"op": "Remove", "path": "members",
            # "value": [{"value": "u1091"}]} removes those members only.
            drop = {_identity(v) for v in (value if isinstance(value, list) else [value])}
            container[key] = [v for v in current if _identity(v) not in drop]
        else:
            container.pop(key, None)
        return
    if op == "add" and isinstance(current, list):
        items = value if isinstance(value, list) else [value]
        known = {_identity(v) for v in current}
        container[key] = current + [v for v in items if _identity(v) not in known]
    elif isinstance(current, dict) and isinstance(value, Mapping):
        # Sub-attributes not named are left as they are, for add and replace alike.
        current.update(copy.deepcopy(dict(value)))
    else:
        container[key] = copy.deepcopy(value)


def _apply_filtered(container: dict[str, Any], op: str, target: _Path, value: Any) -> None:
    key = _key(container, target.attribute)
    items = container.get(key)
    if items is None:
        items = []
    if not isinstance(items, list):
        raise invalid(f"{target.attribute} is not multi-valued", "invalidPath")
    assert target.filter is not None
    matches = [i for i, item in enumerate(items) if _matches(item, target.filter)]
    if op == "remove":
        if target.sub is None:
            container[key] = [item for i, item in enumerate(items) if i not in matches]
        else:
            for i in matches:
                items[i].pop(_key(items[i], target.sub), None)
        return
    if not matches:
        # Entra ID replaces emails[type eq "work"].value on users that have no work
        # address yet: the element the filter describes is created.
        element: dict[str, Any] = {target.filter.attribute: target.filter.value}
        items.append(element)
        container[key] = items
        matches = [len(items) - 1]
    for i in matches:
        if target.sub is not None:
            items[i][_key(items[i], target.sub)] = copy.deepcopy(value)
        elif isinstance(value, Mapping):
            items[i].update(copy.deepcopy(dict(value)))
        else:
            raise invalid("a filtered path without sub-attribute needs an object value")


def _matches(item: object, clause: Clause) -> bool:
    if not isinstance(item, Mapping):
        return False
    found = _get(item, clause.attribute)
    return isinstance(found, str) and found.lower() == clause.value.lower()


def _identity(item: object) -> object:
    """What makes two values of a multi-valued attribute the same one."""
    if isinstance(item, Mapping) and isinstance(item.get("value"), str):
        return ("value", item["value"])
    return json.dumps(item, sort_keys=True, default=str)


def _parse_path(path: str) -> _Path:
    text = path.strip()
    extension = None
    if text.lower().startswith("urn:"):
        # "urn:...:enterprise:2.0:User:employeeNumber": the URN, then the attribute.
        head, _, tail = text.rpartition(":")
        if head.lower() in {USER_SCHEMA.lower(), GROUP_SCHEMA.lower()}:
            text = tail
        elif "[" in tail or not tail:
            raise invalid(f"unsupported path {path[:100]!r}", "invalidPath")
        elif _looks_like_schema(text):
            # The whole extension object: {"op": "add", "path": "urn:...:User", ...}.
            return _Path(text)
        else:
            extension, text = head, tail
    match = re.fullmatch(r"([A-Za-z$][\w$-]*)(?:\[(.+)\])?(?:\.([A-Za-z$][\w$-]*))?", text)
    if match is None:
        raise invalid(f"unsupported path {path[:100]!r}", "invalidPath")
    attribute, filter_text, sub = match.groups()
    clause = None
    if filter_text is not None:
        clauses = parse_filter(filter_text)
        if len(clauses) != 1:
            raise invalid(f"unsupported path filter {filter_text[:100]!r}", "invalidPath")
        clause = clauses[0]
    return _Path(attribute, sub, clause, extension)


def _looks_like_schema(text: str) -> bool:
    return text.rpartition(":")[2][:1].isupper()


def _container(doc: dict[str, Any], target: _Path, *, create: bool) -> dict[str, Any] | None:
    if target.extension is None:
        return doc
    return _child(doc, target.extension, create=create)


def _child(container: dict[str, Any], name: str, *, create: bool) -> dict[str, Any] | None:
    key = _key(container, name)
    child = container.get(key)
    if isinstance(child, dict):
        return child
    if child is not None:
        raise invalid(f"{name} is not a complex attribute", "invalidPath")
    if not create:
        return None
    created: dict[str, Any] = {}
    container[key] = created
    return created


_CANONICAL = {
    name.lower(): name
    for name in (
        "userName",
        "externalId",
        "active",
        "displayName",
        "nickName",
        "name",
        "givenName",
        "familyName",
        "middleName",
        "formatted",
        "emails",
        "phoneNumbers",
        "addresses",
        "members",
        "title",
        "locale",
        "timezone",
        "userType",
        "preferredLanguage",
        "employeeNumber",
        "department",
        "manager",
        "value",
        "type",
        "primary",
        "display",
    )
}


def _key(container: Mapping[str, Any], name: str) -> str:
    """The key ``name`` is stored under (attribute names are case-insensitive)."""
    if name in container:
        return name
    lowered = name.lower()
    for key in container:
        if key.lower() == lowered:
            return key
    return _CANONICAL.get(lowered, name)


# -- discovery (RFC 7644 section 4) --------------------------------------------------------


def service_provider_config(base_url: str) -> dict[str, Any]:
    return {
        "schemas": [SP_CONFIG_SCHEMA],
        "documentationUri": "https://scopegate.invalid/docs/identity.md",
        "patch": {"supported": True},
        "bulk": {"supported": False, "maxOperations": 0, "maxPayloadSize": 0},
        "filter": {"supported": True, "maxResults": MAX_COUNT},
        "changePassword": {"supported": False},
        "sort": {"supported": False},
        "etag": {"supported": False},
        "authenticationSchemes": [
            {
                "type": "oauthbearertoken",
                "name": "Tenant SCIM secret",
                "description": "The per-tenant bearer secret of `scopegate tenant scim-token`",
                "primary": True,
            }
        ],
        "meta": {
            "resourceType": "ServiceProviderConfig",
            "location": f"{base_url}/ServiceProviderConfig",
        },
    }


def resource_types(base_url: str) -> list[dict[str, Any]]:
    return [
        {
            "schemas": [RESOURCE_TYPE_SCHEMA],
            "id": "User",
            "name": "User",
            "endpoint": "/Users",
            "description": "A user: active users are members of the tenant",
            "schema": USER_SCHEMA,
            "schemaExtensions": [{"schema": ENTERPRISE_SCHEMA, "required": False}],
            "meta": {"resourceType": "ResourceType", "location": f"{base_url}/ResourceTypes/User"},
        },
        {
            "schemas": [RESOURCE_TYPE_SCHEMA],
            "id": "Group",
            "name": "Group",
            "endpoint": "/Groups",
            "description": "A group of users: displayName is its group id",
            "schema": GROUP_SCHEMA,
            "meta": {"resourceType": "ResourceType", "location": f"{base_url}/ResourceTypes/Group"},
        },
    ]


def _attribute(
    name: str,
    *,
    kind: str = "string",
    multi: bool = False,
    required: bool = False,
    case_exact: bool = False,
    mutability: str = "readWrite",
    uniqueness: str = "none",
    description: str = "",
    sub: Iterable[dict[str, Any]] = (),
) -> dict[str, Any]:
    attribute: dict[str, Any] = {
        "name": name,
        "type": kind,
        "multiValued": multi,
        "description": description,
        "required": required,
        "caseExact": case_exact,
        "mutability": mutability,
        "returned": "default",
        "uniqueness": uniqueness,
    }
    subs = list(sub)
    if subs:
        attribute["subAttributes"] = subs
    return attribute


def schemas(base_url: str) -> list[dict[str, Any]]:
    typed = [
        _attribute("value"),
        _attribute("type"),
        _attribute("primary", kind="boolean"),
        _attribute("display"),
    ]
    user = [
        _attribute(
            "userName",
            required=True,
            uniqueness="server",
            description="The scopegate user id (names that are not ids are mapped, see docs)",
        ),
        _attribute(
            "name",
            kind="complex",
            sub=[_attribute(n) for n in ("formatted", "familyName", "givenName", "middleName")],
        ),
        _attribute("displayName"),
        _attribute("externalId", case_exact=True),
        _attribute("active", kind="boolean", description="false deprovisions the user"),
        _attribute("emails", kind="complex", multi=True, sub=typed),
        _attribute(
            "groups",
            kind="complex",
            multi=True,
            mutability="readOnly",
            sub=[_attribute("value", mutability="readOnly"), _attribute("display")],
        ),
    ]
    group = [
        _attribute("displayName", required=True, description="The scopegate group id"),
        _attribute("externalId", case_exact=True),
        _attribute(
            "members",
            kind="complex",
            multi=True,
            sub=[_attribute("value", mutability="immutable"), _attribute("display")],
        ),
    ]
    enterprise = [_attribute(n) for n in ("employeeNumber", "department", "costCenter")]
    return [
        _schema(USER_SCHEMA, "User", "User Account", user, base_url),
        _schema(GROUP_SCHEMA, "Group", "Group", group, base_url),
        _schema(ENTERPRISE_SCHEMA, "EnterpriseUser", "Enterprise User", enterprise, base_url),
    ]


def _schema(
    schema_id: str, name: str, description: str, attributes: list[dict[str, Any]], base: str
) -> dict[str, Any]:
    return {
        "schemas": [SCHEMA_SCHEMA],
        "id": schema_id,
        "name": name,
        "description": description,
        "attributes": attributes,
        "meta": {"resourceType": "Schema", "location": f"{base}/Schemas/{schema_id}"},
    }

"""Identifier validation and namespacing: nothing a client sends can alias or escape."""

from __future__ import annotations

import pytest

from gateway.errors import Forbidden, InvalidIdentifier, InvalidRequest
from gateway.ids import (
    MAX_FGA_OBJECT,
    fga_object,
    is_valid_scoped_id,
    parse_ref,
    scoped,
    validate_id,
    validate_scoped_id,
)
from gateway.relationships import admin_tuple, document_tuples, task_tuples

BAD_IDS = [
    "",
    "a#b",
    "a:b",
    "a@b",
    "a/b",
    "../x",
    "a/..",
    "..",
    "a b",
    "a\tb",
    "a\nb",
    "a\x00b",
    "a\x7fb",
    "\u0430lice",  # Cyrillic a
    "\uff441",  # full-width d
    "e\u0301",
    "x" * 129,
    "-lead",
    ".hidden",
    "a..b",
]


@pytest.mark.parametrize("value", BAD_IDS)
def test_bad_ids_rejected(value: str) -> None:
    with pytest.raises(InvalidIdentifier):
        validate_id(value)


@pytest.mark.parametrize("value", ["d1", "D1", "a.b", "a_b", "a-b", "x" * 128, "0"])
def test_good_ids_accepted(value: str) -> None:
    assert validate_id(value) == value


def test_case_variants_never_alias() -> None:
    assert scoped("acme", "d1") != scoped("acme", "D1")
    assert scoped("acme", "d1") != scoped("Acme", "d1")


def test_refs_are_namespaced_and_other_tenants_refused() -> None:
    assert parse_ref("document:d1", "acme").to_fga("acme") == "document:acme/d1"
    assert parse_ref("group:eng#member", "acme", allow_relation=True).to_fga("acme") == (
        "group:acme/eng#member"
    )
    assert parse_ref("tenant:acme", "acme").to_fga("acme") == "tenant:acme"
    with pytest.raises(Forbidden):
        parse_ref("tenant:globex", "acme")
    for bad in ("document:acme/d1", "document:d1#viewer", "doc:d1", "document", "user:a@b"):
        with pytest.raises(InvalidIdentifier):
            parse_ref(bad, "acme")


def test_admin_tuple_vocabulary() -> None:
    t = admin_tuple(
        "acme", {"user": "group:eng#member", "relation": "viewer", "object": "folder:f"}
    )
    assert (t.user, t.relation, t.object) == ("group:acme/eng#member", "viewer", "folder:acme/f")
    with pytest.raises(InvalidRequest):
        admin_tuple("acme", {"user": "user:a", "relation": "scoped_task", "object": "document:d"})
    with pytest.raises(InvalidRequest):
        admin_tuple("acme", {"user": "user:a", "relation": "owner", "object": "folder:f"})
    with pytest.raises(Forbidden):
        admin_tuple(
            "acme", {"user": "tenant:globex#member", "relation": "viewer", "object": "document:d"}
        )


def test_document_and_task_tuples() -> None:
    tuples = document_tuples(
        "acme",
        "docs",
        "d1",
        "eng",
        {"viewers": ["user:alice"], "agents": ["agent:bot"], "owner": "user:bob"},
    )
    keys = {(t.user, t.relation, t.object) for t in tuples}
    assert ("tenant:acme", "tenant", "document:acme/d1") in keys
    assert ("folder:acme/eng", "parent", "document:acme/d1") in keys
    assert ("source:acme/docs", "parent", "folder:acme/eng") in keys
    assert ("user:acme/alice", "viewer", "document:acme/d1") in keys
    assert ("agent:acme/bot", "agent_viewer", "document:acme/d1") in keys
    assert ("user:acme/bob", "owner", "document:acme/d1") in keys
    with pytest.raises(InvalidIdentifier):
        document_tuples("acme", "docs", "d1", None, {"viewers": ["agent:bot"]})
    task = task_tuples("acme", "t1", "alice", "bot", ["folder:eng"], None)
    assert ("task:acme/t1", "scoped_task", "folder:acme/eng") in {
        (t.user, t.relation, t.object) for t in task
    }


# -- OpenFGA's limits on namespaced ids ---------------------------------------------------

LONG_TENANT = "t" * 127
# "document:" + tenant + "/" + id fits in OpenFGA's 256 characters up to this id length.
ROOM = MAX_FGA_OBJECT - len("document:") - len(LONG_TENANT) - 1


def test_only_the_namespaced_combination_decides() -> None:
    assert MAX_FGA_OBJECT == 256 and ROOM == 119
    fits = fga_object("document", LONG_TENANT, "d" * ROOM)
    assert len(fits) == 256
    with pytest.raises(InvalidIdentifier, match="too long"):
        fga_object("document", LONG_TENANT, "d" * (ROOM + 1))
    # Each id alone is valid; the longest tenant with short ids, and the longest ids
    # in a short tenant, are fine.
    widest = "w" * 128
    assert fga_object("tenant", widest, widest) == f"tenant:{widest}"
    for type_name in ("document", "folder", "source", "group", "task"):
        assert fga_object(type_name, widest, "d1") == f"{type_name}:{widest}/d1"
    assert fga_object("document", "acme", "d" * 128) == f"document:acme/{'d' * 128}"


@pytest.mark.parametrize("type_name", ["document", "folder", "source", "group", "task"])
def test_every_object_type_is_held_to_the_object_limit(type_name: str) -> None:
    room = MAX_FGA_OBJECT - len(f"{type_name}:") - len(LONG_TENANT) - 1
    fga_object(type_name, LONG_TENANT, "x" * room)
    with pytest.raises(InvalidIdentifier):
        fga_object(type_name, LONG_TENANT, "x" * (room + 1))
    with pytest.raises(InvalidIdentifier):
        validate_scoped_id(LONG_TENANT, type_name, "x" * (room + 1))
    assert not is_valid_scoped_id(LONG_TENANT, type_name, "x" * (room + 1))
    assert validate_scoped_id(LONG_TENANT, type_name, "x" * room) == "x" * room


def test_subjects_only_stand_on_the_user_side_which_holds_512() -> None:
    """Users and agents are never objects in the model: their forms (at most 262
    characters) always fit the user side, so the longest ids stay usable."""
    for type_name in ("user", "agent"):
        assert len(fga_object(type_name, "w" * 128, "u" * 128)) == len(type_name) + 258


def test_fga_object_validates_both_ids() -> None:
    for tenant, bare in (("acme", "a#b"), ("acme", "a/b"), ("ac:me", "d1"), ("acme", "x" * 129)):
        with pytest.raises(InvalidIdentifier):
            fga_object("document", tenant, bare)


@pytest.mark.parametrize("value", [None, "", "a#b", "a:b", "a/b", "a b", "x" * 140, "../x", 7])
def test_store_ids_that_could_not_reach_openfga(value: object) -> None:
    assert not is_valid_scoped_id("acme", "document", value)


def test_every_client_path_refuses_forms_that_do_not_fit() -> None:
    too_long = "x" * (ROOM + 1)
    acl = {"viewers": ["user:alice"]}
    with pytest.raises(InvalidIdentifier):
        document_tuples(LONG_TENANT, "docs", too_long, None, acl)
    with pytest.raises(InvalidIdentifier):
        document_tuples(LONG_TENANT, "docs", "d1", too_long + "xx", acl)  # folder
    with pytest.raises(InvalidIdentifier):
        document_tuples(LONG_TENANT, "s" * 128, "d1", None, acl)  # source
    with pytest.raises(InvalidIdentifier):
        document_tuples(LONG_TENANT, "docs", "d1", None, {"viewers": [f"group:{'g' * 128}#member"]})
    with pytest.raises(InvalidIdentifier):
        task_tuples(LONG_TENANT, "t1", "alice", "bot", [f"document:{too_long}"], None)
    with pytest.raises(InvalidIdentifier):
        admin_tuple(
            LONG_TENANT,
            {"user": "user:alice", "relation": "viewer", "object": f"folder:{'f' * 128}"},
        )
    with pytest.raises(InvalidIdentifier):
        admin_tuple(
            LONG_TENANT,
            {"user": f"group:{'g' * 128}#member", "relation": "viewer", "object": "document:d1"},
        )
    with pytest.raises(InvalidIdentifier):
        parse_ref(f"group:{'g' * 128}", LONG_TENANT, allow_relation=True).to_fga(LONG_TENANT)
    # The same ids in a short tenant are fine.
    assert document_tuples("acme", "s" * 128, too_long, "f" * 128, acl)

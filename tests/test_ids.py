"""Identifier validation and namespacing: nothing a client sends can alias or escape."""

from __future__ import annotations

import pytest

from gateway.errors import Forbidden, InvalidIdentifier, InvalidRequest
from gateway.ids import parse_ref, scoped, validate_id
from gateway.relationships import admin_tuple, document_tuples, task_tuples

BAD_IDS = [
    "", "a#b", "a:b", "a@b", "a/b", "../x", "a/..", "..", "a b", "a\tb", "a\nb", "a\x00b",
    "a\x7fb", "\u0430lice",  # Cyrillic a
    "\uff441",  # full-width d
    "e\u0301", "x" * 129, "-lead", ".hidden", "a..b",
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
    t = admin_tuple("acme", {"user": "group:eng#member", "relation": "viewer",
                             "object": "folder:f"})
    assert (t.user, t.relation, t.object) == ("group:acme/eng#member", "viewer", "folder:acme/f")
    with pytest.raises(InvalidRequest):
        admin_tuple("acme", {"user": "user:a", "relation": "scoped_task", "object": "document:d"})
    with pytest.raises(InvalidRequest):
        admin_tuple("acme", {"user": "user:a", "relation": "owner", "object": "folder:f"})
    with pytest.raises(Forbidden):
        admin_tuple("acme", {"user": "tenant:globex#member", "relation": "viewer",
                             "object": "document:d"})


def test_document_and_task_tuples() -> None:
    tuples = document_tuples("acme", "docs", "d1", "eng",
                             {"viewers": ["user:alice"], "agents": ["agent:bot"],
                              "owner": "user:bob"})
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

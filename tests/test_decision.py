"""The pure decision: allow only when every conjunct is proven true."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.decision import (
    DOCUMENT_CHECKS,
    REQUEST_CHECKS,
    CheckOutcome,
    decide,
    plan_checks,
)
from gateway.identity import DelegationContext

CTX = DelegationContext("acme", "alice", "bot", "t1", "jti", 0)


def test_plan_is_namespaced_and_deduplicated() -> None:
    items = plan_checks(CTX, ["d1", "d2", "d1"])
    assert len(items) == len(REQUEST_CHECKS) + 2 * len(DOCUMENT_CHECKS)
    assert all(i.object.startswith(("document:acme/", "task:acme/", "tenant:acme")) for i in items)
    users = {i.user for i in items}
    assert users == {"tenant:acme", "user:acme/alice", "agent:acme/bot", "task:acme/t1"}
    assert len(set(items)) == len(items)


def test_missing_outcome_is_an_error_never_an_allow() -> None:
    items = plan_checks(CTX, ["d1"])
    outcomes = {i: CheckOutcome(True) for i in items[:-1]}
    verdict = decide(CTX, ["d1"], outcomes)["d1"]
    assert verdict.verdict == "error" and not verdict.allowed
    assert verdict.errored_checks == ("document_in_task_scope",)


def test_request_level_failure_denies_every_document() -> None:
    items = plan_checks(CTX, ["d1", "d2"])
    outcomes = {i: CheckOutcome(i.name.value != "task_active") for i in items}
    verdicts = decide(CTX, ["d1", "d2"], outcomes)
    assert all(v.verdict == "deny" and "task_active" in v.failed_checks for v in verdicts.values())


@given(st.lists(st.sampled_from([True, False, None]), min_size=10, max_size=10))
def test_allow_iff_all_true(answers: list[bool | None]) -> None:
    items = plan_checks(CTX, ["d1"])
    outcomes = {i: CheckOutcome(a) for i, a in zip(items, answers, strict=True)}
    verdict = decide(CTX, ["d1"], outcomes)["d1"]
    assert verdict.allowed == all(a is True for a in answers)
    if False in answers:
        assert verdict.verdict == "deny"  # proven false: a denial, errors or not
    elif None in answers:
        assert verdict.verdict == "error"
    failed = {i.name.value for i, a in zip(items, answers, strict=True) if a is False}
    assert set(verdict.failed_checks) == failed


def test_a_conjunct_proven_false_denies_without_the_others() -> None:
    items = [i for i in plan_checks(CTX, ["d1", "d2"]) if i.document_id != "d2"]
    d2 = [i for i in plan_checks(CTX, ["d2"], include_request=False)]
    outcomes = {i: CheckOutcome(True) for i in items}
    outcomes[d2[1]] = CheckOutcome(False)  # user_can_read of d2; the rest never asked
    verdicts = decide(CTX, ["d1", "d2"], outcomes)
    assert verdicts["d1"].allowed
    assert verdicts["d2"].verdict == "deny"
    assert verdicts["d2"].failed_checks == ("user_can_read",)
    assert verdicts["d2"].errored_checks == ()


@given(st.lists(st.sampled_from([True, False, None, "unasked"]), min_size=10, max_size=10))
def test_never_allowed_unless_every_conjunct_was_asked_and_true(answers: list[object]) -> None:
    items = plan_checks(CTX, ["d1"])
    outcomes = {
        i: CheckOutcome(a)  # type: ignore[arg-type]
        for i, a in zip(items, answers, strict=True)
        if a != "unasked"
    }
    verdict = decide(CTX, ["d1"], outcomes)["d1"]
    assert verdict.allowed == all(a is True for a in answers)
    assert (verdict.verdict == "deny") == (False in answers)

"""The delegation decision (DESIGN section 2) as pure code: no I/O, no OpenFGA.

:func:`plan_checks` lists the named checks a set of candidate documents needs;
:func:`decide` turns their outcomes into one verdict per document. A document is
allowed only when every request-level check and every document check is allowed.
A document with a conjunct proven false is denied, whether or not its other conjuncts
were asked (the retrieval skips them once one is known false). Otherwise anything
unknown (a missing outcome, an error) makes the verdict ``error``, which is treated
exactly like a denial when content is released.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from gateway.identity import DelegationContext
from gateway.ids import fga_object


class CheckName(StrEnum):
    """Each conjunct of the decision, named as it appears in audit records."""

    # Request level: once per request.
    TASK_IN_TENANT = "task_in_tenant"
    TASK_ACTIVE = "task_active"
    TASK_DELEGATOR = "task_delegator"
    TASK_EXECUTOR = "task_executor"
    USER_ACTIVE = "user_active"
    AGENT_ACTIVE = "agent_active"
    # Document level: once per candidate document.
    DOCUMENT_IN_TENANT = "document_in_tenant"
    USER_CAN_READ = "user_can_read"
    AGENT_CAN_READ = "agent_can_read"
    DOCUMENT_IN_TASK_SCOPE = "document_in_task_scope"


REQUEST_CHECKS = (
    CheckName.TASK_IN_TENANT,
    CheckName.TASK_ACTIVE,
    CheckName.TASK_DELEGATOR,
    CheckName.TASK_EXECUTOR,
    CheckName.USER_ACTIVE,
    CheckName.AGENT_ACTIVE,
)
DOCUMENT_CHECKS = (
    CheckName.DOCUMENT_IN_TENANT,
    CheckName.USER_CAN_READ,
    CheckName.AGENT_CAN_READ,
    CheckName.DOCUMENT_IN_TASK_SCOPE,
)

Verdict = Literal["allow", "deny", "error"]


@dataclass(frozen=True, slots=True)
class CheckItem:
    """One relationship check in OpenFGA form, tagged with the conjunct it proves."""

    name: CheckName
    user: str
    relation: str
    object: str
    document_id: str | None = None


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    """``allowed`` is None when OpenFGA could not answer this item."""

    allowed: bool | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class DocumentVerdict:
    document_id: str
    verdict: Verdict
    failed_checks: tuple[str, ...] = ()
    errored_checks: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.verdict == "allow"


@functools.lru_cache(maxsize=4096)
def _parties(tenant: str, user: str, agent: str, task: str) -> tuple[str, str, str, str]:
    """The OpenFGA forms of a request's tenant, user, agent and task (validated once:
    a retrieval plans and decides every candidate document with them)."""
    return (
        fga_object("tenant", tenant, tenant),
        fga_object("user", tenant, user),
        fga_object("agent", tenant, agent),
        fga_object("task", tenant, task),
    )


def request_checks(ctx: DelegationContext) -> list[CheckItem]:
    """Checks that bind the task to this user, agent and tenant, all still active."""
    tenant, user, agent, task = _parties(ctx.tenant, ctx.user, ctx.agent, ctx.task)
    return [
        CheckItem(CheckName.TASK_IN_TENANT, tenant, "tenant", task),
        CheckItem(CheckName.TASK_ACTIVE, tenant, "active_in", task),
        CheckItem(CheckName.TASK_DELEGATOR, user, "delegator", task),
        CheckItem(CheckName.TASK_EXECUTOR, agent, "executor", task),
        CheckItem(CheckName.USER_ACTIVE, user, "member", tenant),
        CheckItem(CheckName.AGENT_ACTIVE, agent, "member", tenant),
    ]


def document_checks(ctx: DelegationContext, document_id: str) -> list[CheckItem]:
    """The four per-document conjuncts for ``document_id`` (a bare, validated id)."""
    document = fga_object("document", ctx.tenant, document_id)
    tenant, user, agent, task = _parties(ctx.tenant, ctx.user, ctx.agent, ctx.task)
    return [
        CheckItem(CheckName.DOCUMENT_IN_TENANT, tenant, "in_tenant", document, document_id),
        CheckItem(CheckName.USER_CAN_READ, user, "user_can_read", document, document_id),
        CheckItem(CheckName.AGENT_CAN_READ, agent, "agent_can_read", document, document_id),
        CheckItem(CheckName.DOCUMENT_IN_TASK_SCOPE, task, "in_task_scope", document, document_id),
    ]


def plan_checks(
    ctx: DelegationContext, document_ids: Iterable[str], include_request: bool = True
) -> list[CheckItem]:
    """Request checks (optionally) plus each distinct document's checks, once."""
    items = request_checks(ctx) if include_request else []
    for document_id in dict.fromkeys(document_ids):
        items.extend(document_checks(ctx, document_id))
    return items


def _evaluate(
    items: Iterable[CheckItem], outcomes: Mapping[CheckItem, CheckOutcome]
) -> tuple[list[str], list[str], list[str]]:
    """(failed, errored, not asked) conjunct names."""
    failed: list[str] = []
    errored: list[str] = []
    unasked: list[str] = []
    for item in items:
        outcome = outcomes.get(item)
        if outcome is None:
            unasked.append(item.name.value)
        elif outcome.allowed is None:
            errored.append(item.name.value)
        elif not outcome.allowed:
            failed.append(item.name.value)
    return failed, errored, unasked


def decide(
    ctx: DelegationContext,
    document_ids: Iterable[str],
    outcomes: Mapping[CheckItem, CheckOutcome],
) -> dict[str, DocumentVerdict]:
    """One verdict per document. Allow needs every conjunct proven true; one conjunct
    proven false denies (conjuncts not asked are then left out of the verdict)."""
    request_failed, request_errored, request_unasked = _evaluate(request_checks(ctx), outcomes)
    verdicts: dict[str, DocumentVerdict] = {}
    for document_id in dict.fromkeys(document_ids):
        failed, errored, unasked = _evaluate(document_checks(ctx, document_id), outcomes)
        failed = request_failed + failed
        errored = request_errored + errored
        unasked = request_unasked + unasked
        verdict: Verdict = "deny" if failed else "error" if errored or unasked else "allow"
        if verdict == "error":
            errored = errored + unasked
        verdicts[document_id] = DocumentVerdict(document_id, verdict, tuple(failed), tuple(errored))
    return verdicts

"""Replay: re-evaluate a recorded retrieval's candidates and explain every difference.

A replay asks OpenFGA the same named checks the request asked (DESIGN section 2), for
the same user, agent, task, tenant and candidate documents, against **today's**
relationship tuples, under up to three evaluations:

``now``
    the gateway's current authorization model: would this request be allowed today?
``at the recorded model``
    the authorization model id stored in the record. Tuples are not versioned, so this
    is today's tuples read through the model the request was decided with; comparing it
    with the recorded verdict isolates relationship (and expiry) changes, comparing it
    with ``now`` isolates model changes.
``what-if``
    ``now`` plus reviewer-supplied tuples sent to OpenFGA as contextual tuples: nothing
    is written, and agents can never supply them.

Replays never see or return document text: only ids, verdicts, check names and
sentences built from ids. Candidates denied for broken chunk metadata are a property
of the stored chunks, not of relationships, so they are not sent to OpenFGA again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.audit import AuditRecord, CandidateVerdict, format_time
from gateway.decision import (
    CheckItem,
    CheckName,
    CheckOutcome,
    DocumentVerdict,
    decide,
    plan_checks,
)
from gateway.errors import AuthorizationUnavailable, InvalidRequest, ScopegateError
from gateway.fga import FgaClient, Tuple, now_context
from gateway.identity import DelegationContext
from gateway.ids import validate_id
from gateway.retrieval import MISSING_METADATA

# Replays want the latest tuples, whatever consistency mode retrieval runs with.
REPLAY_CONSISTENCY = "HIGHER_CONSISTENCY"
# Checks guarded by the ``not_expired`` condition. Evaluated at the epoch, a condition
# ``current_time < expires_at`` always holds, so a check that fails now but passes at
# the epoch fails only because its time limit passed (the tuple still exists).
TIME_LIMITED = frozenset({CheckName.TASK_ACTIVE, CheckName.DOCUMENT_IN_TASK_SCOPE})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_PATHS = "(directly, through a group, its folders or its source)"
_EXPLAIN: Mapping[str, str] = {
    CheckName.TASK_IN_TENANT: "task:{task} is not a task of tenant:{tenant} (unknown task id)",
    CheckName.TASK_ACTIVE: "task:{task} is revoked or expired",
    CheckName.TASK_DELEGATOR: "user:{user} is not the delegating user of task:{task}",
    CheckName.TASK_EXECUTOR: "agent:{agent} is not the agent executing task:{task}",
    CheckName.USER_ACTIVE: (
        "user:{user} is not an active member of tenant:{tenant} (no member relation: "
        "never added, or deprovisioned)"
    ),
    CheckName.AGENT_ACTIVE: (
        "agent:{agent} is not an active member of tenant:{tenant} (no member relation: "
        "never added, or deprovisioned)"
    ),
    CheckName.DOCUMENT_IN_TENANT: (
        "document:{document} has no tenant relation to tenant:{tenant} (deleted, or never ingested)"
    ),
    CheckName.USER_CAN_READ: "user:{user} has no viewer or owner on document:{document} " + _PATHS,
    CheckName.AGENT_CAN_READ: "agent:{agent} has no agent_viewer on document:{document} " + _PATHS,
    CheckName.DOCUMENT_IN_TASK_SCOPE: (
        "document:{document} is outside the scope of task:{task} (or the scope expired)"
    ),
    MISSING_METADATA: (
        "a chunk of document:{document} lacks its document id, tenant or source stamp, or is "
        "stamped for another tenant or source: denied without asking OpenFGA"
    ),
}
# Sharper wording once a replay has told an expired tuple from a missing one.
_EXPIRED: Mapping[str, str] = {
    CheckName.TASK_ACTIVE: "task:{task} has expired (its time limit has passed)",
    CheckName.DOCUMENT_IN_TASK_SCOPE: (
        "the scope of task:{task} that covers document:{document} has expired"
    ),
}
_MISSING: Mapping[str, str] = {
    CheckName.TASK_ACTIVE: "task:{task} has been revoked (it has no live relation)",
    CheckName.DOCUMENT_IN_TASK_SCOPE: (
        "document:{document} is outside the scope of task:{task} "
        "(no scope entry names it, its folders or its source)"
    ),
}
CHANGES = ("still_allowed", "still_blocked", "now_allowed", "now_blocked")


def explain(check: str, record: AuditRecord, document: str, expired: bool | None = None) -> str:
    """A sentence naming the missing relation behind one failed check.

    ``expired`` says whether a time-limited check failed only because its time limit
    passed (True), because its tuple is missing (False), or is unknown (None).
    """
    template = None
    if expired is not None:
        template = (_EXPIRED if expired else _MISSING).get(check)
    template = template or _EXPLAIN.get(check)
    if template is None:
        return f"{check} failed for document:{document}"
    return template.format(
        task=record.task,
        tenant=record.tenant,
        user=record.user,
        agent=record.agent,
        document=document,
    )


def explain_errored(check: str, document: str) -> str:
    return f"OpenFGA gave no answer for {check} on document:{document}; treated as a denial"


def candidate_explanations(record: AuditRecord, candidate: CandidateVerdict) -> list[str]:
    """Explanations of a recorded verdict (the past cannot be probed: no expiry detail)."""
    return [explain(f, record, candidate.document_id) for f in candidate.failed_checks] + [
        explain_errored(e, candidate.document_id) for e in candidate.errored_checks
    ]


def replay_context(record: AuditRecord) -> DelegationContext:
    """The delegation a retrieval record was decided for."""
    if record.kind != "retrieve" or record.agent is None or record.task is None:
        raise InvalidRequest("only retrievals can be replayed")
    return DelegationContext(
        tenant=record.tenant,
        user=record.user,
        agent=record.agent,
        task=record.task,
        token_id=record.token_id,
        expires_at=0,
    )


def public_ref(value: str, tenant: str) -> str:
    """``document:acme/d1`` -> ``document:d1``: OpenFGA ids as API callers write them."""
    return value.replace(f":{tenant}/", ":")


def public_tuple(t: Tuple, tenant: str) -> dict[str, str]:
    return {
        "user": public_ref(t.user, tenant),
        "relation": t.relation,
        "object": public_ref(t.object, tenant),
    }


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Verdicts of one evaluation and which failed time-limited checks only expired."""

    verdicts: Mapping[str, DocumentVerdict]
    expired: frozenset[tuple[str, str | None]] = frozenset()

    def is_expired(self, check: str, document: str) -> bool | None:
        if check not in TIME_LIMITED:
            return None
        scope = document if check == CheckName.DOCUMENT_IN_TASK_SCOPE else None
        return (check, scope) in self.expired


async def evaluate(
    fga: FgaClient,
    ctx: DelegationContext,
    documents: Sequence[str],
    *,
    model_id: str | None = None,
    contextual: Sequence[Tuple] = (),
    probe_expiry: bool = True,
) -> Evaluation:
    """One replay evaluation: a BatchCheck round, plus one expiry probe if needed."""
    items = plan_checks(ctx, documents)
    kwargs: dict[str, Any] = {
        "model_id": model_id,
        "contextual": contextual,
        "consistency": REPLAY_CONSISTENCY,
    }
    outcomes = await fga.batch_check(items, **kwargs)
    if contextual:
        _reject_invalid_contextual(outcomes, ctx.tenant)
    verdicts = decide(ctx, documents, outcomes)
    timed = [i for i in items if i.name in TIME_LIMITED and _answer(outcomes.get(i)) is False]
    if not (probe_expiry and timed):
        return Evaluation(verdicts)
    probe = await fga.batch_check(timed, context=now_context(_EPOCH), **kwargs)
    expired = frozenset(
        (i.name.value, i.document_id) for i in timed if _answer(probe.get(i)) is True
    )
    return Evaluation(verdicts, expired)


def _answer(outcome: CheckOutcome | None) -> bool | None:
    return None if outcome is None else outcome.allowed


def _reject_invalid_contextual(outcomes: Mapping[CheckItem, CheckOutcome], tenant: str) -> None:
    """OpenFGA validates contextual tuples per check: a bad one errors every item."""
    for outcome in outcomes.values():
        if outcome.error and outcome.error.startswith("invalid tuple"):
            reason = public_ref(outcome.error, tenant)
            raise InvalidRequest(f"what_if: the authorization model rejects a tuple: {reason}")


def _checkable(candidate: CandidateVerdict) -> bool:
    if MISSING_METADATA in candidate.failed_checks:
        return False
    try:
        validate_id(candidate.document_id)
    except ScopegateError:
        return False
    return True


def _blocked(verdict: str) -> bool:
    return verdict != "allow"


def change_of(was: str, now: str) -> str:
    """``still_allowed``, ``still_blocked``, ``now_allowed`` or ``now_blocked``."""
    if _blocked(was) == _blocked(now):
        return "still_blocked" if _blocked(now) else "still_allowed"
    return "now_blocked" if _blocked(now) else "now_allowed"


def cause_of(was: str, at_recorded: str | None, now: str) -> str | None:
    """What moved a verdict: relationships (tuples or their expiry), the model, or both."""
    if _blocked(was) == _blocked(now) or at_recorded is None:
        return None
    tuples_moved = _blocked(was) != _blocked(at_recorded)
    model_moved = _blocked(at_recorded) != _blocked(now)
    if tuples_moved and model_moved:
        return "relationships_and_model"
    return "model" if model_moved else "relationships"


def _verdict_view(
    record: AuditRecord, candidate: CandidateVerdict, evaluation: Evaluation | None
) -> dict[str, Any]:
    """Verdict, failed and errored checks, and their explanations, for one evaluation."""
    doc = candidate.document_id
    verdict = evaluation.verdicts.get(doc) if evaluation is not None else None
    if evaluation is None or verdict is None:  # not sent to OpenFGA: the record stands
        return {
            "verdict": candidate.verdict,
            "failed_checks": list(candidate.failed_checks),
            "errored_checks": list(candidate.errored_checks),
            "explanations": candidate_explanations(record, candidate),
        }
    return {
        "verdict": verdict.verdict,
        "failed_checks": list(verdict.failed_checks),
        "errored_checks": list(verdict.errored_checks),
        "explanations": [
            explain(f, record, doc, evaluation.is_expired(f, doc)) for f in verdict.failed_checks
        ]
        + [explain_errored(e, doc) for e in verdict.errored_checks],
    }


def _summary_sentence(change: str, cause: str | None) -> str:
    words = change.replace("_", " ")
    reasons = {
        "relationships": "relationships (or their time limits) changed since the request",
        "model": "the authorization model changed since the request",
        "relationships_and_model": "both relationships and the authorization model changed",
    }
    return f"{words}: {reasons[cause]}" if cause else words


def _document_result(
    record: AuditRecord,
    candidate: CandidateVerdict,
    now: Evaluation,
    at_recorded: Evaluation | None,
    what_if: Evaluation | None,
) -> dict[str, Any]:
    current = _verdict_view(record, candidate, now)
    recorded_model = _verdict_view(record, candidate, at_recorded) if at_recorded else None
    at_verdict = recorded_model["verdict"] if recorded_model else None
    change = change_of(candidate.verdict, current["verdict"])
    cause = cause_of(candidate.verdict, at_verdict, current["verdict"])
    result: dict[str, Any] = {
        "document_id": candidate.document_id,
        "source": candidate.source,
        "was": candidate.verdict,
        "now": current["verdict"],
        "now_at_recorded_model": at_verdict or "error",
        "changed": candidate.verdict != current["verdict"],
        "change": change,
        "cause": cause,
        "summary": _summary_sentence(change, cause),
        "was_failed_checks": list(candidate.failed_checks),
        "was_explanations": candidate_explanations(record, candidate),
        "failed_checks": current["failed_checks"],
        "errored_checks": current["errored_checks"],
        "explanations": current["explanations"],
        "failed_checks_at_recorded_model": (
            recorded_model["failed_checks"] if recorded_model else []
        ),
        "what_if": None,
    }
    if what_if is not None:
        hypothetical = _verdict_view(record, candidate, what_if)
        hypothetical["changed"] = hypothetical["verdict"] != current["verdict"]
        hypothetical["change"] = change_of(current["verdict"], hypothetical["verdict"])
        result["what_if"] = hypothetical
    return result


async def replay_decision(
    fga: FgaClient,
    record: AuditRecord,
    what_if: Sequence[Tuple] = (),
    *,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Per document: the recorded verdict, the verdict now, and why it fails now.

    ``what_if`` tuples (already validated and namespaced) are evaluated as contextual
    tuples on top of today's; nothing is written. Raises InvalidRequest for records
    that are not retrievals and for what-if tuples the model rejects, and
    AuthorizationUnavailable when OpenFGA cannot answer.
    """
    ctx = replay_context(record)
    documents = list(dict.fromkeys(c.document_id for c in record.candidates if _checkable(c)))
    notes: list[str] = []
    current = await evaluate(fga, ctx, documents)
    recorded_model_id = record.model_id or None
    at_recorded: Evaluation | None = current
    if recorded_model_id is not None and recorded_model_id != fga.model_id:
        at_recorded = await _at_recorded_model(fga, ctx, documents, recorded_model_id, notes)
    hypothetical = await evaluate(fga, ctx, documents, contextual=what_if) if what_if else None
    skipped = len({c.document_id for c in record.candidates}) - len(documents)
    if skipped:
        notes.append(
            f"{skipped} candidate(s) denied for their chunk metadata were not re-evaluated: "
            "that denial does not depend on relationships"
        )
    results = [
        _document_result(record, c, current, at_recorded, hypothetical) for c in record.candidates
    ]
    return {
        "request_id": record.request_id,
        "recorded_at": record.time,
        "replayed_at": format_time(now or datetime.now(UTC)),
        "recorded_model_id": record.model_id,
        "current_model_id": fga.model_id,
        "model_changed": bool(record.model_id) and record.model_id != fga.model_id,
        "documents": results,
        "summary": _count(r["change"] for r in results),
        "what_if": _what_if_summary(what_if, results, record.tenant) if what_if else None,
        "notes": notes,
    }


async def _at_recorded_model(
    fga: FgaClient,
    ctx: DelegationContext,
    documents: Sequence[str],
    model_id: str,
    notes: list[str],
) -> Evaluation | None:
    try:
        return await evaluate(fga, ctx, documents, model_id=model_id, probe_expiry=False)
    except AuthorizationUnavailable as exc:
        # "now" has just been answered, so OpenFGA is up: the old model is gone or bad.
        notes.append(f"the recorded model {model_id} could not be evaluated: {exc.message}")
        return None


def _count(changes: Iterable[str]) -> dict[str, int]:
    counts = dict.fromkeys(CHANGES, 0)
    for change in changes:
        counts[change] += 1
    return counts


def _what_if_summary(
    what_if: Sequence[Tuple], results: Sequence[Mapping[str, Any]], tenant: str
) -> dict[str, Any]:
    moved = [r for r in results if r["what_if"] and r["what_if"]["changed"]]
    return {
        "writes": [public_tuple(t, tenant) for t in what_if],
        "persisted": False,
        "changed_documents": len(moved),
        "would_allow": [r["document_id"] for r in moved if r["what_if"]["verdict"] == "allow"],
        "would_block": [r["document_id"] for r in moved if r["what_if"]["verdict"] != "allow"],
    }

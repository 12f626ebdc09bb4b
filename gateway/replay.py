"""Replay: re-evaluate a recorded retrieval's candidates and explain every difference.

A replay asks OpenFGA the same named checks the request asked (DESIGN section 2), for
the same user, agent, task, tenant and candidate documents, against **today's**
relationship tuples, under up to three evaluations, and optionally a fourth:

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
``as of the decision`` (:func:`replay_as_of_decision`)
    the tuples the checks could read, rebuilt from the change-log archive as they stood
    at the record's position and decision time (:mod:`gateway.changelog`), written to
    a scratch store with the recorded model and asked the same checks; every change
    since is attributed to the conjuncts it touches and to the admin request that made
    it (:func:`made_by`).

Replays never see or return document text: only ids, verdicts, check names and
sentences built from ids. Candidates denied for broken chunk metadata are a property
of the stored chunks, not of relationships, so they are not sent to OpenFGA again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from gateway.audit import (
    ArchivedChange,
    AuditEntry,
    AuditRecord,
    AuditStore,
    CandidateVerdict,
    format_time,
)
from gateway.changelog import (
    ChangeArchiver,
    History,
    ModelGraph,
    ObjRel,
    everything,
    fold,
    from_micros,
    load_history,
    micros,
    type_of,
    walk,
)
from gateway.changelog import DecisionPoint as ChangelogPoint
from gateway.decision import (
    DOCUMENT_CHECKS,
    REQUEST_CHECKS,
    CheckItem,
    CheckName,
    CheckOutcome,
    DocumentVerdict,
    decide,
    plan_checks,
)
from gateway.errors import AuthorizationUnavailable, InvalidRequest, ScopegateError
from gateway.fga import FgaClient, Tuple, load_model, now_context
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
_T = TypeVar("_T")


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
    at: datetime | None = None,
) -> Evaluation:
    """One replay evaluation: a BatchCheck round, plus one expiry probe if needed.

    Time conditions are evaluated ``at`` that moment (default: now).
    """
    items = plan_checks(ctx, documents)
    kwargs: dict[str, Any] = {
        "model_id": model_id,
        "contextual": contextual,
        "consistency": REPLAY_CONSISTENCY,
    }
    if at is not None:
        kwargs["context"] = now_context(at)
    outcomes = await fga.batch_check(items, **kwargs)
    if contextual:
        _reject_invalid_contextual(outcomes, ctx.tenant)
    verdicts = decide(ctx, documents, outcomes)
    timed = [i for i in items if i.name in TIME_LIMITED and _answer(outcomes.get(i)) is False]
    if not (probe_expiry and timed):
        return Evaluation(verdicts)
    probe = await fga.batch_check(timed, **{**kwargs, "context": now_context(_EPOCH)})
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


# -- as of the decision ---------------------------------------------------------------------

#: Checks reported per document (request-level first), as records name them.
CONJUNCTS = tuple(c.value for c in (*REQUEST_CHECKS, *DOCUMENT_CHECKS))
# An admin action's intent record is written before its tuples; an action may run long
# (a large ingestion), so its intent is looked for this far before a change.
ADMIN_LOOKBACK = timedelta(hours=6)
# Tolerance between the gateway's clock (records) and OpenFGA's (change timestamps).
CLOCK_SKEW_US = 2_000_000


def decision_point(record: AuditRecord) -> tuple[ChangelogPoint, list[str]]:
    """Where the record says OpenFGA's change log stood, and notes about it.

    Records written before positions were kept are placed by their time alone: started
    ``latency_ms`` before it. (Retrievals and AuthZEN evaluations keep one.)
    """
    kept = record.extra.get("changelog")
    if isinstance(kept, Mapping):
        point = ChangelogPoint.from_dict(kept)
        if point.position is None:
            return point, [
                "the change-log archive had no position yet when this request started: "
                "the state as of the decision is placed by the decision time alone"
            ]
        return point, []
    decided = _record_time(record.time)
    started = decided - timedelta(milliseconds=record.latency_ms)
    note = (
        "this record keeps no change-log position: the state as of the decision is placed "
        "by the record's time alone"
    )
    return ChangelogPoint(record.store_id, None, started, decided), [note]


def _record_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class AdminAction:
    """An admin mutation the gateway recorded: its intent record id and the tuples it
    meant to write or delete, between its intent and closing records."""

    request_id: str
    action: str
    user: str
    start_us: int
    end_us: int | None
    ops: frozenset[tuple[str, str, str, str]]


def admin_actions(entries: Iterable[AuditEntry]) -> list[AdminAction]:
    """Admin actions from admin records: intents, with what their closing records add."""
    intents: dict[str, AuditEntry] = {}
    closing: dict[str, list[AuditEntry]] = {}
    for entry in entries:
        extra = entry.record.extra
        if extra.get("phase") == "intent":
            intents[entry.record.request_id] = entry
        elif isinstance(extra.get("intent"), str):
            closing.setdefault(extra["intent"], []).append(entry)
    actions = []
    for request_id, intent in intents.items():
        ends = closing.get(request_id, [])
        ops = set(_ops(intent.record.extra))
        for end in ends:
            ops |= set(_ops(end.record.extra))
        end_us = max((micros(_record_time(e.record.time)) for e in ends), default=None)
        actions.append(
            AdminAction(
                request_id=request_id,
                action=str(intent.record.extra.get("action", "")),
                user=intent.record.user,
                start_us=micros(_record_time(intent.record.time)),
                end_us=end_us,
                ops=frozenset(ops),
            )
        )
    return actions


def _ops(extra: Mapping[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    for key, operation in (("writes", "write"), ("wanted", "write"), ("deletes", "delete")):
        for item in extra.get(key) or []:
            if isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 3:
                yield (operation, str(item[0]), str(item[1]), str(item[2]))


def made_by(change: ArchivedChange, actions: Sequence[AdminAction]) -> AdminAction | None:
    """The admin action that made ``change``: the latest one naming its tuple whose
    records enclose its time (then within the clock skew), or None (not the gateway)."""
    op = (change.operation, change.user, change.relation, change.object)
    naming = [a for a in actions if op in a.ops]
    for skew in (0, CLOCK_SKEW_US):
        around = [
            a
            for a in naming
            if a.start_us - skew <= change.time_us
            and (a.end_us is None or change.time_us <= a.end_us + skew)
        ]
        if around:
            return max(around, key=lambda a: a.start_us)
    return None


async def find_admin_actions(
    audit: AuditStore, tenant: str, changes: Sequence[ArchivedChange]
) -> list[AdminAction]:
    """The tenant's admin actions that may have made ``changes``."""
    if not changes:
        return []
    low = from_micros(min(c.time_us for c in changes)) - ADMIN_LOOKBACK
    high = from_micros(max(c.time_us for c in changes) + CLOCK_SKEW_US + 1)
    return admin_actions(await audit.admin_entries(tenant, low, high))


def change_view(
    change: ArchivedChange,
    tenant: str,
    action: AdminAction | None,
    checks: Iterable[str] = (),
    during: bool = False,
) -> dict[str, Any]:
    """A change as reviewers see it: API ids, OpenFGA's time, who made it."""
    condition = json.loads(change.condition) if change.condition else None
    return {
        "seq": change.seq,
        "time": change.time,
        "operation": change.operation,
        "user": public_ref(change.user, tenant),
        "relation": change.relation,
        "object": public_ref(change.object, tenant),
        "condition": condition,
        "checks": sorted(set(checks), key=_conjunct_order),
        "admin_request_id": action.request_id if action else None,
        "admin_action": action.action if action else None,
        "admin_user": action.user if action else None,
        "made_by_gateway": action is not None,
        "during_decision": during,
    }


def _conjunct_order(name: str) -> int:
    return CONJUNCTS.index(name) if name in CONJUNCTS else len(CONJUNCTS)


def describe_change(view: Mapping[str, Any]) -> str:
    """One line: ``2026-... deleted user:alice viewer document:d1 (admin request ab12, ...)``."""
    verb = "wrote" if view["operation"] == "write" else "deleted"
    who = (
        f"admin request {view['admin_request_id']} ({view['admin_action']} by user:"
        f"{view['admin_user']})"
        if view["admin_request_id"]
        else "not made through the gateway"
    )
    flips = f"; affects {', '.join(view['checks'])}" if view["checks"] else ""
    return f"{view['time']} {verb} {view['user']} {view['relation']} {view['object']}: {who}{flips}"


def _outcome(name: str, failed: Sequence[str], errored: Sequence[str]) -> str:
    if name in errored:
        return "error"
    return "fail" if name in failed else "pass"


@dataclass(frozen=True, slots=True)
class _Reconstruction:
    """The as-of evaluation and the walks that attribute later changes to checks."""

    items: tuple[CheckItem, ...]
    then: Evaluation
    # Time-limited checks that held when the request started and failed once it was
    # decided: their limit passed while the request ran, so the archive cannot tell
    # which side of it the check fell on. (name, document id or None for the request)
    expired_during: frozenset[tuple[str, str | None]]
    touched: Mapping[CheckItem, frozenset[ObjRel]]
    history: History
    graph: ModelGraph
    tuples: int
    notes: tuple[str, ...]


async def _recorded_model(fga: FgaClient, record: AuditRecord) -> tuple[dict[str, Any], list[str]]:
    if record.model_id and record.store_id == fga.store_id:
        try:
            return await fga.read_model(record.model_id), []
        except AuthorizationUnavailable as exc:
            note = f"the recorded model {record.model_id} could not be read ({exc.message})"
            return load_model(), [note + "; the shipped model was used"]
    return load_model(), ["the recorded model is not in this store: the shipped model was used"]


async def _reconstruct(
    fga: FgaClient,
    audit: AuditStore,
    record: AuditRecord,
    point: ChangelogPoint,
    documents: Sequence[str],
    clock: _Stopwatch,
) -> _Reconstruction:
    ctx = replay_context(record)
    items = tuple(plan_checks(ctx, documents))
    model, notes = await _recorded_model(fga, record)
    graph = ModelGraph(model)
    roots = [(i.object, i.relation) for i in items]
    subjects = {i.user for i in items}
    history = await load_history(
        audit, point.store_id, graph, roots, subjects, [point.includes, everything]
    )
    standing = list(fold(history.changes, point.includes).values())
    clock.lap("history")
    async with fga.scratch_store(model) as scratch:
        await scratch.write_logged(standing)
        clock.lap("scratch_write")
        then = await evaluate(scratch, ctx, documents, at=point.decided_at)
        window = await _expired_during(scratch, items, then, point)
        clock.lap("scratch_checks")
    at_then, at_now = history.at(point.includes), history.at(everything)
    touched = {
        item: walk(graph, at_then, [(item.object, item.relation)]).touched
        | walk(graph, at_now, [(item.object, item.relation)]).touched
        for item in items
    }
    return _Reconstruction(
        items, then, window, touched, history, graph, len(standing), tuple(notes)
    )


async def _expired_during(
    scratch: FgaClient, items: Sequence[CheckItem], then: Evaluation, point: ChangelogPoint
) -> frozenset[tuple[str, str | None]]:
    """Failed time-limited checks that still held when the request started."""
    failed = [
        item
        for item in items
        if item.name in TIME_LIMITED
        and any(
            item.name.value in v.failed_checks
            for d, v in then.verdicts.items()
            if item.document_id in (None, d)
        )
    ]
    if not failed:
        return frozenset()
    early = await scratch.batch_check(
        failed, context=now_context(point.started_at), consistency=REPLAY_CONSISTENCY
    )
    return frozenset((i.name.value, i.document_id) for i in failed if _answer(early.get(i)) is True)


def _affected(change: ArchivedChange, rebuilt: _Reconstruction) -> list[CheckItem]:
    """The checks whose walk reads the change's tuple (for their subject)."""
    pair = (change.object, change.relation)
    leads_on = rebuilt.graph.leads_on(change)
    return [
        item
        for item in rebuilt.items
        if pair in rebuilt.touched[item] and (leads_on or change.user == item.user)
    ]


def _as_of_document(
    record: AuditRecord,
    candidate: CandidateVerdict,
    current: Mapping[str, Any],
    rebuilt: _Reconstruction | None,
    changes: Sequence[tuple[dict[str, Any], set[str | None]]],
) -> dict[str, Any]:
    """``then``, the conjuncts then and now, and the changes that touched them."""
    doc = candidate.document_id
    view = _verdict_view(record, candidate, rebuilt.then if rebuilt is not None else None)
    was_failed = candidate.failed_checks
    undetermined = sorted(
        name
        for name, scope in (rebuilt.expired_during if rebuilt is not None else ())
        if scope in (None, doc)
    )
    if undetermined:
        view = _settle(view, undetermined, was_failed)
    conjuncts = []
    flipped = []
    checked = rebuilt is not None and doc in rebuilt.then.verdicts
    for name in CONJUNCTS if checked else ():
        then = _outcome(name, view["failed_checks"], view["errored_checks"])
        now = _outcome(name, current["failed_checks"], current["errored_checks"])
        was = _recorded_outcome(name, candidate)
        conjuncts.append({"check": name, "was": was, "then": then, "now": now})
        if then != now:
            flipped.append(name)
    mine = []
    for change, documents in changes:
        if None in documents or doc in documents:
            mine.append({**change, "flips": bool(set(change["checks"]) & set(flipped))})
    return {
        "then": view["verdict"],
        "then_failed_checks": view["failed_checks"],
        "then_errored_checks": view["errored_checks"],
        "then_explanations": view["explanations"],
        "then_matches_was": matches_record(candidate, view) if checked else True,
        "conjuncts": conjuncts,
        "flipped_checks": flipped,
        "undetermined_checks": undetermined,
        "changes": mine,
    }


def _recorded_outcome(name: str, candidate: CandidateVerdict) -> str:
    """What the record says of one conjunct: a denial names the conjuncts found false,
    and the retrieval may not have asked the others (``unknown``)."""
    if name in candidate.errored_checks:
        return "error"
    if name in candidate.failed_checks:
        return "fail"
    return "pass" if candidate.verdict == "allow" else "unknown"


def matches_record(candidate: CandidateVerdict, then: Mapping[str, Any]) -> bool | None:
    """Whether the verdict rebuilt as of the decision is the recorded one.

    An allow must be rebuilt as an allow (every conjunct held). A denial must be
    rebuilt as a denial in which every conjunct the record names failed too: the
    retrieval stops asking a document's conjuncts once one is false, so the record
    may name fewer. A recorded ``error`` (OpenFGA did not answer) is not a property
    of the tuples and cannot be rebuilt: None.
    """
    if candidate.verdict == "error":
        return None
    if candidate.verdict == "allow":
        return bool(then["verdict"] == "allow")
    return then["verdict"] == "deny" and set(candidate.failed_checks) <= set(then["failed_checks"])


def _settle(
    view: Mapping[str, Any], undetermined: Sequence[str], was_failed: Sequence[str]
) -> dict[str, Any]:
    """A time limit that passed while the request ran: either answer was possible then,
    so such a check is taken as the record has it (and reported as undetermined)."""
    failed = [f for f in view["failed_checks"] if f not in undetermined or f in was_failed]
    verdict = "error" if view["errored_checks"] else ("deny" if failed else "allow")
    reasons = list(view["explanations"])
    count = len(view["failed_checks"])
    kept = [e for f, e in zip(view["failed_checks"], reasons, strict=False) if f in failed]
    kept += reasons[count:]  # the errored checks' explanations
    return {**view, "verdict": verdict, "failed_checks": failed, "explanations": kept}


async def _check_anchor(audit: AuditStore, point: ChangelogPoint, notes: list[str]) -> str | None:
    """Whether the archive still holds, at the recorded position, the chain hash the
    record keeps (the record itself is in the hash-chained log): ``ok``, ``mismatch``
    or None without a position. A mismatch means archived history up to the position
    was rewritten since; ``AuditStore.verify_archive`` finds where."""
    if point.position is None:
        return None
    stored = await audit.archive_hash_at(point.store_id, point.position.seq)
    if stored == point.position.hash:
        return "ok"
    notes.append(
        f"the change-log archive no longer holds, at position {point.position.seq}, the "
        "hash this record keeps: the history before the decision was altered"
    )
    return "mismatch"


class _Stopwatch:
    """Milliseconds spent in each phase of a replay (reported in ``as_of.timings_ms``);
    ``total`` is the wall time (the replay now runs beside the other phases)."""

    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()
        self._laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self._laps[name] = round((now - self._last) * 1000, 1)
        self._last = now

    def note(self, name: str, ms: float) -> None:
        self._laps[name] = round(ms, 1)

    def laps(self) -> dict[str, float]:
        self.lap("explain")
        return {**self._laps, "total": round((time.perf_counter() - self._start) * 1000, 1)}


async def _timed(work: Awaitable[_T]) -> tuple[float, _T]:
    started = time.perf_counter()
    result = await work
    return (time.perf_counter() - started) * 1000, result


async def replay_as_of_decision(
    fga: FgaClient,
    audit: AuditStore,
    archiver: ChangeArchiver | None,
    record: AuditRecord,
    what_if: Sequence[Tuple] = (),
    *,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The replay of :func:`replay_decision`, plus the verdicts rebuilt as of the decision.

    The archive is first brought up to date; the tuples that the recorded checks can
    read (walking the recorded model from each document, its folders, source, groups
    and the task) are rebuilt as they stood at the record's change-log position and
    time, written to a scratch store holding the recorded model (deleted afterwards),
    and the same named checks are asked of it with the condition clock at the decision
    time. Each document then carries ``then`` (which must equal ``was``), every
    conjunct was / then / now, and ``changes``: each tuple change since that the
    document's checks can read, with OpenFGA's time and the admin request that made it.
    """
    replay_context(record)  # only retrievals: refused before any work
    clock = _Stopwatch()
    # "Now" does not depend on the rebuild: both run at once.
    replaying = asyncio.ensure_future(_timed(replay_decision(fga, record, what_if, now=now)))
    try:
        point, notes = decision_point(record)
        head = None
        if archiver is not None and archiver.store_id == point.store_id:
            head = await archiver.sync(settled=point.decided_at)
        else:
            notes.append("no archiver runs for the recorded store: the archive may be behind")
        anchor = await _check_anchor(audit, point, notes)
        clock.lap("archive_sync")
        documents = list(dict.fromkeys(c.document_id for c in record.candidates if _checkable(c)))
        rebuilt = (
            await _reconstruct(fga, audit, record, point, documents, clock) if documents else None
        )
        clock.lap("attribute" if documents else "rebuild")  # scratch store deleted, walks
        now_ms, result = await replaying
    finally:
        if not replaying.done():
            replaying.cancel()
            with contextlib.suppress(asyncio.CancelledError, ScopegateError):
                await replaying
    clock.note("now", now_ms)
    later = [c for c in rebuilt.history.changes if not point.includes(c)] if rebuilt else []
    during = [c for c in rebuilt.history.changes if point.during(c)] if rebuilt else []
    actions = await find_admin_actions(audit, record.tenant, later + during)
    attributed = []
    for change in later:
        affected = _affected(change, rebuilt) if rebuilt else []
        if affected:
            checks = [i.name.value for i in affected]
            view = change_view(change, record.tenant, made_by(change, actions), checks)
            attributed.append((view, {i.document_id for i in affected}))
    current = {d["document_id"]: d for d in result["documents"]}
    for candidate, document in zip(record.candidates, result["documents"], strict=True):
        document.update(
            _as_of_document(record, candidate, current[candidate.document_id], rebuilt, attributed)
        )
    mismatches = [d["document_id"] for d in result["documents"] if d["then_matches_was"] is False]
    concurrent = [
        change_view(c, record.tenant, made_by(c, actions), during=True)
        for c in during
        if rebuilt is not None and _affected(c, rebuilt)
    ]
    if concurrent:
        notes.append(
            f"{len(concurrent)} change(s) landed while this request was being decided: they "
            "count as of the decision (the recorded decision time bounds them), though a "
            "check may have run before one of them landed"
        )
    if head is not None and head.began_us > micros(point.decided_at):
        notes.append(
            "archiving began after this decision: the state is rebuilt from OpenFGA's log "
            "as it stood when archiving began"
        )
    result["changes"] = [view for view, _ in attributed]
    result["as_of"] = {
        "mode": "decision",
        **point.to_dict(),
        "exact": not mismatches,
        "mismatches": mismatches,
        "tuples_reconstructed": rebuilt.tuples if rebuilt else 0,
        "objects_walked": len(rebuilt.history.objects) if rebuilt else 0,
        "archive_head_seq": head.seq if head is not None else None,
        "archive_anchor": anchor,
        "scratch_store": "removed" if rebuilt else None,
        "during_decision": concurrent,
        "timings_ms": clock.laps(),
    }
    result["notes"] = [*result["notes"], *notes, *(rebuilt.notes if rebuilt else ())]
    return result


async def change_history(
    audit: AuditStore,
    store_id: str,
    tenant: str,
    ref: str,
    *,
    graph: ModelGraph | None = None,
) -> dict[str, Any]:
    """Every archived change that touched ``ref``'s access over time, oldest first.

    ``ref`` is an OpenFGA object (``document:acme/d1``). The object, everything it was
    ever linked to (folders, source), every group or userset ever granted on them
    (nested groups included) and the tuples on all of those, each change with the
    admin request that made it.
    """
    model = graph or ModelGraph(load_model())
    history = await load_history(
        audit, store_id, model, _all_relations(model, ref), None, [], ever=True
    )
    actions = await find_admin_actions(audit, tenant, history.changes)
    changes = [
        change_view(c, tenant, made_by(c, actions))
        for c in history.changes
        if c.object.partition(":")[2].startswith(f"{tenant}/") or c.object == f"tenant:{tenant}"
    ]
    objects = sorted(public_ref(o, tenant) for o in history.objects)
    return {"object": public_ref(ref, tenant), "objects": objects, "changes": changes}


def _all_relations(graph: ModelGraph, ref: str) -> list[ObjRel]:
    kind = type_of(ref)
    return [(ref, relation) for (t, relation) in graph.rewrites if t == kind]

"""Replay: re-evaluate a recorded retrieval's candidates now, at the recorded model
and at the current one, and explain every failed conjunct in words."""

from __future__ import annotations

from typing import Any

from gateway.audit import AuditRecord
from gateway.decision import CheckName, decide, plan_checks
from gateway.fga import FgaClient
from gateway.identity import DelegationContext

_EXPLAIN = {
    CheckName.TASK_IN_TENANT: "task:{task} does not belong to tenant:{tenant}",
    CheckName.TASK_ACTIVE: "task:{task} is revoked or expired",
    CheckName.TASK_DELEGATOR: "user:{user} is not the delegator of task:{task}",
    CheckName.TASK_EXECUTOR: "agent:{agent} is not the executor of task:{task}",
    CheckName.USER_ACTIVE: "user:{user} is not an active member of tenant:{tenant}",
    CheckName.AGENT_ACTIVE: "agent:{agent} is not an active member of tenant:{tenant}",
    CheckName.DOCUMENT_IN_TENANT: "document:{document} is not stamped for tenant:{tenant}",
    CheckName.USER_CAN_READ: (
        "user:{user} has no viewer or owner relation on document:{document} "
        "(directly, through a group, its folders or its source)"
    ),
    CheckName.AGENT_CAN_READ: (
        "agent:{agent} has no agent_viewer relation on document:{document} "
        "(directly, through a group, its folders or its source)"
    ),
    CheckName.DOCUMENT_IN_TASK_SCOPE: (
        "document:{document} is outside the scope of task:{task} (or the scope expired)"
    ),
}


def explain(check: str, record: AuditRecord, document: str) -> str:
    """A sentence naming the missing relation behind one failed check."""
    try:
        template = _EXPLAIN[CheckName(check)]
    except ValueError:
        return f"{check} failed for document:{document}"
    return template.format(
        task=record.task,
        tenant=record.tenant,
        user=record.user,
        agent=record.agent,
        document=document,
    )


def context_of(record: AuditRecord) -> DelegationContext:
    return DelegationContext(
        tenant=record.tenant,
        user=record.user,
        agent=str(record.agent),
        task=str(record.task),
        token_id=record.token_id,
        expires_at=0,
    )


async def replay_decision(fga: FgaClient, record: AuditRecord) -> dict[str, Any]:
    """Per document: the recorded verdict, the verdict now, and why it fails now."""
    ctx = context_of(record)
    documents = [c.document_id for c in record.candidates if not c.document_id.startswith("?")]
    items = plan_checks(ctx, documents)
    now_outcomes = await fga.batch_check(items)
    at_model = await fga.batch_check(items, model_id=record.model_id or None)
    now = decide(ctx, documents, now_outcomes)
    recorded_model = decide(ctx, documents, at_model)
    results = []
    for c in record.candidates:
        verdict = now.get(c.document_id)
        at_recorded = recorded_model.get(c.document_id)
        now_v = verdict.verdict if verdict else "deny"
        failed = list(verdict.failed_checks) if verdict else list(c.failed_checks)
        results.append(
            {
                "document_id": c.document_id,
                "source": c.source,
                "was": c.verdict,
                "now": now_v,
                "now_at_recorded_model": at_recorded.verdict if at_recorded else "deny",
                "changed": c.verdict != now_v,
                "was_failed_checks": list(c.failed_checks),
                "failed_checks": failed,
                "explanations": [explain(f, record, c.document_id) for f in failed],
            }
        )
    return {
        "request_id": record.request_id,
        "recorded_model_id": record.model_id,
        "current_model_id": fga.model_id,
        "documents": results,
    }

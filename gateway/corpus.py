"""A realistic multi-tenant corpus, generated deterministically (demo and tests).

Two tenants with near-identical documents (so cross-tenant leaks would show), nested
folders, groups, owners and private notes. Text is written from templates so the
semantic embedding model has real topics to separate.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

TOPICS: dict[str, list[str]] = {
    "finance": [
        "Quarterly revenue forecast for {q}: revenue is expected to grow {n} percent, driven by "
        "enterprise renewals; operating margin guidance stays at {m} percent.",
        "Budget review for {q}: marketing spend is capped at {n} thousand dollars and travel is "
        "frozen until the revenue forecast is revised.",
        "Invoice reconciliation notes for {q}: {n} vendor invoices were matched against purchase "
        "orders; two disputed payments remain open with accounts payable.",
    ],
    "engineering": [
        "Incident postmortem: the primary database failed over after disk saturation; {n} minutes "
        "of degraded writes. Action items: alerting on replication lag and faster failover.",
        "Architecture decision record {n}: the search service moves to a vector index with "
        "nightly re-embedding; latency budget is {m} milliseconds at p95.",
        "On-call runbook: to rotate the API signing keys, drain traffic, publish the new JWKS, "
        "wait {n} minutes, then retire the old key.",
    ],
    "hr": [
        "Salary bands for engineering level {n}: base pay ranges are reviewed every {q}; equity "
        "refreshers follow the performance calibration.",
        "Parental leave policy: employees receive {n} weeks of paid leave; requests go to the "
        "people team at least {m} weeks ahead.",
        "Performance review guidance for {q}: managers write calibrated feedback and submit "
        "ratings before the committee meets.",
    ],
    "legal": [
        "Master services agreement with vendor {n}: liability is capped at {m} months of fees; "
        "data processing terms follow the standard addendum.",
        "Litigation hold notice {n}: preserve all email and chat records related to the {q} "
        "contract dispute until counsel releases the hold.",
    ],
    "product": [
        "Product roadmap for {q}: ship the reviewer dashboard, delegated agent tasks and "
        "{n} new connectors; pricing changes are out of scope.",
        "Customer feedback summary: {n} enterprise customers asked for audit exports and "
        "fine-grained agent permissions; churn risk is concentrated in {q}.",
    ],
}

NOTES = [
    "Private note: I am worried about my manager's reorg plan and considering a transfer in {q}.",
    "Private note: medical appointment on {n}; do not schedule meetings that afternoon.",
    "Private note: draft resignation letter, not sent, revisit after the {q} bonus.",
]

# folder -> (parent folder or None, topic)
FOLDERS: dict[str, tuple[str | None, str]] = {
    "finance": (None, "finance"),
    "finance-reports": ("finance", "finance"),
    "engineering": (None, "engineering"),
    "eng-incidents": ("engineering", "engineering"),
    "eng-runbooks": ("engineering", "engineering"),
    "hr": (None, "hr"),
    "legal": (None, "legal"),
    "product": (None, "product"),
}
FOLDER_GROUP = {
    "finance": "finance-team",
    "engineering": "engineering",
    "hr": "people-team",
    "legal": "legal-team",
    "product": "everyone",
}


@dataclass
class TenantWorld:
    tenant: str
    admin: str
    reviewer: str
    users: dict[str, list[str]]  # user -> groups
    agents: list[str]
    documents: list[dict[str, Any]] = field(default_factory=list)
    relationships: list[dict[str, str]] = field(default_factory=list)


def _root(folder: str) -> str:
    parent = FOLDERS[folder][0]
    return folder if parent is None else _root(parent)


def build_world(
    tenant: str, users: dict[str, list[str]], agents: list[str], documents: int, seed: int
) -> TenantWorld:
    rng = random.Random(seed)
    admin = next(iter(users))
    world = TenantWorld(tenant, admin, reviewer=list(users)[-1], users=users, agents=agents)
    for user, groups in users.items():
        for group in groups:
            world.relationships.append(
                {"user": f"user:{user}", "relation": "member", "object": f"group:{group}"}
            )
    world.relationships.append(
        {"user": "group:engineering#member", "relation": "member", "object": "group:everyone"}
    )
    for group in ("finance-team", "people-team", "legal-team"):
        world.relationships.append(
            {"user": f"group:{group}#member", "relation": "member", "object": "group:everyone"}
        )
    for folder, (parent, _topic) in FOLDERS.items():
        if parent is not None:
            world.relationships.append(
                {"user": f"folder:{parent}", "relation": "parent", "object": f"folder:{folder}"}
            )
    for folder, group in FOLDER_GROUP.items():
        world.relationships.append(
            {"user": f"group:{group}#member", "relation": "viewer", "object": f"folder:{folder}"}
        )
    folders = list(FOLDERS)
    user_names = list(users)
    for i in range(documents):
        if i % 12 == 11:
            owner = user_names[i % len(user_names)]
            text = rng.choice(NOTES).format(q=f"Q{1 + i % 4}", n=3 + i % 20)
            world.documents.append(
                {
                    "id": f"note-{owner}-{i}",
                    "text": text,
                    "folder": None,
                    "metadata": {"title": f"Private note of {owner}", "kind": "note"},
                    "acl": {"owner": f"user:{owner}", "viewers": [], "agents": []},
                    "private": True,
                }
            )
            continue
        folder = folders[i % len(folders)]
        topic = FOLDERS[folder][1]
        body = rng.choice(TOPICS[topic]).format(
            q=f"Q{1 + i % 4} {2026 + i % 2}", n=2 + (i * 7) % 40, m=5 + (i * 3) % 30
        )
        text = f"{tenant.title()} {topic} memo {i}. {body}"
        agents_acl = [f"agent:{a}" for a in agents if a == "summarizer" or topic in a]
        world.documents.append(
            {
                "id": f"{topic[:3]}-{i:04d}",
                "text": text,
                "folder": folder,
                "metadata": {"title": f"{topic.title()} document {i}", "topic": topic},
                "acl": {"viewers": [], "agents": agents_acl},
            }
        )
    _ = _root
    return world


def demo_worlds(documents_per_tenant: int = 180) -> list[TenantWorld]:
    acme = build_world(
        "acme",
        {
            "carol": ["people-team"],
            "alice": ["engineering"],
            "bob": ["finance-team"],
            "dave": [],
            "rita": ["legal-team"],
        },
        ["summarizer", "finance-analyst"],
        documents_per_tenant,
        seed=7,
    )
    globex = build_world(
        "globex",
        {
            "grace": ["people-team"],
            "alice": ["finance-team", "engineering"],
            "hank": ["engineering"],
            "ivan": ["legal-team"],
        },
        ["summarizer", "finance-analyst"],
        documents_per_tenant,
        seed=7,
    )
    return [acme, globex]

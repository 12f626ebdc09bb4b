"""``scopegate ingest S PATH``: mixed files with folders and ACLs (gateway/files.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.api import create_app
from gateway.cli import build_parser
from gateway.commands import _in_process
from gateway.files import collect, html_text
from gateway.identity import PrincipalContext
from gateway.service import Gateway
from tests.world import World


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing ``text`` in Helvetica (written by hand, no PDF writer)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    )
    return bytes(out)


def make_tree(root: Path) -> None:
    (root / "eng" / "runbooks").mkdir(parents=True)
    (root / "sales").mkdir()
    (root / "eng" / "runbooks" / "failover.md").write_text(
        "# Failover\n\nPromote the payments database replica when the primary is down."
    )
    (root / "eng" / "oncall.txt").write_text("The on-call rotation changes every Monday at noon.")
    (root / "sales" / "pricing.html").write_text(
        "<html><head><title>t</title><style>.x{color:red}</style></head><body>"
        "<script>var secret = 'do-not-index';</script><h1>Pricing</h1>"
        "<p>Enterprise plans are priced per seat.</p></body></html>"
    )
    (root / "sales" / "forecast.pdf").write_bytes(minimal_pdf("Quarterly revenue forecast"))
    (root / "sales" / "broken.pdf").write_bytes(b"%PDF-1.4 not really a pdf")
    (root / "sales" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "empty.md").write_text("   \n")
    (root / "scopegate-acl.json").write_text(
        json.dumps(
            {
                "rules": [
                    {"glob": "eng/*", "viewers": ["group:eng#member"], "agents": ["agent:helper"]},
                    {"glob": "sales/*", "viewers": ["user:alice"], "agents": ["agent:helper"]},
                ]
            }
        )
    )


@pytest.fixture
async def world(gateway: Gateway) -> AsyncIterator[World]:
    transport = httpx.ASGITransport(app=create_app(gateway=gateway))
    async with httpx.AsyncClient(transport=transport, base_url="http://scopegate") as http:
        w = await World(gateway, http, "acme").setup(members=["alice", "bob"], agents=["helper"])
        await w.relationships(
            writes=[{"user": "user:bob", "relation": "member", "object": "group:eng"}]
        )
        yield w


async def ingest(w: World, root: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    args = build_parser().parse_args(
        ["ingest", "docs", str(root), "--tenant", "acme", "--as", "admin"]
    )
    assert await _in_process("ingest", args, w.g, PrincipalContext("acme", "admin", "t")) == 0
    return dict(json.loads(capsys.readouterr().out))


async def test_directory_of_mixed_files(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w, root = world, tmp_path / "tree"
    make_tree(root)
    summary = await ingest(w, root, capsys)
    assert summary["new"] == 4, summary["failed"]
    assert summary["changed"] == 0 and summary["skipped"] == 0
    reasons = {f["path"]: f["reason"] for f in summary["failed"]}
    assert set(reasons) == {"sales/broken.pdf", "sales/latin1.txt", "empty.md"}
    assert "PDF" in reasons["sales/broken.pdf"] and "UTF-8" in reasons["sales/latin1.txt"]

    # Folders from the tree, ids from the paths, ACLs from the mapping file.
    entry = await w.g.catalog.document("acme", "eng__runbooks__failover.md")
    assert entry is not None and entry.folder == "eng__runbooks"
    tuples = await w.g.fga.read(object="document:acme/eng__runbooks__failover.md")
    assert any(t.user == "group:acme/eng#member" and t.relation == "viewer" for t in tuples)
    assert await w.g.catalog.document("acme", "sales__broken.pdf") is None  # never half-ingested

    bob = await w.task("bob", "helper", ["source:docs"])
    alice = await w.task("alice", "helper", ["source:docs"])
    assert set(await w.retrieved_docs("bob", "helper", bob, "payments database failover", 10)) == {
        "eng__runbooks__failover.md",
        "eng__oncall.txt",
    }
    response = await w.retrieve("alice", "helper", alice, "enterprise pricing per seat", k=10)
    chunks = response.json()["chunks"]
    assert {c["document_id"] for c in chunks} == {"sales__pricing.html", "sales__forecast.pdf"}
    texts = " ".join(c["text"] for c in chunks)
    assert "Enterprise plans" in texts and "Quarterly revenue forecast" in texts
    assert "do-not-index" not in texts and "color:red" not in texts

    # Unchanged files are skipped; an edited one is the only change.
    again = await ingest(w, root, capsys)
    assert again["skipped"] == 4 and again["new"] == 0 and again["changed"] == 0
    (root / "eng" / "oncall.txt").write_text("The on-call rotation changes every Tuesday.")
    edited = await ingest(w, root, capsys)
    assert edited["changed"] == 1 and edited["skipped"] == 3


async def test_nested_directories_become_nested_folders(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``eng/runbooks/`` lands in folder ``eng__runbooks`` under folder ``eng``: a grant
    and a task on ``folder:eng`` reach the runbooks; without the grant, nothing."""
    w, root = world, tmp_path / "tree"
    make_tree(root)
    summary = await ingest(w, root, capsys)
    assert not [f for f in summary["failed"] if f["path"] == "(folders)"], summary
    parents = {
        t.user for t in await w.g.fga.read(object="folder:acme/eng__runbooks")
        if t.relation == "parent"
    }  # fmt: skip
    assert "folder:acme/eng" in parents
    task = await w.task("alice", "helper", ["folder:eng"])
    query = "payments database failover"
    assert await w.retrieved_docs("alice", "helper", task, query, 10) == []
    await w.relationships(
        writes=[{"user": "user:alice", "relation": "viewer", "object": "folder:eng"}]
    )
    assert set(await w.retrieved_docs("alice", "helper", task, query, 10)) == {
        "eng__runbooks__failover.md",
        "eng__oncall.txt",
    }
    # Running it again changes nothing and links nothing twice.
    again = await ingest(w, root, capsys)
    assert again["skipped"] == 4 and not [f for f in again["failed"] if f["path"] == "(folders)"]


def test_html_text_and_collect_of_a_single_file(tmp_path: Path) -> None:
    assert html_text("<p>a <b>b</b></p><script>x()</script><p>c</p>") == "a b\nc"
    single = tmp_path / "note.md"
    single.write_text("hello")
    found = collect(single)
    assert [d["id"] for d in found.documents] == ["note.md"]
    assert "folder" not in found.documents[0]
    assert found.documents[0]["acl"] == {"viewers": [], "agents": []}

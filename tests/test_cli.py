"""The `scopegate` command on an embedded data directory and against a running server."""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.fga_server import ManagedOpenFGA
from tests.served import serve_gateway
from tests.test_fga_server import SCOPEGATE, _free_port, _wait_ready
from tests.world import doc


def sg(*args: str, data: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [SCOPEGATE, *args, "--data-dir", str(data)], capture_output=True, text=True, timeout=180
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _setup(data: Path, tmp_path: Path) -> str:
    sg("tenant", "create", "acme", "--admin", "carol", data=data)
    admin = ["--tenant", "acme", "--as", "carol"]
    sg("sources", "add", "docs", *admin, data=data)
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "\n".join(
            json.dumps(d)
            for d in [
                {
                    "id": "rev",
                    "text": "Quarterly revenue forecast grows eight percent.",
                    "acl": {"viewers": ["user:alice"], "agents": ["agent:bot"]},
                },
                {
                    "id": "pay",
                    "text": "Salary bands for engineers, revenue unrelated.",
                    "acl": {"viewers": ["user:bob"], "agents": ["agent:bot"]},
                },
            ]
        )
        + "\n"
    )
    out = sg("ingest", "docs", str(docs), *admin, data=data)
    assert '"documents": 2' in out.stdout
    # alice and the bot must be tenant members for retrieval to be allowed.
    return sg(
        "task",
        "create",
        "--user",
        "user:alice",
        "--agent",
        "agent:bot",
        "--scope",
        "source:docs",
        *admin,
        data=data,
    ).stdout


def test_embedded_cli_round_trip(tmp_path: Path) -> None:
    data = tmp_path / "data"
    task = json.loads(_setup(data, tmp_path))["task_id"]
    token = sg(
        "token",
        "issue",
        "--user",
        "alice",
        "--tenant",
        "acme",
        "--agent",
        "bot",
        "--task",
        task,
        "--ttl",
        "5m",
        data=data,
    ).stdout.strip()
    assert token.count(".") == 2
    # Not yet members: nothing is returned, and the decision is audited.
    out = json.loads(sg("retrieve", "revenue", "--token", token, data=data).stdout)
    assert out["chunks"] == []
    listed = sg("sources", "list", "--tenant", "acme", "--as", "carol", data=data).stdout
    assert '"docs"' in listed
    denied = sg("sources", "list", "--tenant", "acme", "--as", "alice", data=data, check=False)
    assert denied.returncode == 2 and "forbidden" in denied.stderr
    recorded = json.loads(sg("audit", "verify", data=data).stdout)["checked"]
    assert recorded >= 2  # the retrieval and the admin writes before it
    # Retention: everything older than "now" goes, and the chain still verifies after it.
    purged = sg("audit", "purge", "--older-than-days", "0", data=data)
    assert f"purged {recorded} audit records" in purged.stderr
    verified = sg("audit", "verify", data=data)
    assert json.loads(verified.stdout)["ok"] is True


def test_cli_over_url_uses_running_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = _free_port()
    proc = subprocess.Popen(
        [SCOPEGATE, "serve", "--data-dir", str(data), "--port", str(port), "--metrics-port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(f"http://127.0.0.1:{port}")
        # runtime.json makes plain commands talk to the running server over HTTP.
        task = json.loads(_setup(data, tmp_path))["task_id"]
        url = f"http://127.0.0.1:{port}"
        sg("tenant", "create", "globex", "--admin", "grace", "--url", url, data=data)
        token = sg(
            "token",
            "issue",
            "--user",
            "alice",
            "--tenant",
            "acme",
            "--agent",
            "bot",
            "--task",
            task,
            data=data,
        ).stdout.strip()
        out = json.loads(
            sg("retrieve", "revenue", "--token", token, "--url", url, data=data).stdout
        )
        assert out["chunks"] == []
        bad = sg(
            "retrieve", "revenue", "--token", "not-a-token", "--url", url, data=data, check=False
        )
        assert bad.returncode == 2 and "invalid_token" in bad.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


# -- administration, in-process and over HTTP ------------------------------------------------


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


@dataclass
class Cli:
    """``scopegate`` run by its ``main`` in this process (a fresh process costs seconds).

    Without ``url`` each command starts its own gateway on ``data`` (the in-process
    path); with it, each command talks to the gateway at ``url`` over HTTP.
    """

    data: Path
    capsys: pytest.CaptureFixture[str]
    url: str | None = None

    def __call__(self, *args: str, ok: bool = True) -> Ran:
        argv = [*args, "--data-dir", str(self.data), *(["--url", self.url] if self.url else [])]
        # main() runs its own event loop: keep it off the test runner's thread.
        with ThreadPoolExecutor(1) as pool:
            code = pool.submit(_exit_code, argv).result(timeout=120)
        out, err = self.capsys.readouterr()
        if ok:
            assert code == 0, err
        return Ran(code, out, err)

    def json(self, *args: str) -> Any:
        return json.loads(self(*args).out)


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse refusing the arguments
        return int(exc.code or 0)


ADMIN = ("--tenant", "acme", "--as", "carol")
QUERY = "revenue forecast, salary bands and finance budget"


def _admin_round_trip(cli: Cli, tmp_path: Path) -> None:
    cli("tenant", "create", "acme", "--admin", "carol")
    cli("sources", "add", "docs", *ADMIN)

    # Relationships: one with --user/--relation/--object, more with --tuple and --file.
    members = tmp_path / "members.jsonl"
    members.write_text(
        json.dumps({"user": "user:bob", "relation": "member", "object": "group:fin"}) + "\n"
    )
    written = cli.json(
        "relationships",
        "write",
        *ADMIN,
        "--user",
        "agent:bot",
        "--relation",
        "member",
        "--object",
        "tenant:acme",
        "--tuple",
        "user:alice,member,tenant:acme",
        "user:bob member tenant:acme",
        "--file",
        str(members),
    )
    assert written == {"written": 4, "deleted": 0}

    # Ingest in batches of two; a second run finds every document unchanged.
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(
            json.dumps(d) + "\n"
            for d in [
                doc(
                    "rev",
                    "Quarterly revenue forecast grows eight percent.",
                    viewers=["user:alice"],
                    agents=["agent:bot"],
                ),
                doc(
                    "pay", "Salary bands for engineers.", viewers=["user:bob"], agents=["agent:bot"]
                ),
                doc(
                    "fin",
                    "Finance budget for next year.",
                    viewers=["group:fin#member"],
                    agents=["agent:bot"],
                ),
            ]
        )
    )
    first = cli.json("ingest", "docs", str(docs), "--batch", "2", *ADMIN)
    assert (first["documents"], first["skipped"]) == (3, 0) and first["chunks"] >= 3
    assert cli.json("ingest", "docs", str(docs), "--batch", "2", *ADMIN)["skipped"] == 3
    shown = cli.json("sources", "show", "docs", *ADMIN)
    assert shown == {"id": "docs", "kind": "chroma", "config": {}, "documents": 3}

    on_pay = cli.json("relationships", "list", "--object", "document:pay", *ADMIN)
    assert {"user": "user:bob", "relation": "viewer", "object": "document:pay"} in on_pay
    assert {"user": "agent:bot", "relation": "agent_viewer", "object": "document:pay"} in on_pay
    assert all(r["object"] == "document:pay" for r in on_pay)
    grant = {"user": "user:alice", "relation": "viewer", "object": "document:pay"}
    assert grant not in on_pay
    cli("relationships", "write", "--tuple", "user:alice,viewer,document:pay", *ADMIN)
    assert grant in cli.json("relationships", "list", "--user", "user:alice", *ADMIN)
    deleted = cli.json(
        "relationships", "delete", "--tuple", "user:alice,viewer,document:pay", *ADMIN
    )
    assert deleted == {"written": 0, "deleted": 1}
    assert grant not in cli.json("relationships", "list", "--object", "document:pay", *ADMIN)

    # bob's agent reads pay and fin, not rev; a what-if grant on rev would allow it.
    task = cli.json(
        "task",
        "create",
        "--user",
        "user:bob",
        "--agent",
        "agent:bot",
        "--scope",
        "source:docs",
        *ADMIN,
    )["task_id"]
    token = cli(
        "token", "issue", "--user", "bob", "--tenant", "acme", "--agent", "bot", "--task", task
    ).out.strip()
    found = cli.json("retrieve", QUERY, "--token", token, "-k", "10")
    assert {c["document_id"] for c in found["chunks"]} == {"pay", "fin"}
    replay = cli.json(
        "audit", "replay", found["request_id"], *ADMIN, "--what-if", "user:bob,viewer,document:rev"
    )
    assert replay["what_if"]["would_allow"] == ["rev"]
    assert replay["what_if"]["persisted"] is False
    plain = cli.json("audit", "replay", found["request_id"], *ADMIN)
    assert plain["what_if"] is None

    assert cli("documents", "delete", "docs", "fin", *ADMIN).out.strip() == (
        "document fin deleted from source docs"
    )
    assert cli.json("sources", "show", "docs", *ADMIN)["documents"] == 2
    again = cli("documents", "delete", "docs", "fin", *ADMIN, ok=False)
    assert again.code == 2
    assert "scopegate: not_found: document fin not found in source docs" in again.err

    # Deprovisioning bob: his relations go, his task is revoked, his agent gets nothing.
    gone = cli("principals", "deprovision", "user:bob", *ADMIN)
    counts = json.loads(gone.out)
    # member of the tenant and of group:fin, viewer of pay, delegator of the task
    assert counts["relations_removed"] >= 3 and counts["tasks_revoked"] == 1
    assert "user:bob deprovisioned" in gone.err
    assert cli.json("relationships", "list", "--user", "user:bob", *ADMIN) == []
    assert cli.json("retrieve", QUERY, "--token", token, "-k", "10")["chunks"] == []

    assert cli("sources", "remove", "docs", *ADMIN).out.strip() == "source docs removed"
    missing = cli("sources", "show", "docs", *ADMIN, ok=False)
    assert missing.code == 2
    assert "scopegate: not_found: source docs not found" in missing.err

    # Mistakes are one clear line and a non-zero exit, before or at the gateway.
    short = cli("relationships", "write", "--tuple", "user:alice,viewer", *ADMIN, ok=False)
    assert short.code == 2 and "is not USER,RELATION,OBJECT" in short.err
    partial = cli("relationships", "write", "--user", "user:alice", *ADMIN, ok=False)
    assert partial.code == 2 and "--user, --relation and --object go together" in partial.err
    refused = cli(
        "relationships", "write", "--tuple", "user:alice,viewer,tenant:acme", *ADMIN, ok=False
    )
    assert refused.code == 2 and "scopegate: invalid_request: relation 'viewer'" in refused.err
    assert len(refused.err.strip().splitlines()) == 1


def test_admin_commands_in_process(
    openfga: ManagedOpenFGA,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The session's OpenFGA instead of a managed one per command; post-filter records
    # every candidate, so the replay below has the denied document to re-evaluate.
    monkeypatch.setenv("SCOPEGATE_OPENFGA_URL", openfga.url)
    monkeypatch.setenv("SCOPEGATE_OPENFGA_STORE_NAME", f"cli-{uuid.uuid4().hex[:12]}")
    monkeypatch.setenv("SCOPEGATE_STRATEGY", "postfilter")
    _admin_round_trip(Cli(tmp_path / "data", capsys), tmp_path)


def test_admin_commands_over_http(
    openfga: ManagedOpenFGA, embeddings: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "served"
    bg = serve_gateway(openfga, data, embeddings, strategy="postfilter")
    try:
        # Same data directory: the commands mint their tokens with the gateway's key.
        assert bg.url is not None
        _admin_round_trip(Cli(data, capsys, bg.url), tmp_path)
    finally:
        bg.close()

"""The `scopegate` command on an embedded data directory and against a running server."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from tests.test_fga_server import SCOPEGATE, _free_port, _wait_ready


def sg(*args: str, data: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([SCOPEGATE, *args, "--data-dir", str(data)], capture_output=True,
                            text=True, timeout=180)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _setup(data: Path, tmp_path: Path) -> str:
    sg("tenant", "create", "acme", "--admin", "carol", data=data)
    admin = ["--tenant", "acme", "--as", "carol"]
    sg("sources", "add", "docs", *admin, data=data)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps(d) for d in [
        {"id": "rev", "text": "Quarterly revenue forecast grows eight percent.",
         "acl": {"viewers": ["user:alice"], "agents": ["agent:bot"]}},
        {"id": "pay", "text": "Salary bands for engineers, revenue unrelated.",
         "acl": {"viewers": ["user:bob"], "agents": ["agent:bot"]}},
    ]) + "\n")
    out = sg("ingest", "docs", str(docs), *admin, data=data)
    assert '"documents": 2' in out.stdout
    # alice and the bot must be tenant members for retrieval to be allowed.
    return sg("task", "create", "--user", "user:alice", "--agent", "agent:bot",
              "--scope", "source:docs", *admin, data=data).stdout


def test_embedded_cli_round_trip(tmp_path: Path) -> None:
    data = tmp_path / "data"
    task = json.loads(_setup(data, tmp_path))["task_id"]
    token = sg("token", "issue", "--user", "alice", "--tenant", "acme", "--agent", "bot",
               "--task", task, "--ttl", "5m", data=data).stdout.strip()
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
    proc = subprocess.Popen([SCOPEGATE, "serve", "--data-dir", str(data), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(f"http://127.0.0.1:{port}")
        # runtime.json makes plain commands talk to the running server over HTTP.
        task = json.loads(_setup(data, tmp_path))["task_id"]
        url = f"http://127.0.0.1:{port}"
        sg("tenant", "create", "globex", "--admin", "grace", "--url", url, data=data)
        token = sg("token", "issue", "--user", "alice", "--tenant", "acme", "--agent", "bot",
                   "--task", task, data=data).stdout.strip()
        out = json.loads(sg("retrieve", "revenue", "--token", token, "--url", url,
                            data=data).stdout)
        assert out["chunks"] == []
        bad = sg("retrieve", "revenue", "--token", "not-a-token", "--url", url, data=data,
                 check=False)
        assert bad.returncode == 2 and "invalid_token" in bad.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)

"""The managed OpenFGA process and `scopegate serve`: start, reuse, clean stop."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gateway.fga_server import ManagedOpenFGA, find_openfga_binary

ROOT = Path(__file__).resolve().parent.parent
SCOPEGATE = str(ROOT / ".venv" / "bin" / "scopegate")


def _openfga_children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,ppid=,comm=", "-e"], capture_output=True, text=True)
    return [
        int(p)
        for p, pp, comm in (line.split(None, 2) for line in out.stdout.splitlines())
        if int(pp) == pid and comm.strip().startswith("openfga")
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[1][0] != "Z"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, timeout: float = 90.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/readyz", timeout=2.0)
            if response.status_code == 200:
                body: dict[str, object] = response.json()
                return body
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} never became ready")


def test_openfga_binary_reports_its_release() -> None:
    # scripts/install-openfga stamps the build info that `go install` leaves at `dev`.
    out = subprocess.run(
        [find_openfga_binary(), "version"], capture_output=True, text=True, timeout=60
    )
    reported = re.search(r"OpenFGA version `([^`]*)`", out.stdout + out.stderr)
    assert reported, out.stdout + out.stderr
    assert reported.group(1) != "dev"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", reported.group(1)), reported.group(1)


def test_managed_server_stops_cleanly(tmp_path: Path) -> None:
    server = ManagedOpenFGA(tmp_path)
    server.start()
    pid = server.process.pid if server.process else 0
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    server.stop()
    assert not _alive(pid)
    assert not (tmp_path / "openfga.pid").exists()


def test_child_dies_with_a_killed_parent(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from gateway.fga_server import ManagedOpenFGA;"
        f"s = ManagedOpenFGA(Path({str(tmp_path)!r})); s.start();"
        "print(s.process.pid, flush=True); time.sleep(600)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 15
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "openfga outlived its SIGKILLed parent"


def test_serve_ready_interrupt_and_reuse(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ids = []
    for _ in range(2):
        port, metrics_port = _free_port(), _free_port()
        proc = subprocess.Popen(
            [
                SCOPEGATE,
                "serve",
                "--data-dir",
                str(data),
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            body = _wait_ready(f"http://127.0.0.1:{port}")
            assert body["openfga"] is True and body["audit"] is True
            ids.append((body["store_id"], body["model_id"]))
            children = _openfga_children(proc.pid)
            assert children, "serve should run a managed openfga child"
            runtime = json.loads((data / "runtime.json").read_text())
            # Prometheus on its own loopback listener, never on the agent-facing port.
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            assert runtime["metrics_url"] == metrics_url
            scraped = httpx.get(metrics_url)
            assert scraped.status_code == 200
            readyz = 'scopegate_http_request_seconds_count{route="other",status="200"}'
            assert readyz in scraped.text, "the metrics listener serves the API's counters"
            assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 404
            assert httpx.get(f"http://127.0.0.1:{metrics_port}/readyz").status_code == 404
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
        for child in children:
            deadline = time.monotonic() + 10
            while _alive(child) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _alive(child), "Ctrl-C left an openfga process behind"
        assert not (data / "runtime.json").exists()
    assert ids[0] == ids[1], "a second start must reuse the store and the model"


def test_serve_refuses_a_taken_metrics_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        result = subprocess.run(
            [
                SCOPEGATE,
                "serve",
                "--data-dir",
                str(tmp_path / "data"),
                "--port",
                str(_free_port()),
                "--metrics-port",
                busy,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2 and "cannot listen" in result.stderr, result.stderr
    assert not (tmp_path / "data" / "runtime.json").exists()
    assert not (tmp_path / "data" / "openfga").exists(), "nothing starts when a port is taken"

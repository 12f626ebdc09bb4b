"""A managed OpenFGA server for the embedded default.

scopegate starts OpenFGA as a child process on SQLite inside the data directory,
on free loopback ports, and stops it with itself. The child is tied to the parent
with PR_SET_PDEATHSIG, so even a SIGKILLed gateway leaves no server behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import httpx

from gateway.errors import AuthorizationUnavailable

REPO_ROOT = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1
LISTOBJECTS_DEADLINE_S = 3
LISTOBJECTS_MAX_RESULTS = 1000
#: The managed server's check query cache TTL (0 turns the cache off) and its request
#: timeout, which bounds how long after a change a stale sub-result can still be cached.
CHECK_CACHE_TTL_S = 10.0
REQUEST_TIMEOUT_S = 5.0
#: Slack for scheduling and clock rate when trusting OpenFGA's check cache.
CACHE_QUIET_MARGIN_S = 1.0


def cache_quiet_s(check_cache_ttl_s: float | None, request_timeout_s: float) -> float | None:
    """How long the change log must be quiet before OpenFGA's check cache can hold no
    answer older than the last change (docs/cache.md); None when there is no cache. A
    stale entry was written at most one request timeout after the change it missed,
    and lives one TTL."""
    if not check_cache_ttl_s:
        return None
    return check_cache_ttl_s + request_timeout_s + CACHE_QUIET_MARGIN_S


def find_openfga_binary(configured: str | None = None) -> str:
    """The configured binary, the project-local build, or one on PATH."""
    candidates = [
        configured,
        str(REPO_ROOT / ".tools" / "bin" / "openfga"),
        shutil.which("openfga"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AuthorizationUnavailable(
        "no OpenFGA binary: run scripts/install-openfga (needs Go), put 'openfga' on PATH, "
        "set SCOPEGATE_OPENFGA_BINARY, or point SCOPEGATE_OPENFGA_URL at a running server"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _duration(seconds: float) -> str:
    """A Go duration flag value, in milliseconds (never rounded up to a longer one)."""
    return f"{max(1, int(seconds * 1000))}ms"


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGTERM it when
    # the parent dies, however the parent dies.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ManagedOpenFGA:
    """Start/stop an OpenFGA child process whose datastore lives in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        binary: str | None = None,
        *,
        check_cache_ttl_s: float = CHECK_CACHE_TTL_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        if check_cache_ttl_s < 0 or request_timeout_s <= 0:
            raise ValueError("check_cache_ttl_s must be >= 0 and request_timeout_s > 0")
        self.data_dir = data_dir
        self.binary = find_openfga_binary(binary)
        self.check_cache_ttl_s = check_cache_ttl_s
        self.request_timeout_s = request_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.http_port = 0
        self._log_path = data_dir / "openfga.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def datastore_uri(self) -> str:
        return f"file:{self.data_dir / 'openfga.db'}"

    def _datastore_args(self) -> list[str]:
        return ["--datastore-engine", "sqlite", "--datastore-uri", self.datastore_uri]

    def migrate(self) -> None:
        result = subprocess.run(
            [self.binary, "migrate", *self._datastore_args()],
            capture_output=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise AuthorizationUnavailable(
                f"openfga migrate failed: {result.stderr.decode(errors='replace')[-500:]}"
            )

    def start(self, timeout_s: float = 60.0) -> str:
        """Migrate, launch on free loopback ports, wait until healthy; return the URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.migrate()
        self.http_port = _free_port()
        args = [
            self.binary,
            "run",
            *self._datastore_args(),
            "--http-addr",
            f"127.0.0.1:{self.http_port}",
            "--grpc-addr",
            f"127.0.0.1:{_free_port()}",
            "--playground-enabled=false",
            "--metrics-enabled=false",
            "--log-level",
            "warn",
            "--listObjects-deadline",
            f"{LISTOBJECTS_DEADLINE_S}s",
            "--listObjects-max-results",
            str(LISTOBJECTS_MAX_RESULTS),
            f"--request-timeout={_duration(self.request_timeout_s)}",
            *self._cache_args(),
        ]
        log = self._log_path.open("ab")
        self.process = subprocess.Popen(
            args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        log.close()
        self._wait_healthy(timeout_s)
        (self.data_dir / "openfga.pid").write_text(str(self.process.pid))
        return self.url

    def _cache_args(self) -> list[str]:
        """The check query cache only: its entries are written by the request that
        computed them, so the request timeout bounds their age. (The iterator cache is
        left off: it drains iterators in the background, past any request's end.)"""
        if self.check_cache_ttl_s == 0:
            return []
        return [
            "--check-query-cache-enabled=true",
            f"--check-query-cache-ttl={_duration(self.check_cache_ttl_s)}",
            "--cache-ttl-jitter-percentage=0",
        ]

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AuthorizationUnavailable(
                    f"openfga exited with {self.process.returncode}; see {self._log_path}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise AuthorizationUnavailable(f"openfga did not become healthy in {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the child (SIGTERM, then SIGKILL) and reap it."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout_s)
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "openfga.pid").unlink()

    def pause(self) -> None:
        """SIGSTOP the server (fault injection: a hung OpenFGA)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def __enter__(self) -> ManagedOpenFGA:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

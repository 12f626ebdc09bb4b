"""A private, throwaway PostgreSQL cluster for tests, from Debian's server binaries.

:func:`running_postgres` initialises a cluster, starts it on a free loopback port with
trust authentication for 127.0.0.1 only (and a Unix socket in its own directory),
yields its DSN, then stops and deletes it. PostgreSQL refuses to run as root, so under
root the cluster runs as the ``postgres`` system user (created by the Debian package
``postgresql``; ``scripts/install-system-deps`` installs it) in a directory that user
owns. Anything that prevents the cluster from starting raises: tests that need
PostgreSQL fail, they never skip.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

SERVICE_USER = "postgres"
_SETTINGS = """
listen_addresses = '127.0.0.1'
unix_socket_directories = '{socket_dir}'
max_connections = 200
shared_buffers = 32MB
fsync = off
synchronous_commit = off
full_page_writes = off
"""
_HBA = "local all all trust\nhost all all 127.0.0.1/32 trust\n"


def postgres_bin_dir() -> Path:
    """The newest installed ``/usr/lib/postgresql/<version>/bin``."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if not found:
        raise RuntimeError(
            "PostgreSQL server binaries not found under /usr/lib/postgresql: "
            "run scripts/install-system-deps (Debian package postgresql)"
        )
    return found[-1].parent


@contextlib.contextmanager
def running_postgres(tmp_dir: Path) -> Iterator[str]:
    """Start a throwaway cluster; yield ``postgresql://postgres@127.0.0.1:PORT/postgres``."""
    bin_dir = postgres_bin_dir()
    base = _cluster_dir(Path(tmp_dir))
    try:
        data = base / "data"
        _run([bin_dir / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
              "--locale=C", "--no-sync"], base)  # fmt: skip
        _configure(data, base)
        port = _start(bin_dir, data, base)
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            _stop(bin_dir, data, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _as_root() -> bool:
    return os.geteuid() == 0


def _cluster_dir(tmp_dir: Path) -> Path:
    """A fresh directory the server's user owns and can reach.

    Under root, pytest's temporary directories (mode 0700) are out of the service
    user's reach, so the cluster then lives in a new directory of the system's
    temporary area instead.
    """
    if not _as_root():
        return Path(tempfile.mkdtemp(prefix="pg-", dir=tmp_dir))
    base = Path(tempfile.mkdtemp(prefix="scopegate-pg-"))
    user = pwd.getpwnam(SERVICE_USER)
    os.chown(base, user.pw_uid, user.pw_gid)
    return base


def _run(argv: list[str | Path], cwd: Path, *, check: bool = True) -> str:
    """Run a server binary (as the service user under root); its combined output."""
    command = [str(a) for a in argv]
    if _as_root():
        command = ["runuser", "-u", SERVICE_USER, "--", *command]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return done.stdout + done.stderr


def _configure(data: Path, base: Path) -> None:
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(_SETTINGS.format(socket_dir=base))
    (data / "pg_hba.conf").write_text(_HBA)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start(bin_dir: Path, data: Path, base: Path, attempts: int = 3) -> int:
    """Start on a free port, trying another if the port was taken meanwhile."""
    log = base / "server.log"
    for _ in range(attempts):
        port = _free_port()
        argv: list[str | Path] = [bin_dir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60",
                                  "-o", f"-p {port}", "start"]  # fmt: skip
        output = _run(argv, base, check=False)
        if "server started" in output:
            return port
    tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
    raise RuntimeError(f"PostgreSQL did not start:\n{output}\n{tail}")


def _stop(bin_dir: Path, data: Path, base: Path) -> None:
    stop = [bin_dir / "pg_ctl", "-D", data, "-w", "-t", "30", "stop"]
    if "server stopped" not in _run([*stop, "-m", "fast"], base, check=False):
        _run([*stop, "-m", "immediate"], base, check=False)

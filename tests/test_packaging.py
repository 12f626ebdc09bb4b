"""The wheel (pyproject.toml), built from a copy of the sources and installed in a fresh
virtualenv: ``scopegate serve`` from it starts a gateway (the authorization model ships
with the package) and serves the reviewer page with its static files.

The fresh virtualenv sees the development environment's dependencies through a ``.pth``
line (nothing is downloaded) but not the editable install of this repository: the
package it imports must be the one the wheel installed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import uuid
import zipfile
from pathlib import Path

import httpx

from gateway.fga_server import ManagedOpenFGA
from tests.test_fga_server import _free_port, _wait_ready

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "gateway", "connectors", "fga_models")
STATIC = ROOT / "gateway" / "static"


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _build_wheel(tmp_path: Path) -> Path:
    # A copy, so that no build/ directory is left in (or reused from) the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    # No build isolation: the development environment's setuptools, nothing downloaded.
    out = _run(
        sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
        "--no-index", "-w", wheels, src, cwd=tmp_path,
    )
    assert "BuildBackendWarning" not in out and "SetuptoolsDeprecationWarning" not in out, out
    (wheel,) = wheels.glob("scopegate-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path)
        .strip()
        .splitlines()[-1]
    )
    # Dependencies from the development environment; a directory added by a .pth line
    # has its own .pth files (the editable install's finder among them) ignored.
    (site / "dev-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        wheel, cwd=tmp_path,
    )
    return venv


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SCOPEGATE_", "PYTHON")) and k != "VIRTUAL_ENV"
    }
    return {**env, **extra}


def test_wheel_serves_the_reviewer_page_from_a_fresh_virtualenv(
    tmp_path: Path, openfga: ManagedOpenFGA
) -> None:
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"gateway/static/{p.name}" for p in STATIC.iterdir()}
    assert shipped and shipped <= names
    assert {"gateway/fga_model/model.json", "gateway/api.py", "connectors/base.py"} <= names
    metadata = zipfile.ZipFile(wheel).read("scopegate-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata

    venv = _fresh_venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"  # a cwd without the sources in it
    elsewhere.mkdir()
    probe = _run(
        venv / "bin" / "python", "-c",
        "import gateway, gateway.fga; print(gateway.__file__); print(gateway.fga.MODEL_PATH)",
        cwd=elsewhere, env=_clean_env(),
    ).splitlines()
    for path in probe[-2:]:
        assert Path(path).is_relative_to(venv), f"{path} is not the installed wheel"

    port = _free_port()
    env = _clean_env(
        SCOPEGATE_OPENFGA_URL=openfga.url,
        SCOPEGATE_OPENFGA_STORE_NAME=f"wheel-{uuid.uuid4().hex[:12]}",
    )
    serve = subprocess.Popen(
        [venv / "bin" / "scopegate", "serve", "--data-dir", tmp_path / "data",
         "--port", str(port), "--metrics-port", "0"],
        cwd=elsewhere, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        ready = _wait_ready(url)
        assert ready["openfga"] is True and ready["model_id"], ready
        page = httpx.get(f"{url}/review")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assets = re.findall(r'(?:href|src)="review/static/([^"]+)"', page.text)
        assert {"review.js", "review.css"} <= set(assets)
        for name in assets:
            asset = httpx.get(f"{url}/review/static/{name}")
            assert asset.status_code == 200, name
            assert asset.content == (STATIC / name).read_bytes(), name
    finally:
        serve.send_signal(signal.SIGINT)
        _, stderr = serve.communicate(timeout=30)
    assert serve.returncode == 130, stderr.decode(errors="replace")[-3000:]

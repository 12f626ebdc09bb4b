"""The wheels, built from a copy of the sources and installed in fresh virtualenvs.

- The server (pyproject.toml, with the client wheel it depends on): ``scopegate serve``
  from it starts a gateway (the authorization model ships with the package) and serves
  the reviewer page with its static files.
- The client alone (client/pyproject.toml): with nothing but its own dependencies (and
  those of its extras) it retrieves from a running gateway, and none of the server's
  dependencies (chromadb, onnxruntime, openfga-sdk, fastapi) can be imported.

Nothing is downloaded: the server's virtualenv sees the development environment's
dependencies through a ``.pth`` line; the client's sees a directory holding links to just
the distributions its requirements name, found by walking their metadata. Neither sees
the editable installs of this repository: the packages imported must be the wheels'.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import uuid
import zipfile
from collections.abc import Iterable
from email.parser import Parser
from importlib.metadata import Distribution, distribution
from pathlib import Path

import httpx
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gateway.fga_server import ManagedOpenFGA
from tests.served import ALICE_DOCS, DENIED_TEXT, Served, acme_fixture
from tests.test_fga_server import _free_port, _wait_ready

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "gateway", "connectors", "fga_models")
CLIENT = ROOT / "client"
CLIENT_SOURCES = ("pyproject.toml", "README.md", "src")
STATIC = ROOT / "gateway" / "static"
# What the agent side must install without.
SERVER_ONLY = ("gateway", "connectors", "chromadb", "onnxruntime", "openfga_sdk", "fastapi")


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _build_wheel(
    tmp_path: Path, root: Path = ROOT, sources: Iterable[str] = SOURCES, name: str = "scopegate"
) -> Path:
    # A copy, so that no build/ directory is left in (or reused from) the checkout.
    src = tmp_path / f"{name}-src"
    src.mkdir()
    for source in sources:
        if (root / source).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
            shutil.copytree(root / source, src / source, ignore=ignore)
        else:
            shutil.copy2(root / source, src / source)
    wheels = tmp_path / "wheels"
    # No build isolation: the development environment's setuptools, nothing downloaded.
    out = _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-v",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        wheels,
        src,
        cwd=tmp_path,
    )
    assert "BuildBackendWarning" not in out and "SetuptoolsDeprecationWarning" not in out, out
    (wheel,) = wheels.glob(f"{name.replace('-', '_')}-*.whl")
    return wheel


def _build_client_wheel(tmp_path: Path) -> Path:
    return _build_wheel(tmp_path, CLIENT, CLIENT_SOURCES, "scopegate-client")


def _fresh_venv(tmp_path: Path, wheels: Iterable[Path], dependencies: Path | None = None) -> Path:
    """A virtualenv with ``wheels`` installed, seeing ``dependencies`` (by default, every
    package of the development environment)."""
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path)
        .strip()
        .splitlines()[-1]
    )
    # A directory added by a .pth line has its own .pth files (the editable installs'
    # among them) ignored.
    seen = dependencies or Path(sysconfig.get_path("purelib"))
    (site / "dependencies.pth").write_text(f"{seen}\n")
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "--no-index",
        *wheels,
        cwd=tmp_path,
    )
    return venv


def _requirements(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's metadata."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(name).decode())
    return metadata.get_all("Requires-Dist") or []


def _closure(requirements: Iterable[str], extras: Iterable[str] = ()) -> dict[str, Distribution]:
    """The installed distributions that ``requirements`` (with ``extras``) pull in."""
    found: dict[str, Distribution] = {}
    done: set[tuple[str, frozenset[str]]] = set()
    todo = [(text, tuple(extras)) for text in requirements]
    while todo:
        text, active = todo.pop()
        requirement = Requirement(text)
        marker = requirement.marker
        if marker and not any(marker.evaluate({"extra": e}) for e in active or ("",)):
            continue
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in done:
            continue
        done.add(key)
        dist = distribution(requirement.name)
        found[key[0]] = dist
        todo.extend((r, tuple(requirement.extras)) for r in dist.requires or [])
    return found


def _linked(dists: Iterable[Distribution], into: Path) -> Path:
    """A directory of links to the top-level files of ``dists`` (packages, dist-info)."""
    into.mkdir()
    for dist in dists:
        assert dist.files is not None, f"{dist.metadata['Name']} lists no files"
        for top in {f.parts[0] for f in dist.files if f.parts[0] != ".."}:
            if top.endswith(".pth") or top == "__pycache__" or (into / top).exists():
                continue
            (into / top).symlink_to(Path(str(dist.locate_file(top))))
    return into


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

    assert "Requires-Dist: scopegate-client==0.1.0" in metadata
    venv = _fresh_venv(tmp_path, [wheel, _build_client_wheel(tmp_path)])
    elsewhere = tmp_path / "elsewhere"  # a cwd without the sources in it
    elsewhere.mkdir()
    probe = _run(
        venv / "bin" / "python",
        "-c",
        "import gateway, gateway.fga, scopegate_client; print(gateway.__file__);"
        " print(gateway.fga.MODEL_PATH); print(scopegate_client.__file__)",
        cwd=elsewhere,
        env=_clean_env(),
    ).splitlines()
    for path in probe[-3:]:
        assert Path(path).is_relative_to(venv), f"{path} is not the installed wheel"

    port = _free_port()
    env = _clean_env(
        SCOPEGATE_OPENFGA_URL=openfga.url,
        SCOPEGATE_OPENFGA_STORE_NAME=f"wheel-{uuid.uuid4().hex[:12]}",
    )
    serve = subprocess.Popen(
        [
            venv / "bin" / "scopegate",
            "serve",
            "--data-dir",
            tmp_path / "data",
            "--port",
            str(port),
            "--metrics-port",
            "0",
        ],
        cwd=elsewhere,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
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


# -- the client distribution alone --------------------------------------------------------------


acme = acme_fixture("packaging-gw")


def _client_venv(tmp_path: Path, extras: Iterable[str]) -> Path:
    """The client wheel with its own dependencies and those of ``extras``, nothing else."""
    wheel = _build_client_wheel(tmp_path)
    needed = _closure(_requirements(wheel), extras)
    assert not {"scopegate", "chromadb", "onnxruntime", "openfga-sdk", "fastapi"} & set(needed)
    return _fresh_venv(tmp_path, [wheel], _linked(needed.values(), tmp_path / "dependencies"))


def _probe(venv: Path, tmp_path: Path, acme: Served, script: str) -> list[str]:
    elsewhere = tmp_path / "elsewhere"  # a cwd without the sources in it
    elsewhere.mkdir(exist_ok=True)
    prologue = f"""
        import importlib, json, os
        for name in {SERVER_ONLY!r}:
            try:
                importlib.import_module(name)
            except ImportError:
                continue
            raise SystemExit(f"{{name}} is importable")
        URL, TOKEN = os.environ["GATEWAY_URL"], os.environ["DELEGATION_TOKEN"]
        QUERY = "revenue forecast and the salary bands"
        """
    code = textwrap.dedent(prologue) + textwrap.dedent(script)
    env = _clean_env(GATEWAY_URL=acme.url, DELEGATION_TOKEN=acme.agent_token("alice"))
    return _run(venv / "bin" / "python", "-c", code, cwd=elsewhere, env=env).splitlines()


def test_client_alone_retrieves_without_the_server_dependencies(
    tmp_path: Path, acme: Served
) -> None:
    venv = _client_venv(tmp_path, extras=())
    out = _probe(
        venv,
        tmp_path,
        acme,
        """
        import asyncio
        import scopegate_client
        from scopegate_client import AsyncScopegateClient, InvalidToken, ScopegateClient

        for name in ("langchain_core", "llama_index", "agents", "mcp"):  # extras only
            try:
                importlib.import_module(name)
            except ImportError:
                continue
            raise SystemExit(f"{name} is importable")
        with ScopegateClient(URL, TOKEN) as agent:
            found = agent.retrieve(QUERY, k=10)
        try:
            ScopegateClient(URL, "not-a-token").retrieve(QUERY)
        except InvalidToken as exc:
            rejected = exc.code

        async def aretrieve():
            async with AsyncScopegateClient(URL, TOKEN) as agent:
                return await agent.retrieve(QUERY, k=10)

        again = asyncio.run(aretrieve())
        print(scopegate_client.__file__)
        print(json.dumps({
            "documents": sorted({c.document_id for c in found.chunks}),
            "async": sorted({c.document_id for c in again.chunks}),
            "texts": [c.text for c in found.chunks],
            "rejected": rejected,
        }))
        """,
    )
    assert Path(out[-2]).is_relative_to(venv), f"{out[-2]} is not the installed wheel"
    answer = json.loads(out[-1])
    assert set(answer["documents"]) == set(answer["async"]) == ALICE_DOCS
    assert DENIED_TEXT not in answer["texts"] and answer["rejected"] == "invalid_token"


def test_client_integrations_install_without_the_server_dependencies(
    tmp_path: Path, acme: Served
) -> None:
    venv = _client_venv(tmp_path, extras=("langchain", "llamaindex", "openai-agents", "mcp"))
    out = _probe(
        venv,
        tmp_path,
        acme,
        """
        import scopegate_client.mcp_server, scopegate_client.openai_agents
        from scopegate_client.langchain import ScopegateRetriever, scopegate_tool
        from scopegate_client.llamaindex import ScopegateRetriever as NodeRetriever

        docs = ScopegateRetriever(url=URL, token=TOKEN, k=10).invoke(QUERY)
        nodes = NodeRetriever(URL, token=TOKEN, k=10).retrieve(QUERY)
        tool = scopegate_client.openai_agents.scopegate_function_tool(URL, TOKEN)
        print(json.dumps({
            "langchain": sorted({d.metadata["document_id"] for d in docs}),
            "llamaindex": sorted({n.node.metadata["document_id"] for n in nodes}),
            "texts": [d.page_content for d in docs] + [n.node.get_content() for n in nodes],
            "tools": [scopegate_tool(ScopegateRetriever(url=URL, token=TOKEN)).name, tool.name],
        }))
        """,
    )
    answer = json.loads(out[-1])
    assert set(answer["langchain"]) == set(answer["llamaindex"]) == ALICE_DOCS
    assert DENIED_TEXT not in answer["texts"]
    assert answer["tools"] == ["scopegate_retrieve", "scopegate_retrieve"]
    usage = _run(venv / "bin" / "scopegate-mcp", "--help", cwd=tmp_path, env=_clean_env())
    assert "--url" in usage

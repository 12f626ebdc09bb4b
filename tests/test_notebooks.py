"""The notebooks run top to bottom and their own assertions hold.

They are executed with nbclient in a kernel of *this* interpreter, through a
kernelspec written to a temporary directory (so nothing depends on a kernel being
installed for the user). Each notebook starts its own managed OpenFGA in a
temporary data directory; they are kept without outputs in git.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "scopegate-test"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    kernels = tmp_path_factory.mktemp("kernels")
    spec = Path(write_kernel_spec(kernels / KERNEL, overrides={"display_name": "scopegate"}))
    assert (spec / "kernel.json").read_text().count(sys.executable) == 1
    return kernels


@pytest.mark.parametrize(
    "name", ["quickstart.ipynb", "langchain_agent.ipynb", "langgraph_agent.ipynb"]
)
def test_notebook_runs(name: str, kernel_dir: Path, tmp_path: Path) -> None:
    source = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(
        not cell.get("outputs") and cell.get("execution_count") is None
        for cell in source.cells
        if cell.cell_type == "code"
    ), f"{name} must be saved without outputs"

    manager = AsyncKernelManager(
        kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    )
    client = NotebookClient(
        source,
        km=manager,
        timeout=300,  # per cell: a bound against hangs, not a timing assertion
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(cleanup_kc=True)
    errors = [o for c in source.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors

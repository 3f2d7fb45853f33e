"""The Colab tutorials in ``colab/`` run top to bottom and are committed clean.

Each notebook executes in a fresh Jupyter kernel with ``nbclient``, from ``colab/``
as its working directory, the way a reader runs it. The kernel is started from a
``python3`` kernelspec written to a temporary directory whose command is this
test's own interpreter (``sys.executable``), so the notebooks import the
``tf_balancer`` under test even on a machine where Jupyter would otherwise find
another Python (or none). A failing ``assert`` in a notebook fails the test with
nbclient's ``CellExecutionError``, which shows the cell and its traceback. The
kernel's ``TMPDIR`` is the test's ``tmp_path``, so everything a notebook writes
(under ``tempfile.mkdtemp()``) is cleaned up with pytest's temporary directories.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import ipykernel.kernelspec
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
KERNEL_NAME = "python3"
CELL_TIMEOUT_SECONDS = 300


def _ids(paths: list[Path]) -> list[str]:
    return [path.stem for path in paths]


def _code_cells(path: Path) -> list:
    notebook = nbformat.read(path, as_version=4)
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory: pytest.TempPathFactory) -> KernelSpecManager:
    """A KernelSpecManager that sees only a ``python3`` spec running ``sys.executable``."""
    prefix = tmp_path_factory.mktemp("jupyter")
    ipykernel.kernelspec.install(
        kernel_name=KERNEL_NAME, prefix=str(prefix), env={"TF_CPP_MIN_LOG_LEVEL": "2"}
    )
    specs = KernelSpecManager(kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")])
    specs.ensure_native_kernel = False
    return specs


def test_notebooks_exist() -> None:
    assert {path.name for path in NOTEBOOKS} >= {
        "quickstart.ipynb",
        "savedmodel_postprocessing.ipynb",
        "custom_pass.ipynb",
        "pruning_a_transformer.ipynb",
    }


def test_kernelspec_runs_this_interpreter(kernel_specs: KernelSpecManager) -> None:
    spec = kernel_specs.get_kernel_spec(KERNEL_NAME)
    assert Path(spec.argv[0]).resolve() == Path(sys.executable).resolve()
    assert Path(spec.resource_dir).is_relative_to(kernel_specs.kernel_dirs[0])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_committed_clean(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    cells = _code_cells(path)
    assert all(not cell.outputs and cell.execution_count is None for cell in cells)
    setup = cells[0].source
    assert 'IN_COLAB = "google.colab" in sys.modules' in setup
    assert setup.index("if IN_COLAB:") < setup.index("%pip install")
    assert 'os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")' in setup


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_top_to_bottom(
    path: Path, kernel_specs: KernelSpecManager, tmp_path: Path
) -> None:
    notebook = nbformat.read(path, as_version=4)
    manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_specs)
    client = NotebookClient(
        notebook,
        km=manager,
        timeout=CELL_TIMEOUT_SECONDS,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(COLAB)}},
    )
    start = time.perf_counter()
    # TMPDIR: what the notebook writes under tempfile.mkdtemp() lands in pytest's tmp_path.
    client.execute(env={**os.environ, "TMPDIR": str(tmp_path)})  # raises CellExecutionError
    seconds = time.perf_counter() - start
    executed = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in executed)
    errors = [o for cell in executed for o in cell.outputs if o.output_type == "error"]
    assert not errors
    if any("tempfile.mkdtemp(" in cell.source for cell in executed):
        assert any(tmp_path.iterdir()), "the notebook wrote outside tempfile.mkdtemp()"
    sys.stderr.write(f"\n{path.name} ran in {seconds:.1f} s\n")
    assert os.path.samefile(manager.kernel_spec.argv[0], sys.executable)

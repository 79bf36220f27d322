"""notebooks/: every notebook runs top to bottom (nbclient, kernel "python3").

Each runs on a temporary copy (with notebooks/_common.py beside it), so nothing is written into the
checkout, with $QUICKCUPY_RESULTS pointing at the repository's results/h100 unless already set. On a
machine without a GPU the notebooks plot the committed results (or say they are missing); on a GPU
machine they measure.
"""
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT_S = 300


def _missing_tools():
    try:
        import nbclient  # noqa: F401
        import nbformat  # noqa: F401
        import ipykernel  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install '.[test]')"
    return None


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs(name, tmp_path, monkeypatch):
    missing = _missing_tools()
    if missing:
        pytest.skip(f"cannot execute notebooks: {missing}")
    import nbformat
    from nbclient import NotebookClient

    shutil.copy(NOTEBOOKS / name, tmp_path)
    shutil.copy(NOTEBOOKS / "_common.py", tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUICKCUPY_RESULTS", os.environ.get("QUICKCUPY_RESULTS") or str(REPO / "results" / "h100"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))

    nb = nbformat.read(tmp_path / name, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()       # raises CellExecutionError, naming the cell, on any exception
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")


MAX_NOTEBOOK_BYTES = 500_000


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_committed_notebook_is_small(name):
    """Committed with outputs, each notebook stays under 500 KB (figures as palette PNGs)."""
    size = (NOTEBOOKS / name).stat().st_size
    assert size < MAX_NOTEBOOK_BYTES, f"{name} is {size} bytes; re-render its figures smaller"

"""Runs examples/upscale.ipynb top to bottom (CPU)."""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

_NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "upscale.ipynb"


def test_notebook_runs():
    nb = nbformat.read(_NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(_NOTEBOOK.parent)}})
    client.execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "x3.5: (48, 48) -> (168, 168)" in text
    assert "x6: (48, 48) -> (288, 288)" in text

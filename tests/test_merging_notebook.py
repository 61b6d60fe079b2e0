"""colab/merge_dare.ipynb runs top to bottom on CPU at smoke size (no pip installs under the test)."""
from __future__ import annotations

from pathlib import Path

import pytest

from notebooks import check_committed_clean

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NB = Path(__file__).resolve().parents[1] / "colab" / "merge_dare.ipynb"


def test_notebook_has_no_outputs():
    check_committed_clean(NB)


def test_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_JAX_NOTEBOOK_TEST", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NB, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "dare_ties" in text

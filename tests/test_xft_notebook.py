"""colab/xft_tpu.ipynb runs top to bottom on CPU at smoke size (executed once per session in
``xft_fixtures.smoke_runs``: its run is also the 1-device smoke run the other XFT tests check), and is
committed clean."""
from __future__ import annotations

import json
import sys

import pytest

from xft_fixtures import NOTEBOOK, parameters_index, smoke_runs

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")


def test_notebook_is_committed_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.get("outputs") == [] and c.get("execution_count") is None
    src = nb.cells[parameters_index(nb)].source
    for name in ("PRESET", "MODEL_PATH", "TRAIN_FILES", "OUTPUT_DIR", "ZOO_CACHE_DIR", "INSTALL"):
        assert f"{name} =" in src
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "from fusion_jax.xft.pipeline import run" in code
    assert '"configs" / "xft.py"' in code


def test_notebook_runs_smoke_on_cpu(tmp_path_factory):
    runs = smoke_runs(tmp_path_factory)
    nb = runs["nb"]
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")
    report = json.loads((runs["out1"] / "report.json").read_text())
    assert set(report["eval_loss"]) == {"base", "dense_sft", "moe", "xft", "xft_fixed"}
    assert "CPU fallback" in text and "preset 'smoke'" in text
    assert text.count("merged model:") == 3 and ("PASS" in text or "FAIL" in text)
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 5
    assert any(runs["zoo"].iterdir())
    assert not any((runs["root"] / "nb_work").iterdir())   # nothing written into the kernel's working dir
    print(f"notebook executed in {runs['nb_seconds']:.1f} s", file=sys.stderr)

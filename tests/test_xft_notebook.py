"""colab/xft_tpu.ipynb runs top to bottom on CPU at smoke size.

Smoke settings are injected after the cell tagged ``parameters`` (as papermill does): the checkout is this
repository (no pip install), the run and the demo zoo's cache live under pytest's tmp dirs (the zoo is the
one the other XFT tests of the session use), so nothing is written to ~/.cache or the repository.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from xft_fixtures import fast_env, smoke_zoo_dir

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "colab" / "xft_tpu.ipynb"


def _parameters_index(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    return tagged[0]


def test_notebook_is_committed_clean():
    nb = nbformat.read(NB, as_version=4)
    nbformat.validate(nb)
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.get("outputs") == [] and c.get("execution_count") is None
    src = nb.cells[_parameters_index(nb)].source
    for name in ("PRESET", "MODEL_PATH", "TRAIN_FILES", "OUTPUT_DIR", "ZOO_CACHE_DIR", "INSTALL"):
        assert f"{name} =" in src
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "from fusion_jax.xft.pipeline import run" in code
    assert '"configs" / "xft.py"' in code


def test_notebook_runs_smoke_on_cpu(tmp_path, tmp_path_factory, monkeypatch):
    for k, v in fast_env().items():   # the kernel's environment (CPU, fast XLA compiles)
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    nb = nbformat.read(NB, as_version=4)
    zoo = smoke_zoo_dir(tmp_path_factory)
    params = {"PRESET": "smoke", "CHECKOUT": str(ROOT), "INSTALL": False, "OUTPUT_DIR": str(tmp_path / "runs"),
              "ZOO_CACHE_DIR": str(zoo), "OVERRIDES": {"trainer.progress": False}, "MAX_NEW_TOKENS": 6}
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()),
                                         metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(_parameters_index(nb) + 1, injected)
    work = tmp_path / "work"
    work.mkdir()
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(work)}})
    t = time.perf_counter()
    client.execute()
    took = time.perf_counter() - t
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")
    out = tmp_path / "runs" / "xft_smoke"
    report = json.loads((out / "report.json").read_text())
    assert set(report["eval_loss"]) == {"base", "dense_sft", "moe", "xft", "xft_fixed"}
    assert "CPU fallback" in text and "preset 'smoke'" in text
    assert text.count("merged model:") == 3
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 4
    assert any(zoo.iterdir()) and not any(work.iterdir())
    print(f"notebook executed in {took:.1f} s", file=sys.stderr)

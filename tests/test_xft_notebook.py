"""colab/xft_tpu.ipynb runs top to bottom on CPU at smoke size (executed once per session in
``xft_fixtures.smoke_runs``: its run is also the 1-device smoke run the other XFT tests check), and is
committed clean."""
from __future__ import annotations

import json
import sys

import pytest

from notebooks import check_committed_clean
from xft_fixtures import NOTEBOOK, smoke_runs

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")


def test_notebook_is_committed_clean():
    check_committed_clean(NOTEBOOK, ("PRESET", "MODEL_PATH", "TRAIN_FILES", "OUTPUT_DIR", "ZOO_CACHE_DIR", "INSTALL"),
                          runs="fusion_jax.xft.pipeline.run", config="xft.py")


def test_notebook_runs_smoke_on_cpu(tmp_path_factory):
    runs = smoke_runs(tmp_path_factory)
    text = runs["nb"].stdout
    report = json.loads((runs["out1"] / "report.json").read_text())
    assert set(report["eval_loss"]) == {"base", "dense_sft", "moe", "xft", "xft_fixed"}
    assert "CPU fallback" in text and "preset 'smoke'" in text
    assert text.count("merged model:") == 3 and ("PASS" in text or "FAIL" in text)
    assert runs["nb"].images == 5
    assert any(runs["zoo"].iterdir())
    assert not any((runs["root"] / "nb_work").iterdir())   # nothing written into the kernel's working dir
    print(f"notebook executed in {runs['nb'].seconds:.1f} s", file=sys.stderr)

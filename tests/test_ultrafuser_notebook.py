"""colab/ultrafuser_tpu.ipynb runs top to bottom on CPU at smoke size.

Smoke settings are injected after the cell tagged ``parameters`` (as papermill does): the checkout is this
repository (no pip install), the run and the demo zoo's cache live under the test's tmp dir, so nothing is
written to ~/.cache or the repository.
"""
from __future__ import annotations

import json
import sys

import pytest

from notebooks import REPO, check_committed_clean, execute

pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

NB = REPO / "colab" / "ultrafuser_tpu.ipynb"


def test_notebook_is_committed_clean():
    check_committed_clean(NB, ("PRESET", "SPECIALIST_PATHS", "TRAIN_FILES", "OUTPUT_DIR", "ZOO_CACHE_DIR", "INSTALL"),
                          runs="fusion_jax.ultrafuser.pipeline.run", config="ultrafuser.py")


def test_notebook_runs_smoke_on_cpu(tmp_path):
    params = {"PRESET": "smoke", "CHECKOUT": str(REPO), "INSTALL": False,
              "OUTPUT_DIR": str(tmp_path / "runs"), "ZOO_CACHE_DIR": str(tmp_path / "zoo"),
              "PROMPT": "What is 7 times 6?", "MAX_NEW_TOKENS": 6}
    r = execute(NB, params, tmp_path / "work", timeout=240)
    out = tmp_path / "runs" / "ultrafuser_smoke"
    report = json.loads((out / "report.json").read_text())
    assert set(report["eval_loss"]) >= {"base", "fused", "text", "code", "math"}
    assert set(report["gate_weights"]) == {"text", "code", "math", "mixed"}
    assert (out / "gate_weights.png").is_file() and (out / "loss_curves.png").is_file()
    assert "CPU fallback" in r.stdout and "preset 'smoke'" in r.stdout
    assert "fused model:" in r.stdout
    assert r.images == 2          # the plots were displayed, not only written
    # the zoo went to the tmp cache, nothing into the working dir
    assert any((tmp_path / "zoo").iterdir())
    assert not any((tmp_path / "work").iterdir())
    print(f"notebook executed in {r.seconds:.1f} s", file=sys.stderr)

"""The smoke preset of the demo end to end from an empty zoo cache: corpus -> tokenizer -> base ->
three specialists -> stage 1 -> stage 2 -> eval -> report, with report.json in the fixed schema and the
plots written; then the same command on 8 simulated devices (``python train.py``, as a TPU/GPU user runs
it) gives the same report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fusion_jax.ultrafuser.config import get_config
from fusion_jax.ultrafuser.pipeline import run

MODELS = {"base", "fused", "text", "code", "math"}
DOMAINS = {"text", "code", "math", "mixed"}


def test_smoke_preset_end_to_end(tmp_path):
    c = get_config("smoke")
    c.zoo.cache_dir = str(tmp_path / "zoo")
    c.output_dir = str(tmp_path / "runs")
    c.trainer.progress = False
    run(c)
    out = tmp_path / "runs" / "ultrafuser_smoke"
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"eval_loss", "gate_weights"}
    assert set(report["eval_loss"]) == MODELS
    for m in MODELS:
        assert set(report["eval_loss"][m]) == DOMAINS
        assert all(isinstance(v, float) and 0 < v < 20 for v in report["eval_loss"][m].values())
    assert set(report["gate_weights"]) == DOMAINS
    for d in DOMAINS:
        w = report["gate_weights"][d]
        assert set(w) == {"text", "code", "math"} and abs(sum(w.values()) - 1) < 1e-4
    for f in ("report.md", "gate_weights.png", "loss_curves.png", "run.json", "fused/fused.json",
              "fused/gate.safetensors", "fused/specialists/math/config.json"):
        assert (out / f).is_file(), f
    assert (tmp_path / "zoo").is_dir() and not list((tmp_path / "zoo").glob("*.work"))

    # the main job on 8 devices (the base, the specialists and every batch on one 8-device mesh), from
    # the same zoo cache: the same report up to float32 reduction order
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "train.py", "--config=configs/ultrafuser.py:smoke",
                        f"--config.zoo.cache_dir={tmp_path / 'zoo'}", f"--config.output_dir={tmp_path / 'runs8'}",
                        "--config.trainer.progress=False"], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out8 = tmp_path / "runs8" / "ultrafuser_smoke"
    assert json.loads((out8 / "run.json").read_text())["mesh"]["fsdp"] == 8
    report8 = json.loads((out8 / "report.json").read_text())
    for key in ("eval_loss", "gate_weights"):
        for m, row in report[key].items():
            np.testing.assert_allclose([report8[key][m][d] for d in row], list(row.values()), rtol=2e-5,
                                       err_msg=f"{key} {m}")

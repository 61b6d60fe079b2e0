"""The arena at smoke size: a zoo from nothing, a contestant of every kind (the base, a specialist, the
multi-task baseline, merges of both DARE rescales, UltraFuser through its pipeline, XFT, FuseLLM and FuseChat)
and a wing that is not installed (a registry entry naming a module that does not exist), listed as missing; the table, plot and per-model outputs; a rerun reuses every stage.
The arena's numbers are the UltraFuser report's where both measure the same model on the same set."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fusion_jax.arena.config import get_config
from fusion_jax.errors import ConfigError

CONTESTANTS = ("base", "math", "multitask", "linear", "dare_ties_exact", "ultrafuser", "xft", "fusellm", "fusechat",
               "ghost")
GHOST = ("upcycling", "fusion_jax.ghost_wing.arena:ghost", "a wing that is not in this install")


def _config(tmp_path):
    c = get_config("smoke")
    c.output_dir = str(tmp_path / "runs")
    c.zoo_cache_dir = str(tmp_path / "zoo")
    c.contestants = CONTESTANTS
    c.eval.loss_examples = 16          # the UltraFuser smoke report's held-out sets, in full
    c.eval.mixed_examples = 16
    return c


def test_arena_smoke(tmp_path, capsys, monkeypatch):
    from fusion_jax.arena import contestants
    from fusion_jax.arena.pipeline import run
    monkeypatch.setitem(contestants.CONTESTANTS, "ghost", GHOST)
    c = _config(tmp_path)
    res = run(c)
    rows = res["report"]["contestants"]
    assert rows["ghost"]["status"] == "missing" and "not in this install" in rows["ghost"]["reason"]
    for n in CONTESTANTS[:-1]:
        r = rows[n]
        assert r["status"] == "ok", (n, r.get("reason"))
        assert set(r["loss"]) == {"text", "code", "math", "mixed"}
        assert all(np.isfinite(v) for v in r["loss"].values())
        assert 0.0 <= r["math"]["accuracy"] <= 1.0 and "pass@1" in r["code"]
        assert (tmp_path / "runs" / "arena_smoke" / "outputs" / n / "math.jsonl").is_file()
    assert rows["ultrafuser"]["template"] == "fused" and rows["multitask"]["template"] == "domain"
    assert rows["xft"]["template"] == "domain"
    assert rows["fusellm"]["template"] == rows["fusechat"]["template"] == "base"
    assert rows["math"]["template"] == "own:math" and rows["base"]["template"] == "base"
    out = tmp_path / "runs" / "arena_smoke"
    md = (out / "report.md").read_text()
    assert "| dare_ties_exact |" in md and "**missing**" in md
    assert (out / "arena.png").stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())["contestants"]["linear"]["status"] == "ok"

    # the same models on the same sets as the UltraFuser pipeline's report: the same losses
    uf = json.loads((out / "work" / "contestants" / "ultrafuser" / "run" / "report.json").read_text())["eval_loss"]
    for model in ("base", "math"):
        for d, v in uf[model].items():
            assert rows[model]["loss"][d] == pytest.approx(v, rel=2e-4), (model, d)
    for d, v in uf["fused"].items():
        assert rows["ultrafuser"]["loss"][d] == pytest.approx(v, rel=2e-4), d

    # a rerun reuses every built model and evaluation (resumable per method)
    capsys.readouterr()
    again = run(c)
    log = capsys.readouterr().out
    for n in CONTESTANTS[:-1]:
        assert f"build_{n}: done in an earlier run" in log and f"eval_{n}_" in log
    assert again["report"]["contestants"]["linear"]["loss"] == rows["linear"]["loss"]


def test_arena_config_errors():
    from fusion_jax.arena.config import validate
    for key, value, match in [("contestants", ("base", "nope"), "unknown"),
                              ("ultrafuser.preset", "paper", "demo zoo"),
                              ("eval.batch_size", 0, "batch_size")]:
        c = get_config("smoke")
        node, *_ = key.split(".")
        if "." in key:
            c[node][key.split(".")[1]] = value
        else:
            c[key] = value
        with pytest.raises(ConfigError, match=match):
            validate(c)

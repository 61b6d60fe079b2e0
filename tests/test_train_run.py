"""Run scaffolding (fusion_jax.train.run): the run directory, its configuration fingerprint, stage resume."""
import json

import ml_collections as mlc
import pytest

from fusion_jax.errors import ConfigError, OutputError
from fusion_jax.train.run import Run, config_fingerprint, has_progress


def _cfg(tmp_path, lr=1e-3):
    return mlc.ConfigDict({"output_dir": str(tmp_path / "runs"), "name": "r", "seed": 0,
                           "train": {"lr": lr, "steps": 3}, "eval": {"batch": 4}})


def test_fingerprint_covers_training_groups_only(tmp_path):
    a, b = _cfg(tmp_path), _cfg(tmp_path, lr=2e-3)
    keys = ("seed", "train")
    assert config_fingerprint(a, keys) != config_fingerprint(b, keys)
    b = _cfg(tmp_path)
    b.eval.batch = 8
    assert config_fingerprint(a, keys) == config_fingerprint(b, keys)
    b.train.steps = 4
    assert config_fingerprint(a, keys, drop={"train": ("steps",)}) == config_fingerprint(b, keys, drop={"train": ("steps",)})


def test_other_configuration_refused_only_once_it_made_progress(tmp_path):
    c1, c2 = _cfg(tmp_path), _cfg(tmp_path, lr=5e-3)
    run = Run.open(c1, fingerprint="one")
    (run.work / "stage2" / "logs").mkdir(parents=True)
    (run.work / "stage2" / "logs" / "metrics.jsonl").write_text("{}\n")
    # a run rejected before any checkpoint or finished stage does not block the corrected command,
    # and its leftovers are cleared
    run2 = Run.open(c2, fingerprint="two")
    assert json.loads((run2.work / "fingerprint.json").read_text())["fingerprint"] == "two"
    assert not (run2.work / "stage2").exists()
    # progress: a checkpoint step
    (run2.work / "stage1" / "checkpoints" / "4").mkdir(parents=True)
    assert has_progress(run2.work)
    with pytest.raises(ConfigError, match="different configuration"):
        Run.open(c1, fingerprint="one")
    Run.open(c2, fingerprint="two")   # the same configuration resumes


def test_stage_results_are_computed_once(tmp_path):
    run = Run.open(_cfg(tmp_path), fingerprint="fp")
    calls = []
    assert run.stage("a", lambda: calls.append(1) or {"x": 1.5}) == {"x": 1.5}
    again = Run.open(_cfg(tmp_path), fingerprint="fp")
    assert again.stage("a", lambda: calls.append(1) or {"x": 9}) == {"x": 1.5}
    assert calls == [1] and "a_s" in again.timings
    assert has_progress(again.work)


def test_output_dir_that_is_a_file_is_an_output_error(tmp_path):
    (tmp_path / "runs").write_text("not a directory")
    with pytest.raises(OutputError, match="output_dir"):
        Run.open(_cfg(tmp_path), fingerprint="fp")

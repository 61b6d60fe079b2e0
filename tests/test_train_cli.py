"""train.py / ``fusion-jax train``: config parsing with overrides, dispatch on config.method, clear errors."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fusion_jax.errors import ConfigError
from fusion_jax.train import cli

ROOT = Path(__file__).resolve().parents[1]
_ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _write_config(tmp_path, method="nope"):
    p = tmp_path / "job.py"
    p.write_text(textwrap.dedent(f"""
        import ml_collections as mlc

        def get_config(preset=None):
            c = mlc.ConfigDict()
            c.method = {method!r}
            c.trainer = mlc.ConfigDict({{"total_steps": 3}})
            c.preset = preset or ""
            return c
    """))
    return p


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_ENV, cwd=cwd, timeout=120)


def test_train_py_unknown_method_exits_2_naming_it(tmp_path):
    cfg = _write_config(tmp_path)
    p = _run(str(ROOT / "train.py"), f"--config={cfg}")
    assert p.returncode == 2, p.stderr
    assert "error: config.method: 'nope' is not a known method; known methods: " in p.stderr
    assert "ultrafuser" in p.stderr and "Traceback" not in p.stderr
    # an override reaches the config before dispatch
    p = _run(str(ROOT / "train.py"), f"--config={cfg}", "--config.method=other")
    assert p.returncode == 2 and "'other' is not a known method" in p.stderr, p.stderr


def test_train_py_missing_config_file_and_bad_override(tmp_path):
    missing = tmp_path / "nothere.py"
    p = _run(str(ROOT / "train.py"), f"--config={missing}:smoke")
    assert p.returncode == 2 and f"error: --config: {missing}: no such config file" in p.stderr, p.stderr
    cfg = _write_config(tmp_path)
    p = _run(str(ROOT / "train.py"), f"--config={cfg}", "--config.trainer.total_stepz=4")
    assert p.returncode == 2, p.stderr
    assert "--config.trainer.total_stepz: config.trainer has no field 'total_stepz'" in p.stderr, p.stderr
    p = _run(str(ROOT / "train.py"), f"--config={cfg}", "--config.trainer.total_steps=many")
    assert p.returncode == 2 and "--config.trainer.total_steps=many" in p.stderr, p.stderr
    p = _run(str(ROOT / "train.py"), f"--config={cfg}", "stray")
    assert p.returncode == 2 and "unexpected argument 'stray'" in p.stderr, p.stderr


def test_fusion_jax_train_subcommand_without_jax_at_parser_build(tmp_path):
    cfg = _write_config(tmp_path)
    p = _run("-c", "import sys, fusion_jax.cli as c; c.build_parser('train'); print('jax' in sys.modules)")
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr
    p = _run("-m", "fusion_jax.cli", "train", f"--config={cfg}:fast", "--config.method=zzz")
    assert p.returncode == 2 and "error: config.method: 'zzz' is not a known method" in p.stderr, p.stderr
    p = _run("-m", "fusion_jax.cli", "train", "--help")
    assert p.returncode == 0 and "--config.a.b=VALUE" in p.stdout


def test_load_config_preset_overrides_and_dispatch_errors(tmp_path):
    cfg = _write_config(tmp_path, method="toy")
    c = cli.load_config([f"--config={cfg}:fast", "--config.trainer.total_steps=7"])
    assert c.preset == "fast" and c.trainer.total_steps == 7 and c.method == "toy"
    with pytest.raises(ConfigError, match="config.method: not set; known methods: " + ", ".join(sorted(cli.METHODS))):
        cli.run_from_config({"method": ""})
    with pytest.raises(ConfigError, match=r"config.method: 'x' is not a known method"):
        cli.run_from_config({"method": "x"})
    for target in cli.METHODS.values():  # every table entry names module:function
        module, func = target.split(":")
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), target


def test_train_py_runs_the_toy_method_end_to_end(tmp_path):
    """The whole path: config file + overrides -> run_from_config -> the toy trainer -> outputs."""
    work = tmp_path / "run"
    env = dict(_ENV, XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config=configs/toy.py",
                        f"--config.workdir={work}", "--config.trainer.total_steps=2",
                        "--config.trainer.save_every=2", "--config.model.layers=1",
                        "--config.trainer.tensorboard=False"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "toy: 2 steps, final loss" in p.stdout
    assert "2/2 [" in p.stderr and "loss=" in p.stderr  # the progress bar
    assert sorted(os.listdir(work / "checkpoints")) == ["2"]
    assert (work / "logs" / "metrics.jsonl").read_text().count("\n") == 2

"""XFT test inputs: a tiny dense HF model with its tokenizer and per-domain prompt/response files (the
UltraFuser fixture's first specialist and data), and the smoke zoo's cache shared by the XFT tests of one
session.

    fx = make_fixture(tmp_path)                   # paths
    flags = fixture_flags(fx, out_dir)             # configs/xft.py:tiny pointed at them, as train.py flags
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ultrafuser_fixtures import NAMES, TEMPLATES
from ultrafuser_fixtures import make_fixture as _uf_fixture


def make_fixture(root: Path) -> dict:
    fx = _uf_fixture(root)
    return {"model": fx["paths"][0], "train": fx["train"], "eval": fx["eval"], "root": fx["root"]}


def overrides(fx: dict, out_dir: Path, **extra) -> dict:
    o = {"output_dir": str(out_dir), "model.path": fx["model"], "data.seq_len": 48, "data.max_prompt_len": 24}
    for d in NAMES:
        o[f"data.templates.{d}"] = TEMPLATES[d]
        o[f"data.train_files.{d}"] = fx["train"][d]
        o[f"data.eval_files.{d}"] = fx["eval"][d]
    o.update(extra)
    return o


def fixture_flags(fx: dict, out_dir: Path, **extra) -> list[str]:
    return ["--config=configs/xft.py:tiny"] + [f"--config.{k}={v}" for k, v in overrides(fx, out_dir, **extra).items()]


def smoke_zoo_dir(tmp_path_factory) -> Path:
    """One smoke-zoo cache for the session's XFT tests (the zoo is built by the first that needs it)."""
    return tmp_path_factory.getbasetemp() / "xft_smoke_zoo"


REPO = Path(__file__).resolve().parents[1]
#: subprocess environment of the XFT runs: CPU, and XLA's backend optimizations off (the toy models' steps take
#: milliseconds; compiling them with LLVM's full pipeline is most of a run's time). ``devices``: simulated.
def fast_env(devices: int = 1) -> dict:
    flags = "--xla_backend_optimization_level=0"
    if devices > 1:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}


def ensure_smoke_zoo(tmp_path_factory) -> Path:
    """The smoke preset's zoo family in the session's cache (built by a subprocess the first time)."""
    from fusion_jax.xft.config import get_config, zoo_specs
    from fusion_jax.zoo import family_key
    cache = smoke_zoo_dir(tmp_path_factory)
    if (cache / family_key(*zoo_specs(get_config("smoke"))) / "zoo.json").is_file():
        return cache
    code = ("from fusion_jax.xft.config import get_config, zoo_specs; from fusion_jax.zoo import build_family; "
            "c = get_config('smoke'); c.trainer.progress = False; "
            f"build_family(*zoo_specs(c), cache_dir={str(cache)!r}, trainer_cfg=c.trainer, log=lambda _: None)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=fast_env(), check=True, timeout=600)
    return cache

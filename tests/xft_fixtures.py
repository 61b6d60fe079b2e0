"""XFT test inputs, shared by the XFT tests of one session (each run is a few dozen compilations, so the
session makes each one once):

* :func:`smoke_runs`: ``configs/xft.py:smoke`` end to end on one device, run BY THE NOTEBOOK
  (``colab/xft_tpu.ipynb`` executed top to bottom in a kernel, the user's path), and side by side the same
  config as ``python train.py`` on 8 simulated devices; the demo zoo's smoke family is built first.
* :func:`smoke_flags`: that config as ``train.py`` flags (the resume test reruns it and compares with the
  notebook's run).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "colab" / "xft_tpu.ipynb"
MESH8 = {"expert": 4, "fsdp": 2}
_RUNS: dict = {}


def fast_env(devices: int = 1) -> dict:
    """Environment of the XFT runs: CPU and XLA's backend optimizations off (the toy models' steps take
    milliseconds; compiling them with LLVM's full pipeline is most of a run's time); ``devices`` simulated."""
    flags = "--xla_backend_optimization_level=0"
    if devices > 1:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}


def ensure_smoke_zoo(tmp_path_factory) -> Path:
    """The smoke preset's zoo family in the session's cache (built by a subprocess the first time)."""
    from fusion_jax.xft.config import get_config, zoo_specs
    from fusion_jax.zoo import family_key
    cache = tmp_path_factory.getbasetemp() / "xft_smoke_zoo"
    if (cache / family_key(*zoo_specs(get_config("smoke"))) / "zoo.json").is_file():
        return cache
    code = ("from fusion_jax.xft.config import get_config, zoo_specs; from fusion_jax.zoo import build_family; "
            "c = get_config('smoke'); c.trainer.progress = False; "
            f"build_family(*zoo_specs(c), cache_dir={str(cache)!r}, trainer_cfg=c.trainer, log=lambda _: None)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=fast_env(), check=True, timeout=600)
    return cache


def smoke_flags(zoo: Path, out: Path, *extra: str) -> list[str]:
    return ["--config=configs/xft.py:smoke", f"--config.zoo.cache_dir={zoo}", f"--config.output_dir={out}",
            "--config.trainer.progress=False", *extra]


def _execute_notebook(zoo: Path, out: Path, work: Path):
    """The notebook at smoke size: outputs under ``out``, the kernel's cwd ``work``."""
    from notebooks import execute
    params = {"PRESET": "smoke", "CHECKOUT": str(REPO), "INSTALL": False, "OUTPUT_DIR": str(out),
              "ZOO_CACHE_DIR": str(zoo), "OVERRIDES": {"trainer.progress": False}, "MAX_NEW_TOKENS": 6}
    return execute(NOTEBOOK, params, work, env=fast_env())


def smoke_runs(tmp_path_factory) -> dict:
    """Once per session: the notebook's 1-device smoke run and ``train.py``'s 8-device one (see the module
    docstring). ``{"nb" (a notebooks.Executed), "out1", "out8", "log8", "zoo", "root"}``."""
    key = str(tmp_path_factory.getbasetemp())
    if key in _RUNS:
        return _RUNS[key]
    zoo = ensure_smoke_zoo(tmp_path_factory)
    root = tmp_path_factory.mktemp("xft_smoke")
    eight = subprocess.Popen([sys.executable, "train.py", *smoke_flags(zoo, root / "runs8", *[
        f"--config.mesh.{k}={v}" for k, v in MESH8.items()])], cwd=REPO, env=fast_env(8), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        nb = _execute_notebook(zoo, root / "runs1", root / "nb_work")
        log8 = eight.communicate(timeout=600)[0]
    finally:
        if eight.poll() is None:
            eight.kill()
    assert eight.returncode == 0, log8[-3000:]
    _RUNS[key] = {"nb": nb, "out1": root / "runs1" / "xft_smoke",
                  "out8": root / "runs8" / "xft_smoke", "log8": log8, "zoo": zoo, "root": root}
    return _RUNS[key]

"""Params-level Orbax checkpoints for ``fusion-jax convert``: a directory holding

    config.json     the model's HF config.json (``ModelConfig.to_hf``), plus a "fusion_jax" block
    params/         the nested params dict, written by ``orbax.checkpoint.StandardCheckpointer``
    (generation_config.json and tokenizer files, when the source had them)

``restore_params`` restores straight into target shardings (each device reads its own shard). The
trainer's CheckpointManager (step directories, optimizer state) is separate: see ``fusion_jax.train``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from fusion_jax.errors import CheckpointError
from fusion_jax.hf import mapping
from fusion_jax.hf.checkpoint import _as_pure, read_config
from fusion_jax.hf.files import CONFIG_NAME, GENERATION_CONFIG_NAME, TOKENIZER_FILES
from fusion_jax.models.config import ModelConfig
from fusion_jax.utils.atomic import atomic_directory

PARAMS_DIR = "params"


def save_params(out_dir: str | os.PathLike, params, config: ModelConfig, *, source_dir=None,
                overwrite: bool = False) -> Path:
    """Write ``params`` (nested dict / nnx.State / CausalLM) and ``config`` atomically to ``out_dir``."""
    import orbax.checkpoint as ocp
    params = _as_pure(params)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / PARAMS_DIR, params)
        ckptr.wait_until_finished()
        ckptr.close()
        hf = config.to_hf()
        hf["fusion_jax"] = {"param_dtype": config.param_dtype, "dtype": config.dtype}
        (tmp / CONFIG_NAME).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        if source_dir is not None:
            for fname in (GENERATION_CONFIG_NAME,) + TOKENIZER_FILES:
                if (Path(source_dir) / fname).is_file():
                    shutil.copy2(Path(source_dir) / fname, tmp / fname)
    return Path(out_dir)


def read_orbax_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    f = path / CONFIG_NAME
    if not f.is_file() or not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path}: not a fusion-jax Orbax params checkpoint "
                              f"(expected {CONFIG_NAME} and {PARAMS_DIR}/)")
    try:
        hf = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot parse ({e})") from e
    extra = (hf.pop("fusion_jax", {}) if isinstance(hf, dict) else {}) or {}
    config = read_config(f)  # validates architecture etc.
    return config.replace(**{k: v for k, v in extra.items() if k in ("param_dtype", "dtype")})


def abstract_params(config: ModelConfig, shardings=None) -> dict:
    """Nested dict of ``jax.ShapeDtypeStruct`` for ``config`` (with ``shardings``: one Sharding or a tree)."""
    dt = np.dtype(jax.numpy.dtype(config.param_dtype))
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out: dict = {}
    for row in mapping.table(config):
        sh = mapping.sharding_for(shardings, row.path, default)
        mapping.set_path(out, row.path, jax.ShapeDtypeStruct(row.our_shape(config), dt, sharding=sh))
    return out


def restore_params(path: str | os.PathLike, target_shardings=None) -> tuple[ModelConfig, dict]:
    """``(ModelConfig, params)`` from ``save_params``'s directory, placed with ``target_shardings``
    (None: first device; one Sharding for all; or a nested dict like params)."""
    import orbax.checkpoint as ocp
    path = Path(path).absolute()
    config = read_orbax_config(path)
    target = abstract_params(config, target_shardings)
    ckptr = ocp.StandardCheckpointer()
    try:
        params = ckptr.restore(path / PARAMS_DIR, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{path / PARAMS_DIR}: cannot restore params for {config.architecture} "
                              f"described by {path / CONFIG_NAME}: {e}") from e
    finally:
        ckptr.close()
    return config, params

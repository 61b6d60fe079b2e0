"""Params-level Orbax checkpoints for ``fusion-jax convert``: a directory holding

    config.json     the model's HF config.json (``ModelConfig.to_hf``), plus a "fusion_jax" block (dtypes,
                    and a fingerprint of every param's bits)
    params/         the nested params dict, written by ``orbax.checkpoint.StandardCheckpointer``
    (generation_config.json and tokenizer files, when the source had them)

``restore_params`` restores straight into target shardings (each device reads its own shard). The
trainer's CheckpointManager (step directories, optimizer state) is separate: see ``fusion_jax.train``.

Orbax and TensorStore failures are caught here and become a :class:`CheckpointError` naming the
checkpoint, in one line (:mod:`fusion_jax.utils.orbax_errors`); a full disk is an ``OutputError`` naming
the output. Orbax's background writer is always awaited before its temporary directory is removed.

Why fingerprints: Orbax stores arrays zstd-compressed without a checksum, so a flipped byte in a data
file can decompress into different numbers without any error (the hardening suite found exactly that).
Each param's fingerprint (:mod:`fusion_jax.utils.fingerprint`: computed on device, sharded or not) is
written beside the config and checked after every restore. Checkpoints written before the
fingerprints existed restore unchecked.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np

from fusion_jax.errors import CheckpointError, FusionError, OutputError
from fusion_jax.hf import mapping
from fusion_jax.hf.checkpoint import _as_pure
from fusion_jax.hf.files import CONFIG_NAME, check_passthrough_files, copy_passthrough_files, read_json
from fusion_jax.models.config import ModelConfig, canonical_dtype
from fusion_jax.utils import interrupt, oserrors
from fusion_jax.utils.atomic import atomic_directory
from fusion_jax.utils.fingerprint import check_fingerprints, flat_fingerprints
from fusion_jax.utils.orbax_errors import quiet_orbax_noise, summarize

PARAMS_DIR = "params"
_BLOCK = "fusion_jax"  # our own keys in config.json
_FP = "fingerprints"


def write_pytree(directory: Path, tree, shown) -> None:
    """Write ``tree`` with Orbax into ``directory`` (which must not exist), waiting for the background
    writer; signals are held until it is done so that no writer outlives the caller's cleanup.
    ``shown`` names the output in errors."""
    import orbax.checkpoint as ocp
    quiet_orbax_noise()
    with interrupt.deferred():
        ckptr = ocp.StandardCheckpointer()
        try:
            ckptr.save(directory, tree)
            ckptr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise ValueError, OSError, Exception...
            error = e
        else:
            error = None
        finally:
            try:
                ckptr.close()
            except Exception as e:  # noqa: BLE001 - close re-raises a background failure
                error = error or e
    if error is not None:
        if isinstance(error, FusionError):
            raise error
        if oserrors.is_environment_error(error):
            raise OutputError(f"cannot write {shown}: {oserrors.describe(error, path='')}; nothing was "
                              "written") from error
        raise CheckpointError(f"cannot write {shown}: Orbax failed: {summarize(error)}") from error


def save_params(out_dir: str | os.PathLike, params, config: ModelConfig, *, source_dir=None,
                overwrite: bool = False) -> Path:
    """Write ``params`` (nested dict / nnx.State / CausalLM) and ``config`` atomically to ``out_dir``."""
    params = _as_pure(params)
    if source_dir is not None:
        check_passthrough_files(source_dir)  # before anything is written
    inputs = [source_dir] if source_dir is not None else []
    with atomic_directory(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        write_pytree(tmp / PARAMS_DIR, params, out_dir)
        hf = config.to_hf()
        hf[_BLOCK] = {"param_dtype": config.param_dtype, "dtype": config.dtype,
                      _FP: flat_fingerprints(params)}
        (tmp / CONFIG_NAME).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        if source_dir is not None:
            copy_passthrough_files(source_dir, tmp)
    return Path(out_dir)


def read_orbax_config(path: str | os.PathLike) -> ModelConfig:
    return _read_orbax_config(path)[0]


def _read_orbax_config(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, str]]:
    """The config and the params' fingerprints (empty for a checkpoint written without them)."""
    path = Path(path)
    f = path / CONFIG_NAME
    if not f.is_file() or not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path}: not a fusion-jax Orbax params checkpoint "
                              f"(expected {CONFIG_NAME} and {PARAMS_DIR}/)")
    hf = read_json(f, CheckpointError)
    extra = hf.pop(_BLOCK, None)
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise CheckpointError(f"{f}: field {_BLOCK!r}: expected an object, got {type(extra).__name__}")
    dtypes = {k: canonical_dtype(v, f"{f}: field '{_BLOCK}.{k}'") if isinstance(v, str) else _bad(f, k, v)
              for k, v in extra.items() if k in ("param_dtype", "dtype")}
    fps = extra.get(_FP)
    fps = {} if fps is None else fps
    if not isinstance(fps, dict):
        raise CheckpointError(f"{f}: field '{_BLOCK}.{_FP}': expected an object, got {json.dumps(fps)[:40]}")
    for k, v in fps.items():
        if not (isinstance(v, str) and len(v) == 8 and all(c in "0123456789abcdef" for c in v)):
            raise CheckpointError(f"{f}: field '{_BLOCK}.{_FP}.{k}': expected 8 hex digits, got "
                                  f"{json.dumps(v)[:40]}")
    config = ModelConfig.from_hf(hf, source=str(f))  # validates architecture, fields, ranges
    return config.replace(**dtypes), fps


def _bad(f: Path, key: str, value):
    raise CheckpointError(f"{f}: field '{_BLOCK}.{key}': expected a dtype name such as \"bfloat16\", got "
                          f"{json.dumps(value)[:40]}")


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
    quiet_orbax_noise()
    path = Path(path).absolute()
    config, fps = _read_orbax_config(path)
    target = abstract_params(config, target_shardings)
    ckptr = ocp.StandardCheckpointer()
    try:
        params = ckptr.restore(path / PARAMS_DIR, target)
    except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise ValueError, KeyError, Exception...
        raise CheckpointError(f"{path / PARAMS_DIR}: cannot restore the params of the {config.architecture} "
                              f"described by {path / CONFIG_NAME}: the checkpoint is damaged or incomplete "
                              f"({summarize(e)})") from e
    finally:
        ckptr.close()
    if fps:
        check_fingerprints(params, fps, f"{path / PARAMS_DIR}", f"{path / CONFIG_NAME}")
    return config, params

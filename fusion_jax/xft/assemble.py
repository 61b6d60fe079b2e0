"""Write an MoE checkpoint tensor by tensor from dense HF checkpoints: the one writer behind
``fusion-jax upcycle`` (E copies of one model) and ``fusion-jax moe`` (mergekit-moe: one specialist per
expert).

Attention, norms, embeddings and head come from the base checkpoint; each stacked expert's FFN from its
own source checkpoint (and a Qwen2-MoE shared expert from another); the routers from arrays computed by
the caller. Every output tensor is one source tensor read, optionally perturbed, cast and written, so
memory stays at one tensor whatever the model size (both sides store ``Linear.weight`` in HF's
``[out, in]`` layout: nothing is transposed).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np

from fusion_jax.errors import ConfigError, ShapeMismatchError
from fusion_jax.hf import mapping
from fusion_jax.hf.checkpoint import open_checkpoint, write_checkpoint
from fusion_jax.hf.safetensors_io import TensorSpec
from fusion_jax.models.config import ModelConfig, canonical_dtype
from fusion_jax.utils.hashing import stable_hash


@dataclasses.dataclass(frozen=True)
class ExpertSource:
    """A dense checkpoint whose FFN becomes one expert. ``noise_scale``: add N(0, noise_scale^2) noise
    to its FFN weights; ``residual_scale``: scale its down projection (mergekit-moe's options)."""

    path: Path
    noise_scale: float | None = None
    residual_scale: float | None = None


def _dense_path(path: tuple[str, ...]) -> tuple[str, ...]:
    """Our MoE param path of an expert / shared-expert matrix -> the dense FFN's param path."""
    return ("layers", "mlp", path[-2], path[-1])


def write_moe(out_dir: str | os.PathLike, moe_config: ModelConfig, base: str | os.PathLike,
              experts: Sequence[ExpertSource], computed: Mapping[tuple[str, ...], np.ndarray], *,
              shared: ExpertSource | None = None, dtype=None, key: jax.Array | None = None,
              max_shard_size: int | str = "5GB", overwrite: bool = False) -> Path:
    """Write ``moe_config``'s checkpoint to ``out_dir`` (tokenizer and generation config from ``base``).

    ``experts[e]`` supplies stacked expert e; ``shared`` the separate shared expert (Qwen2-MoE);
    ``computed``: our stacked param (``{path: array}``, our layout, e.g. the routers) for every tensor
    no checkpoint supplies. ``dtype``: output dtype (default: the base checkpoint's). ``key``: noise of
    ``noise_scale`` experts, per tensor ``fold_in(key, stable_hash(name))``.
    """
    c = moe_config
    if len(experts) != c.num_experts:
        raise ConfigError(f"{len(experts)} expert sources for num_experts={c.num_experts}")
    if c.has_shared_expert and shared is None:
        raise ConfigError(f"{c.architecture} needs a shared expert source")
    key = jax.random.key(0) if key is None else key
    with contextlib.ExitStack() as stack:
        opened: dict[Path, tuple[ModelConfig, object]] = {}

        def source(path) -> tuple[ModelConfig, object]:
            path = Path(path)
            if path not in opened:
                cfg, reader = open_checkpoint(path)
                stack.callback(reader.close)
                if cfg.is_moe:
                    raise ConfigError(f"{path}: is already a mixture of experts ({cfg.architecture}); "
                                      "experts must come from dense models")
                opened[path] = cfg, reader
            return opened[path]

        base_cfg, base_reader = source(base)
        _check_compatible(base_cfg, c, Path(base), ffn_width=None)
        for e in experts:
            _check_compatible(source(e.path)[0], c, e.path, ffn_width=c.expert_intermediate_size)
        if c.has_shared_expert:
            _check_compatible(source(shared.path)[0], c, shared.path, ffn_width=c.shared_expert_intermediate_size)
        first = next(iter(mapping.hf_tensors(base_cfg)))[0]
        out_dt = np.dtype(jax.numpy.dtype(canonical_dtype(dtype))) if dtype else np.dtype(base_reader.dtype(first))

        plan = []   # (name, producer)
        for name, row, idx in mapping.hf_tensors(c):
            plan.append((name, _producer(row, idx, c, computed, experts, shared, base, source, key)))
        specs = [TensorSpec(name, row.hf_shape(c), out_dt) for name, row, _ in mapping.hf_tensors(c)]

        def tensors():
            for name, produce in plan:
                yield name, np.asarray(produce()).astype(out_dt)

        return write_checkpoint(out_dir, c, specs, tensors(), stored_dtype=canonical_dtype(out_dt),
                                max_shard_size=max_shard_size, source_dir=base, overwrite=overwrite)


def _check_compatible(src: ModelConfig, moe: ModelConfig, path: Path, ffn_width: int | None) -> None:
    """The source's shapes must be those of ``moe`` (and its FFN width ``ffn_width`` when it gives one)."""
    fields = ("hidden_size", "num_layers", "vocab_size", "num_heads", "num_kv_heads", "head_dim")
    for f in fields:
        if getattr(src, f) != getattr(moe, f):
            raise ShapeMismatchError(f"{path}: {f}={getattr(src, f)} but the MoE (from the base model) has "
                                     f"{f}={getattr(moe, f)}")
    if ffn_width is not None and src.intermediate_size != ffn_width:
        raise ShapeMismatchError(f"{path}: intermediate_size={src.intermediate_size} but its expert slot is "
                                 f"{ffn_width} wide")
    if src.mlp_bias:
        raise ConfigError(f"{path}: its FFN has biases (mlp_bias); MoE experts have none")


def _producer(row, idx, c, computed, experts, shared, base, source, key):
    """A zero-argument function returning the HF tensor for (``row``, ``idx``)."""
    name = row.hf_name(*idx)
    if row.path in computed:
        arr = computed[row.path]
        return lambda: mapping.to_hf_layout(row, np.asarray(arr[idx]))
    part = row.path[2] if row.path[:2] == ("layers", "mlp") else None
    if part in ("experts", "shared_expert"):
        ex = experts[idx[1]] if part == "experts" else shared
        cfg, reader = source(ex.path)
        src_row = next(r for r in mapping.table(cfg) if r.path == _dense_path(row.path))
        src_name = src_row.hf_name(idx[0])

        def expert_tensor():
            t = reader.get(src_name)
            if ex.noise_scale:
                k = jax.random.fold_in(key, stable_hash(name, digest_size=4))
                t = t.astype(np.float32) + ex.noise_scale * np.asarray(jax.random.normal(k, t.shape))
            if ex.residual_scale is not None and row.path[3] == "down_proj":
                t = t * ex.residual_scale
            return t
        return expert_tensor
    cfg, reader = source(base)
    src_row = next((r for r in mapping.table(cfg) if r.path == row.path), None)
    if src_row is None:
        if row.path[-1] == "bias":  # Qwen2-MoE from a bias-free base: zero q/k/v biases (as mergekit)
            return lambda: np.zeros(row.hf_shape(c), np.float32)
        raise ConfigError(f"{base}: no tensor for {name!r} ({'/'.join(row.path)}) and nothing computed for it")
    src_name = src_row.hf_name(*idx)
    return lambda: reader.get(src_name)

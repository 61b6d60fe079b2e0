"""Merging an MoE back into a dense model (XFT steps 3-7).

Per layer, with learnable ``alpha`` in R^(E-1) and the fixed shared-expert weight lambda (0.75)::

    W = lambda W_0 + (1 - lambda) sum_{i>=1} softmax(alpha)_i W_i      for W in gate, up, down

(``modeling_llama_weighted_hf.LlamaWeightedMLP`` and ``convert_weighted_to_dense.py`` of ise-uiuc/xft): the
same coefficients for the three matrices of a layer, computed in float32, everything else (embeddings,
attention, norms, head) taken from the MoE. alpha starts at ones (softmax uniform), as the reference's
``convert_moe_to_weighted.py`` sets it. An MoE without XFT's shared expert (top-k routing) merges as
``sum_i softmax(alpha)_i W_i`` with alpha in R^E.

``merge_back`` is pure and differentiable in ``alpha``: the alpha-training stage computes the merged FFN
inside its loss (as the reference recomputes it every forward) and trains only ``alpha``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fusion_jax.errors import ConfigError, ShapeMismatchError
from fusion_jax.models.config import ModelConfig

SHARED_WEIGHT = 0.75
_FFN = ("gate_proj", "up_proj", "down_proj")


def alpha_shape(moe_config: ModelConfig) -> tuple[int, int]:
    """``(L, E-1)`` for XFT routing (the shared expert has the fixed weight lambda), else ``(L, E)``."""
    _check(moe_config)
    c = moe_config
    return c.num_layers, c.num_experts - 1 if c.router == "xft" else c.num_experts


def init_alpha(moe_config: ModelConfig) -> jax.Array:
    """The merge coefficients' logits, all ones (uniform), float32 ``alpha_shape``."""
    return jnp.ones(alpha_shape(moe_config), jnp.float32)


def merge_coefficients(moe_config: ModelConfig, alpha: jax.Array, shared_weight: float = SHARED_WEIGHT
                       ) -> jax.Array:
    """``[L, E]`` float32 weight of each expert in each layer's merged FFN (rows sum to 1)."""
    alpha = jnp.asarray(alpha, jnp.float32)
    if alpha.shape != alpha_shape(moe_config):
        raise ShapeMismatchError(f"alpha has shape {list(alpha.shape)}, the MoE needs "
                                 f"{list(alpha_shape(moe_config))} (layers x merged experts)")
    w = jax.nn.softmax(alpha, axis=-1)
    if moe_config.router != "xft":
        return w
    lam = jnp.full(alpha.shape[:1] + (1,), shared_weight, jnp.float32)
    return jnp.concatenate([lam, (1.0 - shared_weight) * w], axis=-1)


def merge_back(moe_params: Mapping[str, Any], moe_config: ModelConfig, alpha: jax.Array | None = None,
               shared_weight: float = SHARED_WEIGHT) -> tuple[ModelConfig, dict]:
    """``(dense_config, dense_params)``: each layer's FFN = the coefficient-weighted sum of its experts
    (float32 sum, cast to the experts' dtype); every non-FFN param is the MoE's own (not copied).
    ``alpha`` defaults to :func:`init_alpha` (XFT: 0.75 W_0 + 0.25 mean(W_1..W_E-1))."""
    _check(moe_config)
    coef = merge_coefficients(moe_config, init_alpha(moe_config) if alpha is None else alpha, shared_weight)
    try:
        experts = moe_params["layers"]["mlp"]["experts"]
        stacks = {k: experts[k]["kernel"] for k in _FFN}
    except (KeyError, TypeError):
        raise ConfigError("the MoE params have no layers/mlp/experts/{gate_proj,up_proj,down_proj}/kernel") from None
    mlp = {k: {"kernel": jnp.einsum("le,le...->l...", coef, jnp.asarray(w, jnp.float32)).astype(w.dtype)}
           for k, w in stacks.items()}
    layers = {k: v for k, v in moe_params["layers"].items() if k != "mlp"}
    layers["mlp"] = mlp
    params = {k: v for k, v in moe_params.items() if k != "layers"}
    params["layers"] = layers
    return moe_config.dense_config(), params


def save_merged(moe_params: Mapping[str, Any], moe_config: ModelConfig, out_dir: str | os.PathLike,
                alpha: jax.Array | None = None, *, shared_weight: float = SHARED_WEIGHT,
                source_dir: str | os.PathLike | None = None, dtype=None, overwrite: bool = False) -> Path:
    """Write the merged dense model as an HF checkpoint of the base family (``fusion_jax.hf.save``:
    config.json, safetensors, and tokenizer / generation files copied from ``source_dir``)."""
    from fusion_jax.hf import save
    config, params = merge_back(moe_params, moe_config, alpha, shared_weight)
    return save(params, config, out_dir, source_dir=source_dir, dtype=dtype, overwrite=overwrite)


def _check(c: ModelConfig) -> None:
    if not c.is_moe:
        raise ConfigError(f"{c.architecture} is not a mixture of experts: nothing to merge back")
    if c.has_shared_expert:
        raise ConfigError("merge back needs every expert in the one stack (same width); this MoE has a separate "
                          f"shared expert of width {c.shared_expert_intermediate_size} (Qwen2-MoE style)")

"""Rotary position embeddings as transformers computes them (``rotate_half`` layout).

Supported ``rope_type``: ``default``, ``linear`` (positions divided by ``factor``), ``dynamic`` (NTK:
the base grows with the current length ``max(positions) + 1`` beyond ``max_position_embeddings``, as
transformers' ``dynamic_rope_update``) and ``llama3`` (Llama 3.1 frequency smoothing).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.models.config import ModelConfig


def base_inv_freq(dim: int, theta: float) -> np.ndarray:
    # computed in float32 exactly as torch does: arange(0, dim, 2).float() / dim
    exps = (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))
    return (1.0 / (np.float32(theta) ** exps)).astype(np.float32)


def static_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies for every rope type except ``dynamic`` (which depends on the length)."""
    dim = config.head_dim
    inv = base_inv_freq(dim, config.rope_theta)
    kind = config.rope_type
    p = config.rope_scaling_dict
    if kind == "linear":
        inv = (inv / np.float32(p["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor = float(p["factor"])
        low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old = float(p.get("original_max_position_embeddings", config.max_position_embeddings))
        low_wl, high_wl = old / low, old / high
        inv_t = inv.astype(np.float32)
        wavelen = (2 * math.pi / inv_t).astype(np.float32)
        inv_l = np.where(wavelen > low_wl, inv_t / np.float32(factor), inv_t).astype(np.float32)
        smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * inv_l / np.float32(factor) + smooth * inv_l).astype(np.float32)
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, inv_l).astype(np.float32)
    return inv


def inv_freq(config: ModelConfig, positions: jax.Array) -> jax.Array:
    """[head_dim // 2] float32 inverse frequencies for this call (``positions`` only matter for dynamic)."""
    if config.rope_type != "dynamic":
        return jnp.asarray(static_inv_freq(config))
    dim = config.head_dim
    factor = float(config.rope_scaling_dict["factor"])
    mpe = config.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1.0, float(mpe))
    base = config.rope_theta * ((factor * seq_len / mpe) - (factor - 1)) ** (dim / (dim - 2))
    exps = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (base ** exps)


def cos_sin(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, S, head_dim] float32 for integer ``positions`` [B, S]."""
    inv = inv_freq(config, positions)
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, S, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, S, N, hd]; cos/sin [B, S, hd]. Computed in the dtype of x (as transformers does)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin

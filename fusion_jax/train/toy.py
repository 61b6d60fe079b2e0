"""A tiny self-contained NNX language model and data for trainer and sharding tests.

It follows the zoo's conventions (logical-axis annotations on every Param, layers stacked on a leading
``layers`` axis, float32 logits) without depending on ``fusion_jax.models``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _param(key, shape, axes, scale=None):
    scale = (1.0 / np.sqrt(shape[-2])) if scale is None and len(shape) >= 2 else (scale or 1.0)
    return nnx.Param(jax.random.normal(key, shape, jnp.float32) * scale,
                     out_sharding=axes, eager_sharding=False)


class ToyLM(nnx.Module):
    """Embedding -> L x (RMSNorm, MLP residual) -> RMSNorm -> lm_head. Causal via a cumulative mean."""

    def __init__(self, vocab: int = 32, dim: int = 16, hidden: int = 24, layers: int = 2, *, rngs: nnx.Rngs):
        k = rngs.params
        self.embed = nnx.Dict(embedding=_param(k(), (vocab, dim), ("vocab", "embed"), 1.0))
        self.layers = nnx.Dict(
            norm=nnx.Dict(scale=nnx.Param(jnp.ones((layers, dim)), out_sharding=("layers", "embed"),
                                          eager_sharding=False)),
            up=nnx.Dict(kernel=_param(k(), (layers, dim, hidden), ("layers", "embed", "mlp")),
                        bias=nnx.Param(jnp.zeros((layers, hidden)), out_sharding=("layers", "mlp"),
                                       eager_sharding=False)),
            down=nnx.Dict(kernel=_param(k(), (layers, hidden, dim), ("layers", "mlp", "embed"))),
        )
        self.final_norm = nnx.Dict(scale=nnx.Param(jnp.ones((dim,)), out_sharding=("embed",), eager_sharding=False))
        self.lm_head = nnx.Dict(kernel=_param(k(), (dim, vocab), ("embed", "vocab")))

    def __call__(self, input_ids, attention_mask=None):
        x = self.embed["embedding"][...][input_ids]
        # causal mixing: running mean over previous positions
        denom = jnp.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
        lay = self.layers
        for i in range(lay["norm"]["scale"].shape[0]):
            h = _rms(x) * lay["norm"]["scale"][i]
            h = jnp.cumsum(h, axis=1) / denom + h
            h = jax.nn.gelu(h @ lay["up"]["kernel"][i] + lay["up"]["bias"][i]) @ lay["down"]["kernel"][i]
            x = x + h
        x = _rms(x) * self.final_norm["scale"][...]
        return (x @ self.lm_head["kernel"][...]).astype(jnp.float32)


def _rms(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def toy_batches(num_batches: int, batch: int, seq: int, vocab: int = 32, seed: int = 0):
    """Deterministic list of {input_ids, loss_mask} numpy batches with a learnable pattern."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_batches):
        start = rng.integers(0, vocab, size=(batch, 1))
        step = rng.integers(1, 3, size=(batch, 1))
        ids = ((start + step * np.arange(seq)[None, :]) % vocab).astype(np.int32)
        mask = np.ones((batch, seq), np.int32)
        mask[:, : seq // 4] = 0  # a "prompt" that is not trained on
        out.append({"input_ids": ids, "loss_mask": mask})
    return out

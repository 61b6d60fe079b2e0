"""Held-out evaluation of the fused model: response-token cross-entropy and the mean gate weights.

Single models are evaluated by :mod:`fusion_jax.eval.loss`; this module adds the fused model's jitted
evaluation (same fixed-shape batches, so it compiles once) on top of it.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fusion_jax.eval.loss import sum_over_batches
from fusion_jax.ultrafuser import fusion
from fusion_jax.ultrafuser.model import GATE, SPECIALISTS, FusedModel, to_fused_batch


def make_fused_eval(fm: FusedModel, chunk: int):
    """jitted ``(train_params, batch[N,K,S]) -> (NLL sum, tokens, per-specialist gate-weight sum [K])``."""

    @jax.jit
    def ev(params, batch):
        fb = to_fused_batch(batch)
        hidden = fusion.stacked_hidden(fm.hidden_fn, params[SPECIALISTS], fb["input_ids"], fb["attention_mask"])
        return fusion.fused_ce_chunked(fm.head_fn, params[SPECIALISTS], params[GATE], hidden, fb["labels"],
                                       fb["loss_mask"], chunk)

    return ev


def fused_loss_and_weights(ev, params, arrays: Mapping[str, np.ndarray], batch_size: int, mesh: Mesh,
                           names) -> tuple[float, dict[str, float]]:
    """Mean response-token CE of the fused model and the mean gate weight of each specialist."""
    nll, tokens, wsum = sum_over_batches(ev, params, arrays, batch_size, mesh)
    c = max(float(tokens), 1.0)
    return float(nll / c), {name: float(x / c) for name, x in zip(names, wsum)}


def fused_generate(fm: FusedModel, prompts: np.ndarray, prompt_mask: np.ndarray, max_new_tokens: int,
                   eos_id: int | None, pad_id: int) -> np.ndarray:
    """Greedy samples of the fused model; prompts ``[N, K, P]`` (the trainer layout) -> tokens ``[N, T]``."""
    ids = jnp.swapaxes(jnp.asarray(prompts), 0, 1)
    mask = jnp.swapaxes(jnp.asarray(prompt_mask), 0, 1)
    return np.asarray(fm.generate(ids, mask, max_new_tokens, eos_id, pad_id))

"""Held-out evaluation: response-token cross-entropy of single models and of the fused model, and the
fused model's mean gate weights.

Batches are fixed-shape (:func:`fusion_jax.ultrafuser.data.eval_batches`), so each function compiles
once. Every process evaluates the same full batches (they are small); arrays are placed on the mesh
with the batch axis sharded where it divides, which works the same with one process or many.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from fusion_jax import sharding as shd
from fusion_jax.train.losses import next_token_ce
from fusion_jax.ultrafuser import fusion
from fusion_jax.ultrafuser.data import eval_batches
from fusion_jax.ultrafuser.model import GATE, SPECIALISTS, FusedModel, to_fused_batch


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
    """Host arrays that EVERY process holds in full -> global arrays sharded on the batch axis."""
    out = {}
    for k, x in batch.items():
        x = np.asarray(x)
        spec = shd.logical_to_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)
        out[k] = jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx, x=x: x[idx])
    return out


def to_host(x) -> np.ndarray:
    """A replicated (or fully addressable) global array -> numpy on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:   # every process holds all of it
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def make_lm_eval(graphdef):
    """jitted ``(params, batch[N,S]) -> (sum of response-token NLL, number of response tokens)``."""
    from flax import nnx

    @jax.jit
    def ev(params, batch):
        model = nnx.merge(graphdef, nnx.State(params) if not isinstance(params, nnx.State) else params)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        _, aux = next_token_ce(logits, batch["input_ids"], batch["loss_mask"])
        return aux["loss_sum"], aux["num_tokens"]

    return ev


def lm_loss(ev, params, arrays: Mapping[str, np.ndarray], batch_size: int, mesh: Mesh) -> float:
    """Mean response-token CE of one model over ``arrays`` ([N, S])."""
    tot = cnt = 0.0
    for b in eval_batches(arrays, batch_size):
        s, n = ev(params, put_batch(b, mesh))
        tot, cnt = tot + float(to_host(s)), cnt + float(to_host(n))
    return tot / max(cnt, 1.0)


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
    tot = cnt = 0.0
    ws = np.zeros(len(names))
    for b in eval_batches(arrays, batch_size):
        s, n, w = ev(params, put_batch(b, mesh))
        tot, cnt, ws = tot + float(to_host(s)), cnt + float(to_host(n)), ws + to_host(w)
    c = max(cnt, 1.0)
    return tot / c, {name: float(x / c) for name, x in zip(names, ws)}


def fused_generate(fm: FusedModel, prompts: np.ndarray, prompt_mask: np.ndarray, max_new_tokens: int,
                   eos_id: int | None, pad_id: int) -> np.ndarray:
    """Greedy samples of the fused model; prompts ``[N, K, P]`` (the trainer layout) -> tokens ``[N, T]``."""
    ids = jnp.swapaxes(jnp.asarray(prompts), 0, 1)
    mask = jnp.swapaxes(jnp.asarray(prompt_mask), 0, 1)
    return np.asarray(fm.generate(ids, mask, max_new_tokens, eos_id, pad_id))

"""Held-out response-token cross-entropy of a plain decoder, in fixed-shape batches.

Batches are fixed-shape (:func:`eval_batches` pads the last one with rows that add nothing), so the
jitted evaluation compiles once per shape. Every process evaluates the same full batches (evaluation sets
are small); :func:`fusion_jax.sharding.put_replicated_batch` places them on the mesh with the batch axis
sharded where it divides, which works the same with one process or many. Params must live on the same
mesh (see :func:`fusion_jax.sharding.place_params`).
"""
from __future__ import annotations

from typing import Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from fusion_jax.sharding import put_replicated_batch, to_host
from fusion_jax.train.losses import next_token_ce


def eval_batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive batches of ``batch_size`` rows; the last one is filled with all-padding rows
    (``loss_mask`` 0: they add nothing), so every batch has one shape and compiles once."""
    n = len(arrays["loss_mask"])
    for i in range(0, n, batch_size):
        b = {k: v[i:i + batch_size] for k, v in arrays.items()}
        short = batch_size - len(b["loss_mask"])
        if short:
            b = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
            # a fully masked row would give NaN attention in some kernels: let it attend to itself
            b["attention_mask"][-short:] = 1
        yield b


def make_lm_eval(graphdef):
    """jitted ``(params, batch[N,S]) -> (sum of response-token NLL, number of response tokens)`` for an
    NNX decoder split as ``graphdef, params`` (params: the pure dict or an ``nnx.State``)."""
    from flax import nnx

    @jax.jit
    def ev(params, batch):
        model = nnx.merge(graphdef, nnx.State(params) if not isinstance(params, nnx.State) else params)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        _, aux = next_token_ce(logits, batch["input_ids"], batch["loss_mask"])
        return aux["loss_sum"], aux["num_tokens"]

    return ev


def sum_over_batches(ev, params, arrays: Mapping[str, np.ndarray], batch_size: int, mesh: Mesh
                     ) -> list[np.ndarray]:
    """Each output of ``ev(params, batch)`` (a tuple of sums: NLL, tokens, ...) summed over the fixed-shape
    batches of ``arrays`` ([N, ...]), in float64 on the host."""
    totals = None
    for b in eval_batches(arrays, batch_size):
        out = [np.asarray(to_host(o), np.float64) for o in ev(params, put_replicated_batch(b, mesh))]
        totals = out if totals is None else [t + o for t, o in zip(totals, out)]
    return totals


def lm_loss(ev, params, arrays: Mapping[str, np.ndarray], batch_size: int, mesh: Mesh) -> float:
    """Mean response-token CE of one plain decoder (``ev`` from :func:`make_lm_eval`) over ``arrays``."""
    nll, tokens = sum_over_batches(ev, params, arrays, batch_size, mesh)[:2]
    return float(nll / max(float(tokens), 1.0))

"""Fusion math: stacked specialists, gate weights, fused logits and the chunked fused cross-entropy.

Everything here is a pure function of pytrees. The N specialists share one architecture, so their
params stack on a leading "expert" axis and one ``jax.vmap`` runs them all. Per-specialist work is
given as two functions of ONE specialist's params (``hidden_fn`` and ``head_fn``); this module vmaps
them over the expert axis.

Memory: the fused loss never holds ``[K, B, S, V]`` logits. Hidden states ``[K, B, S, D]`` are computed
once; then a ``lax.scan`` over sequence chunks forms one chunk's ``[K, B, c, V]`` logits from the
lm_heads, mixes them with the gate weights and takes the cross-entropy. The chunk body is wrapped in
``jax.checkpoint``, so the backward pass recomputes each chunk's logits instead of storing them.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fusion_jax.ultrafuser.gate import gate_weights

HiddenFn = Callable  # (params_k, input_ids [B,S], attention_mask [B,S]) -> hidden [B,S,D]
HeadFn = Callable    # (params_k, hidden [..., D]) -> logits [..., V] float32


def stack_trees(trees):
    """Stack a list of identical pytrees on a new leading (expert) axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_tree(tree, k: int):
    return jax.tree.map(lambda x: x[k], tree)


def stacked_hidden(hidden_fn: HiddenFn, params, input_ids, attention_mask):
    """[K,B,S] ids/mask, params stacked on K -> [K,B,S,D] hidden states (one vmapped forward)."""
    return jax.vmap(hidden_fn)(params, input_ids, attention_mask)


def stacked_logits(head_fn: HeadFn, params, hidden):
    """[K,...,D] -> [K,...,V] float32 logits, each specialist's own lm_head."""
    return jax.vmap(head_fn)(params, hidden)


def mix_logits(weights, logits):
    """weights [K,...], logits [K,...,V] -> sum_k w_k * logits_k  ([...,V])."""
    return jnp.einsum("k...,k...v->...v", weights.astype(jnp.float32), logits.astype(jnp.float32))


def fused_logits(head_fn: HeadFn, params, gate: dict, hidden):
    """Unchunked fused logits [B,S,V] (for decoding and small checks) and the weights [K,B,S]."""
    w = gate_weights(gate, hidden)
    return mix_logits(w, stacked_logits(head_fn, params, hidden)), w


def _ce(logits, labels):
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - tgt


def fused_ce_unchunked(head_fn: HeadFn, params, gate: dict, hidden, labels, loss_mask):
    """Reference: materialises [K,B,S,V]. Returns (sum of masked NLL, sum of mask, sum_t m_t w_t [K])."""
    logits, w = fused_logits(head_fn, params, gate, hidden)
    m = loss_mask.astype(jnp.float32)
    nll = _ce(logits, labels) * m
    return nll.sum(), m.sum(), jnp.einsum("kbs,bs->k", w, m)


def fused_ce_chunked(head_fn: HeadFn, params, gate: dict, hidden, labels, loss_mask, chunk: int = 128):
    """Chunked fused cross-entropy over response tokens, never materialising [K,B,S,V].

    hidden [K,B,S,D]; labels/loss_mask [B,S] (label t is the token that position t predicts).
    Returns (sum of masked NLL, number of masked tokens, per-specialist sum of masked gate weights [K]).
    """
    K, B, S, D = hidden.shape
    c = max(1, min(int(chunk), S))
    n = -(-S // c)
    pad = n * c - S
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
        loss_mask = jnp.pad(loss_mask, ((0, 0), (0, pad)))
    hs = jnp.moveaxis(hidden.reshape(K, B, n, c, D), 2, 0)            # [n,K,B,c,D]
    ls = jnp.moveaxis(labels.reshape(B, n, c), 1, 0)                  # [n,B,c]
    ms = jnp.moveaxis(loss_mask.astype(jnp.float32).reshape(B, n, c), 1, 0)

    @jax.checkpoint
    def chunk_loss(params, gate, h, lab, m):
        w = gate_weights(gate, h)                                     # [K,B,c]
        logits = mix_logits(w, stacked_logits(head_fn, params, h))    # [B,c,V]
        nll = (_ce(logits, lab) * m).sum()
        return nll, jnp.einsum("kbc,bc->k", w, m)

    def body(carry, xs):
        tot, wsum = carry
        h, lab, m = xs
        nll, ws = chunk_loss(params, gate, h, lab, m)
        return (tot + nll, wsum + ws), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros((K,), jnp.float32))
    (tot, wsum), _ = jax.lax.scan(body, init, (hs, ls, ms))
    return tot, ms.sum(), wsum


def fused_loss(hidden_fn: HiddenFn, head_fn: HeadFn, params, gate: dict, batch: dict, chunk: int = 128):
    """Mean response-token CE of the fused model on one batch, plus aux stats.

    batch: input_ids/attention_mask [K,B,S] (each example in each specialist's template, response tokens
    at the same positions), labels/loss_mask [B,S].
    """
    hidden = stacked_hidden(hidden_fn, params, batch["input_ids"], batch["attention_mask"])
    if chunk and chunk > 0:
        tot, cnt, wsum = fused_ce_chunked(head_fn, params, gate, hidden, batch["labels"], batch["loss_mask"], chunk)
    else:
        tot, cnt, wsum = fused_ce_unchunked(head_fn, params, gate, hidden, batch["labels"], batch["loss_mask"])
    denom = jnp.maximum(cnt, 1.0)
    return tot / denom, {"nll_sum": tot, "tokens": cnt, "gate_weight_sum": wsum}

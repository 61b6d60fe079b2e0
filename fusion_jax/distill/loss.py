"""The distillation loss: ``lambda * CLM + (1 - lambda) * CE(student, fused target)`` (reference section 4.3).

Both terms are token means over the batch, each over its own mask:

* CLM: the next-token cross-entropy on the target tokens (``loss_mask[t]``: token t is a target, as in
  :mod:`fusion_jax.train.losses`): FuseLLM every real token, FuseChat the response;
* fusion: at position t, ``-sum_e w_e log softmax(z_t)[id_e]`` over the fused target's entries (the
  teachers' distributions at t predict token t+1, compared with the student's logits at t: no shift),
  on ``fusion_mask[t]``: FuseLLM every real position, FuseChat positions whose NEXT token is a response
  token; positions no candidate covers drop out.

Memory: the student's ``[B, S, V]`` logits are never whole. The decoder's final hidden states
``[B, S, D]`` are computed once; a ``lax.scan`` over sequence chunks forms one chunk's ``[B, c, V]``
logits from the lm_head, takes ONE logsumexp per position, and gathers the logits at the label and at
the ``C * k`` target ids (``-log q[id] = lse - z[id]``). The chunk body is ``jax.checkpoint``-ed, so the
backward pass recomputes a chunk's logits instead of storing them (as UltraFuser's fused loss does,
:func:`fusion_jax.ultrafuser.fusion.fused_ce_chunked`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fusion_jax.distill import fusion

HeadFn = Callable  # (params, hidden [..., D]) -> float32 logits [..., V]

# the per-row teacher arrays a distillation batch carries beside the student's tokens
TARGET_KEYS = ("t_ids", "t_values", "t_count", "t_ce")


def _chunks(x, n, c):
    """[B, S, ...] (S = n * c) -> [n, B, c, ...]."""
    return jnp.moveaxis(x.reshape((x.shape[0], n, c) + x.shape[2:]), 1, 0)


def distill_sums(head_fn: HeadFn, params, hidden, input_ids, loss_mask, fusion_mask=None, t_ids=None, t_w=None,
                 chunk: int = 128):
    """Sums over the batch: ``(CLM NLL, CLM tokens, fusion CE, fusion positions)``.

    hidden [B, S, D]; input_ids, loss_mask [B, S]; fusion_mask [B, S]; t_ids / t_w [B, S, E] the fused
    target's entry ids (student vocabulary) and weights. Without a target (``t_ids=None``) the fusion
    sums are 0 (the CLM-only baseline runs the same code)."""
    B, S, D = hidden.shape
    labels = jnp.concatenate([input_ids[:, 1:], jnp.zeros((B, 1), input_ids.dtype)], axis=1)
    clm_mask = jnp.concatenate([loss_mask[:, 1:], jnp.zeros((B, 1), loss_mask.dtype)], axis=1)
    with_target = t_ids is not None
    if not with_target:
        t_ids = jnp.zeros((B, S, 1), jnp.int32)
        t_w = jnp.zeros((B, S, 1), jnp.float32)
        fusion_mask = jnp.zeros((B, S), jnp.float32)
    c = max(1, min(int(chunk), S))
    n = -(-S // c)
    pad = n * c - S
    if pad:
        p2 = ((0, 0), (0, pad))
        hidden = jnp.pad(hidden, p2 + ((0, 0),))
        labels, clm_mask, fusion_mask = (jnp.pad(x, p2) for x in (labels, clm_mask, fusion_mask))
        t_ids, t_w = (jnp.pad(x, p2 + ((0, 0),)) for x in (t_ids, t_w))
    xs = (_chunks(hidden, n, c), _chunks(labels, n, c), _chunks(clm_mask.astype(jnp.float32), n, c),
          _chunks(fusion_mask.astype(jnp.float32), n, c), _chunks(t_ids.astype(jnp.int32), n, c),
          _chunks(t_w.astype(jnp.float32), n, c))

    @jax.checkpoint
    def chunk_sums(params, h, lab, cm, fm, ids, w):
        logits = head_fn(params, h).astype(jnp.float32)                   # [B, c, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        z_lab = jnp.take_along_axis(logits, lab[..., None].astype(jnp.int32), axis=-1)[..., 0]
        clm = ((lse - z_lab) * cm).sum()
        if not with_target:
            return clm, jnp.zeros((), jnp.float32)
        z_t = jnp.take_along_axis(logits, ids, axis=-1)                   # [B, c, E]
        fus = ((w * (lse[..., None] - z_t)).sum(-1) * fm).sum()
        return clm, fus

    def body(carry, x):
        clm, fus = chunk_sums(params, *x)
        return (carry[0] + clm, carry[1] + fus), None

    (clm, fus), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), xs)
    return clm, clm_mask.astype(jnp.float32).sum(), fus, fusion_mask.astype(jnp.float32).sum()


def combine(sums, lam: float):
    """``lam * mean CLM + (1 - lam) * mean fusion CE`` and the aux metrics the trainer logs."""
    clm, n_clm, fus, n_fus = sums
    l_clm = clm / jnp.maximum(n_clm, 1.0)
    l_fus = fus / jnp.maximum(n_fus, 1.0)
    loss = lam * l_clm + (1.0 - lam) * l_fus if lam < 1 else l_clm
    return loss, {"num_tokens": n_clm, "clm_loss": l_clm, "fusion_loss": l_fus, "fusion_positions": n_fus}


def batch_target(batch: dict, *, method: str, temperature: float = 1.0, reward_precision: str = "float32"):
    """The fused target of a distillation batch: (entry ids [B,S,C*k], entry weights [B,S,C*k],
    covered [B,S], candidate weights [B,C])."""
    ids, values, count, ce = (batch[k] for k in TARGET_KEYS)
    B, S, C, k = ids.shape
    w = fusion.candidate_weights(ce, method, reward_precision)
    tw, covered = fusion.fused_target(w, values, count, temperature)
    return ids.reshape(B, S, C * k).astype(jnp.int32), tw, covered, w


def make_distill_loss(graphdef, *, lam: float = 0.9, method: str = "mince", temperature: float = 1.0,
                      chunk: int = 128, reward_precision: str = "float32"):
    """``loss_fn(params, batch, rng)`` for the Trainer: a :class:`fusion_jax.models.CausalLM` student
    (``graphdef`` + pure params dict) on a batch with ``input_ids``, ``attention_mask``, ``loss_mask``,
    ``fusion_mask`` and the candidates' :data:`TARGET_KEYS` arrays ([B,S,C,k] ids/values, [B,S,C] count,
    [B,C] sequence CE). ``lam == 1``: plain CLM (the teacher arrays are not read)."""
    from flax import nnx

    lam = float(lam)

    def model_of(params):
        return nnx.merge(graphdef, nnx.State(params) if not isinstance(params, nnx.State) else params)

    def head_fn(params, h):
        return model_of(params).logits_from_hidden(h)

    def loss_fn(params, batch, rng):
        del rng
        out = model_of(params)(batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden=True,
                               return_logits=False)
        if lam < 1:
            ids, tw, covered, _ = batch_target(batch, method=method, temperature=temperature,
                                               reward_precision=reward_precision)
            fm = batch["fusion_mask"].astype(jnp.float32) * covered
            sums = distill_sums(head_fn, params, out.hidden, batch["input_ids"], batch["loss_mask"], fm, ids, tw,
                                chunk)
        else:
            sums = distill_sums(head_fn, params, out.hidden, batch["input_ids"], batch["loss_mask"], chunk=chunk)
        return combine(sums, lam)

    return loss_fn

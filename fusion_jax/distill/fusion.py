"""Fusing the candidates' distributions into one sparse target: MinCE and AvgCE (FuseLLM, FuseChat).

Candidates are the teachers aligned to the student's positions and, optionally, the student's own
frozen pre-trained distribution (FuseLLM's ``distill_with_ref_model``, FuseChat's pivot), in that order:
``[ref, teacher_0, teacher_1, ...]``. Each gives per position up to k entries in the student's
vocabulary (ids, log-probabilities or logits, a count of valid entries) and per SEQUENCE its
cross-entropy against the gold next tokens in its own tokenization (reference file section 4.2):

* reward ``r_c = exp(-CE_c)`` per sequence (``reward_precision="bfloat16"`` rounds CE and the reward to
  bfloat16 as the official trainers do, so near-equal CEs tie);
* **MinCE**: the candidate with the largest reward, the first one on ties (the ref model wins ties);
  constant over the sequence;
* **AvgCE**: weights ``softmax_c(r_c)`` (a softmax of exp(-CE), not of -CE, as the code does).

A candidate's distribution at a position is ``softmax(values / T)`` over its kept entries (the official
collator renormalizes over the stored top-k). The fused target is ``sum_c w_c p_c``; because the
cross-entropy is linear in the target, it is kept as the concatenation of all candidates' entries
(``C * k`` ids with weights ``w_c p_{c,i}``; an id that two candidates share simply appears twice), never
as a dense vocabulary vector. A candidate with no entry at a position (an empty alignment list when
there is no ref model to copy) gives that position's weight to the others; a position no candidate
covers leaves the fusion loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

METHODS = ("mince", "avgce")
REWARD_PRECISIONS = ("float32", "bfloat16")


def rewards(seq_ce: jax.Array, precision: str = "float32") -> jax.Array:
    """``exp(-CE)`` per sequence and candidate, float32 (``"bfloat16"``: as FuseLLM computes it,
    ``1 / exp(bf16(CE))`` in bfloat16)."""
    if precision == "bfloat16":
        ce = jnp.asarray(seq_ce).astype(jnp.bfloat16)
        return (jnp.ones((), jnp.bfloat16) / jnp.exp(ce)).astype(jnp.float32)
    return jnp.exp(-jnp.asarray(seq_ce, jnp.float32))


def candidate_weights(seq_ce: jax.Array, method: str, precision: str = "float32") -> jax.Array:
    """``[B, C]`` per-sequence weights of the C candidates (rows sum to 1)."""
    r = rewards(seq_ce, precision)
    if method == "mince":
        return jax.nn.one_hot(jnp.argmax(r, axis=-1), r.shape[-1], dtype=jnp.float32)
    if method == "avgce":
        return jax.nn.softmax(r, axis=-1)
    raise ValueError(f"fusion method {method!r}; expected one of {', '.join(METHODS)}")


def entry_probs(values: jax.Array, count: jax.Array, temperature: float = 1.0) -> jax.Array:
    """``softmax(values / T)`` over the first ``count`` entries of the last axis (others 0).
    values [..., k], count [...] -> [..., k] float32."""
    k = values.shape[-1]
    valid = jnp.arange(k) < count[..., None]
    z = jnp.where(valid, values.astype(jnp.float32) / temperature, -jnp.inf)
    zmax = jnp.max(jnp.where(valid, z, jnp.finfo(jnp.float32).min), axis=-1, keepdims=True)
    e = jnp.where(valid, jnp.exp(z - zmax), 0.0)
    return e / jnp.maximum(e.sum(-1, keepdims=True), 1e-30)


def fused_target(weights: jax.Array, values: jax.Array, count: jax.Array, temperature: float = 1.0):
    """The fused sparse target.

    weights [B, C] (:func:`candidate_weights`), values [B, S, C, k], count [B, S, C] ->
    (entry weights [B, S, C*k] summing to 1 at covered positions, covered [B, S] float32)."""
    B, S, C, k = values.shape
    p = entry_probs(values, count, temperature)                              # [B,S,C,k]
    w = weights[:, None, :] * (count > 0).astype(jnp.float32)                # [B,S,C]
    norm = w.sum(-1, keepdims=True)
    w = jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1.0), 0.0)
    return (w[..., None] * p).reshape(B, S, C * k), (norm[..., 0] > 0).astype(jnp.float32)

"""Generic losses for a plain causal LM: next-token cross-entropy with a loss mask, token-weighted.

Batch convention (what ``fusion_jax.data`` yields and what these losses read):
    input_ids      [B, S] int32
    attention_mask [B, S] 1 = real token (optional; default all ones)
    loss_mask      [B, S] 1 = this token is a *target* (optional; default = attention_mask). Token t is
                   predicted from positions < t, so loss_mask[:, 0] is ignored.
    segment_ids / positions  passed to the model when present (packed sequences).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def next_token_ce(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array | None = None,
                  segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Token-weighted mean CE of predicting ``input_ids[:, 1:]`` from ``logits[:, :-1]``.

    Returns ``(loss, {"num_tokens", "accuracy", "loss_sum"})``; with no target tokens the loss is 0.
    Across a packed-segment boundary (``segment_ids`` changes) the target is dropped.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    mask = jnp.ones(targets.shape, jnp.float32) if loss_mask is None else loss_mask[:, 1:].astype(jnp.float32)
    if segment_ids is not None:
        mask = mask * (segment_ids[:, 1:] == segment_ids[:, :-1]).astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = (logz - tgt) * mask
    n = jnp.sum(mask)
    loss_sum = jnp.sum(nll)
    loss = loss_sum / jnp.maximum(n, 1.0)
    acc = jnp.sum((jnp.argmax(logits, -1) == targets) * mask) / jnp.maximum(n, 1.0)
    return loss, {"num_tokens": n, "accuracy": acc, "loss_sum": loss_sum}


def causal_lm_loss(apply_fn: Callable[..., Any]) -> Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]:
    """``loss_fn(params, batch, rng)`` for the trainer from ``apply_fn(params, batch) -> logits``.

    For an NNX model use :func:`nnx_causal_lm_loss`.
    """
    def loss_fn(params, batch, rng):
        del rng
        logits = apply_fn(params, batch)
        mask = batch.get("loss_mask", batch.get("attention_mask"))
        return next_token_ce(logits, batch["input_ids"], mask, batch.get("segment_ids"))
    return loss_fn


def nnx_causal_lm_loss(graphdef: Any, rest: Any = None) -> Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]:
    """Loss for an ``fusion_jax.models.CausalLM`` (or any NNX LM) split as ``graphdef, params, rest``.

    ``params`` given to the loss is the pure dict ``nnx.to_pure_dict(params_state)`` that the trainer
    holds. Usage::

        graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
        params = nnx.to_pure_dict(params_state)
        loss_fn = nnx_causal_lm_loss(graphdef, rest)   # then Trainer(loss_fn, params, ...)
    """
    from flax import nnx

    def apply(params, batch):
        state = nnx.State(params) if not isinstance(params, nnx.State) else params
        model = nnx.merge(graphdef, state, rest) if rest is not None else nnx.merge(graphdef, state)
        kw = {}
        for k in ("attention_mask", "positions", "segment_ids"):
            if k in batch:
                kw[k] = batch[k]
        out = model(batch["input_ids"], **kw)
        return getattr(out, "logits", out)

    return causal_lm_loss(apply)

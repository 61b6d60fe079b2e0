"""The train step: gradients w.r.t. trainable params only, gradient accumulation over microbatches.

``loss_fn(params, batch, rng) -> (loss, aux)``: ``params`` is the full (merged) params pytree, ``batch``
a dict of arrays with a leading batch dim, ``loss`` a scalar token-weighted mean over the batch, ``aux``
a dict of scalar metrics. When ``aux["num_tokens"]`` is present it weights microbatches (so accumulated
gradients equal those of one big batch) and drives tokens/s; otherwise microbatches weigh equally.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fusion_jax.train.state import ParamSplit, TrainState

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]


def _split_microbatches(batch: Any, n: int) -> Any:
    """[B, ...] -> [n, B/n, ...] with microbatch i = rows i, i+n, i+2n, ... (keeps rows device-local)."""
    def f(x):
        b = x.shape[0]
        if b % n:
            raise ValueError(f"batch dim {b} is not divisible by grad_accum_steps={n}")
        return jnp.swapaxes(x.reshape((b // n, n) + x.shape[1:]), 0, 1)
    return jax.tree.map(f, batch)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, split: ParamSplit,
                    schedule: Callable | None = None, grad_accum_steps: int = 1
                    ) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """A pure ``train_step(state, batch) -> (state, metrics)``; jit it with shardings (see loop.py)."""

    def weighted_loss(trainable, frozen, batch, key):
        loss, aux = loss_fn(split.merge(trainable, frozen), batch, key)
        aux = dict(aux)
        w = jnp.asarray(aux.get("num_tokens", 1.0), jnp.float32)
        return loss.astype(jnp.float32) * jax.lax.stop_gradient(w), (loss.astype(jnp.float32), aux, w)

    grad_fn = jax.value_and_grad(weighted_loss, has_aux=True)

    def train_step(state: TrainState, batch: Any):
        key = jax.random.fold_in(state.rng, state.step)
        if grad_accum_steps == 1:
            (_, (loss, aux, w)), g = grad_fn(state.params, state.frozen, batch, key)
            grads = jax.tree.map(lambda x: x / jnp.maximum(w, 1e-9).astype(x.dtype), g)
            aux = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
        else:
            mbs = _split_microbatches(batch, grad_accum_steps)
            zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            aux_shape = jax.eval_shape(
                lambda: weighted_loss(state.params, state.frozen, jax.tree.map(lambda x: x[0], mbs), key)[1][1])
            zeros_aux = {k: jnp.zeros((), jnp.float32) for k in aux_shape}

            def body(carry, inp):
                gsum, lsum, wsum, asum = carry
                mb, i = inp
                (lw, (loss, aux, w)), g = grad_fn(state.params, state.frozen, mb, jax.random.fold_in(key, i))
                gsum = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), gsum, g)
                asum = {k: asum[k] + (jnp.asarray(aux[k], jnp.float32) if k == "num_tokens"
                                      else jnp.asarray(aux[k], jnp.float32) * w) for k in asum}
                return (gsum, lsum + lw, wsum + w, asum), None

            init = (zeros_g, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros_aux)
            (gsum, lsum, wsum, asum), _ = jax.lax.scan(
                body, init, (mbs, jnp.arange(grad_accum_steps)))
            wsafe = jnp.maximum(wsum, 1e-9)
            grads = jax.tree.map(lambda g, p: (g / wsafe).astype(p.dtype), gsum, state.params)
            loss = lsum / wsafe
            aux = {k: (v if k == "num_tokens" else v / wsafe) for k, v in asum.items()}

        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(aux)
        metrics["loss"] = loss
        metrics["grad_norm"] = grad_norm.astype(jnp.float32)
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step

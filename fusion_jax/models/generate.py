"""KV-cache decoding primitives of one ``CausalLM`` and the minimal greedy loop built on them.

``prefill`` and ``decode_step`` are THE way to run a model with a cache: the greedy ``generate`` below,
the sampling engine (:mod:`fusion_jax.eval.generation`, which adds sampling, stop strings, bucketing)
and the fused UltraFuser decoder (:mod:`fusion_jax.ultrafuser.decoding`, which vmaps them over the
specialists) all call them. Both return final-normed hidden states of the positions that predict the
next token; ``model.logits_from_hidden`` turns them into logits, so a fused model can gate on the
hidden states before any logits exist, and prefill never forms the ``[B, P, V]`` logits of the prompt.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fusion_jax.models.llama import CausalLM, KVCache


def prefill(model: CausalLM, input_ids, attention_mask, max_len: int) -> tuple[jax.Array, KVCache]:
    """Run a LEFT-padded prompt batch ``[B, P]`` into a fresh cache of ``max_len`` slots.

    Returns the last position's hidden state ``[B, D]`` (left padding puts every row's last real token
    there) and the cache.
    """
    B = input_ids.shape[0]
    out = model(input_ids, attention_mask=attention_mask, cache=model.init_cache(B, max_len),
                return_hidden=True, return_logits=False)
    return out.hidden[:, -1], out.cache


def decode_step(model: CausalLM, tokens, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Feed one token per row (``[B]`` int32); returns its hidden state ``[B, D]`` and the cache."""
    B = tokens.shape[0]
    out = model(tokens[:, None], attention_mask=jnp.ones((B, 1), jnp.int32), cache=cache,
                return_hidden=True, return_logits=False)
    return out.hidden[:, 0], out.cache


def _eos_tuple(eos) -> tuple[int, ...]:
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos", "pad"))
def _generate(graphdef, state, input_ids, attention_mask, *, max_new_tokens, eos, pad):
    model = nnx.merge(graphdef, state)
    B, S = input_ids.shape
    h, cache = prefill(model, input_ids, attention_mask, S + max_new_tokens)
    first = jnp.argmax(model.logits_from_hidden(h), axis=-1).astype(jnp.int32)
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
    tokens = jnp.full((B, max_new_tokens), pad, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos_arr)

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tokens, cache, done, last = carry
        h, cache = decode_step(model, last, cache)
        nxt = jnp.argmax(model.logits_from_hidden(h), axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad, nxt)
        tokens = tokens.at[:, i].set(nxt)
        done = done | jnp.isin(nxt, eos_arr)
        return i + 1, tokens, cache, done, nxt

    _, tokens, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, cache, done, first))
    return tokens


def generate(model: CausalLM, input_ids, attention_mask=None, max_new_tokens: int = 32,
             eos_token_id=None, pad_token_id=None) -> jax.Array:
    """Greedy-decode ``max_new_tokens`` tokens after a LEFT-padded prompt batch.

    Returns only the new tokens, ``[B, max_new_tokens]`` int32. After a row emits an EOS token (any of
    ``eos_token_id``, an int or a sequence) the rest of the row is ``pad_token_id`` (default: the first
    EOS id, else 0) and the loop stops early once every row is done. Same tokens as transformers'
    ``generate(do_sample=False)`` on the same left-padded batch. The minimal primitive (one compile per
    prompt shape); :func:`fusion_jax.eval.generation.generate` is the engine for real workloads
    (sampling, stop strings, bucketed shapes, many prompts).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    eos = _eos_tuple(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, input_ids, jnp.asarray(attention_mask, jnp.int32),
                     max_new_tokens=int(max_new_tokens), eos=eos, pad=int(pad))

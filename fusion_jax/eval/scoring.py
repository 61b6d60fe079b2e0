"""Scoring token sequences with any decoder of :mod:`fusion_jax.eval.generation`: per-row log-likelihood
of target tokens and whether greedy decoding would have produced them. One implementation for held-out
response loss and perplexity (``fusion-jax eval --tasks loss``, the arena), and lm-evaluation-harness's
``loglikelihood`` / ``loglikelihood_rolling`` (:mod:`fusion_jax.eval.harness`), for plain and fused
models alike.

A decoder scores through ``decoder.score(params, ids, mask, labels, chunk) -> (logp [B, S], greedy [B, S])``
(``labels[:, t]``: the token position ``t`` predicts; logits are formed ``chunk`` positions at a time, so
``[B, S, V]`` (or a fused model's ``[K, B, S, V]``) never exists at once). :func:`token_scores` is that
chunked loop for a decoder's own hidden states and logits function.

Arrays follow :mod:`fusion_jax.data.templates`: ``input_ids``/``attention_mask`` ``[N, S]`` (or
``[N, K, S]``, K views whose target tokens line up), ``loss_mask [N, S]`` 1 where ``input_ids[t]`` is a
target. Batches have one shape (the last is padded with rows that add nothing), so a set compiles once.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.errors import DataError
from fusion_jax.eval.generation import batch_bucket


def token_scores(logits_fn: Callable, hidden, labels, chunk: int, seq_axis: int = 1):
    """``(log p(labels), labels == argmax)`` per position, each ``[B, S]``, from hidden states whose
    sequence axis is ``seq_axis`` (1 for ``[B, S, D]``, 2 for a fused ``[K, B, S, D]``); ``logits_fn``
    maps a chunk of hidden states to ``[B, c, V]`` logits."""
    B, S = labels.shape
    c = max(1, min(int(chunk), S))
    n = -(-S // c)
    if n * c != S:
        pads = [(0, 0)] * hidden.ndim
        pads[seq_axis] = (0, n * c - S)
        hidden = jnp.pad(hidden, pads)
        labels = jnp.pad(labels, ((0, 0), (0, n * c - S)))

    def one(i):
        h = jax.lax.dynamic_slice_in_dim(hidden, i * c, c, axis=seq_axis)
        lab = jax.lax.dynamic_slice_in_dim(labels, i * c, c, axis=1)
        logits = logits_fn(h).astype(jnp.float32)
        lp = jax.nn.log_softmax(logits, axis=-1)
        tgt = jnp.take_along_axis(lp, lab[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return tgt, jnp.argmax(logits, axis=-1) == lab

    lp, greedy = jax.lax.map(one, jnp.arange(n))                 # [n, B, c]
    lp = jnp.moveaxis(lp, 0, 1).reshape(B, n * c)[:, :S]
    greedy = jnp.moveaxis(greedy, 0, 1).reshape(B, n * c)[:, :S]
    return lp, greedy


@functools.partial(jax.jit, static_argnames=("decoder", "chunk"))
def _score(decoder, params, ids, mask, labels, lmask, *, chunk):
    lp, greedy = decoder.score(params, ids, mask, labels, chunk)
    m = lmask.astype(jnp.float32)
    return (lp * m).sum(-1), m.sum(-1), jnp.all(greedy | (m == 0), axis=-1)


def _shifted(arrays: Mapping[str, np.ndarray]):
    """labels[t] = the first view's ids[t + 1] (the token position t predicts), its target mask likewise."""
    ids = np.asarray(arrays["input_ids"])
    first = ids[:, 0] if ids.ndim == 3 else ids
    labels = np.zeros_like(first)
    labels[:, :-1] = first[:, 1:]
    lm = np.zeros(first.shape, np.float32)
    lm[:, :-1] = np.asarray(arrays["loss_mask"], np.float32)[:, 1:]
    return labels, lm


def score_arrays(decoder, params, arrays: Mapping[str, np.ndarray], batch_size: int, *, chunk: int = 128
                 ) -> dict[str, np.ndarray]:
    """Per row: ``logprob`` (sum of the targets' log-probabilities, float64), ``tokens`` (targets) and
    ``greedy`` (every target is the argmax)."""
    n = len(arrays["loss_mask"])
    if n == 0:
        raise DataError("nothing to score (no rows)")
    labels, lm = _shifted(arrays)
    ids = np.asarray(arrays["input_ids"], np.int32)
    mask = np.asarray(arrays["attention_mask"], np.int32)
    out = {"logprob": [], "tokens": [], "greedy": []}
    B = batch_bucket(n, int(batch_size))     # powers of two up to batch_size: few shapes, few compiles
    for i in range(0, n, B):
        sl = slice(i, i + B)
        b = [ids[sl], mask[sl], labels[sl], lm[sl]]
        short = B - len(b[0])
        if short:   # filler rows: attend to themselves (no NaN), no targets
            b = [np.concatenate([x, np.zeros((short,) + x.shape[1:], x.dtype)]) for x in b]
            b[1][-short:] = 1
        lp, cnt, gr = _score(decoder, params, *b, chunk=int(chunk))
        for k, v in zip(("logprob", "tokens", "greedy"), (lp, cnt, gr)):
            out[k].append(np.asarray(v)[:B - short])
    return {"logprob": np.concatenate(out["logprob"]).astype(np.float64),
            "tokens": np.concatenate(out["tokens"]).astype(np.int64),
            "greedy": np.concatenate(out["greedy"]).astype(bool)}


def response_loss(decoder, params, arrays: Mapping[str, np.ndarray], batch_size: int, *, chunk: int = 128
                  ) -> dict[str, float]:
    """``{"loss": mean target-token NLL, "ppl": exp(loss), "tokens": number of targets}``."""
    s = score_arrays(decoder, params, arrays, batch_size, chunk=chunk)
    tokens = int(s["tokens"].sum())
    loss = float(-s["logprob"].sum() / max(tokens, 1))
    return {"loss": loss, "ppl": float(np.exp(min(loss, 50.0))), "tokens": tokens}


def _bucket(n: int, min_bucket: int) -> int:
    b = int(min_bucket)
    while b < n:
        b *= 2
    return b


def score_continuations(decoder, params, contexts: Sequence, continuations: Sequence[Sequence[int]], *,
                        batch_size: int = 16, max_len: int | None = None, min_bucket: int = 16,
                        pad_id: int = 0, chunk: int = 128) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), greedy)`` per request (lm-evaluation-harness's ``loglikelihood``).

    ``contexts[i]``: token ids, or K id lists for a K-view decoder (each view ends where the continuation
    starts); ``continuations[i]``: non-empty token ids. Sequences longer than ``max_len`` lose context
    tokens from the left (as transformers-based harness models do). Rows are grouped by length bucket
    (powers of two from ``min_bucket``), so a run compiles one program per bucket.
    """
    views = int(getattr(decoder, "views", 1))
    rows = []
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        cont = [int(t) for t in cont]
        if not cont:
            raise DataError(f"request {i}: empty continuation")
        vs = [[int(t) for t in ctx]] if views == 1 else [[int(t) for t in v] for v in ctx]
        if len(vs) != views:
            raise DataError(f"request {i}: the decoder takes {views} views, got {len(vs)}")
        seqs = [v + cont for v in vs]
        if max_len is not None:
            if len(cont) > max_len:
                raise DataError(f"request {i}: continuation of {len(cont)} tokens > max_len {max_len}")
            seqs = [s[-max_len:] for s in seqs]
        if any(len(s) < 2 for s in seqs):
            raise DataError(f"request {i}: context and continuation need at least 2 tokens together "
                            "(give the context at least one token, e.g. BOS)")
        rows.append((seqs, len(cont)))
    by_bucket: dict[int, list[int]] = {}
    for i, (seqs, _) in enumerate(rows):
        by_bucket.setdefault(_bucket(max(map(len, seqs)), min_bucket), []).append(i)
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    for P, idx in sorted(by_bucket.items()):
        shape = (len(idx), P) if views == 1 else (len(idx), views, P)
        ids = np.full(shape, pad_id, np.int32)
        mask = np.zeros(shape, np.int32)
        lmask = np.zeros((len(idx), P), np.float32)
        for j, i in enumerate(idx):
            seqs, nc = rows[i]
            for k, s in enumerate(seqs):           # left-padded: every view ends at P
                at = (j, slice(P - len(s), P)) if views == 1 else (j, k, slice(P - len(s), P))
                ids[at], mask[at] = s, 1
            lmask[j, P - nc:] = 1
        s = score_arrays(decoder, params, {"input_ids": ids, "attention_mask": mask, "loss_mask": lmask},
                         batch_size, chunk=chunk)
        for j, i in enumerate(idx):
            out[i] = (float(s["logprob"][j]), bool(s["greedy"][j]))
    return out  # type: ignore[return-value]

"""Per-element and selection merges: linear, passthrough, nearswap, RAM / RAM+ (tensor-local),
Arcee Fusion, SCE and FuseChat's VaRM.

Each follows mergekit 0.1.5's ``merge_methods/<name>.py`` (VaRM and ``sce_fusechat``: FuseChat's
papers/code, see DESIGN.md) in float32 with ``R`` (a :func:`.precision.rounder`) applied where
mergekit's torch arithmetic rounds to the merge dtype: linear works in float32 and rounds once; the
others work in the merge dtype, except the float32 steps their docstrings name.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fusion_jax.merging import select
from fusion_jax.merging.precision import barrier, dtype_name, fma_guard, guard_ones, rounder
from fusion_jax.merging.reduction import fixed_sum, row_sum
from fusion_jax.merging.task_vectors import consensus_mask, seq_sum


def linear(tensors, weights, normalize=True, dtype="float32"):
    """sum_i w_i x_i (/ sum_i w_i when normalize; the validation refuses a zero sum), float32.

    mergekit accumulates with ``addcmul_``, a fused multiply-add; under ``jit`` XLA fuses
    ``acc + x * w`` the same way, so this kernel is always jitted."""
    return _linear(tuple(tensors), jnp.asarray(weights, jnp.float32), guard_ones(), normalize=bool(normalize),
                   dtype=dtype_name(dtype))


@functools.partial(jax.jit, static_argnames=("normalize", "dtype"))
def _linear(tensors, w, ones, *, normalize, dtype):
    return linear_body(tensors, w, ones, normalize=normalize, dtype=dtype)


def linear_body(tensors, w, ones, *, normalize, dtype):
    """:func:`linear` inside a jitted function (``ones``: its :func:`.precision.fma_guard` argument)."""
    with fma_guard(ones):
        R = rounder(dtype)
        acc = barrier(R(tensors[0]) * w[0])  # torch: 0 + x0 w0, the product rounded alone
        for i in range(1, len(tensors)):
            acc = barrier(acc + R(tensors[i]) * w[i])  # one fused multiply-add onto the accumulator
        if normalize:
            acc = acc / seq_sum([w[i] for i in range(len(tensors))])
        return R(acc)


def passthrough(x, scale=None, dtype="float32"):
    R = rounder(dtype)
    return R(x) if scale is None else R(R(x) * jnp.float32(scale))


def nearswap(base, other, t, dtype="float32"):
    """mergekit ``nearswap``: move each base element towards the other model's by
    min(1, t / |base - other|) (elements closer than t are swapped in whole)."""
    R = rounder(dtype)
    a, b = R(base), R(other)
    absdiff = jnp.abs(R(a - b))
    # torch evaluates ``t / tensor`` as ``tensor.reciprocal() * t``: two roundings
    w = jnp.clip(R(R(1.0 / R(jnp.maximum(absdiff, 1e-6))) * jnp.float32(t)), 0.0, 1.0)
    return R(R(w * b) + R(R(1.0 - w) * a))


def _ram_vectors(base, others, epsilon, R):
    b = R(base)
    tvs = [R(R(x) - b) for x in others]
    nonzero = [jnp.abs(tv) > R(jnp.float32(epsilon)) for tv in tvs]
    counts = seq_sum([z.astype(jnp.int32) for z in nonzero])
    return b, tvs, nonzero, counts


def ram(base, others, epsilon=1e-5, dtype="float32"):
    """mergekit ``ram`` (Reinforced Agent Merging): entries changed (|delta| > epsilon) by one model
    keep that model's delta; entries changed by several get their deltas' mean."""
    R = rounder(dtype)
    if not others:
        return R(base)
    b, tvs, nonzero, counts = _ram_vectors(base, others, epsilon, R)
    cnt = jnp.maximum(counts, 1).astype(jnp.float32)
    parts = [R(jnp.where(counts == 1, jnp.where(z, tv, 0.0), 0.0)
               + R(jnp.where(counts > 1, jnp.where(z, tv, 0.0), 0.0) / cnt)) for tv, z in zip(tvs, nonzero)]
    return R(b + R(seq_sum(parts)))


def ramplus_tl(base, others, r=0.1, alpha=0.2, epsilon=1e-5, dtype="float32"):
    """mergekit ``ramplus_tl``: RAM whose unique entries are scaled per model by
    1 + r * clamp(shared / unique, 0, alpha) (counts of that model's changed entries). mergekit's
    torch promotion makes the scaled sum and the result float32; the caller casts to the output dtype."""
    R = rounder(dtype)
    if not others:
        return R(base)
    b, tvs, nonzero, counts = _ram_vectors(base, others, epsilon, R)
    cnt = jnp.maximum(counts, 1).astype(jnp.float32)
    parts = []
    for tv, z in zip(tvs, nonzero):
        shared = jnp.sum(z & (counts > 1), dtype=jnp.int32).astype(jnp.float32)
        unique = jnp.sum(z & (counts == 1), dtype=jnp.int32).astype(jnp.float32)
        rho = shared / jnp.maximum(unique, jnp.float32(epsilon))
        lam = 1.0 + barrier(jnp.float32(r) * jnp.clip(rho, 0.0, jnp.float32(alpha)))
        tz = jnp.where(z, tv, 0.0)
        parts.append(barrier(jnp.where(counts == 1, tz, 0.0) * lam) + R(jnp.where(counts > 1, tz, 0.0) / cnt))
    return b + seq_sum(parts)


def _float_key(x):
    """uint32 keys ordered like the float32 values (negative values below positive ones)."""
    bits = lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _key_float(key):
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return lax.bitcast_convert_type(bits, jnp.float32)


def arcee_fusion(base, other, dtype="float32", host=False):
    """mergekit ``arcee_fusion``: importance = |other - base| * KL(softmax(other) || softmax(base)) per
    row (last axis); elements whose importance >= median + 1.5 IQR take the other model's value
    (base + (other - base), a float32 result, as mergekit's).

    The quartiles are exact over the whole tensor; mergekit estimates them from 1,000,000 elements drawn
    at random (with replacement) when a tensor has more, so there it is approximate and unseeded."""
    R = rounder(dtype)
    a, p = R(base), R(other)
    diff = jnp.abs(R(p - a))
    sp = R(R(_softmax(p)) + jnp.float32(1e-8))
    sq = R(R(_softmax(a)) + jnp.float32(1e-8))
    kl = R(row_sum(R(sp * R(jnp.log(R(sp / sq)))), keepdims=True))
    imp = R(diff * kl)
    n = imp.size
    # mergekit: (q * (n - 1)).long() with q a float32 tensor
    idx = (np.array([0.25, 0.5, 0.75], np.float32) * np.float32(n - 1)).astype(np.int64)
    key = _float_key(imp).reshape(-1)
    q1, med, q3 = (_key_float(select.kth_smallest(key, int(i) + 1, host)) for i in idx)
    threshold = R(med + R(jnp.float32(1.5) * R(q3 - q1)))
    # mergekit's mask is float32, so the last multiply and add promote to float32 (not rounded)
    return a + R(p - a) * (imp >= threshold).astype(jnp.float32)


def _softmax(x):
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return e / row_sum(e, keepdims=True)


# -- FuseChat: VaRM and SCE -------------------------------------------------------------------------

def varm(base, others, dtype="float32"):
    """FuseChat VaRM (paper form): w_j = mean((x_j - base)^2) / sum_k mean((x_k - base)^2) for this
    parameter matrix; result sum_j w_j x_j (uniform weights if every delta is zero). float32 steps;
    only the inputs and the result are in the merge dtype (mergekit has no VaRM)."""
    R = rounder(dtype)
    b = R(base)
    xs = [R(x) for x in others]
    v = jnp.stack([fixed_sum(barrier((x - b) ** 2)) / b.size for x in xs])
    tot = v.sum()
    w = jnp.where(tot > 0, v / jnp.where(tot > 0, tot, 1.0), 1.0 / len(xs))
    return R(seq_sum([barrier(w[i] * x) for i, x in enumerate(xs)]))


def _sce_select(tvs, topk, R, host):
    """mergekit ``sce_mask``: the top int(nonzero(var) * topk) entries by |variance| across the task
    vectors (ties: lowest index first, see :mod:`.select`)."""
    m = len(tvs)
    mean = seq_sum(tvs) / m
    var = R(seq_sum([(tv - mean) ** 2 for tv in tvs]) / m)
    nonzero = jnp.sum(var != 0, dtype=jnp.int32)
    k = (nonzero.astype(jnp.float32) * jnp.float32(topk)).astype(jnp.int32)
    return select.first_k(select.magnitude_key(var, True), k, host)


def sce(base, others, select_topk=1.0, variant="mergekit", dtype="float32", host=False):
    """SCE (FuseChat-2.0): Select by variance, Calculate weights from mean squared (selected) deltas,
    Erase minority signs, then base + sum_j w_j e_j tv_j / sum_j w_j e_j.

    variant "mergekit" (mergekit's ``sce``, in the merge dtype): the selection masks the task vectors;
    "fusechat" (FuseChat's released code, float32 steps): the selection only shapes the weights."""
    R = rounder(dtype) if variant == "mergekit" else rounder("float32")
    out = rounder(dtype)
    b = R(base)
    tvs = [R(R(x) - b) for x in others]
    m = len(tvs)
    if m == 0:
        return out(b)
    if select_topk <= 0:
        sel = jnp.zeros(b.shape, bool)
    elif select_topk >= 1:
        sel = None
    else:
        sel = _sce_select(tvs, select_topk, R, host)
    masked = tvs if sel is None else [jnp.where(sel, tv, 0.0) for tv in tvs]
    wv = [R(fixed_sum(R(t * t)) / t.size) for t in masked]
    tot = R(seq_sum(wv))
    if variant == "mergekit":
        small = jnp.abs(tot) < 1e-6
        w = [jnp.where(small, R(jnp.float32(1.0 / m)), R(v / jnp.where(small, 1.0, tot))) for v in wv]
        tvs = masked
    else:
        w = [jnp.where(tot == 0, 1.0 / m, v / jnp.where(tot == 0, 1.0, tot)) for v in wv]
    keep = consensus_mask(tvs, "sum", R)
    ew = [jnp.where(k, wi, 0.0) for k, wi in zip(keep, w)]
    merged = R(seq_sum([R(tv * e) for tv, e in zip(tvs, ew)]))
    div = R(seq_sum(ew))
    if variant == "mergekit":
        return out(R(b + R(merged / R(jnp.maximum(div, 1e-6)))))
    return out(b + merged / jnp.where(div == 0, 1.0, div))
